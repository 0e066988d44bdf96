//! Starting sandbox code: the one place that decides how a command runs,
//! whether it came from an exec relay or an SSH channel.
//!
//! A command runs in its own process group (so a timeout or a vanished
//! client kills the whole tree), as the sandbox's unprivileged uid with
//! `no_new_privs`, with our environment minus the secret, in /sandbox unless
//! told otherwise. With a pseudo-terminal, it leads a new session whose
//! controlling terminal is the pty, and its output arrives as one stream.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Config;

/// The working directory when none is asked for.
pub const DEFAULT_WORKDIR: &str = "/sandbox";

/// What to run.
#[derive(Debug)]
pub struct Command {
    pub argv: Vec<OsString>,
    /// Added to the sandbox's environment (and overriding it).
    pub env: BTreeMap<String, String>,
    /// Absolute path; `None` means [`DEFAULT_WORKDIR`] if it exists.
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

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, nix::pty::Winsize);

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

pub fn spawn(cfg: &Config, c: &Command) -> std::io::Result<Spawned> {
    let Some((program, args)) = c.argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no command",
        ));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&cfg.child_env)
        .envs(&c.env)
        .kill_on_drop(true);
    let workdir = c.workdir.as_deref().unwrap_or(DEFAULT_WORKDIR);
    if std::path::Path::new(workdir).is_dir() {
        cmd.current_dir(workdir);
    } else if c.workdir.is_some() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("workdir {workdir} does not exist"),
        ));
    }
    if let Some(uid) = cfg.run_as {
        cmd.uid(uid).gid(uid);
    }
    let tty = c.tty.is_some();
    let pty = match &c.tty {
        Some(ws) => Some(nix::pty::openpty(Some(ws), None)?),
        None => None,
    };
    if let Some(p) = &pty {
        cmd.stdin(p.slave.try_clone()?)
            .stdout(p.slave.try_clone()?)
            .stderr(p.slave.try_clone()?);
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
    // only async-signal-safe functions (setsid, ioctl, prctl).
    unsafe {
        cmd.pre_exec(move || {
            if tty {
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::sys::prctl::set_no_new_privs()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // setsid or process_group(0) made the child the leader of its group.
    let group = child.id().map(|p| Pid::from_raw(p as i32));
    match pty {
        Some(p) => {
            drop(p.slave);
            let read = std::fs::File::from(p.master.try_clone()?);
            let write = std::fs::File::from(p.master.try_clone()?);
            Ok(Spawned {
                child,
                stdin: Some(Box::new(tokio::fs::File::from_std(write))),
                readers: vec![(Stream::Stdout, Box::new(tokio::fs::File::from_std(read)))],
                master: Some(p.master),
                group,
            })
        }
        None => Ok(Spawned {
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
        }),
    }
}

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

/// The code a shell reports when it cannot run a command.
pub fn spawn_failure_code(e: &std::io::Error) -> i32 {
    if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
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
    fn a_signal_death_is_reported_as_128_plus_the_signal() {
        use std::os::unix::process::ExitStatusExt;
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(exit_code(Ok(killed)), 137);
        let exited = std::process::ExitStatus::from_raw(5 << 8);
        assert_eq!(exit_code(Ok(exited)), 5);
    }
}
