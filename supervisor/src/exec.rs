//! Running one exec request over a relay.
//!
//! The command starts as [`crate::spawn`] says. Without a tty, stdout and
//! stderr stream separately, each in order; with one, the terminal's output
//! streams as stdout. A timeout or a vanished client kills its whole tree.

use std::time::Duration;

use openshell_proto::v1 as pb;
use pb::exec_client_message::Msg as C;
use pb::exec_server_message::Msg as S;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::Config;
use crate::relay::linger;
use crate::report;
use crate::spawn::{self, Stream};

/// The most one output frame carries. A read that returns less is topped up
/// with whatever else the pipe holds already (never waiting for more), so
/// a fast writer's bytes travel in few large frames and a slow one's are
/// sent as they come. Below the gateway's relay message limit.
pub const CHUNK: usize = 128 * 1024;

fn output(m: S) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::ExecOutput(pb::ExecServerMessage {
            msg: Some(m),
        })),
    }
}

fn window(w: Option<&pb::WindowSize>) -> nix::pty::Winsize {
    let w = w.cloned().unwrap_or(pb::WindowSize { rows: 24, cols: 80 });
    spawn::winsize(w.rows, w.cols)
}

fn command(start: &pb::ExecStart) -> spawn::Command {
    spawn::Command {
        argv: start.argv.iter().map(Into::into).collect(),
        env: start.environment.clone().into_iter().collect(),
        workdir: (!start.workdir.is_empty()).then(|| start.workdir.clone()),
        tty: start.tty.then(|| window(start.window.as_ref())),
    }
}

/// After a read of `filled` bytes into `buf`, reads what `r` has ready
/// behind them, up to the end of `buf`, without waiting. Returns how much
/// `buf` holds and whether the stream ended.
async fn top_up<R>(r: &mut R, buf: &mut [u8], mut filled: usize) -> (usize, bool)
where
    R: tokio::io::AsyncRead + Unpin + ?Sized,
{
    use std::task::Poll;
    while filled < buf.len() {
        let ready = std::future::poll_fn(|cx| {
            let mut rb = tokio::io::ReadBuf::new(&mut buf[filled..]);
            match std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Some(rb.filled().len())),
                Poll::Ready(Err(_)) => Poll::Ready(Some(0)),
                // Nothing more right now: send what there is.
                Poll::Pending => Poll::Ready(None),
            }
        })
        .await;
        match ready {
            None => return (filled, false),
            Some(0) => return (filled, true),
            Some(n) => filled += n,
        }
    }
    (filled, false)
}

/// Runs one command over an opened relay, until it exits and the gateway
/// has read the exit.
pub async fn run(
    cfg: &Config,
    start: pb::ExecStart,
    inbound: tonic::Streaming<pb::RelayFrame>,
    tx: mpsc::Sender<pb::RelayFrame>,
) {
    run_command(cfg, &command(&start), start.timeout_ms, inbound, tx).await
}

/// Runs `cmd` over an opened relay, exec's protocol both ways; a
/// `timeout_ms` of 0 is none.
pub async fn run_command(
    cfg: &Config,
    cmd: &spawn::Command,
    timeout_ms: u64,
    mut inbound: tonic::Streaming<pb::RelayFrame>,
    tx: mpsc::Sender<pb::RelayFrame>,
) {
    let argv0 = cmd
        .argv
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let spawned = match spawn::spawn(cfg, cmd) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(argv0, "cannot spawn: {}", report::chain(&e));
            let msg = format!("openshell: {}\n", report::wire(&e));
            let _ = tx.send(output(S::Stderr(msg.into()))).await;
            let _ = tx.send(output(S::Exit(e.exit_code()))).await;
            linger(inbound).await;
            return;
        }
    };
    let spawn::Spawned {
        mut child,
        mut stdin,
        readers,
        master,
        group,
    } = spawned;

    let mut pumps = Vec::new();
    for (stream, mut r) in readers {
        let tx = tx.clone();
        pumps.push(tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let (filled, ended) = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => (0, true),
                    Ok(n) => top_up(&mut r, &mut buf, n).await,
                };
                if filled > 0 {
                    // One copy, into the frame; `buf` is reused.
                    let chunk = bytes::Bytes::copy_from_slice(&buf[..filled]);
                    let m = match stream {
                        Stream::Stdout => S::Stdout(chunk),
                        Stream::Stderr => S::Stderr(chunk),
                    };
                    // A full channel waits here: the pipe fills and the
                    // command blocks, all the way back from the reader.
                    if tx.send(output(m)).await.is_err() {
                        return;
                    }
                }
                if ended {
                    return;
                }
            }
        }));
    }

    let timeout = match timeout_ms {
        0 => Duration::MAX,
        ms => Duration::from_millis(ms),
    };
    let deadline = tokio::time::sleep(timeout.min(Duration::from_secs(100 * 365 * 86400)));
    tokio::pin!(deadline);
    let kill_tree = || spawn::kill_group(group);
    let code = loop {
        tokio::select! {
            st = child.wait() => break spawn::exit_code(st),
            _ = &mut deadline => {
                kill_tree();
                let _ = child.wait().await;
                break 124;
            }
            f = inbound.message() => match f {
                Ok(Some(pb::RelayFrame { frame: Some(pb::relay_frame::Frame::ExecInput(m)) })) => match m.msg {
                    Some(C::Stdin(bytes)) => {
                        if let Some(w) = stdin.as_mut()
                            && (w.write_all(&bytes).await.is_err() || w.flush().await.is_err())
                        {
                            stdin = None;
                        }
                    }
                    Some(C::StdinEof(_)) => {
                        if master.is_some() {
                            // A terminal has no EOF of its own: send ^D.
                            if let Some(w) = stdin.as_mut() {
                                let _ = w.write_all(&[4]).await;
                            }
                        } else {
                            stdin = None;
                        }
                    }
                    Some(C::Resize(w)) => {
                        if let Some(m) = &master {
                            spawn::resize(m, window(Some(&w)));
                        }
                    }
                    Some(C::Start(_)) | None => {}
                },
                Ok(Some(_)) => {}
                // The client (or gateway) is gone: nobody will read the result.
                Ok(None) | Err(_) => {
                    kill_tree();
                    let _ = child.kill().await;
                    return;
                }
            }
        }
    };
    drop(stdin);
    drop(master);
    // Let the pipes drain; a background process holding them open gets
    // two seconds before the exit is reported anyway.
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
    }
    let _ = tx.send(output(S::Exit(code))).await;
    linger(inbound).await;
}
