//! Issue 13, item 4: the API port survives a connection flood from an
//! unprivileged local user, and the gateway degrades instead of running out
//! of file descriptors.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{Gateway, KillOnDrop, Lines, wasm};

/// Opens N connections to 127.0.0.1:PORT, never sends a byte, and keeps N
/// open: whatever the gateway closes is dialled again. Prints how many the
/// first round opened, then runs until killed.
const ATTACKER: &str = r#"
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
def dial():
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return False
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    return True
print(sum(dial() for _ in range(n)), flush=True)
while True:
    for key, _ in sel.select(timeout=1):
        sel.unregister(key.fileobj)
        key.fileobj.close()
        dial()
"#;

/// `nobody`: the attacker holds no privilege over the gateway.
const NOBODY: u32 = 65534;

/// Runs `cmd` and says whether it succeeded before `deadline` passed (a
/// deadline, not a latency measurement); its stderr on failure.
fn succeeds_within(mut cmd: Command, deadline: Duration) -> Result<(), String> {
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = KillOnDrop(
        cmd.stdout(Stdio::null())
            .stderr(err.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    match child.wait_until(Instant::now() + deadline) {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!(
            "{s}: {}",
            std::fs::read_to_string(err.path()).unwrap_or_default()
        )),
        None => Err(format!("still running after {deadline:?}")),
    }
}

/// Regression, issue 13 item 4 (and the fd exhaustion of item 1): 1,100
/// silent connections from `nobody` made `openshell status` time out. Here
/// the gateway cannot raise its fd limit (soft = hard = 1,024), so only the
/// handshake deadline and the connection budget stand between the flood
/// and the fd table.
#[test]
fn issue_13_a_local_users_connection_flood_leaves_status_and_exec_working() {
    let dir = TempDir::new().unwrap();
    let drivers = wasm("openshell_driver_process");
    let driver_dir = drivers.parent().unwrap().to_str().unwrap().to_owned();
    let gw = Gateway::secure_with_nofile(
        dir.path(),
        &[
            "--db-url",
            "sqlite::memory:",
            "--drivers",
            "process",
            "--driver-dir",
            &driver_dir,
        ],
        (1024, 1024),
    );
    gw.ok(["sandbox", "create", "--name", "f1", "--", "true"]);
    let port = gw.endpoint.rsplit(':').next().unwrap().to_owned();

    let mut attacker = Command::new("/usr/bin/python3");
    attacker
        .args(["-c", ATTACKER, &port, "1100"])
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut attacker = KillOnDrop(attacker.spawn().expect("spawn python3 as nobody"));
    let opened = Lines::of(&mut attacker.0)
        .next(Duration::from_secs(120))
        .expect("the attacker reports how many it opened");
    let opened: u32 = opened.trim().parse().unwrap();
    assert!(opened >= 1000, "the flood itself failed: {opened} opened");

    for i in 0..5 {
        if let Err(e) = succeeds_within(gw.cli(["status"]), Duration::from_secs(2)) {
            panic!(
                "status {i} under the flood failed: {e}\ngateway log:\n{}",
                gw.log()
            );
        }
    }
    let exec = gw.ok(["sandbox", "exec", "f1", "--", "echo", "still here"]);
    assert_eq!(exec.stdout, "still here\n", "{exec}");
    assert!(
        attacker.0.try_wait().unwrap().is_none(),
        "the attacker kept flooding throughout"
    );
}

/// Issue 13 item 1: the gateway raises its soft fd limit at start, so a
/// service manager's default of 1,024 does not cap it.
#[test]
fn issue_13_a_gateway_started_at_a_low_soft_fd_limit_raises_it_to_the_hard_limit() {
    let dir = TempDir::new().unwrap();
    let gw =
        Gateway::secure_with_nofile(dir.path(), &["--db-url", "sqlite::memory:"], (1024, 4096));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3..5], ["4096", "4096"], "{line}");
}
