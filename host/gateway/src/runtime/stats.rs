//! `sandbox stats`: what a sandbox uses now against its limits, read on
//! the host by the plugin host (`openshell_plugin::stats`).

use openshell_core::Sandbox;
use openshell_plugin::stats::Usage;

use super::ComputeRuntime;
use crate::error::ApiError;

impl ComputeRuntime {
    /// A sandbox and its usage. A Stopped one reads as `none`: nothing
    /// runs, only its disk holds anything.
    pub async fn stats(&self, name_or_id: &str) -> Result<(Sandbox, Usage), ApiError> {
        let sb = self.find(name_or_id).await?;
        let plugins = self.plugins.clone();
        let id = sb.id.to_string();
        let disk_gib = sb.spec.resources.disk_gib;
        // Reads files and runs `btrfs`: off the async threads.
        let usage = tokio::task::spawn_blocking(move || plugins.usage(&id, disk_gib))
            .await
            .unwrap_or_default();
        Ok((sb, usage))
    }
}
