//! What only SQLite has: in-memory databases and files on disk.

use anyhow::Context;
use openshell_store::{PluginRecord, Store, StoreError};

use crate::backend::SqliteFile;
use crate::suite::sandbox;

#[tokio::test]
async fn a_file_database_keeps_its_records_across_a_reopen() -> anyhow::Result<()> {
    let db = SqliteFile::create().await?;
    let mut s = sandbox("durable");
    s.request_id = Some("r".into());
    let s = db.store.insert_sandbox(&s).await?;
    db.store.set_secret_hash(s.id, Some("h")).await?;
    let plugin = PluginRecord {
        name: "vm".into(),
        digest: "sha256:aa".into(),
        version: "1".into(),
        grants: vec!["g".into()],
        wasm_path: "/p/vm.wasm".into(),
        loaded_at_ms: 5,
    };
    db.store.upsert_plugin(&plugin).await?;
    db.store.close().await;

    // Reopening also re-runs the migrations, which must find nothing to do.
    let reopened = Store::connect(&SqliteFile::url_in(&db.dir)).await?;
    assert_eq!(reopened.get_sandbox(s.id).await?, Some(s.clone()));
    assert_eq!(reopened.get_secret_hash(s.id).await?.as_deref(), Some("h"));
    assert_eq!(reopened.list_plugins().await?, vec![plugin]);
    Ok(())
}

#[tokio::test]
async fn a_missing_database_file_is_created() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("new.db");
    let store = Store::connect(&format!("sqlite:{}", path.display())).await?;
    assert_eq!(store.count_sandboxes().await?, 0);
    assert!(path.exists());
    Ok(())
}

#[tokio::test]
async fn each_in_memory_store_is_a_database_of_its_own() -> anyhow::Result<()> {
    let a = Store::connect("sqlite::memory:").await?;
    let b = Store::connect("sqlite::memory:").await?;
    a.insert_sandbox(&sandbox("only-in-a")).await?;
    assert_eq!(a.count_sandboxes().await?, 1);
    assert_eq!(b.count_sandboxes().await?, 0);
    Ok(())
}

#[tokio::test]
async fn a_corrupt_stored_spec_is_reported_not_hidden() -> anyhow::Result<()> {
    let db = SqliteFile::create().await?;
    let s = db.store.insert_sandbox(&sandbox("mangled")).await?;

    // Someone edits the database by hand.
    let raw = sqlx::SqlitePool::connect(&SqliteFile::url_in(&db.dir)).await?;
    sqlx::query("UPDATE sandboxes SET spec = '{not json' WHERE id = $1")
        .bind(s.id.to_string())
        .execute(&raw)
        .await?;
    raw.close().await;

    let err = db.store.get_sandbox(s.id).await.unwrap_err();
    match &err {
        StoreError::Corrupt { id, column, .. } => {
            assert_eq!(id, &s.id.to_string());
            assert_eq!(*column, "spec");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let source = std::error::Error::source(&err).context("Corrupt keeps its cause")?;
    assert!(source.is::<serde_json::Error>(), "{source:?}");
    assert!(db.store.list_sandboxes(10, 0).await.is_err());
    Ok(())
}
