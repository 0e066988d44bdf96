//! The process driver's rules: what a request may ask for and what the
//! supervisor is launched with. No capability calls here, so the rules are
//! unit-tested natively.

use openshell_driver_common::check_env_var;
use openshell_driver_common::openshell::compute::process::{Confinement, SpawnSpec};
use openshell_driver_common::openshell::compute::types::{DriverError, LaunchContext, SandboxSpec};

/// The supervisor's writable working directory, relative to the sandbox's
/// state directory.
pub const WORKDIR: &str = "workdir";
/// Where the supervisor dials the gateway, as seen inside the sandbox.
const GATEWAY_ENDPOINT: &str = "unix:///run/openshell/gateway.sock";

const MAX_VCPUS: u32 = 64;
/// Below this the supervisor itself does not fit.
const MIN_MEMORY_MIB: u64 = 16;
const DEFAULT_MEMORY_MIB: u64 = 512;
const DEFAULT_MAX_PROCESSES: u32 = 512;

/// Checks a request before anything is stored; every rejection says what to
/// change.
pub fn validate(spec: &SandboxSpec) -> Result<(), DriverError> {
    for (name, value) in &spec.environment {
        check_env_var(name, value)?;
    }
    let resources = &spec.resources;
    if resources.vcpus > MAX_VCPUS {
        return Err(DriverError::Unsupported(format!(
            "{} vcpus requested, but the process driver allows at most {MAX_VCPUS}: \
             ask for {MAX_VCPUS} or fewer",
            resources.vcpus
        )));
    }
    if (1..MIN_MEMORY_MIB).contains(&resources.memory_mib) {
        return Err(DriverError::Invalid(format!(
            "memory-mib {} is too small: ask for at least {MIN_MEMORY_MIB}, \
             or 0 for the default ({DEFAULT_MEMORY_MIB})",
            resources.memory_mib
        )));
    }
    Ok(())
}

/// What the supervisor is launched with: the user's environment plus the
/// gateway's `OPENSHELL_*` variables, under the requested limits.
pub fn spawn_spec(spec: &SandboxSpec, ctx: &LaunchContext) -> SpawnSpec {
    let gateway = [
        ("OPENSHELL_SANDBOX_ID", spec.id.as_str()),
        ("OPENSHELL_SANDBOX", spec.name.as_str()),
        ("OPENSHELL_ENDPOINT", GATEWAY_ENDPOINT),
        ("OPENSHELL_SANDBOX_SECRET", ctx.secret.as_str()),
    ];
    let environment = spec
        .environment
        .iter()
        .cloned()
        .chain(gateway.map(|(name, value)| (name.into(), value.into())))
        .collect();
    let resources = &spec.resources;
    SpawnSpec {
        environment,
        workdir: WORKDIR.into(),
        confinement: Confinement {
            isolate_network: true,
            memory_mib: or_default(resources.memory_mib, DEFAULT_MEMORY_MIB),
            max_processes: or_default(resources.max_processes, DEFAULT_MAX_PROCESSES),
            // 0 vcpus means no CPU quota.
            cpu_millis: resources.vcpus.saturating_mul(1000),
        },
    }
}

fn or_default<T: Default + PartialEq>(requested: T, default: T) -> T {
    if requested == T::default() {
        default
    } else {
        requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_driver_common::openshell::compute::types::Resources;

    fn spec(environment: &[(&str, &str)], vcpus: u32, memory_mib: u64) -> SandboxSpec {
        SandboxSpec {
            id: "sb-1".into(),
            name: "alpha".into(),
            environment: environment
                .iter()
                .map(|&(k, v)| (k.into(), v.into()))
                .collect(),
            resources: Resources {
                vcpus,
                memory_mib,
                max_processes: 0,
            },
            image: None,
        }
    }

    fn invalid_message(result: Result<(), DriverError>) -> String {
        match result {
            Err(DriverError::Invalid(message)) => message,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn an_ordinary_request_is_valid() {
        assert_eq!(validate(&spec(&[("PATH", "/bin")], 2, 1024)), Ok(()));
        assert_eq!(validate(&spec(&[], 0, 0)), Ok(()));
        assert_eq!(validate(&spec(&[], 64, 16)), Ok(()));
    }

    #[test]
    fn reserved_environment_names_are_invalid_and_named() {
        let message = invalid_message(validate(&spec(&[("OPENSHELL_SANDBOX_SECRET", "x")], 0, 0)));
        assert!(message.contains("OPENSHELL_SANDBOX_SECRET"), "{message}");
        assert!(message.contains("reserved"), "{message}");
    }

    #[test]
    fn unpassable_environment_names_are_invalid() {
        for (name, value) in [
            ("", "x"),
            ("A=B", "x"),
            ("A\0", "x"),
            ("A", "x\0"),
            ("1A", "x"),
            ("A B", "x"),
        ] {
            invalid_message(validate(&spec(&[(name, value)], 0, 0)));
        }
    }

    #[test]
    fn more_than_64_vcpus_is_unsupported() {
        assert!(matches!(
            validate(&spec(&[], 65, 0)),
            Err(DriverError::Unsupported(m)) if m.contains("at most 64")
        ));
    }

    #[test]
    fn memory_below_16_mib_is_invalid_but_0_means_default() {
        for mib in [1, 15] {
            let message = invalid_message(validate(&spec(&[], 0, mib)));
            assert!(message.contains("at least 16"), "{message}");
        }
    }

    #[test]
    fn the_supervisor_gets_user_and_gateway_environment() {
        let ctx = LaunchContext {
            secret: "s3cret".into(),
        };
        let spawn = spawn_spec(&spec(&[("PATH", "/bin")], 0, 0), &ctx);
        let env: Vec<(&str, &str)> = spawn
            .environment
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("PATH", "/bin"),
                ("OPENSHELL_SANDBOX_ID", "sb-1"),
                ("OPENSHELL_SANDBOX", "alpha"),
                ("OPENSHELL_ENDPOINT", "unix:///run/openshell/gateway.sock"),
                ("OPENSHELL_SANDBOX_SECRET", "s3cret"),
            ]
        );
        assert_eq!(spawn.workdir, "workdir");
    }

    #[test]
    fn zero_resources_get_defaults_and_no_cpu_quota() {
        let ctx = LaunchContext {
            secret: String::new(),
        };
        let c = spawn_spec(&spec(&[], 0, 0), &ctx).confinement;
        assert!(c.isolate_network);
        assert_eq!((c.memory_mib, c.max_processes, c.cpu_millis), (512, 512, 0));
    }

    #[test]
    fn requested_resources_become_limits() {
        let ctx = LaunchContext {
            secret: String::new(),
        };
        let mut requested = spec(&[], 2, 2048);
        requested.resources.max_processes = 100;
        let c = spawn_spec(&requested, &ctx).confinement;
        assert_eq!(
            (c.memory_mib, c.max_processes, c.cpu_millis),
            (2048, 100, 2000)
        );
    }
}
