//! What the program sees: its ids, namespaces, environment, network and
//! filesystem.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use serde_json::json;

use crate::harness::{PATH, Sandbox, processes_with_uid, within};

#[test]
fn the_program_is_root_inside_but_uid_base_on_the_host() {
    let sandbox = Sandbox::new("id -u; id -g; echo ready; exec sleep 1000");
    let mut running = sandbox.start();
    running.wait_for_line("ready");
    let pids = processes_with_uid(sandbox.uid_base);
    assert!(
        !pids.is_empty(),
        "no host process has uid {}",
        sandbox.uid_base
    );
    for pid in pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let base = sandbox.uid_base.to_string();
        for field in ["Uid:", "Gid:"] {
            let ids: Vec<_> = status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .unwrap()
                .split_whitespace()
                .collect();
            assert_eq!(ids, [base.as_str(); 4], "{field} of {pid}");
        }
    }
    running.signal("TERM");
    let outcome = running.wait();
    assert_eq!(outcome.stdout, ["0", "0", "ready"]);
}

#[test]
fn the_program_has_its_own_pid_and_uts_namespaces() {
    let sandbox = Sandbox::new("echo $$; uname -n; ls /proc | grep -c '^[0-9]'");
    let outcome = sandbox.run();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    // init is 1, the program 2; the host's hundreds of processes are absent.
    assert_eq!(outcome.stdout[0], "2");
    assert_eq!(outcome.stdout[1], sandbox.hostname());
    let visible: u32 = outcome.stdout[2].parse().unwrap();
    assert!(visible <= 5, "{visible} processes visible");
}

#[test]
fn the_program_runs_from_the_program_directory_in_the_sandbox_directory() {
    let outcome = Sandbox::new("echo $0; pwd").run();
    assert_eq!(outcome.stdout, ["/run/openshell-bin/sh", "/sandbox"]);
}

#[test]
fn the_environment_is_exactly_the_configured_one() {
    let mut sandbox = Sandbox::new("tr '\\0' '\\n' < /proc/$$/environ");
    sandbox.set(
        "env",
        json!([["PATH", PATH], ["GREETING", "hello world"], ["EMPTY", ""]]),
    );
    let mut cmd = sandbox.command();
    cmd.env("OPENSHELL_LAUNCH_TEST_MARKER", "leaked");
    let outcome = sandbox.run_command(cmd);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(
        outcome.stdout,
        [&format!("PATH={PATH}"), "GREETING=hello world", "EMPTY="]
    );
}

const NET_PROBE: &str = r#"
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
    print("host reachable")
except OSError:
    print("host unreachable")
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
socket.create_connection(server.getsockname(), timeout=2).close()
print("loopback works")
print(sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]))
"#;

fn probe_network(isolate: bool) -> Vec<String> {
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let mut sandbox = Sandbox::new(&format!("python3 /sandbox/probe.py {port}"));
    sandbox.set("isolate_network", json!(isolate));
    sandbox.add_file("probe.py", NET_PROBE);
    let outcome = sandbox.run();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    outcome.stdout
}

#[test]
fn an_isolated_network_has_only_a_working_loopback() {
    assert_eq!(
        probe_network(true),
        ["host unreachable", "loopback works", "['lo']"]
    );
}

#[test]
fn without_isolation_the_host_loopback_is_reachable() {
    let stdout = probe_network(false);
    assert_eq!(stdout[..2], ["host reachable", "loopback works"]);
}

#[test]
fn the_workdir_is_writable_and_owned_by_the_sandbox_user() {
    let sandbox = Sandbox::new("echo hi > /sandbox/x && echo wrote");
    let outcome = sandbox.run();
    assert_eq!(outcome.stdout, ["wrote"], "{outcome:?}");
    assert_eq!(
        fs::read_to_string(sandbox.workdir().join("x")).unwrap(),
        "hi\n"
    );
    let meta = fs::metadata(sandbox.workdir()).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (sandbox.uid_base + 1000, sandbox.uid_base + 1000)
    );
    assert_eq!(meta.mode() & 0o7777, 0o755);
}

