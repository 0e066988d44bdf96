//! Safe wrappers over the Linux calls that std does not offer.
//!
//! Every `unsafe` block of the crate is here, each a single libc call whose
//! arguments are built right next to it. The wrappers return `io::Result`
//! and take paths and strings, so the rest of the launcher reads as plain
//! Rust. Nothing here decides policy: which flags, which order and which
//! mounts live in `launch`, `inside` and `rootfs`.
#![allow(
    unsafe_code,
    reason = "the launcher drives namespaces, mounts and signals through raw libc calls"
)]

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use libc::{c_int, c_ulong};

fn check(ret: c_int) -> io::Result<c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| nul_error())
}

fn c_str(text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| nul_error())
}

fn nul_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "string contains a NUL byte")
}

/// The parent's pid (0 when the parent is outside our pid namespace).
pub fn parent_pid() -> i32 {
    // SAFETY: getppid takes no arguments and cannot fail.
    unsafe { libc::getppid() }
}

/// Asks the kernel to SIGKILL this process when the thread that forked it
/// dies. The setting is lost on fork and on any credential change, so every
/// process in the chain sets it itself, after its last `setresuid`.
pub fn die_with_parent() -> io::Result<()> {
    let sig = libc::SIGKILL as c_ulong;
    // SAFETY: PR_SET_PDEATHSIG reads only its integer argument.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) }).map(drop)
}

/// Which side of a fork or clone we are on.
pub enum Fork {
    Child,
    Parent(i32),
}

/// `clone(2)` with fork semantics plus `namespaces` (`CLONE_NEW*` flags).
///
/// The caller must be single-threaded: like `fork`, only the calling thread
/// is copied, and the child may allocate and take locks.
pub fn clone_into(namespaces: c_int) -> io::Result<Fork> {
    let flags = (namespaces | libc::SIGCHLD) as c_ulong;
    let null = 0 as c_ulong;
    // SAFETY: a raw clone with a null stack is what glibc's fork does: the
    // child gets a copy-on-write copy of the address space and resumes on its
    // copy of the stack. The tid pointers and TLS are unused (no CLONE_*TID or
    // CLONE_SETTLS flag). The launcher never starts threads, so no lock can be
    // held by a thread that does not exist in the child.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, null, null, null, null) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid as i32)),
    }
}

/// `fork(2)`; the caller must be single-threaded.
pub fn fork() -> io::Result<Fork> {
    // SAFETY: the callers (the sandbox's init) are single-threaded.
    match check(unsafe { libc::fork() })? {
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

/// A pipe whose ends close on exec: `(read, write)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// True if every write end of the pipe `fd` reads from is closed.
pub fn hung_up(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    check(unsafe { libc::poll(&mut poll, 1, 0) })?;
    Ok(poll.revents & libc::POLLHUP != 0)
}

/// Closes every descriptor from `first` up.
pub fn close_from(first: u32) -> io::Result<()> {
    close_range(first, 0)
}

/// Marks every descriptor from `first` up close-on-exec.
pub fn cloexec_from(first: u32) -> io::Result<()> {
    close_range(first, libc::CLOSE_RANGE_CLOEXEC)
}

fn close_range(first: u32, flags: u32) -> io::Result<()> {
    // SAFETY: close_range takes plain integers. Callers only close
    // descriptors that nothing in this process still owns (at start-up, or in
    // a child about to exec).
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, flags) };
    check(ret as c_int).map(drop)
}

/// Clears close-on-exec on `fd`, so the program inherits it.
pub fn keep_on_exec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor borrowed for this call.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) }).map(drop)
}

/// Writes all of `bytes` to `fd` with one write (cgroup files take a whole
/// value per write).
pub fn write_once(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: write from a live slice to a borrowed descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == bytes.len() => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
    }
}

/// Points stdin at `file` (dup2 onto descriptor 0).
pub fn replace_stdin(file: &std::fs::File) -> io::Result<()> {
    // SAFETY: dup2 takes two descriptors; `file` is open for this call's
    // duration and descriptor 0 is ours to replace.
    check(unsafe { libc::dup2(file.as_raw_fd(), 0) }).map(drop)
}

