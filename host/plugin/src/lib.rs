//! The wasmtime host for compute-driver plugins.
//!
//! A driver is a WebAssembly component (`wit/world.wit`). This crate loads
//! components ([`PluginHost::install`]), checks their imports against the
//! operator's grants ([`grants`]), caches compiled code on disk, and calls
//! their exports ([`Plugin`]) in a fresh instance per call, under a memory
//! cap, epoch interruption and a wall-clock deadline. The capabilities a
//! plugin may import are implemented in [`caps`], one module per WIT
//! interface; every host process they start is owned by [`children`].
//! Start at [`PluginHost`].

pub mod bindings;
pub mod caps;
pub mod children;
pub mod disk;
pub mod grants;
mod host;
mod logs;
mod private_file;
pub mod stats;

/// Size limits a caller may need to size its own buffers.
pub mod host_limits {
    pub use crate::host::{MAX_COMPONENT, MAX_STATE};
    pub use openshell_vm::MAX_SOCKET_PATH;
}

pub use caps::{HostEvent, Images, ProcessConfig, ProcessTable, VmConfig, VmTable};
pub use grants::{Capability, GrantError};
pub use host::{
    CallError, CallObserver, DriverInfo, DriverSpec, Outcome, Plugin, PluginError, PluginHost,
    PluginHostConfig, secure_state_dir,
};
pub use openshell_vm::net::SupervisorTls;
pub use openshell_vm::runtime::{Backend as VmBackend, BackendChoice as VmBackendChoice};
pub use private_file::write_private;