#[test]
fn system_directories_and_the_program_are_mounted_read_only() {
    // Host root owns these, so the sandbox's root could not write them
    // anyway; EROFS (not EACCES) shows the mounts themselves are read-only.
    let sandbox = Sandbox::new(
        "for f in /usr/x /etc/x /bin/x /lib/x; do touch $f 2>&1; done; \
         touch /sandbox/x /tmp/x && echo writable; \
         cut -d' ' -f5,6 /proc/self/mountinfo",
    );
    let outcome = sandbox.run();
    let (touches, rest) = outcome.stdout.split_at(4);
    for line in touches {
        assert!(line.ends_with("Read-only file system"), "{line}");
    }
    assert_eq!(rest[0], "writable");
    let options = |mount_point: &str| -> Vec<&str> {
        let line = rest[1..]
            .iter()
            .find(|l| l.split(' ').next() == Some(mount_point))
            .unwrap_or_else(|| panic!("{mount_point} not mounted: {rest:?}"));
        line.split(' ').nth(1).unwrap().split(',').collect()
    };
    for mount_point in ["/usr", "/etc", "/run/openshell-bin/sh"] {
        let options = options(mount_point);
        for flag in ["ro", "nosuid", "nodev"] {
            assert!(options.contains(&flag), "{mount_point}: {options:?}");
        }
    }
    for mount_point in ["/sandbox", "/run/openshell"] {
        let options = options(mount_point);
        for flag in ["rw", "nosuid", "nodev"] {
            assert!(options.contains(&flag), "{mount_point}: {options:?}");
        }
    }
    assert!(!std::path::Path::new("/usr/x").exists());
}

#[test]
fn nothing_of_the_host_outside_the_binds_is_visible() {
    let sandbox = Sandbox::new("");
    let secret = sandbox.dir.path().join("secret");
    fs::write(&secret, "hunter2").unwrap();
    // `/tmp` exists inside too, as the sandbox's own empty tmpfs.
    let test_dir = sandbox.dir.path().to_owned();
    let script = format!(
        "ls /; echo --; ls -A /tmp; echo --; ls /run; echo --; \
         cat {secret:?} || echo no secret; ls {test_dir:?} || echo no test dir; \
         ls /var /home /root /sys 2>/dev/null || echo no var home root sys",
    );
    let mut sandbox = sandbox;
    sandbox.set("args", json!(["-c", script]));
    let outcome = sandbox.run();
    let stdout = outcome.stdout_text();
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(!stdout.contains("openshell-launch-test-"), "{stdout}");
    let listed: Vec<&str> = outcome.stdout.iter().map(String::as_str).collect();
    let expected_root = [
        "bin", "dev", "etc", "lib", "lib64", "proc", "run", "sandbox", "sbin", "tmp", "usr",
    ];
    let root_end = listed.iter().position(|l| *l == "--").unwrap();
    for entry in &listed[..root_end] {
        assert!(expected_root.contains(entry), "unexpected /{entry}");
    }
    assert_eq!(
        listed[root_end..],
        [
            "--",
            "--",
            "openshell",
            "openshell-bin",
            "--",
            "no secret",
            "no test dir",
            "no var home root sys"
        ]
    );
}

const SOCKET_CLIENT: &str = r#"
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/openshell/gateway.sock")
s.sendall(b"hello gateway")
s.close()
"#;

#[test]
fn the_gateway_socket_in_the_run_dir_can_be_connected() {
    let sandbox = Sandbox::new("python3 /sandbox/client.py && echo sent");
    sandbox.add_file("client.py", SOCKET_CLIENT);
    let path = sandbox.run_dir().join("gateway.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // The sandbox's root is an unprivileged host user: it needs write
    // permission on the socket (the run dir is 0755 in the harness).
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    let outcome = sandbox.run();
    assert_eq!(outcome.stdout, ["sent"], "{outcome:?}");
    listener.set_nonblocking(true).unwrap();
    let mut received = String::new();
    let accepted = within(Duration::from_secs(30), || {
        listener.accept().is_ok_and(|(mut conn, _)| {
            conn.set_nonblocking(false).unwrap();
            conn.read_to_string(&mut received).unwrap();
            true
        })
    });
    assert!(accepted, "the sandbox's connection never arrived");
    assert_eq!(received, "hello gateway");
}
