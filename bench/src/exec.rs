//! Exec over the relay, each against a baseline measured in the same run:
//! the round trip of `true` vs a local `sh -c true` spawn, and the stdout
//! stream rate vs a raw loopback TCP copy of the same byte count.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::ensure;
use openshell_proto::v1 as pb;

use crate::gateway::{self, Client};
use crate::stats::Samples;

pub struct RoundTrip {
    pub relay: Samples,
    pub local: Samples,
    /// A unary `Health` call on the same connection: the floor any RPC pays.
    pub unary: Samples,
}

pub async fn round_trip(
    client: &mut Client,
    sandbox: &str,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<RoundTrip> {
    let mut unary = Samples::default();
    for i in 0..warmup + runs {
        let t = Instant::now();
        client.health(pb::HealthRequest {}).await?;
        if i >= warmup {
            unary.push(t.elapsed());
        }
    }
    let mut relay = Samples::default();
    for i in 0..warmup + runs {
        let t = Instant::now();
        let r = gateway::exec(client, sandbox, &["true"]).await?;
        let d = t.elapsed();
        ensure!(r.exit == 0, "`true` exited {}", r.exit);
        if i >= warmup {
            relay.push(d);
        }
    }
    let local = tokio::task::spawn_blocking(move || {
        let mut s = Samples::default();
        for i in 0..warmup + runs {
            let t = Instant::now();
            let st = std::process::Command::new("sh")
                .arg("-c")
                .arg("true")
                .status()?;
            let d = t.elapsed();
            anyhow::ensure!(st.success(), "sh -c true failed: {st}");
            if i >= warmup {
                s.push(d);
            }
        }
        anyhow::Ok(s)
    })
    .await??;
    Ok(RoundTrip {
        relay,
        local,
        unary,
    })
}

pub struct Throughput {
    pub bytes: u64,
    /// Seconds per transfer, one per run.
    pub relay: Samples,
    pub tcp: Samples,
}

impl Throughput {
    pub fn mb_s(&self, s: &Samples) -> f64 {
        self.bytes as f64 / 1e6 / s.p50().as_secs_f64()
    }
}

/// `head -c bytes /dev/zero` in the sandbox, drained by the client.
pub async fn throughput(
    client: &mut Client,
    sandbox: &str,
    bytes: u64,
    runs: usize,
) -> anyhow::Result<Throughput> {
    let n = bytes.to_string();
    let mut relay = Samples::default();
    for _ in 0..runs {
        let t = Instant::now();
        let r = gateway::exec(client, sandbox, &["head", "-c", &n, "/dev/zero"]).await?;
        relay.push(t.elapsed());
        ensure!(
            r.exit == 0 && r.stdout_bytes == bytes,
            "short stream: exit {}, {} of {bytes} bytes",
            r.exit,
            r.stdout_bytes
        );
    }
    let tcp = tokio::task::spawn_blocking(move || {
        let mut s = Samples::default();
        for _ in 0..runs {
            s.push(tcp_copy(bytes)?);
        }
        anyhow::Ok(s)
    })
    .await??;
    Ok(Throughput { bytes, relay, tcp })
}

/// One writer thread pushes `bytes` through a loopback TCP connection in
/// 64 KiB writes; this thread reads it all. Plain blocking std I/O: the
/// baseline is the kernel's loopback, not our code.
fn tcp_copy(bytes: u64) -> anyhow::Result<Duration> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let t = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        let buf = vec![0u8; 64 << 10];
        let mut left = bytes;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..k])?;
            left -= k as u64;
        }
        Ok(())
    });
    let (mut conn, _) = listener.accept()?;
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    loop {
        let k = conn.read(&mut buf)?;
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    let d = t.elapsed();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    ensure!(got == bytes, "tcp copy moved {got} of {bytes} bytes");
    Ok(d)
}
