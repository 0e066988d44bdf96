//! The echo driver, parameterised by the including crate's `GREETING` and
//! `STATE`.

mod bindings {
    wit_bindgen::generate!({ path: "../../../wit", world: "compute-driver" });
}

use bindings::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use bindings::openshell::compute::files;
use bindings::openshell::compute::log::{self, Level};
use bindings::openshell::compute::types::{DriverEvent, Failure, Isolation};

struct Echo;

impl Guest for Echo {
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

    fn create(
        spec: SandboxSpec,
        _ctx: LaunchContext,
        _state: Vec<u8>,
    ) -> Result<Outcome, DriverError> {
        files::write_file("hello.txt", spec.name.as_bytes()).map_err(|e| {
            DriverError::Failed(Failure {
                reason: "WriteFailed".into(),
                message: format!("{e:?}"),
            })
        })?;
        log::log(Level::Info, &format!("{} {}", crate::GREETING, spec.name));
        Ok(Outcome {
            events: vec![
                DriverEvent::Starting("echo starting".into()),
                DriverEvent::Progress(format!("{} {}", crate::GREETING, spec.name)),
            ],
            state: crate::STATE.to_vec(),
        })
    }

    fn resume(
        _spec: SandboxSpec,
        _ctx: LaunchContext,
        state: Vec<u8>,
    ) -> Result<Outcome, DriverError> {
        Ok(Outcome {
            events: vec![DriverEvent::Progress("resumed".into())],
            state,
        })
    }

    fn delete(_spec: SandboxSpec, _state: Vec<u8>) -> Result<(), DriverError> {
        Ok(())
    }

    fn on_event(
        _spec: SandboxSpec,
        state: Vec<u8>,
        event: HostEvent,
    ) -> Result<Outcome, DriverError> {
        let event = match event {
            HostEvent::ProcessExited(status) => DriverEvent::Exited(status),
            HostEvent::PollFailed(message) => DriverEvent::Failed(Failure {
                reason: "ProcessPollFailed".into(),
                message,
            }),
        };
        Ok(Outcome {
            events: vec![event],
            state,
        })
    }
}

bindings::export!(Echo with_types_in bindings);
