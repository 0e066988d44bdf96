//! The store's behaviour, written once and run against every backend (see
//! `store_tests!` in `main.rs`). Each body gets a fresh, empty store.

use std::collections::BTreeMap;

use anyhow::Context;
use openshell_core::{
    Event, Resources, Sandbox, SandboxId, SandboxName, SandboxSpec, Status, apply,
};
use openshell_store::{PageKey, PluginRecord, Store, StoreError};

/// A sandbox with every field set to something other than its default, but
/// for `uid_slot`: a slot is unique, so tests that want one set it.
pub fn sandbox(name: &str) -> Sandbox {
    let spec = SandboxSpec {
        driver: "process".into(),
        environment: BTreeMap::from([
            ("HOME".into(), "/home/agent".into()),
            ("GREETING".into(), "héllo \"wörld\"\n".into()),
        ]),
        resources: Resources {
            vcpus: 2,
            memory_mib: 512,
            max_processes: 64,
            disk_gib: 3,
        },
        // The digest a create resolved round-trips with the record.
        image: Some(openshell_core::SandboxImage {
            reference: "docker.io/library/python:3.12".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
        }),
        lifetime: openshell_core::Lifetime {
            ttl_secs: 7_200,
            idle_timeout_secs: 1_800,
        },
        policy: Some(openshell_core::StoredPolicy {
            yaml: "version: 1\nnetwork_policies: {}\n".into(),
            revision: 3,
            source: openshell_core::PolicySource::Set,
        }),
    };
    let mut s = Sandbox::new(SandboxName::parse(name).unwrap(), spec, None, 1_000);
    s.status = apply(
        &Status::provisioning(1_000),
        &Event::DriverStarting {
            message: "booting".into(),
        },
        1_500,
    )
    .unwrap();
    s.driver_state = (0..=255).collect();
    s.updated_at_ms = 1_500;
    s
}

fn counter(s: &Sandbox) -> u64 {
    s.spec
        .environment
        .get("N")
        .map_or(0, |n| n.parse().unwrap())
}

pub async fn insert_then_get_round_trips_every_field(store: &Store) -> anyhow::Result<()> {
    let mut s = sandbox("round-trip");
    s.request_id = Some("req-1".into());
    s.uid_slot = Some(u32::MAX);
    s.revision = 42; // ignored: a new record starts at 1

    let stored = store.insert_sandbox(&s).await?;
    let expected = Sandbox { revision: 1, ..s };
    assert_eq!(stored, expected);
    assert_eq!(
        store.get_sandbox(expected.id).await?.as_ref(),
        Some(&expected)
    );
    assert_eq!(
        store.get_sandbox_by_name("round-trip").await?.as_ref(),
        Some(&expected)
    );
    assert_eq!(
        store.get_sandbox_by_request_id("req-1").await?.as_ref(),
        Some(&expected)
    );

    // The empty and absent forms round-trip too.
    let mut bare = sandbox("bare");
    bare.driver_state.clear();
    bare.spec = SandboxSpec::default();
    let bare = store.insert_sandbox(&bare).await?;
    assert_eq!(store.get_sandbox(bare.id).await?, Some(bare));
    Ok(())
}

pub async fn a_taken_name_is_rejected_and_the_store_is_unchanged(
    store: &Store,
) -> anyhow::Result<()> {
    let first = store.insert_sandbox(&sandbox("taken")).await?;
    let mut second = sandbox("taken");
    second.request_id = Some("other".into());

    let err = store.insert_sandbox(&second).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken { name } if name == "taken"),
        "{err:?}"
    );
    assert_eq!(store.count_sandboxes().await?, 1);
    assert_eq!(store.get_sandbox(second.id).await?, None);
    assert_eq!(store.get_sandbox_by_request_id("other").await?, None);
    assert_eq!(store.get_sandbox_by_name("taken").await?, Some(first));
    Ok(())
}

pub async fn a_taken_request_id_is_rejected_and_wins_over_a_taken_name(
    store: &Store,
) -> anyhow::Result<()> {
    let mut first = sandbox("first");
    first.request_id = Some("req".into());
    let first = store.insert_sandbox(&first).await?;

    let mut retry = sandbox("second");
    retry.request_id = Some("req".into());
    let err = store.insert_sandbox(&retry).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::RequestIdTaken { request_id } if request_id == "req"),
        "{err:?}"
    );

    // Both taken: it is a retried create, so say so.
    let mut same = sandbox("first");
    same.request_id = Some("req".into());
    let err = store.insert_sandbox(&same).await.unwrap_err();
    assert!(matches!(err, StoreError::RequestIdTaken { .. }), "{err:?}");

    assert_eq!(store.list_sandboxes(10, 0).await?, vec![first]);
    Ok(())
}

