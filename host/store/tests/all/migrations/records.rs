//! The records in `fixtures/*_0001.sql`, as Rust values. The fixtures were
//! written from exactly these values by the store at schema 0001, so a store
//! reading the fixture must get these back.
//!
//! Each record was inserted (revision 1), then written back with
//! `update_sandbox` until it reached the revision given here, as the gateway
//! does.
//!
//! Frozen: change nothing here but what a new `Sandbox` or `PluginRecord`
//! field needs (its value for a row written before the field existed), or
//! the test stops checking what was really on disk.

use std::collections::BTreeMap;

use openshell_core::{Event, Resources, Sandbox, SandboxId, SandboxName, SandboxSpec, apply};
use openshell_store::PluginRecord;

/// A stored sandbox and the secret hash next to it.
pub struct Stored {
    pub sandbox: Sandbox,
    pub secret_hash: Option<&'static str>,
}

/// Sandboxes in every phase, with values that are awkward to quote in SQL
/// or JSON (quotes, backslashes, `%`, newlines, non-ASCII, every byte), the
/// extremes of each number, and shared timestamps so order ties break by id.
pub fn sandboxes() -> Vec<Stored> {
    let spec = |driver: &str| SandboxSpec {
        driver: driver.into(),
        environment: BTreeMap::from([
            ("HOME".into(), "/home/agent".into()),
            (
                "QUOTES".into(),
                r#"it's "quoted" \ back\slash %s $1 ;--"#.into(),
            ),
            (
                "UNICODE".into(),
                "héllo wörld ✓ 日本語 🦀\ttab\nnewline".into(),
            ),
            ("EMPTY".into(), String::new()),
        ]),
        resources: Resources {
            vcpus: 2,
            memory_mib: 512,
            max_processes: 64,
            // Records from before disk sizes load with none (the gateway
            // gives them its default).
            disk_gib: 0,
        },
        // Records from before images load with none.
        image: None,
        // Nor lifetimes.
        lifetime: Default::default(),
        // Nor policies (nothing reachable).
        policy: None,
    };
    let new = |id: &str, name: &str, driver: &str, created_at_ms: i64| {
        let mut s = Sandbox::new(
            SandboxName::parse(name).expect("fixture names are valid"),
            spec(driver),
            None,
            created_at_ms,
        );
        s.id = SandboxId::parse(id).expect("fixture ids are valid");
        s.revision = 1;
        s
    };
    let step = |s: &mut Sandbox, event: Event, now_ms: i64| {
        s.status = apply(&s.status, &event, now_ms).expect("fixture events apply");
        s.updated_at_ms = now_ms;
    };

    // Just stored, nothing heard from the driver; no driver state yet.
    let mut provisioning = new(
        "0b6f1c1e-3a44-4c55-9d0e-6a1f0c2b7d01",
        "provisioning",
        "process",
        1_700_000_000_000,
    );
    provisioning.request_id = Some("req-'provisioning'".into());

    // Ready, with binary driver state holding every byte value.
    let mut ready = new(
        "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e02",
        "ready-1",
        "process",
        1_700_000_000_000,
    );
    step(
        &mut ready,
        Event::DriverStarting {
            message: "booting \"fast\" 'now'".into(),
        },
        1_700_000_000_100,
    );
    step(&mut ready, Event::SupervisorConnected, 1_700_000_000_200);
    ready.driver_state = (0..=255).collect();
    ready.revision = 3;

    // A VM that failed, with a driver condition.
    let mut failed = new(
        "2d3e4f5a-6b7c-4d8e-9fa0-1b2c3d4e5f03",
        "failed-vm",
        "vm",
        1_700_000_001_000,
    );
    step(
        &mut failed,
        Event::DriverStarting {
            message: "qemu".into(),
        },
        1_700_000_001_100,
    );
    step(
        &mut failed,
        Event::DriverFailed {
            reason: "KernelPanic".into(),
            message: r"no root\ found: C:\path 'x' 100%".into(),
        },
        1_700_000_001_200,
    );
    failed.driver_state = b"{\"pid\":4242,\"note\":\"it's\"}".to_vec();
    failed.request_id = Some("req-failed".into());
    failed.revision = 3;

    // Being deleted when the gateway stopped.
    let mut deleting = new(
        "3e4f5a6b-7c8d-4e9f-a0b1-2c3d4e5f6a04",
        "deleting",
        "process",
        1_700_000_002_000,
    );
    step(&mut deleting, Event::DeleteRequested, 1_700_000_002_500);
    deleting.driver_state = vec![0];
    deleting.revision = 2;

    // Ready, then the gateway restarted: Provisioning again, GatewayRestarted.
    let mut restarted = new(
        "4f5a6b7c-8d9e-4fa0-b1c2-3d4e5f6a7b05",
        "restarted",
        "vm",
        1_700_000_003_000,
    );
    step(
        &mut restarted,
        Event::DriverStarting {
            message: "boot".into(),
        },
        1_700_000_003_100,
    );
    step(
        &mut restarted,
        Event::SupervisorConnected,
        1_700_000_003_200,
    );
    step(&mut restarted, Event::GatewayRestarted, 1_700_000_003_300);
    restarted.revision = 4;

    // Extremes: an empty spec, huge numbers, timestamps at both ends.
    let mut extremes = new("5a6b7c8d-9eaf-4b0c-91d2-4e5f6a7b8c06", "x", "", i64::MIN);
    extremes.spec = SandboxSpec::default();
    extremes.spec.resources = Resources {
        vcpus: u32::MAX,
        memory_mib: u64::MAX,
        max_processes: u32::MAX,
        disk_gib: 0,
    };
    extremes.updated_at_ms = i64::MAX;
    extremes.driver_state = vec![0xff; 4096];

    // A tie on created_at_ms with `ready-1`; the smaller id sorts first.
    let mut tie = new(
        "00000000-0000-4000-8000-000000000007",
        "a-very-long-name-that-is-exactly-sixty-three-characters-long-00",
        "process",
        1_700_000_000_000,
    );
    step(
        &mut tie,
        Event::DriverProgress {
            message: "pulling layer 3/7".into(),
        },
        1_700_000_000_050,
    );
    tie.revision = 2;

    vec![
        Stored {
            sandbox: provisioning,
            secret_hash: None,
        },
        Stored {
            sandbox: ready,
            secret_hash: Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
        },
        Stored {
            sandbox: failed,
            secret_hash: Some("it's a hash"),
        },
        Stored {
            sandbox: deleting,
            secret_hash: None,
        },
        Stored {
            sandbox: restarted,
            secret_hash: Some(""),
        },
        Stored {
            sandbox: extremes,
            secret_hash: None,
        },
        Stored {
            sandbox: tie,
            secret_hash: None,
        },
    ]
}

pub fn plugins() -> Vec<PluginRecord> {
    vec![
        PluginRecord {
            name: "process".into(),
            digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .into(),
            version: "0.1.0".into(),
            grants: vec![
                "openshell:compute/log@0.1.0".into(),
                "openshell:compute/process@0.1.0".into(),
            ],
            wasm_path: "/var/lib/openshell/plugins/process.wasm".into(),
            loaded_at_ms: 1_700_000_000_000,
        },
        PluginRecord {
            name: "vm".into(),
            digest: "sha256:ffff".into(),
            version: "0.2.0-rc.1+build'5".into(),
            grants: vec![],
            wasm_path: r"/odd path/with 'quote' and \backslash/vm.wasm".into(),
            loaded_at_ms: 0,
        },
    ]
}
