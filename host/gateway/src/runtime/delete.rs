//! Deleting a sandbox: Deleting is stored first, then an owned task tears
//! down what the driver and the host launched, removes its files, and only
//! then removes the record (which releases its name and uid range).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use openshell_core::{Event, Phase, Sandbox};

use super::{ComputeRuntime, driver_spec};
use crate::error::ApiError;

impl ComputeRuntime {
    /// Marks a sandbox Deleting and tears it down in the background.
    pub async fn delete(self: &Arc<Self>, name_or_id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.find(name_or_id).await?;
        let already = sb.status.phase == Phase::Deleting;
        self.apply(sb.id, &[Event::DeleteRequested], None).await;
        let sb = self.find(&sb.id.to_string()).await?;
        if !already {
            self.logs.event(sb.id, "deleting");
            let me = self.clone();
            let doomed = sb.clone();
            tokio::spawn(async move { me.finish_delete(doomed).await });
        }
        Ok(sb)
    }

    pub(super) async fn finish_delete(&self, sb: Sandbox) {
        self.supervisors.sessions().forget(sb.id);
        match self.plugins.get(&sb.spec.driver) {
            Some(plugin) => {
                if let Err(e) = plugin.delete(&driver_spec(&sb), &sb.driver_state).await {
                    tracing::warn!(sandbox = %sb.id, "driver delete failed; removing anyway: {e}");
                }
            }
            None => tracing::warn!(
                sandbox = %sb.id,
                driver = sb.spec.driver,
                "driver is not loaded; removing the record without it"
            ),
        }
        // Whatever the driver did, nothing the host launched may outlive the record.
        self.plugins.processes().kill(&sb.id.to_string()).await;
        self.plugins.vms().kill(&sb.id.to_string()).await;
        self.supervisors.stop(sb.id);
        // Its connections close now, not when the record goes.
        self.egress.forget(sb.id);
        let dir = self.plugins.sandbox_dir(&sb.id.to_string());
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(sandbox = %sb.id, "cannot remove {}: {e}", dir.display());
        }
        match self.store.delete_sandbox(sb.id).await {
            Ok(removed) => {
                if removed {
                    self.admitted.fetch_sub(1, Ordering::SeqCst);
                    self.logs.remove(sb.id);
                }
                self.watch.notify(sb.id);
                // Its image may have been removed meanwhile (`image rm --force`).
                if removed && sb.spec.image.is_some() {
                    self.collect_images().await;
                }
            }
            Err(e) => tracing::error!(sandbox = %sb.id, "cannot delete the record: {e}"),
        }
    }
}
