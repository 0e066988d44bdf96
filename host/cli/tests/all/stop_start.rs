//! Issue 18, stop and start, lifetimes, stats: a Stopped sandbox keeps its
//! files and runs nothing (checked on the host: no process names it, its
//! cgroups or its QEMU are gone), a gateway restart leaves it Stopped, and
//! `start` brings it back Ready; a ttl deletes and an idle timeout stops on
//! their own; bad durations are refused and store nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Gateway, Run, run};
use crate::images::{exec, json, test_image};
use crate::restart::{persistent_process_gateway, pids_of, sigkill};
use crate::vm::{start_vm_gateway, vm_runtime};
use crate::vm_images::vm_with_image;

fn get(gw: &Gateway, name: &str) -> serde_json::Value {
    json(&gw.ok(["sandbox", "get", name, "-o", "json"]))
}

fn stats(gw: &Gateway, name: &str) -> serde_json::Value {
    json(&gw.ok(["sandbox", "stats", name, "-o", "json"]))
}

/// Polls `name` until `done` holds of it, or panics after `within`.
fn wait_for(gw: &Gateway, name: &str, within: Duration, done: impl Fn(&Run) -> bool) -> Run {
    let started = Instant::now();
    loop {
        let got = run(gw.cli(["sandbox", "get", name, "-o", "json"]));
        if done(&got) {
            return got;
        }
        assert!(
            started.elapsed() < within,
            "{name} not as expected within {within:?}: {got}\ngateway log:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn phase_is(phase: &'static str) -> impl Fn(&Run) -> bool {
    move |r| r.success && json(r)["phase"] == phase
}

/// Nothing of sandbox `id` runs on the host: no process names it, and its
/// cgroups (v1 here) are gone or hold no process.
fn assert_nothing_runs(id: &str) {
    let pids = pids_of(id);
    assert!(
        pids.is_empty(),
        "processes of stopped {id} still run: {pids:?}"
    );
    for controller in ["memory", "pids", "cpu"] {
        let cg = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("openshell")
            .join(id);
        for leaf in ["", "supervisor", "workload"] {
            let procs =
                std::fs::read_to_string(cg.join(leaf).join("cgroup.procs")).unwrap_or_default();
            assert!(
                procs.trim().is_empty(),
                "{}/{leaf} holds {procs}",
                cg.display()
            );
        }
    }
}

/// Stops `name`, checks what a Stopped sandbox must be, and returns how
/// long the stop took.
fn stop_and_check(gw: &Gateway, name: &str, id: &str) -> Duration {
    let started = Instant::now();
    let stop = gw.ok(["sandbox", "stop", name]);
    let took = started.elapsed();
    assert!(stop.stdout.contains("Stopped sandbox"), "{stop}");
    let sb = get(gw, name);
    assert_eq!(sb["phase"], "Stopped", "{sb}");
    // The stop returns once nothing runs: no polling needed.
    assert_nothing_runs(id);
    let st = stats(gw, name);
    assert_eq!(st["source"], "none", "{st}");
    assert_eq!(st["pids"], 0, "{st}");
    assert_eq!(st["memory_bytes"], 0, "{st}");
    // Exec (and SSH, through the same check) is refused, saying what to do.
    let refused = gw.fails(["sandbox", "exec", name, "--", "true"]);
    assert!(refused.stderr.contains("FailedPrecondition"), "{refused}");
    assert!(
        refused
            .stderr
            .contains(&format!("openshell sandbox start {name}")),
        "{refused}"
    );
    let ssh = gw.fails(["sandbox", "ssh-config", name]);
    assert!(
        ssh.stderr
            .contains(&format!("openshell sandbox start {name}")),
        "{ssh}"
    );
    // A repeated stop is a no-op: same record.
    gw.ok(["sandbox", "stop", name]);
    assert_eq!(get(gw, name)["revision"], sb["revision"]);
    took
}

#[test]
fn issue_18_a_stopped_process_sandbox_keeps_its_files_runs_nothing_and_survives_a_restart() {
    let dir = tempfile::TempDir::new().unwrap();
    let gw = persistent_process_gateway(dir.path());
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "ps",
        "--memory-mib",
        "256",
        "--max-processes",
        "64",
        "--",
        "sh",
        "-c",
        "echo kept > /sandbox/f",
    ]);
    let id = get(&gw, "ps")["id"].as_str().unwrap().to_owned();
    assert!(!pids_of(&id).is_empty(), "the sandbox runs before the stop");

    // Sandbox code's pids: none between commands, the exec's while it runs.
    let st = stats(&gw, "ps");
    assert_eq!(st["source"], "cgroup", "{st}");
    assert_eq!(st["pids"], 0, "no command runs: {st}");
    let busy = crate::harness::KillOnDrop(
        gw.cli([
            "sandbox",
            "exec",
            "ps",
            "--",
            "sh",
            "-c",
            "while :; do :; done",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    let started = Instant::now();
    loop {
        let st = stats(&gw, "ps");
        if st["pids"].as_u64().unwrap() >= 1 && st["cpu_usage_ns"].as_u64().unwrap() >= 200_000_000
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the busy exec never showed: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(busy);
    assert_eq!(st["pids_limit"], 64, "{st}");
    assert_eq!(st["memory_limit_bytes"], 256u64 << 20, "{st}");
    assert!(st["memory_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["disk_limit_bytes"], 8u64 << 30, "{st}");
    assert!(st["disk_bytes"].as_u64().unwrap() > 0, "{st}");
    let human = gw.ok(["sandbox", "stats", "ps"]);
    assert!(human.stdout.contains("of 64"), "{human}");

    let stop = stop_and_check(&gw, "ps", &id);

    // A gateway killed and restarted leaves it Stopped and launches nothing:
    // recovery is done before the gateway listens.
    sigkill(gw.pid());
    drop(gw);
    let gw = persistent_process_gateway(dir.path());
    let sb = get(&gw, "ps");
    assert_eq!(sb["phase"], "Stopped", "{sb}");
    assert_nothing_runs(&id);

    let started = Instant::now();
    let start = gw.ok(["sandbox", "start", "ps"]);
    let start_took = started.elapsed();
    assert!(start.stdout.contains("Ready"), "{start}");
    assert_eq!(get(&gw, "ps")["id"], id.as_str(), "the same sandbox");
    let cat = gw.ok(["sandbox", "exec", "ps", "--", "cat", "/sandbox/f"]);
    assert_eq!(cat.stdout, "kept\n", "{cat}");
    assert!(!pids_of(&id).is_empty());
    // Starting a Ready sandbox is a no-op.
    let rev = get(&gw, "ps")["revision"].clone();
    gw.ok(["sandbox", "start", "ps"]);
    assert_eq!(get(&gw, "ps")["revision"], rev);
    eprintln!("issue 18: process sandbox stop {stop:?}, start to Ready {start_took:?}");

    // A Stopped sandbox can be deleted.
    gw.ok(["sandbox", "stop", "ps"]);
    gw.ok(["sandbox", "delete", "ps"]);
    assert!(
        run(gw.cli(["sandbox", "get", "ps"]))
            .stderr
            .contains("NotFound")
    );
    assert_nothing_runs(&id);
}

#[test]
fn issue_18_a_stopped_vm_sandbox_keeps_its_disk_runs_no_qemu_and_starts_ready_again() {
    let test = "issue_18 a stopped VM keeps its disk";
    let Some(rt) = vm_runtime(test) else { return };
    let (dir, gw) = vm_with_image(&rt, &test_image(), "example.com/team/app:v1", "vs", &[]);
    // Not synced by the test: the stop syncs the guest.
    let wrote = exec(&gw, "vs", "echo kept > /home/app/note");
    assert!(wrote.success, "{wrote}");
    let id = get(&gw, "vs")["id"].as_str().unwrap().to_owned();
    let running = pids_of(&id);
    assert!(!running.is_empty(), "QEMU and gvproxy run before the stop");

    let st = stats(&gw, "vs");
    assert_eq!(st["source"], "qemu", "{st}");
    assert!(st["memory_bytes"].as_u64().unwrap() > 0, "{st}");
    assert!(st["memory_limit_bytes"].as_u64().unwrap() > 0, "{st}");
    assert!(st["cpu_limit_millis"].as_u64().unwrap() >= 1000, "{st}");
    assert!(st["disk_bytes"].as_u64().unwrap() > 0, "{st}");

    let stop = stop_and_check(&gw, "vs", &id);
    for pid in running {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} (QEMU or gvproxy) survived the stop"
        );
    }

    // A restart leaves it Stopped, as for a process sandbox.
    sigkill(gw.pid());
    drop(gw);
    let gw = start_vm_gateway(dir.path(), &rt, &[]);
    assert_eq!(get(&gw, "vs")["phase"], "Stopped");
    assert_nothing_runs(&id);

    let started = Instant::now();
    gw.ok(["sandbox", "start", "vs"]);
    let start_took = started.elapsed();
    let cat = gw.ok(["sandbox", "exec", "vs", "--", "cat", "/home/app/note"]);
    assert_eq!(cat.stdout, "kept\n", "{cat}");
    eprintln!("issue 18: VM sandbox stop {stop:?}, start to Ready {start_took:?}");
    gw.ok(["sandbox", "delete", "vs"]);
    assert_nothing_runs(&id);
}

#[test]
fn issue_18_a_ttl_deletes_and_an_idle_timeout_stops_from_stored_times() {
    let dir = tempfile::TempDir::new().unwrap();
    let gw = persistent_process_gateway(dir.path());
    gw.ok(["sandbox", "create", "--name", "short", "--ttl", "4s"]);
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "idle",
        "--idle-timeout",
        "3s",
        "--ttl",
        "1h",
    ]);
    let short = get(&gw, "short");
    assert_eq!(short["ttl_seconds"], 4, "{short}");
    let expires = short["expires_at_ms"].as_i64().unwrap();
    assert_eq!(expires, short["created_at_ms"].as_i64().unwrap() + 4_000);
    let human = gw.ok(["sandbox", "get", "idle"]);
    assert!(human.stdout.contains("TTL:      1h"), "{human}");
    assert!(
        human
            .stdout
            .contains("stopped after 3s without exec or SSH"),
        "{human}"
    );

    // The deadlines are stored: a gateway killed in between still acts.
    sigkill(gw.pid());
    drop(gw);
    let gw = persistent_process_gateway(dir.path());
    let gone = wait_for(&gw, "short", Duration::from_secs(20), |r| {
        r.stderr.contains("NotFound")
    });
    assert!(!gone.success);
    assert!(
        crate::harness::now_ms() >= expires,
        "deleted before its ttl"
    );
    let stopped = wait_for(&gw, "idle", Duration::from_secs(20), phase_is("Stopped"));
    let sb = json(&stopped);
    let ready = &sb["conditions"][0];
    assert!(
        ready["message"].as_str().unwrap().contains("idle timeout"),
        "{sb}"
    );
    let id = sb["id"].as_str().unwrap().to_owned();
    assert_nothing_runs(&id);

    // Started again, it is Ready, and activity keeps it so: an exec that
    // outlasts the idle timeout holds it open.
    gw.ok(["sandbox", "start", "idle"]);
    gw.ok(["sandbox", "exec", "idle", "--", "sleep", "4"]);
    assert_eq!(
        get(&gw, "idle")["phase"],
        "Ready",
        "a running exec is activity"
    );
    wait_for(&gw, "idle", Duration::from_secs(20), phase_is("Stopped"));
    gw.ok(["sandbox", "delete", "idle"]);
}

#[test]
fn issue_18_bad_durations_are_refused_saying_what_to_fix_and_store_nothing() {
    let dir = tempfile::TempDir::new().unwrap();
    let gw = persistent_process_gateway(dir.path());
    for bad in ["10x", "30", "0s", "h1"] {
        let r = gw.fails(["sandbox", "create", "--name", "bad", "--ttl", bad]);
        assert_eq!(r.code, Some(2), "a usage error: {r}");
        assert!(r.stderr.contains("--ttl"), "{r}");
        assert!(
            r.stderr.contains("like 90s, 30m") || r.stderr.contains("positive duration"),
            "{r}"
        );
    }
    // Parsed by the CLI but too long: the gateway refuses it.
    for flag in ["--ttl", "--idle-timeout"] {
        let r = gw.fails(["sandbox", "create", "--name", "bad", flag, "400d"]);
        assert!(r.stderr.contains("InvalidArgument"), "{r}");
        assert!(r.stderr.contains("366d"), "{r}");
    }
    assert!(
        crate::harness::sandbox_names(&gw).is_empty(),
        "a refused create stores nothing"
    );

    // Stop and start of what does not exist; start of a Ready one changes nothing.
    assert!(
        gw.fails(["sandbox", "stop", "nope"])
            .stderr
            .contains("NotFound")
    );
    assert!(
        gw.fails(["sandbox", "start", "nope"])
            .stderr
            .contains("NotFound")
    );
    gw.ok(["sandbox", "create", "--name", "ok"]);
    let before = get(&gw, "ok");
    gw.ok(["sandbox", "start", "ok"]);
    assert_eq!(get(&gw, "ok"), before);
}

#[test]
fn issue_18_a_stop_before_ready_is_refused_saying_to_wait_and_changes_nothing() {
    let dir = tempfile::TempDir::new().unwrap();
    let gw = Gateway::in_memory(dir.path());
    // The echo driver launches nothing: its sandbox stays Provisioning.
    crate::harness::load_echo(&gw);
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "early",
        "--driver",
        "echo",
        "--no-wait",
    ]);
    let starting = wait_for(&gw, "early", Duration::from_secs(20), |r| {
        r.success && json(r)["conditions"][0]["reason"] == "Starting"
    });
    let before = json(&starting);
    assert_eq!(before["phase"], "Provisioning", "{before}");

    let refused = gw.fails(["sandbox", "stop", "early"]);
    assert!(refused.stderr.contains("FailedPrecondition"), "{refused}");
    assert!(
        refused
            .stderr
            .contains("is Provisioning, so it cannot be stopped"),
        "{refused}"
    );
    assert!(
        refused.stderr.contains("wait until it is Ready"),
        "{refused}"
    );
    assert_eq!(get(&gw, "early"), before, "a refused stop changes nothing");
    // A start of a sandbox being launched is a no-op.
    gw.ok(["sandbox", "start", "early", "--no-wait"]);
    assert_eq!(
        get(&gw, "early"),
        before,
        "a start while launching changes nothing"
    );
    gw.ok(["sandbox", "delete", "early"]);
}
