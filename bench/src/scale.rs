//! Many clients at once: creates per second with 50 concurrent clients on
//! the process driver, and what 100 Ready sandboxes cost in memory.
//!
//! The gateway runs in this process, so its memory is this process's RSS;
//! the launchers and supervisors are separate processes, summed apart.

use std::time::{Duration, Instant};

use anyhow::Context;
use openshell_proto::v1 as pb;

use crate::gateway::{self, BenchGateway};
use crate::stats::Samples;

pub struct Scale {
    pub clients: usize,
    pub creates: usize,
    /// Per-create latency to the CreateSandbox reply, and to READY.
    pub ack: Samples,
    pub ready: Samples,
    /// From the first request to the last reply / the last READY.
    pub ack_wall: Duration,
    pub ready_wall: Duration,
    /// This process's RSS before the clients connect, with 100 Ready
    /// sandboxes and the clients still connected, and after they left.
    pub rss_before: u64,
    pub rss_with_clients: u64,
    pub rss_after: u64,
    /// RSS summed over every process this one spawned (launchers,
    /// supervisors) and how many there were.
    pub children_rss: u64,
    pub children: usize,
}

impl Scale {
    pub fn per_sandbox_kib(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / 1024.0 / self.creates as f64
    }
}

pub async fn measure(
    gw: &mut BenchGateway,
    clients: usize,
    per_client: usize,
) -> anyhow::Result<Scale> {
    settle_rss().await;
    let rss_before = rss(std::process::id()).context("reading /proc/self/status")?;
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(gateway::client(&gw.url).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (c, mut client) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut watches = Vec::new();
            let mut acks = Vec::new();
            for k in 0..per_client {
                let name = format!("bench-scale-{c}-{k}");
                let t0 = Instant::now();
                client
                    .create_sandbox(pb::CreateSandboxRequest {
                        name: name.clone(),
                        spec: Some(pb::SandboxSpec {
                            driver: "process".into(),
                            ..Default::default()
                        }),
                        request_id: String::new(),
                        policy: String::new(),
                    })
                    .await?;
                acks.push((t0.elapsed(), start.elapsed()));
                // Watch on the same connection while this client goes on
                // creating.
                let mut w = client.clone();
                watches.push(tokio::spawn(async move {
                    let t = gateway::watch_to_ready(&mut w, &name, t0, 0, Duration::from_secs(120))
                        .await?;
                    anyhow::Ok((t.seen, t0.duration_since(start) + t.seen))
                }));
            }
            let mut readies = Vec::new();
            for w in watches {
                readies.push(w.await??);
            }
            anyhow::Ok((client, acks, readies))
        }));
    }
    let (mut ack, mut ready) = (Samples::default(), Samples::default());
    let (mut ack_wall, mut ready_wall) = (Duration::ZERO, Duration::ZERO);
    let mut conns = Vec::new();
    for t in tasks {
        let (client, acks, readies) = t.await??;
        conns.push(client);
        for (lat, at) in acks {
            ack.push(lat);
            ack_wall = ack_wall.max(at);
        }
        for (lat, at) in readies {
            ready.push(lat);
            ready_wall = ready_wall.max(at);
        }
    }
    let rss_with_clients = rss(std::process::id()).unwrap_or(0);
    drop(conns);
    settle_rss().await;
    let rss_after = rss(std::process::id()).unwrap_or(0);
    let kids = descendants(std::process::id());
    let children_rss = kids.iter().filter_map(|p| rss(*p)).sum();

    // Tear down, a few deletes at a time.
    let names: Vec<String> = (0..clients)
        .flat_map(|c| (0..per_client).map(move |k| format!("bench-scale-{c}-{k}")))
        .collect();
    let mut dels = Vec::new();
    for chunk in names.chunks(names.len().div_ceil(8)) {
        let mut client = gw.client.clone();
        let chunk = chunk.to_vec();
        dels.push(tokio::spawn(async move {
            for n in chunk {
                gateway::delete_and_wait(&mut client, &n).await?;
            }
            anyhow::Ok(())
        }));
    }
    for d in dels {
        d.await??;
    }
    Ok(Scale {
        clients,
        creates: clients * per_client,
        ack,
        ready,
        ack_wall,
        ready_wall,
        rss_before,
        rss_with_clients,
        rss_after,
        children_rss,
        children: kids.len(),
    })
}

/// Gives freed memory and finished tasks a moment to settle before an RSS
/// reading.
async fn settle_rss() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Resident set size of a process in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Every live descendant of `root`, from /proc's parent links.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may
        // itself contain spaces or parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p && child != root {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}
