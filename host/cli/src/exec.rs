//! Streaming a command's output from a sandbox, and our stdin to it.

use std::collections::HashMap;
use std::io::Write;

use anyhow::anyhow;
use openshell_proto::v1 as pb;
use pb::exec_client_message::Msg as C;
use pb::exec_server_message::Msg as S;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, status_error};

pub struct ExecArgs {
    pub sandbox: String,
    pub argv: Vec<String>,
    pub workdir: String,
    pub timeout_ms: u64,
    pub env: HashMap<String, String>,
    /// Run under a pseudo-terminal of this size (rows, cols), and forward
    /// our terminal's resizes.
    pub tty: Option<(u32, u32)>,
    /// Run as the sandbox's main process (see `ExecStart.main`): stdin is
    /// not forwarded.
    pub main: bool,
}

/// Runs the command and returns its exit code.
pub async fn run(c: &mut Client, a: ExecArgs) -> anyhow::Result<i32> {
    let (tx, rx) = mpsc::channel(16);
    let start = pb::ExecStart {
        sandbox: a.sandbox,
        argv: a.argv,
        environment: a.env,
        workdir: a.workdir,
        timeout_ms: a.timeout_ms,
        tty: a.tty.is_some(),
        window: a.tty.map(|(rows, cols)| pb::WindowSize { rows, cols }),
        main: a.main,
    };
    tx.send(pb::ExecClientMessage {
        msg: Some(C::Start(start)),
    })
    .await
    .map_err(|_| anyhow!("internal: exec channel closed"))?;
    if a.tty.is_some() {
        // Window changes follow the local terminal.
        let tx = tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                let Some((rows, cols)) = crate::terminal::size() else {
                    continue;
                };
                let m = C::Resize(pb::WindowSize { rows, cols });
                if tx
                    .send(pb::ExecClientMessage { msg: Some(m) })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    // Our stdin, forwarded until EOF; a main process has none (the request
    // stream is just held open).
    if a.main {
        tokio::spawn(async move { tx.closed().await });
    } else {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let msg = match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => C::StdinEof(true),
                    Ok(n) => C::Stdin(buf[..n].to_vec().into()),
                };
                let eof = matches!(msg, C::StdinEof(_));
                if tx
                    .send(pb::ExecClientMessage { msg: Some(msg) })
                    .await
                    .is_err()
                    || eof
                {
                    // Keep the request stream open until the server finishes.
                    tx.closed().await;
                    return;
                }
            }
        });
    }
    let mut stream = c
        .exec_sandbox(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(m) = stream.message().await.map_err(status_error)? {
        match m.msg {
            Some(S::Stdout(b)) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Some(S::Stderr(b)) => {
                err.write_all(&b)?;
                err.flush()?;
            }
            Some(S::Exit(code)) => return Ok(code),
            None => {}
        }
    }
    Err(anyhow!("the gateway ended the exec without an exit code"))
}
