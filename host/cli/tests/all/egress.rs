//! Issue 19: egress through the gateway, decided by the sandbox's policy.
//! Servers on 127.0.0.1 only; the gateway resolves test names through
//! its own hosts file (`--egress-hosts`).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::harness::{Gateway, Lines, as_strs, process_flags};

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// An HTTP server on the host's loopback that answers every request with
/// `name` and keeps a connection open until the client closes it.
fn server(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        let body = format!("{name}\n");
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                        seen.clear();
                    }
                }
            });
        }
    });
    port
}

struct Setup {
    dir: tempfile::TempDir,
    gw: Gateway,
    allowed: u16,
    other: u16,
}

fn policy_allowing(ports: &[(&str, u16)], binaries: Option<&str>) -> String {
    let mut y = String::from("version: 1\nnetwork_policies:\n");
    for (host, port) in ports {
        y.push_str(&format!(
            "  {}:\n    endpoints:\n      - host: {host}\n        port: {port}\n        allowed_ips: [127.0.0.1/32]\n",
            host.replace('.', "_")
        ));
        if let Some(b) = binaries {
            y.push_str(&format!("    binaries:\n      - path: {b}\n"));
        }
    }
    y
}

fn setup(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 allowed.test other.test\n").unwrap();
    let mut flags = process_flags();
    flags.extend(["--egress-hosts".into(), hosts.display().to_string()]);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let gw = Gateway::start(dir.path(), &as_strs(&flags));
    Setup {
        dir,
        gw,
        allowed: server("server-a"),
        other: server("server-b"),
    }
}

impl Setup {
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn exec(&self, sandbox: &str, argv: &[&str]) -> crate::harness::Run {
        let mut args = vec!["sandbox", "exec", sandbox, "--"];
        args.extend_from_slice(argv);
        self.gw.ok(args)
    }

    fn exec_fails(&self, sandbox: &str, argv: &[&str]) -> crate::harness::Run {
        let mut args = vec!["sandbox", "exec", sandbox, "--"];
        args.extend_from_slice(argv);
        self.gw.fails(args)
    }

    fn sh(&self, sandbox: &str, script: &str) -> crate::harness::Run {
        crate::harness::run(
            self.gw
                .cli(["sandbox", "exec", sandbox, "--", "sh", "-c", script]),
        )
    }

