//! The sandbox's filesystem, built by init in its own mount namespace.
//!
//! The new root is a tmpfs on `<state_dir>/root` holding only:
//!
//! | inside               | what                                            |
//! |----------------------|-------------------------------------------------|
//! | `/usr`, `/etc`, and `/bin` `/sbin` `/lib*` | host's, read-only (symlinks recreated as symlinks) |
//! | `/sandbox`           | the workdir, read-write                          |
//! | `/run/openshell`     | the run dir, read-write                          |
//! | `/run/openshell-bin/<name>` | the program, read-only                    |
//! | `/proc`              | a fresh proc of the new pid namespace            |
//! | `/tmp`, `/dev/shm`   | empty tmpfs                                      |
//! | `/dev`               | tmpfs with `null zero full random urandom tty` bound from the host, a private devpts, `ptmx`, `fd`, `std*` |
//!
//! Then [`enter`] pivots into it and detaches the host's tree. Read-only and
//! nosuid are applied after the pivot, to every mount under the paths in
//! [`hardening`], as listed by the new `/proc/self/mountinfo`; so mounts the
//! host nested under `/etc` (a container's `/etc/hosts`) are covered too.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use libc::c_ulong;

use crate::config::{ImageRoot, LaunchConfig, PROGRAM_DIR};
use crate::error::{LaunchError, os};
use crate::sys;

/// Host top-level directories the sandbox shares, read-only. Those that are
/// symlinks on the host (`/bin -> usr/bin` on merged-/usr systems) are
/// recreated as the same symlinks; missing ones are skipped.
const SYSTEM_DIRS: [&str; 8] = [
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
];

/// Host devices bound into `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Read-only, and no set-uid or device files.
const READ_ONLY: c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;

/// Writable, but no set-uid or device files.
const WRITABLE: c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// The host paths bound into the sandbox, opened by init while its file
/// access is still host root's.
///
/// Init opens them itself, inside its new mount namespace, because a bind
/// mount's source must belong to the caller's mount namespace (a descriptor
/// the launcher opened would not). Mounting from `/proc/self/fd/N` later
/// needs no permission on the directories above the source, which the
/// sandbox's root does not have (the state dir is root's, 0700).
#[derive(Debug)]
pub struct Sources {
    workdir: OwnedFd,
    run_dir: OwnedFd,
    program: OwnedFd,
}

impl Sources {
    pub fn open(config: &LaunchConfig) -> Result<Sources, LaunchError> {
        Ok(Sources {
            workdir: open_path(&config.workdir)?,
            run_dir: open_path(&config.run_dir)?,
            program: open_path(&config.program)?,
        })
    }
}

fn open_path(path: &Path) -> Result<OwnedFd, LaunchError> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map(OwnedFd::from)
        .map_err(os(format!("cannot open {path:?}")))
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Makes every mount private: nothing init mounts propagates back to the
/// host.
fn make_private() -> Result<(), LaunchError> {
    let none = Path::new("none");
    sys::mount(
        none,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(os("cannot make the mounts private"))
}

/// Makes every mount private, mounts the root tmpfs at `new_root` and
/// changes into it. Runs while file access is still host root's, so
/// `new_root` is reachable; everything after works relative to the current
/// directory.
pub fn mount_new_root(new_root: &Path) -> Result<(), LaunchError> {
    make_private()?;
    // uid=0 is read in the new user namespace: the sandbox's root owns `/`.
    let options = "mode=0755,uid=0,gid=0";
    mount_tmpfs(new_root, libc::MS_NOSUID | libc::MS_NODEV, options)?;
    std::env::set_current_dir(new_root).map_err(os(format!("cannot enter {new_root:?}")))
}

/// An image root on its way to becoming `/`: the layers attached in init's
/// mount namespace and every directory overlayfs needs, opened while file
/// access is still host root's (they are under the root-only state dir).
#[derive(Debug)]
pub struct ImageMounts {
    lowers: Vec<OwnedFd>,
    upper: OwnedFd,
    work: OwnedFd,
    new_root: OwnedFd,
}

impl ImageMounts {
    /// `layers` are the launcher's idmapped layer mounts, bottom first.
    pub fn attach(
        config: &LaunchConfig,
        image: &ImageRoot,
        layers: Vec<OwnedFd>,
    ) -> Result<ImageMounts, LaunchError> {
        make_private()?;
        let lower = crate::launch::lower_dir(config);
        let mut lowers = Vec::with_capacity(layers.len());
        for (i, tree) in layers.iter().enumerate() {
            let point = lower.join(i.to_string());
            sys::attach(tree.as_fd(), &point).map_err(os(format!("cannot attach layer {i}")))?;
            lowers.push(sys::open_path(&point).map_err(os(format!("cannot open layer {i}")))?);
        }
        let open = |path: &Path| sys::open_path(path).map_err(os(format!("cannot open {path:?}")));
        Ok(ImageMounts {
            lowers,
            upper: open(&image.upper)?,
            work: open(&image.work)?,
            new_root: open(&config.new_root())?,
        })
    }

    /// Mounts the overlay at the new root and changes into it. Runs as the
    /// sandbox's root, so overlayfs acts with no more than its privilege
    /// (its mounter's credentials are the ones it uses for copy-up).
    pub fn mount(self) -> Result<(), LaunchError> {
        let fd = |f: &OwnedFd| format!("/proc/self/fd/{}", f.as_raw_fd());
        // `lowerdir+` (Linux 6.8) adds one layer per call, top first, so the
        // layer count is not bound by fsconfig's 256-byte string.
        let mut options: Vec<(&str, String)> = self
            .lowers
            .iter()
            .rev()
            .map(|l| ("lowerdir+", fd(l)))
            .collect();
        options.push(("upperdir", fd(&self.upper)));
        options.push(("workdir", fd(&self.work)));
        let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // userxattr: a user namespace may not write trusted.* xattrs; the
        // image store marks opaque directories with user.overlay.opaque.
        let attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
        let root = sys::overlay(&options, &["userxattr"], attrs).map_err(os(
            "cannot mount the image's overlay (image roots need Linux 6.8 or later)",
        ))?;
        sys::attach_on(root.as_fd(), self.new_root.as_fd())
            .map_err(os("cannot attach the image's overlay"))?;
        sys::change_dir(root.as_fd()).map_err(os("cannot enter the image's root"))
    }
}

/// Where the sandbox mounts its own things over an image's tree. An image
/// may not hold a symlink on their way: the mounts happen before the pivot,
/// where an absolute link would lead into the host's tree.
const IMAGE_MOUNT_POINTS: [&str; 7] = [
    "sandbox",
    "run",
    "run/openshell",
    "run/openshell-bin",
    "proc",
    "dev",
    "tmp",
];

fn refuse_image_symlinks() -> Result<(), LaunchError> {
    for path in IMAGE_MOUNT_POINTS {
        if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(LaunchError::Host(format!(
                "the image has a symlink at /{path}, where the sandbox mounts its own directory; make it a directory in the image"
            )));
        }
    }
    Ok(())
}

