//! A VM sandbox's own disk: the writable layer above its image's shared,
//! read-only disk (`openshell_image::disk`). A sparse raw file holding an
//! empty ext4 filesystem, made once at the sandbox's first launch and kept
//! until the sandbox is deleted; the guest's init mounts the image's disk
//! read-only and this one as the overlay's upper layer.
//!
//! Durability: the filesystem has a journal and QEMU passes the guest's
//! flushes to the host file, so whatever the guest has synced (`sync`,
//! `fsync`, or ext4's own commit every 5 s) survives QEMU or the gateway
//! being killed; what is only in the guest's page cache does not.

use std::fs::{self, File};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

use crate::VmError;

/// The filesystem label the guest's init looks for.
pub const LABEL: &str = "openshell-disk";

/// Makes the disk at `path` (`size` bytes, sparse) unless it exists. Built
/// under a temporary name and renamed, so a crash never leaves half a disk
/// that a later launch would take for a good one.
pub fn ensure(path: &Path, size: u64) -> Result<bool, VmError> {
    if path.is_file() {
        return Ok(false);
    }
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(VmError::io(format!("cannot create {}", tmp.display())))?;
    // Copy-on-write off where the host filesystem has it (btrfs, the
    // sandbox disk): a VM disk rewritten in place fragments badly under
    // CoW. It must be set while the file is empty; elsewhere it is a no-op.
    let _ = set_nocow(&file);
    file.set_len(size)
        .map_err(VmError::io(format!("cannot size {}", tmp.display())))?;
    drop(file);
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-L", LABEL])
        // Inode tables written now (they are holes in a sparse file, so
        // this is cheap): the guest never runs lazy initialisation.
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&tmp)
        .output()
        .map_err(VmError::io("cannot run mke2fs (install e2fsprogs)"))?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(VmError::Unavailable(format!(
            "mke2fs could not make the sandbox's disk: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(VmError::io(format!("cannot sync {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(VmError::io(format!("cannot rename {}", tmp.display())))?;
    Ok(true)
}

fn set_nocow(file: &File) -> rustix::io::Result<()> {
    use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
    ioctl_setflags(file, ioctl_getflags(file)? | IFlags::NOCOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_made_once_sparse_and_labelled() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "\n!!! SKIPPED: making a VM disk needs root (mke2fs on a file does not, but chattr may) !!!\n"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.ext4");
        assert!(ensure(&path, 1 << 30).unwrap(), "made the first time");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 64 << 20,
            "sparse: {} bytes allocated",
            meta.blocks() * 512
        );
        let label = Command::new("e2label").arg(&path).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), LABEL);
        fs::write(dir.path().join("marker"), b"x").unwrap();
        let ino = meta.ino();
        assert!(!ensure(&path, 1 << 30).unwrap(), "kept the second time");
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
        assert!(!path.with_extension("new").exists());
    }
}
