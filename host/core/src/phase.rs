//! Phases and the one function that moves a sandbox between them.
//!
//! A sandbox's phase is derived from its `Ready` condition alone
//! ([`derive_phase`]), and the `Ready` condition changes only through
//! [`apply`]. Reasons on `Ready` come from the closed [`ReadyReason`] set, so
//! a driver can never write a reason that reads as "ready": whatever a driver
//! says lands in the informational `Driver` condition, and only the gateway's
//! supervisor registry produces [`Event::SupervisorConnected`].

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Provisioning,
    Ready,
    Error,
    Deleting,
    Unknown,
    /// Asked to stop: nothing of the sandbox runs, its files, spec and
    /// record are kept; a start brings it back.
    Stopped,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Provisioning,
        Phase::Ready,
        Phase::Error,
        Phase::Deleting,
        Phase::Unknown,
        Phase::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Provisioning => "Provisioning",
            Phase::Ready => "Ready",
            Phase::Error => "Error",
            Phase::Deleting => "Deleting",
            Phase::Unknown => "Unknown",
            Phase::Stopped => "Stopped",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == raw)
    }

    /// Phases a watcher waiting for an outcome can stop at.
    pub fn is_settled(self) -> bool {
        match self {
            Phase::Ready | Phase::Error | Phase::Deleting | Phase::Stopped => true,
            Phase::Provisioning | Phase::Unknown => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// The reasons the gateway writes on the `Ready` condition. Closed on
/// purpose: adding one forces a decision in [`derive_phase`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadyReason {
    /// Stored; the driver has not said anything yet.
    Provisioning,
    /// The driver is launching the sandbox.
    Starting,
    /// The sandbox's supervisor holds a live session.
    SupervisorConnected,
    /// The supervisor session ended; it may come back.
    SupervisorDisconnected,
    /// The driver reported a failure; see the `Driver` condition.
    DriverFailed,
    /// The sandbox's process (or VM) exited.
    ProcessExited,
    /// The gateway restarted and has not heard from the sandbox since.
    GatewayRestarted,
    /// Deletion was requested.
    Deleting,
    /// A stop was requested (by a user or the sandbox's idle timeout).
    Stopped,
}

impl ReadyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyReason::Provisioning => "Provisioning",
            ReadyReason::Starting => "Starting",
            ReadyReason::SupervisorConnected => "SupervisorConnected",
            ReadyReason::SupervisorDisconnected => "SupervisorDisconnected",
            ReadyReason::DriverFailed => "DriverFailed",
            ReadyReason::ProcessExited => "ProcessExited",
            ReadyReason::GatewayRestarted => "GatewayRestarted",
            ReadyReason::Deleting => "Deleting",
            ReadyReason::Stopped => "Stopped",
        }
    }
}

/// A condition as shown to users. `Ready` is typed (see [`Status`]); this is
/// the uniform view of every condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub kind: String,
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
    pub last_transition_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyCondition {
    pub status: ConditionStatus,
    pub reason: ReadyReason,
    pub message: String,
    pub last_transition_ms: i64,
}

/// What the driver said last, in its own words (sanitised).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverCondition {
    pub reason: String,
    pub message: String,
    pub last_transition_ms: i64,
}

/// The mutable part of a sandbox that phases are made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub ready: ReadyCondition,
    pub driver: Option<DriverCondition>,
}

impl Status {
    pub fn provisioning(now_ms: i64) -> Self {
        Self {
            phase: Phase::Provisioning,
            ready: ReadyCondition {
                status: ConditionStatus::False,
                reason: ReadyReason::Provisioning,
                message: "waiting for the driver".into(),
                last_transition_ms: now_ms,
            },
            driver: None,
        }
    }

    /// Every condition, `Ready` first.
    pub fn conditions(&self) -> Vec<Condition> {
        let mut out = vec![Condition {
            kind: "Ready".into(),
            status: self.ready.status,
            reason: self.ready.reason.as_str().into(),
            message: self.ready.message.clone(),
            last_transition_ms: self.ready.last_transition_ms,
        }];
        if let Some(d) = &self.driver {
            out.push(Condition {
                kind: "Driver".into(),
                status: ConditionStatus::True,
                reason: d.reason.clone(),
                message: d.message.clone(),
                last_transition_ms: d.last_transition_ms,
            });
        }
        out
    }
}

