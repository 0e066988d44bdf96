//! Driver plugins through the API: load, grants, isolation of failures,
//! hot reload, and that no plugin can make a sandbox Ready.

use std::time::Duration;

use openshell_proto::v1 as pb;
use tonic::Code;

use crate::harness::{TestGateway, condition, phase};

#[tokio::test]
async fn a_loaded_driver_is_listed_and_its_create_shows_in_the_conditions() {
    let mut gw = TestGateway::start().await;
    let p = gw.load("echo", "fixture-echo", &["log", "files"]).await;
    assert_eq!(p.digest.len(), 64, "sha256 hex");
    assert_eq!(p.grants, ["log", "files"]);
    assert!(p.imports.contains(&"files".to_string()), "{:?}", p.imports);

    let listed = gw
        .client
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .unwrap()
        .into_inner()
        .plugins;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].digest, p.digest);

    gw.create("e1", "echo").await.unwrap();
    let sb = gw
        .wait_for("e1", "the driver's progress", |s| {
            condition(s, "Driver").is_some_and(|c| c.message.contains("echo says hi to e1"))
        })
        .await;
    assert_eq!(phase(&sb), pb::SandboxPhase::Provisioning);
    let ready = condition(&sb, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Starting")
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_ungranted_capability_is_refused_by_name_and_granting_it_works() {
    let mut gw = TestGateway::start().await;
    let all_but_vm = ["log", "files", "image", "network", "rootfs"];
    let err = gw
        .try_load("wants-vm", "fixture-wants-vm", &all_but_vm)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("'vm'"), "{err}");
    assert!(err.message().contains("--grant vm"), "{err}");
    let listed = gw
        .client
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .unwrap();
    assert!(
        listed.into_inner().plugins.is_empty(),
        "nothing half-loaded"
    );

    let p = gw
        .load(
            "wants-vm",
            "fixture-wants-vm",
            &["log", "files", "image", "network", "rootfs", "vm"],
        )
        .await;
    assert!(p.imports.contains(&"vm".to_string()));

    let err = gw
        .try_load("x", "fixture-echo", &["root"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("unknown capability"), "{err}");
    gw.stop().await;
}

#[tokio::test]
async fn garbage_is_not_a_component() {
    let mut gw = TestGateway::start().await;
    let err = gw
        .client
        .load_plugin(pb::LoadPluginRequest {
            name: "junk".into(),
            component: b"\0asm nonsense".to_vec().into(),
            grants: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("not a valid WebAssembly component"),
        "{err}"
    );
    gw.stop().await;
}

/// Each misbehaving fixture fails only its own sandbox, with a reason.
async fn fails_only_its_call(fixture: &str, reason: &str, needle: &str) {
    let mut gw = TestGateway::start().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    gw.load("bad", fixture, &[]).await;

    gw.create("victim", "bad").await.unwrap();
    // While the bad call runs, the gateway keeps serving everything else:
    // every health call answers within a generous deadline (how fast is a
    // bench figure, not an assertion).
    for i in 0..10 {
        let health = gw.client.health(pb::HealthRequest {});
        tokio::time::timeout(Duration::from_secs(2), health)
            .await
            .unwrap_or_else(|_| panic!("health call {i} hung during {fixture}"))
            .unwrap();
        if i == 0 {
            gw.create("bystander", "echo").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    let sb = gw
        .wait_for("victim", "Error", |s| phase(s) == pb::SandboxPhase::Error)
        .await;
    let ready = condition(&sb, "Ready").unwrap();
    assert_eq!(ready.reason, "DriverFailed");
    let driver = condition(&sb, "Driver").unwrap();
    assert_eq!(driver.reason, reason, "{sb:#?}");
    assert!(
        driver.message.contains(needle),
        "{needle:?} not in {:?}",
        driver.message
    );

    let other = gw
        .wait_for("bystander", "progress", |s| {
            condition(s, "Driver").is_some()
        })
        .await;
    assert_eq!(phase(&other), pb::SandboxPhase::Provisioning);
    // The same plugin still serves new calls (a fresh instance each time).
    gw.create("again", "bad").await.unwrap();
    gw.wait_for("again", "Error", |s| phase(s) == pb::SandboxPhase::Error)
        .await;
    gw.stop().await;
}

// Multi-threaded like the real gateway: a spinning guest must not starve
// the API on a one-thread test runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_fails_only_its_call() {
    fails_only_its_call("fixture-trap", "DriverFailed", "trapped").await;
}

// Multi-threaded like the real gateway: a spinning guest must not starve
// the API on a one-thread test runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_plugin_is_cut_off_at_its_deadline() {
    fails_only_its_call("fixture-loop", "DriverTimedOut", "did not answer").await;
}

// Multi-threaded like the real gateway: a spinning guest must not starve
// the API on a one-thread test runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_plugin_hits_its_cap() {
    fails_only_its_call("fixture-hog", "DriverFailed", "trapped").await;
}

#[tokio::test]
async fn no_plugin_can_make_a_sandbox_ready() {
    let mut gw = TestGateway::start().await;
    gw.load("liar", "fixture-liar", &[]).await;
    gw.create("l1", "liar").await.unwrap();
    let sb = gw
        .wait_for("l1", "the liar's events applied", |s| s.revision >= 2)
        .await;
    assert_ne!(phase(&sb), pb::SandboxPhase::Ready, "{sb:#?}");
    let ready = condition(&sb, "Ready").unwrap();
    assert_ne!(ready.status, "True");
    assert_ne!(ready.reason, "SupervisorConnected");
    gw.stop().await;
}

#[tokio::test]
async fn reloading_a_changed_component_takes_effect_without_touching_running_sandboxes() {
    let mut gw = TestGateway::start().await;
    let v1 = gw.load("echo", "fixture-echo", &["log", "files"]).await;
    gw.create("old", "echo").await.unwrap();
    let before = gw
        .wait_for("old", "v1 progress", |s| {
            condition(s, "Driver").is_some_and(|c| c.message.contains("echo says hi"))
        })
        .await;

    let r = gw
        .client
        .load_plugin(pb::LoadPluginRequest {
            name: "echo".into(),
            component: std::fs::read(crate::harness::wasm("fixture-echo-v2"))
                .unwrap()
                .into(),
            grants: vec!["log".into(), "files".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.replaced);
    assert_ne!(r.plugin.unwrap().digest, v1.digest);

    gw.create("new", "echo").await.unwrap();
    gw.wait_for("new", "v2 progress", |s| {
        condition(s, "Driver").is_some_and(|c| c.message.contains("echo v2 says hi"))
    })
    .await;
    let after = gw.get("old").await.unwrap();
    assert_eq!(after, before, "the running sandbox's record is untouched");
    gw.stop().await;
}

#[tokio::test]
async fn unload_refuses_while_sandboxes_use_the_plugin_unless_forced() {
    let mut gw = TestGateway::start().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    gw.create("u1", "echo").await.unwrap();
    let err = gw
        .client
        .unload_plugin(pb::UnloadPluginRequest {
            name: "echo".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("--force"), "{err}");
    gw.client
        .unload_plugin(pb::UnloadPluginRequest {
            name: "echo".into(),
            force: true,
        })
        .await
        .unwrap();
    let err = gw
        .client
        .unload_plugin(pb::UnloadPluginRequest {
            name: "echo".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    gw.stop().await;
}
