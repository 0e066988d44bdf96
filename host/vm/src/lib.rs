//! The VM backends, host side: everything about running a sandbox as a
//! microVM that is not a WIT binding.
//!
//! - [`runtime`]: the staged runtime dir (`just vm-setup`) and which backend
//!   the cached boot probe selected.
//! - [`qemu`]: QEMU's command line (microvm, TCG or KVM), pure.
//! - [`krun`]: the libkrun launcher's configuration, pure and validated.
//! - [`initramfs`]: the per-sandbox cpio segment (environment file, staged
//!   files) appended to the base initramfs.
//! - [`net`]: gvproxy confined to its own network namespace, whose only
//!   loopback listener forwards to the sandbox's supervisor socket.
//!
//! The plugin host's `caps/vm.rs` wires these to the WIT interfaces and owns
//! the running VMs. Start at [`net`] for the confinement argument.

pub mod initramfs;
pub mod krun;
pub mod net;
pub mod qemu;
pub mod runtime;

/// What went wrong setting up or launching a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let what = what.into();
        move |source| VmError::Io { what, source }
    }
}