/// Fills the new root (the current directory).
pub fn populate(config: &LaunchConfig, sources: &Sources) -> Result<(), LaunchError> {
    let image = config.image.is_some();
    if image {
        refuse_image_symlinks()?;
    }
    for name in SYSTEM_DIRS.iter().filter(|_| !image) {
        let host = Path::new("/").join(name);
        match fs::symlink_metadata(&host) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(os(format!("cannot inspect {host:?}"))(err)),
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&host).map_err(os(format!("cannot read {host:?}")))?;
                symlink(&target, name).map_err(os(format!("cannot create /{name}")))?;
            }
            Ok(_) => bind(&host, &make_dir(name)?)?,
        }
    }
    bind(&fd_path(&sources.workdir), &make_dir("sandbox")?)?;
    bind(&fd_path(&sources.run_dir), &make_dir("run/openshell")?)?;
    let program_dir = make_dir(PROGRAM_DIR.trim_start_matches('/'))?;
    let program = make_file(&program_dir.join(config.program_name()))?;
    bind(&fd_path(&sources.program), &program)?;

    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount(
        Path::new("proc"),
        &make_dir("proc")?,
        Some("proc"),
        proc_flags,
        None,
    )
    .map_err(os("cannot mount /proc"))?;
    if image {
        // An image's /tmp is its own, kept in its writable layer.
        if fs::symlink_metadata("tmp").is_err() {
            make_dir("tmp")?;
            fs::set_permissions("tmp", fs::Permissions::from_mode(0o1777))
                .map_err(os("cannot chmod /tmp"))?;
        }
    } else {
        mount_tmpfs(&make_dir("tmp")?, WRITABLE, "mode=1777")?;
    }
    populate_dev()
}

fn populate_dev() -> Result<(), LaunchError> {
    mount_tmpfs(
        &make_dir("dev")?,
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=0755",
    )?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        let target = make_file(&Path::new("dev").join(name))?;
        // No remount: device nodes need the host mount's (dev-allowing) flags.
        sys::mount(&host, &target, None, libc::MS_BIND, None)
            .map_err(os(format!("cannot bind {host:?}")))?;
    }
    let pts_flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    let pts_options = "newinstance,ptmxmode=0666,mode=0620";
    sys::mount(
        Path::new("devpts"),
        &make_dir("dev/pts")?,
        Some("devpts"),
        pts_flags,
        Some(pts_options),
    )
    .map_err(os("cannot mount /dev/pts"))?;
    mount_tmpfs(&make_dir("dev/shm")?, WRITABLE, "mode=1777")?;
    for (link, target) in [
        ("dev/ptmx", "pts/ptmx"),
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, link).map_err(os(format!("cannot create /{link}")))?;
    }
    Ok(())
}

