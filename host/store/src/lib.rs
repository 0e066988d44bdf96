//! The gateway's durable records: sandboxes and loaded plugins, in SQLite by
//! default or in Postgres when given a `postgres://` URL.
//!
//! Start at [`Store::connect`], then [`Store::modify_sandbox`]: every change
//! to a stored sandbox is a compare-and-swap on its `revision`, and
//! `modify_sandbox` is the load-change-swap-retry loop callers should use.
//! Sandbox queries live in `sandboxes.rs`, plugin queries in `plugins.rs`, the
//! schema in `migrations/<backend>/`.
//!
//! One set of SQL strings serves both backends: both accept `$1` placeholders
//! (sqlx-sqlite binds `$N` by number) and `INSERT ... ON CONFLICT`. What
//! differs is only the Rust types sqlx uses per backend, which `with_pool!`
//! papers over by compiling each query body once per backend.

mod error;
mod plugins;
mod sandboxes;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

pub use error::StoreError;
pub use plugins::PluginRecord;
pub use sandboxes::PageKey;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// How long a SQLite connection waits for another writer before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on the store. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to this store's pool. The body is written
/// once and compiled once per backend, because sqlx's row and argument types
/// differ per backend even where the SQL is the same.
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

impl Store {
    /// Opens the store at `url` and brings its schema up to date.
    ///
    /// Accepted forms: `sqlite::memory:` (a private database that lives as
    /// long as this `Store`), `sqlite:PATH` or `sqlite://PATH` (created if
    /// missing), and `postgres://...` or `postgresql://...`.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: redact(url),
            source,
        };
        let pool = if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let options = SqliteConnectOptions::from_str(url).map_err(connect_error)?;
            let pool = if is_sqlite_memory(path) {
                // Every connection to `:memory:` would see its own empty
                // database, and the database vanishes when its last
                // connection closes. So: exactly one connection, never
                // recycled. Writers queue on the pool instead of on SQLite.
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_with(options)
                    .await
            } else {
                // WAL lets readers run beside the one writer; the busy
                // timeout makes writers wait for each other instead of
                // failing. `synchronous` stays at its FULL default: these
                // records are the source of truth, so durability beats speed.
                SqlitePoolOptions::new()
                    .connect_with(
                        options
                            .create_if_missing(true)
                            .journal_mode(SqliteJournalMode::Wal)
                            .busy_timeout(SQLITE_BUSY_TIMEOUT),
                    )
                    .await
            }
            .map_err(connect_error)?;
            SQLITE_MIGRATIONS
                .run(&pool)
                .await
                .map_err(|source| StoreError::Migrate { source })?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .connect(url)
                .await
                .map_err(connect_error)?;
            POSTGRES_MIGRATIONS
                .run(&pool)
                .await
                .map_err(|source| StoreError::Migrate { source })?;
            Pool::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl { url: redact(url) });
        };
        Ok(Store { pool })
    }

    /// Closes every connection, waiting for queries in flight. Calls made
    /// after this fail. An in-memory database is gone once closed.
    pub async fn close(&self) {
        with_pool!(self, |pool| pool.close().await)
    }

    /// `"sqlite"` or `"postgres"`, for logs.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish()
    }
}

/// `path` is the URL after its `sqlite:` or `sqlite://` prefix.
fn is_sqlite_memory(path: &str) -> bool {
    let (file, params) = path.split_once('?').unwrap_or((path, ""));
    file == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}

/// The URL with the password (if any) replaced by `***`, safe to log.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://app:s3cr3t@db:5432/openshell?sslmode=disable"),
            "postgres://app:***@db:5432/openshell?sslmode=disable"
        );
        assert_eq!(
            redact("postgres://app@db/openshell"),
            "postgres://app@db/openshell"
        );
        assert_eq!(redact("sqlite:/var/lib/x.db"), "sqlite:/var/lib/x.db");
        assert_eq!(redact("mysql://u:p@h/d"), "mysql://u:***@h/d");
    }

    #[test]
    fn in_memory_sqlite_urls_are_recognised() {
        assert!(is_sqlite_memory(":memory:"));
        assert!(is_sqlite_memory("file.db?mode=memory"));
        assert!(is_sqlite_memory("x?cache=shared&mode=memory"));
        assert!(!is_sqlite_memory("/tmp/memory.db"));
        assert!(!is_sqlite_memory("/tmp/x.db?mode=rwc"));
    }
}
