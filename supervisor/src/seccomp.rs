//! The system-call filter every command in a sandbox runs under (issue 14):
//! what it refuses and why, in one place ([`REFUSED`] and [`rules`]).
//!
//! Sandbox code already runs without capabilities and with `no_new_privs`.
//! What an unprivileged process can still reach is a door to new privilege
//! (a nested user namespace grants every capability inside it, and with them
//! the kernel's namespace, netfilter and mount code) and kernel surface it
//! has no use for (eBPF, io_uring, keyrings, perf). The filter closes those
//! and allows everything else. A refused call fails with EPERM, `clone3`
//! with ENOSYS (so libc falls back to `clone`, whose flags a filter can
//! read); a refusal never kills the process, so programs that probe for a
//! feature carry on without it. Only a call through another architecture's
//! ABI (i386's `int 0x80`) kills, as [`prologue`] explains.
//!
//! The program is compiled once, before any fork ([`program`]; `main`
//! forces it at start so a bad rule stops the supervisor, not an exec), and
//! installed between fork and exec ([`install`]) with two system calls and
//! no allocation. The supervisor itself is not filtered.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use nix::libc;
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, sock_filter,
};

/// Why the filter could not be built. A bug in [`rules`], never the host's
/// fault: the unit tests build it.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot compile the sandbox's system-call filter")]
    Compile(#[source] BackendError),
}

/// What differs between the architectures the supervisor runs on.
#[cfg(target_arch = "x86_64")]
mod arch {
    pub const TARGET: seccompiler::TargetArch = seccompiler::TargetArch::x86_64;
    /// `AUDIT_ARCH_X86_64`: what `seccomp_data.arch` says for native calls.
    pub const AUDIT: u32 = 0xc000_003e;
    /// x32 calls share x86_64's audit arch and carry this bit in their
    /// number, so a rule by number would miss them.
    pub const X32_SYSCALL_BIT: Option<u32> = Some(0x4000_0000);
    pub const SYS_KEXEC_FILE_LOAD: i64 = nix::libc::SYS_kexec_file_load;
}

