//! The supervisor side of the gateway: who is connected, how they prove it,
//! and the relays they open.
//!
//! [`Supervisors`] is one handle over the session registry, the relay table,
//! the per-sandbox unix-socket listeners and the launch credentials. The
//! compute runtime owns it and tells it about launches and deletes; exec and
//! SSH use it to open relays. It knows nothing about the store, plugins or
//! phases: it reports connects and disconnects through a
//! [`SessionObserver`], so dependencies point one way (runtime → supervisors)
//! and everything here can be tested without wasmtime or a database.

pub mod handoff;
pub mod listeners;
pub mod relay;
pub mod service;
pub mod sessions;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::error::ApiError;
pub use listeners::{ListenError, MAX_SOCKET_PATH, SocketLimits};
pub use relay::{OpenRelays, RelayConn, RelayError, RelayLimits, RelayTable, RelayUse};
pub use sessions::{SessionHandle, SessionObserver, SessionRegistry};

/// Who serves the connections sandbox code opens to the outside (an
/// egress relay, see `RelayInit.egress`): the policy engine, which this
/// module knows only by this trait, so it stays below the runtime.
pub trait EgressHandler: Send + Sync {
    /// Decides and, if allowed, carries one connection; owns the relay.
    fn open(&self, sandbox: SandboxId, open: pb::EgressOpen, conn: RelayConn);
    /// As [`EgressHandler::open`], for a socket the supervisor passed.
    fn open_socket(&self, sandbox: SandboxId, open: pb::EgressOpen, client: handoff::Handoff);
    /// Answers a DNS question sandbox code asked (see `LookupEgress`).
    fn lookup(
        &self,
        sandbox: SandboxId,
        lookup: pb::EgressLookup,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = pb::EgressLookupResult> + Send>>;
}

/// Tunables of the supervisor side.
#[derive(Clone, Copy, Debug)]
pub struct SupervisorOptions {
    /// Supervisor heartbeat; a session silent for two is dropped.
    pub heartbeat: Duration,
    pub relays: RelayLimits,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            relays: RelayLimits::default(),
        }
    }
}

/// Only this digest of a launch secret is kept, in memory.
type SecretDigest = [u8; 32];

fn digest(secret: &str) -> SecretDigest {
    Sha256::digest(secret.as_bytes()).into()
}

pub struct Supervisors {
    sessions: SessionRegistry,
    relays: RelayTable,
    open_relays: OpenRelays,
    listeners: listeners::Listeners,
    socket_limits: SocketLimits,
    /// The launch secret each listening sandbox's supervisor must present.
    credentials: Mutex<HashMap<SandboxId, SecretDigest>>,
    heartbeat: Duration,
    shutdown: watch::Receiver<bool>,
    egress: std::sync::OnceLock<Arc<dyn EgressHandler>>,
}

impl std::fmt::Debug for Supervisors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisors").finish_non_exhaustive()
    }
}

/// Why a hello was refused; the text goes back to the supervisor.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("this socket belongs to another sandbox")]
    WrongSandbox,
    #[error("wrong or missing secret")]
    WrongSecret,
    #[error("the hello's {field} is {len} bytes; the limit is {limit}")]
    HelloFieldTooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
}

/// Upper bounds on a hello's fields, checked before any other work: a
/// sandbox id is a 36-byte UUID, a secret 64 hex digits, an instance id a
/// short label, a host key one OpenSSH line.
const HELLO_LIMITS: [(&str, usize); 4] = [
    ("sandbox_id", 64),
    ("instance_id", 256),
    ("secret", 128),
    ("ssh_host_key", service::MAX_HOST_KEY),
];

/// Refuses a hello with an oversized field.
pub fn check_hello(hello: &pb::SupervisorHello) -> Result<(), Rejection> {
    let lens = [
        hello.sandbox_id.len(),
        hello.instance_id.len(),
        hello.secret.len(),
        hello.ssh_host_key.len(),
    ];
    for ((field, limit), len) in HELLO_LIMITS.into_iter().zip(lens) {
        if len > limit {
            return Err(Rejection::HelloFieldTooLong { field, len, limit });
        }
    }
    Ok(())
}

/// At most [`LogThrottle::BURST`] lines per [`LogThrottle::WINDOW`] for one
/// socket's complaints, so a hostile supervisor cannot flood the gateway's
/// log; the next allowed line says how many were dropped.
#[derive(Debug, Default)]
pub struct LogThrottle {
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    window_start: Option<std::time::Instant>,
    lines: u32,
    suppressed: u64,
}

