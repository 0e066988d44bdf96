//! Egress: the connections sandbox code opens to the outside, decided here
//! by the sandbox's policy and carried here, never in the sandbox.
//!
//! The supervisor accepts a connection inside the sandbox (its HTTP proxy,
//! or a captured connection), names the destination and the calling
//! binaries, and opens an egress relay ([`EgressHandler::open`]). We check
//! the destination by name before resolving it, resolve it ourselves
//! (`resolve`), refuse what no policy may allow (the gateway's own
//! listeners; metadata and link-local addresses are refused by the policy
//! crate), dial the checked address (no second lookup: no DNS rebinding),
//! tell the supervisor the verdict, and splice bytes (`splice`). Every
//! decision is audited (`audit`). A policy change re-decides every open
//! connection and closes those it no longer allows before it returns.

mod audit;
mod resolve;
mod splice;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openshell_core::SandboxId;
use openshell_policy::{Decision, Policy, Request, Target};
use openshell_proto::v1 as pb;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::logs::Logs;
use crate::supervisor::handoff::{self, Handoff};
use crate::supervisor::{EgressHandler, RelayConn};
pub use audit::Audit;
pub use resolve::{HostsError, Resolver};

/// Tunables of egress.
#[derive(Clone, Debug)]
pub struct EgressOptions {
    /// Connections one sandbox may have open (or being dialled) at once;
    /// past it new ones are refused and audited.
    pub max_connections: usize,
    /// Bytes per second one sandbox's connections may move, both ways
    /// together; 0: unbounded.
    pub bytes_per_second: u64,
    /// How long a dial may take.
    pub connect_timeout: Duration,
    /// Names the gateway resolves itself before asking the system
    /// (`--egress-hosts`, a hosts file).
    pub resolver: Resolver,
}

impl Default for EgressOptions {
    fn default() -> Self {
        Self {
            max_connections: 256,
            bytes_per_second: 0,
            connect_timeout: Duration::from_secs(10),
            resolver: Resolver::default(),
        }
    }
}

/// A policy in force and its revision.
#[derive(Debug)]
struct InForce {
    policy: Policy,
    revision: u64,
}

/// One open connection, as it was decided: what a new policy re-decides.
struct Live {
    host: String,
    port: u16,
    binaries: Vec<String>,
    dialled: IpAddr,
    abort: Option<tokio::task::AbortHandle>,
}

struct SandboxEgress {
    policy: RwLock<Arc<InForce>>,
    live: Mutex<HashMap<u64, Live>>,
    bucket: splice::Bucket,
    /// Each binary path's SHA-256 as first seen: a binary that changes
    /// under the same path is refused from then on.
    pins: Mutex<HashMap<String, String>>,
    /// Set (under `live`) when the sandbox is forgotten: a connection that
    /// got this table before then never starts.
    gone: std::sync::atomic::AtomicBool,
}

/// Paths pinned per sandbox at most (then the oldest are not evicted: new
/// paths are simply not pinned).
const MAX_PINS: usize = 4096;

impl SandboxEgress {
    /// The first binary whose hash differs from its pin, pinning the rest.
    fn changed_binary(&self, binaries: &[pb::EgressBinary]) -> Option<String> {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        for b in binaries.iter().filter(|b| !b.sha256.is_empty()) {
            match pins.get(&b.path) {
                Some(pinned) if *pinned != b.sha256 => return Some(b.path.clone()),
                Some(_) => {}
                None if pins.len() < MAX_PINS => {
                    pins.insert(b.path.clone(), b.sha256.clone());
                }
                None => {}
            }
        }
        None
    }
}

pub struct Egress {
    opts: EgressOptions,
    sandboxes: Mutex<HashMap<SandboxId, Arc<SandboxEgress>>>,
    /// The gateway's own listeners: never a destination.
    refused: RwLock<Vec<SocketAddr>>,
    next_id: AtomicU64,
    audit: Audit,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress").finish_non_exhaustive()
    }
}

