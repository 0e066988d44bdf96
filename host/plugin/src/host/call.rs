//! Calling a loaded plugin: one fresh instance per call, under the memory
//! cap, epoch interruption and the wall-clock deadline, and the only
//! conversions between what a plugin says and domain types.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openshell_core::Event;
use wasmtime::{Store, StoreLimitsBuilder};

use crate::bindings::ComputeDriverPre;
use crate::bindings::types::{self as wit, DriverError, DriverEvent, Isolation};
use crate::caps::{CallState, HostEvent, SandboxScope};
use crate::grants::Capability;
use crate::host::{CallError, DriverInfo, DriverSpec, MAX_STATE, Outcome, Shared};

/// A loaded driver.
pub struct Plugin {
    pub name: String,
    pub digest: String,
    pub grants: Vec<Capability>,
    pub imports: Vec<Capability>,
    pub info: DriverInfo,
    pub path: PathBuf,
    pub(super) pre: ComputeDriverPre<CallState>,
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// Runs one export call in a fresh instance under every limit. A trap or a
/// timeout only fails this call: the instance (and its store) is dropped.
macro_rules! guarded_call {
    ($plugin:expr, $scope:expr, |$drv:ident, $store:ident| $call:expr) => {{
        let plugin: &Plugin = $plugin;
        let after = plugin.shared.config.call_timeout;
        let run = async {
            let mut $store = plugin.new_store($scope);
            let instance = plugin.pre.instantiate_async(&mut $store).await?;
            let $drv = instance.openshell_compute_driver();
            let $store = &mut $store;
            $call.await
        };
        let started = Instant::now();
        let result = tokio::time::timeout(after, run).await;
        if let Some(observe) = &plugin.shared.config.on_call {
            (observe.0)(&plugin.name, started.elapsed());
        }
        match result {
            Err(_) => Err(CallError::TimedOut {
                plugin: plugin.name.clone(),
                after,
            }),
            Ok(Err(trap)) => Err(CallError::Trapped {
                plugin: plugin.name.clone(),
                message: trap_message(&trap),
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }};
}

/// The first line of a trap, without wasmtime's backtrace.
fn trap_message(e: &wasmtime::Error) -> String {
    let full = format!("{e:#}");
    let first = full.lines().next().unwrap_or("trap").trim();
    if let Some(t) = e.downcast_ref::<wasmtime::Trap>() {
        format!("{t}")
    } else {
        first.chars().take(300).collect()
    }
}

impl Plugin {
    fn new_store(&self, scope: SandboxScope) -> Store<CallState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.shared.config.memory_limit)
            .instances(32)
            .tables(64)
            .memories(8)
            .trap_on_grow_failure(true)
            .build();
        let state = CallState::new(scope, self.shared.services.clone(), limits);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }

    fn scope(&self, sandbox: Option<&DriverSpec>) -> Result<SandboxScope, CallError> {
        let Some(spec) = sandbox else {
            return Ok(SandboxScope {
                plugin: self.name.clone(),
                sandbox_id: String::new(),
                sandbox_name: String::new(),
                state_path: None,
                uid_slot: None,
                disk_bytes: 0,
                dir: None,
            });
        };
        let id = spec.id.as_str();
        let path = self.shared.config.sandboxes_dir.join(id);
        // Every call opens the dir; only the first creates it.
        let open = || cap_std::fs::Dir::open_ambient_dir(&path, cap_std::ambient_authority());
        let dir = open()
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => self
                    .shared
                    .create_sandbox_dir(id, spec.resources.disk_gib)
                    .and_then(|_| open()),
                _ => Err(e),
            })
            .map_err(|e| CallError::Failed {
                reason: "StateDirUnavailable".into(),
                message: format!("cannot open {}: {e}", path.display()),
            })?;
        Ok(SandboxScope {
            plugin: self.name.clone(),
            sandbox_id: id.to_owned(),
            sandbox_name: spec.name.clone(),
            state_path: Some(path),
            uid_slot: spec.uid_slot,
            disk_bytes: self.shared.disk_bytes(spec.resources.disk_gib),
            dir: Some(Arc::new(dir)),
        })
    }

