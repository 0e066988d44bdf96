//! The host side of one launch, in order: check and prepare the host
//! directories, create the cgroups, clone the sandbox's init into new
//! namespaces, move it into the cgroups and write its id maps, let it go,
//! forward signals to it, and turn its end into the launcher's exit status.
//!
//! Two pipes tie the launcher to init. *go*: init blocks on it until the
//! launcher has finished the parts only host root can do; the launcher then
//! keeps its end open until init exits, so init can tell whether the launcher
//! is still alive. *report*: close-on-exec, so it reaches end-of-file exactly
//! when the program has been exec'd; anything written on it first is why the
//! launch failed.

use std::fs::{self, DirBuilder, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};

use crate::cgroup::Cgroups;
use std::path::{Path, PathBuf};

use crate::config::{ID_RANGE, IMAGE_ID_OFFSET, ImageRoot, LaunchConfig, MAX_IMAGE_ID};
use crate::error::{LaunchError, os};
use crate::inside::{self, Exec, Handoff};
use crate::sys::{self, Fork};
use openshell_sandbox_launch::cgroup_plan::Place;

/// The in-sandbox uid (and gid) that owns `/sandbox`; the supervisor runs
/// sandbox code as this user.
pub const SANDBOX_USER: u32 = 1000;

/// Launches the sandbox and returns the program's exit status.
pub fn run(config: &LaunchConfig) -> Result<u8, LaunchError> {
    prepare_host(config)?;
    let cgroups = Cgroups::create(config)?;
    let handoff = match config.supervised {
        true => Handoff {
            supervisor: cgroups.procs(Place::Supervisor)?,
            workload: cgroups.procs(Place::Workload)?,
        },
        false => Handoff::default(),
    };
    let exec = Exec::new(config, &handoff.workload)?;
    // Made before the clone, so init inherits them.
    let layers = match &config.image {
        Some(image) => image_layers(config, image)?,
        None => Vec::new(),
    };
    let (go_read, go_write) = sys::pipe().map_err(os("cannot create the go pipe"))?;
    let (report_read, report_write) = sys::pipe().map_err(os("cannot create the report pipe"))?;

    let init = match sys::clone_into(namespaces(config))
        .map_err(os("cannot create the sandbox's namespaces"))?
    {
        Fork::Child => {
            drop((go_write, report_read));
            inside::init(config, &exec, handoff, layers, go_read, report_write)
        }
        Fork::Parent(pid) => pid,
    };
    // Init's to use; the launcher never moves anything with them.
    drop((handoff, layers));
    drop((go_read, report_write));
    let go_write = File::from(go_write);

    let report = supervise(config, &cgroups, init, &go_write, report_read);
    if report.is_err() {
        // Not reaped yet, so the pid is still init's.
        let _ = sys::kill(init, libc::SIGKILL);
    }
    let _ = sys::stop_forwarding();
    let status = sys::reap(init).map_err(os("cannot reap the sandbox's init"))?;
    drop(go_write);
    drop(cgroups);
    match report? {
        report if report.is_empty() => Ok(status),
        report => Err(LaunchError::Inside(report)),
    }
}

fn namespaces(config: &LaunchConfig) -> libc::c_int {
    let always = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC;
    if config.isolate_network {
        always | libc::CLONE_NEWNET
    } else {
        always
    }
}

