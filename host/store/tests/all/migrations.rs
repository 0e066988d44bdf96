//! Schema migrations keep every record: a database written by the store at
//! schema 0001 (`fixtures/<backend>_0001.sql`, the rows of
//! `migrations/records.rs`) is opened by today's store, migrated, and read
//! back unchanged, on SQLite and on Postgres.
//!
//! Two checks, because they catch different losses: the store must return
//! exactly the records the old store was given (a column dropped, retyped or
//! rewritten shows up as a changed or unreadable record), and every old
//! column must hold the same bytes as before (which also covers `driver`,
//! `phase` and `secret_hash`, which no record read returns).

mod records;

use std::path::Path;

use anyhow::Context;
use openshell_store::{PageKey, Store};
use sqlx::{AnyPool, Executor};

use crate::backend::{PgDatabase, SqliteFile};

const SQLITE_FIXTURE: &str = include_str!("fixtures/sqlite_0001.sql");
const POSTGRES_FIXTURE: &str = include_str!("fixtures/postgres_0001.sql");

/// Every column of schema 0001, read the same way before and after.
type OldColumns = (
    String,         // id
    String,         // name
    Option<String>, // request_id
    String,         // driver
    String,         // spec
    String,         // phase
    String,         // status
    Vec<u8>,        // driver_state
    Option<String>, // secret_hash
    i64,            // revision
    i64,            // created_at_ms
    i64,            // updated_at_ms
);
const SELECT_OLD_COLUMNS: &str = "SELECT id, name, request_id, driver, spec, phase, status, \
     driver_state, secret_hash, revision, created_at_ms, updated_at_ms FROM sandboxes ORDER BY id";
type OldPlugin = (String, String, String, String, String, i64);
const SELECT_OLD_PLUGINS: &str =
    "SELECT name, digest, version, grants, wasm_path, loaded_at_ms FROM plugins ORDER BY name";

#[tokio::test]
async fn a_sqlite_database_from_schema_0001_migrates_without_losing_a_record() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let url = SqliteFile::url_in(&dir);
    // `mode=rwc` creates the file; the store opens it later as it would any.
    let raw_url = format!("{url}?mode=rwc");
    migrates_without_loss(&raw_url, &url, "sqlite", SQLITE_FIXTURE).await
}

#[tokio::test]
async fn a_postgres_database_from_schema_0001_migrates_without_losing_a_record()
-> anyhow::Result<()> {
    let Some(db) = PgDatabase::create().await? else {
        return Ok(());
    };
    let url = db.url.clone();
    // A task of its own, so the database is dropped even if an assertion panics.
    let outcome = tokio::spawn(async move {
        migrates_without_loss(&url, &url, "postgres", POSTGRES_FIXTURE).await
    })
    .await;
    db.drop().await?;
    match outcome {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(e.into()),
    }
}

/// Brings an empty database at `raw_url` to schema 0001 exactly as the old
/// store did (the same migration file, so the same checksum in
/// `_sqlx_migrations`), loads `fixture`, then opens it with [`Store`] at
/// `store_url` and checks nothing was lost.
async fn migrates_without_loss(
    raw_url: &str,
    store_url: &str,
    backend: &str,
    fixture: &str,
) -> anyhow::Result<()> {
    sqlx::any::install_default_drivers();
    let raw = AnyPool::connect(raw_url).await?;
    schema_0001(backend).await?.run(&raw).await?;
    raw.execute(sqlx::raw_sql(fixture))
        .await
        .context("loading the fixture")?;
    let before: Vec<OldColumns> = sqlx::query_as(SELECT_OLD_COLUMNS).fetch_all(&raw).await?;
    let plugins_before: Vec<OldPlugin> = sqlx::query_as(SELECT_OLD_PLUGINS).fetch_all(&raw).await?;
    let expected = records::sandboxes();
    assert_eq!(
        before.len(),
        expected.len(),
        "the fixture holds every record"
    );
    raw.close().await;

    let store = Store::connect(store_url).await.context("migrating")?;

    // The records read back as the old store was given them, with no slot.
    let mut want: Vec<_> = expected.iter().map(|r| r.sandbox.clone()).collect();
    for s in &mut want {
        s.uid_slot = None;
    }
    want.sort_by_key(|s| (s.created_at_ms, s.id.to_string()));
    let mut walked = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_sandboxes_after(after.as_ref(), 2).await?;
        let Some(last) = page.last() else { break };
        after = Some(PageKey::after(last));
        walked.extend(page);
    }
    assert_eq!(walked, want);
    for r in &expected {
        let id = r.sandbox.id;
        let got = store.get_sandbox(id).await?.context("a record vanished")?;
        assert_eq!(got.uid_slot, None, "{id}");
        assert_eq!(
            store.get_secret_hash(id).await?.as_deref(),
            r.secret_hash,
            "{id}"
        );
    }
    // Rows from before activity was recorded have none: their idle clock
    // starts at their creation; their specs read back with no lifetimes.
    assert!(store.last_active().await?.is_empty());
    assert!(walked.iter().all(|s| s.spec.lifetime.is_unset()));
    let mut plugins = records::plugins();
    plugins.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(store.list_plugins().await?, plugins);

    store.close().await;

    // Byte for byte, the old columns are as they were.
    let raw = AnyPool::connect(raw_url).await?;
    let after_migration: Vec<OldColumns> =
        sqlx::query_as(SELECT_OLD_COLUMNS).fetch_all(&raw).await?;
    assert_eq!(after_migration, before);
    let plugins_after: Vec<OldPlugin> = sqlx::query_as(SELECT_OLD_PLUGINS).fetch_all(&raw).await?;
    assert_eq!(plugins_after, plugins_before);
    raw.close().await;

    // Reopened (the migrations find nothing to do), a migrated record takes
    // a slot like any other.
    let store = Store::connect(store_url).await.context("reopening")?;
    let filled = store.set_uid_slot_if_null(want[0].id, 0).await?;
    assert_eq!(filled.uid_slot, Some(0));
    assert_eq!(filled.revision, want[0].revision + 1);
    store.close().await;
    Ok(())
}

/// A migrator that knows only `0001_init.sql` of `backend`, as the old store
/// did: the file is copied unchanged, so its checksum is the one the new
/// store expects to find applied.
async fn schema_0001(backend: &str) -> anyhow::Result<sqlx::migrate::Migrator> {
    let dir = tempfile::tempdir()?;
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend)
        .join("0001_init.sql");
    std::fs::copy(&source, dir.path().join("0001_init.sql"))
        .with_context(|| format!("copying {}", source.display()))?;
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await?;
    anyhow::ensure!(
        migrator.iter().map(|m| m.version).eq([1]),
        "only 0001 is applied"
    );
    Ok(migrator)
}