    pub async fn describe(&self) -> Result<DriverInfo, CallError> {
        let scope = self.scope(None)?;
        let info = guarded_call!(self, scope, |drv, store| drv.call_describe(store))?;
        Ok(DriverInfo {
            name: openshell_core::phase::driver_message(&info.name),
            version: openshell_core::phase::driver_message(&info.version),
            description: openshell_core::phase::driver_message(&info.description),
            isolation: match info.isolation {
                Isolation::Process => "process",
                Isolation::Vm => "vm",
            },
        })
    }

    pub async fn validate(&self, spec: &DriverSpec) -> Result<(), CallError> {
        let scope = self.scope(None)?;
        let spec = to_wit(spec);
        let r = guarded_call!(self, scope, |drv, store| drv.call_validate(store, &spec))?;
        r.map_err(from_driver_error)
    }

    pub async fn create(
        &self,
        spec: &DriverSpec,
        secret: &str,
        state: &[u8],
    ) -> Result<Outcome, CallError> {
        let scope = self.scope(Some(spec))?;
        let (wspec, ctx) = (to_wit(spec), launch_ctx(secret));
        let r = guarded_call!(self, scope, |drv, store| drv
            .call_create(store, &wspec, &ctx, state))?;
        self.outcome(r)
    }

    pub async fn resume(
        &self,
        spec: &DriverSpec,
        secret: &str,
        state: &[u8],
    ) -> Result<Outcome, CallError> {
        let scope = self.scope(Some(spec))?;
        let (wspec, ctx) = (to_wit(spec), launch_ctx(secret));
        let r = guarded_call!(self, scope, |drv, store| drv
            .call_resume(store, &wspec, &ctx, state))?;
        self.outcome(r)
    }

    pub async fn delete(&self, spec: &DriverSpec, state: &[u8]) -> Result<(), CallError> {
        let scope = self.scope(Some(spec))?;
        let wspec = to_wit(spec);
        let r = guarded_call!(self, scope, |drv, store| drv
            .call_delete(store, &wspec, state))?;
        r.map_err(from_driver_error)
    }

    pub async fn on_event(
        &self,
        spec: &DriverSpec,
        state: &[u8],
        event: &HostEvent,
    ) -> Result<Outcome, CallError> {
        let scope = self.scope(Some(spec))?;
        let wspec = to_wit(spec);
        let ev = match event {
            HostEvent::Exited { status, .. } => wit::HostEvent::ProcessExited(*status),
            HostEvent::PollFailed { message, .. } => wit::HostEvent::PollFailed(message.clone()),
        };
        let r = guarded_call!(self, scope, |drv, store| drv
            .call_on_event(store, &wspec, state, &ev))?;
        self.outcome(r)
    }

    fn outcome(&self, r: Result<wit::Outcome, DriverError>) -> Result<Outcome, CallError> {
        let out = r.map_err(from_driver_error)?;
        if out.state.len() > MAX_STATE {
            return Err(CallError::StateTooLarge {
                plugin: self.name.clone(),
                len: out.state.len(),
            });
        }
        Ok(Outcome {
            events: out.events.into_iter().map(to_event).collect(),
            state: out.state,
        })
    }

    /// Time one instantiate, for benchmarks.
    pub async fn time_instantiate(&self) -> Result<Duration, CallError> {
        let scope = self.scope(None)?;
        let start = Instant::now();
        let mut store = self.new_store(scope);
        self.pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| CallError::Trapped {
                plugin: self.name.clone(),
                message: trap_message(&e),
            })?;
        Ok(start.elapsed())
    }
}

fn to_wit(spec: &DriverSpec) -> wit::SandboxSpec {
    wit::SandboxSpec {
        id: spec.id.clone(),
        name: spec.name.clone(),
        environment: spec.environment.clone(),
        resources: wit::Resources {
            vcpus: spec.resources.vcpus,
            memory_mib: spec.resources.memory_mib,
            max_processes: spec.resources.max_processes,
        },
        image: spec.image.as_ref().map(|i| wit::ImageRef {
            reference: i.reference.clone(),
            digest: i.digest.clone(),
        }),
    }
}

