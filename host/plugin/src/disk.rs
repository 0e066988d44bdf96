//! The sandbox disk: everything sandboxes write to the host's disk (a
//! process sandbox's `/sandbox`, a VM's files, their logs) lives in one
//! btrfs filesystem, in a sparse image file in the state dir mounted at
//! `sandboxes/`, where every sandbox's state dir is a subvolume with a
//! qgroup limit (issue 14 item 6): the sandbox's own disk size, stored with
//! it (issue 17), or the gateway's default. A sandbox that fills its quota
//! gets `EDQUOT`; the host's disk and every other sandbox are unaffected.
//! The sizes overcommit the pool on purpose (it is sparse, and most
//! sandboxes use a fraction of theirs): one sandbox can ask for at most the
//! whole pool, and the gateway's disk reserve refuses creates when the
//! host itself runs low.
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

use openshell_core::validate::DiskSizes;

/// The image's name in the state dir.
pub const IMAGE: &str = "sandboxes.img";

/// What a sandbox that asks for no size may store, in GiB, unless the
/// operator chose otherwise (or the whole disk is smaller).
pub const DEFAULT_SANDBOX_GIB: u32 = 8;

/// How big the pool is and what a sandbox gets by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Size of the sparse image holding every sandbox's files; 0 turns the
    /// sandbox disk (and so every quota) off. Used when the image is made:
    /// an existing image keeps its size.
    pub size_gib: u64,
    /// What a sandbox created without a size may store, in GiB; `None`:
    /// [`DEFAULT_SANDBOX_GIB`], or the whole disk if that is smaller. One
    /// larger than the disk is refused at start.
    pub default_gib: Option<u32>,
}

impl DiskConfig {
    /// No sandbox disk: sandboxes' state dirs are plain directories.
    pub const OFF: DiskConfig = DiskConfig {
        size_gib: 0,
        default_gib: None,
    };
}

