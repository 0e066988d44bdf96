//! The sandbox's init: PID 1 of the new namespaces, and the program's parent.
//!
//! Init starts as a clone of the launcher with every capability, but only in
//! its new user namespace, and still with host root's uid for file access.
//! [`init`] runs the steps in an order that each depends on:
//!
//! 1. wait for *go* (the launcher has written the id maps and moved init
//!    into the `workload` cgroups), then root a cgroup namespace there, and
//!    for a supervised launch move into the `supervisor` cgroups;
//! 2. while file access is still host root's, open the bind sources and
//!    mount the new root's tmpfs, or for an image root attach the layers
//!    the launcher idmapped and open what overlayfs needs (paths under
//!    root-only 0700 directories are reachable only now);
//! 3. become uid 0 of the namespace (host `uid_base`): from here on the host
//!    sees an unprivileged user;
//! 4. mount an image root's overlay (as the sandbox's root, so overlayfs
//!    works with no more privilege than that), build the root, pivot into
//!    it, set the hostname, bring up `lo`;
//! 5. fork the program (PID 2) and exec it, then reap children until it
//!    exits, forwarding SIGTERM and SIGINT to it meanwhile.
//!
//! Init exits with the program's status (128+N for signal N), which takes
//! the whole pid namespace down with it. A failure before the exec is written
//! on the report pipe, and init exits 125.
//!
//! Init never execs, so its memory stays owned by the host user namespace
//! and the sandbox's root cannot ptrace it or read `/proc/1/exe`.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};

use crate::config::LaunchConfig;
use crate::error::{LAUNCH_FAILED, LaunchError, one_line, os};
use crate::rootfs;
use crate::sys::{self, Fork};

