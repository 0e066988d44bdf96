//! Human tables and `-o json` for scripts.

use openshell_proto::v1 as pb;
use serde_json::{Value, json};

use crate::args::Output;

pub fn phase_name(p: i32) -> &'static str {
    match pb::SandboxPhase::try_from(p).unwrap_or(pb::SandboxPhase::Unspecified) {
        pb::SandboxPhase::Unspecified => "Unspecified",
        pb::SandboxPhase::Provisioning => "Provisioning",
        pb::SandboxPhase::Ready => "Ready",
        pb::SandboxPhase::Error => "Error",
        pb::SandboxPhase::Deleting => "Deleting",
        pb::SandboxPhase::Unknown => "Unknown",
        pb::SandboxPhase::Stopped => "Stopped",
    }
}

pub fn sandbox_json(s: &pb::Sandbox) -> Value {
    let spec = s.spec.clone().unwrap_or_default();
    let r = spec.resources.unwrap_or_default();
    json!({
        "id": s.id,
        "name": s.name,
        "phase": phase_name(s.phase),
        "driver": spec.driver,
        "environment": spec.environment,
        "resources": {"vcpus": r.vcpus, "memory_mib": r.memory_mib, "max_processes": r.max_processes},
        "conditions": s.conditions.iter().map(|c| json!({
            "type": c.r#type, "status": c.status, "reason": c.reason,
            "message": c.message, "last_transition_time_ms": c.last_transition_time_ms,
        })).collect::<Vec<_>>(),
        "created_at_ms": s.created_at_ms,
        "updated_at_ms": s.updated_at_ms,
        "revision": s.revision,
        "isolation": s.isolation,
        "policy_revision": s.policy_revision,
        "image": spec.image,
        "image_digest": spec.image_digest,
        "disk_gib": spec.disk_gib,
        "ttl_seconds": spec.ttl_seconds,
        "idle_timeout_seconds": spec.idle_timeout_seconds,
        "expires_at_ms": s.expires_at_ms,
    })
}

/// Seconds as a person reads them: `1h30m`, `45s`.
pub fn secs(n: u64) -> String {
    let (d, h, m, s) = (n / 86_400, n / 3600 % 24, n / 60 % 60, n % 60);
    let mut out = String::new();
    for (v, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if v > 0 {
            out.push_str(&format!("{v}{unit}"));
        }
    }
    if out.is_empty() { "0s".into() } else { out }
}

pub fn stats(out: Output, s: &pb::Sandbox, u: &pb::SandboxStats) {
    let limit = |v: String, l: u64| if l == 0 { " (no limit)".to_owned() } else { v };
    if out == Output::Json {
        return print_json(&json!({
            "name": s.name, "phase": phase_name(s.phase), "source": u.source,
            "cpu_usage_ns": u.cpu_usage_ns, "cpu_limit_millis": u.cpu_limit_millis,
            "memory_bytes": u.memory_bytes, "memory_limit_bytes": u.memory_limit_bytes,
            "pids": u.pids, "pids_limit": u.pids_limit,
            "disk_bytes": u.disk_bytes, "disk_limit_bytes": u.disk_limit_bytes,
        }));
    }
    println!("Name:     {} ({})", s.name, phase_name(s.phase));
    println!("Source:   {}", u.source);
    println!(
        "CPU:      {:.2} s used{}",
        u.cpu_usage_ns as f64 / 1e9,
        limit(
            format!(" of {:.2} cores", f64::from(u.cpu_limit_millis) / 1000.0),
            u.cpu_limit_millis.into()
        )
    );
    println!(
        "Memory:   {}{}",
        bytes(u.memory_bytes),
        limit(
            format!(" of {}", bytes(u.memory_limit_bytes)),
            u.memory_limit_bytes
        )
    );
    println!(
        "Pids:     {}{}",
        u.pids,
        limit(format!(" of {}", u.pids_limit), u.pids_limit.into())
    );
    println!(
        "Disk:     {}{}",
        bytes(u.disk_bytes),
        limit(
            format!(" of {}", bytes(u.disk_limit_bytes)),
            u.disk_limit_bytes
        )
    );
}