fn launch_ctx(secret: &str) -> wit::LaunchContext {
    wit::LaunchContext {
        secret: secret.to_owned(),
    }
}

/// The only conversion from what a plugin says to domain events. There is
/// no arm that yields readiness: the WIT variant has none.
pub(crate) fn to_event(e: DriverEvent) -> Event {
    match e {
        DriverEvent::Starting(message) => Event::DriverStarting { message },
        DriverEvent::Progress(message) => Event::DriverProgress { message },
        DriverEvent::Failed(f) => Event::DriverFailed {
            reason: f.reason,
            message: f.message,
        },
        DriverEvent::Exited(status) => Event::DriverExited { status },
    }
}

fn from_driver_error(e: DriverError) -> CallError {
    use openshell_core::phase::{driver_message, driver_reason};
    match e {
        DriverError::Invalid(m) => CallError::Invalid(driver_message(&m)),
        DriverError::Unsupported(m) => CallError::Unsupported(driver_message(&m)),
        DriverError::Failed(f) => CallError::Failed {
            reason: driver_reason(&f.reason),
            message: driver_message(&f.message),
        },
    }
}

#[cfg(test)]
mod tests {
    //! Fuzzing (issue 8): whatever a plugin returns, the domain sees only
    //! safe values and never readiness.
    use super::*;
    use openshell_core::phase::MAX_MESSAGE_LEN;
    use openshell_core::{Phase, Status};
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["\\PC{0,40}", "(?s).{0,1500}", "[A-Z][A-Za-z0-9]{0,70}"]
    }

    fn arb_driver_event() -> impl Strategy<Value = DriverEvent> {
        prop_oneof![
            text().prop_map(DriverEvent::Starting),
            text().prop_map(DriverEvent::Progress),
            (text(), text()).prop_map(|(reason, message)| DriverEvent::Failed(wit::Failure {
                reason,
                message
            })),
            any::<i32>().prop_map(DriverEvent::Exited),
        ]
    }

    fn arb_driver_error() -> impl Strategy<Value = DriverError> {
        prop_oneof![
            text().prop_map(DriverError::Invalid),
            text().prop_map(DriverError::Unsupported),
            (text(), text()).prop_map(|(reason, message)| DriverError::Failed(wit::Failure {
                reason,
                message
            })),
        ]
    }

    fn safe(s: &str) -> bool {
        s.len() <= MAX_MESSAGE_LEN && !s.chars().any(char::is_control)
    }

    proptest! {
        #[test]
        fn plugin_events_never_make_a_sandbox_ready_and_are_stored_sanitised(
            e in arb_driver_event(),
            connected: bool,
        ) {
            let mut before = Status::provisioning(0);
            if connected {
                before = openshell_core::apply(&before, &Event::SupervisorConnected, 1).unwrap();
            }
            let event = to_event(e);
            prop_assert!(!matches!(event, Event::SupervisorConnected));
            if let Ok(after) = openshell_core::apply(&before, &event, 2) {
                if before.phase != Phase::Ready {
                    prop_assert_ne!(after.phase, Phase::Ready);
                }
                if let Some(d) = &after.driver {
                    prop_assert!(safe(&d.message), "{:?}", d.message);
                    prop_assert!(safe(&d.reason) && d.reason.len() <= 64, "{:?}", d.reason);
                }
            }
        }

        #[test]
        fn plugin_errors_are_sanitised(e in arb_driver_error()) {
            match from_driver_error(e) {
                CallError::Invalid(m) | CallError::Unsupported(m) => prop_assert!(safe(&m)),
                CallError::Failed { reason, message } => {
                    prop_assert!(safe(&message));
                    prop_assert!((1..=64).contains(&reason.len()));
                    prop_assert!(reason.chars().all(|c| c.is_ascii_alphanumeric()));
                }
                other => prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }
}
