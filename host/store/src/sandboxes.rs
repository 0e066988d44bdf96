//! Sandbox records: insert, read, compare-and-swap update, delete.
//!
//! `revision` is the concurrency control. Every write names the revision it
//! read and bumps it by one; a write against a stale revision changes nothing
//! and reports [`StoreError::Conflict`]. The secret hash shares the row but is
//! never selected with the record, so no read path can leak it.
//!
//! `uid_slot` is written once: by the insert, or for a record stored before
//! slots existed by [`Store::set_uid_slot_if_null`]. Updates never touch it,
//! so it stays until the row is deleted, and the unique index on it is what
//! keeps two stored sandboxes off the same host uid range.

use std::time::Duration;

use openshell_core::{Sandbox, SandboxId, SandboxName};
use rand::Rng;
use sqlx::error::ErrorKind;

use crate::{Store, StoreError, with_pool};

/// The columns a [`Sandbox`] is read from. `driver` and `phase` are left out:
/// they are copies of `spec.driver` and `status.phase` kept for queries, and
/// `secret_hash` is left out on purpose.
macro_rules! sandbox_columns {
    () => {
        "id, name, request_id, spec, status, driver_state, revision, created_at_ms, updated_at_ms, \
         uid_slot"
    };
}

// $12, the uid slot, is INSERT's alone: bound after the shared list.
const INSERT: &str = concat!(
    "INSERT INTO sandboxes (id, name, request_id, driver, spec, phase, status, driver_state, \
     revision, created_at_ms, updated_at_ms, uid_slot) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING ",
    sandbox_columns!()
);
// Same parameter numbers as INSERT, so one bind list serves both; here $9 is
// the revision the caller read. No uid_slot: see the module comment.
const UPDATE: &str = concat!(
    "UPDATE sandboxes SET name = $2, request_id = $3, driver = $4, spec = $5, phase = $6, \
     status = $7, driver_state = $8, revision = revision + 1, created_at_ms = $10, \
     updated_at_ms = $11 \
     WHERE id = $1 AND revision = $9 RETURNING ",
    sandbox_columns!()
);
const SELECT_BY_ID: &str = concat!(
    "SELECT ",
    sandbox_columns!(),
    " FROM sandboxes WHERE id = $1"
);
const SELECT_BY_NAME: &str = concat!(
    "SELECT ",
    sandbox_columns!(),
    " FROM sandboxes WHERE name = $1"
);
const SELECT_BY_REQUEST_ID: &str = concat!(
    "SELECT ",
    sandbox_columns!(),
    " FROM sandboxes WHERE request_id = $1"
);
const SELECT_PAGE: &str = concat!(
    "SELECT ",
    sandbox_columns!(),
    " FROM sandboxes ORDER BY created_at_ms, id LIMIT $1 OFFSET $2"
);
const SELECT_FIRST_KEYED_PAGE: &str = concat!(
    "SELECT ",
    sandbox_columns!(),
    " FROM sandboxes ORDER BY created_at_ms, id LIMIT $1"
);
// Row-value comparison: SQLite has it since 3.15 and Postgres always, and
// both walk the (created_at_ms, id) index for it. Postgres compares id in
// the column's "C" collation, SQLite in BINARY: the same byte order.
const SELECT_KEYED_PAGE: &str = concat!(
    "SELECT ",
    sandbox_columns!(),
    " FROM sandboxes WHERE (created_at_ms, id) > ($2, $3) ORDER BY created_at_ms, id LIMIT $1"
);
const SELECT_BY_DRIVER: &str = concat!(
    "SELECT ",
    sandbox_columns!(),
    " FROM sandboxes WHERE driver = $1 ORDER BY created_at_ms, id"
);
const COUNT_BY_DRIVER: &str = "SELECT COUNT(*) FROM sandboxes WHERE driver = $1";
const FIRST_NAME_BY_DRIVER: &str =
    "SELECT name FROM sandboxes WHERE driver = $1 ORDER BY created_at_ms, id LIMIT 1";
const SET_UID_SLOT_IF_NULL: &str = concat!(
    "UPDATE sandboxes SET uid_slot = $2, revision = revision + 1 \
     WHERE id = $1 AND uid_slot IS NULL RETURNING ",
    sandbox_columns!()
);
const SELECT_UID_SLOTS: &str =
    "SELECT uid_slot FROM sandboxes WHERE uid_slot IS NOT NULL ORDER BY uid_slot";