#[cfg(target_arch = "aarch64")]
mod arch {
    pub const TARGET: seccompiler::TargetArch = seccompiler::TargetArch::aarch64;
    /// `AUDIT_ARCH_AARCH64`.
    pub const AUDIT: u32 = 0xc000_00b7;
    pub const X32_SYSCALL_BIT: Option<u32> = None;
    /// The generic table's number; libc's aarch64 musl target lacks it.
    pub const SYS_KEXEC_FILE_LOAD: i64 = 294;
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the sandbox's seccomp filter is written for x86_64 and aarch64 only");

/// What a refused call returns.
const REFUSAL: u32 = libc::EPERM as u32;

/// Calls refused whatever their arguments, grouped by why. Each needs a
/// privilege sandbox code does not have, or is kernel surface it has no use
/// for; refusing by number keeps that code out of reach even where a
/// capability check has a bug (much of the kernel's recent privilege
/// escalation history runs through user namespaces, io_uring and eBPF).
const REFUSED: &[(&str, i64)] = &[
    // Joining another namespace (creating one is in `rules`).
    ("setns", libc::SYS_setns),
    // eBPF programs and maps: the verifier and JIT.
    ("bpf", libc::SYS_bpf),
    // io_uring: a second system-call interface that seccomp cannot see into.
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    // Kernel keyrings: kernel-held state outside the sandbox's namespaces,
    // with a record of reference-count bugs.
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("keyctl", libc::SYS_keyctl),
    // Kernel modules.
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    // Mounts, old and new API: the sandbox's root is the launcher's to build.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("fsconfig", libc::SYS_fsconfig),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    // Swap, quotas and process accounting: host-wide state.
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("acct", libc::SYS_acct),
    // Rebooting, or booting another kernel.
    ("reboot", libc::SYS_reboot),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", arch::SYS_KEXEC_FILE_LOAD),
    // Performance counters (also a side channel on the host's CPUs) and
    // userfaultfd (stalls kernel copies at will: an exploit's race widener).
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
];

/// The socket families sandbox code may open: local, IPv4, IPv6 and netlink
/// (route only, below). Packet, vsock, AF_ALG, AF_KEY, Bluetooth, TIPC and
/// the rest are refused: each is its own kernel protocol stack.
const FAMILIES: [i32; 4] = [
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// Refusals that depend on arguments. Arguments that are C `int`s are
/// compared on their low 32 bits, as the kernel reads them, so bits set
/// above cannot slip a value past a rule.
fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    use SeccompCmpOp::{Eq, MaskedEq, Ne};
    let arg =
        |index, op, value: u64| SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value);
    let when = |conditions| SeccompRule::new(conditions);

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
    // A new namespace of any kind. A user namespace grants every
    // capability inside it, and so the namespace, netfilter and mount code
    // behind them (`unshare -Urn`); sandbox code rooted in an image is root
    // of a nested user namespace already, where a new network or mount
    // namespace would be its own to configure. Flags are argument 0 of both
    // calls on x86_64 and aarch64, all in their low word. `clone3` passes
    // its flags in memory a filter cannot read, so it is refused outright,
    // with ENOSYS (see `prologue`). CLONE_NEWTIME shares its bit with
    // clone's exit signal, so only unshare is checked for it.
    let namespaces = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ];
    let any_of = |flags: &[libc::c_int]| {
        flags
            .iter()
            .map(|&f| when(vec![arg(0, MaskedEq(f as u64), f as u64)?]))
            .collect::<Result<Vec<_>, _>>()
    };
    rules.insert(libc::SYS_clone, any_of(&namespaces)?);
    let mut unshared = namespaces.to_vec();
    unshared.push(libc::CLONE_NEWTIME);
    rules.insert(libc::SYS_unshare, any_of(&unshared)?);
    // Tracing a process that did not ask for it: only a child that called
    // PTRACE_TRACEME can be traced (`gdb CMD` and `strace CMD` work,
    // `strace -p` and `gdb -p` do not).
    rules.insert(
        libc::SYS_ptrace,
        vec![
            when(vec![arg(0, Eq, libc::PTRACE_ATTACH as u64)?])?,
            when(vec![arg(0, Eq, libc::PTRACE_SEIZE as u64)?])?,
        ],
    );
    // Socket families beyond FAMILIES, and netlink beyond NETLINK_ROUTE
    // (glibc's resolver and getifaddrs use route; audit, netfilter,
    // generic, uevent and the rest are refused). socketpair: local only.
    let other_family = FAMILIES
        .iter()
        .map(|&f| arg(0, Ne, f as u64))
        .collect::<Result<Vec<_>, _>>()?;
    let netlink_not_route = vec![
        arg(0, Eq, libc::AF_NETLINK as u64)?,
        arg(2, Ne, libc::NETLINK_ROUTE as u64)?,
    ];
    rules.insert(
        libc::SYS_socket,
        vec![when(other_family)?, when(netlink_not_route)?],
    );
    rules.insert(
        libc::SYS_socketpair,
        vec![when(vec![arg(0, Ne, libc::AF_UNIX as u64)?])?],
    );
    Ok(rules)
}

/// Runs before seccompiler's program: what a rule by number cannot say.
/// For native calls, x32 calls (any number with the x32 bit) and `clone3`
/// fail with ENOSYS: libc then falls back to `clone`, which the rules can
/// read. Any other architecture falls through to seccompiler's check, which
/// kills the process: an i386 (`int 0x80`) or AArch32 call would otherwise
/// be read with the wrong numbers, and no sandbox program needs one.
fn prologue() -> Vec<sock_filter> {
    // Classic BPF opcodes (<linux/filter.h>): BPF_LD|BPF_W|BPF_ABS,
    // BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JGE|BPF_K, BPF_RET|BPF_K.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    const RET_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let op = |code, k, jt, jf| sock_filter { code, jt, jf, k };

    let mut nr_checks = Vec::new();
    if let Some(bit) = arch::X32_SYSCALL_BIT {
        nr_checks.push(op(JGE_K, bit, 0, 1));
        nr_checks.push(op(RET_K, RET_ENOSYS, 0, 0));
    }
    nr_checks.push(op(JEQ_K, libc::SYS_clone3 as u32, 0, 1));
    nr_checks.push(op(RET_K, RET_ENOSYS, 0, 0));

    // seccomp_data: `int nr` at 0, `u32 arch` at 4.
    let skip = u8::try_from(nr_checks.len() + 1).expect("a short prologue");
    let mut out = vec![
        op(LD_W_ABS, 4, 0, 0),
        op(JEQ_K, arch::AUDIT, 0, skip),
        op(LD_W_ABS, 0, 0, 0),
    ];
    out.extend(nr_checks);
    out
}

