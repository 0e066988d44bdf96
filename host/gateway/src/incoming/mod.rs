//! The API port's front door: which TCP connections tonic ever sees.
//!
//! The gateway accepts connections itself instead of handing tonic the
//! listener, because tonic's own accept path has no handshake deadline and
//! no connection limit (issue 13, item 4): 1,100 silent connections from a
//! local user exhausted the file descriptors and locked everyone out.
//!
//! A connection is *handshaking* from `accept` until it has finished TLS
//! (when on) and sent the HTTP/2 client preface, and *live* after that.
//! [`Admission`] is the pure accounting: a cap on live connections per peer
//! (an IPv4 address or an IPv6 /64), a cap on handshaking connections per
//! peer and in total, and a total cap kept below the process's fd limit.
//! Over a handshake cap the oldest silent handshake is closed to make room,
//! so a flood of idle sockets from one address (on loopback, every local
//! user is 127.0.0.1) cannot lock out a real client that finishes in
//! milliseconds; over a live cap the new connection is closed at once.
//! Nothing waits in a queue. A live share that is full makes room by
//! closing the peer's connection idle the longest (no request in flight,
//! as [`activity`] counts them), and a connection idle for
//! [`ConnectionLimits::idle_timeout`] is closed anyway. [`incoming`] is the
//! thin async shell: the accept loop (which backs off on EMFILE instead of
//! spinning), one task per handshake under
//! [`ConnectionLimits::handshake_timeout`], and the stream of ready
//! connections tonic serves.

mod activity;
mod admission;

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

pub(crate) use activity::TrackRequests;
use activity::{Activity, Registry};
use admission::{Admission, Admit, Throttle, peer_key};

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// File descriptors kept out of the connection budget: the database,
/// plugins, per-sandbox sockets and logs need them too.
const FD_RESERVE: u64 = 256;