/// Moves the calling process into a new cgroup namespace rooted at its
/// current cgroups, so `/proc/self/cgroup` shows `/` instead of host paths.
pub fn unshare_cgroup_namespace() -> io::Result<()> {
    // SAFETY: unshare takes a flag set.
    check(unsafe { libc::unshare(libc::CLONE_NEWCGROUP) }).map(drop)
}

/// `mount(2)`.
pub fn mount(
    source: &Path,
    target: &Path,
    fstype: Option<&str>,
    flags: c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = c_path(source)?;
    let target = c_path(target)?;
    let fstype = fstype.map(c_str).transpose()?;
    let data = data.map(c_str).transpose()?;
    let fstype_ptr = fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    let data_ptr = data.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string alive for the call, or
    // null where mount accepts null.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype_ptr,
            flags,
            data_ptr.cast(),
        )
    })
    .map(drop)
}

/// The mount flags (`MS_*`) of the mount holding `path`, as `statvfs` reports
/// them. A user namespace may not clear the ones it inherited, so a remount
/// must repeat them.
pub fn mount_flags(path: &Path) -> io::Result<c_ulong> {
    let path = c_path(path)?;
    let mut stat = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is large enough for statvfs.
    check(unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) })?;
    // SAFETY: statvfs succeeded, so it filled in `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(ms_flags_from_statvfs(stat.f_flag))
}

/// The filesystem type (`statfs`'s `f_type` magic number) of the
/// filesystem holding `path`.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let path = c_path(path)?;
    let mut stat = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is large enough for statfs.
    check(unsafe { libc::statfs(path.as_ptr(), stat.as_mut_ptr()) })?;
    // SAFETY: statfs succeeded, so it filled in `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_type)
}

/// `ST_*` flags to the `MS_*` flags a remount has to carry over.
pub fn ms_flags_from_statvfs(st: c_ulong) -> c_ulong {
    const PAIRS: [(c_ulong, c_ulong); 7] = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    PAIRS
        .iter()
        .filter(|(st_flag, _)| st & st_flag != 0)
        .fold(0, |ms, (_, ms_flag)| ms | ms_flag)
}

/// `pivot_root(2)`.
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let new_root = c_path(new_root)?;
    let put_old = c_path(put_old)?;
    // SAFETY: both pointers are NUL-terminated strings alive for the call.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(ret as c_int).map(drop)
}

/// Lazily unmounts the topmost mount at `path` and everything under it.
pub fn detach(path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    // SAFETY: `path` is a NUL-terminated string alive for the call.
    check(unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

/// `sethostname(2)` in the current UTS namespace.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// Sets the file mode creation mask.
pub fn set_umask(mask: libc::mode_t) {
    // SAFETY: umask takes a plain integer and cannot fail.
    unsafe { libc::umask(mask) };
}

/// Opens the directory `name` directly in `dir`, never through a symlink
/// (the last component; `name` must be a single component).
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> io::Result<OwnedFd> {
    let name = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is a NUL-terminated string that outlives the call, and
    // `dir` is an open descriptor; the result is owned at once.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Becomes uid 0 / gid 0 of the current user namespace, with no
/// supplementary groups. The capabilities in the namespace are kept.
pub fn become_namespace_root() -> io::Result<()> {
    // SAFETY: setresgid, setgroups (with an empty list) and setresuid take
    // plain integers; a null list with a zero length is allowed.
    unsafe {
        check(libc::setresgid(0, 0, 0))?;
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresuid(0, 0, 0))?;
    }
    Ok(())
}

/// Sets `lo` up in the current network namespace.
pub fn bring_up_loopback() -> io::Result<()> {
    // SAFETY: socket takes plain integers; the descriptor is owned right away.
    let sock =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket succeeded, so `sock` is an open descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `req`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// `kill(2)`.
pub fn kill(pid: i32, signal: c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, signal) }).map(drop)
}

