//! Issue 18: files in and out, logs, ports, on process and VM sandboxes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::harness::{Gateway, KillOnDrop, Lines, as_strs, process_flags};

/// Every path under `root` with what it is: a file's sha256 and mode, a
/// directory's mode, a link's target.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, at: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(at).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, out);
                format!("dir {:o}", m.permissions().mode() & 0o7777)
            } else {
                let sum = hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap()));
                format!("file {:o} {sum}", m.permissions().mode() & 0o7777)
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// 1,000 files of 20 MiB in all, an executable and a symlink among them.
fn project(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("proj");
    for i in 0..997 {
        let sub = src.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&sub).unwrap();
        // Distinct contents, 21,000 bytes each: 20 MiB in all.
        let body: Vec<u8> = (0..21_000u32)
            .map(|b| (b.wrapping_mul(i + 7) >> 3) as u8)
            .collect();
        std::fs::write(sub.join(format!("f{i}.bin")), body).unwrap();
    }
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(src.join("README"), "hello\n").unwrap();
    symlink("README", src.join("readme-link")).unwrap();
    src
}

/// Upload, run what was uploaded, plant a link to /etc, download: the tree
/// comes back identical and the link comes back as a link.
fn round_trip(gw: &Gateway, sandbox: &str, tmp: &Path) {
    let src = project(tmp);
    let want = manifest(&src);
    assert_eq!(want.len(), 1000 + 10, "1,000 files and 10 directories");
    let up = gw.ok([
        "sandbox",
        "upload",
        sandbox,
        src.to_str().unwrap(),
        "/sandbox",
    ]);
    assert!(up.stderr.contains("1011 entries"), "{up}");
    let ran = gw.ok(["sandbox", "exec", sandbox, "--", "/sandbox/proj/run.sh"]);
    assert_eq!(ran.stdout, "ran\n");
    // Again without --overwrite: refused, and nothing changed.
    let again = gw.fails([
        "sandbox",
        "upload",
        sandbox,
        src.to_str().unwrap(),
        "/sandbox",
    ]);
    assert!(again.stderr.contains("--overwrite"), "{again}");
    gw.ok([
        "sandbox",
        "upload",
        sandbox,
        src.to_str().unwrap(),
        "/sandbox",
        "--overwrite",
    ]);

    let back = tmp.join("back");
    std::fs::create_dir(&back).unwrap();
    gw.ok([
        "sandbox",
        "download",
        sandbox,
        "/sandbox/proj",
        back.to_str().unwrap(),
    ]);
    assert_eq!(manifest(&back.join("proj")), want);

    // A link sandbox code made to /etc arrives as that link, never as /etc.
    gw.ok([
        "sandbox",
        "exec",
        sandbox,
        "--",
        "ln",
        "-s",
        "/etc",
        "/sandbox/proj/etc-link",
    ]);
    let linked = tmp.join("linked");
    gw.ok([
        "sandbox",
        "download",
        sandbox,
        "/sandbox/proj",
        linked.to_str().unwrap(),
    ]);
    let link = linked.join("etc-link");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/etc"));
    let mut got = manifest(&linked);
    assert_eq!(got.remove("etc-link").as_deref(), Some("link /etc"));
    assert_eq!(got, want, "nothing of /etc came along");
    // The link alone, and a name that does not exist.
    let alone = tmp.join("alone");
    gw.ok([
        "sandbox",
        "download",
        sandbox,
        "/sandbox/proj/etc-link",
        alone.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_link(&alone).unwrap(), Path::new("/etc"));
    let missing = gw.fails([
        "sandbox",
        "download",
        sandbox,
        "/sandbox/nope",
        tmp.to_str().unwrap(),
    ]);
    assert!(
        missing.stderr.contains("does not exist") && missing.stderr.contains("NotFound"),
        "{missing}"
    );
}

#[test]
fn issue_18_item_1_a_tree_goes_into_a_process_sandbox_and_comes_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &as_strs(&process_flags()));
    gw.ok(["sandbox", "create", "--name", "files"]);
    round_trip(&gw, "files", dir.path());
    // Files are written as the sandbox's user, never as root.
    let owner = gw.ok([
        "sandbox",
        "exec",
        "files",
        "--",
        "stat",
        "-c",
        "%u",
        "/sandbox/proj/README",
    ]);
    assert_eq!(owner.stdout.trim(), "1000");
    // Writing where the sandbox's user may not, but its supervisor (root
    // inside) could: refused by the kernel, inside.
    let readme = dir.path().join("proj/README");
    for target in ["/etc/passwd", "/run/openshell/planted"] {
        let denied = gw.fails([
            "sandbox",
            "upload",
            "files",
            readme.to_str().unwrap(),
            target,
            "--overwrite",
        ]);
        let e = denied.stderr.to_lowercase();
        assert!(e.contains("denied") || e.contains("read-only"), "{denied}");
    }
    // (The supervisor's run dir is not even listable by sandbox code.)
    let listed = gw.fails(["sandbox", "exec", "files", "--", "ls", "/run/openshell"]);
    assert!(listed.stderr.contains("Permission denied"), "{listed}");
}

