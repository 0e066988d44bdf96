//! The process driver through the CLI, and what a gateway crash leaves.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{Gateway, as_strs, process_flags, run};

pub fn process_gateway(dir: &std::path::Path) -> Gateway {
    Gateway::start(dir, &as_strs(&process_flags()))
}

/// Host processes (launchers and everything inside sandboxes) that mention
/// one of these sandbox ids in their command line or environment.
fn leftovers(ids: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let (cmd, env) = (String::from_utf8_lossy(&cmd), String::from_utf8_lossy(&env));
        // Zombies have empty cmdlines and are already dead.
        if ids
            .iter()
            .any(|id| cmd.contains(id.as_str()) || env.contains(id.as_str()))
        {
            out.push(format!(
                "{}: {}",
                e.file_name().to_string_lossy(),
                cmd.replace('\0', " ")
            ));
        }
    }
    out
}

#[test]
fn create_runs_a_command_and_exec_returns_codes_and_forwards_stdin() {
    let dir = TempDir::new().unwrap();
    let gw = process_gateway(dir.path());

    let create = gw.ok([
        "sandbox", "create", "--name", "c1", "--driver", "process", "--", "echo", "hi",
    ]);
    assert_eq!(create.stdout, "hi\n", "{create}");
    assert!(create.stderr.contains("Created sandbox: c1"), "{create}");

    let get = gw.ok(["sandbox", "get", "c1", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
    assert_eq!(v["isolation"], "process", "{get}");

    let three = gw.fails(["sandbox", "exec", "c1", "--", "sh", "-c", "exit 3"]);
    assert_eq!(three.code, Some(3), "{three}");

    let split = gw.ok([
        "sandbox",
        "exec",
        "c1",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2",
    ]);
    assert_eq!(
        (split.stdout.as_str(), split.stderr.as_str()),
        ("out\n", "err\n"),
        "{split}"
    );

    let mut cat = gw.cli(["sandbox", "exec", "c1", "--", "cat"]);
    cat.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cat.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"data\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "data\n");
    assert!(out.status.success());

    let rm = gw.ok(["sandbox", "create", "--name", "c2", "--rm", "--", "true"]);
    assert!(rm.stderr.contains("Created sandbox: c2"), "{rm}");
    let names = gw.ok(["sandbox", "list", "--names"]);
    assert_eq!(names.stdout, "c1\n", "--rm deleted c2: {names}");
}

#[test]
fn killing_the_gateway_leaves_no_sandbox_process_behind() {
    let dir = TempDir::new().unwrap();
    let gw = process_gateway(dir.path());
    let mut ids = Vec::new();
    for name in ["k1", "k2"] {
        gw.ok(["sandbox", "create", "--name", name, "--", "true"]);
        let get = gw.ok(["sandbox", "get", name, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    assert!(
        leftovers(&ids).len() >= 4,
        "launchers and supervisors run: {:?}",
        leftovers(&ids)
    );

    let pid = gw.pid();
    let kill = run({
        let mut c = std::process::Command::new("kill");
        c.args(["-KILL", &pid.to_string()]);
        c
    });
    assert!(kill.success, "{kill}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = leftovers(&ids);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 15 s after SIGKILL: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A launcher killed with the gateway cannot remove its cgroups; no
    // gateway comes back for these sandboxes, so the test does.
    for id in &ids {
        for c in ["memory", "pids", "cpu"] {
            let dir = format!("/sys/fs/cgroup/{c}/openshell/{id}");
            for leaf in ["/workload", "/supervisor", ""] {
                let _ = std::fs::remove_dir(format!("{dir}{leaf}"));
            }
        }
    }
}