pub async fn unknown_sandboxes_are_absent_everywhere(store: &Store) -> anyhow::Result<()> {
    store.insert_sandbox(&sandbox("known")).await?;
    let ghost = sandbox("ghost");

    assert_eq!(store.get_sandbox(ghost.id).await?, None);
    assert_eq!(store.get_sandbox_by_name("ghost").await?, None);
    assert_eq!(store.get_sandbox_by_request_id("ghost").await?, None);
    assert_eq!(store.get_secret_hash(ghost.id).await?, None);
    assert!(!store.delete_sandbox(ghost.id).await?);
    assert_eq!(store.modify_sandbox(ghost.id, |_| true).await?, None);

    let err = store.update_sandbox(&ghost).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { id } if id == ghost.id),
        "{err:?}"
    );
    let err = store
        .set_secret_hash(ghost.id, Some("h"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    Ok(())
}

pub async fn lists_page_oldest_first_with_ties_broken_by_id(store: &Store) -> anyhow::Result<()> {
    let mut inserted = Vec::new();
    // Created out of order, with pairs sharing a timestamp.
    for (i, created) in [30, 10, 20, 10, 30, 20, 40].into_iter().enumerate() {
        let mut s = sandbox(&format!("s{i}"));
        s.created_at_ms = created;
        inserted.push(store.insert_sandbox(&s).await?);
    }
    inserted.sort_by_key(|s| (s.created_at_ms, s.id.to_string()));

    assert_eq!(store.count_sandboxes().await?, 7);
    assert_eq!(store.list_sandboxes(100, 0).await?, inserted);
    assert_eq!(store.list_sandboxes(3, 0).await?, inserted[0..3]);
    assert_eq!(store.list_sandboxes(3, 3).await?, inserted[3..6]);
    assert_eq!(store.list_sandboxes(3, 6).await?, inserted[6..]);
    assert_eq!(store.list_sandboxes(3, 7).await?, []);
    assert_eq!(store.list_sandboxes(0, 0).await?, []);

    // The same pages by key.
    let first = store.list_sandboxes_after(None, 3).await?;
    assert_eq!(first, inserted[0..3]);
    let second = store
        .list_sandboxes_after(Some(&PageKey::after(&first[2])), 3)
        .await?;
    assert_eq!(second, inserted[3..6]);
    let third = store
        .list_sandboxes_after(Some(&PageKey::after(&second[2])), 3)
        .await?;
    assert_eq!(third, inserted[6..]);
    let past_end = store
        .list_sandboxes_after(Some(&PageKey::after(&third[0])), 3)
        .await?;
    assert_eq!(past_end, []);
    assert_eq!(store.list_sandboxes_after(None, 100).await?, inserted);
    assert_eq!(store.list_sandboxes_after(None, 0).await?, []);
    // A key need not be a stored row: it is a position in the order.
    let between = PageKey {
        created_at_ms: 20,
        id: SandboxId(uuid::Uuid::nil()),
    };
    assert_eq!(
        store.list_sandboxes_after(Some(&between), 100).await?,
        inserted[2..]
    );
    Ok(())
}

pub async fn listing_by_driver_returns_only_that_drivers_sandboxes(
    store: &Store,
) -> anyhow::Result<()> {
    let mut vm = Vec::new();
    for (i, driver) in ["vm", "process", "vm", "process", "vm"]
        .into_iter()
        .enumerate()
    {
        let mut s = sandbox(&format!("d{i}"));
        s.spec.driver = driver.into();
        s.created_at_ms = i64::try_from(i)?;
        let s = store.insert_sandbox(&s).await?;
        if driver == "vm" {
            vm.push(s);
        }
    }
    assert_eq!(store.list_sandboxes_by_driver("vm").await?, vm);
    assert_eq!(store.list_sandboxes_by_driver("process").await?.len(), 2);
    assert_eq!(store.list_sandboxes_by_driver("nope").await?, []);
    Ok(())
}

pub async fn counting_by_driver_counts_and_names_the_oldest(store: &Store) -> anyhow::Result<()> {
    assert_eq!(store.count_sandboxes_by_driver("vm").await?, 0);
    assert_eq!(store.first_sandbox_name_by_driver("vm").await?, None);
    for (i, (driver, created)) in [("vm", 30), ("process", 5), ("vm", 10), ("vm", 20)]
        .into_iter()
        .enumerate()
    {
        let mut s = sandbox(&format!("c{i}"));
        s.spec.driver = driver.into();
        s.created_at_ms = created;
        store.insert_sandbox(&s).await?;
    }
    assert_eq!(store.count_sandboxes_by_driver("vm").await?, 3);
    assert_eq!(store.count_sandboxes_by_driver("process").await?, 1);
    assert_eq!(store.count_sandboxes_by_driver("nope").await?, 0);
    assert_eq!(
        store.first_sandbox_name_by_driver("vm").await?,
        Some(SandboxName::parse("c2")?)
    );
    assert_eq!(store.first_sandbox_name_by_driver("nope").await?, None);
    Ok(())
}

pub async fn a_stale_update_conflicts_and_changes_nothing(store: &Store) -> anyhow::Result<()> {
    let v1 = store.insert_sandbox(&sandbox("cas")).await?;

    let mut fresh = v1.clone();
    fresh.driver_state = b"first".to_vec();
    let v2 = store.update_sandbox(&fresh).await?;
    assert_eq!(v2.revision, 2);

    let mut stale = v1.clone();
    stale.driver_state = b"second".to_vec();
    let err = store.update_sandbox(&stale).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { id, expected_revision: 1 } if id == v1.id),
        "{err:?}"
    );
    assert!(err.is_expected());
    assert_eq!(store.get_sandbox(v1.id).await?, Some(v2));
    Ok(())
}

