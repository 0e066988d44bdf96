//! The sandbox's cgroups and its memory, pids and cpu limits, on cgroup v1
//! or v2. Limits fail closed: a limit whose controller is not mounted, not
//! delegated, or refuses the write is a [`CgroupError`], the launch fails
//! (exit status [`crate::error::CGROUP_FAILED`]) and nothing runs.
//!
//! [`plan::choose`] picks the hierarchy from `/proc/self/mountinfo`: v1
//! whenever a v1 hierarchy carries one of the controllers (v1 and hybrid
//! hosts), else cgroup2. The layouts:
//!
//! - v1: `<controller's mount>/openshell/<sandbox_id>`, for each of memory,
//!   pids and cpu that is mounted (limits or not: the directory is also how
//!   leftovers are found and killed).
//! - v2: `<base>/openshell/<sandbox_id>`, where base is the cgroup the
//!   gateway runs in (the launcher is born there): the gateway's delegated
//!   subtree. Because a cgroup with processes cannot hand controllers to its
//!   children, the first launch that needs one moves base's processes (the
//!   gateway, its launchers) into `<base>/openshell-gateway`; later launchers
//!   are born in that leaf and use its parent. Only the controllers the
//!   limits need are enabled.
//!
//! Each sandbox directory holds the two leaves of [`plan::Place`]:
//! `supervisor` and `workload`; processes live only in leaves.
//!
//! [`Cgroups::create`] makes the directories and writes the limits before
//! anything runs; [`Cgroups::add`] moves the sandbox's init into `workload`
//! while it still waits for the go-ahead, so everything it forks is counted.
//! Init roots its cgroup namespace there (sandbox code sees `/`), then a
//! supervised init moves itself into `supervisor` through descriptors from
//! [`Cgroups::procs`], and the supervisor moves each command it starts back
//! into `workload` the same way. Dropping [`Cgroups`] kills whatever is left
//! in them and removes the directories.

use openshell_sandbox_launch::cgroup_plan as plan;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::LaunchConfig;
use crate::error::warn;
use crate::sys;
use plan::{Controller, Hierarchy, LimitWrite, Place};

const MOUNTINFO: &str = "/proc/self/mountinfo";
const PROC_SELF_CGROUP: &str = "/proc/self/cgroup";

/// How long teardown waits for killed tasks to leave a cgroup, and how long
/// v2 set-up keeps moving base's processes while new ones are forked into it.
const DEADLINE: Duration = Duration::from_secs(3);

