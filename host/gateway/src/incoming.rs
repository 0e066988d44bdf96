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
//! Nothing waits in a queue. [`incoming`] is the thin async shell: the accept
//! loop (which backs off on EMFILE instead of spinning), one task per
//! handshake under [`ConnectionLimits::handshake_timeout`], and the stream of
//! ready connections tonic serves.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
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
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            per_peer: 256,
            total: 4096,
            handshake_per_peer: 64,
            handshake_total: 512,
            handshake_timeout: Duration::from_secs(10),
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

/// Whom a connection counts against: an IPv4 address (IPv4-mapped IPv6
/// included), or an IPv6 /64, the smallest block a site is usually given.
pub(crate) fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Why a new connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer already has its share of live connections.
    PeerFull,
    /// Every connection slot is live; none is handshaking to make room.
    GatewayFull,
}

/// The outcome of [`Admission::admit`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit<H> {
    /// Handshaking as `id`; `evicted` is the handle of the handshake closed
    /// to make room, if any.
    Accepted {
        id: u64,
        evicted: Option<H>,
    },
    Refused(Refusal),
}

struct Handshake<H> {
    id: u64,
    /// It has sent something: it is a client at work, not an idle socket.
    heard: bool,
    handle: H,
}

struct Peer<H> {
    /// Oldest first.
    handshaking: VecDeque<Handshake<H>>,
    live: usize,
}

impl<H> Peer<H> {
    /// The one to close for room: the oldest silent handshake, else the
    /// oldest.
    fn victim(&self) -> usize {
        self.handshaking.iter().position(|h| !h.heard).unwrap_or(0)
    }
}

/// The connection accounting, with no I/O: each handshaking connection
/// carries a handle `H` (in the gateway, the sender whose drop closes it).
pub(crate) struct Admission<H> {
    limits: ConnectionLimits,
    peers: HashMap<IpAddr, Peer<H>>,
    handshaking: usize,
    live: usize,
    next_id: u64,
}

impl<H> Admission<H> {
    pub(crate) fn new(limits: ConnectionLimits) -> Self {
        Admission {
            limits,
            peers: HashMap::new(),
            handshaking: 0,
            live: 0,
            next_id: 0,
        }
    }

    /// A new connection from `peer`, keyed by [`peer_key`] by the caller.
    pub(crate) fn admit(&mut self, peer: IpAddr, handle: H) -> Admit<H> {
        let l = self.limits;
        if self.peers.get(&peer).is_some_and(|p| p.live >= l.per_peer) {
            return Admit::Refused(Refusal::PeerFull);
        }
        let own = self.peers.get(&peer).map_or(0, |p| p.handshaking.len());
        let evicted = if own >= l.handshake_per_peer {
            // A peer over its handshake share makes room from its own.
            self.evict_from(peer)
        } else if self.handshaking >= l.handshake_total || self.handshaking + self.live >= l.total {
            // Room comes from whoever holds the most handshakes.
            let heaviest = self
                .peers
                .iter()
                .filter(|(_, p)| !p.handshaking.is_empty())
                .max_by_key(|(_, p)| p.handshaking.len())
                .map(|(k, _)| *k);
            match heaviest {
                Some(k) => self.evict_from(k),
                None => return Admit::Refused(Refusal::GatewayFull),
            }
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        self.handshaking += 1;
        self.peers
            .entry(peer)
            .or_insert_with(|| Peer {
                handshaking: VecDeque::new(),
                live: 0,
            })
            .handshaking
            .push_back(Handshake {
                id,
                heard: false,
                handle,
            });
        Admit::Accepted { id, evicted }
    }

    fn evict_from(&mut self, peer: IpAddr) -> Option<H> {
        let p = self.peers.get_mut(&peer)?;
        let i = p.victim();
        let h = p.handshaking.remove(i)?;
        self.handshaking -= 1;
        Some(h.handle)
    }

    /// The handshake `id` has received its first bytes.
    pub(crate) fn heard(&mut self, peer: IpAddr, id: u64) {
        if let Some(h) = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.handshaking.iter_mut().find(|h| h.id == id))
        {
            h.heard = true;
        }
    }

