//! Latency under attack (issue 13): what another client waits for a
//! `Health` on a new connection (as `openshell status` makes one) with
//! nothing else going on, and during each flood the security tests perform
//! against the API port and a sandbox's supervisor socket. The tests only
//! assert a 2 s deadline; these are the figures.
//!
//! The API floods run in a child process (python3, as the tests do), so
//! their sockets are not this process's; the supervisor-socket flood is
//! this process's own unix sockets, as a hostile supervisor's would be.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use openshell_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::gateway;
use crate::stats::Samples;

/// Silent TCP connections: connect, never send a byte, re-dial what closes.
const SILENT: &str = include_str!("../../e2e/floods/silent.py");

/// Live idle connections: the HTTP/2 preface, then nothing (no request).
const IDLE_LIVE: &str = r#"
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
sel = selectors.DefaultSelector()
def dial():
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(PREFACE)
    except OSError:
        return False
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    return True
print(sum(dial() for _ in range(n)), flush=True)
while True:
    for key, _ in sel.select(timeout=1):
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
            dial()
"#;

pub struct UnderAttack {
    pub quiet: Samples,
    /// (what the flood is, how many connections it held, Health latencies)
    pub floods: Vec<(String, usize, Samples)>,
}

/// Health on a fresh connection, `runs` times.
async fn health(url: &str, runs: usize) -> anyhow::Result<Samples> {
    let mut s = Samples::default();
    for _ in 0..runs {
        let t = Instant::now();
        let mut c = tokio::time::timeout(Duration::from_secs(10), gateway::client(url))
            .await
            .context("connecting took over 10 s")??;
        c.health(pb::HealthRequest {}).await?;
        s.push(t.elapsed());
    }
    Ok(s)
}

/// A python3 flood against `port`; killed on drop.
struct Flood(Child);

impl Flood {
    async fn start(script: &str, port: u16, n: usize) -> anyhow::Result<(Self, usize)> {
        let mut child = Command::new("python3")
            .args(["-c", script, &port.to_string(), &n.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3 for a flood")?;
        let out = tokio::process::ChildStdout::from_std(child.stdout.take().expect("piped"))?;
        let flood = Flood(child);
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).await?;
        let opened = line
            .trim()
            .parse()
            .with_context(|| format!("the flood said {line:?}"))?;
        Ok((flood, opened))
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn measure(
    url: &str,
    supervisor_socket: &Path,
    runs: usize,
) -> anyhow::Result<UnderAttack> {
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the gateway URL has no port")?;
    let quiet = health(url, runs).await?;
    let mut floods = Vec::new();

    for (what, script, n) in [
        ("1,100 silent TCP connections to the API port", SILENT, 1100),
        (
            "300 idle HTTP/2 connections (preface, no request) to the API port",
            IDLE_LIVE,
            300,
        ),
    ] {
        let (flood, opened) = Flood::start(script, port, n).await?;
        floods.push((what.to_owned(), opened, health(url, runs).await?));
        drop(flood);
    }

    // 1,100 connections to one sandbox's supervisor socket, held silent.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.len() < 1100 && Instant::now() < deadline {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::UnixStream::connect(supervisor_socket),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            // The listen queue is full: the gateway stopped accepting.
            _ => break,
        }
    }
    if held.is_empty() {
        bail!("could not connect to {}", supervisor_socket.display());
    }
    floods.push((
        "silent connections to one sandbox's supervisor socket".to_owned(),
        held.len(),
        health(url, runs).await?,
    ));
    drop(held);
    Ok(UnderAttack { quiet, floods })
}
