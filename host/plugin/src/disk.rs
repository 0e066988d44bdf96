//! The sandbox disk: everything sandboxes write to the host's disk (a
//! process sandbox's `/sandbox`, a VM's files, their logs) lives in one
//! btrfs filesystem, in a sparse image file in the state dir mounted at
//! `sandboxes/`, where every sandbox's state dir is a subvolume with a
//! qgroup limit (issue 14 item 6). A sandbox that fills its quota gets
//! `EDQUOT`; the host's disk and every other sandbox are unaffected.
//!
//! Why btrfs qgroups: ext4 and XFS project quotas need the kernel's quota
//! support (`CONFIG_QUOTA`, `CONFIG_XFS_QUOTA`), which not every kernel has
//! (this project's test hosts do not); btrfs qgroups are part of btrfs. One
//! filesystem for all sandboxes costs one `mkfs.btrfs` (~20 ms) once per
//! state dir and a mount at gateway start; a sandbox costs a subvolume and
//! a limit, two ioctls (a filesystem per sandbox would cost ~100 ms per
//! create). The image is sparse: it takes the host disk space sandboxes
//! use, up to its size.
//!
//! The mount outlives a gateway that is killed (the next one finds it and
//! uses it); a clean shutdown detaches it, and the loop device goes with
//! its last user (mount's `-o loop` sets autoclear).

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The image's name in the state dir.
pub const IMAGE: &str = "sandboxes.img";

/// How big the pool and each sandbox's share are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Size of the sparse image holding every sandbox's files; 0 turns the
    /// sandbox disk (and so every quota) off.
    pub size_gib: u64,
    /// What one sandbox may store, in MiB.
    pub quota_mib: u64,
}

impl DiskConfig {
    /// No sandbox disk: sandboxes' state dirs are plain directories.
    pub const OFF: DiskConfig = DiskConfig {
        size_gib: 0,
        quota_mib: 0,
    };
}

/// The gateway's default: a 64 GiB pool, 10 GiB per sandbox.
impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            size_gib: 64,
            quota_mib: 10 << 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "cannot run {tool}: sandbox disk quotas need btrfs-progs (apt-get install btrfs-progs), or start the gateway with --sandbox-disk-gib 0 to run without them"
    )]
    Tool {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{what} {path:?}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The mounted sandbox disk.
#[derive(Debug)]
pub struct SandboxDisk {
    mount: PathBuf,
    quota_bytes: u64,
    detached: std::sync::atomic::AtomicBool,
}

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

impl SandboxDisk {
    /// Mounts (creating it the first time) the sandbox disk of `state_dir`
    /// at `sandboxes`. None when it is off, when this process cannot mount
    /// (not root: process and VM sandboxes need root anyway), or when
    /// `sandboxes` already holds sandboxes of a gateway that predates the
    /// disk (they stay where they are, without quotas; a warning says so).
    pub fn open(
        state_dir: &Path,
        sandboxes: &Path,
        config: DiskConfig,
    ) -> Result<Option<SandboxDisk>, DiskError> {
        if config.size_gib == 0 || !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let disk = SandboxDisk {
            mount: sandboxes.to_owned(),
            quota_bytes: config.quota_mib << 20,
            detached: false.into(),
        };
        if disk.is_mounted()? {
            // Left by a gateway that was killed: ours, since only root can
            // mount and the state dir is root's.
            disk.enable_quotas()?;
            return Ok(Some(disk));
        }
        let image = state_dir.join(IMAGE);
        let fresh = !image.exists();
        if fresh && fs::read_dir(sandboxes).is_ok_and(|mut d| d.next().is_some()) {
            tracing::warn!(
                "{} holds sandboxes from before the sandbox disk: they keep running without disk quotas; a fresh state dir gets them",
                sandboxes.display()
            );
            return Ok(None);
        }
        if fresh {
            make_image(&image, config.size_gib)?;
        }
        fs::create_dir_all(sandboxes).map_err(io_err("cannot create", sandboxes))?;
        run(
            Command::new("mount")
                .args(["-t", "btrfs", "-o", "loop,nosuid,nodev,noatime"])
                .arg(&image)
                .arg(sandboxes),
            "mount",
            format!("mounting {}", image.display()),
        )?;
        // The filesystem's root is the parent of every sandbox's state dir:
        // the gateway's user alone may enter it.
        fs::set_permissions(sandboxes, fs::Permissions::from_mode(0o700))
            .map_err(io_err("cannot chmod", sandboxes))?;
        disk.enable_quotas()?;
        Ok(Some(disk))
    }

    /// A sandbox's quota in bytes.
    pub fn quota_bytes(&self) -> u64 {
        self.quota_bytes
    }

    fn is_mounted(&self) -> Result<bool, DiskError> {
        let Some(parent) = self.mount.parent() else {
            return Ok(false);
        };
        let (Ok(dir), Ok(up)) = (fs::metadata(&self.mount), fs::metadata(parent)) else {
            return Ok(false);
        };
        if dir.dev() == up.dev() {
            return Ok(false);
        }
        let fs = nix::sys::statfs::statfs(&self.mount)
            .map_err(|e| io_err("cannot inspect", &self.mount)(e.into()))?;
        Ok(fs.filesystem_type().0 as i64 == BTRFS_SUPER_MAGIC)
    }

    fn enable_quotas(&self) -> Result<(), DiskError> {
        let root = File::open(&self.mount).map_err(io_err("cannot open", &self.mount))?;
        let mut args = QuotaCtlArgs {
            cmd: BTRFS_QUOTA_CTL_ENABLE,
            status: 0,
        };
        // Enabling quotas that are on already is a no-op.
        ioctl(&root, BTRFS_IOC_QUOTA_CTL, &mut args)
            .map_err(io_err("cannot enable btrfs quotas on", &self.mount))
    }

    /// Creates `name`'s state dir as a subvolume (0700, root's) limited to
    /// the quota. One that exists already is left as it is.
    pub fn create_sandbox_dir(&self, name: &str) -> io::Result<PathBuf> {
        let path = self.mount.join(name);
        let parent = File::open(&self.mount)?;
        let mut args = VolArgs {
            fd: 0,
            name: [0; 4088],
        };
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= args.name.len() || name.contains(['/', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} cannot name a sandbox's state dir"),
            ));
        }
        args.name[..bytes.len()].copy_from_slice(bytes);
        match ioctl(&parent, BTRFS_IOC_SUBVOL_CREATE, &mut args) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                crate::host::create_private_dir(&path)?;
                return Ok(path);
            }
            other => other?,
        }
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(&path)?;
        dir.set_permissions(fs::Permissions::from_mode(0o700))?;
        let mut limit = QgroupLimitArgs {
            // 0: the qgroup of the subvolume the descriptor is in.
            qgroupid: 0,
            flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
            max_rfer: self.quota_bytes,
            max_excl: 0,
            rsv_rfer: 0,
            rsv_excl: 0,
        };
        if let Err(e) = ioctl(&dir, BTRFS_IOC_QGROUP_LIMIT, &mut limit) {
            // No unlimited sandbox: take the subvolume back.
            let _ = fs::remove_dir(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Detaches the mount (once): sandboxes still holding it keep it until
    /// they end, and the loop device goes with the last of them. The
    /// gateway does this at shutdown; a killed one leaves it mounted for
    /// the next.
    pub fn detach(&self) {
        if self
            .detached
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        if let Err(e) = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("cannot detach {}: {e}", self.mount.display());
        }
    }
}

