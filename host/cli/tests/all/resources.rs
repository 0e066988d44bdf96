//! Issue 14 items 6 and 7, by attack from sandbox code: past the disk
//! quota, and filling the memory limit with pages no OOM kill frees. Each
//! fails for sandbox code alone; the sandbox and the gateway keep serving.

use tempfile::TempDir;

use crate::harness::{Gateway, as_strs, process_flags};

/// A field of `sandbox get NAME -o json`.
fn field(gw: &Gateway, name: &str, key: &str) -> String {
    let get = gw.ok(["sandbox", "get", name, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
    v[key].as_str().unwrap_or_default().to_owned()
}

fn sandbox_id(gw: &Gateway, name: &str) -> String {
    field(gw, name, "id")
}

fn phase(gw: &Gateway, name: &str) -> String {
    field(gw, name, "phase")
}

#[test]
fn issue_14_writing_past_the_disk_quota_fails_for_that_sandbox_alone() {
    let dir = TempDir::new().unwrap();
    let mut flags = process_flags();
    flags.extend(["--sandbox-disk-quota-mib", "64"].map(String::from));
    let gw = Gateway::start(dir.path(), &as_strs(&flags));
    gw.ok(["sandbox", "create", "--name", "hog", "--", "true"]);
    gw.ok(["sandbox", "create", "--name", "bystander", "--", "true"]);

    let fill = gw.cli([
        "sandbox",
        "exec",
        "hog",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/sandbox/fill bs=1M count=200 2>&1; sync; \
         echo size=$(($(stat -c %s /sandbox/fill) >> 20))",
    ]);
    let fill = crate::harness::run(fill);
    assert!(
        fill.stdout.contains("Disk quota exceeded"),
        "the write was not stopped: {fill}"
    );
    let size: u64 = fill
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("size="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size in {fill}"));
    assert!(size <= 64, "{size} MiB stored under a 64 MiB quota");

    // Still serving; the bystander writes as much as the hog could not.
    let ok = gw.ok(["sandbox", "exec", "hog", "--", "echo", "alive"]);
    assert_eq!(ok.stdout.trim(), "alive");
    assert_eq!(phase(&gw, "hog"), "Ready");
    let other = gw.ok([
        "sandbox",
        "exec",
        "bystander",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/sandbox/f bs=1M count=48 2>/dev/null && echo wrote",
    ]);
    assert_eq!(other.stdout.trim(), "wrote", "{other}");

    // The quota goes with the sandbox: its subvolume is removed.
    let hog = dir
        .path()
        .join("state/sandboxes")
        .join(sandbox_id(&gw, "hog"));
    assert!(hog.exists());
    gw.ok(["sandbox", "delete", "hog"]);
    assert!(!hog.exists(), "{} is left behind", hog.display());
}

/// The host's view of the processes in a sandbox's `supervisor` cgroup
/// (init and the supervisor), on cgroup v1 or v2.
fn supervisor_pids(id: &str) -> Vec<String> {
    let candidates = [
        format!("/sys/fs/cgroup/memory/openshell/{id}/supervisor/cgroup.procs"),
        format!("/sys/fs/cgroup/openshell/{id}/supervisor/cgroup.procs"),
    ];
    let procs = candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_else(|| panic!("no supervisor cgroup among {candidates:?}"));
    let mut pids: Vec<String> = procs.lines().map(String::from).collect();
    pids.sort();
    pids
}

#[test]
fn issue_14_filling_the_memory_limit_with_tmpfs_cannot_kill_the_supervisor() {
    let dir = TempDir::new().unwrap();
    let gw = crate::process::process_gateway(dir.path());
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "m",
        "--memory-mib",
        "64",
        "--",
        "true",
    ]);
    let id = sandbox_id(&gw, "m");
    let before = supervisor_pids(&id);
    assert_eq!(before.len(), 2, "init and the supervisor: {before:?}");

    // tmpfs pages count against the limit and no kill frees them: with
    // one cgroup for all, the biggest process left, the supervisor, was
    // killed next and the sandbox went to Error.
    let fill = crate::harness::run(gw.cli([
        "sandbox",
        "exec",
        "m",
        "--",
        "sh",
        "-c",
        "head -c 200M /dev/zero > /dev/shm/fill",
    ]));
    assert!(!fill.success, "200 MiB fit under a 64 MiB limit: {fill}");
    // Whatever else sandbox code now tries is killed in its own cgroup.
    let _ = crate::harness::run(gw.cli(["sandbox", "exec", "m", "--", "true"]));

    assert_eq!(supervisor_pids(&id), before, "the supervisor was replaced");
    assert_eq!(phase(&gw, "m"), "Ready");
    let log = gw.log();
    assert_eq!(log.matches("supervisor connected").count(), 1, "{log}");
    assert!(!log.contains("supervisor session ended"), "{log}");
    gw.ok(["sandbox", "delete", "m"]);
}
