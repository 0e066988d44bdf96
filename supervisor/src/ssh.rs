//! The in-sandbox SSH server: one russh session per SSH relay.
//!
//! There is no listener, TCP or unix: the gateway asks for an SSH relay, we
//! open it on the connection we dialled, and the relay's `data` frames are
//! bridged to one end of an in-memory duplex pipe whose other end the SSH
//! session reads and writes. So the server is reachable only through a
//! relay, and a relay exists only after the gateway authenticated the user
//! who asked for it. That is why the server accepts every SSH user and auth
//! method (`none` included) without a password: SSH here provides a
//! protocol tools speak, not a second login. The client checks the server
//! against the host key we generate at start and report in our hello.
//!
//! Supported on a session channel: pty-req, window-change, env (keys of the
//! form `[A-Za-z_][A-Za-z0-9_]*`), shell (a login shell), exec (`sh -c`),
//! and the `sftp` subsystem when the sandbox has OpenSSH's sftp-server (scp
//! speaks SFTP since OpenSSH 9). Commands start as [`crate::spawn`] says,
//! like exec. Port, agent and X11 forwarding are refused.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openshell_core::validate;
use openshell_proto::v1 as pb;
use pb::relay_frame::Frame;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::Config;
use crate::spawn::{self, Stream};

/// OpenSSH's SFTP server, as Debian installs it; the sandbox sees the
/// host's /usr.
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
const CHUNK: usize = 32 * 1024;
/// How long one side of a closing relay waits for the other to finish.
const LINGER: Duration = Duration::from_secs(5);
/// How long output may keep arriving after the command exited (a
/// background process holding the pipes open) before the exit is reported.
const DRAIN: Duration = Duration::from_secs(2);

/// The SSH server's identity: a host key made at start, kept in memory.
pub struct SshServer {
    config: Arc<russh::server::Config>,
    public_key: String,
}

impl SshServer {
    /// A server with a fresh ed25519 host key.
    pub fn generate() -> Result<Self, String> {
        let seed: [u8; 32] = rand::random();
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        let public_key = key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the SSH host key: {e}"))?
            .trim()
            .to_owned();
        let config = russh::server::Config {
            keys: vec![key],
            methods: MethodSet::from(&[MethodKind::None, MethodKind::PublicKey][..]),
            // Nothing is ever rejected (see the module docs), so there is no
            // timing to hide.
            auth_rejection_time: Duration::ZERO,
            auth_rejection_time_initial: Some(Duration::ZERO),
            // The gateway closes idle relays; the client sends keepalives.
            inactivity_timeout: None,
            ..Default::default()
        };
        Ok(Self {
            config: Arc::new(config),
            public_key,
        })
    }

    /// The host key as an OpenSSH public-key line, `ssh-ed25519 AAAA...`.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// Runs one SSH connection over an opened relay until either side
    /// closes it.
    pub async fn serve(
        &self,
        cfg: &Config,
        mut inbound: tonic::Streaming<pb::RelayFrame>,
        tx: mpsc::Sender<pb::RelayFrame>,
    ) {
        let (ours, theirs) = tokio::io::duplex(4 * CHUNK);
        let (mut from_ssh, mut to_ssh) = tokio::io::split(ours);
        let handler = Connection {
            cfg: Arc::new(cfg.clone()),
            channels: HashMap::new(),
        };
        let config = self.config.clone();
        // The session is spawned by russh; run_stream itself already talks
        // (it exchanges version lines), so it runs beside the pumps.
        let server = async move {
            match russh::server::run_stream(config, theirs, handler).await {
                Ok(session) => session.await,
                Err(e) => Err(e),
            }
        };
        // Gateway → SSH server. Reads the relay to its end even after the
        // server is gone, so the gateway's last frames are not reset away.
        let gateway_to_ssh = async move {
            let mut open = true;
            while let Ok(Some(f)) = inbound.message().await {
                if let Some(Frame::Data(bytes)) = f.frame
                    && open
                {
                    open = to_ssh.write_all(&bytes).await.is_ok();
                }
            }
            let _ = to_ssh.shutdown().await;
        };
        // SSH server → gateway; ends (and closes our half of the relay) when
        // the session drops its end of the pipe.
        let ssh_to_gateway = async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match from_ssh.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let frame = pb::RelayFrame {
                            frame: Some(Frame::Data(buf[..n].to_vec())),
                        };
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let pumps = async {
            tokio::pin!(gateway_to_ssh, ssh_to_gateway);
            tokio::select! {
                () = &mut gateway_to_ssh => {
                    let _ = tokio::time::timeout(LINGER, &mut ssh_to_gateway).await;
                }
                () = &mut ssh_to_gateway => {
                    let _ = tokio::time::timeout(LINGER, &mut gateway_to_ssh).await;
                }
            }
        };
        let (result, ()) = tokio::join!(server, pumps);
        tracing::debug!("ssh connection ended: {result:?}");
    }
}