/// A host dropped without a shutdown (a test's) detaches too.
impl Drop for SandboxDisk {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A sparse, root-only image with an empty btrfs on it; removed again if
/// anything fails, so the next start tries afresh.
fn make_image(image: &Path, size_gib: u64) -> Result<(), DiskError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .map_err(io_err("cannot create", image))?;
    let made = file
        .set_len(size_gib << 30)
        .map_err(io_err("cannot size", image))
        .and_then(|()| {
            run(
                Command::new("mkfs.btrfs")
                    .args([
                        "-q",
                        "-f",
                        "-m",
                        "single",
                        "-d",
                        "single",
                        "-L",
                        "openshell",
                    ])
                    .arg(image),
                "mkfs.btrfs",
                format!("making a btrfs filesystem on {}", image.display()),
            )
        });
    if made.is_err() {
        let _ = fs::remove_file(image);
    }
    made
}

fn run(cmd: &mut Command, tool: &'static str, what: String) -> Result<(), DiskError> {
    let out = cmd
        .output()
        .map_err(|source| DiskError::Tool { tool, source })?;
    if out.status.success() {
        return Ok(());
    }
    Err(DiskError::Failed {
        what,
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

// The btrfs ioctls used, from linux/btrfs.h (magic 0x94).
const BTRFS_IOC_SUBVOL_CREATE: nix::libc::c_ulong = 0x5000_940e; // _IOW(14, vol_args)
const BTRFS_IOC_QUOTA_CTL: nix::libc::c_ulong = 0xc010_9428; // _IOWR(40, quota_ctl_args)
const BTRFS_IOC_QGROUP_LIMIT: nix::libc::c_ulong = 0x8030_942b; // _IOR(43, qgroup_limit_args)
const BTRFS_QUOTA_CTL_ENABLE: u64 = 1;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `btrfs_ioctl_qgroup_limit_args`: the id, then `btrfs_qgroup_limit`.
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

fn ioctl<T>(file: &File, request: nix::libc::c_ulong, arg: &mut T) -> io::Result<()> {
    #[allow(unsafe_code, reason = "btrfs ioctls have no safe wrapper")]
    // SAFETY: `request` is one of the btrfs ioctls above and `arg` the
    // repr(C) struct of exactly the size its number encodes, live and
    // exclusively borrowed for the call.
    let ret = unsafe { nix::libc::ioctl(file.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_numbers_encode_their_argument_sizes() {
        let size = |request: nix::libc::c_ulong| (request >> 16) & 0x3fff;
        assert_eq!(size(BTRFS_IOC_SUBVOL_CREATE), 4096);
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(size(BTRFS_IOC_QUOTA_CTL), 16);
        assert_eq!(std::mem::size_of::<QuotaCtlArgs>(), 16);
        assert_eq!(size(BTRFS_IOC_QGROUP_LIMIT), 48);
        assert_eq!(std::mem::size_of::<QgroupLimitArgs>(), 48);
    }

    #[test]
    fn off_means_no_disk_and_no_mount() {
        let dir = tempfile::tempdir().unwrap();
        let off = DiskConfig {
            size_gib: 0,
            quota_mib: 1,
        };
        let disk = SandboxDisk::open(dir.path(), &dir.path().join("sandboxes"), off).unwrap();
        assert!(disk.is_none());
        assert!(!dir.path().join(IMAGE).exists());
    }
}