/// Checks the host paths and prepares what init will need: the mount point
/// of the new root, and a workdir the sandbox user owns.
///
/// The workdir is the one host directory sandbox code may write, so it is
/// opened without following any symlink, through directories only root can
/// change ([`open_owned_path`]), and chowned through that descriptor: a
/// symlink planted by sandbox code never redirects the chown to a host path
/// (issue 13 item 3).
fn prepare_host(config: &LaunchConfig) -> Result<(), LaunchError> {
    let state_dir = &config.state_dir;
    let state = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(state_dir)
        .map_err(os(format!("cannot open state_dir {state_dir:?}")))?;
    let meta = state
        .metadata()
        .map_err(os(format!("cannot inspect state_dir {state_dir:?}")))?;
    // The new root is mounted on a path under it as host root: nobody else
    // may be able to swap that path for a symlink.
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(LaunchError::Host(format!(
            "state_dir {state_dir:?} must be a directory owned by root and writable only by it"
        )));
    }
    let new_root = config.new_root();
    match DirBuilder::new().mode(0o700).create(&new_root) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
            return Err(os(format!("cannot create {new_root:?}"))(err));
        }
        _ if !fs::symlink_metadata(&new_root).is_ok_and(|m| m.is_dir()) => {
            return Err(LaunchError::Host(format!(
                "{new_root:?} is not a directory"
            )));
        }
        _ => {}
    }

    require_dir("run_dir", &config.run_dir)?;
    let workdir = &config.workdir;
    // `.` of the state dir, or anything holding the run dir or the root,
    // would hand host-owned entries to sandbox code.
    if [state_dir, &config.run_dir, &new_root]
        .iter()
        .any(|p| p.starts_with(workdir))
    {
        return Err(LaunchError::Host(format!(
            "workdir {workdir:?} must not be or contain state_dir, run_dir or the new root"
        )));
    }
    let dir = open_owned_path(workdir)?;
    let owner = config.uid_base + SANDBOX_USER;
    std::os::unix::fs::fchown(&dir, Some(owner), Some(owner))
        .map_err(os(format!("cannot chown workdir {workdir:?} to {owner}")))?;
    dir.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(os(format!("cannot chmod workdir {workdir:?}")))?;

    if let Some(image) = &config.image {
        prepare_image_dirs(config, image)?;
    }

    let program = fs::metadata(&config.program)
        .map_err(os(format!("cannot inspect program {:?}", config.program)))?;
    if !program.is_file() {
        return Err(LaunchError::Host(format!(
            "program {:?} is not a regular file",
            config.program
        )));
    }
    Ok(())
}

/// Creates the image root's host directories under the state dir (root's,
/// 0700, so no one else can swap them): the writable layer, owned by the
/// image's root as the sandbox sees it (overlayfs shows its root directory
/// as the sandbox's `/`); overlayfs's work dir, the sandbox root's; and one
/// mount point per layer. A directory kept from an earlier launch is reused
/// (the writable layer persists), but never through a symlink.
fn prepare_image_dirs(config: &LaunchConfig, image: &ImageRoot) -> Result<(), LaunchError> {
    let inside = |name: &str, path: &Path| {
        if path.parent() == Some(config.state_dir.as_path()) {
            Ok(())
        } else {
            Err(LaunchError::Host(format!(
                "image {name} {path:?} must be directly in state_dir"
            )))
        }
    };
    inside("upper", &image.upper)?;
    inside("work", &image.work)?;
    let image_root = config.uid_base + IMAGE_ID_OFFSET;
    make_owned_dir(&image.upper, image_root, 0o755)?;
    make_owned_dir(&image.work, config.uid_base, 0o700)?;
    let lower = lower_dir(config);
    make_owned_dir(&lower, 0, 0o700)?;
    for i in 0..image.layers.len() {
        make_owned_dir(&lower.join(i.to_string()), 0, 0o700)?;
    }
    for layer in &image.layers {
        require_dir("image layer", layer)?;
    }
    Ok(())
}

/// Where init attaches the layers, one numbered mount point each.
pub fn lower_dir(config: &LaunchConfig) -> PathBuf {
    config.state_dir.join("lower")
}

fn make_owned_dir(path: &Path, owner: u32, mode: u32) -> Result<(), LaunchError> {
    match DirBuilder::new().mode(mode).create(path) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
            return Err(os(format!("cannot create {path:?}"))(err));
        }
        _ => {}
    }
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(os(format!("cannot open {path:?} (it must be a directory)")))?;
    std::os::unix::fs::fchown(&dir, Some(owner), Some(owner))
        .map_err(os(format!("cannot chown {path:?}")))?;
    dir.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(os(format!("cannot chmod {path:?}")))
}

/// The image's layers as detached idmapped mounts, read-only, bottom
/// first: image id `u` appears as host `uid_base + IMAGE_ID_OFFSET + u`.
fn image_layers(config: &LaunchConfig, image: &ImageRoot) -> Result<Vec<OwnedFd>, LaunchError> {
    let first = config.uid_base + IMAGE_ID_OFFSET;
    let userns = idmap_namespace(first, MAX_IMAGE_ID + 1)?;
    let attrs = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    image
        .layers
        .iter()
        .map(|layer| {
            sys::idmapped_tree(layer, userns.as_fd(), attrs).map_err(os(format!(
                "cannot make an idmapped mount of layer {layer:?}"
            )))
        })
        .collect()
}

