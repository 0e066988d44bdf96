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
        "image": spec.image,
        "image_digest": spec.image_digest,
    })
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
    println!("{:<48} {:<20} {:>10} SANDBOXES", "NAME", "DIGEST", "SIZE");
    for i in list {
        let short = i.digest.get(..19).unwrap_or(&i.digest);
        let names = if i.names.is_empty() {
            vec!["<none>".to_owned()]
        } else {
            i.names.clone()
        };
        for name in names {
            println!(
                "{:<48} {:<20} {:>10} {}",
                name,
                short,
                bytes(i.size),
                i.sandboxes.join(",")
            );
        }
    }
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

pub fn sandbox(out: Output, s: &pb::Sandbox) {
    if out == Output::Json {
        return print_json(&sandbox_json(s));
    }
    let spec = s.spec.clone().unwrap_or_default();
    println!("Name:     {}", s.name);
    println!("Id:       {}", s.id);
    println!("Phase:    {}", phase_name(s.phase));
    println!("Driver:   {}", spec.driver);
    println!("Isolation: {}", s.isolation);
    if !spec.image.is_empty() {
        println!("Image:    {}", spec.image);
        println!("Digest:   {}", spec.image_digest);
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
    println!("{:<28} {:<13} {:<10} ID", "NAME", "PHASE", "DRIVER");
    for s in list {
        let driver = s.spec.as_ref().map_or("", |sp| sp.driver.as_str());
        println!(
            "{:<28} {:<13} {:<10} {}",
            s.name,
            phase_name(s.phase),
            driver,
            s.id
        );
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
    println!(
        "{:<16} {:<9} {:<8} {:<9} {:<14} GRANTS",
        "NAME", "VERSION", "KIND", "SANDBOXES", "DIGEST"
    );
    for p in list {
        println!(
            "{:<16} {:<9} {:<8} {:<9} {:<14} {}",
            p.name,
            p.version,
            p.isolation,
            p.sandboxes,
            format!("sha256:{}", p.digest.get(..7).unwrap_or(&p.digest)),
            p.grants.join(",")
        );
    }
}