fn image_json(i: &pb::Image) -> Value {
    json!({
        "names": i.names, "digest": i.digest, "size": i.size,
        "layers": i.layers, "sandboxes": i.sandboxes,
    })
}

/// Bytes as a person reads them.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn images(out: Output, list: &[pb::Image]) {
    if out == Output::Json {
        return print_json(&json!({"images": list.iter().map(image_json).collect::<Vec<_>>()}));
    }
    row(format!(
        "{:<48} {:<20} {:>10} SANDBOXES",
        "NAME", "DIGEST", "SIZE"
    ));
    for i in list {
        let short = i.digest.get(..19).unwrap_or(&i.digest);
        let names = if i.names.is_empty() {
            vec!["<none>".to_owned()]
        } else {
            i.names.clone()
        };
        for name in names {
            row(format!(
                "{:<48} {:<20} {:>10} {}",
                name,
                short,
                bytes(i.size),
                i.sandboxes.join(",")
            ));
        }
    }
}

/// One table line: padded cells, no trailing blanks (an empty last cell
/// would leave them), ended by a newline.
fn row(line: String) {
    println!("{}", line.trim_end());
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn status(out: Output, endpoint: &str, h: &pb::HealthResponse) {
    match out {
        Output::Json => print_json(&json!({
            "endpoint": endpoint, "status": h.status, "version": h.version, "drivers": h.drivers,
        })),
        Output::Table => {
            println!("Connected to {endpoint}");
            println!("Gateway version: {}", h.version);
            println!(
                "Drivers: {}",
                if h.drivers.is_empty() {
                    "(none)".to_owned()
                } else {
                    h.drivers.join(", ")
                }
            );
        }
    }
}

/// What a binary rule rests on: in a VM, the calling binary is reported by
/// a supervisor that guest root could replace.
fn egress_trust(isolation: &str) -> &'static str {
    if isolation.starts_with("vm") {
        "; egress binaries are as the guest reports them (guest root could lie)"
    } else {
        ""
    }
}

