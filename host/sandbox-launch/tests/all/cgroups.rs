//! Where the limits go, and that they fail closed: a limit that cannot be
//! applied is a refused launch (exit 123, one line saying which limit and
//! why), never a warning and a sandbox without it.
//!
//! These tests point `cgroup_root` at real cgroup filesystems they mount
//! themselves: a second view of a v1 controller, or the unified hierarchy.
//! This host is hybrid (controllers on v1), so its unified hierarchy has no
//! memory, pids or cpu controller to delegate; limits *enforced* on v2 are
//! tested in a VM guest, not here.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::harness::{Mount, Outcome, Sandbox};

const MARKER: &str = "touch /sandbox/ran";

/// The launcher's exit status when a sandbox's cgroup cannot be set up.
const CGROUP_FAILED: i32 = 123;

fn assert_fails_closed(sandbox: &Sandbox, outcome: &Outcome, why: &str) {
    assert_eq!(outcome.code, Some(CGROUP_FAILED), "{outcome:?}");
    let lines: Vec<&str> = outcome.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{outcome:?}");
    assert!(
        lines[0].starts_with(
            "openshell-sandbox-launch: refusing to start the sandbox without its cgroup limits: "
        ),
        "{outcome:?}"
    );
    assert!(lines[0].contains(why), "{why:?} in {:?}", lines[0]);
    assert!(!sandbox.workdir().join("ran").exists(), "the program ran");
}

fn sandbox_under(root: &Path, script: &str) -> Sandbox {
    let mut sandbox = Sandbox::new(script);
    sandbox.set("cgroup_root", json!(root));
    sandbox
}

fn limited(sandbox: &mut Sandbox, limit: &str) {
    let value = match limit {
        "memory_mib" => 64,
        "max_processes" => 64,
        "cpu_millis" => 500,
        other => panic!("no such limit {other}"),
    };
    sandbox.set(limit, json!(value));
}

#[test]
fn a_memory_limit_without_a_v1_memory_controller_fails_closed() {
    // Only pids is mounted under the root the launcher may use.
    let pids = Mount::new("cgroup", "pids");
    for limit in ["memory_mib", "cpu_millis"] {
        let mut sandbox = sandbox_under(pids.path(), MARKER);
        limited(&mut sandbox, limit);
        let outcome = sandbox.run();
        let controller = if limit == "memory_mib" {
            "memory"
        } else {
            "cpu"
        };
        assert_fails_closed(
            &sandbox,
            &outcome,
            &format!(
                "the {controller} limit cannot be applied: no cgroup v1 hierarchy under {:?} \
                 carries the `{controller}` controller",
                pids.path()
            ),
        );
        let dir = pids.path().join("openshell").join(&sandbox.id);
        assert!(!dir.exists(), "{dir:?} is left behind");
    }
}

#[test]
fn a_limit_whose_v1_controller_is_under_the_cgroup_root_is_applied() {
    let pids = Mount::new("cgroup", "pids");
    let mut sandbox = sandbox_under(pids.path(), "echo ready; exec sleep 1000");
    sandbox.set("max_processes", json!(9));
    let mut running = sandbox.start();
    running.wait_for_line("ready");
    let dir = pids.path().join("openshell").join(&sandbox.id);
    // Sandbox code's limit is on its leaf (issue 14 item 7).
    let max = fs::read_to_string(dir.join("workload/pids.max")).unwrap();
    assert_eq!(max.trim(), "9");
    let max = fs::read_to_string(dir.join("supervisor/pids.max")).unwrap();
    assert_eq!(max.trim(), "max", "nothing limits the supervisor's tasks");
    running.signal("TERM");
    assert_eq!(running.wait().code, Some(143));
    assert!(!dir.exists(), "{dir:?} is left behind");
}

#[test]
fn a_cgroup_mount_hidden_under_another_filesystem_fails_closed() {
    // Mountinfo still lists the pids hierarchy, but writing "limits" into
    // the tmpfs on top would limit nothing.
    let mut pids = Mount::new("cgroup", "pids");
    pids.cover_with_tmpfs();
    let mut sandbox = sandbox_under(pids.path(), MARKER);
    sandbox.set("max_processes", json!(9));
    let outcome = sandbox.run();
    assert_fails_closed(
        &sandbox,
        &outcome,
        &format!("{:?} is not a cgroup filesystem", pids.path()),
    );
    assert!(!pids.path().join("openshell").exists());
}

