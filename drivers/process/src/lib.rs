//! The process driver: runs a sandbox's supervisor as a confined host
//! process.
//!
//! This crate is policy only: which limits and which environment the
//! supervisor gets. The host's `process` capability does the spawning and
//! enforces its own floor on top (user namespace, no capabilities). Start at
//! [`ProcessDriver`]; the pure rules are in [`policy`] and what the driver
//! remembers between calls is in [`state`].

mod policy;
mod state;

use openshell_driver_common::exports::openshell::compute::driver::{
    DriverError, DriverInfo, Guest, HostEvent, LaunchContext, Outcome, SandboxSpec,
};
use openshell_driver_common::openshell::compute::files;
use openshell_driver_common::openshell::compute::log::{self, Level};
use openshell_driver_common::openshell::compute::process::{self, ProcessStatus};
use openshell_driver_common::openshell::compute::types::{DriverEvent, Isolation};
use openshell_driver_common::{driver_event, failed};
use state::LaunchState;

/// How long the supervisor gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE_MS: u32 = 5_000;

struct ProcessDriver;

impl Guest for ProcessDriver {
    fn describe() -> DriverInfo {
        DriverInfo {
            name: "process".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Runs the sandbox supervisor as a confined host process \
                          (user namespace, no capabilities, loopback-only network)."
                .into(),
            isolation: Isolation::Process,
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
        launch(&spec, &ctx, &state)
    }

    fn resume(
        spec: SandboxSpec,
        ctx: LaunchContext,
        state: Vec<u8>,
    ) -> Result<Outcome, DriverError> {
        // The gateway restarted but the supervisor may have survived it.
        if process::current().is_some_and(|p| p.status() == ProcessStatus::Running) {
            return Ok(Outcome {
                events: vec![DriverEvent::Progress("already running".into())],
                state,
            });
        }
        launch(&spec, &ctx, &state)
    }

    fn delete(_spec: SandboxSpec, _state: Vec<u8>) -> Result<(), DriverError> {
        // The state directory (and `workdir` in it) is the host's to remove.
        if let Some(supervisor) = process::current() {
            supervisor
                .stop(STOP_GRACE_MS)
                .map_err(|e| failed("StopFailed", "stopping the supervisor", &e))?;
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

/// Creates the working directory and spawns the supervisor.
fn launch(spec: &SandboxSpec, ctx: &LaunchContext, state: &[u8]) -> Result<Outcome, DriverError> {
    // Validate again: the spec was checked by whichever version of this
    // driver was loaded when it was stored, which need not be this one.
    policy::validate(spec)?;
    let mut state = LaunchState::decode(state).unwrap_or_else(|| {
        log::log(
            Level::Warn,
            "unreadable driver state; starting the launch count again",
        );
        LaunchState::default()
    });

    files::create_dir(policy::WORKDIR)
        .map_err(|e| failed("WorkdirFailed", "creating the working directory", &e))?;
    let root = match &spec.image {
        Some(asked) => Some(openshell_driver_common::prepare_image(asked)?),
        None => None,
    };
    process::spawn(&policy::spawn_spec(spec, ctx), root.as_ref())
        .map_err(|e| failed("SpawnFailed", "spawning the supervisor", &e))?;

    state.launches = state.launches.saturating_add(1);
    log::log(
        Level::Info,
        &format!(
            "launched the supervisor for sandbox {} (launch {})",
            spec.name, state.launches
        ),
    );
    Ok(Outcome {
        events: vec![DriverEvent::Starting("supervisor launched".into())],
        state: state.encode(),
    })
}

openshell_driver_common::export!(ProcessDriver);
