//! The gateway: gRPC services over the compute runtime.
//!
//! [`server::Gateway::start`] wires everything: the store, the plugin host,
//! the [`runtime::ComputeRuntime`] (the only code that changes sandboxes)
//! and the tonic services in [`service`]. The runtime owns the supervisor
//! side ([`supervisor::Supervisors`]: sessions, relays, listeners,
//! credentials), which depends on nothing above it; exec and SSH ask the
//! runtime for a Ready sandbox and the supervisors for a relay.
//! Transport stays here: the runtime speaks domain types, and
//! [`error::to_status`] is the one place errors become gRPC statuses.

pub mod convert;
pub mod egress;
pub mod error;
pub mod exec;
pub mod files;
mod incoming;
pub mod logs;
pub mod metrics;
pub mod runtime;
pub mod sandbox_logs;
pub mod server;
pub mod service;
pub mod ssh;
pub mod streams;
pub mod supervisor;
pub mod tls;
pub mod tunnel;
pub mod uid_range;
pub mod watch;

pub use incoming::{ConnectionLimits, IncomingError};
pub use server::{ClientInfo, Gateway, GatewayConfig};
