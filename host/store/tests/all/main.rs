//! The store's integration tests: one suite (`suite.rs`), run against every
//! backend by `store_tests!`, plus the few tests that are about one backend.
//!
//! Postgres needs a server: `scripts/pg-test.sh cargo test -p openshell-store`
//! starts a throwaway one. Without `OPENSHELL_TEST_POSTGRES_URL` the Postgres
//! tests say so loudly and pass, except under CI (`CI` set) or with
//! `OPENSHELL_REQUIRE_POSTGRES=1`, where they fail.

mod backend;
mod migrations;
mod sqlite;
mod suite;

/// One `#[tokio::test]` per suite body and backend, named
/// `<backend>::<body>`. Multi-threaded so concurrent tests really race.
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let store = crate::backend::sqlite_memory().await?;
                    crate::suite::$name(&store).await
                }
            )*
        }

        mod sqlite_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let db = crate::backend::SqliteFile::create().await?;
                    crate::suite::$name(&db.store).await
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let Some(db) = crate::backend::Postgres::create().await? else {
                        return Ok(());
                    };
                    db.run(|store| async move { crate::suite::$name(&store).await })
                        .await
                }
            )*
        }
    };
}

store_tests!(
    insert_then_get_round_trips_every_field,
    a_taken_name_is_rejected_and_the_store_is_unchanged,
    a_taken_request_id_is_rejected_and_wins_over_a_taken_name,
    unknown_sandboxes_are_absent_everywhere,
    lists_page_oldest_first_with_ties_broken_by_id,
    listing_by_driver_returns_only_that_drivers_sandboxes,
    a_stale_update_conflicts_and_changes_nothing,
    an_update_writes_every_field_and_bumps_the_revision,
    an_update_onto_a_taken_name_is_rejected,
    concurrent_modifies_lose_no_update,
    a_modify_that_declines_writes_nothing,
    a_modify_cannot_redirect_or_rewind_the_swap,
    deleted_sandboxes_are_gone,
    plugins_can_be_upserted_listed_and_deleted,
    the_secret_hash_is_kept_apart_from_the_sandbox,
    paging_by_key_sees_every_surviving_row_once_while_rows_are_deleted,
    counting_by_driver_counts_and_names_the_oldest,
    a_taken_uid_slot_is_rejected_and_the_store_is_unchanged,
    many_sandboxes_may_have_no_uid_slot,
    a_uid_slot_is_kept_by_updates_and_freed_only_by_delete,
    a_record_without_a_uid_slot_can_be_backfilled_once,
    activity_is_recorded_forward_only_and_is_not_part_of_the_record,
);

#[tokio::test]
async fn unsupported_urls_are_rejected_naming_the_accepted_forms() {
    for url in [
        "",
        "/var/lib/openshell.db",
        "mysql://u:hunter2@h/d",
        "http://x",
    ] {
        let err = openshell_store::Store::connect(url).await.unwrap_err();
        assert!(
            matches!(err, openshell_store::StoreError::UnsupportedUrl { .. }),
            "{url}: {err:?}"
        );
        let message = err.to_string();
        for form in ["sqlite::memory:", "sqlite:PATH", "postgres://"] {
            assert!(message.contains(form), "{message}");
        }
        assert!(!message.contains("hunter2"), "{message}");
    }
}
