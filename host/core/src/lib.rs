//! The sandbox domain, with no I/O: identifiers and names, the spec a user
//! asks for, and the one state machine that moves a sandbox between phases.
//!
//! Start at [`phase::apply`]: every phase change in the gateway goes through
//! it. The store persists what it returns; the API and the plugin host only
//! translate their inputs into [`phase::Event`]s.

pub mod backoff;
pub mod lifetime;
pub mod name;
pub mod phase;
pub mod quote;
pub mod sandbox;
pub mod uid_slot;
pub mod validate;

pub use backoff::Backoff;
pub use lifetime::Expiry;
pub use name::{NameError, SandboxName};
pub use phase::{
    Condition, ConditionStatus, Event, Phase, ReadyReason, Rejection, Status, apply, derive_phase,
};
pub use sandbox::{
    Isolation, Lifetime, PolicySource, Resources, Sandbox, SandboxId, SandboxImage, SandboxSpec,
    StoredPolicy,
};
pub use validate::SpecError;
