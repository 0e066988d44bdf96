//! Issue 14 items 6 and 7 and issue 17, by attack from sandbox code: past
//! its own disk size, and filling the memory limit with pages no OOM kill
//! frees. Each fails for sandbox code alone; the sandbox and the gateway
//! keep serving. And what a create with a bad disk size, or on a host
//! short of disk, is told.

use std::path::Path;

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

/// `sandbox get NAME -o json`'s `disk_gib`.
pub fn disk_gib(gw: &Gateway, name: &str) -> u64 {
    let get = gw.ok(["sandbox", "get", name, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
    v["disk_gib"]
        .as_u64()
        .unwrap_or_else(|| panic!("no disk_gib in {v}"))
}

/// The quota on the subvolume at `path`, as btrfs-progs reads it back
/// from the host (`None`: no limit).
pub fn quota_of(path: &Path) -> Option<u64> {
    let show = std::process::Command::new("btrfs")
        .args(["qgroup", "show", "-rf", "--raw"])
        .arg(path)
        .output()
        .expect("run btrfs");
    let text = String::from_utf8_lossy(&show.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("0/"))
        .unwrap_or_else(|| panic!("no qgroup for {}: {text}{show:?}", path.display()));
    row.split_whitespace().nth(3)?.parse().ok()
}

pub const GIB: u64 = 1 << 30;

/// Writes `mib` MiB of zeros to `file` in sandbox `name`, insists that the
/// sandbox's disk size stopped the write (EDQUOT; ENOSPC if the whole
/// sandbox disk filled first), and returns the MiB that were stored.
pub fn fill_until_refused(gw: &Gateway, name: &str, file: &str, mib: u64) -> u64 {
    let script = format!(
        "dd if=/dev/zero of={file} bs=1M count={mib} 2>&1; sync; \
         echo size=$(($(stat -c %s {file}) >> 20))"
    );
    let fill = crate::harness::run(gw.cli(["sandbox", "exec", name, "--", "sh", "-c", &script]));
    assert!(
        fill.stdout.contains("Disk quota exceeded") || fill.stdout.contains("No space left"),
        "the write was not stopped: {fill}"
    );
    fill.stdout
        .lines()
        .find_map(|l| l.strip_prefix("size="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size in {fill}"))
}

#[test]
fn issue_17_a_sandbox_stores_at_most_its_own_disk_size_and_everything_keeps_serving() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::start(dir.path(), &as_strs(&process_flags()));
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "hog",
        "--disk-gib",
        "1",
        "--",
        "true",
    ]);
    gw.ok(["sandbox", "create", "--name", "bystander", "--", "true"]);
    assert_eq!(disk_gib(&gw, "hog"), 1);
    assert_eq!(disk_gib(&gw, "bystander"), 8, "the gateway's default");
    let sandboxes = dir.path().join("state/sandboxes");
    let hog = sandboxes.join(sandbox_id(&gw, "hog"));
    assert_eq!(quota_of(&hog), Some(GIB));
    assert_eq!(
        quota_of(&sandboxes.join(sandbox_id(&gw, "bystander"))),
        Some(8 * GIB)
    );

    let stored = fill_until_refused(&gw, "hog", "/sandbox/fill", 1100);
    // Close to its own size: neither another sandbox's nor a gateway-wide one.
    assert!(
        (900..=1024).contains(&stored),
        "{stored} MiB stored under a 1 GiB disk"
    );

    // Still serving: the hog, the gateway, a new sandbox.
    let ok = gw.ok(["sandbox", "exec", "hog", "--", "echo", "alive"]);
    assert_eq!(ok.stdout.trim(), "alive");
    assert_eq!(phase(&gw, "hog"), "Ready");
    gw.ok(["status"]);
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
    let after = gw.ok(["sandbox", "create", "--name", "after", "--", "echo", "hi"]);
    assert_eq!(after.stdout.trim(), "hi", "{after}");

    // The quota goes with the sandbox: its subvolume is removed.
    assert!(hog.exists());
    gw.ok(["sandbox", "delete", "hog"]);
    assert!(!hog.exists(), "{} is left behind", hog.display());
}

#[test]
fn issue_17_a_create_with_a_bad_disk_size_or_below_the_disk_reserve_stores_nothing() {
    let dir = TempDir::new().unwrap();
    let mut flags = process_flags();
    // More than any host here has free.
    flags.extend(["--disk-reserve-gib", "1000000"].map(String::from));
    let gw = Gateway::start(dir.path(), &as_strs(&flags));
    let nothing_stored = || {
        let list = gw.ok(["sandbox", "list", "--names"]);
        assert_eq!(list.stdout, "", "{list}");
        let dirs: Vec<_> = std::fs::read_dir(dir.path().join("state/sandboxes"))
            .unwrap()
            .collect();
        assert!(dirs.is_empty(), "{dirs:?}");
    };

    // 0 means "the default" on the wire; the CLI says so by leaving it out.
    let zero = gw.fails(["sandbox", "create", "--disk-gib", "0", "--", "true"]);
    assert!(zero.stderr.contains("--disk-gib"), "{zero}");
    // More than the whole 64 GiB sandbox disk: checked before the reserve.
    let big = gw.fails(["sandbox", "create", "--disk-gib", "65", "--", "true"]);
    for want in ["disk_gib = 65", "ask for 1 to 64 GiB", "InvalidArgument"] {
        assert!(big.stderr.contains(want), "{want:?} missing: {big}");
    }
    nothing_stored();

    let low = gw.fails(["sandbox", "create", "--name", "r", "--", "true"]);
    for want in [
        " GiB free, below the gateway's disk reserve of 1000000 GiB",
        "--disk-reserve-gib",
        "ResourceExhausted",
    ] {
        assert!(low.stderr.contains(want), "{want:?} missing: {low}");
    }
    nothing_stored();
    gw.ok(["status"]);
}

/// The flag sandbox sizes replaced stops a start with what to use instead,
/// rather than being read as a size it never meant.
#[test]
fn issue_17_the_old_quota_flag_is_refused_with_its_replacement() {
    let dir = TempDir::new().unwrap();
    let state = dir.path().join("state");
    let start = crate::harness::run(crate::harness::openshell([
        "gateway",
        "start",
        "--port",
        "0",
        "--disable-tls",
        "--disable-gateway-auth",
        "--state-dir",
        state.to_str().unwrap(),
        "--sandbox-disk-quota-mib",
        "64",
    ]));
    assert!(!start.success, "{start}");
    for want in [
        "--sandbox-disk-quota-mib 64",
        "--default-disk-gib",
        "--disk-gib",
    ] {
        assert!(start.stderr.contains(want), "{want:?} missing: {start}");
    }
    assert!(!state.exists(), "a refused start made {}", state.display());
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