impl LogThrottle {
    const BURST: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(60);

    /// `Some(lines suppressed since the last allowed one)` if a line may
    /// be logged now.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if s.window_start
            .is_none_or(|t| now.duration_since(t) >= Self::WINDOW)
        {
            s.window_start = Some(now);
            s.lines = 0;
        }
        if s.lines < Self::BURST {
            s.lines += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

impl Supervisors {
    pub fn new(
        opts: SupervisorOptions,
        observer: Arc<dyn SessionObserver>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let sessions = SessionRegistry::default();
        sessions.set_observer(observer);
        Arc::new(Self {
            sessions,
            relays: RelayTable::new(opts.relays),
            open_relays: OpenRelays::default(),
            listeners: listeners::Listeners::default(),
            socket_limits: SocketLimits::default(),
            credentials: Mutex::default(),
            heartbeat: opts.heartbeat,
            shutdown,
            egress: std::sync::OnceLock::new(),
        })
    }

    /// Installs the egress handler (once; egress relays are refused
    /// before).
    pub fn set_egress(&self, handler: Arc<dyn EgressHandler>) {
        let _ = self.egress.set(handler);
    }

    pub(crate) fn egress(&self) -> Option<&Arc<dyn EgressHandler>> {
        self.egress.get()
    }

    /// The egress handler, for `sandbox`'s live session only, proven by
    /// its egress token.
    pub(crate) fn egress_for(
        &self,
        sandbox: SandboxId,
        token: &str,
    ) -> Option<&Arc<dyn EgressHandler>> {
        self.egress()
            .filter(|_| self.sessions.egress_token_is(sandbox, token))
    }

    pub fn sessions(&self) -> &SessionRegistry {
        &self.sessions
    }

    pub fn relays(&self) -> &RelayTable {
        &self.relays
    }

    /// Relays open per sandbox, for idle timeouts.
    pub fn open_relays(&self) -> &OpenRelays {
        &self.open_relays
    }

    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Serves `sandbox`'s supervisor socket at `path`, accepting only a
    /// supervisor that presents `secret` (replacing an earlier listener and
    /// secret of the same sandbox).
    pub fn listen(
        self: &Arc<Self>,
        sandbox: SandboxId,
        path: &Path,
        secret: &str,
    ) -> Result<(), ListenError> {
        self.expect_secret(sandbox, secret);
        self.listeners
            .start(self.clone(), sandbox, path, self.socket_limits)
    }

    /// From now on, `sandbox`'s supervisor must present `secret` (only its
    /// digest is kept).
    pub fn expect_secret(&self, sandbox: SandboxId, secret: &str) {
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox, digest(secret));
    }

    /// Checks a hello against the socket it arrived on and the sandbox's
    /// current launch secret, in constant time.
    pub fn authenticate(
        &self,
        sandbox: SandboxId,
        hello: &pb::SupervisorHello,
    ) -> Result<(), Rejection> {
        check_hello(hello)?;
        if hello.sandbox_id != sandbox.to_string() {
            return Err(Rejection::WrongSandbox);
        }
        let expected = self
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sandbox)
            .copied();
        match expected {
            Some(d) if !hello.secret.is_empty() && bool::from(d.ct_eq(&digest(&hello.secret))) => {
                Ok(())
            }
            _ => Err(Rejection::WrongSecret),
        }
    }

