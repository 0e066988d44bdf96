//! Fresh, empty stores for each test, one kind per backend.

use std::env;
use std::io::Write;
use std::sync::Once;

use anyhow::Context;
use openshell_store::Store;
use sqlx::{Connection, Executor, PgConnection};

const POSTGRES_URL_VAR: &str = "OPENSHELL_TEST_POSTGRES_URL";

pub async fn sqlite_memory() -> anyhow::Result<Store> {
    Ok(Store::connect("sqlite::memory:").await?)
}

/// A store in a file in its own temp dir, removed on drop.
pub struct SqliteFile {
    pub store: Store,
    pub dir: tempfile::TempDir,
}

impl SqliteFile {
    pub async fn create() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Store::connect(&Self::url_in(&dir)).await?;
        Ok(Self { store, dir })
    }

    pub fn url_in(dir: &tempfile::TempDir) -> String {
        format!("sqlite://{}", dir.path().join("store.db").display())
    }
}

/// A store in a database of its own on the test server, so tests running in
/// parallel never see each other's rows.
pub struct Postgres {
    pub store: Store,
    database: PgDatabase,
}

impl Postgres {
    /// `None` (after a loud line on stderr) when no server is configured,
    /// unless a server is required, which fails the test instead.
    pub async fn create() -> anyhow::Result<Option<Self>> {
        let Some(database) = PgDatabase::create().await? else {
            return Ok(None);
        };
        let store = Store::connect(&database.url).await?;
        Ok(Some(Self { store, database }))
    }

    /// Runs `body` on the store, then drops the database whether the body
    /// failed, panicked or passed, and only then reports how it went.
    pub async fn run<F, Fut>(self, body: F) -> anyhow::Result<()>
    where
        F: FnOnce(Store) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        // A task of its own, so a panicking body still lets the drop run.
        let outcome = tokio::spawn(body(self.store.clone())).await;
        self.store.close().await;
        self.database.drop().await?;
        match outcome {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(e.into()),
        }
    }
}

/// An empty database of its own on the test server (no schema yet), dropped
/// by [`PgDatabase::drop`].
pub struct PgDatabase {
    pub url: String,
    server_url: String,
    database: String,
}

impl PgDatabase {
    /// `None` (after a loud line on stderr) when no server is configured,
    /// unless a server is required, which fails the test instead.
    pub async fn create() -> anyhow::Result<Option<Self>> {
        let server_url = match env::var(POSTGRES_URL_VAR) {
            Ok(url) if !url.is_empty() => url,
            _ => {
                let required = env::var_os("CI").is_some()
                    || env::var("OPENSHELL_REQUIRE_POSTGRES").as_deref() == Ok("1");
                anyhow::ensure!(
                    !required,
                    "{POSTGRES_URL_VAR} is not set, and CI or OPENSHELL_REQUIRE_POSTGRES=1 requires the Postgres store tests; run them under scripts/pg-test.sh"
                );
                // Straight to stderr, once: libtest would swallow an
                // eprintln! from a passing test, and a skip nobody sees is
                // how a backend silently goes untested.
                static SAID: Once = Once::new();
                SAID.call_once(|| {
                    let _ = writeln!(
                        std::io::stderr(),
                        "SKIP postgres store tests: {POSTGRES_URL_VAR} is not set; run scripts/pg-test.sh"
                    );
                });
                return Ok(None);
            }
        };
        let database = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server_url)
            .await
            .with_context(|| format!("connecting to {POSTGRES_URL_VAR}"))?;
        admin
            .execute(format!("CREATE DATABASE {database}").as_str())
            .await?;
        admin.close().await?;
        Ok(Some(Self {
            url: with_database(&server_url, &database),
            server_url,
            database,
        }))
    }

    /// Drops the database, closing whatever connections are left.
    pub async fn drop(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.server_url).await?;
        admin
            .execute(format!("DROP DATABASE {} WITH (FORCE)", self.database).as_str())
            .await?;
        admin.close().await?;
        Ok(())
    }
}

/// `url` with its database path replaced by `database`, query kept.
fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres URL has ://");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |i| &tail[i..]);
    format!("{scheme}://{authority}/{database}{query}")
}

#[test]
fn with_database_swaps_only_the_path() {
    assert_eq!(
        with_database("postgres://u@127.0.0.1:5/postgres?sslmode=disable", "t_1"),
        "postgres://u@127.0.0.1:5/t_1?sslmode=disable"
    );
    assert_eq!(with_database("postgresql://h", "t_2"), "postgresql://h/t_2");
    assert_eq!(
        with_database("postgres://h?x=1", "t_3"),
        "postgres://h/t_3?x=1"
    );
}
