//! Test driver: `create` allocates without bound. The host's memory limit
//! must stop it (the failed allocation traps) and fail the call.

mod bindings {
    wit_bindgen::generate!({ path: "../../../wit", world: "compute-driver" });
}

use bindings::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use bindings::openshell::compute::types::Isolation;

struct Hog;

impl Guest for Hog {
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
        const CHUNK: usize = 1 << 20;
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Non-zero bytes so every page is really written.
            hoard.push(vec![0xa5; CHUNK]);
            core::hint::black_box(&mut hoard);
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

bindings::export!(Hog with_types_in bindings);