/// Why the gateway refused before the policy had its say.
const NO_POLICY: &str = "the sandbox has no policy loaded";

impl Egress {
    pub fn new(opts: EgressOptions, audit_dir: Option<std::path::PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            opts,
            sandboxes: Mutex::default(),
            refused: RwLock::default(),
            next_id: AtomicU64::new(1),
            audit: Audit::new(Logs::new(audit_dir)),
        })
    }

    /// The audit log, for SandboxLogs.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// Never dial `addr` (a listener of this gateway).
    pub fn refuse(&self, addr: SocketAddr) {
        self.refused
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(addr);
    }

    /// Puts `policy` in force for `sandbox` (its first, or a replacement):
    /// new connections see it at once; open ones it no longer allows are
    /// closed before this returns. Returns how many were closed.
    pub fn install(&self, sandbox: SandboxId, policy: Policy, revision: u64) -> usize {
        self.audit.ensure(sandbox);
        let in_force = Arc::new(InForce { policy, revision });

        let se = {
            let mut all = self.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
            match all.get(&sandbox) {
                Some(se) => se.clone(),
                None => {
                    let se = Arc::new(SandboxEgress {
                        policy: RwLock::new(in_force),
                        live: Mutex::default(),
                        bucket: splice::Bucket::new(self.opts.bytes_per_second),
                        pins: Mutex::default(),
                        gone: Default::default(),
                    });
                    all.insert(sandbox, se);
                    return 0;
                }
            }
        };
        {
            let mut current = se.policy.write().unwrap_or_else(|p| p.into_inner());
            // Two replacements racing past the store: the newer one stays.
            if current.revision > revision {
                return 0;
            }
            *current = in_force.clone();
        }
        let mut closed = Vec::new();
        {
            let mut live = se.live.lock().unwrap_or_else(|p| p.into_inner());
            // A dial still in flight (no abort handle yet) is checked by
            // its own task against this policy once it connects.
            for (id, l) in live.iter_mut().filter(|(_, l)| l.abort.is_some()) {
                let binaries: Vec<&str> = l.binaries.iter().map(String::as_str).collect();
                let still = decide(&in_force.policy, &l.host, l.port, &binaries, &[l.dialled]);
                let allowed =
                    matches!(&still, Decision::Allow { addrs, .. } if addrs.contains(&l.dialled));
                if !allowed && let Some(abort) = l.abort.take() {
                    abort.abort();
                    closed.push((*id, l.host.clone(), l.port, l.binaries.first().cloned()));
                }
            }
            for (id, ..) in &closed {
                live.remove(id);
            }
        }
        for (_, host, port, binary) in &closed {
            self.audit
                .closed(sandbox, host, *port, binary.as_deref(), revision);
        }
        closed.len()
    }

    /// Forgets a deleted sandbox: its connections close, its audit log goes.
    pub fn forget(&self, sandbox: SandboxId) {
        let se = self
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sandbox);
        if let Some(se) = se {
            let mut live = se.live.lock().unwrap_or_else(|p| p.into_inner());
            se.gone.store(true, Ordering::SeqCst);
            for (_, l) in live.drain() {
                if let Some(a) = l.abort {
                    a.abort();
                }
            }
        }
        self.audit.remove(sandbox);
    }

    /// Open connections of a sandbox (for tests and stats).
    pub fn open_connections(&self, sandbox: SandboxId) -> usize {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sandbox)
            .map_or(0, |se| {
                se.live.lock().unwrap_or_else(|p| p.into_inner()).len()
            })
    }

    /// Answers a DNS question from sandbox code: the ports some rule allows
    /// the name on, once the name is known to resolve (so a name that does
    /// not exist is NXDOMAIN inside too). A name no rule names is never
    /// looked up, and its refusal is audited. What the name resolves to is
    /// not told: every connection is decided and dialled here anyway.
    pub async fn lookup(
        &self,
        sandbox: SandboxId,
        lookup: pb::EgressLookup,
    ) -> pb::EgressLookupResult {
        let none = |reason: String, temporary: bool| pb::EgressLookupResult {
            ports: Vec::new(),
            temporary,
            reason,
        };
        let se = self.sandbox(sandbox);
        let in_force = se.map(|se| se.policy.read().unwrap_or_else(|p| p.into_inner()).clone());
        let ports = match (&in_force, Target::from_host(&lookup.name)) {
            (Some(f), Target::Name(name)) => f.policy.ports_for_name(name),
            _ => Vec::new(),
        };
        if ports.is_empty() {
            let reason = match &in_force {
                None => NO_POLICY.to_owned(),
                Some(_) => "no rule names it (NXDOMAIN)".to_owned(),
            };
            let mut record = audit::Entry::new(&pb::EgressOpen {
                host: lookup.name,
                port: 0,
                binaries: lookup.binaries,
                via: "dns".into(),
                token: String::new(),
            });
            record.policy_revision = in_force.map_or(0, |f| f.revision);
            record.deny(None, &reason);
            self.audit.write(sandbox, &record);
            return none(reason, false);
        }
        match self.opts.resolver.lookup(&lookup.name, ports[0]).await {
            Ok(addrs) if !addrs.is_empty() => pb::EgressLookupResult {
                ports: ports.into_iter().map(u32::from).collect(),
                temporary: false,
                reason: String::new(),
            },
            Ok(_) => none("it has no address".into(), false),
            Err(e) => none(
                format!("cannot resolve it: {e}"),
                e.kind() == std::io::ErrorKind::TimedOut,
            ),
        }
    }

    /// Whether `addr` reaches one of our listeners, in any of its forms
    /// (`::ffff:127.0.0.1` is 127.0.0.1).
    fn is_gateway(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        let refused = self.refused.read().unwrap_or_else(|p| p.into_inner());
        refused.iter().any(|l| {
            let lip = l.ip().to_canonical();
            l.port() == addr.port()
                && (lip == ip || (lip.is_unspecified() && resolve::is_local(ip)))
        })
    }

    /// A sandbox's egress state, if it has a policy in force.
    fn sandbox(&self, sandbox: SandboxId) -> Option<Arc<SandboxEgress>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sandbox)
            .cloned()
    }

    async fn serve(self: Arc<Self>, sandbox: SandboxId, open: pb::EgressOpen, conn: Client) {
        let se = self.sandbox(sandbox);
        let binaries: Vec<String> = open.binaries.iter().map(|b| b.path.clone()).collect();
        let mut record = audit::Entry::new(&open);
        let Some(se) = se else {
            record.deny(None, NO_POLICY);
            return self.refuse_with(sandbox, record, conn).await;
        };
        let Some(port) = u16::try_from(open.port).ok().filter(|p| *p != 0) else {
            record.deny(None, "the port is not 1-65535");
            return self.refuse_with(sandbox, record, conn).await;
        };
        let in_force = se.policy.read().unwrap_or_else(|p| p.into_inner()).clone();
        record.policy_revision = in_force.revision;
        if let Some(path) = se.changed_binary(&open.binaries) {
            record.deny(
                None,
                &format!("{path} changed since this sandbox first used it (its SHA-256 differs)"),
            );
            return self.refuse_with(sandbox, record, conn).await;
        }
        // A slot first: a dial in flight counts against the limit.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let full = {
            let mut live = se.live.lock().unwrap_or_else(|p| p.into_inner());
            let full = live.len() >= self.opts.max_connections || se.gone.load(Ordering::SeqCst);
            if !full {
                live.insert(
                    id,
                    Live {
                        host: open.host.clone(),
                        port,
                        binaries: binaries.clone(),
                        dialled: IpAddr::from([0, 0, 0, 0]),
                        abort: None,
                    },
                );
            }
            full
        };
        if full {
            record.deny(
                None,
                &format!(
                    "the sandbox has its limit of {} open connections",
                    self.opts.max_connections
                ),
            );
            return self.refuse_with(sandbox, record, conn).await;
        }
        let slot = Slot { se: &se, id };
        let bins: Vec<&str> = binaries.iter().map(String::as_str).collect();
        // By name first: a name no rule could allow is never looked up.
        let target = Target::from_host(&open.host);
        if let Target::Name(name) = target
            && !in_force.policy.allows_name(name)
        {
            let d = decide(&in_force.policy, &open.host, port, &bins, &[]);
            record.decided(&d);
            drop(slot);
            return self.refuse_with(sandbox, record, conn).await;
        }
        let resolved = match target {
            Target::Ip(ip) => vec![ip],
            Target::Name(name) => match self.opts.resolver.lookup(name, port).await {
                Ok(a) => a,
                Err(e) => {
                    record.deny(None, &format!("cannot resolve {name}: {e}"));
                    drop(slot);
                    return self.refuse_with(sandbox, record, conn).await;
                }
            },
        };
        let all = resolved;
        let resolved: Vec<IpAddr> = all
            .iter()
            .copied()
            .filter(|ip| !self.is_gateway(SocketAddr::new(*ip, port)))
            .collect();
        let decision = decide(&in_force.policy, &open.host, port, &bins, &resolved);
        record.decided(&decision);
        let Decision::Allow { addrs, .. } = &decision else {
            // Named only when the policy would have allowed it: sandbox
            // code learns nothing about ports the policy refuses anyway.
            if resolved.len() < all.len()
                && matches!(
                    decide(&in_force.policy, &open.host, port, &bins, &all),
                    Decision::Allow { .. }
                )
            {
                record.reason = format!("{} is this gateway: never a destination", record.host);
            }
            drop(slot);
            return self.refuse_with(sandbox, record, conn).await;
        };
        let dialled = match self.dial(addrs, port).await {
            Ok(s) => s,
            Err(reason) => {
                record.allowed = false;
                record.unreachable = true;
                record.reason = reason;
                drop(slot);
                return self.refuse_with(sandbox, record, conn).await;
            }
        };
        let Ok(peer) = dialled.peer_addr() else {
            record.allowed = false;
            record.reason = "the connection closed as it opened".into();
            drop(slot);
            return self.refuse_with(sandbox, record, conn).await;
        };
        // What the kernel connected to, checked again.
        if self.is_gateway(peer) {
            record.deny(
                None,
                &format!("{} is this gateway: never a destination", record.host),
            );
            drop(slot);
            return self.refuse_with(sandbox, record, conn).await;
        }
        record.addr = peer.to_string();
        // The policy may have changed while we dialled. `install` writes
        // the policy before it takes `live`, and we read it holding `live`:
        // either we see the new policy here, or it sees our abort handle.
        let mut conn = Some(conn);
        let task = {
            let mut live = se.live.lock().unwrap_or_else(|p| p.into_inner());
            let now = se.policy.read().unwrap_or_else(|p| p.into_inner()).clone();
            let still = now.revision == in_force.revision
                || matches!(
                    decide(&now.policy, &open.host, port, &bins, &[peer.ip()]),
                    Decision::Allow { addrs, .. } if addrs.contains(&peer.ip())
                );
            match live.get_mut(&id) {
                Some(l) if still && !se.gone.load(Ordering::SeqCst) => {
                    l.dialled = peer.ip();
                    let verdict = record.verdict();
                    let (conn, bucket) = (conn.take(), se.bucket.clone());
                    let task = tokio::spawn(async move {
                        if let Some(conn) = conn {
                            conn.carry(verdict, dialled, bucket).await;
                        }
                    });
                    l.abort = Some(task.abort_handle());
                    Some(task)
                }
                _ => None,
            }
        };
        let Some(task) = task else {
            record.allowed = false;
            record.reason = "a new policy no longer allows it".into();
            drop(slot);
            if let Some(conn) = conn {
                self.refuse_with(sandbox, record, conn).await;
            }
            return;
        };
        self.audit.write(sandbox, &record);
        let _ = task.await;
        drop(slot);
    }

    async fn dial(&self, addrs: &[IpAddr], port: u16) -> Result<TcpStream, String> {
        let mut last = String::from("no address to dial");
        for ip in addrs {
            let addr = SocketAddr::new(*ip, port);
            match tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = format!("connecting to {addr} failed: {e}"),
                Err(_) => {
                    last = format!(
                        "connecting to {addr} timed out after {} s",
                        self.opts.connect_timeout.as_secs()
                    )
                }
            }
        }
        Err(last)
    }

    async fn refuse_with(&self, sandbox: SandboxId, record: audit::Entry, conn: Client) {
        self.audit.write(sandbox, &record);
        conn.refuse(record.verdict()).await;
    }
}

