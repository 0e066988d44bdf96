//! The VM backends, host side: everything about running a sandbox as a
//! microVM that is not a WIT binding.
//!
//! - [`runtime`]: the staged runtime dir (`just vm-setup`) and which backend
//!   the cached boot probe selected.
//! - [`qemu`]: QEMU's command line (microvm, TCG or KVM), pure.
//! - [`krun`]: the libkrun launcher's configuration, pure and validated.
//! - [`initramfs`]: the per-sandbox cpio segment (staged files) appended to
//!   the base initramfs.
//! - [`disk`]: a sandbox's own writable disk above its image's.
//! - [`identity`]: what the host tells a guest over its identity channel
//!   (environment, launch secret, clock, seed); no secret is in any file.
//! - [`net`]: gvproxy confined to its own network namespace, whose only
//!   loopback listener forwards to the sandbox's supervisor socket.
//!
//! The plugin host's `caps/vm.rs` wires these to the WIT interfaces and owns
//! the running VMs. Start at [`net`] for the confinement argument.

pub mod disk;
pub mod identity;
pub mod initramfs;
pub mod krun;
pub mod net;
pub mod qemu;
pub mod runtime;

/// `KEY=VALUE` pairs as the environments the tests build.
#[cfg(test)]
fn test_env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_path_fits_at_the_limit_and_not_one_byte_past_it() {
        let at = format!("/{}", "s".repeat(MAX_SOCKET_PATH - 1));
        check_socket_path(std::path::Path::new(&at)).unwrap();
        let over = format!("{at}s");
        let e = check_socket_path(std::path::Path::new(&over)).unwrap_err();
        assert!(e.to_string().contains("107"), "{e}");
    }
}

/// The longest AF_UNIX path: `sockaddr_un.sun_path` is 108 bytes on Linux,
/// one of them the terminating NUL. Every unix socket the host creates or
/// dials (the supervisor socket, gvproxy's, libkrun's) is checked against it.
pub const MAX_SOCKET_PATH: usize = 107;

/// Refuses a unix socket path that does not fit `sockaddr_un`.
pub fn check_socket_path(p: &std::path::Path) -> Result<(), VmError> {
    let len = p.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmError::Unavailable(format!(
            "{} is {len} bytes, longer than {MAX_SOCKET_PATH}, the limit for a unix socket path: use a shorter --state-dir (for example under /tmp)",
            p.display()
        )));
    }
    Ok(())
}

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
