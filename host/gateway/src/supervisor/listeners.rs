//! One unix-socket server per sandbox. The socket decides which sandbox a
//! connection belongs to before any message is read.
//!
//! The socket is 0600 and owned by root until the process capability hands
//! it to the sandbox's uid 0 (its supervisor); a VM's only client is the
//! gateway's own forwarder, running as root. Sandbox code cannot connect.
//! A compromised supervisor still can, so every socket has budgets
//! ([`SocketLimits`]): connections (an accept loop that stops accepting at
//! the cap and backs off when the gateway is out of file descriptors),
//! an HTTP/2 handshake deadline, small messages and stream quotas (in
//! [`super::service`]). Whatever it does then costs only its own sandbox.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use openshell_core::SandboxId;
use openshell_proto::v1::supervisor_server::SupervisorServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::Supervisors;
use super::service::{SocketBudget, SupervisorService};

/// AF_UNIX paths longer than this do not fit `sockaddr_un` on Linux.
pub const MAX_SOCKET_PATH: usize = 107;

/// What one sandbox's supervisor may use of the gateway through its socket.
#[derive(Clone, Copy, Debug)]
pub struct SocketLimits {
    /// Open connections; a supervisor needs one, two while it reconnects.
    pub connections: usize,
    /// ConnectSupervisor streams: the session and a spare for a reconnect.
    pub control_streams: usize,
    /// RelayStream streams (exec, ssh), counted apart from control so
    /// heartbeats never wait behind data.
    pub relay_streams: usize,
    /// Egress streams (sandbox code's outbound connections), a quota of
    /// their own: the policy's connection limit is enforced (and audited)
    /// below this; this only bounds what a lying supervisor can open. They
    /// ride a connection of their own, so they share its window and never
    /// the control connection's.
    pub egress_streams: usize,
    /// A new connection must send the HTTP/2 preface and settings by then.
    pub handshake: Duration,
    /// A new stream must send its first message (hello, init) by then.
    pub first_message: Duration,
    /// Largest message decoded: a relay frame's 32 KiB chunk and framing.
    /// A hello needs a few KiB (its fields are bounded by `check_hello`).
    pub max_message: usize,
    /// HTTP/2 receive window per stream; the connection's window is this
    /// times the streams it may carry, so a stalled relay cannot take the
    /// window the control stream needs.
    pub stream_window: u32,
}

/// The largest HTTP/2 frame a supervisor may send (the protocol's default
/// is 16 KiB, which cuts every output frame into eight).
const MAX_FRAME: u32 = 256 * 1024;

impl Default for SocketLimits {
    fn default() -> Self {
        Self {
            connections: 4,
            control_streams: 2,
            relay_streams: 64,
            egress_streams: 1024,
            handshake: Duration::from_secs(3),
            first_message: Duration::from_secs(5),
            // An exec output frame carries up to 128 KiB (the supervisor's
            // CHUNK) plus its framing.
            max_message: 256 * 1024,
            // Large enough that a relay's sender is not stalled by window
            // updates on a fast path; small enough that all relays of a
            // connection stalled at once hold 32 MiB, and the control
            // stream always has a window of its own.
            stream_window: 512 * 1024,
        }
    }
}

impl SocketLimits {
    fn streams(&self) -> usize {
        self.control_streams + self.relay_streams + self.egress_streams
    }

    /// Streams whose windows add up to a connection's window.
    fn windowed_streams(&self) -> usize {
        self.control_streams + self.relay_streams
    }
}

