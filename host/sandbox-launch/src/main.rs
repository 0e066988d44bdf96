//! `openshell-sandbox-launch`: the host-side launcher of one process sandbox.
//!
//! The gateway (root) runs `openshell-sandbox-launch --config <path.json>`
//! once per sandbox. The launcher confines one program, the in-sandbox
//! supervisor, and exits with its status: the program's exit code, 128+N if
//! signal N killed it, 125 if the launch itself failed, or 123 if the
//! sandbox's cgroup limits could not be applied (they fail closed), with one
//! `openshell-sandbox-launch: <what failed and why>` line on stderr.
//!
//! The confinement: new user (in-sandbox ids 0..65535 are host
//! `uid_base..`), pid, mount, UTS, IPC and optionally network namespaces;
//! cgroup v1 or v2 memory, pids and cpu limits; a tmpfs root with read-only host
//! system directories and nothing else of the host. The process chain is
//! gateway → launcher (host root, outside) → init (PID 1 inside) → program
//! (PID 2), each dying with its parent.
//!
//! Start at [`launch`], the host side in order. [`config`] (the crate's
//! library, shared with the gateway that writes it) parses and validates the
//! JSON with no I/O; [`cgroup`] owns the limits; [`inside`] is
//! the sandbox's init and [`rootfs`] the root it pivots into; [`sys`] holds
//! every raw system call (and so every `unsafe`).

mod cgroup;
mod error;
mod inside;
mod launch;
mod rootfs;
mod sys;

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use error::{LaunchError, one_line, os};
use openshell_sandbox_launch::config;

fn main() -> ExitCode {
    match launch_from_args() {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            eprintln!("openshell-sandbox-launch: {}", one_line(&err));
            ExitCode::from(err.exit_status())
        }
    }
}

fn launch_from_args() -> Result<u8, LaunchError> {
    // Die with the gateway; if it already died before we asked, stop here.
    let parent = sys::parent_pid();
    sys::die_with_parent().map_err(os("cannot set the parent-death signal"))?;
    if sys::parent_pid() != parent {
        return Err(LaunchError::Host(
            "the gateway exited before the launch".into(),
        ));
    }
    // A SIGTERM during set-up waits, and then goes to the sandbox, instead
    // of killing the launcher half-way and leaking its cgroups.
    sys::hold_forwarded_signals().map_err(os("cannot block SIGTERM and SIGINT"))?;
    // Init is a copy of this process: no descriptor the gateway leaked may
    // reach it.
    sys::close_from(3).map_err(os("cannot close inherited descriptors"))?;

    let args = parse_args(std::env::args_os().skip(1))?;
    let path = args.config;
    let json = if path.as_os_str() == "-" {
        read_config_from_stdin()
    } else {
        fs::read_to_string(&path)
    }
    .map_err(|source| LaunchError::ReadConfig {
        path: path.clone(),
        source,
    })?;
    let config = config::parse(&json).map_err(|source| LaunchError::Config { path, source })?;
    if let Some(label) = args.sandbox.filter(|l| *l != config.sandbox_id) {
        return Err(LaunchError::Usage(format!(
            "--sandbox {label:?} is not the config's sandbox {:?}",
            config.sandbox_id
        )));
    }
    launch::run(&config)
}

/// The whole of stdin, which is then replaced by /dev/null: init (a copy of
/// this process) must not keep the config's descriptor.
fn read_config_from_stdin() -> std::io::Result<String> {
    use std::io::Read;
    let mut json = String::new();
    std::io::stdin().lock().read_to_string(&mut json)?;
    sys::replace_stdin(&fs::File::open("/dev/null")?)?;
    Ok(json)
}

/// The command line: `--config <path>` or `--config=<path>` (`-`: read
/// stdin), and optionally `--sandbox <id>`, a label that names the sandbox
/// in `ps` (the config path no longer does) and must match the config's id.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    config: PathBuf,
    sandbox: Option<String>,
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Args, LaunchError> {
    let (mut config, mut sandbox) = (None, None);
    while let Some(flag) = args.next() {
        let unexpected = || LaunchError::Usage(format!("unexpected argument {flag:?}"));
        let inline = flag.to_str().and_then(|f| f.strip_prefix("--config="));
        match (flag.to_str(), inline) {
            (_, Some(path)) if !path.is_empty() && config.is_none() => config = Some(path.into()),
            (Some("--config"), None) if config.is_none() => {
                config = Some(args.next().ok_or_else(unexpected)?.into());
            }
            (Some("--sandbox"), None) if sandbox.is_none() => {
                let id = args.next().ok_or_else(unexpected)?;
                sandbox = Some(id.into_string().map_err(|_| unexpected())?);
            }
            _ => return Err(unexpected()),
        }
    }
    match config {
        Some(config) => Ok(Args { config, sandbox }),
        None => Err(LaunchError::Usage("missing --config".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<PathBuf, String> {
        parse_args(args.iter().map(OsString::from))
            .map(|a| a.config)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_config_path_comes_from_the_config_flag_in_either_form() {
        assert_eq!(parse(&["--config", "/x.json"]), Ok("/x.json".into()));
        assert_eq!(parse(&["--config=/x.json"]), Ok("/x.json".into()));
        assert_eq!(parse(&["--config", "-"]), Ok("-".into()));
        let labelled = parse_args(
            ["--config", "-", "--sandbox", "s1"]
                .iter()
                .map(OsString::from),
        );
        assert_eq!(
            labelled.unwrap(),
            Args {
                config: "-".into(),
                sandbox: Some("s1".into())
            }
        );
    }

    #[test]
    fn anything_else_on_the_command_line_is_a_usage_error() {
        for args in [
            &[][..],
            &["--config"],
            &["--config="],
            &["/x.json"],
            &["--cfg", "/x.json"],
            &["--config", "/x.json", "more"],
            &["--config", "/x.json", "--config", "/y.json"],
            &["--config", "-", "--sandbox"],
            &["--sandbox", "s1"],
        ] {
            let err = parse(args).unwrap_err();
            assert!(
                err.starts_with("usage: openshell-sandbox-launch --config"),
                "{args:?}: {err}"
            );
        }
    }
}
