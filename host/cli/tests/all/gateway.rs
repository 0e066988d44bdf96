//! `openshell gateway start` and `openshell status`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{Gateway, KillOnDrop, Lines, load_echo, openshell, run};

#[test]
fn a_started_gateway_answers_status_and_exits_zero_on_sigterm() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::in_memory(dir.path());

    let status = gw.ok(["status"]);
    assert!(
        status
            .stdout
            .contains(&format!("Connected to {}", gw.endpoint)),
        "{status}"
    );
    assert!(
        status
            .stdout
            .contains(&format!("Gateway version: {}", env!("CARGO_PKG_VERSION"))),
        "{status}"
    );
    assert!(status.stdout.contains("Drivers: (none)"), "{status}");

    let json = gw.ok(["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("status -o json");
    assert_eq!(v["status"], "SERVING", "{json}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{json}");
    assert_eq!(v["endpoint"], gw.endpoint.as_str(), "{json}");

    let ready_line = gw.ready_line.clone();
    let (exit, rest) = gw.terminate(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "SIGTERM is a clean shutdown: {exit}");
    assert!(
        rest.is_empty(),
        "the gateway prints exactly one line on stdout ({ready_line:?}), then also {rest:?}"
    );
}

#[test]
fn status_without_a_gateway_fails_and_says_how_to_start_one() {
    // A port that was free a moment ago; nothing listens on it now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");

    let mut cmd = openshell(["status"]);
    cmd.env("OPENSHELL_GATEWAY_ENDPOINT", &endpoint);
    let status = run(cmd);

    assert!(!status.success, "{status}");
    assert!(status.stderr.contains(&endpoint), "{status}");
    assert!(
        status.stderr.contains("openshell gateway start"),
        "{status}"
    );
    assert!(status.stdout.is_empty(), "{status}");
}

#[test]
fn a_gateway_serves_every_interface_only_with_tls_and_auth() {
    let dir = TempDir::new().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    // Turning off either protection (development mode) is loopback only.
    let flags: [&[&str]; 3] = [
        &["--disable-tls"],
        &["--disable-gateway-auth"],
        &["--disable-tls", "--disable-gateway-auth"],
    ];
    for flags in flags {
        let mut cmd = openshell([
            "gateway",
            "start",
            "--bind",
            "0.0.0.0",
            "--port",
            "0",
            "--db-url",
            "sqlite::memory:",
            "--state-dir",
            state,
        ]);
        cmd.args(flags);
        let start = run(cmd);
        assert!(!start.success, "{start}");
        assert!(
            start
                .stderr
                .contains("refusing to serve on 0.0.0.0 without TLS and authentication"),
            "{start}"
        );
        assert!(
            !start.stdout.contains("Server listening"),
            "a refused gateway never claims to listen: {start}"
        );
    }
    // With the defaults (TLS and a token) every interface is fine.
    let gw = Gateway::secure(
        dir.path(),
        &["--bind", "0.0.0.0", "--db-url", "sqlite::memory:"],
    );
    assert!(gw.ready_line.contains("0.0.0.0:"), "{}", gw.ready_line);
}

#[test]
fn stopping_the_gateway_ends_an_open_watch_with_an_error() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::in_memory(dir.path());
    load_echo(&gw);
    gw.ok(["sandbox", "create", "--name", "w1", "--no-wait"]);

    let mut watch = gw.cli(["sandbox", "watch", "w1"]);
    watch.stdout(Stdio::piped());
    watch.stderr(Stdio::piped());
    let mut child = watch.spawn().unwrap();
    let lines = Lines::of(&mut child);
    let mut watch = KillOnDrop(child);
    let first = lines.next(Duration::from_secs(30)).expect("a first event");
    assert!(first.starts_with("w1 Provisioning"), "{first:?}");

    // An open stream must not hold the gateway up.
    let (exit, _) = gw.terminate(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{exit}");

    let status = watch
        .wait_until(Instant::now() + Duration::from_secs(10))
        .expect("the watch ends when the gateway stops");
    let mut stderr = String::new();
    std::io::Read::read_to_string(watch.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{status}; stderr: {stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
}

#[test]
fn an_endpoint_without_a_scheme_means_http() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::in_memory(dir.path());
    let bare = gw.endpoint.trim_start_matches("http://").to_owned();

    let mut cmd = openshell(["status", "--gateway-endpoint", &bare]);
    cmd.env_remove("OPENSHELL_GATEWAY_ENDPOINT");
    let status = run(cmd);
    assert!(status.success, "{status}");
    assert!(status.stdout.contains("Connected"), "{status}");
}
