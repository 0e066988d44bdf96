//! VM sandboxes through the CLI (issue 6): a real microVM boots on the
//! backend the cached probe chose (QEMU/TCG on these machines), runs the
//! guest kernel, and its network reaches the gateway and nothing else.
//!
//! Skips, loudly and with the reason, only when no VM backend booted the
//! probe guest (`just vm-setup` writes `runtime/backend`).

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::harness::{Gateway, wasm};

fn runtime_dir() -> PathBuf {
    std::env::var_os("OPENSHELL_VM_RUNTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runtime"))
}

/// The runtime dir, or why no VM can boot here.
fn bootable() -> Result<PathBuf, String> {
    let rt = runtime_dir();
    let probe = std::fs::read_to_string(rt.join("backend")).map_err(|e| {
        format!(
            "{}/backend unreadable ({e}): run `just vm-setup`",
            rt.display()
        )
    })?;
    if probe.lines().any(|l| l == "backend=none") {
        return Err(format!("no VM backend booted the probe guest:\n{probe}"));
    }
    if !rt.join("rootfs/base.cpio").is_file() {
        return Err("runtime/rootfs/base.cpio is missing: run `just vm-rootfs`".into());
    }
    Ok(rt)
}

/// Inodes of TCP sockets in LISTEN state in `pid`'s network namespace.
fn listening_inodes(pid: u32) -> HashSet<String> {
    let mut out = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" {
                out.insert(f[9].to_owned());
            }
        }
    }
    out
}

/// Socket inodes `pid` holds open.
fn socket_inodes(pid: u32) -> HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect()
}

/// The gvproxy serving `sandbox_dir`, found by its socket path argument.
pub(crate) fn gvproxy_of(sandbox_dir: &Path) -> Option<u32> {
    // gvproxy and QEMU keep their sockets in /run/openshell-vm/<id>.
    let id = sandbox_dir.file_name()?.to_string_lossy().into_owned();
    let needle = format!("/run/openshell-vm/{id}/net.sock");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("gvproxy") && cmd.contains(&needle)).then_some(pid)
    })
}

/// The staged VM runtime, or None, said loudly, when no VM can boot here.
/// CI stages the runtime first; there a missing VM is a failure.
pub(crate) fn vm_runtime(test: &str) -> Option<PathBuf> {
    match bootable() {
        Ok(rt) => Some(rt),
        Err(why) => {
            assert!(
                std::env::var_os("OPENSHELL_REQUIRE_VM").is_none(),
                "OPENSHELL_REQUIRE_VM is set but no VM can boot: {why}"
            );
            crate::harness::skip(&format!("{test}: {why}"));
            None
        }
    }
}

/// A state dir on a short path (unix socket paths are limited to 108
/// bytes).
pub(crate) fn short_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("osvm")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A gateway with only the vm driver in `dir`, with `extra` flags.
pub(crate) fn start_vm_gateway(dir: &Path, rt: &Path, extra: &[&str]) -> Gateway {
    start_with_drivers(dir, rt, "vm", extra)
}

/// A gateway with the bundled `drivers` (comma-separated) and the VM
/// runtime `rt`.
pub(crate) fn start_with_drivers(dir: &Path, rt: &Path, drivers: &str, extra: &[&str]) -> Gateway {
    let driver = wasm("openshell_driver_vm");
    let driver_dir = driver.parent().unwrap().to_str().unwrap().to_owned();
    let mut args = vec!["--drivers", drivers, "--driver-dir", &driver_dir];
    args.extend_from_slice(extra);
    Gateway::start_with_env(
        dir,
        &args,
        &[("OPENSHELL_VM_RUNTIME", rt.to_str().unwrap())],
    )
}

/// A gateway with only the vm driver and an in-memory database, or None
/// when no VM can boot here (see [`vm_runtime`]).
pub(crate) fn vm_gateway(test: &str) -> Option<(PathBuf, tempfile::TempDir, Gateway)> {
    let rt = vm_runtime(&format!("issue_6 {test}"))?;
    let tmp = short_dir();
    let gw = start_vm_gateway(
        tmp.path(),
        &rt,
        &[
            "--db-url",
            "sqlite::memory:",
            // A small sandbox disk: the secret test greps every byte of it.
            "--sandbox-disk-gib",
            "1",
        ],
    );
    Some((rt, tmp, gw))
}

