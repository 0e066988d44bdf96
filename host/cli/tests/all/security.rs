//! Secure by default: TLS and a token with no flags, the right status for
//! every way of getting it wrong, and secrets that never reach a log.

use std::os::unix::fs::PermissionsExt;

use tempfile::TempDir;

use crate::harness::{Gateway, as_strs, openshell, process_flags, run};

#[test]
fn a_default_gateway_serves_tls_with_auth_and_the_local_cli_needs_no_flags() {
    let dir = TempDir::new().unwrap();
    let gw = Gateway::secure(dir.path(), &["--db-url", "sqlite::memory:"]);
    assert!(gw.endpoint.starts_with("https://"), "{}", gw.endpoint);

    let status = gw.ok(["status"]);
    assert!(status.stdout.contains("Connected"), "{status}");

    let config = gw.config.clone().unwrap();
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the client config holds the token");
    for f in ["state/token", "state/tls/ca.key", "state/tls/server.key"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let token = saved["token"].as_str().unwrap().to_owned();
    let addr = gw.endpoint.trim_start_matches("https://").to_owned();
    let ca = dir.path().join("state/tls/ca.crt");

    // Plaintext against the TLS port.
    let mut plain = openshell(["status", "--gateway-endpoint", &format!("http://{addr}")]);
    plain.env("OPENSHELL_TOKEN", &token);
    let plain = run(plain);
    assert!(!plain.success, "{plain}");

    // TLS without a CA to trust.
    let no_ca = run(openshell(["status", "--gateway-endpoint", &gw.endpoint]));
    assert!(!no_ca.success, "{no_ca}");
    assert!(no_ca.stderr.contains("--ca-file"), "{no_ca}");

    // TLS and the CA, but no token.
    let ca_arg = ca.to_str().unwrap();
    let no_token = run(openshell([
        "status",
        "--gateway-endpoint",
        &gw.endpoint,
        "--ca-file",
        ca_arg,
    ]));
    assert!(!no_token.success, "{no_token}");
    assert!(no_token.stderr.contains("Unauthenticated"), "{no_token}");
    assert!(no_token.stderr.contains("requires a token"), "{no_token}");

    // A wrong token.
    let mut wrong = openshell([
        "status",
        "--gateway-endpoint",
        &gw.endpoint,
        "--ca-file",
        ca_arg,
    ]);
    wrong.env("OPENSHELL_TOKEN", "0".repeat(64));
    let wrong = run(wrong);
    assert!(!wrong.success, "{wrong}");
    assert!(wrong.stderr.contains("Unauthenticated"), "{wrong}");
    assert!(wrong.stderr.contains("token is wrong"), "{wrong}");

    // A remote-style client: endpoint, CA file and token, no config.
    let mut remote = openshell([
        "status",
        "--gateway-endpoint",
        &gw.endpoint,
        "--ca-file",
        ca_arg,
    ]);
    remote.env("OPENSHELL_TOKEN", &token);
    let remote = run(remote);
    assert!(remote.success, "{remote}");

    let log = gw.log();
    assert!(!log.contains(&token), "the token was logged");
    assert!(
        log.contains("rejected a request with a wrong token"),
        "{log}"
    );
}

#[test]
fn a_reachable_address_needs_both_protections() {
    let dir = TempDir::new().unwrap();
    for flags in [&["--disable-tls"][..], &["--disable-gateway-auth"][..]] {
        let mut cmd = openshell([
            "gateway",
            "start",
            "--port",
            "0",
            "--bind",
            "0.0.0.0",
            "--state-dir",
        ]);
        cmd.arg(dir.path().join("state")).args(flags);
        let r = run(cmd);
        assert!(!r.success, "{r}");
        assert!(r.stderr.contains("refusing to serve on 0.0.0.0"), "{r}");
    }
}

/// Every secret a full run makes: the token, the CA and server keys, and
/// each sandbox's launch secret.
fn secrets(state: &std::path::Path) -> (Vec<String>, usize) {
    let mut out = vec![std::fs::read_to_string(state.join("token")).unwrap()];
    let mut sandbox_secrets = 0;
    for key in ["tls/ca.key", "tls/server.key"] {
        let pem = std::fs::read_to_string(state.join(key)).unwrap();
        // The base64 body lines, each long enough to be unmistakable.
        out.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 40)
                .map(String::from),
        );
    }
    for e in std::fs::read_dir(state.join("sandboxes"))
        .unwrap()
        .flatten()
    {
        if let Ok(cfg) = std::fs::read_to_string(e.path().join("launch.json")) {
            let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
            for pair in v["env"].as_array().unwrap() {
                if pair[0] == "OPENSHELL_SANDBOX_SECRET" {
                    out.push(pair[1].as_str().unwrap().to_owned());
                    sandbox_secrets += 1;
                }
            }
        }
    }
    (out, sandbox_secrets)
}