const COUNT_OTHER_WITH_UID_SLOT: &str =
    "SELECT COUNT(*) FROM sandboxes WHERE uid_slot = $1 AND id <> $2";
const COUNT: &str = "SELECT COUNT(*) FROM sandboxes";
const COUNT_ID: &str = "SELECT COUNT(*) FROM sandboxes WHERE id = $1";
const COUNT_OTHER_WITH_NAME: &str = "SELECT COUNT(*) FROM sandboxes WHERE name = $1 AND id <> $2";
const COUNT_OTHER_WITH_REQUEST_ID: &str =
    "SELECT COUNT(*) FROM sandboxes WHERE request_id = $1 AND id <> $2";
const DELETE: &str = "DELETE FROM sandboxes WHERE id = $1";
// Only ever forward: activity recorded out of order never moves it back.
const RECORD_ACTIVITY: &str = "UPDATE sandboxes SET last_active_ms = $2 \
     WHERE id = $1 AND (last_active_ms IS NULL OR last_active_ms < $2)";
const SELECT_ACTIVITY: &str =
    "SELECT id, last_active_ms FROM sandboxes WHERE last_active_ms IS NOT NULL";
const SET_SECRET_HASH: &str = "UPDATE sandboxes SET secret_hash = $2 WHERE id = $1";
const GET_SECRET_HASH: &str = "SELECT secret_hash FROM sandboxes WHERE id = $1";

/// How often [`Store::modify_sandbox`] reloads and retries after a conflict
/// before giving up. Generous: a conflict means another writer made progress.
const MAX_MODIFY_ATTEMPTS: u32 = 1000;

/// Binds a sandbox's columns as $1..=$11 in the order INSERT and UPDATE use.
macro_rules! bind_sandbox {
    ($query:expr, $cols:expr, $revision:expr) => {
        $query
            .bind($cols.id.as_str())
            .bind($cols.name)
            .bind($cols.request_id)
            .bind($cols.driver)
            .bind($cols.spec.as_str())
            .bind($cols.phase)
            .bind($cols.status.as_str())
            .bind($cols.driver_state)
            .bind($revision)
            .bind($cols.created_at_ms)
            .bind($cols.updated_at_ms)
    };
}

/// A sandbox flattened into column values.
struct SandboxColumns<'a> {
    id: String,
    name: &'a str,
    request_id: Option<&'a str>,
    driver: &'a str,
    spec: String,
    phase: &'static str,
    status: String,
    driver_state: &'a [u8],
    created_at_ms: i64,
    updated_at_ms: i64,
    uid_slot: Option<i64>,
}

impl<'a> SandboxColumns<'a> {
    fn new(s: &'a Sandbox) -> Self {
        // Serialising these types cannot fail: plain structs, enums and maps
        // with string keys.
        let spec = serde_json::to_string(&s.spec).expect("a SandboxSpec always serialises");
        let status = serde_json::to_string(&s.status).expect("a Status always serialises");
        SandboxColumns {
            id: s.id.to_string(),
            name: s.name.as_str(),
            request_id: s.request_id.as_deref(),
            driver: &s.spec.driver,
            spec,
            phase: s.status.phase.as_str(),
            status,
            driver_state: &s.driver_state,
            created_at_ms: s.created_at_ms,
            updated_at_ms: s.updated_at_ms,
            uid_slot: s.uid_slot.map(i64::from),
        }
    }
}

#[derive(sqlx::FromRow)]
struct SandboxRow {
    id: String,
    name: String,
    request_id: Option<String>,
    spec: String,
    status: String,
    driver_state: Vec<u8>,
    revision: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
    uid_slot: Option<i64>,
}

impl SandboxRow {
    fn into_sandbox(self) -> Result<Sandbox, StoreError> {
        let corrupt =
            |column, source: Box<dyn std::error::Error + Send + Sync>| StoreError::Corrupt {
                id: self.id.clone(),
                column,
                source,
            };
        Ok(Sandbox {
            id: SandboxId(uuid::Uuid::parse_str(&self.id).map_err(|e| corrupt("id", e.into()))?),
            name: SandboxName::parse(&self.name).map_err(|e| corrupt("name", e.into()))?,
            spec: serde_json::from_str(&self.spec).map_err(|e| corrupt("spec", e.into()))?,
            status: serde_json::from_str(&self.status).map_err(|e| corrupt("status", e.into()))?,
            request_id: self.request_id,
            driver_state: self.driver_state,
            revision: self.revision,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            uid_slot: self
                .uid_slot
                .map(u32::try_from)
                .transpose()
                .map_err(|e| corrupt("uid_slot", e.into()))?,
        })
    }
}