/// Where a connection's client is: at the end of a relay, or a socket a
/// process sandbox's supervisor passed (carried here, without the relay).
enum Client {
    Relay(RelayConn),
    Socket(Handoff),
}

impl Client {
    /// Tells the supervisor; dropping the relay or the socket closes it.
    async fn refuse(self, verdict: pb::EgressVerdict) {
        match self {
            Client::Relay(conn) => {
                let _ = conn.to_sandbox.send(verdict_frame(verdict)).await;
            }
            Client::Socket(mut h) => handoff::answer(&mut h.unix, &verdict).await,
        }
    }

    /// Tells the supervisor, then carries bytes until both sides close.
    async fn carry(self, verdict: pb::EgressVerdict, dialled: TcpStream, bucket: splice::Bucket) {
        match self {
            Client::Relay(conn) => {
                if conn.to_sandbox.send(verdict_frame(verdict)).await.is_ok() {
                    splice::splice(dialled, conn, bucket).await;
                }
            }
            Client::Socket(h) => {
                let Handoff {
                    mut unix,
                    mut client,
                    reply,
                    first,
                    permit,
                } = h;
                let mut dialled = dialled;
                // Before the verdict: the supervisor writes nothing to the
                // client once it is allowed, so nothing can come between.
                if client.write_all(&reply).await.is_err() {
                    return;
                }
                bucket.spend(first.len()).await;
                if dialled.write_all(&first).await.is_err() {
                    return;
                }
                handoff::answer(&mut unix, &verdict).await;
                drop(unix);
                splice::sockets(client, dialled, bucket).await;
                drop(permit);
            }
        }
    }
}