/// A user namespace mapping ids `0..count` to host ids from `first`, held
/// only by the returned descriptor: an idmapped mount takes its mapping
/// from a namespace. Made by a throwaway child that unshares it and waits
/// while the launcher writes the maps and opens it.
fn idmap_namespace(first: u32, count: u32) -> Result<OwnedFd, LaunchError> {
    let (ready_read, ready_write) = sys::pipe().map_err(os("cannot create a pipe"))?;
    let (done_read, done_write) = sys::pipe().map_err(os("cannot create a pipe"))?;
    let child = match sys::fork().map_err(os("cannot fork the idmap helper"))? {
        Fork::Child => {
            drop((ready_read, done_write));
            let status = match sys::unshare(libc::CLONE_NEWUSER) {
                Ok(()) => {
                    let _ = File::from(ready_write).write_all(b"u");
                    // Until the launcher closes its end.
                    let _ = File::from(done_read).read(&mut [0]);
                    0
                }
                Err(_) => 1,
            };
            sys::exit_now(status)
        }
        Fork::Parent(pid) => pid,
    };
    drop((ready_write, done_read));
    let made = (|| {
        let mut byte = [0];
        if File::from(ready_read)
            .read(&mut byte)
            .map_err(os("cannot read the idmap helper"))?
            == 0
        {
            return Err(LaunchError::Host(
                "cannot create a user namespace for the image's idmapping".into(),
            ));
        }
        let map = format!("0 {first} {count}\n");
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{child}/{file}");
            fs::write(&path, &map).map_err(os(format!("cannot write {path}")))?;
        }
        File::open(format!("/proc/{child}/ns/user"))
            .map(OwnedFd::from)
            .map_err(os("cannot open the idmap namespace"))
    })();
    drop(done_write);
    let _ = sys::reap(child);
    made
}

/// Opens the directory `path` from `/` one component at a time, following
/// no symlink, where every directory that holds the next component is
/// root's and writable by nobody else (or sticky, like `/tmp`, for all
/// but the last): nobody but root can have swapped any part of the path.
fn open_owned_path(path: &std::path::Path) -> Result<File, LaunchError> {
    use std::path::Component;
    let unsafe_path = |why: &str| LaunchError::Host(format!("workdir {path:?}: {why}"));
    let mut dir = File::open("/").map_err(os("cannot open /"))?;
    let names: Vec<_> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::RootDir => None,
            _ => Some(Err(())),
        })
        .collect::<Result<_, _>>()
        .map_err(|()| unsafe_path("must be absolute and without . or .."))?;
    for (i, name) in names.iter().enumerate() {
        let meta = dir
            .metadata()
            .map_err(os(format!("cannot inspect {path:?}")))?;
        let last = i + 1 == names.len();
        let others_write = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.uid() != 0 || (others_write && (last || !sticky)) {
            return Err(unsafe_path(
                "a directory on the way is not root's or is writable by others",
            ));
        }
        let next = sys::open_dir_at(dir.as_fd(), name).map_err(os(format!(
            "cannot inspect workdir {path:?} (no symlink is followed)"
        )))?;
        dir = File::from(next);
    }
    Ok(dir)
}

fn require_dir(field: &str, path: &std::path::Path) -> Result<(), LaunchError> {
    let meta = fs::metadata(path).map_err(os(format!("cannot inspect {field} {path:?}")))?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(LaunchError::Host(format!(
            "{field} {path:?} is not a directory"
        )))
    }
}

/// Releases init and follows it until it has exited (without reaping it).
/// Returns what init reported before the program's exec: empty on success.
fn supervise(
    config: &LaunchConfig,
    cgroups: &Cgroups,
    init: i32,
    go: &File,
    report: OwnedFd,
) -> Result<String, LaunchError> {
    cgroups.add(init)?;
    write_id_maps(init, config.uid_base)?;
    let mut go: &File = go;
    go.write_all(b"g")
        .map_err(os("cannot release the sandbox's init"))?;
    sys::forward_signals_to(init).map_err(os("cannot install signal forwarding"))?;

    let mut report_bytes = Vec::new();
    File::from(report)
        .read_to_end(&mut report_bytes)
        .map_err(os("cannot read the sandbox's start-up report"))?;
    sys::wait_exited(init).map_err(os("cannot wait for the sandbox's init"))?;
    Ok(String::from_utf8_lossy(&report_bytes).trim().to_owned())
}

/// Maps in-sandbox ids `0..ID_RANGE` onto `uid_base..`. Only a process
/// privileged in the parent namespace may write a range this large, which is
/// why the launcher, not init, writes it.
fn write_id_maps(pid: i32, uid_base: u32) -> Result<(), LaunchError> {
    let map = format!("0 {uid_base} {ID_RANGE}\n");
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        fs::write(&path, &map).map_err(os(format!("cannot write {path}")))?;
    }
    Ok(())
}
