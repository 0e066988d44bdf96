//! The one error type of the store.

use openshell_core::SandboxId;

/// Everything a store call can fail with.
///
/// `Conflict` is expected under contention (see [`StoreError::is_expected`]);
/// `NameTaken`, `RequestIdTaken`, `SlotTaken` and `NotFound` are answers
/// about the data;
/// the rest mean the database itself is unreachable, broken or changed by
/// someone else.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported store URL {url:?}: use sqlite::memory:, sqlite:PATH, sqlite://PATH, postgres://... or postgresql://..."
    )]
    UnsupportedUrl { url: String },

    #[error("cannot open the store at {url}")]
    Connect {
        /// The URL with any password replaced by `***`.
        url: String,
        #[source]
        source: sqlx::Error,
    },

    #[error("cannot bring the store schema up to date")]
    Migrate {
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    #[error("store query failed: {op}")]
    Query {
        /// What the store was doing, e.g. "insert sandbox".
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },

    #[error("a sandbox named {name:?} already exists")]
    NameTaken { name: String },

    #[error("a sandbox with request_id {request_id:?} already exists")]
    RequestIdTaken { request_id: String },

    /// Another stored sandbox holds this uid slot; the caller picks another.
    #[error("uid slot {slot} is held by another sandbox")]
    SlotTaken { slot: u32 },

    #[error("sandbox {id} was changed by someone else (expected revision {expected_revision})")]
    Conflict {
        id: SandboxId,
        expected_revision: i64,
    },

    #[error("sandbox {id} does not exist")]
    NotFound { id: SandboxId },

    /// A stored value does not parse. Only a change made outside the gateway
    /// (or a schema bug) can cause this.
    #[error("stored record {id} has an unreadable {column} column")]
    Corrupt {
        /// The sandbox id or plugin name, as stored.
        id: String,
        column: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// Contention, not failure: the caller reloads and tries again.
    pub fn is_expected(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    pub(crate) fn query(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Query { op, source }
    }
}