    /// The handshake `id` finished: it becomes live, unless it was evicted
    /// meanwhile or its peer has filled its live share (then `false`, and
    /// the caller closes it).
    pub(crate) fn establish(&mut self, peer: IpAddr, id: u64) -> bool {
        let per_peer = self.limits.per_peer;
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        let Some(i) = p.handshaking.iter().position(|h| h.id == id) else {
            return false;
        };
        p.handshaking.remove(i);
        self.handshaking -= 1;
        let admitted = p.live < per_peer;
        if admitted {
            p.live += 1;
            self.live += 1;
        }
        self.forget_if_idle(peer);
        admitted
    }

    /// The connection `id` closed; `live` says which phase it was in. An id
    /// that was evicted is already forgotten.
    pub(crate) fn release(&mut self, peer: IpAddr, id: u64, live: bool) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if live {
            p.live -= 1;
            self.live -= 1;
        } else if let Some(i) = p.handshaking.iter().position(|h| h.id == id) {
            p.handshaking.remove(i);
            self.handshaking -= 1;
        }
        self.forget_if_idle(peer);
    }

    /// Keeps the map as small as the set of connected peers.
    fn forget_if_idle(&mut self, peer: IpAddr) {
        if self
            .peers
            .get(&peer)
            .is_some_and(|p| p.live == 0 && p.handshaking.is_empty())
        {
            self.peers.remove(&peer);
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (self.handshaking, self.live)
    }
}

