//! `openshell:compute/rootfs`: files a driver stages for its VM's
//! initramfs segment. They are held in memory until `vm.launch` writes the
//! initrd, so every input is bounded: a granted plugin cannot grow host
//! memory past [`MAX_STAGED_BYTES`] per sandbox.

use std::path::Path;

use openshell_vm::initramfs::{self, Entry};
use openshell_vm::runtime::VmRuntime;
use wasmtime::component::Resource;

use crate::bindings::openshell::compute::rootfs::{Host, HostStagedRootfs};
use crate::bindings::types::CapError;
use crate::caps::vm::{VmTable, blocking, cap_error, lock};
use crate::caps::{CallState, CapabilityError, limits};

/// Largest single staged file.
pub const MAX_STAGED_FILE: usize = 16 << 20;
/// Most files one sandbox may stage.
pub const MAX_STAGED_FILES: usize = 256;
/// All staged contents of one sandbox together.
pub const MAX_STAGED_BYTES: usize = 64 << 20;

#[derive(Debug)]
pub struct RootfsHandle {
    pub(crate) sandbox_id: String,
}

/// One sandbox's staged files and their total size.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    entries: Vec<Entry>,
    bytes: usize,
}

impl Staged {
    /// Adds a file, or refuses it naming the limit it would break.
    pub(crate) fn add(
        &mut self,
        path: String,
        mode: u32,
        contents: Vec<u8>,
    ) -> Result<(), CapError> {
        limits::check_path_len("staged path", &path)?;
        initramfs::check_path(&path).map_err(|e| CapError::AccessDenied(e.to_string()))?;
        if HOST_OWNED.contains(&path.as_str()) {
            return Err(CapError::AccessDenied(format!(
                "{path} is the host's (the guest's init and supervisor): a driver cannot replace it"
            )));
        }
        if mode > 0o7777 {
            return Err(CapError::Invalid(format!(
                "mode {mode:#o} has bits outside 0o7777 (permissions only)"
            )));
        }
        if contents.len() > MAX_STAGED_FILE {
            return Err(CapError::Invalid(format!(
                "{path}: {} bytes is over the {MAX_STAGED_FILE}-byte staged file limit",
                contents.len()
            )));
        }
        if self.entries.len() >= MAX_STAGED_FILES {
            return Err(CapError::Invalid(format!(
                "{path}: a sandbox may stage at most {MAX_STAGED_FILES} files"
            )));
        }
        if self.bytes + contents.len() > MAX_STAGED_BYTES {
            return Err(CapError::Invalid(format!(
                "{path}: staged files would total {} bytes, over the {MAX_STAGED_BYTES}-byte limit",
                self.bytes + contents.len()
            )));
        }
        self.bytes += contents.len();
        self.entries.push(Entry {
            path,
            mode,
            contents,
        });
        Ok(())
    }
}

/// Files of the base initramfs a driver's staged files may not replace
/// (later cpio segments win): the guest's init and its supervisor.
const HOST_OWNED: [&str; 3] = ["init", "bin/openshell-supervisor", "bin/busybox"];

impl VmTable {
    /// Writes the base initramfs followed by this sandbox's segment (the
    /// staged files; the environment goes over the identity channel), off
    /// the async workers.
    pub(crate) async fn write_initrd(
        &self,
        id: &str,
        rt: &VmRuntime,
        initrd: &Path,
    ) -> Result<(), CapError> {
        let entries = lock(&self.staged).remove(id).unwrap_or_default().entries;
        let segment = initramfs::archive(&entries).map_err(cap_error)?;
        let (base, initrd) = (rt.base_initrd.clone(), initrd.to_owned());
        blocking(move || {
            let mut bytes = std::fs::read(&base)
                .map_err(|e| CapError::Failed(format!("cannot read {}: {e}", base.display())))?;
            // Each cpio segment starts 4-byte aligned.
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            bytes.extend_from_slice(&segment);
            // The driver's staged files: the state dir's own, 0600.
            crate::private_file::write_private(&initrd, &bytes)
                .map_err(|e| CapError::Failed(format!("cannot write {}: {e}", initrd.display())))
        })
        .await
    }
}

impl Host for CallState {
    async fn stage(&mut self) -> Result<Resource<RootfsHandle>, CapabilityError> {
        let id = self.require_sandbox()?.to_owned();
        lock(&self.services.vms.staged).insert(id.clone(), Staged::default());
        Ok(self.table.push(RootfsHandle { sandbox_id: id })?)
    }
}

impl HostStagedRootfs for CallState {
    async fn write_file(
        &mut self,
        h: Resource<RootfsHandle>,
        path: String,
        contents: Vec<u8>,
        mode: u32,
    ) -> Result<(), CapabilityError> {
        let id = self.table.get(&h)?.sandbox_id.clone();
        let mut staged = lock(&self.services.vms.staged);
        Ok(staged.entry(id).or_default().add(path, mode, contents)?)
    }

    async fn drop(&mut self, h: Resource<RootfsHandle>) -> wasmtime::Result<()> {
        self.table.delete(h)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(r: Result<(), CapError>) -> String {
        match r {
            Err(CapError::Invalid(m)) => m,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_staged_file_over_the_size_limit_is_refused_naming_it() {
        let mut s = Staged::default();
        let m = refusal(s.add("big".into(), 0o644, vec![0; MAX_STAGED_FILE + 1]));
        assert!(m.contains(&MAX_STAGED_FILE.to_string()), "{m}");
        assert_eq!(s.bytes, 0, "nothing of a refused file is kept");
    }

    #[test]
    fn staging_stops_at_the_file_count_limit() {
        let mut s = Staged::default();
        for i in 0..MAX_STAGED_FILES {
            s.add(format!("f{i}"), 0o644, vec![1]).unwrap();
        }
        let m = refusal(s.add("one-more".into(), 0o644, vec![1]));
        assert!(m.contains(&MAX_STAGED_FILES.to_string()), "{m}");
    }

    #[test]
    fn staging_stops_at_the_total_size_limit() {
        let mut s = Staged::default();
        let per = MAX_STAGED_FILE;
        for i in 0..MAX_STAGED_BYTES / per {
            s.add(format!("f{i}"), 0o644, vec![0; per]).unwrap();
        }
        let m = refusal(s.add("over".into(), 0o644, vec![0; 1]));
        assert!(m.contains(&MAX_STAGED_BYTES.to_string()), "{m}");
        assert_eq!(s.bytes, MAX_STAGED_BYTES);
    }

    #[test]
    fn long_paths_odd_modes_and_the_hosts_own_files_are_refused() {
        let mut s = Staged::default();
        let m = refusal(s.add("a".repeat(limits::MAX_PATH + 1), 0o644, vec![]));
        assert!(m.contains(&limits::MAX_PATH.to_string()), "{m}");
        refusal(s.add("x".into(), 0o100644, vec![]));
        for own in HOST_OWNED {
            assert!(matches!(
                s.add(own.into(), 0o755, vec![]),
                Err(CapError::AccessDenied(_))
            ));
        }
        assert!(matches!(
            s.add("../up".into(), 0o600, vec![]),
            Err(CapError::AccessDenied(_))
        ));
        assert!(s.entries.is_empty());
    }
}