#[test]
fn a_full_run_logs_none_of_the_secrets_it_generated() {
    let dir = TempDir::new().unwrap();
    let mut flags = process_flags();
    flags.push("-v".into());
    let gw = Gateway::secure(dir.path(), &as_strs(&flags));
    let mut outputs = String::new();
    for args in [
        &["sandbox", "create", "--name", "s1", "--", "env"][..],
        &["sandbox", "create", "--name", "s2", "--", "true"][..],
        &[
            "sandbox",
            "exec",
            "s1",
            "--",
            "sh",
            "-c",
            "cat /proc/self/environ; env",
        ][..],
        &["sandbox", "get", "s1", "-o", "json"][..],
        &["sandbox", "list", "-o", "json"][..],
        &["plugin", "list", "-o", "json"][..],
    ] {
        let r = gw.ok(args);
        outputs.push_str(&r.stdout);
        outputs.push_str(&r.stderr);
    }
    let state = dir.path().join("state");
    let (secrets, sandbox_secrets) = secrets(&state);
    assert_eq!(sandbox_secrets, 2, "one launch secret per sandbox");
    assert!(
        secrets.len() >= 5,
        "the token, key material and launch secrets"
    );
    // A sandbox's launch secret is no key to the user API.
    let ca = state.join("tls/ca.crt");
    for s in secrets
        .iter()
        .filter(|s| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()))
    {
        if *s == std::fs::read_to_string(state.join("token")).unwrap() {
            continue;
        }
        let mut c = openshell([
            "status",
            "--gateway-endpoint",
            &gw.endpoint,
            "--ca-file",
            ca.to_str().unwrap(),
        ]);
        c.env("OPENSHELL_TOKEN", s);
        let r = run(c);
        assert!(r.stderr.contains("Unauthenticated"), "{r}");
    }
    gw.ok(["sandbox", "delete", "--all"]);

    let mut logs = vec![
        ("gateway log".to_owned(), gw.log()),
        ("cli output".to_owned(), outputs),
    ];
    for e in std::fs::read_dir(state.join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(t) = std::fs::read_to_string(e.path().join("supervisor.log")) {
            logs.push((e.path().display().to_string(), t));
        }
    }
    for (what, text) in &logs {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret appears in the {what}");
        }
    }
}

/// Issue 14, item 8: sandbox code finds no host path where it used to: PID
/// 1's command line (init is a copy of the launcher, which was started with
/// `--config <state dir>/…/launch.json`), `/proc/self/cgroup` (the host's
/// cgroup tree), and `/proc/net/unix`.
#[test]
fn issue_14_sandbox_code_sees_no_host_path_in_ps_cgroups_mounts_or_sockets() {
    let dir = TempDir::new().unwrap();
    let gw = crate::process::process_gateway(dir.path());
    gw.ok(["sandbox", "create", "--name", "p", "--", "true"]);
    let look = gw.ok([
        "sandbox",
        "exec",
        "p",
        "--",
        "sh",
        "-c",
        "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done; \
         echo @@$((1+1)); cat /proc/self/cgroup; echo @@$((1+2)); cat /proc/1/cgroup; \
         echo @@$((1+3)); cat /proc/net/unix /proc/self/mountinfo",
    ]);
    // The one host path left: mountinfo names the supervisor binary's
    // install location (where the gateway's binaries are; nothing secret).
    let out: String = look
        .stdout
        .lines()
        .filter(|l| !l.contains(" /run/openshell-bin/"))
        .map(|l| format!("{l}\n"))
        .collect();
    let out = &out;
    // The launcher and supervisor binaries sit beside the CLI's.
    let bin = std::path::Path::new(crate::harness::OPENSHELL);
    let target = bin.parent().unwrap().to_string_lossy().into_owned();
    let state = dir.path().to_string_lossy().into_owned();
    for needle in [
        state.as_str(),
        target.as_str(),
        "launch.json",
        "openshell-sandbox-launch",
    ] {
        assert!(
            !out.contains(needle),
            "sandbox code sees {needle:?}:\n{out}"
        );
    }
    assert!(
        out.contains("openshell-sandbox-init"),
        "PID 1 is listed: {out}"
    );
    // Markers the shell computes, so the command line above holds neither.
    let section = |n: u32| {
        out.split(&format!("@@{n}\n"))
            .nth(1)
            .unwrap()
            .split(&format!("@@{}\n", n + 1))
            .next()
            .unwrap()
    };
    // Sandbox code's own cgroup is the namespace's root; init (and the
    // supervisor) live beside it, in `supervisor` (issue 14 item 7).
    for line in section(2).lines().filter(|l| !l.is_empty()) {
        assert!(line.ends_with(":/"), "sandbox code's cgroup: {line}\n{out}");
    }
    // (Hierarchies without our controllers show `/` for both.)
    let init: Vec<&str> = section(3).lines().filter(|l| !l.is_empty()).collect();
    for line in &init {
        assert!(
            line.ends_with(":/") || line.ends_with(":/../supervisor"),
            "init's cgroup: {line}\n{out}"
        );
    }
    assert!(
        init.iter().any(|l| l.ends_with(":/../supervisor")),
        "init is not in the supervisor's cgroup:\n{out}"
    );
    // Bind mounts show their source's path within its filesystem: the
    // workdir and run dir come from the sandbox disk, so they show
    // `/<sandbox id>/...`, never the state dir (issue 14 items 6 and 8).
    let mounts = section(4);
    assert!(
        mounts.contains(" /sandbox ") && !mounts.contains(&state),
        "the state dir shows in mountinfo:\n{mounts}"
    );
}
