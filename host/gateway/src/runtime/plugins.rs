//! Driver components: loading (bundled at start, or uploaded) and unloading.

use std::sync::Arc;

use openshell_core::validate;
use openshell_plugin::{Capability, Plugin};
use openshell_store::PluginRecord;

use super::{ComputeRuntime, now_ms};
use crate::error::ApiError;

/// Grants each bundled driver needs, as its documentation lists them.
pub fn bundled_grants(driver: &str) -> Option<&'static [Capability]> {
    use Capability::*;
    match driver {
        "process" => Some(&[Log, Files, Image, Process]),
        "vm" => Some(&[Log, Files, Image, Network, Rootfs, Vm]),
        _ => None,
    }
}

impl ComputeRuntime {
    /// Loads a component under `name`, records it, and makes it current.
    pub async fn load_plugin(
        &self,
        name: &str,
        bytes: &[u8],
        grants: &[String],
    ) -> Result<(Arc<Plugin>, bool), ApiError> {
        validate::driver_name(name)?;
        let grants = grants
            .iter()
            .map(|g| Capability::parse(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(openshell_plugin::PluginError::from)?;
        let (plugin, replaced) = self.plugins.install(name, bytes, &grants).await?;
        self.store
            .upsert_plugin(&PluginRecord {
                name: plugin.name.clone(),
                digest: plugin.digest.clone(),
                version: plugin.info.version.clone(),
                grants: plugin
                    .grants
                    .iter()
                    .map(|g| g.as_str().to_owned())
                    .collect(),
                wasm_path: plugin.path.display().to_string(),
                loaded_at_ms: now_ms(),
            })
            .await?;
        tracing::info!(plugin = name, digest = %plugin.digest, replaced, "plugin loaded");
        Ok((plugin, replaced))
    }

    /// The loaded plugins.
    pub fn loaded_plugins(&self) -> Vec<Arc<Plugin>> {
        self.plugins.list()
    }

    /// How many stored sandboxes a plugin drives.
    pub async fn plugin_users(&self, name: &str) -> Result<u64, ApiError> {
        Ok(self.store.count_sandboxes_by_driver(name).await?)
    }

    pub async fn unload_plugin(&self, name: &str, force: bool) -> Result<(), ApiError> {
        if self.plugins.get(name).is_none() && self.store.get_plugin(name).await?.is_none() {
            return Err(ApiError::PluginNotFound {
                name: name.to_owned(),
            });
        }
        let count = self.store.count_sandboxes_by_driver(name).await?;
        if count > 0 && !force {
            let example = self
                .store
                .first_sandbox_name_by_driver(name)
                .await?
                .map(|n| n.to_string())
                .unwrap_or_default();
            return Err(ApiError::PluginInUse {
                name: name.to_owned(),
                count,
                example,
            });
        }
        self.plugins.remove(name);
        self.store.delete_plugin(name).await?;
        Ok(())
    }
}
