//! Issue 8: a gateway killed outright comes back with every sandbox it had,
//! and nothing of its old run survives.

use std::path::Path;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{Gateway, run, wasm};
use crate::resources::{GIB, quota_of};

/// A gateway with the process driver whose SQLite file lives in `dir/state`,
/// so a second one on the same `dir` sees the same sandboxes.
pub fn persistent_process_gateway(dir: &Path) -> Gateway {
    let drivers = wasm("openshell_driver_process");
    let driver_dir = drivers.parent().unwrap().to_str().unwrap().to_owned();
    Gateway::start(dir, &["--drivers", "process", "--driver-dir", &driver_dir])
}

/// `sandbox get NAME -o json`.
fn get(gw: &Gateway, name: &str) -> serde_json::Value {
    let run = gw.ok(["sandbox", "get", name, "-o", "json"]);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"))
}

/// Pids of launchers whose command line or environment names `id`.
pub(crate) fn pids_of(id: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let (cmd, env) = (String::from_utf8_lossy(&cmd), String::from_utf8_lossy(&env));
        if cmd.contains(id) || env.contains(id) {
            out.push(pid);
        }
    }
    out
}

pub fn sigkill(pid: u32) {
    let kill = run({
        let mut c = std::process::Command::new("kill");
        c.args(["-KILL", &pid.to_string()]);
        c
    });
    assert!(kill.success, "{kill}");
}

