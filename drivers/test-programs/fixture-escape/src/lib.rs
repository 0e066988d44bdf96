//! Test driver: `create` tries to reach outside its sandbox's state
//! directory through the `files` capability, and through the `process`
//! capability's workdir (the directory the launcher hands to sandbox code),
//! and reports any attempt the host did not refuse. The host test plants `link`, a symlink pointing outside,
//! and names an absolute path outside the sandbox in `ESCAPE_ABSOLUTE` (a
//! directory the test owns; `/tmp/escape.txt` if unset).
//!
//! Refused means `access-denied` or `invalid`. Success of any attempt is
//! `failed(EscapeSucceeded)`; any other error (say `failed: not found`, which
//! means the host looked outside) is `failed(EscapeNotDenied)`.

mod bindings {
    wit_bindgen::generate!({ path: "../../../wit", world: "compute-driver" });
}

use bindings::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use bindings::openshell::compute::types::{CapError, DriverEvent, Failure, Isolation};
use bindings::openshell::compute::{files, process};

struct Escape;

impl Guest for Escape {
    fn describe() -> DriverInfo {
        DriverInfo {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            isolation: Isolation::Process,
        }
    }

    fn validate(_spec: SandboxSpec) -> Result<(), DriverError> {
        Ok(())
    }

    fn create(spec: SandboxSpec, _: LaunchContext, state: Vec<u8>) -> Result<Outcome, DriverError> {
        let absolute = spec
            .environment
            .iter()
            .find(|(k, _)| k == "ESCAPE_ABSOLUTE")
            .map_or("/tmp/escape.txt", |(_, v)| v.as_str());
        let absolute_attempt = format!("write-file({absolute:?})");
        let attempts = [
            (
                r#"write-file("../escape.txt")"#,
                files::write_file("../escape.txt", b"escaped"),
            ),
            (
                absolute_attempt.as_str(),
                files::write_file(absolute, b"escaped"),
            ),
            (
                r#"read-file("../../etc/passwd")"#,
                files::read_file("../../etc/passwd").map(drop),
            ),
            (r#"create-dir("a/../../b")"#, files::create_dir("a/../../b")),
            (
                r#"read-file("link/passwd")"#,
                files::read_file("link/passwd").map(drop),
            ),
        ];
        // Workdirs that would hand sandbox code the state dir itself (where
        // the gateway keeps its socket and logs) or a host path.
        let workdirs = [
            ".", "", "..", "../x", "a/../..", "/etc", "run", "upper", "work", "lower",
        ];
        let spawns = workdirs.map(|w| {
            let spec = process::SpawnSpec {
                environment: vec![],
                workdir: w.into(),
                confinement: process::Confinement {
                    isolate_network: true,
                    memory_mib: 0,
                    max_processes: 0,
                    cpu_millis: 0,
                },
            };
            (
                format!("spawn(workdir {w:?})"),
                process::spawn(&spec, None).map(drop),
            )
        });
        let attempts = attempts
            .into_iter()
            .map(|(a, r)| (a.to_string(), r))
            .chain(spawns);
        let mut succeeded = Vec::new();
        let mut not_denied = Vec::new();
        for (attempt, result) in attempts {
            match result {
                Err(CapError::AccessDenied(_) | CapError::Invalid(_)) => {}
                Ok(()) => succeeded.push(attempt.to_string()),
                Err(other) => not_denied.push(format!("{attempt}: {other:?}")),
            }
        }
        let (reason, attempts) = match (succeeded.is_empty(), not_denied.is_empty()) {
            (true, true) => {
                return Ok(Outcome {
                    events: vec![DriverEvent::Progress("all escapes refused".into())],
                    state,
                });
            }
            (false, _) => ("EscapeSucceeded", succeeded),
            (true, false) => ("EscapeNotDenied", not_denied),
        };
        Err(DriverError::Failed(Failure {
            reason: reason.into(),
            message: attempts.join("; "),
        }))
    }

    fn resume(_: SandboxSpec, _: LaunchContext, state: Vec<u8>) -> Result<Outcome, DriverError> {
        Ok(Outcome {
            events: vec![],
            state,
        })
    }

    fn delete(_spec: SandboxSpec, _state: Vec<u8>) -> Result<(), DriverError> {
        Ok(())
    }

    fn on_event(_: SandboxSpec, state: Vec<u8>, _: HostEvent) -> Result<Outcome, DriverError> {
        Ok(Outcome {
            events: vec![],
            state,
        })
    }
}

bindings::export!(Escape with_types_in bindings);