    /// Ends everything of one sandbox here: its listener, its credential and
    /// its session (without a disconnect event: the sandbox is going away).
    pub fn stop(&self, sandbox: SandboxId) {
        self.listeners.stop(sandbox);
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sandbox);
        self.sessions.forget(sandbox);
        self.open_relays.forget(sandbox);
    }

    pub fn stop_all(&self) {
        self.listeners.stop_all();
    }

    /// Asks `sandbox`'s connected supervisor to open a relay for `purpose`
    /// and waits (at most the claim timeout) until it does. `name` is for
    /// messages. The caller checked that the sandbox is Ready.
    pub async fn open_relay(
        &self,
        sandbox: SandboxId,
        name: &str,
        purpose: pb::relay_open::Purpose,
    ) -> Result<RelayConn, ApiError> {
        let session =
            self.sessions
                .get(sandbox)
                .ok_or_else(|| ApiError::SupervisorNotConnected {
                    name: name.to_owned(),
                })?;
        let channel_id = uuid::Uuid::new_v4().to_string();
        let (claimed, _reservation) = self.relays.reserve(sandbox, &channel_id)?;
        crate::metrics::get().relays.inc();
        let open = pb::GatewayMessage {
            msg: Some(pb::gateway_message::Msg::RelayOpen(pb::RelayOpen {
                channel_id,
                purpose: Some(purpose),
            })),
        };
        if session.control.send(open).await.is_err() {
            return Err(ApiError::SupervisorNotConnected {
                name: name.to_owned(),
            });
        }
        match tokio::time::timeout(self.relays.limits.claim_timeout, claimed).await {
            Ok(Ok(Ok(conn))) => Ok(conn),
            Ok(Ok(Err(reason))) => Err(ApiError::RelayRefused {
                name: name.to_owned(),
                reason,
            }),
            _ => Err(ApiError::RelayNotOpened {
                name: name.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl SessionObserver for Quiet {
        fn on_connected(&self, _: SandboxId) {}
        fn on_disconnected(&self, _: SandboxId) {}
    }

    fn hello(id: SandboxId, secret: &str) -> pb::SupervisorHello {
        pb::SupervisorHello {
            sandbox_id: id.to_string(),
            secret: secret.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn only_the_current_secret_on_its_own_socket_authenticates() {
        let sup = Supervisors::new(
            SupervisorOptions::default(),
            Arc::new(Quiet),
            watch::channel(false).1,
        );
        let (a, b) = (SandboxId::new(), SandboxId::new());
        let dir = tempfile::tempdir().unwrap();
        sup.listen(a, &dir.path().join("a.sock"), "sa").unwrap();
        sup.listen(b, &dir.path().join("b.sock"), "sb").unwrap();
        assert_eq!(sup.authenticate(a, &hello(a, "sa")), Ok(()));
        assert_eq!(
            sup.authenticate(a, &hello(a, "sb")),
            Err(Rejection::WrongSecret),
            "another sandbox's secret"
        );
        assert_eq!(
            sup.authenticate(a, &hello(b, "sb")),
            Err(Rejection::WrongSandbox),
            "another sandbox's id and secret on this socket"
        );
        assert_eq!(
            sup.authenticate(a, &hello(a, "")),
            Err(Rejection::WrongSecret)
        );
        // A relaunch replaces the secret; the old one stops working.
        sup.listen(a, &dir.path().join("a.sock"), "sa2").unwrap();
        assert_eq!(
            sup.authenticate(a, &hello(a, "sa")),
            Err(Rejection::WrongSecret)
        );
        sup.stop(a);
        assert_eq!(
            sup.authenticate(a, &hello(a, "sa2")),
            Err(Rejection::WrongSecret),
            "a stopped sandbox has no credential"
        );
        sup.stop_all();
    }

    #[test]
    fn a_hello_with_an_oversized_field_is_refused_before_the_secret_is_checked() {
        let id = SandboxId::new();
        assert_eq!(check_hello(&hello(id, "s")), Ok(()));
        let mut h = hello(id, "s");
        h.instance_id = "i".repeat(1 << 20);
        assert_eq!(
            check_hello(&h),
            Err(Rejection::HelloFieldTooLong {
                field: "instance_id",
                len: 1 << 20,
                limit: 256
            })
        );
        let sup = Supervisors::new(
            SupervisorOptions::default(),
            Arc::new(Quiet),
            watch::channel(false).1,
        );
        let long = hello(id, &"s".repeat(129));
        assert!(matches!(
            sup.authenticate(id, &long),
            Err(Rejection::HelloFieldTooLong {
                field: "secret",
                ..
            })
        ));
    }

    #[test]
    fn a_log_throttle_allows_a_burst_then_counts_what_it_drops() {
        let t = LogThrottle::default();
        for _ in 0..LogThrottle::BURST {
            assert_eq!(t.allow(), Some(0));
        }
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        // A new window reports the two it dropped.
        t.state.lock().unwrap().window_start =
            Some(std::time::Instant::now() - LogThrottle::WINDOW);
        assert_eq!(t.allow(), Some(2));
    }

    #[tokio::test]
    async fn a_relay_needs_a_connected_supervisor() {
        let sup = Supervisors::new(
            SupervisorOptions::default(),
            Arc::new(Quiet),
            watch::channel(false).1,
        );
        let r = sup
            .open_relay(
                SandboxId::new(),
                "s",
                pb::relay_open::Purpose::Ssh(pb::SshTunnel {}),
            )
            .await;
        assert!(matches!(r, Err(ApiError::SupervisorNotConnected { .. })));
        assert_eq!(sup.relays().pending(), 0);
    }
}
