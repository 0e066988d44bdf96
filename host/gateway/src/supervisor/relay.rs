//! Relays: a channel the gateway asks a sandbox's supervisor to open on
//! the connection it dialled. [`super::Supervisors::open_relay`] is how a
//! request gets one (exec and SSH both); [`RelayTable`] holds those waiting
//! for the supervisor's RelayStream to claim them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Streaming;

/// Limits on relays waiting to be claimed.
#[derive(Clone, Copy, Debug)]
pub struct RelayLimits {
    pub per_sandbox: usize,
    pub total: usize,
    /// How long the supervisor has to claim a relay.
    pub claim_timeout: Duration,
    /// A relay with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            per_sandbox: 32,
            total: 256,
            claim_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Both directions of a claimed relay, as the gateway sees them.
pub struct RelayConn {
    /// Frames from the supervisor.
    pub from_sandbox: Streaming<pb::RelayFrame>,
    /// Frames to the supervisor.
    pub to_sandbox: mpsc::Sender<pb::RelayFrame>,
}

/// What a reserved relay becomes: the claimed stream, or the reason the
/// supervisor gave for not opening it.
pub type Claim = Result<RelayConn, String>;

struct Pending {
    sandbox: SandboxId,
    tx: oneshot::Sender<Claim>,
}

/// Frees a reserved relay slot when dropped (a no-op once claimed).
pub struct Reservation<'a> {
    table: &'a RelayTable,
    channel_id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.table.cancel(&self.channel_id);
    }
}

#[derive(Default)]
pub struct RelayTable {
    pending: Mutex<HashMap<String, Pending>>,
    pub limits: RelayLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{count} relays are already waiting for this sandbox (limit {limit}); retry shortly")]
    SandboxFull { count: usize, limit: usize },
    #[error("{count} relays are already waiting in total (limit {limit}); retry shortly")]
    GatewayFull { count: usize, limit: usize },
}

impl From<RelayError> for crate::error::ApiError {
    fn from(e: RelayError) -> Self {
        let (scope, count, limit) = match e {
            RelayError::SandboxFull { count, limit } => ("for this sandbox", count, limit),
            RelayError::GatewayFull { count, limit } => ("in total", count, limit),
        };
        crate::error::ApiError::RelaysWaiting {
            scope,
            count,
            limit,
        }
    }
}

impl RelayTable {
    pub fn new(limits: RelayLimits) -> Self {
        Self {
            pending: Mutex::default(),
            limits,
        }
    }

    /// Reserves a slot for `channel_id`; the receiver resolves when the
    /// supervisor claims it. The slot is freed by a claim or when the
    /// returned guard is dropped, whichever comes first, so a waiter that
    /// gives up (or whose client hangs up) never leaks it.
    pub fn reserve<'a>(
        &'a self,
        sandbox: SandboxId,
        channel_id: &str,
    ) -> Result<(oneshot::Receiver<Claim>, Reservation<'a>), RelayError> {
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.limits.total {
            return Err(RelayError::GatewayFull {
                count: map.len(),
                limit: self.limits.total,
            });
        }
        let count = map.values().filter(|p| p.sandbox == sandbox).count();
        if count >= self.limits.per_sandbox {
            return Err(RelayError::SandboxFull {
                count,
                limit: self.limits.per_sandbox,
            });
        }
        let (tx, rx) = oneshot::channel();
        map.insert(channel_id.to_owned(), Pending { sandbox, tx });
        Ok((
            rx,
            Reservation {
                table: self,
                channel_id: channel_id.to_owned(),
            },
        ))
    }

    /// Hands a relay stream to whoever reserved `channel_id`, if it belongs
    /// to `sandbox`. Returns false for unknown or foreign channels.
    pub fn claim(&self, sandbox: SandboxId, channel_id: &str, conn: RelayConn) -> bool {
        let pending = {
            let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(channel_id) {
                Some(p) if p.sandbox == sandbox => map.remove(channel_id),
                _ => None,
            }
        };
        match pending {
            Some(p) => p.tx.send(Ok(conn)).is_ok(),
            None => false,
        }
    }

    pub fn cancel(&self, channel_id: &str) {
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(channel_id);
    }

    /// Fails `channel_id` with the supervisor's `reason`, only if it is
    /// `sandbox`'s: a supervisor's relay-failed message must never cancel
    /// another sandbox's relay.
    pub fn cancel_for(&self, sandbox: SandboxId, channel_id: &str, reason: &str) -> bool {
        let pending = {
            let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(channel_id) {
                Some(p) if p.sandbox == sandbox => map.remove(channel_id),
                _ => None,
            }
        };
        match pending {
            Some(p) => {
                let _ = p.tx.send(Err(reason.to_owned()));
                true
            }
            None => false,
        }
    }

    /// Relays waiting to be claimed (a gauge).
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Relays open per sandbox and when one last opened or closed (ms since
/// the epoch): what a sandbox's idle timeout counts. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct OpenRelays(Arc<Mutex<HashMap<SandboxId, RelayUse>>>);

/// One sandbox's relays, as [`OpenRelays`] counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayUse {
    pub open: usize,
    pub last_ms: i64,
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl OpenRelays {
    /// Counts a relay of `sandbox` as open until the guard is dropped.
    pub fn opened(&self, sandbox: SandboxId) -> OpenRelay {
        self.change(sandbox, |u| u.open += 1);
        OpenRelay {
            relays: self.clone(),
            sandbox,
        }
    }

    fn change(&self, sandbox: SandboxId, f: impl FnOnce(&mut RelayUse)) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let u = map.entry(sandbox).or_default();
        f(u);
        u.last_ms = epoch_ms();
    }

    /// Every sandbox's relay use, copied out.
    pub fn snapshot(&self) -> HashMap<SandboxId, RelayUse> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops what is known of a sandbox whose relays are all gone.
    pub fn forget(&self, sandbox: SandboxId) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&sandbox).is_some_and(|u| u.open == 0) {
            map.remove(&sandbox);
        }
    }
}

