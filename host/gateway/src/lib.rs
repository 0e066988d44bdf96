//! The gateway: gRPC services over the compute runtime.
//!
//! [`server::serve`] wires everything: the store, the plugin host, the
//! [`runtime::ComputeRuntime`] (the only code that changes sandboxes) and the
//! tonic services in [`service`]. Transport stays here: the runtime speaks
//! domain types, and [`error::to_status`] is the one place errors become
//! gRPC statuses.

pub mod convert;
pub mod error;
pub mod exec;
pub mod relay;
pub mod runtime;
pub mod server;
pub mod service;
pub mod sessions;
pub mod ssh;
pub mod supervisor;
pub mod tls;
pub mod watch;

pub use server::{ClientInfo, Gateway, GatewayConfig};
