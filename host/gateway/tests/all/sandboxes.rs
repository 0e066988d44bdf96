//! The sandbox API over a real socket: contracts, bad input, watch, restart.

use std::time::Duration;

use openshell_proto::v1 as pb;
use pb::watch_sandbox_event::Event as W;
use tonic::Code;

use crate::harness::{TestGateway, phase};

#[tokio::test]
async fn health_reports_serving_and_the_version() {
    let mut gw = TestGateway::start().await;
    let h = gw
        .client
        .health(pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, "SERVING");
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    gw.stop().await;
}

#[tokio::test]
async fn create_with_no_or_unknown_driver_fails_clearly_and_stores_nothing() {
    let mut gw = TestGateway::start().await;
    let err = gw.create("a", "").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("no driver plugins are loaded"),
        "{err}"
    );

    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    let err = gw.create("a", "nosuch").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("\"nosuch\" is not loaded"), "{err}");
    assert!(
        err.message().contains("echo"),
        "lists what is loaded: {err}"
    );
    assert_eq!(gw.total().await, 0);
    gw.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_leaves_the_store_unchanged() {
    let mut gw = TestGateway::start().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    gw.create("taken", "echo").await.unwrap();

    let long = "x".repeat(64);
    let cases: Vec<(pb::CreateSandboxRequest, Code, &str)> = vec![
        (req(&long, &[]), Code::InvalidArgument, "64 characters"),
        (req("Upper", &[]), Code::InvalidArgument, "not a DNS label"),
        (req("a_b", &[]), Code::InvalidArgument, "not a DNS label"),
        (req("-a", &[]), Code::InvalidArgument, "not a DNS label"),
        (req("taken", &[]), Code::AlreadyExists, "already exists"),
        (
            req("ok", &[("1BAD", "v")]),
            Code::InvalidArgument,
            "[A-Za-z_]",
        ),
        (
            req("ok", &[("BIG", &"v".repeat(300 * 1024))]),
            Code::ResourceExhausted,
            "limit",
        ),
        (
            pb::CreateSandboxRequest {
                request_id: "has space".into(),
                ..req("ok", &[])
            },
            Code::InvalidArgument,
            "request_id",
        ),
        (
            pb::CreateSandboxRequest {
                spec: Some(pb::SandboxSpec {
                    driver: "echo".into(),
                    resources: Some(pb::Resources {
                        vcpus: 1000,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..req("ok", &[])
            },
            Code::InvalidArgument,
            "vcpus",
        ),
    ];
    for (r, code, needle) in cases {
        let err = gw.client.create_sandbox(r).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(needle), "{needle:?} not in {err}");
    }
    assert_eq!(gw.total().await, 1, "only the first create is stored");

    let err = gw.get("nosuch").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = gw
        .client
        .list_sandboxes(pb::ListSandboxesRequest {
            limit: 5000,
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("1 to 1000"), "{err}");
    let err = gw
        .client
        .delete_sandbox(pb::DeleteSandboxRequest {
            name: "nosuch".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    gw.stop().await;
}

fn req(name: &str, env: &[(&str, &str)]) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        name: name.into(),
        spec: Some(pb::SandboxSpec {
            driver: "echo".into(),
            environment: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            resources: None,
            ..Default::default()
        }),
        request_id: String::new(),
        policy: String::new(),
    }
}

#[tokio::test]
async fn an_omitted_name_is_generated_and_the_only_driver_is_the_default() {
    let mut gw = TestGateway::start().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    let sb = gw.create("", "").await.unwrap();
    assert!(
        openshell_core::SandboxName::parse(&sb.name).is_ok(),
        "{}",
        sb.name
    );
    assert_eq!(sb.spec.unwrap().driver, "echo");
    gw.stop().await;
}

#[tokio::test]
async fn a_retried_create_with_the_same_request_id_returns_the_same_sandbox() {
    let mut gw = TestGateway::start().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    let r = pb::CreateSandboxRequest {
        request_id: "retry-1".into(),
        ..req("", &[])
    };
    let mut ids = Vec::new();
    for _ in 0..3 {
        let sb = gw
            .client
            .create_sandbox(r.clone())
            .await
            .unwrap()
            .into_inner();
        ids.push(sb.sandbox.unwrap().id);
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    assert_eq!(gw.total().await, 1);
    gw.stop().await;
}

#[tokio::test]
async fn list_pages_in_creation_order() {
    let mut gw = TestGateway::start().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    for i in 0..5 {
        gw.create(&format!("s{i}"), "echo").await.unwrap();
    }
    let page = gw
        .client
        .list_sandboxes(pb::ListSandboxesRequest {
            limit: 2,
            offset: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = page.sandboxes.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_eq!(page.total, 5);
    gw.stop().await;
}

#[tokio::test]
async fn watch_sends_the_snapshot_then_changes_then_deletion() {
    let mut gw = TestGateway::start().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    let sb = gw.create("w1", "echo").await.unwrap();
    gw.wait_for("w1", "driver progress", |s| s.revision >= 2)
        .await;

    let mut stream = gw
        .client
        .watch_sandbox(pb::WatchSandboxRequest {
            name: "w1".into(),
            until_settled: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(W::Sandbox(snap)) = first.event else {
        panic!("first event is a snapshot: {first:?}")
    };
    assert_eq!(snap.id, sb.id);

    gw.client
        .delete_sandbox(pb::DeleteSandboxRequest { name: "w1".into() })
        .await
        .unwrap();
    let mut saw_deleting = false;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = stream.message().await.unwrap() {
            match ev.event.unwrap() {
                W::Sandbox(s) => saw_deleting |= phase(&s) == pb::SandboxPhase::Deleting,
                W::Deleted(d) => return d,
            }
        }
        panic!("stream ended without a deleted event")
    })
    .await
    .expect("deletion is reported");
    assert_eq!(end.id, sb.id);
    assert!(
        saw_deleting,
        "Deleting was streamed before the record vanished"
    );
    assert_eq!(gw.get("w1").await.unwrap_err().code(), Code::NotFound);
    gw.stop().await;
}

#[tokio::test]
async fn watch_until_settled_ends_at_error() {
    let mut gw = TestGateway::start().await;
    gw.load("trap", "fixture-trap", &[]).await;
    gw.create("t1", "trap").await.unwrap();
    let mut stream = gw
        .client
        .watch_sandbox(pb::WatchSandboxRequest {
            name: "t1".into(),
            until_settled: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(ev) = stream.message().await.unwrap() {
            if let Some(W::Sandbox(s)) = ev.event {
                last = Some(s);
            }
        }
    })
    .await
    .expect("the stream ends by itself");
    assert_eq!(phase(&last.unwrap()), pb::SandboxPhase::Error);
    gw.stop().await;
}

#[tokio::test]
async fn a_gateway_restart_keeps_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = TestGateway::start_on(tmp.path(), None).await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(gw.create(&format!("keep{i}"), "echo").await.unwrap().id);
    }
    gw.stop().await;

    let mut gw = TestGateway::start_on(tmp.path(), None).await;
    let list = gw
        .client
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = list.sandboxes.iter().map(|s| s.id.clone()).collect();
    assert_eq!(got, ids);
    let plugins = gw
        .client
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .unwrap()
        .into_inner()
        .plugins;
    assert_eq!(plugins.len(), 1, "the plugin is reloaded from the database");
    assert_eq!(plugins[0].sandboxes, 3);
    gw.stop().await;
}
