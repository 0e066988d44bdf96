//! Test driver: `create` panics, which traps the instance. The host must
//! turn the trap into a failed call, not a crashed gateway.

mod bindings {
    wit_bindgen::generate!({ path: "../../../wit", world: "compute-driver" });
}

use bindings::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use bindings::openshell::compute::types::Isolation;

struct Trap;

impl Guest for Trap {
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

    fn create(_: SandboxSpec, _: LaunchContext, _: Vec<u8>) -> Result<Outcome, DriverError> {
        panic!("fixture trap")
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

bindings::export!(Trap with_types_in bindings);
