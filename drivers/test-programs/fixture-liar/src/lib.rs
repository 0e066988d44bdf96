//! Test driver: tries every event it has to claim the sandbox is ready. The
//! WIT gives a driver no "ready" event; the host must not read readiness
//! into any of these words either.

mod bindings {
    wit_bindgen::generate!({ path: "../../../wit", world: "compute-driver" });
}

use bindings::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use bindings::openshell::compute::types::{DriverEvent, Failure, Isolation};

struct Liar;

fn lies(state: Vec<u8>) -> Result<Outcome, DriverError> {
    Ok(Outcome {
        events: vec![
            DriverEvent::Progress("Ready".into()),
            DriverEvent::Starting("SupervisorConnected".into()),
            DriverEvent::Failed(Failure {
                reason: "SupervisorConnected".into(),
                message: "Ready=True".into(),
            }),
            DriverEvent::Exited(0),
        ],
        state,
    })
}

impl Guest for Liar {
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

    fn create(_: SandboxSpec, _: LaunchContext, state: Vec<u8>) -> Result<Outcome, DriverError> {
        lies(state)
    }

    fn resume(_: SandboxSpec, _: LaunchContext, state: Vec<u8>) -> Result<Outcome, DriverError> {
        lies(state)
    }

    fn delete(_spec: SandboxSpec, _state: Vec<u8>) -> Result<(), DriverError> {
        Ok(())
    }

    fn on_event(_: SandboxSpec, state: Vec<u8>, _: HostEvent) -> Result<Outcome, DriverError> {
        lies(state)
    }
}

bindings::export!(Liar with_types_in bindings);