pub async fn an_update_writes_every_field_and_bumps_the_revision(
    store: &Store,
) -> anyhow::Result<()> {
    let mut v1 = sandbox("before");
    v1.request_id = Some("r1".into());
    let v1 = store.insert_sandbox(&v1).await?;

    let mut next = v1.clone();
    next.name = SandboxName::parse("after")?;
    next.request_id = None;
    next.spec.driver = "vm".into();
    next.spec.environment.insert("EXTRA".into(), "1".into());
    next.spec.resources.vcpus = 8;
    next.status = apply(&v1.status, &Event::SupervisorConnected, 2_000)?;
    next.driver_state = vec![0, 1, 2];
    next.created_at_ms = 900;
    next.updated_at_ms = 2_000;

    let v2 = store.update_sandbox(&next).await?;
    let expected = Sandbox {
        revision: 2,
        ..next
    };
    assert_eq!(v2, expected);
    assert_eq!(store.get_sandbox(v1.id).await?.as_ref(), Some(&expected));
    assert_eq!(store.get_sandbox_by_name("before").await?, None);
    assert_eq!(store.get_sandbox_by_request_id("r1").await?, None);
    assert_eq!(store.list_sandboxes_by_driver("vm").await?, vec![expected]);
    Ok(())
}

pub async fn an_update_onto_a_taken_name_is_rejected(store: &Store) -> anyhow::Result<()> {
    store.insert_sandbox(&sandbox("one")).await?;
    let mut two = sandbox("two");
    two.request_id = Some("r2".into());
    let two = store.insert_sandbox(&two).await?;
    let mut three = sandbox("three");
    three.request_id = Some("r3".into());
    store.insert_sandbox(&three).await?;

    let mut renamed = two.clone();
    renamed.name = SandboxName::parse("one")?;
    let err = store.update_sandbox(&renamed).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken { name } if name == "one"),
        "{err:?}"
    );

    let mut moved = two.clone();
    moved.request_id = Some("r3".into());
    let err = store.update_sandbox(&moved).await.unwrap_err();
    assert!(matches!(err, StoreError::RequestIdTaken { .. }), "{err:?}");

    assert_eq!(store.get_sandbox(two.id).await?, Some(two));
    Ok(())
}

pub async fn concurrent_modifies_lose_no_update(store: &Store) -> anyhow::Result<()> {
    const WRITERS: u64 = 200;
    let id = store.insert_sandbox(&sandbox("counter")).await?.id;

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .modify_sandbox(id, |s| {
                    let n = counter(s) + 1;
                    s.spec.environment.insert("N".into(), n.to_string());
                    true
                })
                .await
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined?
            .context("modify_sandbox")?
            .context("sandbox vanished")?;
    }

    let last = store.get_sandbox(id).await?.context("sandbox vanished")?;
    assert_eq!(counter(&last), WRITERS);
    assert_eq!(last.revision, 1 + i64::try_from(WRITERS)?);
    Ok(())
}