/// Says when to log a recurring problem: the first time, then at most once
/// per [`LOG_INTERVAL`], with how many were left unsaid in between.
#[derive(Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(suppressed since the last line)` when a line is due at `now`.
    pub(crate) fn due(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

type Table = Arc<Mutex<Admission<oneshot::Sender<Infallible>>>>;

/// One connection's place in the [`Admission`] table, given back on drop.
struct Permit {
    table: Table,
    peer: IpAddr,
    id: u64,
    live: bool,
}

impl Permit {
    fn with<R>(&self, f: impl FnOnce(&mut Admission<oneshot::Sender<Infallible>>) -> R) -> R {
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
    _permit: Permit,
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
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
) -> impl Stream<Item = Result<Conn, Infallible>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, limits, tx));
    tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    tx: mpsc::Sender<Conn>,
) {
    let table: Table = Arc::new(Mutex::new(Admission::new(limits)));
    let local_addr = listener.local_addr().ok();
    let (mut accept_trouble, mut refusals) = (Throttle::default(), Throttle::default());
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
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
                    tx.clone(),
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

async fn handshake(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    deadline: Duration,
    mut permit: Permit,
    closed: oneshot::Receiver<Infallible>,
    info: TcpConnectInfo,
    tx: mpsc::Sender<Conn>,
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
    if !permit.with(|t| t.establish(permit.peer, permit.id)) {
        return;
    }
    permit.live = true;
    let _ = tx
        .send(Conn {
            io,
            replay: H2_PREFACE.len(),
            info,
            _permit: permit,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            per_peer: 2,
            total: 6,
            handshake_per_peer: 3,
            handshake_total: 4,
            handshake_timeout: Duration::from_secs(1),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn accept(a: &mut Admission<u64>, peer: &str, handle: u64) -> (u64, Option<u64>) {
        match a.admit(ip(peer), handle) {
            Admit::Accepted { id, evicted } => (id, evicted),
            Admit::Refused(why) => panic!("{peer} was refused: {why:?}"),
        }
    }

    #[test]
    fn a_peer_over_its_handshake_share_closes_its_own_oldest_silent_handshake() {
        let mut a = Admission::new(limits());
        let (first, _) = accept(&mut a, "10.0.0.1", 1);
        accept(&mut a, "10.0.0.1", 2);
        accept(&mut a, "10.0.0.1", 3);
        // The oldest has spoken, so the next silent one goes.
        a.heard(ip("10.0.0.1"), first);
        assert_eq!(accept(&mut a, "10.0.0.1", 4).1, Some(2));
        assert_eq!(a.counts(), (3, 0));
    }

    #[test]
    fn when_every_handshake_has_spoken_the_oldest_is_closed() {
        let mut a = Admission::new(limits());
        for h in 1..=3 {
            let (id, _) = accept(&mut a, "10.0.0.1", h);
            a.heard(ip("10.0.0.1"), id);
        }
        assert_eq!(accept(&mut a, "10.0.0.1", 4).1, Some(1));
    }

    #[test]
    fn a_full_handshake_budget_takes_room_from_the_heaviest_peer_not_the_newcomer() {
        let mut a = Admission::new(limits());
        accept(&mut a, "10.0.0.1", 1);
        accept(&mut a, "10.0.0.1", 2);
        accept(&mut a, "10.0.0.1", 3);
        accept(&mut a, "10.0.0.2", 4);
        // Total handshake budget (4) is full: the flooder loses one.
        assert_eq!(accept(&mut a, "10.0.0.3", 5).1, Some(1));
        assert_eq!(a.counts(), (4, 0));
    }

    #[test]
    fn a_peer_with_its_full_live_share_is_refused_at_once() {
        let mut a = Admission::new(limits());
        for h in 0..2 {
            let (id, _) = accept(&mut a, "10.0.0.1", h);
            assert!(a.establish(ip("10.0.0.1"), id));
        }
        assert_eq!(
            a.admit(ip("10.0.0.1"), 9),
            Admit::Refused(Refusal::PeerFull)
        );
        // Another peer is unaffected.
        accept(&mut a, "10.0.0.2", 10);
    }

    #[test]
    fn handshakes_finishing_past_the_live_share_are_closed() {
        let mut a = Admission::new(limits());
        let ids: Vec<u64> = (0..3).map(|h| accept(&mut a, "10.0.0.1", h).0).collect();
        assert!(a.establish(ip("10.0.0.1"), ids[0]));
        assert!(a.establish(ip("10.0.0.1"), ids[1]));
        assert!(!a.establish(ip("10.0.0.1"), ids[2]));
        assert_eq!(a.counts(), (0, 2));
    }

    #[test]
    fn when_every_slot_is_live_new_connections_are_refused_and_nothing_waits() {
        let mut a = Admission::new(ConnectionLimits {
            total: 4,
            ..limits()
        });
        for peer in ["10.0.0.1", "10.0.0.2"] {
            for h in 0..2 {
                let (id, _) = accept(&mut a, peer, h);
                assert!(a.establish(ip(peer), id));
            }
        }
        assert_eq!(
            a.admit(ip("10.0.0.3"), 9),
            Admit::Refused(Refusal::GatewayFull)
        );
        assert_eq!(a.counts(), (0, 4));
        a.release(ip("10.0.0.1"), 0, true);
        accept(&mut a, "10.0.0.3", 10);
    }

    #[test]
    fn an_evicted_handshake_can_neither_go_live_nor_be_released_twice() {
        let mut a = Admission::new(limits());
        let (id, _) = accept(&mut a, "10.0.0.1", 1);
        accept(&mut a, "10.0.0.1", 2);
        accept(&mut a, "10.0.0.1", 3);
        assert_eq!(accept(&mut a, "10.0.0.1", 4).1, Some(1));
        assert!(!a.establish(ip("10.0.0.1"), id));
        a.release(ip("10.0.0.1"), id, false);
        assert_eq!(a.counts(), (3, 0));
    }

    #[test]
    fn releasing_everything_forgets_the_peer() {
        let mut a = Admission::new(limits());
        let (h, _) = accept(&mut a, "10.0.0.1", 1);
        let (l, _) = accept(&mut a, "10.0.0.1", 2);
        assert!(a.establish(ip("10.0.0.1"), l));
        a.release(ip("10.0.0.1"), h, false);
        a.release(ip("10.0.0.1"), l, true);
        assert_eq!(a.counts(), (0, 0));
        assert!(a.peers.is_empty());
    }

    #[test]
    fn ipv6_peers_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            peer_key(ip("2001:db8:1:2:aaaa::1")),
            peer_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(peer_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

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

    #[test]
    fn a_recurring_problem_is_logged_once_per_interval_with_a_count() {
        let mut t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.due(start), Some(0));
        assert_eq!(t.due(start + Duration::from_secs(1)), None);
        assert_eq!(t.due(start + Duration::from_secs(2)), None);
        assert_eq!(
            t.due(start + LOG_INTERVAL + Duration::from_secs(1)),
            Some(2)
        );
    }
}
