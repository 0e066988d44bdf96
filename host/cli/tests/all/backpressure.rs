//! Issue 15: the relay applies backpressure end to end. 1 GiB streams
//! through exec to a reader that reads slowly; the gateway's and the
//! supervisor's memory stay bounded (nothing buffers what the reader has
//! not taken), heartbeats keep the session up meanwhile, and the bytes
//! arrive intact.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::harness::{Gateway, KillOnDrop, as_strs, process_flags};

/// Resident memory of `pid` in KiB (0 once it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The supervisor's host pid: the process running `openshell-supervisor`
/// whose environment names the sandbox.
fn supervisor_pid(sandbox_id: &str) -> u32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains("openshell-supervisor")
            && String::from_utf8_lossy(&env).contains(sandbox_id)
        {
            return pid;
        }
    }
    panic!("no supervisor for {sandbox_id}");
}

#[test]
fn issue_15_a_slow_reader_slows_a_gigabyte_stream_with_bounded_memory_and_live_heartbeats() {
    const BLOB_MIB: u64 = 64;
    const COPIES: u64 = 16;
    let dir = TempDir::new().unwrap();
    let mut flags = process_flags();
    // Two missed heartbeats drop a session: at 200 ms, a data stream that
    // held up control for half a second would show.
    flags.extend(["--heartbeat-ms", "200"].map(String::from));
    let gw = Gateway::start(dir.path(), &as_strs(&flags));
    gw.ok(["sandbox", "create", "--name", "s", "--", "true"]);
    let get = gw.ok(["sandbox", "get", "s", "-o", "json"]);
    let id: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
    let supervisor = supervisor_pid(id["id"].as_str().unwrap());

    // 64 MiB of random bytes, written 16 times: 1 GiB the test can check.
    let script = format!(
        "head -c {BLOB_MIB}M /dev/urandom > /sandbox/blob && sha256sum /sandbox/blob >&2 && \
         for i in $(seq {COPIES}); do cat /sandbox/blob; done"
    );
    let mut cmd = gw.cli(["sandbox", "exec", "s", "--", "sh", "-c", &script]);
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = KillOnDrop(
        cmd.stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let mut out = child.0.stdout.take().unwrap();
    let (gw_base, sup_base) = (rss_kib(gw.pid()), rss_kib(supervisor));

    // Each 64 MiB segment's hash, checked against the blob afterwards.
    let segment = BLOB_MIB << 20;
    let mut hashes = Vec::new();
    let mut current = Sha256::new();
    let mut total = 0u64;
    let (mut gw_peak, mut sup_peak) = (0, 0);
    let mut buf = vec![0; 64 << 10];
    let started = Instant::now();
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let room = (segment - total % segment) as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            current.update(now);
            total += now.len() as u64;
            if total.is_multiple_of(segment) {
                hashes.push(hex::encode(std::mem::take(&mut current).finalize()));
            }
            rest = later;
        }
        // Slow: a pause per 4 MiB keeps the reader well behind the writer.
        if total % (4 << 20) < n as u64 {
            std::thread::sleep(Duration::from_millis(20));
            gw_peak = gw_peak.max(rss_kib(gw.pid()));
            sup_peak = sup_peak.max(rss_kib(supervisor));
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "1 GiB did not arrive in 5 minutes ({total} bytes)"
        );
    }
    let status = child.0.wait().unwrap();
    let err = std::fs::read_to_string(stderr.path()).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert_eq!(total, COPIES * (BLOB_MIB << 20), "{err}");

    // Intact: every segment is the blob the sandbox hashed.
    let blob = err
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no sha256sum line in {err}"));
    assert_eq!(hashes.len() as u64, COPIES);
    for (i, h) in hashes.iter().enumerate() {
        assert_eq!(h, blob, "copy {i} was altered");
    }
    eprintln!(
        "backpressure: 1 GiB in {:.1?}; gateway RSS {gw_base} -> peak {gw_peak} KiB, supervisor {sup_base} -> {sup_peak} KiB",
        started.elapsed()
    );

    // Bounded: what the reader has not taken waits in the sandbox's pipe,
    // not in the gateway or the supervisor.
    let bound = 64 << 10; // KiB
    assert!(
        gw_peak < gw_base + bound,
        "the gateway grew from {gw_base} KiB to {gw_peak} KiB"
    );
    assert!(
        sup_peak < sup_base + bound,
        "the supervisor grew from {sup_base} KiB to {sup_peak} KiB"
    );

    // The session stayed up the whole time.
    let log = gw.log();
    assert!(!log.contains("supervisor silent"), "{log}");
    assert_eq!(log.matches("supervisor connected").count(), 1, "{log}");
    gw.ok(["sandbox", "exec", "s", "--", "true"]);
}