/// Pivots into the new root (the current directory), detaches the host's
/// tree, and applies [`hardening`] to every mount.
pub fn enter() -> Result<(), LaunchError> {
    let here = Path::new(".");
    // pivot_root(".", ".") stacks the old root on top of the new one; the
    // detach then removes it, and with it every host mount.
    sys::pivot_root(here, here).map_err(os("cannot pivot_root into the new root"))?;
    sys::detach(here).map_err(os("cannot detach the host's root"))?;
    std::env::set_current_dir("/").map_err(os("cannot change directory to /"))?;

    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(os("cannot read /proc/self/mountinfo"))?;
    for mount_point in mount_points(&mountinfo) {
        if let Some(flags) = hardening(&mount_point) {
            remount(&mount_point, flags)?;
        }
    }
    Ok(())
}

/// The flags every mount at or under a path gets after the pivot.
fn hardening(mount_point: &Path) -> Option<c_ulong> {
    let under = |dir: &str| mount_point.starts_with(dir);
    let system = SYSTEM_DIRS.iter().any(|name| under(&format!("/{name}")));
    if system || under(PROGRAM_DIR) {
        Some(READ_ONLY)
    } else if under("/sandbox") || under("/run/openshell") {
        Some(WRITABLE)
    } else {
        None
    }
}

/// Adds `flags` to the mount at `mount_point`. In a user namespace the
/// flags the mount inherited from the host (nosuid, nodev, noexec, atime)
/// are locked: a remount that omits them fails with EPERM, so they are read
/// back with `statvfs` and repeated.
fn remount(mount_point: &Path, flags: c_ulong) -> Result<(), LaunchError> {
    let locked =
        sys::mount_flags(mount_point).map_err(os(format!("cannot statvfs {mount_point:?}")))?;
    let all = libc::MS_BIND | libc::MS_REMOUNT | locked | flags;
    sys::mount(Path::new("none"), mount_point, None, all, None)
        .map_err(os(format!("cannot remount {mount_point:?}")))
}

/// Mount points (field 5) of `/proc/self/mountinfo`, unescaped.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mountinfo paths
/// as `\040`-style octal escapes.
fn unescape_octal(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape {
            Some(digits) => {
                out.push(digits.iter().fold(0u8, |n, d| (n << 3) | (d - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn bind(source: &Path, target: &Path) -> Result<(), LaunchError> {
    // Recursive: a user namespace may not bind a tree without the mounts
    // nested in it (they are locked to it).
    let flags = libc::MS_BIND | libc::MS_REC;
    sys::mount(source, target, None, flags, None).map_err(os(format!(
        "cannot bind {source:?} at /{}",
        target.display()
    )))
}

fn mount_tmpfs(target: &Path, flags: c_ulong, options: &str) -> Result<(), LaunchError> {
    sys::mount(
        Path::new("tmpfs"),
        target,
        Some("tmpfs"),
        flags,
        Some(options),
    )
    .map_err(os(format!("cannot mount a tmpfs at /{}", target.display())))
}

/// Creates a directory (and its parents) relative to the new root.
fn make_dir(path: impl AsRef<Path>) -> Result<PathBuf, LaunchError> {
    let path = path.as_ref();
    fs::create_dir_all(path).map_err(os(format!("cannot create /{}", path.display())))?;
    Ok(path.to_owned())
}

/// Creates an empty file to bind a file onto.
fn make_file(path: &Path) -> Result<PathBuf, LaunchError> {
    File::create(path).map_err(os(format!("cannot create /{}", path.display())))?;
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_directories_and_the_program_become_read_only() {
        for path in ["/usr", "/etc/hosts", "/lib64", "/run/openshell-bin/sh"] {
            assert_eq!(hardening(Path::new(path)), Some(READ_ONLY), "{path}");
        }
    }

    #[test]
    fn writable_binds_lose_setuid_and_devices_but_stay_writable() {
        for path in ["/sandbox", "/sandbox/nested", "/run/openshell"] {
            assert_eq!(hardening(Path::new(path)), Some(WRITABLE), "{path}");
        }
    }

    #[test]
    fn prefixes_match_whole_components_only() {
        for path in [
            "/",
            "/usrx",
            "/etcetera",
            "/run",
            "/sandboxes",
            "/dev/null",
            "/proc",
        ] {
            assert_eq!(hardening(Path::new(path)), None, "{path}");
        }
    }

    #[test]
    fn mount_points_come_from_the_fifth_field_unescaped() {
        let mountinfo = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
28 27 0:25 / /etc/my\\040hosts ro,nosuid - tmpfs tmpfs ro
29 27 0:26 / /back\\134slash\\012 rw - tmpfs tmpfs rw
";
        assert_eq!(
            mount_points(mountinfo),
            [
                PathBuf::from("/proc"),
                PathBuf::from("/etc/my hosts"),
                PathBuf::from("/back\\slash\n"),
            ]
        );
    }

    #[test]
    fn a_backslash_without_three_octal_digits_is_kept() {
        assert_eq!(unescape_octal("/a\\9b\\04"), PathBuf::from("/a\\9b\\04"));
    }
}
