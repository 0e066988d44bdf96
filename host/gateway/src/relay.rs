//! Relays: a channel the gateway asks a sandbox's supervisor to open on
//! the connection it dialled. [`open`] is how a request gets one (exec and
//! SSH both); [`RelayTable`] holds those waiting for the supervisor's
//! RelayStream to claim them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_core::{Phase, SandboxId};
use openshell_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Streaming;

use crate::error::ApiError;
use crate::runtime::ComputeRuntime;

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

struct Pending {
    sandbox: SandboxId,
    tx: oneshot::Sender<RelayConn>,
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
    ) -> Result<(oneshot::Receiver<RelayConn>, Reservation<'a>), RelayError> {
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
            Some(p) => p.tx.send(conn).is_ok(),
            None => false,
        }
    }

    pub fn cancel(&self, channel_id: &str) {
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(channel_id);
    }

    /// Relays waiting to be claimed (a gauge).
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Asks the supervisor of a Ready sandbox to open a relay for `purpose` and
/// waits (at most the claim timeout) until it does.
pub async fn open(
    runtime: &ComputeRuntime,
    sandbox: &str,
    purpose: pb::relay_open::Purpose,
) -> Result<RelayConn, ApiError> {
    let sb = runtime.find(sandbox).await?;
    if sb.status.phase != Phase::Ready {
        return Err(ApiError::FailedPrecondition(format!(
            "sandbox {} is {}, not Ready; wait for it (`openshell sandbox watch {} --until-settled`)",
            sb.name,
            sb.status.phase.as_str(),
            sb.name
        )));
    }
    let session = runtime.sessions.get(sb.id).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "sandbox {}'s supervisor is not connected; retry shortly",
            sb.name
        ))
    })?;

    let channel_id = uuid::Uuid::new_v4().to_string();
    let (claimed, _reservation) = runtime
        .relays
        .reserve(sb.id, &channel_id)
        .map_err(|e| ApiError::ResourceExhausted(e.to_string()))?;
    let open = pb::GatewayMessage {
        msg: Some(pb::gateway_message::Msg::RelayOpen(pb::RelayOpen {
            channel_id,
            purpose: Some(purpose),
        })),
    };
    if session.control.send(open).await.is_err() {
        return Err(ApiError::Unavailable(
            "the supervisor session just ended; retry".into(),
        ));
    }
    match tokio::time::timeout(runtime.relays.limits.claim_timeout, claimed).await {
        Ok(Ok(conn)) => Ok(conn),
        _ => Err(ApiError::Unavailable(format!(
            "sandbox {}'s supervisor did not open the relay in time",
            sb.name
        ))),
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

/// What reading the sandbox's half of a relay produced.
pub enum Next {
    Frame(Result<Option<pb::RelayFrame>, tonic::Status>),
    /// Nothing went either way for the idle timeout.
    Idle,
    /// The client stopped reading.
    ClientGone,
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
            check: tokio::time::interval(idle / 4),
        }
    }

    /// The next frame, or why there will be none.
    pub async fn next<T>(&mut self, client: &mpsc::Sender<T>) -> Next {
        loop {
            tokio::select! {
                f = self.from.message() => {
                    self.activity.touch();
                    return Next::Frame(f);
                }
                _ = client.closed() => return Next::ClientGone,
                _ = self.check.tick() => {
                    if self.activity.idle() >= self.idle {
                        return Next::Idle;
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
        drop(r1);
        drop(r4);
        assert_eq!(t.pending(), 1, "dropping a reservation frees its slot");
        assert!(t.reserve(b, "6").is_ok());
    }
}