/// The program's `execve` arguments, built before the clone.
#[derive(Debug)]
pub struct Exec {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

/// For a supervised launch: `cgroup.procs` of the sandbox's `supervisor`
/// cgroups, which init moves itself into, and of its `workload` cgroups,
/// which the program inherits ([`crate::config::WORKLOAD_FDS_ENV`]).
#[derive(Debug, Default)]
pub struct Handoff {
    pub supervisor: Vec<OwnedFd>,
    pub workload: Vec<OwnedFd>,
}

impl Exec {
    /// `workload` are the descriptors the program inherits, named in its
    /// environment.
    pub fn new(config: &LaunchConfig, workload: &[OwnedFd]) -> Result<Exec, LaunchError> {
        let nul = |_| LaunchError::Host("a config string contains a NUL byte".into());
        let path = config.program_inside();
        let path = CString::new(path.into_os_string().into_encoded_bytes()).map_err(nul)?;
        let mut argv = vec![path.clone()];
        for arg in &config.args {
            argv.push(CString::new(arg.as_str()).map_err(nul)?);
        }
        let mut envp: Vec<CString> = config
            .env
            .iter()
            .filter(|(name, _)| name != crate::config::WORKLOAD_FDS_ENV)
            .map(|(name, value)| CString::new(format!("{name}={value}")).map_err(nul))
            .collect::<Result<_, _>>()?;
        if !workload.is_empty() {
            let fds: Vec<String> = workload
                .iter()
                .map(|fd| fd.as_raw_fd().to_string())
                .collect();
            let entry = format!("{}={}", crate::config::WORKLOAD_FDS_ENV, fds.join(","));
            envp.push(CString::new(entry).map_err(nul)?);
        }
        Ok(Exec { path, argv, envp })
    }
}

/// Runs init in the freshly cloned child. Never returns: a clone of the
/// launcher must not run the launcher's cleanup.
pub fn init(
    config: &LaunchConfig,
    exec: &Exec,
    handoff: Handoff,
    layers: Vec<OwnedFd>,
    go: OwnedFd,
    report: OwnedFd,
) -> ! {
    let started = panic::catch_unwind(AssertUnwindSafe(|| {
        start(config, exec, handoff, layers, go, &report)
    }));
    let status = match started {
        Ok(Ok(program)) => {
            drop(report);
            wait_for(program)
        }
        Ok(Err(err)) => {
            // If the launcher is gone this fails with EPIPE; nobody is left
            // to tell.
            let _ = File::from(report).write_all(one_line(&err).as_bytes());
            LAUNCH_FAILED
        }
        // The panic message is already on stderr.
        Err(_) => LAUNCH_FAILED,
    };
    sys::exit_now(status)
}

/// Steps 1 to 5; returns the program's pid.
fn start(
    config: &LaunchConfig,
    exec: &Exec,
    handoff: Handoff,
    layers: Vec<OwnedFd>,
    go: OwnedFd,
    report: &OwnedFd,
) -> Result<i32, LaunchError> {
    sys::die_with_parent().map_err(os("cannot set the parent-death signal"))?;
    sys::set_umask(0o022);
    let mut go = File::from(go);
    let mut byte = [0];
    if go.read(&mut byte).map_err(os("cannot read the go pipe"))? == 0 {
        return Err(launcher_gone());
    }
    // Init is in the sandbox's workload cgroups now: root a cgroup
    // namespace there, so no host cgroup path shows inside and sandbox code
    // sees its own cgroup as `/`.
    sys::unshare_cgroup_namespace().map_err(os("cannot make a cgroup namespace"))?;
    // A supervised init and the program it becomes the parent of live
    // beside the workload, outside its limits (issue 14 item 7).
    for procs in handoff.supervisor {
        sys::write_once(procs.as_fd(), b"0")
            .map_err(os("cannot move into the supervisor's cgroup"))?;
    }
    let workload = handoff.workload;

    let sources = rootfs::Sources::open(config)?;
    let image = match &config.image {
        Some(image) => Some(rootfs::ImageMounts::attach(config, image, layers)?),
        None => {
            rootfs::mount_new_root(&config.new_root())?;
            None
        }
    };

    sys::become_namespace_root().map_err(os("cannot become root of the user namespace"))?;
    // Changing credentials cleared the parent-death signal. Set it again,
    // then check the launcher did not die in the gap: its end of the go
    // pipe stays open for as long as it lives.
    sys::die_with_parent().map_err(os("cannot set the parent-death signal"))?;
    if sys::hung_up(go.as_fd()).map_err(os("cannot poll the go pipe"))? {
        return Err(launcher_gone());
    }
    drop(go);

    if let Some(image) = image {
        image.mount()?;
    }
    rootfs::populate(config, &sources)?;
    drop(sources);
    rootfs::enter()?;
    sys::set_hostname(&config.hostname).map_err(os("cannot set the hostname"))?;
    if config.isolate_network {
        sys::bring_up_loopback().map_err(os("cannot bring up lo"))?;
    }

    let program = match sys::fork().map_err(os("cannot fork the program"))? {
        Fork::Child => exec_program(exec, &workload, report),
        Fork::Parent(pid) => pid,
    };
    sys::forward_signals_to(program).map_err(os("cannot install signal forwarding"))?;
    Ok(program)
}

fn launcher_gone() -> LaunchError {
    LaunchError::Host("the launcher exited before the sandbox started".into())
}

/// In the program's process: clean up what init had, then exec.
fn exec_program(exec: &Exec, workload: &[OwnedFd], report: &OwnedFd) -> ! {
    let err = match prepare_exec(workload) {
        Ok(()) => {
            let err = sys::exec(&exec.path, &exec.argv, &exec.envp);
            os(format!("cannot execute {:?}", exec.path))(err)
        }
        Err(err) => err,
    };
    if let Ok(report) = report.try_clone() {
        let _ = File::from(report).write_all(one_line(&err).as_bytes());
    }
    sys::exit_now(LAUNCH_FAILED)
}

fn prepare_exec(workload: &[OwnedFd]) -> Result<(), LaunchError> {
    sys::reset_signals().map_err(os("cannot reset signal handling"))?;
    sys::die_with_parent().map_err(os("cannot set the parent-death signal"))?;
    std::env::set_current_dir("/sandbox").map_err(os("cannot change directory to /sandbox"))?;
    // Only the report pipe and the workload descriptors should be open
    // here; this makes "nothing else leaks in" a local fact.
    sys::cloexec_from(3).map_err(os("cannot mark descriptors close-on-exec"))?;
    for fd in workload {
        sys::keep_on_exec(fd.as_fd()).map_err(os("cannot hand over the workload cgroup"))?;
    }
    Ok(())
}

/// Reaps children until the program exits; orphans reparented to init are
/// reaped along the way. Returns the program's status.
fn wait_for(program: i32) -> u8 {
    loop {
        match sys::reap_any() {
            Ok((pid, status)) if pid == program => return status,
            Ok(_) => continue,
            Err(_) => return LAUNCH_FAILED,
        }
    }
}
