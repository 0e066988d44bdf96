//! Egress (issue 19), each against a baseline measured in the same run:
//! a download through the sandbox's proxy and the gateway vs the same
//! download by the same client on the host's loopback; the time to an
//! open tunnel vs a direct TCP connect; the time to a refusal; a policy
//! replacement; and exec latency in one sandbox while another holds its
//! whole connection limit.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use openshell_proto::v1 as pb;

use crate::gateway::{self, BenchGateway};
use crate::stats::Samples;

pub struct Egress {
    pub bytes: u64,
    /// Seconds per download (curl's time_total).
    pub through: Samples,
    pub direct: Samples,
    /// The same download by a client that ignores the proxy: the name
    /// resolved by the sandbox's DNS stub, the connection captured there.
    pub captured: Samples,
    /// curl's name lookup of an allowed name through the stub.
    pub lookup: Samples,
    /// CONNECT to `200` through the proxy, and a direct connect on the host.
    pub connect: Samples,
    pub direct_connect: Samples,
    /// CONNECT to a destination no rule allows, to its `403`.
    pub denial: Samples,
    /// SetSandboxPolicy round trips (in force when they return).
    pub update: Samples,
    /// `true` in another sandbox, idle and while one holds its limit.
    pub exec_idle: Samples,
    pub exec_loaded: Samples,
    pub held: usize,
}

impl Egress {
    pub fn mb_s(&self, s: &Samples) -> f64 {
        self.bytes as f64 / 1e6 / s.p50().as_secs_f64()
    }
}

/// Answers every request with `bytes` zero bytes, then closes.
fn source(bytes: u64) -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-length: {bytes}\r\n\r\n");
                let chunk = vec![0u8; 256 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    Ok(port)
}

/// Accepts and holds connections until the peer closes.
fn holder() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    Ok(port)
}

/// The name the bench gateway resolves to 127.0.0.1 (its egress hosts).
pub const NAME: &str = "bench.test";

fn policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "version: 1\nnetwork_policies:\n  bench:\n    endpoints:\n      - host: 127.0.0.1\n        ports: [{0}]\n        allowed_ips: [127.0.0.1/32]\n      - host: {NAME}\n        ports: [{0}]\n        allowed_ips: [127.0.0.1/32]\n",
        ports.join(", ")
    )
}

/// Microseconds per CONNECT (to the status line) through the proxy.
fn connect_script(port: u16, runs: usize) -> String {
    format!(
        "import socket,time\n\
         for _ in range({runs}):\n\
         \x20   t=time.perf_counter()\n\
         \x20   s=socket.create_connection(('127.0.0.1',3128))\n\
         \x20   s.sendall(b'CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\n\\r\\n')\n\
         \x20   h=b''\n\
         \x20   while b'\\r\\n\\r\\n' not in h: h+=s.recv(4096)\n\
         \x20   print(int((time.perf_counter()-t)*1e6), h.split()[1].decode(), flush=True)\n\
         \x20   s.close()\n"
    )
}

fn parse_runs(out: &[u8], want: &str) -> anyhow::Result<Samples> {
    let mut s = Samples::default();
    for line in String::from_utf8_lossy(out).lines() {
        let mut f = line.split_whitespace();
        let us: u64 = f.next().context("an empty line")?.parse()?;
        let code = f.next().unwrap_or_default();
        ensure!(code == want, "a CONNECT answered {code}, not {want}");
        s.push(Duration::from_micros(us));
    }
    Ok(s)
}

/// One download of `bytes` by curl in the egress sandbox (`args` say how
/// it gets out): its total time and its name lookup's.
async fn download(
    gw: &mut BenchGateway,
    args: &[&str],
    url: &str,
    bytes: u64,
) -> anyhow::Result<(Duration, Duration)> {
    let mut argv = vec!["curl", "-s", "-o", "/dev/null"];
    argv.extend_from_slice(args);
    argv.extend([
        "-w",
        "%{time_total} %{size_download} %{time_namelookup}",
        url,
    ]);
    let r = gateway::exec(&mut gw.client, "bench-egress", &argv).await?;
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let mut f = out.split_whitespace();
    let secs: f64 = f.next().context("curl printed nothing")?.parse()?;
    ensure!(
        f.next() == Some(&bytes.to_string()[..]),
        "a short download by curl {args:?} (exit {}): {out}",
        r.exit
    );
    let looked: f64 = f.next().context("no lookup time")?.parse()?;
    Ok((
        Duration::from_secs_f64(secs),
        Duration::from_secs_f64(looked),
    ))
}

async fn exec_rtt(gw: &mut BenchGateway, sandbox: &str, runs: usize) -> anyhow::Result<Samples> {
    let mut s = Samples::default();
    for _ in 0..runs {
        let t = Instant::now();
        let r = gateway::exec(&mut gw.client, sandbox, &["true"]).await?;
        ensure!(r.exit == 0, "`true` exited {}", r.exit);
        s.push(t.elapsed());
    }
    Ok(s)
}

