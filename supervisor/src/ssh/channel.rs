//! A session channel: what the client asked for before its command starts
//! (environment, pty), the command once it runs, and its output.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::ChannelId;
use russh::server::{Handle, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::CHUNK;
use super::handler::Connection;
use crate::report;
use crate::spawn::{self, Stream};

/// How long output may keep arriving after the command exited (a
/// background process holding the pipes open) before the exit is reported.
const DRAIN: Duration = Duration::from_secs(2);

/// A session channel, before and after its command starts.
pub(super) struct SessionChannel {
    pub(super) env: BTreeMap<String, String>,
    /// TERM and the size from pty-req.
    pub(super) pty: Option<(String, nix::pty::Winsize)>,
    /// Input for the command: queued from the start so nothing the client
    /// sends early is lost; dropping the sender is EOF.
    pub(super) stdin: Option<mpsc::UnboundedSender<Vec<u8>>>,
    stdin_rx: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    pub(super) running: Option<Running>,
}

impl SessionChannel {
    pub(super) fn new() -> Self {
        // Unbounded: russh widens the client's window as it delivers data,
        // so a bounded queue could only block the whole connection (and
        // with it the output the command may be waiting to write). The
        // client is the sandbox's authenticated user, who can fill memory
        // inside the sandbox anyway.
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            env: BTreeMap::new(),
            pty: None,
            stdin: Some(tx),
            stdin_rx: Some(rx),
            running: None,
        }
    }
}

/// A started command. Dropping it (the channel or connection closed) kills
/// the command's process tree unless the command already exited.
pub(super) struct Running {
    pub(super) master: Option<OwnedFd>,
    group: Option<nix::unistd::Pid>,
    exited: Arc<AtomicBool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.exited.load(Ordering::SeqCst) {
            spawn::kill_group(self.group);
        }
    }
}

/// A terminal size from the client; 0 (which `ssh -tt` without a local
/// terminal sends) means unknown, and gets the classic 80x24.
pub(super) fn window(rows: u32, cols: u32) -> nix::pty::Winsize {
    if rows == 0 || cols == 0 {
        spawn::winsize(24, 80)
    } else {
        spawn::winsize(rows, cols)
    }
}

/// `bash -l` if the sandbox has bash, else `sh -l`.
pub(super) fn login_shell(path: &str) -> Vec<OsString> {
    let bash = path
        .split(':')
        .any(|dir| std::path::Path::new(dir).join("bash").is_file());
    let shell = if bash { "bash" } else { "sh" };
    vec![shell.into(), "-l".into()]
}

impl Connection {
    /// Starts a command on a channel and answers the request.
    pub(super) fn start(
        &mut self,
        id: ChannelId,
        argv: Vec<OsString>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(ch) = self.channels.get_mut(&id) else {
            return session.channel_failure(id);
        };
        if ch.running.is_some() {
            // One command per channel (RFC 4254 6.5).
            return session.channel_failure(id);
        }
        let mut env = ch.env.clone();
        if let Some((term, _)) = &ch.pty {
            env.insert("TERM".into(), term.clone());
        }
        let cmd = spawn::Command {
            argv,
            env,
            workdir: None,
            tty: ch.pty.as_ref().map(|(_, ws)| *ws),
        };
        let spawned = match spawn::spawn(&self.cfg, &cmd) {
            Ok(s) => s,
            Err(e) => {
                let program = cmd.argv[0].to_string_lossy();
                tracing::info!(%program, "ssh: cannot spawn: {}", report::chain(&e));
                session.extended_data(id, 1, format!("openshell: {}\r\n", report::wire(&e)))?;
                return session.channel_failure(id);
            }
        };
        session.channel_success(id)?;
        let spawn::Spawned {
            mut child,
            stdin,
            readers,
            master,
            group,
        } = spawned;
        let exited = Arc::new(AtomicBool::new(false));
        ch.running = Some(Running {
            master,
            group,
            exited: exited.clone(),
        });
        if let (Some(mut w), Some(mut rx)) = (stdin, ch.stdin_rx.take()) {
            tokio::spawn(async move {
                while let Some(bytes) = rx.recv().await {
                    if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
                        return;
                    }
                }
                // EOF: dropping the writer closes the pipe (with a pty it
                // closes one copy of the master and changes nothing).
            });
        }
        let handle = session.handle();
        tokio::spawn(async move {
            let pumps: Vec<_> = readers
                .into_iter()
                .map(|(stream, r)| tokio::spawn(pump(handle.clone(), id, stream, r)))
                .collect();
            let code = spawn::exit_code(child.wait().await);
            exited.store(true, Ordering::SeqCst);
            for p in pumps {
                let _ = tokio::time::timeout(DRAIN, p).await;
            }
            // The order OpenSSH expects: exit-status, then EOF and close.
            let _ = handle.exit_status_request(id, code as u32).await;
            let _ = handle.eof(id).await;
            let _ = handle.close(id).await;
        });
        Ok(())
    }
}

/// Copies one output stream of a command to its channel: stdout as data,
/// stderr as extended data 1. Sending waits for the client's window.
async fn pump(
    handle: Handle,
    id: ChannelId,
    stream: Stream,
    mut r: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = buf[..n].to_vec();
        let sent = match stream {
            Stream::Stdout => handle.data(id, chunk).await,
            Stream::Stderr => handle.extended_data(id, 1, chunk).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_terminal_size_is_80x24() {
        let ws = window(0, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (24, 80));
        let ws = window(50, 200);
        assert_eq!((ws.ws_row, ws.ws_col), (50, 200));
    }

    #[test]
    fn the_login_shell_is_bash_when_the_path_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        assert_eq!(login_shell(path), ["sh", "-l"]);
        std::fs::write(dir.path().join("bash"), "").unwrap();
        assert_eq!(login_shell(path), ["bash", "-l"]);
    }
}
