//! Test driver: `create` calls `network.start`, `rootfs.stage` and
//! `vm.launch`, so the component really imports those interfaces (unused
//! imports are dropped by wit-bindgen). Loading it without the `vm` grant
//! must be refused.

mod bindings {
    wit_bindgen::generate!({ path: "../../../wit", world: "compute-driver" });
}

use bindings::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use bindings::openshell::compute::types::{CapError, DriverEvent, Failure, Isolation};
use bindings::openshell::compute::vm::{self, VmSpec};
use bindings::openshell::compute::{network, rootfs};

struct WantsVm;

fn failed(reason: &str, error: CapError) -> DriverError {
    DriverError::Failed(Failure {
        reason: reason.into(),
        message: format!("{error:?}"),
    })
}

impl Guest for WantsVm {
    fn describe() -> DriverInfo {
        DriverInfo {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            isolation: Isolation::Vm,
        }
    }

    fn validate(_spec: SandboxSpec) -> Result<(), DriverError> {
        Ok(())
    }

    fn create(_: SandboxSpec, _: LaunchContext, state: Vec<u8>) -> Result<Outcome, DriverError> {
        let net = network::start().map_err(|e| failed("NetworkFailed", e))?;
        let root = rootfs::stage().map_err(|e| failed("RootfsFailed", e))?;
        let spec = VmSpec {
            vcpus: 1,
            memory_mib: 512,
            environment: Vec::new(),
        };
        vm::launch(&spec, &root, &net, None).map_err(|e| failed("LaunchFailed", e))?;
        Ok(Outcome {
            events: vec![DriverEvent::Starting("vm launched".into())],
            state,
        })
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

bindings::export!(WantsVm with_types_in bindings);