#[test]
fn with_no_cgroup_hierarchy_every_limit_fails_closed() {
    for (limit, controller) in [
        ("memory_mib", "memory"),
        ("max_processes", "pids"),
        ("cpu_millis", "cpu"),
    ] {
        let empty = tempfile::tempdir().unwrap();
        let mut sandbox = sandbox_under(empty.path(), MARKER);
        limited(&mut sandbox, limit);
        let outcome = sandbox.run();
        assert_fails_closed(
            &sandbox,
            &outcome,
            &format!(
                "the {controller} limit cannot be applied: no cgroup hierarchy is mounted under {:?}",
                empty.path()
            ),
        );
    }
}

#[test]
fn with_no_cgroup_hierarchy_a_sandbox_without_limits_still_runs() {
    let empty = tempfile::tempdir().unwrap();
    let sandbox = sandbox_under(empty.path(), "echo ran");
    let outcome = sandbox.run();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stdout, ["ran"]);
    assert_eq!(outcome.stderr, "");
}

/// The controllers the unified hierarchy can hand out on this host.
fn v2_controllers(v2: &Mount) -> String {
    fs::read_to_string(v2.path().join("cgroup.controllers")).unwrap()
}

#[test]
fn on_cgroup_v2_a_limit_whose_controller_is_not_delegated_fails_closed() {
    let v2 = Mount::new("cgroup2", "");
    let available = v2_controllers(&v2);
    for (limit, controller) in [
        ("memory_mib", "memory"),
        ("max_processes", "pids"),
        ("cpu_millis", "cpu"),
    ] {
        if available.split_whitespace().any(|c| c == controller) {
            // Not `eprintln!`: libtest captures that for a passing test.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the v2 {controller} case: this host's unified hierarchy has the \
                 controller (only hybrid hosts lack it)"
            );
            continue;
        }
        let mut sandbox = sandbox_under(v2.path(), MARKER);
        limited(&mut sandbox, limit);
        let outcome = sandbox.run();
        assert_fails_closed(
            &sandbox,
            &outcome,
            &format!(
                "the {controller} limit cannot be applied: cgroup v2 controller `{controller}` \
                 is not delegated to the gateway's cgroup"
            ),
        );
        let dir = v2.path().join("openshell").join(&sandbox.id);
        assert!(!dir.exists(), "{dir:?} was created");
    }
}

/// Runs the launcher from inside `cgroup` (a directory of the mounted
/// unified hierarchy), as a gateway started there would.
fn run_from(sandbox: &Sandbox, cgroup: &Path) -> (String, Outcome) {
    let launcher = sandbox.command();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$1\"/cgroup.procs && shift && exec \"$@\"")
        .arg("sh")
        .arg(cgroup)
        .arg(launcher.get_program())
        .args(launcher.get_args());
    sandbox.host_view_of_cgroup(&mut cmd)
}

/// The sandbox's cgroup as the host sees it (`0::<path>` of
/// [`Sandbox::host_view_of_cgroup`]; inside, a cgroup namespace shows `/`).
fn unified_line(view: &str) -> &str {
    view.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no unified line in {view:?}"))
}

/// Removes `dirs` (cgroups, innermost first) if they exist.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[test]
fn on_cgroup_v2_sandboxes_live_under_the_gateways_own_cgroup() {
    let v2 = Mount::new("cgroup2", "");
    let gateway = format!("gateway-{}", std::process::id());
    let base = v2.path().join(&gateway);
    let leaf = base.join("openshell-gateway");
    let _cleanup = Cleanup(vec![leaf.clone(), base.join("openshell"), base.clone()]);
    fs::create_dir_all(&leaf).unwrap();

    // Started in the gateway's cgroup, and in the leaf an earlier launch
    // moved the gateway into: the same place either way.
    for start in [&base, &leaf] {
        let sandbox = sandbox_under(v2.path(), "echo up; exec sleep 30");
        let (view, _) = run_from(&sandbox, start);
        assert_eq!(
            unified_line(&view),
            format!("/{gateway}/openshell/{}/workload", sandbox.id)
        );
        let dir = base.join("openshell").join(&sandbox.id);
        assert!(!dir.exists(), "{dir:?} is left behind");
    }
}

#[test]
fn on_cgroup_v2_a_sandbox_without_limits_gets_its_own_cgroup_which_is_removed_after() {
    let v2 = Mount::new("cgroup2", "");
    let sandbox = sandbox_under(v2.path(), "echo up; exec sleep 30");
    // No limits, so no controller to enable and nothing to move: the
    // sandbox goes under this test's own cgroup.
    let (view, _) = sandbox.host_view_of_cgroup(&mut sandbox.command());
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    let expected = Path::new(own).join("openshell").join(&sandbox.id);
    assert_eq!(Path::new(unified_line(&view)), expected.join("workload"));
    let dir = v2.path().join(expected.strip_prefix("/").unwrap());
    assert!(!dir.exists(), "{dir:?} is left behind");
}