#[test]
fn a_sigkilled_gateway_restarts_with_every_sandbox_ready_and_its_files() {
    let dir = TempDir::new().unwrap();
    let names = ["r1", "r2", "r3", "r4", "r5"];
    let gw = persistent_process_gateway(dir.path());
    let mut ids = Vec::new();
    for name in names {
        let body = format!("echo data-{name} > /sandbox/f");
        let mut create = vec!["sandbox", "create", "--driver", "process", "--name", name];
        // r1 has a disk size of its own (issue 17), the others the default.
        if name == "r1" {
            create.extend(["--disk-gib", "3"]);
        }
        create.extend(["--", "sh", "-c", &body]);
        gw.ok(create);
        let sb = get(&gw, name);
        assert_eq!(sb["phase"], "Ready", "{sb}");
        ids.push(sb["id"].as_str().unwrap().to_owned());
    }
    let r1_dir = dir.path().join("state/sandboxes").join(&ids[0]);
    assert_eq!(quota_of(&r1_dir), Some(3 * GIB));
    let old: Vec<(String, Vec<u32>)> = ids.iter().map(|id| (id.clone(), pids_of(id))).collect();
    for (id, pids) in &old {
        assert!(!pids.is_empty(), "{id} has host processes before the kill");
    }

    sigkill(gw.pid());
    // Whatever became of r1's limit while no gateway ran (before the
    // harness detaches the disk), a resume sets its stored size again.
    let unlimit = run({
        let mut c = std::process::Command::new("btrfs");
        c.args(["qgroup", "limit", "none"]).arg(&r1_dir);
        c
    });
    assert!(unlimit.success, "{unlimit}");
    assert_eq!(quota_of(&r1_dir), None);
    drop(gw);
    let gw = persistent_process_gateway(dir.path());
    let started = Instant::now();
    for (name, id) in names.iter().zip(&ids) {
        loop {
            let sb = get(&gw, name);
            assert_eq!(sb["id"], id.as_str(), "same id after the restart: {sb}");
            if sb["phase"] == "Ready" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{name} not Ready 10 s after the restart: {sb}\ngateway log:\n{}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!("all 5 Ready {:?} after the restart", started.elapsed());
    for name in names {
        let want = if name == "r1" { 3 } else { 8 };
        assert_eq!(crate::resources::disk_gib(&gw, name), want, "{name}");
    }
    assert_eq!(
        quota_of(&r1_dir),
        Some(3 * GIB),
        "r1's size after the restart"
    );

    for name in names {
        let cat = gw.ok(["sandbox", "exec", name, "--", "cat", "/sandbox/f"]);
        assert_eq!(cat.stdout, format!("data-{name}\n"), "{cat}");
    }
    for (id, pids) in &old {
        let now = pids_of(id);
        let survivors: Vec<_> = pids.iter().filter(|p| now.contains(p)).collect();
        assert!(
            survivors.is_empty(),
            "processes of the old run of {id} still run: {survivors:?}"
        );
    }
    let listed = gw.ok(["sandbox", "list", "--names"]);
    assert_eq!(listed.stdout.lines().count(), 5, "{listed}");

    // Deleting leaves neither processes nor cgroups of either run behind.
    gw.ok(["sandbox", "delete", "--all"]);
    for id in &ids {
        assert!(pids_of(id).is_empty(), "{id}: {:?}", pids_of(id));
        for controller in ["memory", "pids", "cpu"] {
            let cg = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join("openshell")
                .join(id);
            assert!(!cg.exists(), "{} is left behind", cg.display());
        }
    }
    let (status, _) = gw.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}");
}

/// Regression, issue 12 bug 4: a gateway on a fresh state dir over a shared
/// database (the machine it ran on is gone: its processes and its recorded
/// plugin files) must load its bundled drivers before it settles stored
/// sandboxes, so they resume instead of going to Error with DriverMissing.
#[test]
fn issue_12_a_fresh_state_dir_on_a_shared_database_resumes_instead_of_driver_missing() {
    let db = TempDir::new().unwrap();
    let url = format!("sqlite://{}", db.path().join("shared.db").display());
    let drivers = wasm("openshell_driver_process");
    let driver_dir = drivers.parent().unwrap().to_str().unwrap().to_owned();
    let args = [
        "--drivers",
        "process",
        "--driver-dir",
        &driver_dir,
        "--db-url",
        &url,
    ];
    let first = TempDir::new().unwrap();
    let gw = Gateway::start(first.path(), &args);
    gw.ok(["sandbox", "create", "--name", "moved", "--", "true"]);
    let id = get(&gw, "moved")["id"].as_str().unwrap().to_owned();
    // Killed outright: its launchers die with it (parent-death signal) and
    // nothing is recorded about them.
    sigkill(gw.pid());
    drop(gw);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pids_of(&id).is_empty() {
        assert!(Instant::now() < deadline, "the old run's processes live on");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(first);

    let second = TempDir::new().unwrap();
    let gw = Gateway::start(second.path(), &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    let sb = loop {
        let sb = get(&gw, "moved");
        if sb["phase"] == "Ready" || sb["phase"] == "Error" {
            break sb;
        }
        assert!(Instant::now() < deadline, "never settled: {sb}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sb["phase"], "Ready", "{sb}");
    assert_eq!(sb["id"], id.as_str());
}

/// Issue 17: a sandbox stored before sandboxes had disk sizes (0 in its
/// record) keeps working after an upgrade: the first gateway start with a
/// sandbox disk gives it that gateway's default, stored, and limits its
/// state dir to it.
#[test]
fn issue_17_a_sandbox_stored_without_a_disk_size_gets_the_gateways_default_at_restart() {
    let dir = TempDir::new().unwrap();
    let gw = persistent_process_gateway(dir.path());
    gw.ok(["sandbox", "create", "--name", "old", "--", "true"]);
    let id = get(&gw, "old")["id"].as_str().unwrap().to_owned();
    sigkill(gw.pid());
    drop(gw);
    // What a record from before sizes reads as.
    let db = format!(
        "sqlite://{}",
        dir.path().join("state/openshell.db").display()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let store = openshell_store::Store::connect(&db).await.unwrap();
            let sid = openshell_core::SandboxId::parse(&id).unwrap();
            let old = store
                .modify_sandbox(sid, |sb| {
                    sb.spec.resources.disk_gib = 0;
                    true
                })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(old.spec.resources.disk_gib, 0);
            store.close().await;
        });

    let drivers = wasm("openshell_driver_process");
    let driver_dir = drivers.parent().unwrap().to_str().unwrap().to_owned();
    let gw = Gateway::start(
        dir.path(),
        &[
            "--drivers",
            "process",
            "--driver-dir",
            &driver_dir,
            "--default-disk-gib",
            "5",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sb = get(&gw, "old");
        if sb["phase"] == "Ready" {
            assert_eq!(sb["disk_gib"], 5, "{sb}");
            break;
        }
        assert!(Instant::now() < deadline, "not Ready: {sb}\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let state_dir = dir.path().join("state/sandboxes").join(&id);
    assert_eq!(quota_of(&state_dir), Some(5 * GIB));
    let ok = gw.ok(["sandbox", "exec", "old", "--", "echo", "works"]);
    assert_eq!(ok.stdout, "works\n");
}
