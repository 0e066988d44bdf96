//! The VM driver: runs a sandbox's supervisor inside a microVM with its own
//! kernel.
//!
//! Policy only. The host's `network` capability starts a confined gvproxy
//! whose one reachable peer is this sandbox's supervisor socket; `rootfs`
//! stages the guest's initramfs; `image` prepares the sandbox's image, if
//! it has one, as the guest's root disk; `vm` boots it on whichever backend
//! the host's probe chose (libkrun, QEMU/KVM or QEMU/TCG). The guest's
//! supervisor dials the gateway through gvproxy, and the gateway alone
//! decides when the sandbox is Ready. The pure rules are in [`policy`].

mod policy;

use openshell_driver_common::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use openshell_driver_common::openshell::compute::log::{self, Level};
use openshell_driver_common::openshell::compute::types::{DriverEvent, Isolation};
use openshell_driver_common::openshell::compute::vm::{self, VmStatus};
use openshell_driver_common::openshell::compute::{network, rootfs};
use openshell_driver_common::{driver_event, failed};

/// How long the VM gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE_MS: u32 = 5_000;

struct VmDriver;

impl Guest for VmDriver {
    fn describe() -> DriverInfo {
        DriverInfo {
            name: "vm".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            // Only what the host does today: the libkrun backend is not wired.
            description: "Runs the sandbox supervisor in a QEMU microVM with its own kernel \
                          (KVM where the host can boot guests, TCG emulation otherwise), \
                          networked only to the gateway through gvproxy."
                .into(),
            isolation: Isolation::Vm,
        }
    }

    fn validate(spec: SandboxSpec) -> Result<(), DriverError> {
        policy::validate(&spec)
    }

    fn create(
        spec: SandboxSpec,
        ctx: LaunchContext,
        state: Vec<u8>,
    ) -> Result<Outcome, DriverError> {
        launch(&spec, &ctx, state)
    }

    fn resume(
        spec: SandboxSpec,
        ctx: LaunchContext,
        state: Vec<u8>,
    ) -> Result<Outcome, DriverError> {
        if vm::current().is_some_and(|v| v.status() == VmStatus::Running) {
            return Ok(Outcome {
                events: vec![DriverEvent::Progress("VM already running".into())],
                state,
            });
        }
        launch(&spec, &ctx, state)
    }

    fn delete(_spec: SandboxSpec, _state: Vec<u8>) -> Result<(), DriverError> {
        // Stopping the VM also stops its gvproxy; the state directory is
        // the host's to remove.
        if let Some(machine) = vm::current() {
            machine
                .stop(STOP_GRACE_MS)
                .map_err(|e| failed("StopFailed", "stopping the VM", &e))?;
        }
        Ok(())
    }

    fn on_event(
        _spec: SandboxSpec,
        state: Vec<u8>,
        event: HostEvent,
    ) -> Result<Outcome, DriverError> {
        Ok(Outcome {
            events: vec![driver_event(event)],
            state,
        })
    }
}

/// Network first (its endpoint goes into the guest's environment), then
/// the rootfs, then the VM.
fn launch(spec: &SandboxSpec, ctx: &LaunchContext, state: Vec<u8>) -> Result<Outcome, DriverError> {
    policy::validate(spec)?;
    let net =
        network::start().map_err(|e| failed("NetworkFailed", "starting the VM network", &e))?;
    let root =
        rootfs::stage().map_err(|e| failed("RootfsFailed", "staging the root filesystem", &e))?;
    let image = match &spec.image {
        Some(asked) => Some(openshell_driver_common::prepare_image(asked)?),
        None => None,
    };
    let plan = policy::vm_spec(spec, ctx, &net.guest_endpoint());
    let machine = vm::launch(&plan, &root, &net, image.as_ref())
        .map_err(|e| failed("LaunchFailed", "launching the VM", &e))?;
    let backend = machine.backend();
    log::log(
        Level::Info,
        &format!(
            "booting VM for sandbox {} on {} ({} vcpus, {} MiB)",
            spec.name,
            policy::backend_name(backend),
            plan.vcpus,
            plan.memory_mib
        ),
    );
    Ok(Outcome {
        events: vec![DriverEvent::Starting(policy::booting_message(backend))],
        state,
    })
}

openshell_driver_common::export!(VmDriver);