/// The program, with `errno` as what refused calls return (tests use an
/// errno no kernel path returns, to tell the filter's refusals from the
/// kernel's own).
fn compile(errno: u32) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules().map_err(SeccompError::Compile)?,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        arch::TARGET,
    )
    .map_err(SeccompError::Compile)?;
    let rest = BpfProgram::try_from(filter).map_err(SeccompError::Compile)?;
    let mut program = prologue();
    program.extend(rest);
    Ok(program)
}

static PROGRAM: LazyLock<Result<BpfProgram, SeccompError>> = LazyLock::new(|| compile(REFUSAL));

/// The compiled program for sandbox code, built on first use.
pub fn program() -> Result<&'static [sock_filter], &'static SeccompError> {
    PROGRAM.as_deref()
}

/// Installs `program` on the calling thread. Safe between fork and exec:
/// seccompiler 0.5's `apply_filter` makes two system calls (`prctl` for
/// `no_new_privs`, then `seccomp`) with a `sock_fprog` on the stack, and its
/// errors carry a raw OS code, so nothing is allocated.
pub fn install(program: &[sock_filter]) -> std::io::Result<()> {
    match seccompiler::apply_filter(program) {
        Ok(()) => Ok(()),
        Err(seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e)) => Err(e),
        Err(_) => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        unsafe_code,
        reason = "raw system calls in a forked child, to probe the filter"
    )]

    use std::io::Read;
    use std::os::fd::AsRawFd;

    use libc::c_long;
    use nix::errno::Errno;
    use nix::sys::wait::WaitStatus;

    use super::*;

    /// What refused calls return under the test program: an errno none of
    /// these calls returns by itself, so a refusal is the filter's, not the
    /// kernel's.
    const PROBE_ERRNO: i32 = libc::EHWPOISON;

    /// One raw system call and the errno it must give (0: success). Every
    /// argument is harmless should the call reach the kernel as root:
    /// invalid flags, -1 descriptors and pointers, or a new socket.
    struct Probe {
        name: &'static str,
        nr: c_long,
        args: [u64; 6],
        want: i32,
    }

    fn probe(name: &'static str, nr: c_long, args: &[u64], want: i32) -> Probe {
        let mut all = [u64::MAX; 6];
        all[..args.len()].copy_from_slice(args);
        Probe {
            name,
            nr,
            args: all,
            want,
        }
    }

    /// The errno of a raw system call, 0 if it succeeded.
    fn call(nr: c_long, a: [u64; 6]) -> i32 {
        let a = a.map(|v| v as c_long);
        // SAFETY: every argument is an integer, an invalid pointer the
        // kernel rejects with EFAULT, or a pointer to memory the caller
        // owns for the call; no probe maps, frees or moves memory.
        let ret = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
        if ret < 0 { Errno::last_raw() } else { 0 }
    }

    /// Forks; the child (only: the test binary is multi-threaded) installs
    /// `program`, runs `body`, which fills in errnos and says how many, and
    /// sends them through a pipe. Between fork and exit the child makes only
    /// raw system calls: no allocation, no lock.
    fn in_filtered_child(
        program: &[sock_filter],
        body: &dyn Fn(&mut [i32; 64]) -> usize,
    ) -> (WaitStatus, Vec<i32>) {
        // Close-on-exec: other tests' commands must not hold the write end.
        let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // SAFETY: the child runs only async-signal-safe code (see above)
        // and leaves with `_exit`, never returning into the harness.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let mut errnos = [0i32; 64];
                let code = match install(program) {
                    Ok(()) => {
                        let bytes = body(&mut errnos).min(errnos.len()) * size_of::<i32>();
                        // SAFETY: `errnos` holds at least `bytes` bytes.
                        let n =
                            unsafe { libc::write(tx.as_raw_fd(), errnos.as_ptr().cast(), bytes) };
                        if n == bytes as isize { 0 } else { 98 }
                    }
                    Err(_) => 99,
                };
                // SAFETY: ends the child without running the harness's
                // destructors or atexit handlers.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(tx);
                let mut bytes = Vec::new();
                std::fs::File::from(rx).read_to_end(&mut bytes).unwrap();
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                let errnos = bytes
                    .chunks_exact(size_of::<i32>())
                    .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
                    .collect();
                (status, errnos)
            }
        }
    }

    /// Runs `probes` under `program` and insists the child lived through
    /// them all and each gave the errno it should.
    fn check(program: &[sock_filter], probes: &[Probe]) {
        assert!(probes.len() <= 64, "the child reports at most 64 answers");
        let (status, errnos) = in_filtered_child(program, &|out| {
            for (slot, p) in out.iter_mut().zip(probes) {
                *slot = call(p.nr, p.args);
            }
            probes.len()
        });
        assert!(
            matches!(status, WaitStatus::Exited(_, 0)),
            "the child died: {status:?}"
        );
        assert_eq!(errnos.len(), probes.len());
        let show = |e: i32| match e {
            0 => "success".to_owned(),
            PROBE_ERRNO => "refused".to_owned(),
            e => format!("{}", Errno::from_raw(e)),
        };
        let wrong: Vec<_> = probes
            .iter()
            .zip(&errnos)
            .filter(|(p, e)| p.want != **e)
            .map(|(p, e)| format!("{}: {}, want {}", p.name, show(*e), show(p.want)))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    fn socket(name: &'static str, family: i32, protocol: i32, want: i32) -> Probe {
        let (family, raw) = (family as u64, libc::SOCK_RAW as u64);
        probe(
            name,
            libc::SYS_socket,
            &[family, raw, protocol as u64],
            want,
        )
    }

    #[test]
    fn every_refused_call_fails_with_the_filters_errno_and_the_process_lives_on() {
        let no = PROBE_ERRNO;
        let newuser = libc::CLONE_NEWUSER as u64;
        let high = 1u64 << 32;
        let (netlink, raw) = (libc::AF_NETLINK as u64, libc::SOCK_RAW as u64);
        let audit = libc::NETLINK_AUDIT as u64;
        let mut probes: Vec<Probe> = REFUSED
            .iter()
            .map(|&(name, nr)| probe(name, nr, &[], no))
            .collect();
        probes.extend([
            probe("unshare(NEWUSER)", libc::SYS_unshare, &[newuser], no),
            probe(
                "unshare(NEWUSER|NEWNET)",
                libc::SYS_unshare,
                &[newuser | libc::CLONE_NEWNET as u64],
                no,
            ),
            probe(
                "unshare(NEWUSER), high bits set",
                libc::SYS_unshare,
                &[high | newuser],
                no,
            ),
            // With CLONE_FS a clone that got through would be EINVAL.
            probe(
                "clone(NEWUSER)",
                libc::SYS_clone,
                &[newuser | libc::CLONE_FS as u64, 0, 0, 0, 0],
                no,
            ),
            probe(
                "ptrace(ATTACH)",
                libc::SYS_ptrace,
                &[libc::PTRACE_ATTACH as u64],
                no,
            ),
            probe(
                "ptrace(SEIZE)",
                libc::SYS_ptrace,
                &[libc::PTRACE_SEIZE as u64, u64::MAX, 0, 0],
                no,
            ),
            socket("socket(AF_PACKET)", libc::AF_PACKET, 0, no),
            socket("socket(AF_VSOCK)", libc::AF_VSOCK, 0, no),
            socket("socket(AF_ALG)", libc::AF_ALG, 0, no),
            socket("socket(AF_KEY)", libc::AF_KEY, 2, no),
            socket("socket(AF_BLUETOOTH)", libc::AF_BLUETOOTH, 0, no),
            socket(
                "socket(AF_NETLINK, AUDIT)",
                libc::AF_NETLINK,
                libc::NETLINK_AUDIT,
                no,
            ),
            socket(
                "socket(AF_NETLINK, NETFILTER)",
                libc::AF_NETLINK,
                libc::NETLINK_NETFILTER,
                no,
            ),
            socket(
                "socket(AF_NETLINK, GENERIC)",
                libc::AF_NETLINK,
                libc::NETLINK_GENERIC,
                no,
            ),
            probe(
                "socket(AF_NETLINK + 2^32, AUDIT)",
                libc::SYS_socket,
                &[high | netlink, raw, audit],
                no,
            ),
            probe(
                "socket(AF_NETLINK, AUDIT + 2^32)",
                libc::SYS_socket,
                &[netlink, raw, high | audit],
                no,
            ),
            probe(
                "socketpair(AF_INET)",
                libc::SYS_socketpair,
                &[libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
                no,
            ),
        ]);
        check(&compile(PROBE_ERRNO as u32).unwrap(), &probes);
    }

    #[test]
    fn what_sandbox_code_needs_reaches_the_kernel() {
        let stream = libc::SOCK_STREAM as u64;
        let mut pair = [0i32; 2];
        let pair = pair.as_mut_ptr() as u64;
        let probes = [
            probe(
                "socket(AF_UNIX)",
                libc::SYS_socket,
                &[libc::AF_UNIX as u64, stream, 0],
                0,
            ),
            probe(
                "socket(AF_INET)",
                libc::SYS_socket,
                &[libc::AF_INET as u64, stream, 0],
                0,
            ),
            probe(
                "socket(AF_INET6)",
                libc::SYS_socket,
                &[libc::AF_INET6 as u64, stream, 0],
                0,
            ),
            socket(
                "socket(AF_NETLINK, ROUTE)",
                libc::AF_NETLINK,
                libc::NETLINK_ROUTE,
                0,
            ),
            probe(
                "socketpair(AF_UNIX)",
                libc::SYS_socketpair,
                &[libc::AF_UNIX as u64, stream, 0, pair],
                0,
            ),
            probe(
                "unshare(FILES)",
                libc::SYS_unshare,
                &[libc::CLONE_FILES as u64],
                0,
            ),
            // Invalid flags without CLONE_NEWUSER: the kernel's EINVAL.
            probe(
                "clone(SIGHAND)",
                libc::SYS_clone,
                &[libc::CLONE_SIGHAND as u64, 0, 0, 0, 0],
                libc::EINVAL,
            ),
            probe(
                "ptrace(PEEKDATA, -1)",
                libc::SYS_ptrace,
                &[libc::PTRACE_PEEKDATA as u64],
                libc::ESRCH,
            ),
            probe(
                "seccomp(GET_ACTION_AVAIL)",
                libc::SYS_seccomp,
                &[2, 0, u64::MAX],
                libc::EFAULT,
            ),
        ];
        check(&compile(PROBE_ERRNO as u32).unwrap(), &probes);
    }

    #[test]
    fn sandbox_code_gets_eperm_for_a_user_namespace_and_enosys_for_clone3() {
        // Unfiltered, a child here may make a user namespace (success),
        // clone3 with no arguments is EFAULT or EINVAL, and a socketpair of
        // inet sockets is EOPNOTSUPP.
        let newuser = libc::CLONE_NEWUSER as u64;
        let mut probes = vec![
            probe(
                "unshare(NEWUSER)",
                libc::SYS_unshare,
                &[newuser],
                libc::EPERM,
            ),
            probe("clone3", libc::SYS_clone3, &[0, 0], libc::ENOSYS),
            probe(
                "socketpair(AF_INET)",
                libc::SYS_socketpair,
                &[libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
                libc::EPERM,
            ),
        ];
        if let Some(bit) = arch::X32_SYSCALL_BIT {
            let nr = libc::SYS_getpid | c_long::from(bit);
            probes.push(probe("x32 getpid", nr, &[], libc::ENOSYS));
        }
        check(program().unwrap(), &probes);
    }

    /// An i386 call from a 64-bit process would be read with the wrong
    /// numbers (i386's 310 is not x86_64's 310), so seccompiler's arch check
    /// kills the process. On a kernel without the i386 ABI, `int 0x80` is
    /// SIGSEGV before any filter runs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn an_i386_system_call_kills_the_process_rather_than_pass_the_filter() {
        use nix::sys::signal::Signal;
        let (status, _) = in_filtered_child(program().unwrap(), &|_| {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setrlimit reads the struct on our stack. `int 0x80`
            // with eax=20 is i386 getpid: no arguments, no memory touched;
            // eax is its only output.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                std::arch::asm!("int 0x80", inout("eax") 20u32 => _, options(nostack));
            }
            0
        });
        assert!(
            matches!(
                status,
                WaitStatus::Signaled(_, Signal::SIGSYS | Signal::SIGSEGV, _)
            ),
            "{status:?}"
        );
    }
}