pub async fn a_modify_that_declines_writes_nothing(store: &Store) -> anyhow::Result<()> {
    let v1 = store.insert_sandbox(&sandbox("steady")).await?;
    let seen = store
        .modify_sandbox(v1.id, |s| {
            s.driver_state = b"scribbled".to_vec();
            false
        })
        .await?;
    assert_eq!(seen.as_ref(), Some(&v1));
    assert_eq!(store.get_sandbox(v1.id).await?, Some(v1));
    Ok(())
}

pub async fn a_modify_cannot_redirect_or_rewind_the_swap(store: &Store) -> anyhow::Result<()> {
    let target = store.insert_sandbox(&sandbox("target")).await?;
    let bystander = store.insert_sandbox(&sandbox("bystander")).await?;

    let stored = store
        .modify_sandbox(target.id, |s| {
            s.id = bystander.id;
            s.revision = 99;
            s.driver_state = b"changed".to_vec();
            true
        })
        .await?
        .context("target vanished")?;
    assert_eq!(stored.id, target.id);
    assert_eq!(stored.revision, 2);
    assert_eq!(stored.driver_state, b"changed");
    assert_eq!(store.get_sandbox(bystander.id).await?, Some(bystander));
    Ok(())
}

pub async fn deleted_sandboxes_are_gone(store: &Store) -> anyhow::Result<()> {
    let mut s = sandbox("doomed");
    s.request_id = Some("r".into());
    let s = store.insert_sandbox(&s).await?;
    let kept = store.insert_sandbox(&sandbox("kept")).await?;

    assert!(store.delete_sandbox(s.id).await?);
    assert!(!store.delete_sandbox(s.id).await?);
    assert_eq!(store.get_sandbox(s.id).await?, None);
    assert_eq!(store.get_sandbox_by_name("doomed").await?, None);
    assert_eq!(store.get_sandbox_by_request_id("r").await?, None);
    assert_eq!(store.list_sandboxes(10, 0).await?, vec![kept]);

    // The name and request_id are free again.
    let mut again = sandbox("doomed");
    again.request_id = Some("r".into());
    store.insert_sandbox(&again).await?;
    Ok(())
}

pub async fn activity_is_recorded_forward_only_and_is_not_part_of_the_record(
    store: &Store,
) -> anyhow::Result<()> {
    let s = store.insert_sandbox(&sandbox("busy")).await?;
    assert!(store.last_active().await?.is_empty(), "none recorded yet");
    store.record_activity(s.id, 5_000).await?;
    store.record_activity(s.id, 4_000).await?;
    assert_eq!(
        store.last_active().await?.get(&s.id),
        Some(&5_000),
        "never moves back"
    );
    store.record_activity(s.id, 6_000).await?;
    assert_eq!(store.last_active().await?.get(&s.id), Some(&6_000));
    // The record, its revision included, is untouched.
    assert_eq!(store.get_sandbox(s.id).await?, Some(s.clone()));
    // An update of the record leaves the activity alone.
    store
        .modify_sandbox(s.id, |sb| {
            sb.updated_at_ms += 1;
            true
        })
        .await?;
    assert_eq!(store.last_active().await?.get(&s.id), Some(&6_000));
    // A sandbox that is gone is not an error, and its activity goes with it.
    assert!(store.delete_sandbox(s.id).await?);
    store.record_activity(s.id, 7_000).await?;
    assert!(store.last_active().await?.is_empty());
    Ok(())
}

pub async fn plugins_can_be_upserted_listed_and_deleted(store: &Store) -> anyhow::Result<()> {
    let vm = PluginRecord {
        name: "vm".into(),
        digest: "sha256:aa".into(),
        version: "0.1.0".into(),
        grants: vec!["openshell:compute/vm@0.1.0".into(), "wasi:clocks".into()],
        wasm_path: "/var/lib/openshell/plugins/vm.wasm".into(),
        loaded_at_ms: 1_000,
    };
    let process = PluginRecord {
        name: "process".into(),
        grants: vec![],
        ..vm.clone()
    };
    assert_eq!(store.get_plugin("vm").await?, None);
    store.upsert_plugin(&vm).await?;
    store.upsert_plugin(&process).await?;
    assert_eq!(store.get_plugin("vm").await?.as_ref(), Some(&vm));
    assert_eq!(
        store.list_plugins().await?,
        vec![process.clone(), vm.clone()]
    );

    let upgraded = PluginRecord {
        digest: "sha256:bb".into(),
        version: "0.2.0".into(),
        grants: vec!["wasi:clocks".into()],
        wasm_path: "/elsewhere/vm.wasm".into(),
        loaded_at_ms: 2_000,
        ..vm.clone()
    };
    store.upsert_plugin(&upgraded).await?;
    assert_eq!(store.get_plugin("vm").await?.as_ref(), Some(&upgraded));
    assert_eq!(store.list_plugins().await?.len(), 2);

    assert!(store.delete_plugin("vm").await?);
    assert!(!store.delete_plugin("vm").await?);
    assert_eq!(store.get_plugin("vm").await?, None);
    assert_eq!(store.list_plugins().await?, vec![process]);
    Ok(())
}

