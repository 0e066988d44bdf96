//! The client config `openshell gateway start` writes and every other
//! command reads: where the gateway is, the CA it uses, and its token.
//!
//! `OPENSHELL_CONFIG` names the file; by default it is
//! `$XDG_CONFIG_HOME/openshell/config.json` (or `~/.config/...`). Separate
//! files keep parallel gateways (and tests) from overwriting each other.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct ClientConfig {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OPENSHELL_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("openshell/config.json"))
}

/// The saved config, if there is one.
pub fn load() -> anyhow::Result<Option<ClientConfig>> {
    let Some(p) = path() else { return Ok(None) };
    match std::fs::read_to_string(&p) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a valid openshell client config", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

/// Saves the config readable by this user only.
pub fn save(cfg: &ClientConfig, to: &Path) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(cfg)?;
    openshell_plugin::write_private(to, text.as_bytes())
        .with_context(|| format!("cannot write {}", to.display()))
}
