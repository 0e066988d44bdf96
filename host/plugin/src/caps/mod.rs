//! Host capabilities, one module per WIT interface they implement.
//!
//! Every call into a plugin is bound to one sandbox ([`SandboxScope`]):
//! capabilities act on that sandbox only. Host-side things a capability
//! starts are owned by [`Services`], keyed by sandbox id, so they outlive the
//! plugin instance that asked for them.
//!
//! A capability returns [`CapabilityError`]: a `cap-error` the plugin sees,
//! or a trap for host bugs (a bad resource handle), so `?` works for both.

mod files;
pub mod image;
pub mod limits;
mod log;
pub mod network;
pub mod process;
pub mod rootfs;
pub mod vm;

use std::sync::Arc;
use std::time::Duration;

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use image::{ImageHandle, Images};
pub use network::NetworkHandle;
pub use process::{HostEvent, ProcessConfig, ProcessHandle, ProcessTable};
pub use rootfs::RootfsHandle;
pub use vm::{VmConfig, VmHandle, VmTable};

use crate::bindings::types::CapError;

/// How a capability call fails: refused with a `cap-error` the plugin sees
/// (expected), or trapped (a host bug or a forged handle: the instance dies).
#[derive(Debug)]
pub enum CapabilityError {
    Refused(CapError),
    Trap(wasmtime::Error),
}

impl From<CapError> for CapabilityError {
    fn from(e: CapError) -> Self {
        CapabilityError::Refused(e)
    }
}

impl From<wasmtime::Error> for CapabilityError {
    fn from(e: wasmtime::Error) -> Self {
        CapabilityError::Trap(e)
    }
}

impl From<wasmtime::component::ResourceTableError> for CapabilityError {
    fn from(e: wasmtime::component::ResourceTableError) -> Self {
        CapabilityError::Trap(e.into())
    }
}

/// What a call may touch.
pub struct SandboxScope {
    pub plugin: String,
    /// Empty for calls not about a sandbox (describe, validate).
    pub sandbox_id: String,
    pub sandbox_name: String,
    /// Host path of the sandbox's state directory (for launch configs).
    pub state_path: Option<std::path::PathBuf>,
    /// The sandbox's stored host uid slot, if the call is about a stored
    /// sandbox.
    pub uid_slot: Option<u32>,
    /// The sandbox's disk size in bytes: its quota on the sandbox disk,
    /// which bounds everything it stores on the host (a VM's disk file
    /// must fit under it). 0 when there is no sandbox disk (off) or the
    /// call is not about a sandbox (describe, validate).
    pub disk_bytes: u64,
    /// The sandbox's state directory; `None` where the call has no sandbox.
    pub dir: Option<Arc<cap_std::fs::Dir>>,
}

/// Host-side services shared by every call.
pub struct Services {
    pub processes: ProcessTable,
    pub vms: VmTable,
    /// Where sandboxes' state dirs live with a quota each; None: plain
    /// directories, no quota.
    pub disk: Option<crate::disk::SandboxDisk>,
    /// The image store; `None`: images are unavailable.
    pub images: Option<Arc<Images>>,
    /// Deadline for one capability call that does I/O.
    pub io_timeout: Duration,
}

/// The data of one plugin instance's `Store`.
pub struct CallState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) scope: SandboxScope,
    pub(crate) services: Arc<Services>,
}

impl CallState {
    pub(crate) fn new(scope: SandboxScope, services: Arc<Services>, limits: StoreLimits) -> Self {
        Self {
            // Empty on purpose: no preopens, env, args, stdio or sockets.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits,
            scope,
            services,
        }
    }

    fn dir(&self) -> Result<Arc<cap_std::fs::Dir>, CapError> {
        self.scope.dir.clone().ok_or_else(|| {
            CapError::AccessDenied(
                "this call is not about a sandbox; no files are reachable".into(),
            )
        })
    }

    fn require_sandbox(&self) -> Result<&str, CapError> {
        if self.scope.sandbox_id.is_empty() {
            Err(CapError::AccessDenied(
                "this call is not about a sandbox; capabilities are unavailable".into(),
            ))
        } else {
            Ok(&self.scope.sandbox_id)
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl crate::bindings::types::Host for CallState {
    fn convert_cap_error(&mut self, err: CapabilityError) -> wasmtime::Result<CapError> {
        match err {
            CapabilityError::Refused(e) => Ok(e),
            CapabilityError::Trap(e) => Err(e),
        }
    }
}
