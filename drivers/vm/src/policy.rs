//! The VM driver's rules: what a request may ask for, what the VM is
//! launched with, and what is reported. No capability calls, so these are
//! unit-tested natively.

use openshell_driver_common::check_env_var;
use openshell_driver_common::openshell::compute::types::{DriverError, LaunchContext, SandboxSpec};
use openshell_driver_common::openshell::compute::vm::{Backend, VmSpec};

pub const MAX_VCPUS: u32 = 8;
pub const MIN_MEMORY_MIB: u64 = 128;
pub const MAX_MEMORY_MIB: u64 = 8192;
const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u64 = 512;
/// Requests for a GPU arrive as the usual container-runtime variables; a
/// microVM here has no device passthrough, so say so instead of ignoring
/// them.
const GPU_VARIABLES: [&str; 3] = [
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
];

pub fn validate(spec: &SandboxSpec) -> Result<(), DriverError> {
    for (name, value) in &spec.environment {
        if GPU_VARIABLES.contains(&name.as_str()) {
            return Err(DriverError::Unsupported(format!(
                "{name} asks for a GPU, but VM sandboxes have no device passthrough: \
                 remove it, or use a driver that offers GPUs"
            )));
        }
        check_env_var(name, value)?;
        // The guest's init reads its environment one line per variable.
        if value.contains(['\n', '\r']) {
            return Err(DriverError::Invalid(format!(
                "environment variable {name} cannot reach the VM: its value has a newline; \
                 remove it"
            )));
        }
    }
    let r = &spec.resources;
    if r.vcpus > MAX_VCPUS {
        return Err(DriverError::Unsupported(format!(
            "{} vcpus requested, but the VM driver allows at most {MAX_VCPUS}: ask for {MAX_VCPUS} or fewer",
            r.vcpus
        )));
    }
    if r.memory_mib != 0 && !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&r.memory_mib) {
        return Err(DriverError::Invalid(format!(
            "memory-mib {} is outside what a VM can use: ask for {MIN_MEMORY_MIB} to \
             {MAX_MEMORY_MIB}, or 0 for the default ({DEFAULT_MEMORY_MIB})",
            r.memory_mib
        )));
    }
    Ok(())
}

/// What the VM is launched with: the user's environment plus the gateway's
/// `OPENSHELL_*` variables, the endpoint as the guest must dial it.
pub fn vm_spec(spec: &SandboxSpec, ctx: &LaunchContext, guest_endpoint: &str) -> VmSpec {
    let gateway = [
        ("OPENSHELL_SANDBOX_ID", spec.id.as_str()),
        ("OPENSHELL_SANDBOX", spec.name.as_str()),
        ("OPENSHELL_ENDPOINT", guest_endpoint),
        ("OPENSHELL_SANDBOX_SECRET", ctx.secret.as_str()),
    ];
    let environment = spec
        .environment
        .iter()
        .cloned()
        .chain(gateway.map(|(k, v)| (k.into(), v.into())))
        .collect();
    let r = &spec.resources;
    VmSpec {
        vcpus: if r.vcpus == 0 { DEFAULT_VCPUS } else { r.vcpus },
        memory_mib: if r.memory_mib == 0 {
            DEFAULT_MEMORY_MIB
        } else {
            r.memory_mib
        },
        environment,
    }
}

pub fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Krun => "libkrun (KVM)",
        Backend::QemuKvm => "QEMU/KVM",
        Backend::QemuTcg => "QEMU/TCG",
    }
}

/// The Starting message; on TCG it says plainly what the user gets.
pub fn booting_message(b: Backend) -> String {
    match b {
        Backend::QemuTcg => {
            "booting VM (vm-tcg: the guest has its own kernel but no hardware isolation)".into()
        }
        Backend::Krun | Backend::QemuKvm => format!("booting VM (vm-kvm, {})", backend_name(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_driver_common::openshell::compute::types::Resources;

    fn spec(env: &[(&str, &str)], vcpus: u32, memory_mib: u64) -> SandboxSpec {
        SandboxSpec {
            id: "sb-1".into(),
            name: "alpha".into(),
            environment: env.iter().map(|&(k, v)| (k.into(), v.into())).collect(),
            resources: Resources {
                vcpus,
                memory_mib,
                max_processes: 0,
            },
            image: None,
        }
    }

    #[test]
    fn an_ordinary_request_is_valid() {
        assert_eq!(
            validate(&spec(&[("PATH", "/bin"), ("A", "x y")], 2, 1024)),
            Ok(())
        );
        assert_eq!(validate(&spec(&[], 0, 0)), Ok(()));
        assert_eq!(validate(&spec(&[], 8, 128)), Ok(()));
        assert_eq!(validate(&spec(&[], 1, 8192)), Ok(()));
    }

    #[test]
    fn a_gpu_request_is_unsupported_and_says_why() {
        assert!(matches!(
            validate(&spec(&[("NVIDIA_VISIBLE_DEVICES", "all")], 0, 0)),
            Err(DriverError::Unsupported(m)) if m.contains("no device passthrough")
        ));
    }

    #[test]
    fn more_than_8_vcpus_is_unsupported() {
        assert!(matches!(
            validate(&spec(&[], 9, 0)),
            Err(DriverError::Unsupported(m)) if m.contains("at most 8")
        ));
    }

    #[test]
    fn memory_outside_128_to_8192_is_invalid_but_0_means_default() {
        for mib in [1, 127, 8193] {
            assert!(matches!(
                validate(&spec(&[], 0, mib)),
                Err(DriverError::Invalid(m)) if m.contains("128 to 8192")
            ));
        }
    }

    #[test]
    fn reserved_and_unpassable_environment_is_invalid() {
        for (k, v) in [
            ("OPENSHELL_ENDPOINT", "x"),
            ("A B", "x"),
            ("1A", "x"),
            ("A", "x\ny"),
        ] {
            assert!(
                matches!(
                    validate(&spec(&[(k, v)], 0, 0)),
                    Err(DriverError::Invalid(_))
                ),
                "{k:?}"
            );
        }
    }

    #[test]
    fn the_guest_gets_user_and_gateway_environment_and_defaults() {
        let ctx = LaunchContext {
            secret: "s3cret".into(),
        };
        let v = vm_spec(
            &spec(&[("A", "1")], 0, 0),
            &ctx,
            "http://192.168.127.254:4100",
        );
        assert_eq!((v.vcpus, v.memory_mib), (1, 512));
        let env: Vec<(&str, &str)> = v
            .environment
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("A", "1"),
                ("OPENSHELL_SANDBOX_ID", "sb-1"),
                ("OPENSHELL_SANDBOX", "alpha"),
                ("OPENSHELL_ENDPOINT", "http://192.168.127.254:4100"),
                ("OPENSHELL_SANDBOX_SECRET", "s3cret"),
            ]
        );
    }

    #[test]
    fn tcg_is_reported_honestly() {
        assert!(booting_message(Backend::QemuTcg).contains("no hardware isolation"));
        assert!(booting_message(Backend::QemuKvm).contains("vm-kvm"));
    }
}