/// Why the sandbox's cgroups or limits could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the {controller} limit cannot be applied: no cgroup hierarchy is mounted under {under:?}"
    )]
    NoHierarchy {
        controller: Controller,
        under: PathBuf,
    },
    #[error(
        "the {controller} limit cannot be applied: no cgroup v1 hierarchy under {under:?} carries the `{controller}` controller"
    )]
    V1NotMounted {
        controller: Controller,
        under: PathBuf,
    },
    #[error(
        "the {controller} limit cannot be applied: cgroup v2 controller `{controller}` is not delegated to the gateway's cgroup {cgroup:?} (its cgroup.controllers lists {available:?}); run the gateway in a cgroup that has it, e.g. a systemd unit with Delegate=yes"
    )]
    V2NotDelegated {
        controller: Controller,
        cgroup: PathBuf,
        available: String,
    },
    #[error("{path} has no cgroup v2 (`0::`) line")]
    NoOwnCgroup { path: &'static str },
    #[error(
        "this process's cgroup {cgroup:?} is outside the cgroup2 mount at {mount_point:?} (which shows {root:?})"
    )]
    OutsideMount {
        cgroup: PathBuf,
        mount_point: PathBuf,
        root: PathBuf,
    },
    /// Mountinfo lists a cgroup mount there, but something else was mounted
    /// over it: writing "limits" there would limit nothing.
    #[error("{path:?} is not a cgroup filesystem (statfs type {magic:#x})")]
    NotCgroupFs { path: PathBuf, magic: i64 },
    #[error("cannot inspect {path:?}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create cgroup {path:?}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove stale cgroup {path:?}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {path:?}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot move process {pid} into {path:?}")]
    Move {
        pid: i32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The sandbox's cgroup directories, removed on drop.
#[derive(Debug)]
pub struct Cgroups {
    dirs: Vec<PathBuf>,
}

impl Cgroups {
    /// Creates the directories and writes the limits.
    pub fn create(config: &LaunchConfig) -> Result<Cgroups, CgroupError> {
        let under = config.cgroup_root.as_deref().unwrap_or(Path::new("/"));
        let mounts = plan::parse_mountinfo(&read(Path::new(MOUNTINFO))?);
        match plan::choose(&mounts, under) {
            Hierarchy::V1 { mounts } => create_v1(config, &mounts, under),
            Hierarchy::V2 { mount_point, root } => create_v2(config, &mount_point, &root),
            Hierarchy::Absent => match plan::required(config).first() {
                Some(&controller) => Err(CgroupError::NoHierarchy {
                    controller,
                    under: under.to_owned(),
                }),
                // No limit is lost; the pid namespace still takes every
                // process down with init.
                None => Ok(Cgroups { dirs: Vec::new() }),
            },
        }
    }

    /// Moves `pid` (and so everything it will fork) into `workload` in
    /// every hierarchy.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            move_process(pid, &Place::Workload.dir(dir))?;
        }
        Ok(())
    }

    /// `cgroup.procs` of `place` in every hierarchy, opened for writing
    /// (close-on-exec): writing `0` to each moves the writer there. The
    /// kernel checks a move against the opener's credentials and cgroup
    /// namespace, so these work for whoever holds them after host root
    /// opened them; hand them only to what may choose its place.
    pub fn procs(&self, place: Place) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|dir| {
                let path = place.dir(dir).join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|source| CgroupError::Open { path, source })
            })
            .collect()
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Err(err) = remove_sandbox(dir) {
                warn(&format!("cannot remove cgroup {}: {err}", dir.display()));
            }
        }
    }
}