/// Waits until `pid` has exited but leaves it a zombie, so its pid cannot be
/// reused until [`reap`]: signals forwarded in between can't hit a stranger.
pub fn wait_exited(pid: i32) -> io::Result<()> {
    loop {
        let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: `info` is a writable siginfo_t; the other arguments are integers.
        let ret = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                info.as_mut_ptr(),
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        match check(ret) {
            Ok(_) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Reaps `pid` and returns its status as an exit code (128+N for signal N).
pub fn reap(pid: i32) -> io::Result<u8> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a writable int.
        match check(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) => return Ok(exit_code(status)),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Reaps any child: `(pid, exit code)`.
pub fn reap_any() -> io::Result<(i32, u8)> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a writable int.
        match check(unsafe { libc::waitpid(-1, &mut status, 0) }) {
            Ok(pid) => return Ok((pid, exit_code(status))),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
}

/// A wait status as a shell would report it: the exit code, or 128+N.
pub fn exit_code(status: c_int) -> u8 {
    if libc::WIFSIGNALED(status) {
        (128 + libc::WTERMSIG(status)) as u8
    } else {
        libc::WEXITSTATUS(status) as u8
    }
}

/// The signals the launcher and the sandbox's init pass on to their child.
const FORWARDED: [c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// Where [`forward`] sends signals; 0 before there is anyone to send to.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: c_int) {
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes plain integers.
        unsafe { libc::kill(pid, signal) };
    }
}

fn forwarded_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset takes valid signals.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for signal in FORWARDED {
            libc::sigaddset(set.as_mut_ptr(), signal);
        }
        set.assume_init()
    }
}

fn set_mask(how: c_int, set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: `set` is an initialised sigset; the old mask is not wanted.
    check(unsafe { libc::sigprocmask(how, set, std::ptr::null_mut()) }).map(drop)
}

/// Holds SIGTERM and SIGINT pending until [`forward_signals_to`] or
/// [`stop_forwarding`] decides what they mean. The mask is inherited by
/// clones and forks.
pub fn hold_forwarded_signals() -> io::Result<()> {
    set_mask(libc::SIG_BLOCK, &forwarded_set())
}

/// From now on SIGTERM and SIGINT (including any held) are sent on to `pid`.
pub fn forward_signals_to(pid: i32) -> io::Result<()> {
    FORWARD_TO.store(pid, Ordering::SeqCst);
    for signal in FORWARDED {
        // SAFETY: sigaction is plain old data; all zeroes is a valid value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = forward as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is initialised and `forward` only calls kill.
        check(unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) })?;
    }
    set_mask(libc::SIG_UNBLOCK, &forwarded_set())
}

/// Holds SIGTERM and SIGINT again and forgets the target.
pub fn stop_forwarding() -> io::Result<()> {
    set_mask(libc::SIG_BLOCK, &forwarded_set())?;
    FORWARD_TO.store(0, Ordering::SeqCst);
    Ok(())
}

/// Default dispositions and an empty mask, as a freshly exec'd program
/// expects (Rust itself ignores SIGPIPE, and exec keeps ignored signals).
pub fn reset_signals() -> io::Result<()> {
    // SAFETY: sigaction is plain old data; all zeroes is SIG_DFL, no flags.
    let default: libc::sigaction = unsafe { std::mem::zeroed() };
    for signal in 1..libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `default` is initialised. glibc refuses the two signals
        // it reserves for itself; those keep their state, which is fine.
        unsafe { libc::sigaction(signal, &default, std::ptr::null_mut()) };
    }
    let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set.
    let empty = unsafe {
        libc::sigemptyset(empty.as_mut_ptr());
        empty.assume_init()
    };
    set_mask(libc::SIG_SETMASK, &empty)
}

