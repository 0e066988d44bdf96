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
//! Supported on a session channel: pty-req, window-change, env (keys of
//! core's one grammar, `[A-Za-z_][A-Za-z0-9_]*`), shell (a login shell), exec
//! (`sh -c`), and the `sftp` subsystem when the sandbox has OpenSSH's
//! sftp-server (scp speaks SFTP since OpenSSH 9). Commands start as
//! [`crate::spawn`] says, like exec. Port, agent and X11 forwarding are
//! refused.
//!
//! Where things are: [`host_key`] (the server's identity and russh config),
//! [`bridge`] (relay frames to and from the session's pipe), [`handler`]
//! (the russh callbacks: auth and channel requests), [`channel`] (a session
//! channel's state and the command it runs).

mod bridge;
mod channel;
mod handler;
mod host_key;

pub use host_key::SshServer;

/// How much is read from a pipe (or the relay) at once.
const CHUNK: usize = 32 * 1024;
