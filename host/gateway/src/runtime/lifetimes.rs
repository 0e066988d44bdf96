//! The task that enforces ttls (delete) and idle timeouts (stop). Every
//! tick it stores the relay activity it saw since the last, then asks
//! [`openshell_core::lifetime::due`] about each sandbox with a lifetime,
//! from stored times only (creation, last activity), so a gateway restart
//! loses at most one tick of activity and no deadline.

use std::sync::{Arc, Weak};
use std::time::Duration;

use openshell_core::{Expiry, lifetime};

use super::{ComputeRuntime, now_ms};
use crate::error::ApiError;

/// How often lifetimes are checked: a deadline is acted on within this.
const TICK: Duration = Duration::from_secs(1);
/// Rows read per page.
const PAGE: u32 = 500;

impl ComputeRuntime {
    /// Starts the enforcing task; it ends with the gateway.
    pub fn spawn_lifetimes(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let mut shutdown = self.shutdown_signal();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(rt) = weak.upgrade() else { return };
                if let Err(e) = rt.enforce_lifetimes().await {
                    tracing::warn!("cannot check sandbox lifetimes: {e}");
                }
            }
        });
    }

    async fn enforce_lifetimes(self: &Arc<Self>) -> Result<(), ApiError> {
        let relays = self.supervisors.open_relays().snapshot();
        let mut stored = self.store.last_active().await?;
        for (id, used) in &relays {
            if stored.get(id).is_none_or(|at| *at < used.last_ms) {
                self.store.record_activity(*id, used.last_ms).await?;
                stored.insert(*id, used.last_ms);
            }
        }
        let now = now_ms();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_sandboxes_after(after.as_ref(), PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(openshell_store::PageKey::after(last));
            for sb in page.iter().filter(|sb| !sb.spec.lifetime.is_unset()) {
                let open = relays.get(&sb.id).map_or(0, |u| u.open);
                let last_active = stored.get(&sb.id).copied().unwrap_or(sb.created_at_ms);
                let due = lifetime::due(
                    &sb.spec.lifetime,
                    sb.status.phase,
                    sb.created_at_ms,
                    last_active,
                    open,
                    now,
                );
                let id = sb.id.to_string();
                match due {
                    Some(Expiry::Ttl) => {
                        tracing::info!(sandbox = %sb.id, ttl_secs = sb.spec.lifetime.ttl_secs, "ttl passed; deleting");
                        self.delete(&id).await?;
                    }
                    Some(Expiry::Idle) => {
                        let secs = sb.spec.lifetime.idle_timeout_secs;
                        tracing::info!(sandbox = %sb.id, idle_timeout_secs = secs, "idle; stopping");
                        let why = format!(
                            "stopped after {secs} s without exec or SSH (its idle timeout)"
                        );
                        // A sandbox that left Ready meanwhile refuses: fine.
                        if let Err(e) = self.stop(&id, &why).await {
                            tracing::debug!(sandbox = %sb.id, "idle stop: {e}");
                        }
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}