/// Frees a connection's slot however its task ends.
struct Slot<'a> {
    se: &'a SandboxEgress,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.se
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// `resolved`: the addresses that may be dialled, as checked by the
/// gateway (its own listeners already taken out).
fn decide(
    policy: &Policy,
    host: &str,
    port: u16,
    binaries: &[&str],
    resolved: &[IpAddr],
) -> Decision {
    policy.decide(&Request {
        target: Target::from_host(host),
        port,
        binaries,
        resolved,
    })
}

fn verdict_frame(v: pb::EgressVerdict) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::EgressVerdict(v)),
    }
}

/// The handler the supervisor side calls (it holds this, not [`Egress`]).
pub struct Handler(pub Arc<Egress>);

impl EgressHandler for Handler {
    fn open(&self, sandbox: SandboxId, open: pb::EgressOpen, conn: RelayConn) {
        tokio::spawn(self.0.clone().serve(sandbox, open, Client::Relay(conn)));
    }

    fn open_socket(&self, sandbox: SandboxId, open: pb::EgressOpen, client: Handoff) {
        tokio::spawn(self.0.clone().serve(sandbox, open, Client::Socket(client)));
    }

    fn lookup(
        &self,
        sandbox: SandboxId,
        lookup: pb::EgressLookup,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = pb::EgressLookupResult> + Send>> {
        let egress = self.0.clone();
        Box::pin(async move { egress.lookup(sandbox, lookup).await })
    }
}
