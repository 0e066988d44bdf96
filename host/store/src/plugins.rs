//! Records of the driver plugins the gateway has loaded.

use crate::{Store, StoreError, with_pool};

/// A loaded plugin as the gateway remembers it across restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginRecord {
    pub name: String,
    /// Content digest of the wasm file, e.g. `sha256:…`.
    pub digest: String,
    pub version: String,
    /// Capabilities the operator granted, by WIT interface name.
    pub grants: Vec<String>,
    pub wasm_path: String,
    pub loaded_at_ms: i64,
}

const UPSERT: &str = "INSERT INTO plugins (name, digest, version, grants, wasm_path, loaded_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (name) DO UPDATE SET digest = excluded.digest, version = excluded.version, \
     grants = excluded.grants, wasm_path = excluded.wasm_path, loaded_at_ms = excluded.loaded_at_ms";
const SELECT_ONE: &str = "SELECT name, digest, version, grants, wasm_path, loaded_at_ms \
     FROM plugins WHERE name = $1";
const SELECT_ALL: &str = "SELECT name, digest, version, grants, wasm_path, loaded_at_ms \
     FROM plugins ORDER BY name";
const DELETE: &str = "DELETE FROM plugins WHERE name = $1";

#[derive(sqlx::FromRow)]
struct PluginRow {
    name: String,
    digest: String,
    version: String,
    grants: String,
    wasm_path: String,
    loaded_at_ms: i64,
}

impl PluginRow {
    fn into_record(self) -> Result<PluginRecord, StoreError> {
        let grants = serde_json::from_str(&self.grants).map_err(|e| StoreError::Corrupt {
            id: self.name.clone(),
            column: "grants",
            source: e.into(),
        })?;
        Ok(PluginRecord {
            name: self.name,
            digest: self.digest,
            version: self.version,
            grants,
            wasm_path: self.wasm_path,
            loaded_at_ms: self.loaded_at_ms,
        })
    }
}

impl Store {
    /// Stores `plugin`, replacing any record with the same name.
    pub async fn upsert_plugin(&self, plugin: &PluginRecord) -> Result<(), StoreError> {
        // A Vec<String> always serialises.
        let grants = serde_json::to_string(&plugin.grants).expect("a list of strings serialises");
        with_pool!(self, |pool| {
            sqlx::query(UPSERT)
                .bind(plugin.name.as_str())
                .bind(plugin.digest.as_str())
                .bind(plugin.version.as_str())
                .bind(grants.as_str())
                .bind(plugin.wasm_path.as_str())
                .bind(plugin.loaded_at_ms)
                .execute(pool)
                .await
                .map(drop)
        })
        .map_err(StoreError::query("upsert plugin"))
    }

    pub async fn get_plugin(&self, name: &str) -> Result<Option<PluginRecord>, StoreError> {
        let row = with_pool!(self, |pool| {
            sqlx::query_as::<_, PluginRow>(SELECT_ONE)
                .bind(name)
                .fetch_optional(pool)
                .await
        })
        .map_err(StoreError::query("get plugin"))?;
        row.map(PluginRow::into_record).transpose()
    }

    /// Every plugin record, by name.
    pub async fn list_plugins(&self) -> Result<Vec<PluginRecord>, StoreError> {
        let rows = with_pool!(self, |pool| {
            sqlx::query_as::<_, PluginRow>(SELECT_ALL)
                .fetch_all(pool)
                .await
        })
        .map_err(StoreError::query("list plugins"))?;
        rows.into_iter().map(PluginRow::into_record).collect()
    }

    /// Deletes the record; `false` if there was none.
    pub async fn delete_plugin(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = with_pool!(self, |pool| {
            sqlx::query(DELETE)
                .bind(name)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })
        .map_err(StoreError::query("delete plugin"))?;
        Ok(deleted > 0)
    }
}
