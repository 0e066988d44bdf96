//! Test driver: `create` spins forever. The host must interrupt it (epoch
//! deadline or fuel) and fail the call.

mod bindings {
    wit_bindgen::generate!({ path: "../../../wit", world: "compute-driver" });
}

use bindings::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use bindings::openshell::compute::types::Isolation;

struct Spin;

impl Guest for Spin {
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
        // black_box keeps the optimizer from proving the loop useless.
        let mut spins = 0u64;
        loop {
            spins = core::hint::black_box(spins.wrapping_add(1));
        }
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

bindings::export!(Spin with_types_in bindings);
