//! Issue 18's habits: embedded drivers, shell completions, `doctor`,
//! `--metrics-addr`, and tables that end with a newline.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::harness::{Gateway, as_strs, load_echo, openshell, process_flags, run};

/// Issue 18: a gateway started with no `--driver-dir` loads the drivers
/// built into the binary (it failed with `driver "process" not found`).
#[test]
fn issue_18_gateway_start_without_a_driver_dir_loads_the_embedded_drivers() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::start(
        dir.path(),
        &["--db-url", "sqlite::memory:", "--drivers", "process,vm"],
    );
    assert!(gw.log().contains("(embedded)"), "{}", gw.log());
    let status = gw.ok(["status"]);
    assert!(status.stdout.contains("process, vm"), "{status}");
    let create = gw.ok([
        "sandbox", "create", "--driver", "process", "--", "echo", "hi",
    ]);
    assert_eq!(create.stdout, "hi\n", "{create}");
}

/// `--driver-dir` still wins over the embedded build.
#[test]
fn issue_18_a_driver_dir_overrides_the_embedded_drivers() {
    let dir = TempDir::new().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let started = run(openshell([
        "gateway",
        "start",
        "--port",
        "0",
        "--disable-tls",
        "--disable-gateway-auth",
        "--db-url",
        "sqlite::memory:",
        "--drivers",
        "process",
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--driver-dir",
        empty.to_str().unwrap(),
    ]));
    assert!(!started.success, "{started}");
    assert!(
        started.stderr.contains(r#"driver "process" not found"#),
        "{started}"
    );
    assert!(
        started.stderr.contains(empty.to_str().unwrap()),
        "{started}"
    );
}

#[test]
fn issue_18_completions_define_the_function_and_name_the_subcommands() {
    let bash = run(openshell(["completions", "bash"]));
    assert!(bash.success, "{bash}");
    assert!(bash.stdout.contains("_openshell()"), "{bash}");
    assert!(
        bash.stdout.contains("complete -F _openshell"),
        "no `complete` line"
    );
    for sub in [
        "sandbox",
        "gateway",
        "plugin",
        "image",
        "doctor",
        "completions",
    ] {
        assert!(bash.stdout.contains(sub), "bash completion lacks {sub}");
    }
    let zsh = run(openshell(["completions", "zsh"]));
    assert!(zsh.stdout.starts_with("#compdef openshell"), "{zsh}");
    let fish = run(openshell(["completions", "fish"]));
    assert!(fish.stdout.contains("complete -c openshell"), "{fish}");
    let bad = run(openshell(["completions", "tcsh"]));
    assert!(!bad.success, "{bad}");
}

/// Issue 18 item 6, on this machine as it is: every check runs, the host's
/// cgroup version and KVM are named as they are, TCG is named, exit 0.
#[test]
fn issue_18_doctor_names_this_hosts_cgroups_kvm_and_tcg_and_exits_0() {
    let dir = TempDir::new().unwrap();
    let mut cmd = openshell(["doctor"]);
    cmd.env("OPENSHELL_STATE_DIR", dir.path());
    let doctor = run(cmd);
    assert!(doctor.success, "{doctor}");
    for what in [
        "root",
        "user namespaces",
        "cgroups",
        "overlayfs",
        "kvm",
        "tcg",
        "vm runtime",
        "state dir",
        "disk",
    ] {
        assert!(
            doctor.stdout.lines().any(|l| l[6..].starts_with(what)),
            "no {what} line: {doctor}"
        );
    }
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let version = if v2 { "cgroup v2" } else { "cgroup v1" };
    assert!(doctor.stdout.contains(version), "{doctor}");
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(doctor.stdout.contains("/dev/kvm is PVM"), "{doctor}");
    }
    assert!(doctor.stdout.contains("TCG"), "{doctor}");
}

/// Issue 18 item 6: a runtime dir that lacks the staged pieces is named,
/// with the task that stages it; the process driver's checks still pass.
#[test]
fn issue_18_doctor_with_a_missing_runtime_says_what_to_run() {
    let dir = TempDir::new().unwrap();
    let mut cmd = openshell(["doctor", "--vm-runtime"]);
    cmd.arg(dir.path().join("runtime"))
        .env("OPENSHELL_STATE_DIR", dir.path());
    let doctor = run(cmd);
    assert!(doctor.success, "{doctor}");
    let line = doctor
        .stdout
        .lines()
        .find(|l| l.contains("vm runtime"))
        .unwrap_or_else(|| panic!("no vm runtime line: {doctor}"));
    assert!(line.starts_with("warn"), "{line}");
    assert!(line.contains("is missing: run `just vm-setup`"), "{line}");
}

/// Issue 18: `--metrics-addr` serves the Prometheus text format over
/// plain HTTP, counting what a create and an exec did.
#[test]
fn issue_18_metrics_count_a_create_and_an_exec_over_http() {
    let dir = TempDir::new().unwrap();
    let mut flags = process_flags();
    flags.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
    let gw = Gateway::start(dir.path(), &as_strs(&flags));
    let line = gw
        .next_line(Duration::from_secs(10))
        .expect("a metrics line");
    let addr = line
        .strip_prefix("Metrics on http://")
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected line: {line:?}"))
        .to_owned();

    gw.ok(["sandbox", "create", "--name", "m1", "--driver", "process"]);
    let exec = gw.ok(["sandbox", "exec", "m1", "--", "echo", "ran"]);
    assert_eq!(exec.stdout, "ran\n", "{exec}");

    let (head, body) = http_get(&addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    for line in [
        "openshell_sandbox_creates_total 1",
        "openshell_sandbox_create_seconds_count 1",
        "openshell_execs_total 1",
        "openshell_relays_total 1",
        "openshell_sandboxes{phase=\"Ready\"} 1",
        "openshell_sandboxes{phase=\"Error\"} 0",
        "openshell_egress_decisions_total{verdict=\"allow\"} 0",
    ] {
        assert!(body.lines().any(|l| l == line), "{line:?} missing:\n{body}");
    }
    assert!(
        body.contains("openshell_plugin_call_seconds_count{plugin=\"process\"}"),
        "{body}"
    );
    let (head, _) = http_get(&addr, "/");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// Issue 18: `plugin load` and `plugin list` tables end with a newline and
/// carry no trailing blanks (a plugin without grants had a blank last cell).
#[test]
fn issue_18_plugin_tables_end_with_a_newline() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::in_memory(dir.path());
    let load = load_echo(&gw);
    let trap = crate::harness::wasm("fixture_trap");
    let bare = gw.ok(["plugin", "load", trap.to_str().unwrap(), "--name", "bare"]);
    let list = gw.ok(["plugin", "list"]);
    for run in [&load, &bare, &list] {
        assert!(run.stdout.ends_with('\n'), "{run}");
        for line in run.stdout.lines() {
            assert_eq!(line, line.trim_end(), "trailing blanks: {run}");
        }
    }
    assert_eq!(list.stdout.lines().count(), 3, "{list}");
}

/// `GET path` over a fresh connection: (status line and headers, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read the reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a header block");
    (head.to_owned(), body.to_owned())
}
