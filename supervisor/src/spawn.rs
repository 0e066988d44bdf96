//! Starting sandbox code: the one place that decides how a command runs,
//! whether it came from an exec relay or an SSH channel.
//!
//! A command runs in its own process group (so a timeout or a vanished
//! client kills the whole tree), as the sandbox's unprivileged uid with
//! `no_new_privs` and the system-call filter ([`crate::seccomp`]), with our
//! environment minus the secret, in /sandbox unless told otherwise. With a
//! pseudo-terminal, it leads a new session whose controlling terminal is the
//! pty, and its output arrives as one stream.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Config;

/// Why a command could not be started. Said to the client (bounded) as a
/// shell would, and reported as a shell's exit code ([`Self::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("no command given")]
    NoCommand,
    #[error("workdir {path} does not exist")]
    NoWorkdir { path: String },
    #[error("cannot open a pseudo-terminal")]
    Pty(#[source] nix::Error),
    #[error("cannot share the pseudo-terminal")]
    PtyClone(#[source] std::io::Error),
    #[error("no system-call filter for sandbox code")]
    Filter(#[source] &'static crate::seccomp::SeccompError),
    #[error("cannot run {program}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl SpawnError {
    /// The code a shell reports when it cannot run a command: 127 when
    /// something is not found, else 126.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NoWorkdir { .. } => 127,
            Self::Start { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 127,
            Self::NoCommand
            | Self::Pty(_)
            | Self::PtyClone(_)
            | Self::Filter(_)
            | Self::Start { .. } => 126,
        }
    }
}

/// The working directory when none is asked for.
pub const DEFAULT_WORKDIR: &str = "/sandbox";

/// What to run.
#[derive(Debug)]
pub struct Command {
    pub argv: Vec<OsString>,
    /// Added to the sandbox's environment (and overriding it).
    pub env: BTreeMap<String, String>,
    /// Absolute path; `None` means the sandbox's default (the image's
    /// `WorkingDir`, else [`DEFAULT_WORKDIR`]) if it exists.
    pub workdir: Option<String>,
    /// Run under a pseudo-terminal of this size.
    pub tty: Option<nix::pty::Winsize>,
}

/// Which stream a reader carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A started command.
pub struct Spawned {
    pub child: tokio::process::Child,
    pub stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub readers: Vec<(Stream, Box<dyn AsyncRead + Send + Unpin>)>,
    /// The pty master, for resizes; `None` without a terminal.
    pub master: Option<OwnedFd>,
    /// The process group (and, with a tty, session) the command leads.
    pub group: Option<Pid>,
}

/// A terminal size, clamped to what a pty accepts.
pub fn winsize(rows: u32, cols: u32) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: rows.clamp(1, 1000) as u16,
        ws_col: cols.clamp(1, 1000) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

nix::ioctl_write_ptr_bad!(set_winsize, nix::libc::TIOCSWINSZ, nix::pty::Winsize);

/// Resizes the terminal behind a pty master (the kernel tells the
/// foreground process group with SIGWINCH).
pub fn resize(master: &OwnedFd, ws: nix::pty::Winsize) {
    #[allow(unsafe_code, reason = "TIOCSWINSZ has no safe wrapper")]
    // SAFETY: `master` is an open pty master for the life of this call and
    // `ws` is a valid Winsize the kernel only reads.
    let _ = unsafe { set_winsize(master.as_raw_fd(), &ws) };
}

/// Kills a command's whole process tree.
pub fn kill_group(group: Option<Pid>) {
    if let Some(pg) = group {
        let _ = killpg(pg, Signal::SIGKILL);
    }
}

pub fn spawn(cfg: &Config, c: &Command) -> Result<Spawned, SpawnError> {
    let Some((program, args)) = c.argv.split_first() else {
        return Err(SpawnError::NoCommand);
    };
    // Compiled before the fork: the child may not allocate.
    let filter = crate::seccomp::program().map_err(SpawnError::Filter)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&cfg.child_env)
        .envs(&c.env)
        .kill_on_drop(true);
    let workdir = c.workdir.as_deref().unwrap_or(&cfg.workdir);
    if std::path::Path::new(workdir).is_dir() {
        cmd.current_dir(workdir);
    } else if c.workdir.is_some() {
        return Err(SpawnError::NoWorkdir {
            path: workdir.chars().take(200).collect(),
        });
    }
    // In an image's sandbox the ids are set in the nested namespace, after
    // joining it (below); std would set them before.
    let image = cfg.image.clone();
    if let (Some(uid), None) = (cfg.run_as, &image) {
        cmd.uid(uid).gid(uid);
    }
    let tty = c.tty.is_some();
    let workload = cfg.workload_cgroups.clone();
    let pty = match &c.tty {
        Some(ws) => Some(nix::pty::openpty(Some(ws), None).map_err(SpawnError::Pty)?),
        None => None,
    };
    let slave = |p: &nix::pty::OpenptyResult| p.slave.try_clone().map_err(SpawnError::PtyClone);
    if let Some(p) = &pty {
        cmd.stdin(slave(p)?).stdout(slave(p)?).stderr(slave(p)?);
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
    }
    #[allow(
        unsafe_code,
        reason = "session and privilege setup between fork and exec"
    )]
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (write, setns, setgroups, setres*id,
    // setsid, ioctl, prctl, seccomp); the filter was compiled before the
    // fork, and the namespace descriptor lives as long as the supervisor.
    unsafe {
        cmd.pre_exec(move || {
            // Into the limits before anything of the command runs; a move
            // that fails fails the command (it must not run unlimited).
            for &fd in &workload {
                if nix::libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(id) = &image {
                let ns = std::os::fd::BorrowedFd::borrow_raw(id.userns);
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWUSER)?;
                let (uid, gid) = (id.user.uid, id.user.gid);
                nix::unistd::setgroups(&[])?;
                let gid = nix::unistd::Gid::from_raw(gid);
                nix::unistd::setresgid(gid, gid, gid)?;
                let uid = nix::unistd::Uid::from_raw(uid);
                nix::unistd::setresuid(uid, uid, uid)?;
            }
            if tty {
                nix::unistd::setsid()?;
                if nix::libc::ioctl(0, nix::libc::TIOCSCTTY as _, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::sys::prctl::set_no_new_privs()?;
            // Last: the filter also applies to the exec that follows.
            crate::seccomp::install(filter)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| SpawnError::Start {
        program: program.to_string_lossy().chars().take(200).collect(),
        source,
    })?;
    // setsid or process_group(0) made the child the leader of its group.
    let group = child.id().map(|p| Pid::from_raw(p as i32));
    match pty {
        Some(p) => {
            drop(p.slave);
            let master = || p.master.try_clone().map_err(SpawnError::PtyClone);
            let read = std::fs::File::from(master()?);
            let write = std::fs::File::from(master()?);
            Ok(Spawned {
                child,
                stdin: Some(Box::new(tokio::fs::File::from_std(write))),
                readers: vec![(Stream::Stdout, Box::new(tokio::fs::File::from_std(read)))],
                master: Some(p.master),
                group,
            })
        }
        None => {
            for fd in [
                child.stdout.as_ref().map(|s| s.as_fd()),
                child.stderr.as_ref().map(|s| s.as_fd()),
            ]
            .into_iter()
            .flatten()
            {
                // A bigger pipe: a fast writer fills a whole output frame
                // between reads. Best effort (pipe-max-size may be lower).
                let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
            }
            Ok(Spawned {
                stdin: child.stdin.take().map(|s| Box::new(s) as _),
                readers: vec![
                    (
                        Stream::Stdout,
                        Box::new(child.stdout.take().expect("piped")) as _,
                    ),
                    (
                        Stream::Stderr,
                        Box::new(child.stderr.take().expect("piped")) as _,
                    ),
                ],
                child,
                master: None,
                group,
            })
        }
    }
}

/// Capacity of sandbox code's stdout and stderr pipes (the kernel's
/// default is 64 KiB; 1 MiB is what an unprivileged process may ask for).
const PIPE_SIZE: nix::libc::c_int = 1 << 20;

/// How a finished command is reported: its code, or 128+N for signal N.
pub fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(st) => st
            .code()
            .or_else(|| st.signal().map(|s| 128 + s))
            .unwrap_or(1),
        Err(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_sizes_are_clamped_to_what_a_pty_accepts() {
        let ws = winsize(0, 5000);
        assert_eq!((ws.ws_row, ws.ws_col), (1, 1000));
    }

    #[test]
    fn what_cannot_be_found_is_127_and_what_cannot_run_is_126() {
        let not_found = SpawnError::Start {
            program: "nope".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        let denied = SpawnError::Start {
            program: "x".into(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        };
        let no_dir = SpawnError::NoWorkdir { path: "/x".into() };
        let codes = [not_found, no_dir, denied, SpawnError::NoCommand].map(|e| e.exit_code());
        assert_eq!(codes, [127, 127, 126, 126]);
    }

    #[test]
    fn a_signal_death_is_reported_as_128_plus_the_signal() {
        use std::os::unix::process::ExitStatusExt;
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(exit_code(Ok(killed)), 137);
        let exited = std::process::ExitStatus::from_raw(5 << 8);
        assert_eq!(exit_code(Ok(exited)), 5);
    }
}