pub fn sandbox(out: Output, s: &pb::Sandbox) {
    if out == Output::Json {
        return print_json(&sandbox_json(s));
    }
    let spec = s.spec.clone().unwrap_or_default();
    println!("Name:     {}", s.name);
    println!("Id:       {}", s.id);
    println!("Phase:    {}", phase_name(s.phase));
    println!("Driver:   {}", spec.driver);
    println!("Isolation: {}{}", s.isolation, egress_trust(&s.isolation));
    println!(
        "Policy:   {}",
        match s.policy_revision {
            0 => "none: sandbox code reaches nothing (`openshell policy set`)".to_owned(),
            r => format!("revision {r} (`openshell policy get {}`)", s.name),
        }
    );
    if !spec.image.is_empty() {
        println!("Image:    {}", spec.image);
        println!("Digest:   {}", spec.image_digest);
    }
    if spec.disk_gib == 0 {
        println!("Disk:     unbounded (the gateway has no sandbox disk)");
    } else {
        println!("Disk:     {} GiB", spec.disk_gib);
    }
    if spec.ttl_seconds > 0 {
        println!(
            "TTL:      {} (deleted at {} ms since the epoch)",
            secs(spec.ttl_seconds),
            s.expires_at_ms
        );
    }
    if spec.idle_timeout_seconds > 0 {
        println!(
            "Idle:     stopped after {} without exec or SSH",
            secs(spec.idle_timeout_seconds)
        );
    }
    println!("Revision: {}", s.revision);
    if !spec.environment.is_empty() {
        let mut keys: Vec<_> = spec.environment.keys().collect();
        keys.sort();
        println!(
            "Env:      {}",
            keys.into_iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    println!("Conditions:");
    for c in &s.conditions {
        println!(
            "  {:<7} {:<7} {:<24} {}",
            c.r#type, c.status, c.reason, c.message
        );
    }
}

pub fn sandboxes(out: Output, list: &[pb::Sandbox], total: u64) {
    if out == Output::Json {
        return print_json(&json!({
            "sandboxes": list.iter().map(sandbox_json).collect::<Vec<_>>(),
            "total": total,
        }));
    }
    row(format!(
        "{:<28} {:<13} {:<10} ID",
        "NAME", "PHASE", "DRIVER"
    ));
    for s in list {
        let driver = s.spec.as_ref().map_or("", |sp| sp.driver.as_str());
        row(format!(
            "{:<28} {:<13} {:<10} {}",
            s.name,
            phase_name(s.phase),
            driver,
            s.id
        ));
    }
}

pub fn plugins(out: Output, list: &[pb::Plugin]) {
    if out == Output::Json {
        return print_json(&Value::Array(
            list.iter()
                .map(|p| json!({
                    "name": p.name, "version": p.version, "description": p.description,
                    "isolation": p.isolation, "digest": p.digest, "grants": p.grants,
                    "imports": p.imports, "sandboxes": p.sandboxes, "loaded_at_ms": p.loaded_at_ms,
                }))
                .collect(),
        ));
    }
    row(format!(
        "{:<16} {:<9} {:<8} {:<9} {:<14} GRANTS",
        "NAME", "VERSION", "KIND", "SANDBOXES", "DIGEST"
    ));
    for p in list {
        row(format!(
            "{:<16} {:<9} {:<8} {:<9} {:<14} {}",
            p.name,
            p.version,
            p.isolation,
            p.sandboxes,
            format!("sha256:{}", p.digest.get(..7).unwrap_or(&p.digest)),
            p.grants.join(",")
        ));
    }
}

pub fn forwards(out: Output, list: &[crate::forward::Record]) {
    if out == Output::Json {
        return print_json(&json!(list));
    }
    println!("{:<8} {:<28} {:<22} REMOTE", "PID", "SANDBOX", "LISTEN");
    for r in list {
        println!(
            "{:<8} {:<28} {:<22} {}",
            r.pid, r.sandbox, r.listen, r.remote
        );
    }
}

/// One log record: in a table, each line on the stream it came from
/// (events on stderr, marked); in JSON, one object per line on stdout.
pub fn log_record(out: Output, r: &pb::LogRecord, timestamps: bool) -> std::io::Result<()> {
    use std::io::Write;
    let source = pb::LogSource::try_from(r.source).unwrap_or(pb::LogSource::Unspecified);
    let stream = match source {
        pb::LogSource::Stdout => "stdout",
        pb::LogSource::Stderr => "stderr",
        pb::LogSource::Event | pb::LogSource::Unspecified => "event",
        pb::LogSource::Network => "network",
    };
    if out == Output::Json {
        let line = json!({
            "time_ms": r.time_ms,
            "stream": stream,
            "text": String::from_utf8_lossy(&r.data),
            "exit_code": r.exit_code,
        });
        return writeln!(std::io::stdout(), "{line}");
    }
    let mut text = Vec::new();
    if timestamps {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.time_ms.max(0) as u64);
        write!(text, "{} ", humantime::format_rfc3339_millis(t))?;
    }
    if source == pb::LogSource::Event || source == pb::LogSource::Unspecified {
        text.extend_from_slice(b"[openshell] ");
    }
    text.extend_from_slice(&r.data);
    if !text.ends_with(b"\n") {
        text.push(b'\n');
    }
    if source == pb::LogSource::Stdout || source == pb::LogSource::Network {
        let mut o = std::io::stdout().lock();
        o.write_all(&text)?;
        o.flush()
    } else {
        let mut e = std::io::stderr().lock();
        e.write_all(&text)?;
        e.flush()
    }
}
