//! Every libkrun call, the fork and the wait: all of the launcher's
//! `unsafe` is here.
//!
//! The process chain is gateway → launcher (this process, supervising) →
//! VM (the forked child inside `krun_start_enter`), each dying with its
//! parent. No vsock device is configured: with a network device libkrun's
//! implicit vsock would carry no TSI anyway, and disabling it outright
//! leaves the guest exactly one way out, the virtio-net device on gvproxy
//! (whose confinement is what criterion 5 of the VM issue checks). No
//! `krun_add_vsock(ctx, 0)` either: nothing in the guest uses vsock.

use std::ffi::{CStr, CString, OsStr};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;

use anyhow::{Context, bail};
// nix does not wrap dlopen; its libc re-export keeps nix the one OS crate here.
use nix::libc;
use nix::sys::prctl;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, getppid};
use openshell_vm::krun::{KrunLaunch, NET_FEATURES, NET_FLAGS};

use crate::LAUNCH_FAILED;
use crate::preflight::LIBKRUNFW;

/// libkrun reads `krun_set_exec`'s argv and envp as slices of this many
/// pointers (stopping at the first null), so the arrays we pass are this
/// long: every pointer it may look at is ours.
const KRUN_MAX_ARGS: usize = 4096;
/// `krun_init_log`: to stderr (the launcher's log file), warnings and
/// worse unless `RUST_LOG` says otherwise, no colour.
const LOG_TO_STDERR: i32 = 2;
const LOG_LEVEL_WARN: u32 = 2;
const LOG_STYLE_NEVER: u32 = 2;
const LOG_OPTIONS_READ_ENV: u32 = 0;

/// Signals the launcher holds and handles itself: SIGTERM and SIGINT are
/// forwarded to the VM, SIGCHLD says the VM is gone.
fn held() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    set
}

/// SIGKILL when the gateway dies; fails if it already has.
pub fn die_with_parent() -> anyhow::Result<()> {
    let parent = getppid();
    prctl::set_pdeathsig(Signal::SIGKILL).context("cannot set the parent-death signal")?;
    if getppid() != parent {
        bail!("the gateway exited before the launch");
    }
    Ok(())
}

/// Blocks the [`held`] signals so [`supervise`] can wait for them.
pub fn hold_signals() -> anyhow::Result<()> {
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&held()), None)
        .context("cannot block SIGTERM, SIGINT and SIGCHLD")
}

fn krun_ok(what: &str, ret: i32) -> anyhow::Result<()> {
    if ret < 0 {
        return Err(std::io::Error::from_raw_os_error(-ret)).context(format!("{what} failed"));
    }
    Ok(())
}

fn cstring(what: &str, s: impl AsRef<OsStr>) -> anyhow::Result<CString> {
    CString::new(s.as_ref().as_bytes()).with_context(|| format!("{what} contains a NUL byte"))
}

/// Loads `libkrunfw.so.5` from the configured directory. libkrun later
/// `dlopen`s it by bare name; the dynamic loader matches that against the
/// already-loaded library's SONAME, so no `LD_LIBRARY_PATH` is needed (and
/// one set by the caller cannot substitute another guest kernel).
fn preload_libkrunfw(launch: &KrunLaunch) -> anyhow::Result<()> {
    let path = launch.libkrunfw_dir.join(LIBKRUNFW);
    let c_path = cstring("the libkrunfw path", &path)?;
    let soname = cstring("the libkrunfw name", LIBKRUNFW)?;
    #[allow(unsafe_code, reason = "dlopen is a C function")]
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the
    // call. The handle is deliberately never closed: the library must stay
    // loaded for the life of the VM.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        bail!("cannot load {}: {}", path.display(), dl_error());
    }
    #[allow(unsafe_code, reason = "dlopen is a C function")]
    // SAFETY: as above; RTLD_NOLOAD only looks the name up among loaded
    // libraries and takes one more reference, which is never dropped.
    let by_name = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if by_name != handle {
        bail!(
            "{} does not answer to its name {LIBKRUNFW} (wrong SONAME?)",
            path.display()
        );
    }
    Ok(())
}