pub async fn the_secret_hash_is_kept_apart_from_the_sandbox(store: &Store) -> anyhow::Result<()> {
    const HASH: &str = "argon2id$v=19$SECRET-HASH-MARKER";
    let s = store.insert_sandbox(&sandbox("secretive")).await?;
    assert_eq!(store.get_secret_hash(s.id).await?, None);

    store.set_secret_hash(s.id, Some(HASH)).await?;
    assert_eq!(store.get_secret_hash(s.id).await?.as_deref(), Some(HASH));

    // Not part of the record: no revision bump, and nowhere in what reads return.
    let read = store.get_sandbox(s.id).await?.context("vanished")?;
    assert_eq!(read, s);
    let every_read = [
        format!("{read:?}"),
        format!("{:?}", store.get_sandbox_by_name("secretive").await?),
        format!("{:?}", store.list_sandboxes(10, 0).await?),
        format!("{:?}", store.list_sandboxes_by_driver("process").await?),
    ];
    for text in every_read {
        assert!(!text.contains("SECRET-HASH-MARKER"), "{text}");
    }

    // Writing the record leaves the hash alone.
    store
        .modify_sandbox(s.id, |s| {
            s.driver_state.push(1);
            true
        })
        .await?;
    assert_eq!(store.get_secret_hash(s.id).await?.as_deref(), Some(HASH));

    store.set_secret_hash(s.id, None).await?;
    assert_eq!(store.get_secret_hash(s.id).await?, None);

    let other = SandboxId::new();
    assert_eq!(store.get_secret_hash(other).await?, None);
    Ok(())
}

/// Issue 12, bug 5: recovery deletes rows (finished deletes) while it pages,
/// and an offset then skips rows that moved up past it.
pub async fn paging_by_key_sees_every_surviving_row_once_while_rows_are_deleted(
    store: &Store,
) -> anyhow::Result<()> {
    const PAGE: u32 = 3;
    let mut inserted = Vec::new();
    // Four pages' worth, with timestamp ties so the id breaks them.
    for i in 0..11 {
        let mut s = sandbox(&format!("p{i}"));
        s.created_at_ms = i / 2;
        inserted.push(store.insert_sandbox(&s).await?);
    }
    inserted.sort_by_key(|s| (s.created_at_ms, s.id.to_string()));
    let ids: Vec<SandboxId> = inserted.iter().map(|s| s.id).collect();
    // Deleted before paging reaches them: never seen, and that is fine.
    let doomed_unseen = [ids[7], ids[10]];

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = store.list_sandboxes_after(after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(PageKey::after(last));
        pages += 1;
        // Like recovery finishing deletes: the page just read goes, but for one.
        for s in &page[1..] {
            store.delete_sandbox(s.id).await?;
        }
        if pages == 1 {
            for id in doomed_unseen {
                store.delete_sandbox(id).await?;
            }
        }
        seen.extend(page.iter().map(|s| s.id));
    }

    let expected: Vec<SandboxId> = ids
        .iter()
        .copied()
        .filter(|id| !doomed_unseen.contains(id))
        .collect();
    assert_eq!(seen, expected, "every surviving row, once, oldest first");
    assert!(pages >= 3, "paged {pages} times");
    Ok(())
}