/// How long the accept loop sleeps after a resource error (EMFILE, ENFILE,
/// ENOBUFS): the pending connection stays in the backlog, so retrying at
/// once would spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line per this interval for the same kind of trouble.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The connection budget of the API port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Live connections from one peer (an IPv4 address or an IPv6 /64).
    pub per_peer: usize,
    /// All connections, handshaking or live; lowered at start to fit the
    /// process's fd limit.
    pub total: usize,
    /// Connections from one peer that have not finished their handshake.
    pub handshake_per_peer: usize,
    /// Connections in total that have not finished their handshake.
    pub handshake_total: usize,
    /// Time from accept to a finished TLS handshake and HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// A live connection with no request in flight for this long is closed
    /// (a client reconnects in a round trip; an idle socket holds a slot).
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            per_peer: 256,
            total: 4096,
            handshake_per_peer: 64,
            handshake_total: 512,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl ConnectionLimits {
    /// These limits with `total` (and the handshake budget under it) below
    /// an fd limit of `nofile`, keeping [`FD_RESERVE`] or a quarter of it,
    /// whichever is more, for everything else.
    pub fn within_fd_limit(self, nofile: u64) -> ConnectionLimits {
        let budget = nofile.saturating_sub(FD_RESERVE.max(nofile / 4)).max(1);
        let total = self
            .total
            .min(usize::try_from(budget).unwrap_or(usize::MAX))
            .max(1);
        ConnectionLimits {
            total,
            handshake_total: self.handshake_total.min(total).max(1),
            ..self
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("cannot read the server certificate PEM: {0}")]
    Certificate(#[source] rustls::pki_types::pem::Error),
    #[error("cannot read the server key PEM: {0}")]
    PrivateKey(#[source] rustls::pki_types::pem::Error),
    #[error("cannot build the TLS server configuration: {0}")]
    Tls(#[source] rustls::Error),
}

/// A TLS acceptor for the server certificate, offering ALPN `h2` as gRPC
/// clients expect.
pub(crate) fn tls_acceptor(cert_pem: &str, key_pem: &str) -> Result<TlsAcceptor, IncomingError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(IncomingError::Certificate)?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(IncomingError::PrivateKey)?;
    // The provider is named rather than taken from the process default,
    // which is ambiguous when more than one is compiled in.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(IncomingError::Tls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(IncomingError::Tls)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit where it is lower, and
/// returns the soft limit in force afterwards. Many systems start services
/// at a soft limit of 1,024 with a far higher hard limit.
pub(crate) fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    // An unlimited hard limit is still capped by fs.nr_open (2^20 by
    // default); asking for more fails.
    let target = hard.min(1 << 20);
    if soft >= target {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => {
            tracing::info!(from = soft, to = target, "raised the open-file limit");
            target
        }
        Err(e) => {
            tracing::warn!(soft, hard, "cannot raise the open-file limit: {e}");
            soft
        }
    }
}

type Table = Arc<Mutex<Admission<oneshot::Sender<Infallible>, Arc<Activity>>>>;

/// One connection's place in the [`Admission`] table, given back on drop.
struct Permit {
    table: Table,
    peer: IpAddr,
    id: u64,
    live: bool,
}

impl Permit {
    fn with<R>(
        &self,
        f: impl FnOnce(&mut Admission<oneshot::Sender<Infallible>, Arc<Activity>>) -> R,
    ) -> R {
        f(&mut self.table.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let (peer, id, live) = (self.peer, self.id, self.live);
        self.with(|t| t.release(peer, id, live));
    }
}

/// The stream under a connection.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A connection that finished its handshake, as tonic serves it: the
/// preface that was read to prove it is replayed first, and its permit is
/// released when hyper drops it.
pub(crate) struct Conn {
    io: Io,
    /// How much of [`H2_PREFACE`] is still to be replayed.
    replay: usize,
    info: TcpConnectInfo,
    activity: Arc<Activity>,
    registry: Registry,
    permit: Permit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(peer) = self.info.remote_addr {
            self.registry.remove(peer);
        }
    }
}

impl Connected for Conn {
    // Plain TCP info for both, so `Request::remote_addr` sees the peer
    // with TLS on or off.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Closed to make room or for idling: end of file ends the connection.
        if this.activity.poll_closed(cx) {
            return Poll::Ready(Ok(()));
        }
        if this.replay > 0 {
            let start = H2_PREFACE.len() - this.replay;
            let n = this.replay.min(buf.remaining());
            buf.put_slice(&H2_PREFACE[start..start + n]);
            this.replay -= n;
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections tonic should serve from `listener`: accepted under
/// `limits`, through `tls` when set, each one past its handshake. The
/// accept loop runs until tonic drops the stream.
/// Serve them with [`TrackRequests`] layered on the service, so that a
/// connection with a request in flight is never taken for idle.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
) -> (impl Stream<Item = Result<Conn, Infallible>>, TrackRequests) {
    let (tx, rx) = mpsc::channel(64);
    let registry = Registry::default();
    tokio::spawn(accept_loop(listener, tls, limits, registry.clone(), tx));
    (
        tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok),
        TrackRequests(registry),
    )
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    registry: Registry,
    tx: mpsc::Sender<Conn>,
) {
    let table: Table = Arc::new(Mutex::new(Admission::new(limits)));
    let local_addr = listener.local_addr().ok();
    let (mut accept_trouble, mut refusals) = (Throttle::default(), Throttle::default());
    // Idle connections are swept a few times per timeout.
    let mut sweep =
        tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(100)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            _ = sweep.tick() => {
                let now = Instant::now();
                let closed = table
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .expire_idle(now, limits.idle_timeout);
                if closed > 0 {
                    tracing::debug!(closed, "closed idle API connections");
                }
                continue;
            }
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            // This connection died before we took it; the next may be fine.
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                if let Some(suppressed) = accept_trouble.due(Instant::now()) {
                    tracing::warn!(
                        suppressed,
                        "cannot accept API connections ({e}); backing off, existing connections are served"
                    );
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Without TCP_NODELAY every small streaming frame (exec output,
        // watch events) waits ~40 ms for a delayed ACK.
        let _ = stream.set_nodelay(true);
        let peer = peer_key(remote.ip());
        let (close_tx, close_rx) = oneshot::channel();
        let admitted = table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(peer, close_tx);
        match admitted {
            Admit::Refused(why) => {
                if let Some(suppressed) = refusals.due(Instant::now()) {
                    tracing::warn!(%peer, ?why, suppressed, "closed a new API connection over the connection limit");
                }
            }
            // Dropping the evicted sender closes that handshake.
            Admit::Accepted { id, evicted: _ } => {
                let permit = Permit {
                    table: table.clone(),
                    peer,
                    id,
                    live: false,
                };
                let info = TcpConnectInfo {
                    local_addr,
                    remote_addr: Some(remote),
                };
                tokio::spawn(handshake(
                    stream,
                    tls.clone(),
                    limits.handshake_timeout,
                    permit,
                    close_rx,
                    info,
                    Handoff {
                        registry: registry.clone(),
                        tx: tx.clone(),
                    },
                ));
            }
        }
        // Let the new handshake task run (and mark itself heard) before a
        // backlog full of flood connections is drained past it.
        tokio::task::yield_now().await;
    }
}

/// Accept errors about one connection rather than the process.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Where a finished handshake goes: registered for the request layer, then
/// sent to tonic.
struct Handoff {
    registry: Registry,
    tx: mpsc::Sender<Conn>,
}

async fn handshake(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    deadline: Duration,
    permit: Permit,
    closed: oneshot::Receiver<Infallible>,
    info: TcpConnectInfo,
    Handoff { registry, tx }: Handoff,
) {
    let work = async {
        // A real client speaks first; marking it keeps it from being the
        // one closed to make room for a flood of silent sockets.
        stream.readable().await?;
        permit.with(|t| t.heard(permit.peer, permit.id));
        let mut io = match &tls {
            Some(acceptor) => Io::Tls(Box::new(acceptor.accept(stream).await?)),
            None => Io::Plain(stream),
        };
        let mut preface = [0u8; H2_PREFACE.len()];
        match &mut io {
            Io::Plain(s) => s.read_exact(&mut preface).await?,
            Io::Tls(s) => s.read_exact(&mut preface).await?,
        };
        if &preface != H2_PREFACE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 client",
            ));
        }
        Ok(io)
    };
    let io = tokio::select! {
        // The sender went away: evicted to make room.
        _ = closed => return,
        r = tokio::time::timeout(deadline, work) => match r {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                tracing::debug!(peer = ?info.remote_addr, "API handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = ?info.remote_addr, "API handshake timed out");
                return;
            }
        },
    };
    let activity = Activity::new();
    // Registered before it can carry a request, and before the accounting
    // may pick it to close.
    if let Some(peer) = info.remote_addr {
        registry.insert(peer, activity.clone());
    }
    let conn = Conn {
        io,
        replay: H2_PREFACE.len(),
        info,
        activity: activity.clone(),
        registry,
        permit,
    };
    let (peer, id) = (conn.permit.peer, conn.permit.id);
    if !conn.permit.with(|t| t.establish(peer, id, activity)) {
        return;
    }
    let mut conn = conn;
    conn.permit.live = true;
    let _ = tx.send(conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_budget_stays_below_the_fd_limit() {
        let d = ConnectionLimits::default();
        let low = d.within_fd_limit(1024);
        assert_eq!(low.total, 768);
        assert!(low.handshake_total <= low.total);
        assert_eq!(d.within_fd_limit(1 << 20).total, d.total);
        let tiny = d.within_fd_limit(10);
        assert!(tiny.total >= 1 && tiny.handshake_total >= 1);
    }
}