fn dl_error() -> String {
    #[allow(unsafe_code, reason = "dlerror is a C function")]
    // SAFETY: dlerror returns null or a NUL-terminated string valid until
    // the next dl* call on this thread; it is copied out at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

/// Configures one libkrun context from a validated launch, in the order
/// libkrun documents, and returns its id.
pub fn configure(launch: &KrunLaunch) -> anyhow::Result<u32> {
    preload_libkrunfw(launch)?;
    let root = cstring("root", &launch.root)?;
    let workdir = cstring("workdir", &launch.workdir)?;
    let socket = cstring("net_socket", &launch.net_socket)?;
    let console = cstring("console", &launch.console)?;
    let exec = cstring("exec", &launch.exec)?;
    let env = launch
        .envp()
        .into_iter()
        .map(|kv| cstring("an environment entry", kv))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if env.len() >= KRUN_MAX_ARGS {
        bail!("{} environment entries: libkrun reads fewer", env.len());
    }
    // Never a null envp: libkrun would then pass the launcher's own
    // environment to the guest.
    let mut envp: Vec<*const c_char> = vec![std::ptr::null(); KRUN_MAX_ARGS];
    for (slot, kv) in envp.iter_mut().zip(&env) {
        *slot = kv.as_ptr();
    }

    #[allow(unsafe_code, reason = "libkrun's log set-up is an unsafe FFI function")]
    // SAFETY: fd 2 is stderr, which libkrun maps to its own Stderr target
    // without taking ownership of a descriptor; called once per process.
    let ret = unsafe {
        krun::krun_init_log(
            LOG_TO_STDERR,
            LOG_LEVEL_WARN,
            LOG_STYLE_NEVER,
            LOG_OPTIONS_READ_ENV,
        )
    };
    krun_ok("krun_init_log", ret)?;
    let ret = krun::krun_create_ctx();
    krun_ok("krun_create_ctx", ret)?;
    let ctx = ret as u32;
    krun_ok(
        "krun_set_vm_config",
        krun::krun_set_vm_config(ctx, launch.vcpus, launch.memory_mib),
    )?;
    #[allow(unsafe_code, reason = "libkrun's configuration calls take C strings")]
    // SAFETY: every pointer comes from a CString (or the MAC array) that
    // lives until the end of this function; libkrun copies what it keeps
    // (it reads each string with CStr::from_ptr and stores an owned
    // String). `envp` holds KRUN_MAX_ARGS pointers, null after the last
    // entry, so the slice libkrun builds over it is all ours. A null argv
    // means no arguments.
    unsafe {
        krun_ok("krun_set_root", krun::krun_set_root(ctx, root.as_ptr()))?;
        krun_ok(
            "krun_set_workdir",
            krun::krun_set_workdir(ctx, workdir.as_ptr()),
        )?;
        krun_ok(
            "krun_disable_implicit_vsock",
            krun::krun_disable_implicit_vsock(ctx),
        )?;
        krun_ok(
            "krun_add_net_unixstream",
            krun::krun_add_net_unixstream(
                ctx,
                socket.as_ptr(),
                -1,
                launch.mac.as_ptr(),
                NET_FEATURES,
                NET_FLAGS,
            ),
        )?;
        krun_ok(
            "krun_set_console_output",
            krun::krun_set_console_output(ctx, console.as_ptr()),
        )?;
        krun_ok(
            "krun_set_exec",
            krun::krun_set_exec(ctx, exec.as_ptr(), std::ptr::null(), envp.as_ptr()),
        )?;
    }
    Ok(ctx)
}

/// Forks: the child becomes the VM, this process supervises it and
/// returns its status.
pub fn run(ctx: u32) -> anyhow::Result<u8> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    if threads != 1 {
        bail!("the launcher has {threads} threads before fork; it must have one");
    }
    let launcher = getpid();
    #[allow(unsafe_code, reason = "fork")]
    // SAFETY: the process has exactly one thread (checked above), so the
    // child inherits no lock held by another thread and may allocate.
    match unsafe { fork() }.context("cannot fork the VM process")? {
        ForkResult::Child => enter(ctx, launcher),
        ForkResult::Parent { child } => supervise(child),
    }
}

/// The child: dies with the launcher, then becomes the VM.
fn enter(ctx: u32, launcher: Pid) -> ! {
    if prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != launcher {
        std::process::exit(i32::from(LAUNCH_FAILED));
    }
    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&held()), None);
    // Returns only if the VM could not start; on success the guest's exit
    // ends this process with the guest's exit code.
    let ret = krun::krun_start_enter(ctx);
    eprintln!(
        "openshell-krun-launch: krun_start_enter failed: {}",
        std::io::Error::from_raw_os_error(-ret)
    );
    std::process::exit(i32::from(LAUNCH_FAILED))
}

/// Forwards SIGTERM and SIGINT to the VM until it exits.
fn supervise(vm: Pid) -> anyhow::Result<u8> {
    let held = held();
    loop {
        match held.wait().context("cannot wait for signals")? {
            Signal::SIGCHLD => match waitpid(vm, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok((code & 0xff) as u8),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as u8),
                Ok(_) => {}
                Err(e) => return Err(e).context("cannot wait for the VM process"),
            },
            sig => {
                let _ = kill(vm, sig);
            }
        }
    }
}