/// An open relay, counted by [`OpenRelays`] until dropped.
#[derive(Debug)]
pub struct OpenRelay {
    relays: OpenRelays,
    sandbox: SandboxId,
}

impl Drop for OpenRelay {
    fn drop(&mut self) {
        self.relays
            .change(self.sandbox, |u| u.open = u.open.saturating_sub(1));
    }
}

/// When a relay last carried traffic, in either direction; clones share it.
#[derive(Clone, Debug)]
pub struct Activity {
    started: tokio::time::Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            last_ms: Arc::default(),
        }
    }

    pub fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// How long since the last traffic.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// The sandbox's half of a relay, read under the idle deadline.
pub struct SandboxFrames {
    from: Streaming<pb::RelayFrame>,
    activity: Activity,
    idle: Duration,
    check: tokio::time::Interval,
}

impl SandboxFrames {
    pub fn new(from: Streaming<pb::RelayFrame>, activity: Activity, idle: Duration) -> Self {
        Self {
            from,
            activity,
            idle,
            // Validated non-zero at gateway start; never panic here regardless.
            check: tokio::time::interval((idle / 4).max(Duration::from_millis(1))),
        }
    }

    /// The next frame from the sandbox; `None` once the client stopped
    /// reading, or after telling it the relay was idle too long.
    pub async fn next<T>(
        &mut self,
        client: &mpsc::Sender<Result<T, tonic::Status>>,
    ) -> Option<Result<Option<pb::RelayFrame>, tonic::Status>> {
        loop {
            tokio::select! {
                f = self.from.message() => {
                    self.activity.touch();
                    return Some(f);
                }
                _ = client.closed() => return None,
                _ = self.check.tick() => {
                    if self.activity.idle() >= self.idle {
                        let idle = crate::error::ApiError::RelayIdle { idle: self.idle };
                        let _ = client.send(Err(crate::error::to_status(idle))).await;
                        return None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_apply_per_sandbox_and_in_total_and_dropping_frees_the_slot() {
        let t = RelayTable::new(RelayLimits {
            per_sandbox: 2,
            total: 3,
            ..RelayLimits::default()
        });
        let (a, b) = (SandboxId::new(), SandboxId::new());
        let r1 = t.reserve(a, "1").unwrap();
        let _r2 = t.reserve(a, "2").unwrap();
        assert!(matches!(
            t.reserve(a, "3"),
            Err(RelayError::SandboxFull { .. })
        ));
        let r4 = t.reserve(b, "4").unwrap();
        assert!(matches!(
            t.reserve(b, "5"),
            Err(RelayError::GatewayFull { .. })
        ));
        assert!(!t.cancel_for(b, "1", "no"), "b cannot cancel a's relay");
        assert_eq!(t.pending(), 3);
        drop(r1);
        drop(r4);
        assert_eq!(t.pending(), 1, "dropping a reservation frees its slot");
        assert!(t.reserve(b, "6").is_ok());
    }
}