fn into_sandboxes(rows: Vec<SandboxRow>) -> Result<Vec<Sandbox>, StoreError> {
    rows.into_iter().map(SandboxRow::into_sandbox).collect()
}

/// Where a walk over every sandbox ([`Store::list_sandboxes_after`]) left
/// off: the sort key of the last row it saw.
///
/// A key, not an offset, so rows deleted (or added) behind the walk move
/// nothing: the next page starts after this key whatever happened before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageKey {
    pub created_at_ms: i64,
    pub id: SandboxId,
}

impl PageKey {
    /// The key just past `sandbox`.
    pub fn after(sandbox: &Sandbox) -> Self {
        PageKey {
            created_at_ms: sandbox.created_at_ms,
            id: sandbox.id,
        }
    }
}

impl Store {
    /// Stores a new sandbox at revision 1 and returns the stored copy (the
    /// `revision` passed in is ignored).
    ///
    /// A taken request_id wins over a taken name, so a retried create is
    /// recognised as a retry; a taken name wins over a taken uid slot
    /// ([`StoreError::SlotTaken`]), which the caller answers by trying
    /// another slot.
    pub async fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<Sandbox, StoreError> {
        let cols = SandboxColumns::new(sandbox);
        let inserted = with_pool!(self, |pool| {
            bind_sandbox!(sqlx::query_as::<_, SandboxRow>(INSERT), cols, 1_i64)
                .bind(cols.uid_slot)
                .fetch_one(pool)
                .await
        });
        match inserted {
            Ok(row) => row.into_sandbox(),
            Err(source) => Err(self
                .explain_write_error("insert sandbox", sandbox, source)
                .await),
        }
    }

    pub async fn get_sandbox(&self, id: SandboxId) -> Result<Option<Sandbox>, StoreError> {
        self.fetch_one_by(SELECT_BY_ID, &id.to_string(), "get sandbox")
            .await
    }

    pub async fn get_sandbox_by_name(&self, name: &str) -> Result<Option<Sandbox>, StoreError> {
        self.fetch_one_by(SELECT_BY_NAME, name, "get sandbox by name")
            .await
    }

    pub async fn get_sandbox_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<Sandbox>, StoreError> {
        self.fetch_one_by(
            SELECT_BY_REQUEST_ID,
            request_id,
            "get sandbox by request_id",
        )
        .await
    }