/// Removes a sandbox's cgroup directory: its leaves (killing what is left
/// in them), then the directory itself.
fn remove_sandbox(dir: &Path) -> io::Result<()> {
    for leaf in Place::LEAVES.iter().rev() {
        match remove(&leaf.dir(dir)) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    remove(dir)
}

/// Checks that `path` really is on a cgroup filesystem of that version.
fn check_fs(path: &Path, v2: bool) -> Result<(), CgroupError> {
    let magic = sys::fs_magic(path).map_err(|source| CgroupError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    let expected = if v2 {
        libc::CGROUP2_SUPER_MAGIC
    } else {
        libc::CGROUP_SUPER_MAGIC
    };
    if magic == expected {
        Ok(())
    } else {
        Err(CgroupError::NotCgroupFs {
            path: path.to_owned(),
            magic,
        })
    }
}

fn create_v1(
    config: &LaunchConfig,
    mounts: &[(Controller, PathBuf)],
    under: &Path,
) -> Result<Cgroups, CgroupError> {
    let dirs = plan::v1_dirs(mounts, config).map_err(|controller| CgroupError::V1NotMounted {
        controller,
        under: under.to_owned(),
    })?;
    for (_, mount) in mounts {
        check_fs(mount, false)?;
    }
    let writes = plan::v1_writes(config);
    // Pushed as they are made, so a failure half-way removes the rest.
    let mut cgroups = Cgroups { dirs: Vec::new() };
    for (controller, dir) in dirs {
        fresh_dir(&dir)?;
        cgroups.dirs.push(dir.clone());
        make_leaves(&dir)?;
        apply(&dir, writes.iter().filter(|w| w.controller == controller))?;
    }
    Ok(cgroups)
}

fn create_v2(
    config: &LaunchConfig,
    mount_point: &Path,
    mount_root: &Path,
) -> Result<Cgroups, CgroupError> {
    let own = plan::own_v2_cgroup(&read(Path::new(PROC_SELF_CGROUP))?).ok_or(
        CgroupError::NoOwnCgroup {
            path: PROC_SELF_CGROUP,
        },
    )?;
    let base = plan::v2_base(mount_point, mount_root, &own).map_err(|plan::OutsideMount| {
        CgroupError::OutsideMount {
            cgroup: own.clone(),
            mount_point: mount_point.to_owned(),
            root: mount_root.to_owned(),
        }
    })?;
    check_fs(mount_point, true)?;
    let needed = plan::required(config);
    let available = read(&base.join("cgroup.controllers"))?;
    if let Some(controller) = plan::first_missing(&needed, &available) {
        return Err(CgroupError::V2NotDelegated {
            controller,
            cgroup: base,
            available: available.trim().to_owned(),
        });
    }
    enable(&base, &needed, true)?;
    let sandboxes = base.join(plan::SANDBOXES);
    fs::create_dir_all(&sandboxes).map_err(|source| CgroupError::Create {
        path: sandboxes.clone(),
        source,
    })?;
    // Nothing ever runs in `openshell/` itself, so this never needs a move.
    enable(&sandboxes, &needed, false)?;

    let dir = sandboxes.join(&config.sandbox_id);
    fresh_dir(&dir)?;
    let cgroups = Cgroups {
        dirs: vec![dir.clone()],
    };
    // The sandbox's directory never holds a process either: its leaves do.
    enable(&dir, &needed, false)?;
    make_leaves(&dir)?;
    apply(&dir, plan::v2_writes(config).iter())?;
    Ok(cgroups)
}

/// Enables `needed` in `dir`'s `cgroup.subtree_control`. The kernel refuses
/// (EBUSY) while `dir` has processes of its own, unless it is the root; with
/// `move_processes`, they are moved into the [`plan::GATEWAY_LEAF`] and the
/// write retried until it sticks (the gateway may fork meanwhile).
fn enable(
    dir: &Path,
    needed: &BTreeSet<Controller>,
    move_processes: bool,
) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    let Some(line) = plan::enable_line(needed, &read(&control)?) else {
        return Ok(());
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        match fs::write(&control, &line) {
            Ok(()) => return Ok(()),
            Err(err)
                if err.raw_os_error() == Some(libc::EBUSY)
                    && move_processes
                    && Instant::now() < deadline =>
            {
                let leaf = dir.join(plan::GATEWAY_LEAF);
                fs::create_dir_all(&leaf).map_err(|source| CgroupError::Create {
                    path: leaf.clone(),
                    source,
                })?;
                for pid in pids(dir)? {
                    match move_process(pid, &leaf) {
                        // It exited meanwhile.
                        Err(CgroupError::Move { source, .. })
                            if source.raw_os_error() == Some(libc::ESRCH) => {}
                        other => other?,
                    }
                }
            }
            Err(source) => {
                return Err(CgroupError::Write {
                    path: control,
                    value: line,
                    source,
                });
            }
        }
    }
}

fn make_leaves(dir: &Path) -> Result<(), CgroupError> {
    for leaf in Place::LEAVES {
        let path = leaf.dir(dir);
        fs::create_dir(&path).map_err(|source| CgroupError::Create { path, source })?;
    }
    Ok(())
}

/// Creates `dir`, first removing one a SIGKILLed launcher left (whatever is
/// still in it belongs to a sandbox that is already gone).
fn fresh_dir(dir: &Path) -> Result<(), CgroupError> {
    if dir.exists() {
        remove_sandbox(dir).map_err(|source| CgroupError::RemoveStale {
            path: dir.to_owned(),
            source,
        })?;
    }
    fs::create_dir_all(dir).map_err(|source| CgroupError::Create {
        path: dir.to_owned(),
        source,
    })
}

fn apply<'a>(dir: &Path, writes: impl Iterator<Item = &'a LimitWrite>) -> Result<(), CgroupError> {
    for limit in writes {
        let file = limit.place.dir(dir).join(limit.file);
        if limit.optional && !file.exists() {
            continue;
        }
        fs::write(&file, &limit.value).map_err(|source| CgroupError::Write {
            path: file,
            value: limit.value.clone(),
            source,
        })?;
    }
    Ok(())
}

fn move_process(pid: i32, dir: &Path) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Move {
        pid,
        path: procs,
        source,
    })
}

fn pids(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let procs = read(&dir.join("cgroup.procs"))?;
    Ok(procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// SIGKILLs every task left in `dir` until it is empty, then removes it.
fn remove(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
        for pid in procs.lines().filter_map(|line| line.trim().parse().ok()) {
            // ESRCH just means it died on its own meanwhile.
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(err) => return Err(err),
        }
    }
}