#[test]
fn issue_6_a_vm_sandbox_runs_the_guest_kernel_and_reaches_only_the_gateway() {
    let Some((rt, tmp, gw)) = vm_gateway("VM test") else {
        return;
    };

    // A second service on host loopback that the guest must not reach.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    {
        let hits = hits.clone();
        std::thread::spawn(move || {
            for c in other.incoming() {
                if c.is_ok() {
                    hits.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }

    let created = gw.ok(["sandbox", "create", "--name", "vm1", "--", "uname", "-r"]);
    let guest_kernel = std::fs::read_to_string(rt.join("kernel/release")).unwrap();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(created.stdout.trim(), guest_kernel.trim(), "{created}");
    assert_ne!(
        created.stdout.trim(),
        host_kernel.trim(),
        "the guest ran the host's kernel"
    );
    let backend = std::fs::read_to_string(rt.join("backend")).unwrap();
    if backend.contains("backend=qemu-tcg") {
        assert!(
            created.stderr.contains("no hardware isolation"),
            "{created}"
        );
        let get = gw.ok(["sandbox", "get", "vm1", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
        assert_eq!(v["isolation"], "vm-tcg", "{get}");
    }

    // gvproxy holds no TCP listener (its namespace's one listener is the
    // gateway's forwarder, not gvproxy's).
    let ids = gw.ok(["sandbox", "list", "--ids"]);
    let id = ids.stdout.trim().to_owned();
    let sandbox_dir = tmp.path().join("state/sandboxes").join(&id);
    let gvproxy = gvproxy_of(&sandbox_dir).expect("a gvproxy for the sandbox");
    let listening = listening_inodes(gvproxy);
    let held = socket_inodes(gvproxy);
    assert!(
        listening.is_disjoint(&held),
        "gvproxy {gvproxy} holds a TCP listener"
    );

    // The guest cannot reach another host loopback port through gvproxy's
    // 192.168.127.254 NAT.
    let probe = crate::harness::run(gw.cli([
        "sandbox",
        "exec",
        "vm1",
        "--",
        "nc",
        "-w",
        "2",
        "192.168.127.254",
        &other_port.to_string(),
    ]));
    assert!(
        !probe.success,
        "the guest connected to host 127.0.0.1:{other_port}: {probe}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the second loopback listener was reached"
    );

    gw.ok(["sandbox", "delete", "vm1"]);
    assert!(
        gvproxy_of(&sandbox_dir).is_none(),
        "gvproxy outlived its sandbox"
    );
    let (status, _) = gw.terminate(Duration::from_secs(15));
    assert!(status.success());
}

/// Host processes (QEMU, gvproxy) of this sandbox dir's VM (their command
/// lines name its socket dir, `/run/openshell-vm/<id>`).
fn vm_processes(sandbox_dir: &Path) -> Vec<(u32, String)> {
    let id = sandbox_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let needle = format!("/run/openshell-vm/{id}/");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) && (cmd.contains("qemu-system") || cmd.contains("gvproxy")) {
            out.push((pid, cmd));
        }
    }
    out
}

#[test]
fn issue_6_a_killed_vm_errors_and_a_killed_gateway_leaves_no_vm_process() {
    let Some((_rt, tmp, gw)) = vm_gateway("VM kill test") else {
        return;
    };
    let sandboxes = tmp.path().join("state/sandboxes");
    let dir_of = |name: &str| {
        let get = gw.ok(["sandbox", "get", name, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
        sandboxes.join(v["id"].as_str().unwrap())
    };

    // Killing the VM puts its sandbox in Error with ProcessExited.
    gw.ok(["sandbox", "create", "--name", "k1"]);
    let k1 = dir_of("k1");
    let qemu = vm_processes(&k1)
        .into_iter()
        .find(|(_, c)| c.contains("qemu-system"))
        .expect("a QEMU for k1");
    assert!(
        crate::harness::run({
            let mut c = std::process::Command::new("kill");
            c.args(["-KILL", &qemu.0.to_string()]);
            c
        })
        .success
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let get = gw.ok(["sandbox", "get", "k1", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
        if v["phase"] == "Error" {
            let ready = &v["conditions"][0];
            assert_eq!(ready["reason"], "ProcessExited", "{get}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "k1 never reached Error: {get}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A SIGKILLed gateway takes every VM process with it.
    gw.ok(["sandbox", "create", "--name", "k2"]);
    let k2 = dir_of("k2");
    assert!(
        vm_processes(&k2).len() >= 2,
        "QEMU and gvproxy run: {:?}",
        vm_processes(&k2)
    );
    assert!(
        crate::harness::run({
            let mut c = std::process::Command::new("kill");
            c.args(["-KILL", &gw.pid().to_string()]);
            c
        })
        .success
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !vm_processes(&k2).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "alive 15 s after the gateway died: {:?}",
            vm_processes(&k2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 14, item 3: VM sandbox code ran as root in the guest and could read
/// the launch secret from `/etc/openshell/env`. Now it is uid 1000 under the
/// supervisor's seccomp filter: the file is gone, root's environments are
/// unreadable, and a nested user namespace is refused as in process
/// sandboxes.
#[test]
fn issue_14_vm_sandbox_code_is_unprivileged_and_cannot_read_the_launch_secret() {
    let Some((_rt, tmp, gw)) = vm_gateway("VM unprivileged-code test") else {
        return;
    };
    gw.ok(["sandbox", "create", "--name", "u1", "--", "true"]);
    let uid = gw.ok(["sandbox", "exec", "u1", "--", "id", "-u"]);
    assert_eq!(uid.stdout.trim(), "1000", "{uid}");

    // Issue 14, item 1: QEMU runs under its own seccomp filter (-sandbox).
    let get = gw.ok(["sandbox", "get", "u1", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
    let dir = tmp
        .path()
        .join("state/sandboxes")
        .join(v["id"].as_str().unwrap());
    let (qemu, _) = vm_processes(&dir)
        .into_iter()
        .find(|(_, c)| c.contains("qemu-system"))
        .expect("a QEMU for u1");
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2"),
        "QEMU {qemu} has no seccomp filter:\n{status}"
    );
    // ... as the sandbox's uid, not root, and in a mount namespace where
    // that uid cannot write a world-writable host dir. The same uid in the
    // host's mount namespace can: the probe itself works.
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap();
    assert_ne!(uid, 0, "QEMU runs as root");
    let write_tmp = "f=/tmp/osvm-probe-$$; touch $f && rm $f";
    let mut host = std::process::Command::new("sh");
    std::os::unix::process::CommandExt::uid(&mut host, uid);
    std::os::unix::process::CommandExt::gid(&mut host, uid);
    // From /: the test's own cwd may be one that uid cannot reach.
    host.args(["-c", write_tmp]).current_dir("/");
    let host = crate::harness::run(host);
    assert!(host.success, "the probe fails even on the host: {host}");
    let mut inside = std::process::Command::new("nsenter");
    inside
        .args([
            "-t",
            &qemu.to_string(),
            "-m",
            "-S",
            &uid.to_string(),
            "-G",
            &uid.to_string(),
        ])
        .args(["--", "sh", "-c", write_tmp])
        .current_dir("/");
    let inside = crate::harness::run(inside);
    assert!(
        !inside.success,
        "QEMU's uid wrote to /tmp from QEMU's mount namespace: {inside}"
    );

    // Issue 14, item 1: gvproxy's services API (on 192.168.127.1:80) once
    // let the guest make host root create a socket wherever it asked.
    let planted = tempfile::Builder::new()
        .prefix("osvm-planted")
        .tempdir_in("/tmp")
        .unwrap();
    let target = planted.path().join("from-guest.sock");
    let body = format!(
        r#"{{"local":"{}","remote":"192.168.127.2:22","protocol":"unix"}}"#,
        target.display()
    );
    let request = format!(
        "POST /services/forwarder/expose HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let post = crate::harness::run(gw.cli([
        "sandbox",
        "exec",
        "u1",
        "--",
        "sh",
        "-c",
        "printf '%s' \"$1\" | nc -w 3 192.168.127.1 80",
        "sh",
        &request,
    ]));
    assert!(!post.success, "the guest reached gvproxy's API: {post}");
    assert!(
        !target.exists(),
        "the guest's POST created {}",
        target.display()
    );

    let look = crate::harness::run(gw.cli([
        "sandbox",
        "exec",
        "u1",
        "--",
        "sh",
        "-c",
        "cat /etc/openshell/env; cat /proc/1/environ; \
         grep -rs OPENSHELL_SANDBOX_SECRET /etc /tmp /sandbox /run /proc/[0-9]*/environ; \
         tr '\\0' '\\n' < /proc/self/environ; echo end",
    ]));
    assert!(look.stdout.ends_with("end\n"), "{look}");
    assert!(
        !look.stdout.contains("OPENSHELL_SANDBOX_SECRET"),
        "guest sandbox code read the launch secret: {look}"
    );

    let nested =
        crate::harness::run(gw.cli(["sandbox", "exec", "u1", "--", "unshare", "-r", "-n", "true"]));
    assert!(
        !nested.success,
        "guest sandbox code made a user namespace: {nested}"
    );
    // The sandbox still serves.
    let again = gw.ok(["sandbox", "exec", "u1", "--", "echo", "ok"]);
    assert_eq!(again.stdout, "ok\n", "{again}");

    // Its socket dir lives as long as its network, and no longer.
    let sockets = Path::new("/run/openshell-vm").join(dir.file_name().unwrap());
    assert!(sockets.is_dir(), "{} is missing", sockets.display());
    let (status, _) = gw.terminate(Duration::from_secs(15));
    assert!(status.success());
    assert!(
        !sockets.exists(),
        "{} outlived the gateway",
        sockets.display()
    );
}