/// One SSH connection: its session channels and what runs in them.
struct Connection {
    cfg: Arc<Config>,
    channels: HashMap<ChannelId, SessionChannel>,
}

/// A session channel, before and after its command starts.
struct SessionChannel {
    env: BTreeMap<String, String>,
    /// TERM and the size from pty-req.
    pty: Option<(String, nix::pty::Winsize)>,
    /// Input for the command: queued from the start so nothing the client
    /// sends early is lost; dropping the sender is EOF.
    stdin: Option<mpsc::UnboundedSender<Vec<u8>>>,
    stdin_rx: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    running: Option<Running>,
}

impl SessionChannel {
    fn new() -> Self {
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
struct Running {
    master: Option<OwnedFd>,
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
fn window(rows: u32, cols: u32) -> nix::pty::Winsize {
    if rows == 0 || cols == 0 {
        spawn::winsize(24, 80)
    } else {
        spawn::winsize(rows, cols)
    }
}

/// `bash -l` if the sandbox has bash, else `sh -l`.
fn login_shell(path: &str) -> Vec<OsString> {
    let bash = path
        .split(':')
        .any(|dir| std::path::Path::new(dir).join("bash").is_file());
    let shell = if bash { "bash" } else { "sh" };
    vec![shell.into(), "-l".into()]
}

impl Connection {
    /// Starts a command on a channel and answers the request.
    fn start(
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
                tracing::info!(%program, "ssh: cannot spawn: {e}");
                session.extended_data(
                    id,
                    1,
                    format!("openshell: cannot run {program}: {e}\r\n"),
                )?;
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

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    // Every user and method is accepted: see the module docs.
    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Requests and data arrive through the callbacks below; the channel
        // object itself is not needed.
        self.channels.insert(channel.id(), SessionChannel::new());
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.stdin = None;
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.channels.get(&channel).and_then(|c| c.stdin.as_ref()) {
            let _ = tx.send(data.to_vec());
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(ch) if ch.running.is_none() => {
                let term = if term.is_empty() || term.len() > 64 || term.contains('\0') {
                    "xterm-256color"
                } else {
                    term
                };
                ch.pty = Some((term.to_owned(), window(row_height, col_width)));
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ws = window(row_height, col_width);
        let Some(ch) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if let Some((_, size)) = &mut ch.pty {
            *size = ws;
        }
        if let Some(master) = ch.running.as_ref().and_then(|r| r.master.as_ref()) {
            spawn::resize(master, ws);
        }
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(ch) if validate::is_env_key(name) && !value.contains('\0') => {
                ch.env.insert(name.to_owned(), value.to_owned());
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let path = self.cfg.child_env.get("PATH").map_or("", String::as_str);
        let argv = login_shell(path);
        self.start(channel, argv, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if data.contains(&0) {
            return session.channel_failure(channel);
        }
        let argv = vec!["sh".into(), "-c".into(), OsString::from_vec(data.to_vec())];
        self.start(channel, argv, session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" && std::path::Path::new(SFTP_SERVER).is_file() {
            self.start(channel, vec![SFTP_SERVER.into()], session)
        } else {
            tracing::info!(name, "ssh: refused a subsystem this sandbox does not have");
            session.channel_failure(channel)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_server_reports_an_ed25519_public_key_line() {
        let a = SshServer::generate().unwrap();
        let b = SshServer::generate().unwrap();
        let line = a.public_key();
        assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
        assert_eq!(line.split(' ').count(), 2, "no comment: {line}");
        assert_ne!(line, b.public_key(), "every start makes a new key");
        russh::keys::PublicKey::from_openssh(line).unwrap();
    }

    #[test]
    fn an_unknown_terminal_size_is_80x24() {
        let ws = window(0, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (24, 80));
        let ws = window(50, 200);
        assert_eq!((ws.ws_row, ws.ws_col), (50, 200));
    }

    #[test]
    fn the_login_shell_is_bash_when_the_path_has_it() {
        let dir = std::env::temp_dir().join(format!("openshell-ssh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(login_shell(dir.to_str().unwrap()), ["sh", "-l"]);
        std::fs::write(dir.join("bash"), "").unwrap();
        assert_eq!(login_shell(dir.to_str().unwrap()), ["bash", "-l"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
