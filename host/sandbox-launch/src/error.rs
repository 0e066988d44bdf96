//! The launcher's error type and the one line it becomes on stderr.

use std::error::Error;
use std::io;
use std::path::PathBuf;

use crate::cgroup::CgroupError;
use crate::config::ConfigError;

/// The exit status of a failed launch (the program's own statuses pass
/// through unchanged, so a program exiting 125 looks the same; the stderr line
/// tells them apart).
pub const LAUNCH_FAILED: u8 = 125;

/// The exit status of a launch refused because the sandbox's cgroups or
/// limits could not be set up: limits fail closed, never with a warning.
pub const CGROUP_FAILED: u8 = 123;

/// Prints a non-fatal problem on stderr.
pub fn warn(message: &str) {
    eprintln!("openshell-sandbox-launch: warning: {message}");
}

/// Why a launch failed (exit status [`LAUNCH_FAILED`]).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("usage: openshell-sandbox-launch --config <path.json> ({0})")]
    Usage(String),
    #[error("cannot read config {path:?}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid config {path:?}")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    /// A system call failed; `what` says which step, in the launcher's words.
    #[error("{what}")]
    Os {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The sandbox would run with less confinement than its config asks for.
    #[error("refusing to start the sandbox without its cgroup limits")]
    Cgroup(#[from] CgroupError),
    /// A precondition on the host that is not a system call failure.
    #[error("{0}")]
    Host(String),
    /// Setting up the inside failed; the sandbox's init reported this line
    /// over the error pipe before exiting.
    #[error("{0}")]
    Inside(String),
}

impl LaunchError {
    /// The launcher's exit status for this failure.
    pub fn exit_status(&self) -> u8 {
        match self {
            LaunchError::Cgroup(_) => CGROUP_FAILED,
            LaunchError::Usage(_)
            | LaunchError::ReadConfig { .. }
            | LaunchError::Config { .. }
            | LaunchError::Os { .. }
            | LaunchError::Host(_)
            | LaunchError::Inside(_) => LAUNCH_FAILED,
        }
    }
}

/// `result.map_err(os("cannot do X"))`: a failed system call, with context.
pub fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> LaunchError {
    move |source| LaunchError::Os {
        what: what.into(),
        source,
    }
}

/// An error and its causes joined by `: `, on one line.
pub fn one_line(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        line.push_str(": ");
        line.push_str(&err.to_string());
        cause = err.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_joins_the_cause_chain() {
        let err = os("cannot mount /usr")(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(
            one_line(&err),
            "cannot mount /usr: Operation not permitted (os error 1)"
        );
    }

    #[test]
    fn a_cgroup_failure_has_its_own_exit_status() {
        let err = LaunchError::from(CgroupError::NoOwnCgroup {
            path: "/proc/self/cgroup",
        });
        assert_eq!(err.exit_status(), CGROUP_FAILED);
        assert_ne!(CGROUP_FAILED, LAUNCH_FAILED);
        assert_eq!(LaunchError::Host("x".into()).exit_status(), LAUNCH_FAILED);
        assert_eq!(
            one_line(&err),
            "refusing to start the sandbox without its cgroup limits: \
             /proc/self/cgroup has no cgroup v2 (`0::`) line"
        );
    }

    #[test]
    fn one_line_never_spans_lines() {
        let err = LaunchError::Inside("first\nsecond".into());
        assert_eq!(one_line(&err), "first second");
    }
}