/// The phase a `Ready` condition means. The only place that decides it.
pub fn derive_phase(ready: &ReadyCondition) -> Phase {
    match (ready.status, ready.reason) {
        (_, ReadyReason::Deleting) => Phase::Deleting,
        (ConditionStatus::True, _) => Phase::Ready,
        (ConditionStatus::Unknown, _) => Phase::Unknown,
        (
            ConditionStatus::False,
            ReadyReason::Provisioning
            | ReadyReason::Starting
            | ReadyReason::SupervisorConnected
            | ReadyReason::SupervisorDisconnected
            | ReadyReason::GatewayRestarted,
        ) => Phase::Provisioning,
        (ConditionStatus::False, ReadyReason::DriverFailed | ReadyReason::ProcessExited) => {
            Phase::Error
        }
        (ConditionStatus::False, ReadyReason::Stopped) => Phase::Stopped,
    }
}

/// Something that happened to a sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The driver began launching.
    DriverStarting { message: String },
    /// The driver made progress (informational).
    DriverProgress { message: String },
    /// The driver gave up. `reason` is the driver's, sanitised by [`driver_reason`].
    DriverFailed { reason: String, message: String },
    /// The sandbox's process or VM exited with this status.
    DriverExited { status: i32 },
    /// A supervisor session registered. Only the session registry sends this.
    SupervisorConnected,
    /// The current supervisor session ended.
    SupervisorDisconnected,
    /// The gateway came back up; nothing is known about the sandbox yet.
    GatewayRestarted,
    /// A user asked to delete the sandbox.
    DeleteRequested,
    /// A user (or the sandbox's idle timeout, which `message` says) asked
    /// to stop the sandbox: only a Ready one stops.
    StopRequested { message: String },
    /// A user asked to start a Stopped sandbox again.
    StartRequested,
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::DriverStarting { .. } => "DriverStarting",
            Event::DriverProgress { .. } => "DriverProgress",
            Event::DriverFailed { .. } => "DriverFailed",
            Event::DriverExited { .. } => "DriverExited",
            Event::SupervisorConnected => "SupervisorConnected",
            Event::SupervisorDisconnected => "SupervisorDisconnected",
            Event::GatewayRestarted => "GatewayRestarted",
            Event::DeleteRequested => "DeleteRequested",
            Event::StopRequested { .. } => "StopRequested",
            Event::StartRequested => "StartRequested",
        }
    }
}

/// Why an event did not apply. Expected, not a failure: the caller drops it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{event} does not apply to a sandbox in phase {}", phase.as_str())]
pub struct Rejection {
    pub phase: Phase,
    pub event: &'static str,
}

/// The longest driver message kept; longer ones are cut.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Turns a driver-supplied reason into one safe to show: a short
/// CamelCase word. Anything else becomes `DriverFailed`.
pub fn driver_reason(raw: &str) -> String {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw.starts_with(|c: char| c.is_ascii_uppercase())
        && raw.chars().all(|c| c.is_ascii_alphanumeric());
    if ok {
        raw.to_owned()
    } else {
        "DriverFailed".to_owned()
    }
}