    fn network_log(&self, sandbox: &str) -> Vec<serde_json::Value> {
        self.gw
            .ok(["sandbox", "logs", sandbox, "--network"])
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Items 1 and 3 (process): curl through the proxy (absolute form and
/// CONNECT) reaches the allowed server; the other server is refused at
/// once with a 403 naming the destination, audited with the binary;
/// python3 is refused where only curl is allowed.
#[test]
fn issue_19_item_1_and_3_the_proxy_reaches_what_the_policy_allows_and_nothing_else() {
    let s = setup(&[]);
    let pol = s.write(
        "p.yaml",
        &policy_allowing(&[("allowed.test", s.allowed)], None),
    );
    s.gw.ok(["sandbox", "create", "--name", "net", "--policy", &pol]);

    let a = s.allowed;
    let got = s.exec(
        "net",
        &["curl", "-sS", &format!("http://allowed.test:{a}/")],
    );
    assert_eq!(got.stdout, "server-a\n", "{got}");
    let tunnel = s.exec(
        "net",
        &["curl", "-sS", "-p", &format!("http://allowed.test:{a}/")],
    );
    assert_eq!(tunnel.stdout, "server-a\n", "{tunnel}");

    // Refused fast, with a 403 that names the destination.
    let b = s.other;
    let started = Instant::now();
    let denied = s.sh(
        "net",
        &format!("curl -sS -o body -w '%{{http_code}}' http://other.test:{b}/; cat body >&2"),
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{denied}");
    assert_eq!(denied.stdout, "403", "{denied}");
    assert!(denied.stderr.contains("policy_denied"), "{denied}");
    assert!(
        denied.stderr.contains(&format!("other.test:{b}")),
        "{denied}"
    );
    let tunnel_denied = s.exec_fails(
        "net",
        &["curl", "-sS", "-p", &format!("http://other.test:{b}/")],
    );
    assert!(tunnel_denied.stderr.contains("403"), "{tunnel_denied}");
    // The sandbox's loopback is its own: the host's servers are not there.
    let direct = s.exec_fails("net", &["curl", "-sS", &format!("http://127.0.0.1:{a}/")]);
    assert!(direct.stderr.contains("Failed to connect"), "{direct}");

    let log = s.network_log("net");
    let deny = log
        .iter()
        .find(|e| e["decision"] == "deny" && e["host"] == "other.test")
        .unwrap_or_else(|| panic!("no denial audited: {log:?}"));
    assert_eq!(deny["port"], b);
    assert!(
        deny["binary"].as_str().unwrap().ends_with("/curl"),
        "{deny}"
    );
    assert_eq!(deny["binary_sha256"].as_str().unwrap().len(), 64, "{deny}");
    assert!(
        log.iter()
            .any(|e| e["decision"] == "allow" && e["rule"] == "allowed_test"),
        "{log:?}"
    );

    // Item 3: only curl may go there.
    let curl_only = s.write(
        "curl.yaml",
        &policy_allowing(&[("allowed.test", a)], Some("/usr/bin/curl")),
    );
    s.gw.ok(["policy", "set", "net", &curl_only]);
    let got = s.exec(
        "net",
        &["curl", "-sS", &format!("http://allowed.test:{a}/")],
    );
    assert_eq!(got.stdout, "server-a\n", "{got}");
    let py = s.exec_fails(
        "net",
        &[
            "python3",
            "-c",
            &format!("import urllib.request; urllib.request.urlopen('http://allowed.test:{a}/')"),
        ],
    );
    assert!(py.stderr.contains("403"), "{py}");
    let log = s.network_log("net");
    assert!(
        log.iter()
            .any(|e| e["decision"] == "deny"
                && e["binary"].as_str().unwrap_or("").contains("python3")),
        "{log:?}"
    );
}

/// A client that ignores proxy variables: a plain socket to the address
/// the sandbox's resolver gives for `allowed.test`, then every way to the
/// other server. Prints one `key value` line per finding.
const PLAIN_CLIENT: &str = r#"
import socket, sys, time
a, b = int(sys.argv[1]), int(sys.argv[2])
def nxdomain(name):
    try:
        socket.getaddrinfo(name, 80, socket.AF_INET)
        return "resolved"
    except socket.gaierror as e:
        return "nxdomain" if e.errno == socket.EAI_NONAME else "error %s" % e
def connect(addr):
    try:
        s = socket.create_connection(addr, timeout=5)
        s.settimeout(5)
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
            c = s.recv(4096)
            if not c:
                return "closed"
            data += c
        return "body " + data.split(b"\r\n\r\n", 1)[1].decode().strip()
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "timeout"
started = time.monotonic()
ip = socket.gethostbyname("allowed.test")
print("ip", ip)
print("allowed", connect((ip, a)))
print("other-name", nxdomain("other.test"))
print("made-up", nxdomain("made-up.invalid"))
print("other-direct", connect(("127.0.0.1", b)))
print("other-port", connect((ip, b)))
print("seconds", round(time.monotonic() - started))
"#;

/// Runs [`PLAIN_CLIENT`] (plain sockets: proxy variables mean nothing to
/// it); its findings by key.
fn plain_client(
    gw: &Gateway,
    sandbox: &str,
    a: u16,
    b: u16,
) -> std::collections::HashMap<String, String> {
    let (a, b) = (a.to_string(), b.to_string());
    let run = gw.ok([
        "sandbox",
        "exec",
        sandbox,
        "--",
        "python3",
        "-c",
        PLAIN_CLIENT,
        &a,
        &b,
    ]);
    run.stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// What [`plain_client`] must find: the allowed server reached through the
/// stub's address, the other one refused every way at once (NXDOMAIN, or
/// refused by the kernel), never a timeout; and the lookup refusal audited
/// with python3 and the name.
fn assert_plain_client(found: &std::collections::HashMap<String, String>, log: &str) {
    let get = |k: &str| found.get(k).map_or("(missing)", String::as_str);
    assert!(get("ip").starts_with("127.80."), "{found:?}");
    assert_eq!(get("allowed"), "body server-a", "{found:?}");
    assert_eq!(get("other-name"), "nxdomain", "{found:?}");
    assert_eq!(get("made-up"), "nxdomain", "{found:?}");
    assert_eq!(get("other-direct"), "refused", "{found:?}");
    assert_eq!(get("other-port"), "refused", "{found:?}");
    let seconds: u64 = get("seconds").parse().unwrap_or(99);
    assert!(seconds < 5, "refusals must be immediate: {found:?}");
    assert!(
        log.lines().any(|l| l.contains("\"deny\"")
            && l.contains("\"other.test\"")
            && l.contains("\"dns\"")
            && l.contains("python3")),
        "the NXDOMAIN is audited with its binary: {log}"
    );
}

/// Items 1 and 2 (process): a client that ignores the proxy resolves the
/// allowed name through the sandbox's resolver and reaches the server with
/// a plain socket; the other server's name is NXDOMAIN (audited, with the
/// binary), its address and port are refused at once. Item 3 holds for it
/// too: under a curl-only rule python3's connection is reset, and audited.
#[test]
fn issue_19_items_1_and_2_a_client_that_ignores_the_proxy_goes_through_the_resolver() {
    let s = setup(&[]);
    let pol = s.write(
        "p.yaml",
        &policy_allowing(&[("allowed.test", s.allowed)], None),
    );
    s.gw.ok(["sandbox", "create", "--name", "plain", "--policy", &pol]);
    let found = plain_client(&s.gw, "plain", s.allowed, s.other);
    let log = s.gw.ok(["sandbox", "logs", "plain", "--network"]).stdout;
    assert_plain_client(&found, &log);
    let resolv = s.exec("plain", &["cat", "/etc/resolv.conf"]);
    assert!(resolv.stdout.contains("nameserver 127.0.0.53"), "{resolv}");
    let write = s.sh("plain", "echo nameserver 10.0.0.1 > /etc/resolv.conf");
    assert!(
        !write.success,
        "sandbox code cannot repoint its resolver: {write}"
    );

    let curl_only = s.write(
        "curl.yaml",
        &policy_allowing(&[("allowed.test", s.allowed)], Some("/usr/bin/curl")),
    );
    s.gw.ok(["policy", "set", "plain", &curl_only]);
    let found = plain_client(&s.gw, "plain", s.allowed, s.other);
    assert!(
        matches!(
            found.get("allowed").map(String::as_str),
            Some("reset" | "closed")
        ),
        "python3 is not curl: {found:?}"
    );
    let log = s.network_log("plain");
    assert!(
        log.iter().any(|e| e["decision"] == "deny"
            && e["via"] == "dns"
            && e["host"] == "allowed.test"
            && e["binary"].as_str().unwrap_or("").contains("python3")),
        "{log:?}"
    );
}

/// Item 4: `policy set` opens a destination for new connections and
/// closes an open connection the new policy no longer allows.
#[test]
fn issue_19_item_4_a_live_policy_update_opens_and_closes() {
    let s = setup(&[]);
    let (a, b) = (s.allowed, s.other);
    let pol = s.write("p.yaml", &policy_allowing(&[("allowed.test", a)], None));
    s.gw.ok(["sandbox", "create", "--name", "live", "--policy", &pol]);
    let before = s.sh(
        "live",
        &format!("curl -s -o /dev/null -w '%{{http_code}}' http://other.test:{b}/"),
    );
    assert_eq!(before.stdout, "403", "{before}");

    // A connection held open through a CONNECT tunnel to the allowed server.
    let hold = format!(
        "import socket,time\n\
         s=socket.create_connection(('127.0.0.1',3128))\n\
         s.sendall(b'CONNECT allowed.test:{a} HTTP/1.1\\r\\n\\r\\n')\n\
         assert b' 200 ' in s.recv(4096)\n\
         print('open', flush=True)\n\
         t=time.time()\n\
         while s.recv(4096): pass\n\
         print('closed', flush=True)\n"
    );
    let mut child =
        s.gw.cli(["sandbox", "exec", "live", "--", "python3", "-c", &hold])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let lines = Lines::of(&mut child);
    assert_eq!(lines.next(Duration::from_secs(20)).as_deref(), Some("open"));

    let swapped = s.write("q.yaml", &policy_allowing(&[("other.test", b)], None));
    s.gw.ok(["policy", "set", "live", &swapped]);
    // Returned: the held connection is being closed, the new one allowed.
    assert_eq!(
        lines.next(Duration::from_secs(5)).as_deref(),
        Some("closed")
    );
    let _ = child.wait();
    let after = s.exec("live", &["curl", "-sS", &format!("http://other.test:{b}/")]);
    assert_eq!(after.stdout, "server-b\n", "{after}");
    let got = s.gw.ok(["policy", "get", "live"]);
    assert!(got.stderr.contains("revision 2 (set)"), "{got}");
    assert!(
        s.network_log("live")
            .iter()
            .any(|e| e["decision"] == "closed")
    );
}

/// Item 5 (what the proxy path can reach): the metadata address, the
/// gateway's own API port and another sandbox's loopback are unreachable
/// whatever the policy says; a policy naming metadata is refused at load.
#[test]
fn issue_19_item_5_guards_hold_whatever_the_policy_says() {
    let s = setup(&[]);
    let meta = s.write(
        "meta.yaml",
        "version: 1\nnetwork_policies:\n  m:\n    endpoints:\n      - host: 169.254.169.254\n        port: 80\n",
    );
    let refused = s.gw.fails(["policy", "check", &meta]);
    assert!(refused.stderr.contains("169.254"), "{refused}");
    let create =
        s.gw.fails(["sandbox", "create", "--name", "m", "--policy", &meta]);
    assert!(create.stderr.contains("policy"), "{create}");

    // Another sandbox serves on its own loopback.
    s.gw.ok(["sandbox", "create", "--name", "victim"]);
    let gw_port: u16 = s.gw.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let victim_port = 18_999u16;
    let mut victim =
        s.gw.cli([
            "sandbox",
            "exec",
            "victim",
            "--",
            "python3",
            "-m",
            "http.server",
            &victim_port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // It is up: it answers inside its own sandbox.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let inside = s.sh(
            "victim",
            &format!("curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{victim_port}/"),
        );
        if inside.stdout == "200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the victim's server never answered: {inside}"
        );
    }
    let broad = s.write(
        "broad.yaml",
        &format!(
            "version: 1\nnetwork_policies:\n  own:\n    endpoints:\n      - host: 127.0.0.1\n        ports: [{gw_port}, {victim_port}]\n        allowed_ips: [127.0.0.0/8]\n"
        ),
    );
    s.gw.ok([
        "sandbox", "create", "--name", "attacker", "--policy", &broad,
    ]);
    // The gateway's port: refused by the gateway whatever the policy.
    let code = s.sh(
        "attacker",
        &format!("curl -s -o /dev/null -w '%{{http_connect}}' --noproxy '' -p http://127.0.0.1:{gw_port}/"),
    );
    assert_eq!(code.stdout, "403", "{code}");
    // And in another spelling of the same address.
    for spelled in ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]"] {
        let raw = format!(
            "import socket\ns=socket.create_connection(('127.0.0.1',3128))\ns.sendall(b'CONNECT {spelled}:{gw_port} HTTP/1.1\\r\\n\\r\\n')\nprint(s.recv(4096).split()[1].decode())\n"
        );
        let code = s.exec("attacker", &["python3", "-c", &raw]);
        assert_eq!(code.stdout.trim(), "403", "{spelled}: {code}");
    }
    // The victim's port: the gateway dials its own loopback, where nothing
    // listens; the victim's loopback is in its own namespace.
    let code = s.sh(
        "attacker",
        &format!("curl -s -o /dev/null -w '%{{http_connect}}' --noproxy '' -p http://127.0.0.1:{victim_port}/"),
    );
    assert_eq!(code.stdout, "502", "{code}");

    // Metadata, as a raw CONNECT, whatever the policy (none allows it).
    let meta = s.sh(
        "attacker",
        "curl -s -o /dev/null -w '%{http_connect}' -p http://169.254.169.254/",
    );
    assert_eq!(meta.stdout, "403", "{meta}");
    let _ = victim.kill();
    let _ = victim.wait();
}

/// Item 1 (VM): the guest's supervisor runs the same proxy; busybox wget
/// (which honours http_proxy) reaches the allowed server and gets a 403
/// for the other, and the refusal is audited.
#[test]
fn issue_19_item_1_a_vm_reaches_what_the_policy_allows_and_nothing_else() {
    let Some(rt) = crate::vm::vm_runtime("issue_19 VM egress") else {
        return;
    };
    let dir = crate::vm::short_dir();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 allowed.test other.test\n").unwrap();
    let gw = crate::vm::start_vm_gateway(
        dir.path(),
        &rt,
        &[
            "--db-url",
            "sqlite::memory:",
            "--egress-hosts",
            hosts.to_str().unwrap(),
        ],
    );
    let (a, b) = (server("server-a"), server("server-b"));
    let pol = dir.path().join("p.yaml");
    std::fs::write(&pol, policy_allowing(&[("allowed.test", a)], None)).unwrap();
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "vmnet",
        "--policy",
        pol.to_str().unwrap(),
    ]);
    let got = gw.ok([
        "sandbox",
        "exec",
        "vmnet",
        "--",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://allowed.test:{a}/"),
    ]);
    assert_eq!(got.stdout, "server-a\n", "{got}");
    let denied = gw.fails([
        "sandbox",
        "exec",
        "vmnet",
        "--",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://other.test:{b}/"),
    ]);
    assert!(denied.stderr.contains("403"), "{denied}");
    let log = gw.ok(["sandbox", "logs", "vmnet", "--network"]).stdout;
    assert!(
        log.lines()
            .any(|l| l.contains("\"deny\"") && l.contains("other.test") && l.contains("busybox")),
        "{log}"
    );