/// One unix-socket server per sandbox.
#[derive(Default)]
pub struct Listeners {
    running: Mutex<HashMap<SandboxId, watch::Sender<bool>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "the supervisor socket path {path} is {len} bytes; unix sockets allow {MAX_SOCKET_PATH}: use a shorter --state-dir"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("the supervisor socket's directory {path} is not a directory (a symlink?)")]
    NotADirectory { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Listeners {
    /// Serves the supervisor service for `sandbox` on `path` (replacing a
    /// stale socket), until [`Self::stop`].
    pub fn start(
        &self,
        supervisors: Arc<Supervisors>,
        sandbox: SandboxId,
        path: &Path,
        limits: SocketLimits,
    ) -> Result<(), ListenError> {
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(ListenError::PathTooLong {
                path: path.to_owned(),
                len,
            });
        }
        let listener = bind_private(path)?;
        let handoffs = bind_private(&super::handoff::path_beside(path))?;

        let (stop_tx, mut stop_rx) = watch::channel(false);
        if let Some(old) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox, stop_tx)
        {
            let _ = old.send(true);
        }
        let budget = Arc::new(SocketBudget::new(limits));
        super::handoff::serve(
            handoffs,
            sandbox,
            supervisors.clone(),
            budget.egress.clone(),
            stop_rx.clone(),
        );
        let svc = SupervisorServer::new(SupervisorService {
            sandbox,
            supervisors,
            budget: budget.clone(),
        })
        .max_decoding_message_size(limits.max_message);
        let streams = u32::try_from(limits.streams()).unwrap_or(u32::MAX);
        let windowed = u32::try_from(limits.windowed_streams()).unwrap_or(u32::MAX);
        let incoming = accept_loop(listener, sandbox, limits, budget);
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(15)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .max_concurrent_streams(streams)
                .initial_stream_window_size(limits.stream_window)
                .initial_connection_window_size(limits.stream_window.saturating_mul(windowed + 1))
                // Fewer, larger HTTP/2 frames per relay message.
                .max_frame_size(Some(MAX_FRAME))
                .http2_max_header_list_size(16 * 1024)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(sandbox = %sandbox, "supervisor listener failed: {e}");
            }
        });
        Ok(())
    }

    pub fn stop(&self, sandbox: SandboxId) {
        if let Some(tx) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sandbox)
        {
            let _ = tx.send(true);
        }
    }

    pub fn stop_all(&self) {
        let all: Vec<_> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, tx) in all {
            let _ = tx.send(true);
        }
    }
}

/// Binds `path` as a socket only root can connect to (0600), in a
/// root-owned directory nobody else can write or list (0711: the
/// supervisor needs to pass through it). The process capability later
/// hands the socket, not the directory, to the sandbox's root.
fn bind_private(path: &Path) -> Result<UnixListener, ListenError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |source| ListenError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io(e)),
            _ => {}
        }
        // Never chmod through a symlink someone planted in place of the dir.
        let meta = std::fs::symlink_metadata(dir).map_err(io)?;
        if !meta.file_type().is_dir() {
            return Err(ListenError::NotADirectory {
                path: dir.to_owned(),
            });
        }
        if meta.mode() & 0o7777 != 0o711 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(io)?;
        }
    }
    // Bound through a handle on the directory: the kernel records the name
    // a socket was bound with and lists it in /proc/net/unix, where sandbox
    // code can read it, so the host path must not be that name. The handle
    // (no symlink followed) also pins the directory just checked.
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, name),
        _ => {
            return Err(ListenError::NotADirectory {
                path: path.to_owned(),
            });
        }
    };
    let handle = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_PATH | nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(dir)
            .map_err(io)?
    };
    let via = Path::new("/proc/self/fd")
        .join(std::os::fd::AsRawFd::as_raw_fd(&handle).to_string())
        .join(name);
    match std::fs::remove_file(&via) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&via).map_err(io)?;
    // Until this chmod the umask decides; no supervisor of this launch runs
    // yet (the driver is called after `listen`), and connecting needs write
    // permission, which a 022 umask already withholds from others.
    std::fs::set_permissions(&via, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Connections accepted within the socket's budget. At the cap it stops
/// accepting (the kernel's backlog, then the client, waits) instead of
/// accepting and closing; out of file descriptors it backs off instead of
/// spinning. Never yields an error: tonic would just poll again at once.
fn accept_loop(
    listener: UnixListener,
    sandbox: SandboxId,
    limits: SocketLimits,
    budget: Arc<SocketBudget>,
) -> impl futures::Stream<Item = Result<Guarded, io::Error>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.connections));
    futures::stream::unfold(
        (listener, slots, budget),
        move |(listener, slots, budget)| async move {
            let mut backoff = Duration::from_millis(10);
            loop {
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        if let Some(dropped) = budget.log.allow() {
                            tracing::warn!(
                                sandbox = %sandbox,
                                limit = limits.connections,
                                dropped,
                                "supervisor socket at its connection limit; not accepting more"
                            );
                        }
                        match slots.clone().acquire_owned().await {
                            Ok(p) => p,
                            Err(_) => return None,
                        }
                    }
                };
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let conn = Guarded::new(stream, permit, limits.handshake);
                        return Some((Ok(conn), (listener, slots, budget)));
                    }
                    Err(e) => {
                        drop(permit);
                        if let Some(dropped) = budget.log.allow() {
                            tracing::warn!(sandbox = %sandbox, dropped, "supervisor socket accept failed: {e}");
                        }
                        // EMFILE and friends: the error repeats until a
                        // descriptor frees up, so wait rather than spin.
                        if is_resource_error(&e) {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
            }
        },
    )
}