pub async fn a_taken_uid_slot_is_rejected_and_the_store_is_unchanged(
    store: &Store,
) -> anyhow::Result<()> {
    let mut first = sandbox("holder");
    first.uid_slot = Some(7);
    let first = store.insert_sandbox(&first).await?;

    let mut second = sandbox("wants-seven");
    second.uid_slot = Some(7);
    let err = store.insert_sandbox(&second).await.unwrap_err();
    assert!(matches!(err, StoreError::SlotTaken { slot: 7 }), "{err:?}");
    assert_eq!(store.count_sandboxes().await?, 1);
    assert_eq!(store.get_sandbox_by_name("wants-seven").await?, None);

    // A taken name is the answer that matters more: another slot would not help.
    let mut both = sandbox("holder");
    both.uid_slot = Some(7);
    let err = store.insert_sandbox(&both).await.unwrap_err();
    assert!(matches!(err, StoreError::NameTaken { .. }), "{err:?}");

    // The next candidate goes in.
    second.uid_slot = Some(8);
    let second = store.insert_sandbox(&second).await?;
    assert_eq!(second.uid_slot, Some(8));
    assert_eq!(store.uid_slots_in_use().await?, vec![7, 8]);
    assert_eq!(store.get_sandbox(first.id).await?, Some(first));
    Ok(())
}

pub async fn many_sandboxes_may_have_no_uid_slot(store: &Store) -> anyhow::Result<()> {
    for i in 0..3 {
        let s = store.insert_sandbox(&sandbox(&format!("n{i}"))).await?;
        assert_eq!(s.uid_slot, None);
    }
    let mut slotted = sandbox("slotted");
    slotted.uid_slot = Some(0);
    store.insert_sandbox(&slotted).await?;
    assert_eq!(store.count_sandboxes().await?, 4);
    assert_eq!(store.uid_slots_in_use().await?, vec![0]);
    Ok(())
}

pub async fn a_uid_slot_is_kept_by_updates_and_freed_only_by_delete(
    store: &Store,
) -> anyhow::Result<()> {
    let mut s = sandbox("keeper");
    s.uid_slot = Some(3);
    let v1 = store.insert_sandbox(&s).await?;

    // Neither a plain update nor a modify moves or clears the slot.
    let mut moved = v1.clone();
    moved.uid_slot = Some(4);
    moved.driver_state = b"updated".to_vec();
    let v2 = store.update_sandbox(&moved).await?;
    assert_eq!((v2.uid_slot, v2.revision), (Some(3), 2));
    let v3 = store
        .modify_sandbox(v1.id, |s| {
            s.uid_slot = None;
            true
        })
        .await?
        .context("keeper vanished")?;
    assert_eq!((v3.uid_slot, v3.revision), (Some(3), 3));
    assert_eq!(store.get_sandbox(v1.id).await?, Some(v3.clone()));

    // Whatever its phase, a stored sandbox holds its slot.
    let mut deleting = v3.clone();
    deleting.status = apply(&v3.status, &Event::DeleteRequested, 3_000)?;
    store.update_sandbox(&deleting).await?;
    let mut rival = sandbox("rival");
    rival.uid_slot = Some(3);
    let err = store.insert_sandbox(&rival).await.unwrap_err();
    assert!(matches!(err, StoreError::SlotTaken { slot: 3 }), "{err:?}");

    assert!(store.delete_sandbox(v1.id).await?);
    assert!(store.uid_slots_in_use().await?.is_empty());
    let rival = store.insert_sandbox(&rival).await?;
    assert_eq!(rival.uid_slot, Some(3));
    Ok(())
}

pub async fn a_record_without_a_uid_slot_can_be_backfilled_once(
    store: &Store,
) -> anyhow::Result<()> {
    let old = store.insert_sandbox(&sandbox("from-before-slots")).await?;
    let mut holder = sandbox("holder");
    holder.uid_slot = Some(1);
    let holder = store.insert_sandbox(&holder).await?;

    // A slot another sandbox holds is refused, and nothing changes.
    let err = store.set_uid_slot_if_null(old.id, 1).await.unwrap_err();
    assert!(matches!(err, StoreError::SlotTaken { slot: 1 }), "{err:?}");
    assert_eq!(store.get_sandbox(old.id).await?, Some(old.clone()));

    let filled = store.set_uid_slot_if_null(old.id, 2).await?;
    let expected = Sandbox {
        uid_slot: Some(2),
        revision: old.revision + 1,
        ..old.clone()
    };
    assert_eq!(filled, expected);
    assert_eq!(store.get_sandbox(old.id).await?, Some(expected.clone()));

    // Only a missing slot is filled: a record that has one keeps it.
    assert_eq!(store.set_uid_slot_if_null(old.id, 9).await?, expected);
    assert_eq!(store.set_uid_slot_if_null(holder.id, 9).await?, holder);
    assert_eq!(store.uid_slots_in_use().await?, vec![1, 2]);

    let ghost = SandboxId::new();
    let err = store.set_uid_slot_if_null(ghost, 5).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { id } if id == ghost),
        "{err:?}"
    );
    Ok(())
}
