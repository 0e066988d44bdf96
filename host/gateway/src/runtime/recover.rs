//! What a gateway start means for what the store remembers.
//!
//! Order matters: stored plugins are reloaded first, then the gateway loads
//! its bundled drivers (`server.rs`), and only then are sandboxes settled,
//! so a driver that is about to be loaded is never reported missing.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openshell_core::{Event, Phase, Sandbox, uid_slot};
use openshell_plugin::Capability;
use openshell_store::StoreError;

use super::ComputeRuntime;
use crate::error::ApiError;

/// Rows read per page while recovering.
const PAGE: u32 = 500;

impl ComputeRuntime {
    /// Reloads every plugin the store recorded. A plugin that no longer
    /// loads is logged; its sandboxes are settled by [`Self::recover`].
    pub async fn reload_plugins(&self) -> Result<(), ApiError> {
        for rec in self.store.list_plugins().await? {
            let grants: Vec<Capability> = rec
                .grants
                .iter()
                .filter_map(|g| Capability::parse(g).ok())
                .collect();
            let started = std::time::Instant::now();
            match self
                .plugins
                .load_stored(&rec.name, std::path::Path::new(&rec.wasm_path), &grants)
                .await
            {
                Ok(_) => {
                    tracing::info!(plugin = rec.name, elapsed = ?started.elapsed(), "plugin reloaded")
                }
                Err(e) => tracing::error!(plugin = rec.name, "cannot reload plugin: {e}"),
            }
        }
        Ok(())
    }

    /// Settles what a restart means for each stored sandbox: Deleting ones
    /// are finished, live ones resumed through their driver.
    ///
    /// Pages by key (created_at, id), not offset: the deletes this starts
    /// remove rows while later pages are read.
    pub async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        let stored = usize::try_from(self.store.count_sandboxes().await?).unwrap_or(usize::MAX);
        self.admitted.store(stored, Ordering::SeqCst);
        let mut known = HashSet::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_sandboxes_after(after.as_ref(), PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(openshell_store::PageKey::after(last));
            known.extend(page.iter().map(|sb| sb.id.to_string()));
            for sb in page {
                let sb = self.backfill_uid_slot(sb).await?;
                let sb = self.backfill_disk_gib(sb).await?;
                if sb.status.phase != Phase::Deleting {
                    self.install_policy(&sb);
                }
                match sb.status.phase {
                    Phase::Deleting => {
                        let me = self.clone();
                        tokio::spawn(async move { me.finish_delete(sb).await });
                    }
                    // A Stopped sandbox stays down until someone starts it.
                    Phase::Error | Phase::Stopped => {}
                    Phase::Provisioning | Phase::Ready | Phase::Unknown => {
                        self.apply(sb.id, &[Event::GatewayRestarted], None).await;
                        self.resume(sb).await;
                    }
                }
            }
        }
        let swept = self.plugins.processes().sweep_stale_cgroups(&known);
        if swept > 0 {
            tracing::info!(swept, "removed cgroups of sandboxes that no longer exist");
        }
        Ok(())
    }

    /// Gives a record from before uid slots were stored the slot the old
    /// code derived from its id (so it keeps owning its files), or the next
    /// free one if another sandbox holds that.
    async fn backfill_uid_slot(&self, sb: Sandbox) -> Result<Sandbox, ApiError> {
        if sb.uid_slot.is_some() {
            return Ok(sb);
        }
        let in_use: HashSet<u32> = self.store.uid_slots_in_use().await?.into_iter().collect();
        for slot in uid_slot::candidates(sb.id, &in_use) {
            match self.store.set_uid_slot_if_null(sb.id, slot).await {
                Ok(stored) => return Ok(stored),
                Err(StoreError::SlotTaken { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::NoFreeUidSlot {
            slots: uid_slot::UID_SLOTS,
        })
    }

    /// Gives a record with no disk size (stored before sizes existed, or by
    /// a gateway without a sandbox disk) this gateway's default, stored, so
    /// `sandbox get` shows the size every later launch uses. Nothing to do
    /// without a sandbox disk, or for a sandbox being deleted.
    async fn backfill_disk_gib(&self, sb: Sandbox) -> Result<Sandbox, ApiError> {
        let Some(disk) = self.plugins.disk_sizes() else {
            return Ok(sb);
        };
        if sb.spec.resources.disk_gib != 0 || sb.status.phase == Phase::Deleting {
            return Ok(sb);
        }
        let stored = self
            .store
            .modify_sandbox(sb.id, |s| {
                let no_size = s.spec.resources.disk_gib == 0;
                if no_size {
                    s.spec.resources.disk_gib = disk.default_gib;
                }
                no_size
            })
            .await?;
        Ok(stored.unwrap_or(sb))
    }

    /// Relaunches a stored sandbox after a restart through its driver's
    /// `resume`, with a fresh secret.
    async fn resume(self: &Arc<Self>, sb: Sandbox) {
        let Some(plugin) = self.plugins.get(&sb.spec.driver) else {
            let msg = format!(
                "driver {:?} is not loaded after the restart",
                sb.spec.driver
            );
            self.fail(sb.id, "DriverMissing", &msg).await;
            return;
        };
        // A sandbox from before logs gets its log now; at start, before
        // anything can delete it (which would leave the dir behind).
        self.logs.ensure(sb.id);
        let me = self.clone();
        tokio::spawn(async move { me.launch(plugin, sb, true).await });
    }
}