#[test]
fn issue_18_item_1_a_tree_goes_into_a_vm_sandbox_and_comes_back_identical() {
    let Some(rt) = crate::vm::vm_runtime("issue_18 VM files") else {
        return;
    };
    let tmp = crate::vm::short_dir();
    let gw = crate::vm::start_vm_gateway(tmp.path(), &rt, &["--db-url", "sqlite::memory:"]);
    gw.ok(["sandbox", "create", "--name", "vmfiles"]);
    round_trip(&gw, "vmfiles", tmp.path());
}

#[test]
fn issue_18_create_upload_puts_files_in_before_the_command_runs() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &as_strs(&process_flags()));
    let src = dir.path().join("app");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("main.sh"), "echo from-upload\n").unwrap();
    let spec = format!("{}:/sandbox/work", src.display());
    let run = gw.ok([
        "sandbox",
        "create",
        "--upload",
        &spec,
        "--",
        "sh",
        "/sandbox/work/main.sh",
    ]);
    assert_eq!(run.stdout, "from-upload\n", "{run}");
}

/// Records of `sandbox logs NAME -o json` as (stream, text).
fn log_lines(gw: &Gateway, name: &str) -> Vec<(String, String)> {
    gw.ok(["sandbox", "logs", name, "-o", "json"])
        .stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["stream"].as_str().unwrap().to_owned(),
                v["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn output_only(records: &[(String, String)]) -> Vec<(String, String)> {
    records
        .iter()
        .filter(|(s, _)| s != "event")
        .cloned()
        .collect()
}

/// Each stream in order, and each round's two lines before the next
/// round's (a second apart); across the two pipes of one round the order
/// is whatever the supervisor read first.
fn assert_rounds(lines: &[(String, String)]) {
    assert_eq!(lines.len(), 6, "{lines:?}");
    for round in 0..3 {
        let mut got: Vec<_> = lines[round * 2..round * 2 + 2].to_vec();
        got.sort();
        let i = round + 1;
        assert_eq!(
            got,
            vec![
                ("stderr".into(), format!("err{i}\n")),
                ("stdout".into(), format!("out{i}\n"))
            ],
            "{lines:?}"
        );
    }
}

#[test]
fn issue_18_item_2_a_main_process_is_logged_followed_and_kept_across_a_gateway_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = process_flags();
    // On a database file: the restart below must find the sandbox.
    flags.drain(0..2);
    let gw = Gateway::start(dir.path(), &as_strs(&flags));
    let script = "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 1; done";
    let mut create = KillOnDrop(
        gw.cli(["sandbox", "create", "--name", "w", "--", "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Follow as soon as the sandbox exists: lines arrive as they are written.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut follow = loop {
        let f = crate::harness::run(gw.cli(["sandbox", "get", "w"]));
        if f.success && f.stdout.contains("Ready") {
            break KillOnDrop(
                gw.cli(["sandbox", "logs", "w", "-f", "-o", "json"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        assert!(Instant::now() < deadline, "w never became Ready: {f}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines = Lines::of(&mut follow.0);
    let mut followed = Vec::new();
    let mut seen_while_running = false;
    while followed.len() < 6 {
        let line = lines
            .next(Duration::from_secs(30))
            .expect("logs -f ended early");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let stream = v["stream"].as_str().unwrap().to_owned();
        if stream != "event" {
            seen_while_running |= create.0.try_wait().unwrap().is_none();
            followed.push((stream, v["text"].as_str().unwrap().to_owned()));
        }
    }
    assert!(
        seen_while_running,
        "logs -f showed nothing before the command finished"
    );
    assert_rounds(&followed);
    let status = create
        .wait_until(Instant::now() + Duration::from_secs(30))
        .unwrap();
    assert!(status.success());
    let mut out = String::new();
    create
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(
        out, "out1\nout2\nout3\n",
        "create prints the main process's stdout"
    );
    // Following goes on after the command: its exit arrives as an event.
    let exit = loop {
        let line = lines.next(Duration::from_secs(30)).expect("no exit event");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if !v["exit_code"].is_null() {
            break v;
        }
    };
    assert_eq!(exit["exit_code"], 0);
    drop(follow);

    let before = log_lines(&gw, "w");
    assert_rounds(&output_only(&before));
    let events: Vec<_> = before
        .iter()
        .filter(|(s, _)| s == "event")
        .map(|(_, t)| t.as_str())
        .collect();
    assert!(
        events.iter().any(|t| t.starts_with("created")),
        "{events:?}"
    );
    assert!(events.iter().any(|t| t.contains("Ready")), "{events:?}");
    assert!(
        events.iter().any(|t| t.contains("exited with code 0")),
        "{events:?}"
    );

    // SIGKILL, then a gateway on the same state: the log is still there,
    // and the main process is not run again.
    let pid = gw.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(gw);
    let gw = Gateway::start(dir.path(), &as_strs(&flags));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gw.ok(["sandbox", "get", "w"]).stdout.contains("Ready") {
        assert!(Instant::now() < deadline, "w did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = log_lines(&gw, "w");
    assert_eq!(
        output_only(&after),
        output_only(&before),
        "kept, and not run again"
    );
    // --tail and --since cut it.
    let tail = gw.ok(["sandbox", "logs", "w", "--tail", "2", "-o", "json"]);
    assert_eq!(tail.stdout.lines().count(), 2);
    let since = gw.ok(["sandbox", "logs", "w", "--since", "1h"]);
    assert!(since.stdout.contains("out1"), "{since}");
    let bad = gw.fails(["sandbox", "logs", "w", "--since", "soon"]);
    assert!(bad.stderr.contains("duration"), "{bad}");
}

#[test]
fn issue_18_a_main_process_exit_code_is_the_create_exit_code_and_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &as_strs(&process_flags()));
    let first = crate::harness::run(gw.cli([
        "sandbox",
        "create",
        "--name",
        "m",
        "--",
        "sh",
        "-c",
        "echo one; exit 3",
    ]));
    assert_eq!(
        (first.code, first.stdout.as_str()),
        (Some(3), "one\n"),
        "{first}"
    );
    let text = gw.ok(["sandbox", "logs", "m", "--timestamps"]);
    assert!(text.stdout.contains("one"), "{text}");
    assert!(
        text.stderr
            .contains("[openshell] main process exited with code 3"),
        "{text}"
    );
}

/// A web server's answer to one `GET path` over a fresh connection.
fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn issue_18_item_3_a_web_server_in_a_sandbox_answers_50_concurrent_requests_through_forward() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &as_strs(&process_flags()));
    let config = dir.path().join("client/config.json");
    gw.ok(["sandbox", "create", "--name", "web"]);
    gw.ok([
        "sandbox",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo served-from-sandbox > /sandbox/index.txt",
    ]);
    // The server is the sandbox's main process, bound to its own loopback.
    let _server = KillOnDrop(
        gw.cli([
            "sandbox",
            "exec",
            "web",
            "--",
            "python3",
            "-u",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "127.0.0.1",
            "--directory",
            "/sandbox",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    // Refused while nothing listens there: a clear error, not a hang.
    let mut fwd = KillOnDrop(
        gw.cli(["sandbox", "forward", "web", "0:8000"])
            .env("OPENSHELL_CONFIG", &config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let first = Lines::of(&mut fwd.0).next(Duration::from_secs(30)).unwrap();
    let port: u16 = first
        .split(" -> ")
        .next()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{first}"));
    assert!(first.starts_with("Forwarding 127.0.0.1:"), "{first}");
    // Wait until the server listens (answers through the forward).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::panic::catch_unwind(|| http_get(port, "/index.txt"))
        .is_ok_and(|r| r.contains("200"))
    {
        assert!(
            Instant::now() < deadline,
            "the server never answered through the forward"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|_| s.spawn(|| http_get(port, "/index.txt")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &answers {
        assert!(
            a.starts_with("HTTP/1.0 200") && a.ends_with("served-from-sandbox\n"),
            "{a}"
        );
    }
    // Ctrl-C ends it cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fwd.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = fwd
        .wait_until(Instant::now() + Duration::from_secs(10))
        .expect("forward ignored Ctrl-C");
    assert!(st.success(), "{st}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening"
    );

    // In the background: listed, then stopped.
    let bg = crate::harness::run({
        let mut c = gw.cli(["sandbox", "forward", "web", "0:8000", "--background"]);
        c.env("OPENSHELL_CONFIG", &config);
        c
    });
    assert!(
        bg.success && bg.stdout.contains("in the background"),
        "{bg}"
    );
    let list = crate::harness::run({
        let mut c = gw.cli(["forward", "list"]);
        c.env("OPENSHELL_CONFIG", &config);
        c
    });
    assert!(
        list.stdout.contains("web") && list.stdout.ends_with('\n'),
        "{list}"
    );
    let bg_port: u16 = bg
        .stdout
        .split(" -> ")
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(http_get(bg_port, "/index.txt").contains("served-from-sandbox"));
    let stop = crate::harness::run({
        let mut c = gw.cli(["forward", "stop", "web"]);
        c.env("OPENSHELL_CONFIG", &config);
        c
    });
    assert!(stop.success, "{stop}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", bg_port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the background forward still listens"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A port nothing listens on inside: the connection is refused with why.
    let (_closed, p) = forward(&gw, "0:9");
    let answer = http_get(p, "/");
    assert!(
        answer.is_empty(),
        "a refused port gives an empty, closed connection: {answer}"
    );

    // Attack: forward to a port only the host's loopback has. The supervisor
    // dials the sandbox's own loopback (its own network namespace), so the
    // host's service is never reached.
    let host_only = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host_only.set_nonblocking(true).unwrap();
    let host_port = host_only.local_addr().unwrap().port();
    let (_probe, p) = forward(&gw, &format!("0:{host_port}"));
    assert!(
        http_get(p, "/").is_empty(),
        "the forward reached the host's loopback"
    );
    assert!(
        host_only.accept().is_err(),
        "the host-only listener was connected to through a sandbox forward"
    );
}

/// A relay with no traffic either way for the idle timeout is closed, and
/// the client is told why (exec and byte tunnels share the mechanism).
#[test]
fn a_silent_relay_is_closed_at_the_idle_timeout_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = process_flags();
    flags.extend(["--relay-idle-timeout-secs", "1"].map(String::from));
    let gw = Gateway::start(dir.path(), &as_strs(&flags));
    gw.ok(["sandbox", "create", "--name", "quiet"]);
    let started = Instant::now();
    let silent = gw.fails(["sandbox", "exec", "quiet", "--", "sleep", "30"]);
    assert!(silent.stderr.contains("idle for 1 s"), "{silent}");
    assert!(silent.stderr.contains("DeadlineExceeded"), "{silent}");
    assert!(started.elapsed() < Duration::from_secs(20), "closed late");
    // Traffic keeps one alive past the timeout.
    let chatty = gw.ok([
        "sandbox",
        "exec",
        "quiet",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3 4; do echo $i; sleep 0.5; done",
    ]);
    assert_eq!(chatty.stdout, "1\n2\n3\n4\n");
}

/// `sandbox forward web SPEC` running, and the local port it printed.
fn forward(gw: &Gateway, spec: &str) -> (KillOnDrop, u16) {
    let mut fwd = KillOnDrop(
        gw.cli(["sandbox", "forward", "web", spec])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = Lines::of(&mut fwd.0).next(Duration::from_secs(30)).unwrap();
    let port = line
        .split(" -> ")
        .next()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (fwd, port)
}