/// Cuts a driver message to [`MAX_MESSAGE_LEN`] bytes on a char boundary and
/// drops control characters, so it is safe in a terminal and a log line.
pub fn driver_message(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_MESSAGE_LEN));
    for c in raw.chars() {
        if out.len() + c.len_utf8() > MAX_MESSAGE_LEN {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// The next status for `event`, or why it does not apply.
///
/// Returning a status equal to `current` means "nothing to store"
/// (idempotent repeats). The match has no wildcard arm on purpose: a new
/// phase or event does not compile until its row is decided.
pub fn apply(current: &Status, event: &Event, now_ms: i64) -> Result<Status, Rejection> {
    use ConditionStatus as S;
    use Phase as P;
    use ReadyReason as R;

    let reject = || Rejection {
        phase: current.phase,
        event: event.name(),
    };
    let mut next = current.clone();
    let set_ready = |next: &mut Status, status, reason, message: String| {
        if next.ready.status != status || next.ready.reason != reason {
            next.ready.last_transition_ms = now_ms;
        }
        next.ready.status = status;
        next.ready.reason = reason;
        next.ready.message = message;
    };
    let set_driver = |next: &mut Status, reason: String, message: String| {
        next.driver = Some(DriverCondition {
            reason,
            message,
            last_transition_ms: now_ms,
        });
    };

    match (current.phase, event) {
        // Deleting is final; only a repeated delete is accepted (and changes nothing).
        (P::Deleting, Event::DeleteRequested) => {}
        (
            P::Deleting,
            Event::DriverStarting { .. }
            | Event::DriverProgress { .. }
            | Event::DriverFailed { .. }
            | Event::DriverExited { .. }
            | Event::SupervisorConnected
            | Event::SupervisorDisconnected
            | Event::GatewayRestarted
            | Event::StopRequested { .. }
            | Event::StartRequested,
        ) => return Err(reject()),

        (_, Event::DeleteRequested) => {
            set_ready(
                &mut next,
                S::False,
                R::Deleting,
                "deletion requested".into(),
            );
        }

        // Error sticks until deleted: nothing may paper over a failure.
        (
            P::Error,
            Event::DriverStarting { .. }
            | Event::DriverProgress { .. }
            | Event::DriverFailed { .. }
            | Event::DriverExited { .. }
            | Event::SupervisorConnected
            | Event::SupervisorDisconnected
            | Event::GatewayRestarted
            | Event::StopRequested { .. }
            | Event::StartRequested,
        ) => return Err(reject()),

        // Only a Ready sandbox stops: a launch in flight (Provisioning,
        // Unknown) is the launch task's until it settles. A repeat is a no-op.
        (P::Ready, Event::StopRequested { message }) => {
            set_ready(&mut next, S::False, R::Stopped, message.clone());
        }
        (P::Stopped, Event::StopRequested { .. }) => {}
        (P::Provisioning | P::Unknown, Event::StopRequested { .. }) => return Err(reject()),

        // A start relaunches a Stopped sandbox; one that runs or is being
        // launched is already started.
        (P::Stopped, Event::StartRequested) => {
            set_ready(
                &mut next,
                S::False,
                R::Starting,
                "start requested; waiting for the driver".into(),
            );
        }
        (P::Provisioning | P::Ready | P::Unknown, Event::StartRequested) => {}

        // Stopped holds until a start: what a stopping sandbox's processes,
        // its driver or its departing supervisor report is late news.
        (
            P::Stopped,
            Event::DriverStarting { .. }
            | Event::DriverProgress { .. }
            | Event::DriverFailed { .. }
            | Event::DriverExited { .. }
            | Event::SupervisorConnected
            | Event::SupervisorDisconnected,
        ) => return Err(reject()),
        (P::Stopped, Event::GatewayRestarted) => {}

        // Driver progress is recorded, but once the supervisor is connected a
        // lagging driver report must not demote the sandbox.
        (P::Provisioning | P::Unknown, Event::DriverStarting { message }) => {
            let message = driver_message(message);
            set_ready(&mut next, S::False, R::Starting, message.clone());
            set_driver(&mut next, "Starting".into(), message);
        }
        (P::Ready, Event::DriverStarting { message }) => {
            set_driver(&mut next, "Starting".into(), driver_message(message));
        }
        (P::Provisioning | P::Ready | P::Unknown, Event::DriverProgress { message }) => {
            set_driver(&mut next, "Progress".into(), driver_message(message));
        }

        (P::Provisioning | P::Ready | P::Unknown, Event::DriverFailed { reason, message }) => {
            let reason = driver_reason(reason);
            let message = driver_message(message);
            set_ready(
                &mut next,
                S::False,
                R::DriverFailed,
                format!("{reason}: {message}"),
            );
            set_driver(&mut next, reason, message);
        }
        (P::Provisioning | P::Ready | P::Unknown, Event::DriverExited { status }) => {
            let message = format!("process exited with status {status}");
            set_ready(&mut next, S::False, R::ProcessExited, message.clone());
            set_driver(&mut next, "ProcessExited".into(), message);
        }

        (P::Provisioning | P::Ready | P::Unknown, Event::SupervisorConnected) => {
            set_ready(
                &mut next,
                S::True,
                R::SupervisorConnected,
                "supervisor session connected".into(),
            );
        }

        (P::Ready, Event::SupervisorDisconnected) => {
            set_ready(
                &mut next,
                S::False,
                R::SupervisorDisconnected,
                "supervisor session disconnected".into(),
            );
        }
        // Not connected, so nothing to demote.
        (P::Provisioning | P::Unknown, Event::SupervisorDisconnected) => {}

        (P::Ready, Event::GatewayRestarted) => {
            set_ready(
                &mut next,
                S::Unknown,
                R::GatewayRestarted,
                "gateway restarted; waiting for the supervisor".into(),
            );
        }
        (P::Provisioning | P::Unknown, Event::GatewayRestarted) => {}
    }

    next.phase = derive_phase(&next.ready);
    Ok(next)
}

#[cfg(test)]
mod tests;
