//! Sandbox records: insert, read, compare-and-swap update, delete.
//!
//! `revision` is the concurrency control. Every write names the revision it
//! read and bumps it by one; a write against a stale revision changes nothing
//! and reports [`StoreError::Conflict`]. The secret hash shares the row but is
//! never selected with the record, so no read path can leak it.

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
        "id, name, request_id, spec, status, driver_state, revision, created_at_ms, updated_at_ms"
    };
}

const INSERT: &str = concat!(
    "INSERT INTO sandboxes (id, name, request_id, driver, spec, phase, status, driver_state, \
     revision, created_at_ms, updated_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING ",
    sandbox_columns!()
);
// Same parameter numbers as INSERT, so one bind list serves both; here $9 is
// the revision the caller read.
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
const SELECT_BY_DRIVER: &str = concat!(
    "SELECT ",
    sandbox_columns!(),
    " FROM sandboxes WHERE driver = $1 ORDER BY created_at_ms, id"
);
const COUNT: &str = "SELECT COUNT(*) FROM sandboxes";
const COUNT_ID: &str = "SELECT COUNT(*) FROM sandboxes WHERE id = $1";
const COUNT_OTHER_WITH_NAME: &str = "SELECT COUNT(*) FROM sandboxes WHERE name = $1 AND id <> $2";
const COUNT_OTHER_WITH_REQUEST_ID: &str =
    "SELECT COUNT(*) FROM sandboxes WHERE request_id = $1 AND id <> $2";
const DELETE: &str = "DELETE FROM sandboxes WHERE id = $1";
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
        })
    }
}

fn into_sandboxes(rows: Vec<SandboxRow>) -> Result<Vec<Sandbox>, StoreError> {
    rows.into_iter().map(SandboxRow::into_sandbox).collect()
}

impl Store {
    /// Stores a new sandbox at revision 1 and returns the stored copy (the
    /// `revision` passed in is ignored).
    ///
    /// A taken request_id wins over a taken name, so a retried create is
    /// recognised as a retry.
    pub async fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<Sandbox, StoreError> {
        let cols = SandboxColumns::new(sandbox);
        let inserted = with_pool!(self, |pool| {
            bind_sandbox!(sqlx::query_as::<_, SandboxRow>(INSERT), cols, 1_i64)
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

    /// One page of sandboxes, oldest first (ties broken by id, so pages are
    /// stable).
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

    pub async fn count_sandboxes(&self) -> Result<u64, StoreError> {
        let count: i64 = with_pool!(self, |pool| {
            sqlx::query_scalar(COUNT).fetch_one(pool).await
        })
        .map_err(StoreError::query("count sandboxes"))?;
        // COUNT(*) is never negative.
        Ok(count.unsigned_abs())
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
    /// Every field but `id` is written. Prefer [`Store::modify_sandbox`],
    /// which retries on [`StoreError::Conflict`].
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
        let is_unique =
            matches!(&source, sqlx::Error::Database(e) if e.kind() == ErrorKind::UniqueViolation);
        if !is_unique {
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
            Ok(true) => StoreError::NameTaken {
                name: sandbox.name.to_string(),
            },
            Ok(false) => StoreError::Query { op, source },
            Err(e) => e,
        }
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