    // A client that ignores the proxy, in a VM rooted in the base image
    // (Python): the guest's resolver is the supervisor's stub too.
    let Some(layout) = crate::vm_images::base_image_layout("issue_19 VM plain client") else {
        return;
    };
    crate::vm_images::import_base(&gw, &layout);
    gw.ok([
        "sandbox",
        "create",
        "--name",
        "vmplain",
        "--image",
        "openshell/base:bookworm",
        "--policy",
        pol.to_str().unwrap(),
    ]);
    let found = plain_client(&gw, "vmplain", a, b);
    let log = gw.ok(["sandbox", "logs", "vmplain", "--network"]).stdout;
    assert_plain_client(&found, &log);
}

/// Item 6: 500 concurrent connections from one sandbox against a limit of
/// 64: the limit holds (the rest refused at once, and audited), the
/// sandbox stays Ready, another sandbox's exec still works, and once they
/// close the gateway holds no more descriptors than before.
#[test]
fn issue_19_item_6_five_hundred_connections_hold_the_limit_and_leak_nothing() {
    let s = setup(&["--egress-max-connections", "64"]);
    let a = s.allowed;
    let pol = s.write("p.yaml", &policy_allowing(&[("allowed.test", a)], None));
    s.gw.ok(["sandbox", "create", "--name", "flood", "--policy", &pol]);
    s.gw.ok(["sandbox", "create", "--name", "bystander"]);
    let baseline = fds(s.gw.pid());
    let script = format!(
        "import socket,sys\n\
         socks=[socket.create_connection(('127.0.0.1',3128)) for _ in range(500)]\n\
         for s in socks: s.sendall(b'CONNECT allowed.test:{a} HTTP/1.1\\r\\n\\r\\n')\n\
         ok=refused=0\n\
         for s in socks:\n\
         \x20   head=s.recv(4096)\n\
         \x20   if b' 200 ' in head: ok+=1\n\
         \x20   elif b' 403 ' in head: refused+=1\n\
         print(ok, refused, flush=True)\n\
         sys.stdin.read()\n"
    );
    let mut child =
        s.gw.cli(["sandbox", "exec", "flood", "--", "python3", "-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let lines = Lines::of(&mut child);
    let counts = lines
        .next(Duration::from_secs(120))
        .expect("the flood reports its counts");
    let (ok, refused): (usize, usize) = {
        let mut it = counts.split_whitespace().map(|n| n.parse().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    assert_eq!(ok, 64, "{counts}");
    assert_eq!(refused, 500 - 64, "{counts}");
    // While they are held: the sandbox is Ready and its neighbour serves.
    let started = Instant::now();
    let other = s.exec("bystander", &["echo", "alive"]);
    assert_eq!(other.stdout, "alive\n");
    eprintln!(
        "issue_19 item 6: a bystander exec took {:?} under the flood",
        started.elapsed()
    );
    let got = s.gw.ok(["sandbox", "get", "flood", "-o", "json"]);
    let sb: serde_json::Value = serde_json::from_str(&got.stdout).unwrap();
    assert_eq!(sb["phase"], "Ready", "{sb}");
    let log = s.network_log("flood");
    let limited = log
        .iter()
        .filter(|e| e["reason"].as_str().unwrap_or("").contains("limit of 64"))
        .count();
    assert_eq!(limited, 500 - 64, "every refusal is audited");
    drop(child.stdin.take());
    let _ = child.wait();
    // Everything closes: the gateway's descriptors fall back to where they were.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fds(s.gw.pid()) > baseline + 4 {
        assert!(
            Instant::now() < deadline,
            "the gateway holds {} fds, {baseline} before",
            fds(s.gw.pid())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
