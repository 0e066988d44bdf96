//! Relay limits: a supervisor that never opens relays makes exec requests
//! wait; past the limit they are refused, and every slot comes back.

use std::time::Duration;

use openshell_proto::v1 as pb;
use tonic::Code;

use crate::harness::{TestGateway, phase};
use crate::process::exec;
use crate::readiness::{FakeSupervisor, sandbox_with_secret};

#[tokio::test]
async fn relays_past_the_limit_are_refused_and_timed_out_ones_free_their_slots() {
    // The harness allows 2 pending relays per sandbox, 3 in total, and
    // gives a supervisor 500 ms to claim one.
    let mut gw = TestGateway::start().await;
    let id = sandbox_with_secret(&mut gw, "rl", "s").await;
    let (sup, _) = FakeSupervisor::connect(&gw, &id, &id, "s").await;
    let _alive = sup.keep_alive(); // answers heartbeats, ignores relay requests
    gw.wait_for("rl", "Ready", |s| phase(s) == pb::SandboxPhase::Ready)
        .await;

    let runtime = gw.runtime();
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let mut g = TestGateway::client_for(&gw).await;
        waiters.push(tokio::spawn(async move {
            exec(&mut g, "rl", &["true"], None).await
        }));
    }
    // Both slots are taken before the third request.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while runtime.supervisors().relays().pending() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiters never reserved"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = exec(&mut gw, "rl", &["true"], None).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("limit 2"), "{err}");

    for w in waiters {
        let err = w.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.message().contains("did not open the relay"), "{err}");
    }
    assert_eq!(
        runtime.supervisors().relays().pending(),
        0,
        "every slot is free again"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_while_waiting_frees_its_slot() {
    let mut gw = TestGateway::start().await;
    let id = sandbox_with_secret(&mut gw, "hu", "s").await;
    let (sup, _) = FakeSupervisor::connect(&gw, &id, &id, "s").await;
    let _alive = sup.keep_alive();
    gw.wait_for("hu", "Ready", |s| phase(s) == pb::SandboxPhase::Ready)
        .await;
    let runtime = gw.runtime();
    let mut g = TestGateway::client_for(&gw).await;
    let waiter = tokio::spawn(async move { exec(&mut g, "hu", &["true"], None).await });
    while runtime.supervisors().relays().pending() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    waiter.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
    while runtime.supervisors().relays().pending() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot outlived its client (the claim timeout is 500 ms)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.stop().await;
}