fn is_resource_error(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// The HTTP/2 client preface (24 bytes) plus a SETTINGS frame header.
const HANDSHAKE_BYTES: usize = 24 + 9;

/// An accepted connection: holds its connection slot until dropped, and
/// fails its reads if the client has not sent [`HANDSHAKE_BYTES`] by the
/// handshake deadline (hyper has no such deadline for HTTP/2).
pub struct Guarded {
    inner: UnixStream,
    _slot: OwnedSemaphorePermit,
    /// Armed until the handshake bytes arrived.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    read: usize,
}

impl Guarded {
    fn new(inner: UnixStream, slot: OwnedSemaphorePermit, handshake: Duration) -> Self {
        Self {
            inner,
            _slot: slot,
            deadline: Some(Box::pin(tokio::time::sleep(handshake))),
            read: 0,
        }
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = <UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(deadline) = &mut this.deadline {
            this.read += buf.filled().len() - before;
            if this.read >= HANDSHAKE_BYTES {
                this.deadline = None;
            } else if r.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 handshake within the deadline",
                )));
            }
        }
        r
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_socket_is_private_to_root_in_a_directory_nobody_else_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = run.join("gateway.sock");
        std::fs::write(&path, b"stale").unwrap();
        let _l = bind_private(&path).unwrap();
        let sock = std::fs::symlink_metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&sock.file_type()));
        assert_eq!(sock.mode() & 0o7777, 0o600);
        assert_eq!(
            std::fs::metadata(&run).unwrap().mode() & 0o7777,
            0o711,
            "the directory is not left world-writable"
        );
    }

    #[tokio::test]
    async fn a_symlink_in_place_of_the_socket_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("run")).unwrap();
        let r = bind_private(&dir.path().join("run/gateway.sock"));
        assert!(matches!(r, Err(ListenError::NotADirectory { .. })), "{r:?}");
        assert_eq!(
            std::fs::metadata(&elsewhere).unwrap().mode() & 0o7777,
            0o755,
            "the symlink's target was not chmodded"
        );
    }

    #[tokio::test]
    async fn a_connection_without_a_handshake_is_closed_at_the_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let mut g = Guarded::new(a, slot, Duration::from_millis(50));
        use tokio::io::AsyncWriteExt;
        b.write_all(b"PRI * HTTP/2.0").await.unwrap();
        let mut buf = [0u8; 64];
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(n, 14);
        let deadline = tokio::time::timeout(Duration::from_secs(10), g.read(&mut buf)).await;
        let err = deadline.expect("the guard fires").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_completed_handshake_disarms_the_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let mut g = Guarded::new(a, slot, Duration::from_millis(50));
        use tokio::io::AsyncWriteExt;
        b.write_all(&[0u8; HANDSHAKE_BYTES]).await.unwrap();
        let mut buf = [0u8; HANDSHAKE_BYTES];
        g.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.write_all(b"later").await.unwrap();
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"later");
    }
}