/// `unshare(2)` with `flags` (`CLONE_NEW*`).
pub fn unshare(flags: c_int) -> io::Result<()> {
    // SAFETY: unshare takes a flag set.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

/// Opens `path` with `O_PATH` (a handle for `*at` calls and
/// `/proc/self/fd` paths, not for I/O), never through a final symlink.
pub fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `path` is NUL-terminated and outlives the call; the result is
    // owned at once.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags) })?;
    // SAFETY: open just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct mount_attr` of `mount_setattr(2)` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = check(ret as c_int)?;
    // SAFETY: the call just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A detached copy of the mount tree at `path` whose files' ids are
/// mapped through `userns` (an idmapped mount), with `attrs` (read-only,
/// nosuid, nodev) set. Needs host root: idmapping a filesystem is a
/// privilege of its owning (initial) user namespace.
pub fn idmapped_tree(path: &Path, userns: BorrowedFd<'_>, attrs: u64) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let tree =
        owned(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: `tree` is an open mount descriptor, the empty path with
    // AT_EMPTY_PATH names it, and `attr` is a mount_attr of the size passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    } as c_int)?;
    Ok(tree)
}

/// Attaches the detached mount `tree` at `target`.
pub fn attach(tree: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    // SAFETY: `tree` is an open descriptor named by the empty path, and
    // `target` is NUL-terminated; both outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    } as c_int)
    .map(drop)
}

/// Attaches the detached mount `tree` on the directory `target` is open on.
pub fn attach_on(tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: both are open descriptors, each named by the empty path.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    } as c_int)
    .map(drop)
}

/// A detached overlayfs mount (new mount API): `options` are string
/// options in order (`lowerdir+` once per layer, `upperdir`, `workdir`),
/// `flags` flag options (`userxattr`), `attrs` the mount's `MOUNT_ATTR_*`.
pub fn overlay(options: &[(&str, &str)], flags: &[&str], attrs: u64) -> io::Result<OwnedFd> {
    // SAFETY: the name is NUL-terminated.
    let fs =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) })?;
    let config = |cmd: libc::c_uint, key: Option<&CStr>, value: Option<&CStr>| {
        let key = key.map_or(std::ptr::null(), CStr::as_ptr);
        let value = value.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: `fs` is an open filesystem context; key and value are
        // NUL-terminated strings (or null where the command takes none).
        check(
            unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, key, value, 0) }
                as c_int,
        )
    };
    for (key, value) in options {
        config(
            FSCONFIG_SET_STRING,
            Some(&c_str(key)?),
            Some(&c_str(value)?),
        )?;
    }
    for key in flags {
        config(FSCONFIG_SET_FLAG, Some(&c_str(key)?), None)?;
    }
    config(FSCONFIG_CMD_CREATE, None, None)?;
    // SAFETY: `fs` is a created filesystem context.
    owned(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })
}

/// `fchdir(2)`.
pub fn change_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fchdir takes an open descriptor.
    check(unsafe { libc::fchdir(dir.as_raw_fd()) }).map(drop)
}

/// `execve(2)`; returns only on failure.
pub fn exec(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut argv: Vec<*const libc::c_char> = argv.iter().map(|arg| arg.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp.iter().map(|var| var.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: `path` and every element are NUL-terminated strings that
    // outlive the call; both arrays end with a null pointer.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Exits at once: no destructors, no atexit handlers, no stdio flush. Used in
/// cloned and forked children, which must never run the launcher's cleanup.
pub fn exit_now(code: u8) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(c_int::from(code)) }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn locked_mount_flags_are_carried_over_from_statvfs() {
        let st = libc::ST_NOSUID | libc::ST_NODEV | libc::ST_RELATIME;
        assert_eq!(
            ms_flags_from_statvfs(st),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RELATIME
        );
        assert_eq!(ms_flags_from_statvfs(libc::ST_RDONLY), libc::MS_RDONLY);
        assert_eq!(ms_flags_from_statvfs(0), 0);
    }

    #[test]
    fn exit_codes_and_signal_deaths_read_like_a_shell_reports_them() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(libc::SIGKILL), 137);
        assert_eq!(exit_code(libc::SIGTERM | 0x80), 143, "core dump bit");
    }

    #[test]
    fn a_pipe_reports_hang_up_once_its_writer_is_gone() {
        let (read, write) = pipe().unwrap();
        assert!(!hung_up(read.as_fd()).unwrap());
        drop(write);
        assert!(hung_up(read.as_fd()).unwrap());
    }
}
