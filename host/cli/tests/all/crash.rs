//! Issue 8: SIGKILL the gateway in the middle of 100 concurrent creates.
//! After a restart on the same state dir, every acknowledged create exists
//! exactly once, and retrying any request_id yields exactly one sandbox.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use openshell_proto::v1 as pb;
use openshell_proto::v1::open_shell_client::OpenShellClient;
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::harness::{Gateway, load_echo, run};

const CREATES: usize = 100;
/// The gateway is killed once this many creates were acknowledged.
const KILL_AFTER: usize = 40;

async fn client(gw: &Gateway) -> OpenShellClient<Channel> {
    let ch = Channel::from_shared(gw.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .expect("connect to the gateway");
    OpenShellClient::new(ch)
}

fn create_request(i: usize) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        // Generated names, so the test also sees duplicate names if any.
        name: String::new(),
        spec: Some(pb::SandboxSpec {
            driver: "echo".into(),
            ..Default::default()
        }),
        request_id: format!("crash-{i}"),
        policy: String::new(),
    }
}

async fn all_sandboxes(c: &mut OpenShellClient<Channel>) -> Vec<pb::Sandbox> {
    let r = c
        .list_sandboxes(pb::ListSandboxesRequest {
            limit: 1000,
            offset: 0,
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        r.total as usize,
        r.sandboxes.len(),
        "one page holds them all"
    );
    r.sandboxes
}

/// One round: returns how many creates were acknowledged before the kill.
fn crash_round(rt: &tokio::runtime::Runtime) -> usize {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::on_file(dir.path());
    load_echo(&gw);

    let acked = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CREATES)
        .map(|i| {
            let endpoint = gw.endpoint.clone();
            let acked = acked.clone();
            rt.spawn(async move {
                // Spread the creates over ~0.5 s so the kill lands among
                // them rather than after the last one.
                tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
                let ch = Channel::from_shared(endpoint)
                    .unwrap()
                    .connect()
                    .await
                    .ok()?;
                let r = OpenShellClient::new(ch)
                    .create_sandbox(create_request(i))
                    .await
                    .ok()?;
                acked.fetch_add(1, Ordering::SeqCst);
                Some(r.into_inner().sandbox.unwrap().id)
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(
            Instant::now() < deadline,
            "creates never got going:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let kill = run({
        let mut c = std::process::Command::new("kill");
        c.args(["-KILL", &gw.pid().to_string()]);
        c
    });
    assert!(kill.success, "{kill}");
    drop(gw);

    // request_id -> the id its client was told.
    let acknowledged: HashMap<String, String> = rt.block_on(async {
        let mut out = HashMap::new();
        for (i, c) in clients.into_iter().enumerate() {
            if let Some(id) = c.await.unwrap() {
                out.insert(create_request(i).request_id, id);
            }
        }
        out
    });

    let gw = Gateway::on_file(dir.path());
    rt.block_on(async {
        let mut c = client(&gw).await;
        let before = all_sandboxes(&mut c).await;
        for (rid, id) in &acknowledged {
            let n = before.iter().filter(|s| &s.id == id).count();
            assert_eq!(n, 1, "acknowledged create {rid} ({id}) exists {n} times");
        }

        // Every request_id retried, acknowledged or not.
        let mut by_request = HashMap::new();
        for i in 0..CREATES {
            let req = create_request(i);
            let rid = req.request_id.clone();
            let sb = c
                .create_sandbox(req)
                .await
                .unwrap_or_else(|s| panic!("retrying {rid}: {s}"))
                .into_inner()
                .sandbox
                .unwrap();
            if let Some(id) = acknowledged.get(&rid) {
                assert_eq!(
                    &sb.id, id,
                    "a retry of acknowledged {rid} got another sandbox"
                );
            }
            // A second retry changes nothing.
            let again = c
                .create_sandbox(create_request(i))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(again.sandbox.unwrap().id, sb.id, "{rid} retried twice");
            by_request.insert(rid, sb.id);
        }
        let ids: HashSet<_> = by_request.values().collect();
        assert_eq!(ids.len(), CREATES, "one sandbox per request_id");

        let after = all_sandboxes(&mut c).await;
        assert_eq!(
            after.len(),
            CREATES,
            "no sandbox besides the {CREATES} requested"
        );
        let stored: HashSet<_> = after.iter().map(|s| &s.id).collect();
        assert_eq!(
            stored, ids,
            "the stored sandboxes are those the retries returned"
        );
        let names: HashSet<_> = after.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), CREATES, "no duplicate names");
    });
    let (status, _) = gw.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    acknowledged.len()
}

#[test]
fn creates_acknowledged_before_a_sigkill_exist_exactly_once_and_retries_converge() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    let acked = crash_round(&rt);
    eprintln!(
        "{acked}/{CREATES} creates acknowledged before the kill; round took {:?}",
        started.elapsed()
    );
    assert!(
        acked < CREATES,
        "the kill landed after every create; the test proved nothing"
    );
}