/// The gateway's default: a 64 GiB pool, 8 GiB per sandbox.
impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            size_gib: 64,
            default_gib: None,
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
    #[error(
        "the default sandbox disk size ({default_gib} GiB) is more than the sandbox disk holds ({pool_gib} GiB, {image}): lower --default-disk-gib"
    )]
    DefaultTooLarge {
        default_gib: u32,
        pool_gib: u64,
        image: PathBuf,
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
    sizes: DiskSizes,
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
        let image = state_dir.join(IMAGE);
        // An image is sized when it is made; what bounds a sandbox is the
        // size it has.
        let pool_gib = match fs::metadata(&image) {
            Ok(meta) => meta.len() >> 30,
            Err(e) if e.kind() == io::ErrorKind::NotFound => config.size_gib,
            Err(e) => return Err(io_err("cannot inspect", &image)(e)),
        };
        if pool_gib != config.size_gib {
            tracing::warn!(
                "{} holds {pool_gib} GiB, not the {} GiB --sandbox-disk-gib asks for: an image keeps the size it was made with",
                image.display(),
                config.size_gib
            );
        }
        let default_gib = match config.default_gib {
            Some(d) if u64::from(d) > pool_gib => {
                return Err(DiskError::DefaultTooLarge {
                    default_gib: d,
                    pool_gib,
                    image,
                });
            }
            Some(d) => d,
            None => {
                u32::try_from(pool_gib).map_or(DEFAULT_SANDBOX_GIB, |p| p.min(DEFAULT_SANDBOX_GIB))
            }
        };
        let disk = SandboxDisk {
            mount: sandboxes.to_owned(),
            sizes: DiskSizes {
                pool_gib,
                default_gib,
            },
            detached: false.into(),
        };
        if disk.is_mounted()? {
            // Left by a gateway that was killed: ours, since only root can
            // mount and the state dir is root's.
            disk.enable_quotas()?;
            return Ok(Some(disk));
        }
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

    /// What the disk holds and what a sandbox gets by default.
    pub fn sizes(&self) -> DiskSizes {
        self.sizes
    }

    /// The quota, in bytes, of a sandbox stored with `disk_gib` (0: a
    /// record from before sizes, which gets the default).
    pub fn limit_bytes(&self, disk_gib: u32) -> u64 {
        let gib = if disk_gib == 0 {
            self.sizes.default_gib
        } else {
            disk_gib
        };
        u64::from(gib) << 30
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

    /// Creates `name`'s state dir as a subvolume (0700, root's), or finds
    /// the one made by an earlier launch, and limits it to `disk_gib` (see
    /// [`Self::limit_bytes`]). The limit is set every time, so a resume
    /// after a restart (or a limit changed behind the gateway's back) gets
    /// the stored size; a limit that cannot be set fails the call, since a
    /// sandbox without one is unbounded.
    pub fn create_sandbox_dir(&self, name: &str, disk_gib: u32) -> io::Result<PathBuf> {
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
        let fresh = match ioctl(&parent, BTRFS_IOC_SUBVOL_CREATE, &mut args) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            other => other.map(|()| true)?,
        };
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(&path)?;
        // The limit goes to the subvolume the descriptor is in: for a plain
        // directory that would be the whole disk's root.
        if dir.metadata()?.ino() != BTRFS_FIRST_FREE_OBJECTID {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a subvolume, so no quota can bound it; move it out of the sandbox disk",
                    path.display()
                ),
            ));
        }
        dir.set_permissions(fs::Permissions::from_mode(0o700))?;
        let mut limit = QgroupLimitArgs {
            // 0: the qgroup of the subvolume the descriptor is in.
            qgroupid: 0,
            flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
            max_rfer: self.limit_bytes(disk_gib),
            max_excl: 0,
            rsv_rfer: 0,
            rsv_excl: 0,
        };
        if let Err(e) = ioctl(&dir, BTRFS_IOC_QGROUP_LIMIT, &mut limit) {
            if fresh {
                // No unlimited sandbox: take the subvolume back.
                let _ = fs::remove_dir(&path);
            }
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
/// The inode number of every subvolume's root directory.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

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

    /// `Max referenced` of the qgroup of the subvolume at `path`, as
    /// btrfs-progs reads it back; `None`: no limit.
    fn max_referenced(path: &Path) -> Option<u64> {
        let out = Command::new("btrfs")
            .args(["qgroup", "show", "-rf", "--raw"])
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let row = text
            .lines()
            .find(|l| l.starts_with("0/"))
            .unwrap_or_else(|| panic!("no qgroup for {}: {text}", path.display()));
        row.split_whitespace().nth(3).unwrap().parse().ok()
    }

    fn disk(dir: &Path, config: DiskConfig) -> Result<Option<SandboxDisk>, DiskError> {
        SandboxDisk::open(dir, &dir.join("sandboxes"), config)
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_sandbox_dir_gets_its_own_size_again_at_every_create_and_a_plain_dir_none() {
        let dir = tempfile::tempdir().unwrap();
        let config = DiskConfig {
            size_gib: 16,
            default_gib: None,
        };
        let disk = disk(dir.path(), config)
            .unwrap()
            .expect("root mounts the disk");
        assert_eq!(
            disk.sizes(),
            DiskSizes {
                pool_gib: 16,
                default_gib: DEFAULT_SANDBOX_GIB
            }
        );
        // 0: a record from before sizes gets the default.
        let a = disk.create_sandbox_dir("a", 0).unwrap();
        assert_eq!(max_referenced(&a), Some(8 * GIB));
        let b = disk.create_sandbox_dir("b", 1).unwrap();
        assert_eq!(max_referenced(&b), Some(GIB));
        // A resume sets the stored size again, whatever the limit became.
        let unlimit = Command::new("btrfs")
            .args(["qgroup", "limit", "none"])
            .arg(&b)
            .status()
            .unwrap();
        assert!(unlimit.success());
        assert_eq!(max_referenced(&b), None);
        std::fs::write(b.join("kept"), "x").unwrap();
        assert_eq!(disk.create_sandbox_dir("b", 1).unwrap(), b);
        assert_eq!(max_referenced(&b), Some(GIB));
        assert!(b.join("kept").exists(), "an existing state dir is kept");
        // A plain directory would put the limit on the disk's root.
        let plain = dir.path().join("sandboxes/plain");
        std::fs::create_dir(&plain).unwrap();
        let err = disk.create_sandbox_dir("plain", 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert_eq!(max_referenced(&plain), None, "the root got a limit");
    }

    #[test]
    fn the_default_is_at_most_the_disk_an_image_keeps_its_size_and_a_larger_default_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let small = DiskConfig {
            size_gib: 2,
            default_gib: None,
        };
        let disk2 = disk(dir.path(), small).unwrap().unwrap();
        assert_eq!(
            disk2.sizes(),
            DiskSizes {
                pool_gib: 2,
                default_gib: 2
            }
        );
        drop(disk2);
        // Asked for more, the image stays 2 GiB: an 8 GiB default cannot fit.
        let bigger = DiskConfig {
            size_gib: 64,
            default_gib: Some(8),
        };
        let err = disk(dir.path(), bigger).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::DefaultTooLarge {
                    default_gib: 8,
                    pool_gib: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--default-disk-gib"), "{err}");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let sandboxes = dir.path().join("sandboxes");
        assert!(
            !mounts.contains(&format!(" {} ", sandboxes.display())),
            "{mounts}"
        );
    }

    #[test]
    fn off_means_no_disk_and_no_mount() {
        let dir = tempfile::tempdir().unwrap();
        let off = DiskConfig {
            size_gib: 0,
            default_gib: Some(1),
        };
        let disk = SandboxDisk::open(dir.path(), &dir.path().join("sandboxes"), off).unwrap();
        assert!(disk.is_none());
        assert!(!dir.path().join(IMAGE).exists());
    }
}