pub async fn measure(gw: &mut BenchGateway, bytes: u64, runs: usize) -> anyhow::Result<Egress> {
    let src = source(bytes)?;
    let hold = holder()?;
    for name in ["bench-egress", "bench-bystander"] {
        gateway::create_to_ready(&mut gw.client, "process", name, Duration::from_secs(30)).await?;
    }
    let set = |yaml: String| pb::SetSandboxPolicyRequest {
        name: "bench-egress".into(),
        yaml,
        expected_revision: 0,
    };
    gw.client
        .set_sandbox_policy(set(policy(&[src, hold])))
        .await?;

    let url = format!("http://127.0.0.1:{src}/");
    let mut through = Samples::default();
    let mut direct = Samples::default();
    for _ in 0..runs {
        let (secs, _) = download(
            gw,
            &["--noproxy", "", "-p", "-x", "http://127.0.0.1:3128"],
            &url,
            bytes,
        )
        .await?;
        through.push(secs);
        let host = tokio::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{time_total}", &url])
            .output()
            .await?;
        let secs: f64 = String::from_utf8_lossy(&host.stdout).trim().parse()?;
        direct.push(Duration::from_secs_f64(secs));
    }

    // No proxy: curl resolves the name through the stub and connects to
    // the address it handed out.
    let named = format!("http://{NAME}:{src}/");
    let mut captured = Samples::default();
    let mut lookup = Samples::default();
    for _ in 0..runs {
        let (secs, looked) = download(gw, &["--noproxy", "*"], &named, bytes).await?;
        captured.push(secs);
        lookup.push(looked);
    }

    let n = runs * 20;
    let r = gateway::exec(
        &mut gw.client,
        "bench-egress",
        &["python3", "-c", &connect_script(hold, n)],
    )
    .await?;
    let connect = parse_runs(&r.stdout, "200")?;
    let direct_connect = tokio::task::spawn_blocking(move || {
        let mut s = Samples::default();
        for _ in 0..n {
            let t = Instant::now();
            let c = std::net::TcpStream::connect(("127.0.0.1", hold))?;
            s.push(t.elapsed());
            drop(c);
        }
        anyhow::Ok(s)
    })
    .await??;
    // Port 9 is in no rule.
    let r = gateway::exec(
        &mut gw.client,
        "bench-egress",
        &["python3", "-c", &connect_script(9, n)],
    )
    .await?;
    let denial = parse_runs(&r.stdout, "403")?;

    let mut update = Samples::default();
    for i in 0..runs * 4 {
        let ports = if i % 2 == 0 {
            vec![src, hold, 9]
        } else {
            vec![src, hold]
        };
        let t = Instant::now();
        gw.client.set_sandbox_policy(set(policy(&ports))).await?;
        update.push(t.elapsed());
    }

    let exec_idle = exec_rtt(gw, "bench-bystander", runs * 4).await?;
    // The flood holds the default limit (256) until /sandbox/release appears.
    let flood = format!(
        "import socket,os,time\n\
         socks=[socket.create_connection(('127.0.0.1',3128)) for _ in range(500)]\n\
         for s in socks: s.sendall(b'CONNECT 127.0.0.1:{hold} HTTP/1.1\\r\\n\\r\\n')\n\
         ok=sum(1 for s in socks if b' 200 ' in s.recv(4096))\n\
         print(ok, flush=True)\n\
         while not os.path.exists('/sandbox/release'): time.sleep(0.05)\n"
    );
    let mut flood_client = gateway::client(&gw.url).await?;
    let flood_task = tokio::spawn(async move {
        gateway::exec(
            &mut flood_client,
            "bench-egress",
            &["python3", "-c", &flood],
        )
        .await
    });
    let id = gw
        .client
        .get_sandbox(pb::GetSandboxRequest {
            name: "bench-egress".into(),
        })
        .await?
        .into_inner()
        .sandbox
        .map(|s| s.id)
        .unwrap_or_default();
    let id = openshell_core::SandboxId::parse(&id).context("the sandbox's id")?;
    let egress = gw.gw.runtime.egress().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while egress.open_connections(id) < 256 {
        ensure!(Instant::now() < deadline, "the flood never held its limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = egress.open_connections(id);
    let exec_loaded = exec_rtt(gw, "bench-bystander", runs * 4).await?;
    gateway::exec(
        &mut gw.client,
        "bench-egress",
        &["touch", "/sandbox/release"],
    )
    .await?;
    flood_task.await??;
    gateway::delete_and_wait(&mut gw.client, "bench-egress").await?;
    gateway::delete_and_wait(&mut gw.client, "bench-bystander").await?;
    Ok(Egress {
        bytes,
        through,
        direct,
        captured,
        lookup,
        connect,
        direct_connect,
        denial,
        update,
        exec_idle,
        exec_loaded,
        held,
    })
}