    /// One page of sandboxes by offset, oldest first (ties broken by id).
    ///
    /// For the public ListSandboxes RPC, whose contract is offsets. An offset
    /// skips rows when rows before it are deleted between pages, so code that
    /// must see every sandbox walks with [`Store::list_sandboxes_after`].
    pub async fn list_sandboxes(
        &self,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<Sandbox>, StoreError> {
        let rows = with_pool!(self, |pool| {
            sqlx::query_as::<_, SandboxRow>(SELECT_PAGE)
                .bind(i64::from(limit))
                .bind(i64::from(offset))
                .fetch_all(pool)
                .await
        })
        .map_err(StoreError::query("list sandboxes"))?;
        into_sandboxes(rows)
    }

    /// Up to `limit` sandboxes that sort after `after` (from the start with
    /// `None`), oldest first, ties broken by id. Pass the [`PageKey::after`]
    /// the last row of a page to get the next; an empty page is the end.
    ///
    /// Every row that exists for the whole walk is seen exactly once, however
    /// many rows are deleted meanwhile.
    pub async fn list_sandboxes_after(
        &self,
        after: Option<&PageKey>,
        limit: u32,
    ) -> Result<Vec<Sandbox>, StoreError> {
        let rows = with_pool!(self, |pool| {
            match after {
                None => {
                    sqlx::query_as::<_, SandboxRow>(SELECT_FIRST_KEYED_PAGE)
                        .bind(i64::from(limit))
                        .fetch_all(pool)
                        .await
                }
                Some(key) => {
                    sqlx::query_as::<_, SandboxRow>(SELECT_KEYED_PAGE)
                        .bind(i64::from(limit))
                        .bind(key.created_at_ms)
                        .bind(key.id.to_string())
                        .fetch_all(pool)
                        .await
                }
            }
        })
        .map_err(StoreError::query("list sandboxes after a key"))?;
        into_sandboxes(rows)
    }

    pub async fn count_sandboxes(&self) -> Result<u64, StoreError> {
        let count: i64 = with_pool!(self, |pool| {
            sqlx::query_scalar(COUNT).fetch_one(pool).await
        })
        .map_err(StoreError::query("count sandboxes"))?;
        // COUNT(*) is never negative.
        Ok(count.unsigned_abs())
    }

    /// How many sandboxes the driver plugin `driver` runs, counted in the
    /// database: no record is loaded.
    pub async fn count_sandboxes_by_driver(&self, driver: &str) -> Result<u64, StoreError> {
        let count: i64 = with_pool!(self, |pool| {
            sqlx::query_scalar(COUNT_BY_DRIVER)
                .bind(driver)
                .fetch_one(pool)
                .await
        })
        .map_err(StoreError::query("count sandboxes by driver"))?;
        // COUNT(*) is never negative.
        Ok(count.unsigned_abs())
    }

    /// The name of the oldest sandbox the driver plugin `driver` runs, to
    /// give an example in a message; `None` if it runs none.
    pub async fn first_sandbox_name_by_driver(
        &self,
        driver: &str,
    ) -> Result<Option<SandboxName>, StoreError> {
        let name: Option<String> = with_pool!(self, |pool| {
            sqlx::query_scalar(FIRST_NAME_BY_DRIVER)
                .bind(driver)
                .fetch_optional(pool)
                .await
        })
        .map_err(StoreError::query("first sandbox name by driver"))?;
        name.map(|raw| {
            SandboxName::parse(&raw).map_err(|e| StoreError::Corrupt {
                id: raw.clone(),
                column: "name",
                source: e.into(),
            })
        })
        .transpose()
    }

    /// Every sandbox run by the driver plugin `driver`, oldest first.
    pub async fn list_sandboxes_by_driver(&self, driver: &str) -> Result<Vec<Sandbox>, StoreError> {
        let rows = with_pool!(self, |pool| {
            sqlx::query_as::<_, SandboxRow>(SELECT_BY_DRIVER)
                .bind(driver)
                .fetch_all(pool)
                .await
        })
        .map_err(StoreError::query("list sandboxes by driver"))?;
        into_sandboxes(rows)
    }

    /// Writes `sandbox` over the stored record if the stored revision is still
    /// `sandbox.revision`, and returns the stored copy with the next revision.
    ///
    /// Every field but `id` and `uid_slot` is written (the returned copy has
    /// the stored slot). Prefer [`Store::modify_sandbox`], which retries on
    /// [`StoreError::Conflict`].
    pub async fn update_sandbox(&self, sandbox: &Sandbox) -> Result<Sandbox, StoreError> {
        let cols = SandboxColumns::new(sandbox);
        let updated = with_pool!(self, |pool| {
            bind_sandbox!(
                sqlx::query_as::<_, SandboxRow>(UPDATE),
                cols,
                sandbox.revision
            )
            .fetch_optional(pool)
            .await
        });
        match updated {
            Ok(Some(row)) => row.into_sandbox(),
            Ok(None) => {
                let exists: i64 = with_pool!(self, |pool| {
                    sqlx::query_scalar(COUNT_ID)
                        .bind(cols.id.as_str())
                        .fetch_one(pool)
                        .await
                })
                .map_err(StoreError::query("update sandbox"))?;
                Err(if exists > 0 {
                    StoreError::Conflict {
                        id: sandbox.id,
                        expected_revision: sandbox.revision,
                    }
                } else {
                    StoreError::NotFound { id: sandbox.id }
                })
            }
            Err(source) => Err(self
                .explain_write_error("update sandbox", sandbox, source)
                .await),
        }
    }

    /// Loads sandbox `id`, lets `f` change it, and stores the change with a
    /// compare-and-swap, reloading and calling `f` again on a conflict. `f`
    /// returns `false` to leave the record as it is (nothing is written).
    ///
    /// Returns the stored record after the change, or `None` if the sandbox
    /// does not exist (or was deleted meanwhile). `f` may run several times,
    /// each time on a fresh copy, so it must not count its own calls.
    /// A change `f` makes to `uid_slot` is not stored (see the module
    /// comment).
    pub async fn modify_sandbox<F>(
        &self,
        id: SandboxId,
        mut f: F,
    ) -> Result<Option<Sandbox>, StoreError>
    where
        F: FnMut(&mut Sandbox) -> bool,
    {
        let mut attempt = 0;
        loop {
            let Some(current) = self.get_sandbox(id).await? else {
                return Ok(None);
            };
            let mut next = current.clone();
            if !f(&mut next) {
                return Ok(Some(current));
            }
            // The closure changes the record, not which record or which
            // revision the swap is checked against.
            next.id = current.id;
            next.revision = current.revision;
            match self.update_sandbox(&next).await {
                Ok(stored) => return Ok(Some(stored)),
                Err(StoreError::NotFound { .. }) => return Ok(None),
                Err(e) if e.is_expected() && attempt + 1 < MAX_MODIFY_ATTEMPTS => {
                    attempt += 1;
                    tracing::trace!(%id, attempt, "sandbox changed underneath; retrying");
                    backoff(attempt).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Gives sandbox `id` the uid slot `slot` if it has none yet (a record
    /// stored before slots existed), bumping its revision, and returns the
    /// stored record. A record that already has a slot is returned as it
    /// is, with its own slot: compare `uid_slot` to know which happened.
    ///
    /// [`StoreError::SlotTaken`] if another sandbox holds `slot`;
    /// [`StoreError::NotFound`] if there is no such sandbox.
    pub async fn set_uid_slot_if_null(
        &self,
        id: SandboxId,
        slot: u32,
    ) -> Result<Sandbox, StoreError> {
        let updated = with_pool!(self, |pool| {
            sqlx::query_as::<_, SandboxRow>(SET_UID_SLOT_IF_NULL)
                .bind(id.to_string())
                .bind(i64::from(slot))
                .fetch_optional(pool)
                .await
        });
        match updated {
            Ok(Some(row)) => row.into_sandbox(),
            Ok(None) => self
                .get_sandbox(id)
                .await?
                .ok_or(StoreError::NotFound { id }),
            Err(source) if is_unique_violation(&source) => {
                match self.slot_taken_by_other(slot, &id.to_string()).await {
                    Ok(true) => Err(StoreError::SlotTaken { slot }),
                    Ok(false) => Err(StoreError::Query {
                        op: "set uid slot",
                        source,
                    }),
                    Err(e) => Err(e),
                }
            }
            Err(source) => Err(StoreError::Query {
                op: "set uid slot",
                source,
            }),
        }
    }

    /// Every uid slot a stored sandbox holds, ascending, for choosing a free
    /// one. Slots of rows not yet deleted count, whatever their phase.
    pub async fn uid_slots_in_use(&self) -> Result<Vec<u32>, StoreError> {
        let slots: Vec<i64> = with_pool!(self, |pool| {
            sqlx::query_scalar(SELECT_UID_SLOTS).fetch_all(pool).await
        })
        .map_err(StoreError::query("list uid slots"))?;
        slots
            .into_iter()
            .map(|slot| {
                u32::try_from(slot).map_err(|e| StoreError::Corrupt {
                    id: format!("uid_slot {slot}"),
                    column: "uid_slot",
                    source: e.into(),
                })
            })
            .collect()
    }

    /// Sets (or with `None` clears) the hash of the sandbox's secret. Does not
    /// bump `revision`: the hash is not part of the record readers see.
    pub async fn set_secret_hash(
        &self,
        id: SandboxId,
        secret_hash: Option<&str>,
    ) -> Result<(), StoreError> {
        let result = with_pool!(self, |pool| {
            sqlx::query(SET_SECRET_HASH)
                .bind(id.to_string())
                .bind(secret_hash)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })
        .map_err(StoreError::query("set secret hash"))?;
        if result == 0 {
            return Err(StoreError::NotFound { id });
        }
        Ok(())
    }

    /// The stored secret hash; `None` if there is none or no such sandbox.
    pub async fn get_secret_hash(&self, id: SandboxId) -> Result<Option<String>, StoreError> {
        let hash: Option<Option<String>> = with_pool!(self, |pool| {
            sqlx::query_scalar(GET_SECRET_HASH)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await
        })
        .map_err(StoreError::query("get secret hash"))?;
        Ok(hash.flatten())
    }

    /// Records that `id` was active at `at_ms` (an idle timeout counts from
    /// the latest). Does not bump `revision`: activity is not part of the
    /// record, and exec traffic must not wake every watcher. A sandbox that
    /// is gone is not an error.
    pub async fn record_activity(&self, id: SandboxId, at_ms: i64) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query(RECORD_ACTIVITY)
                .bind(id.to_string())
                .bind(at_ms)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(StoreError::query("record activity"))
    }

    /// When each sandbox with recorded activity was last active.
    pub async fn last_active(
        &self,
    ) -> Result<std::collections::HashMap<SandboxId, i64>, StoreError> {
        let rows: Vec<(String, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(SELECT_ACTIVITY).fetch_all(pool).await
        })
        .map_err(StoreError::query("read activity"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, at)| Some((SandboxId::parse(&id)?, at)))
            .collect())
    }

    /// Deletes the record; `false` if there was none.
    pub async fn delete_sandbox(&self, id: SandboxId) -> Result<bool, StoreError> {
        let deleted = with_pool!(self, |pool| {
            sqlx::query(DELETE)
                .bind(id.to_string())
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })
        .map_err(StoreError::query("delete sandbox"))?;
        Ok(deleted > 0)
    }

    async fn fetch_one_by(
        &self,
        sql: &'static str,
        key: &str,
        op: &'static str,
    ) -> Result<Option<Sandbox>, StoreError> {
        let row = with_pool!(self, |pool| {
            sqlx::query_as::<_, SandboxRow>(sql)
                .bind(key)
                .fetch_optional(pool)
                .await
        })
        .map_err(StoreError::query(op))?;
        row.map(SandboxRow::into_sandbox).transpose()
    }

    /// Turns a unique violation into the answer a caller can act on. The
    /// backends name the violated constraint differently (SQLite in the
    /// message text, Postgres in a field), so ask which value is taken
    /// instead: the same query works on both, and a row that won a race is
    /// found just the same.
    async fn explain_write_error(
        &self,
        op: &'static str,
        sandbox: &Sandbox,
        source: sqlx::Error,
    ) -> StoreError {
        if !is_unique_violation(&source) {
            return StoreError::Query { op, source };
        }
        let id = sandbox.id.to_string();
        if let Some(request_id) = &sandbox.request_id {
            match self
                .taken_by_other(COUNT_OTHER_WITH_REQUEST_ID, request_id, &id)
                .await
            {
                Ok(true) => {
                    return StoreError::RequestIdTaken {
                        request_id: request_id.clone(),
                    };
                }
                Ok(false) => {}
                Err(e) => return e,
            }
        }
        match self
            .taken_by_other(COUNT_OTHER_WITH_NAME, sandbox.name.as_str(), &id)
            .await
        {
            Ok(true) => {
                return StoreError::NameTaken {
                    name: sandbox.name.to_string(),
                };
            }
            Ok(false) => {}
            Err(e) => return e,
        }
        // Only an insert writes the slot, but asking on an update too is
        // harmless: there the row's own slot is excluded by its id.
        if let Some(slot) = sandbox.uid_slot {
            match self.slot_taken_by_other(slot, &id).await {
                Ok(true) => return StoreError::SlotTaken { slot },
                Ok(false) => {}
                Err(e) => return e,
            }
        }
        StoreError::Query { op, source }
    }

    async fn slot_taken_by_other(&self, slot: u32, id: &str) -> Result<bool, StoreError> {
        let count: i64 = with_pool!(self, |pool| {
            sqlx::query_scalar(COUNT_OTHER_WITH_UID_SLOT)
                .bind(i64::from(slot))
                .bind(id)
                .fetch_one(pool)
                .await
        })
        .map_err(StoreError::query("look up a taken uid slot"))?;
        Ok(count > 0)
    }

    async fn taken_by_other(
        &self,
        sql: &'static str,
        value: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        let count: i64 = with_pool!(self, |pool| {
            sqlx::query_scalar(sql)
                .bind(value)
                .bind(id)
                .fetch_one(pool)
                .await
        })
        .map_err(StoreError::query("look up a taken value"))?;
        Ok(count > 0)
    }
}

fn is_unique_violation(source: &sqlx::Error) -> bool {
    matches!(source, sqlx::Error::Database(e) if e.kind() == ErrorKind::UniqueViolation)
}

/// Waits a random moment whose range doubles with each attempt (up to 200 µs
/// on the first retry, ~100 ms from the tenth), so writers that collided
/// spread out instead of colliding again in lockstep. The high cap matters
/// when many writers share a few connections: with a ~6 ms cap, 200 writers
/// on one in-memory SQLite connection needed roughly twice the attempts.
async fn backoff(attempt: u32) {
    let max_micros = 100_u64 << attempt.min(10);
    let micros = rand::rng().random_range(0..=max_micros);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}
