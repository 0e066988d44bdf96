//! `openshell-krun-launch`: the host-side launcher of one libkrun microVM.
//!
//! The gateway runs `openshell-krun-launch --config <path.json>` once per
//! VM sandbox when the libkrun backend is selected. libkrun's
//! `krun_start_enter` turns its caller into the VM and never returns on
//! success, so this process configures libkrun, forks, and the child enters
//! the VM while this process stays behind to supervise it: it forwards
//! SIGTERM and SIGINT, and exits with the VM's status (the guest's exit
//! code, 128+N if signal N killed it). If the launch itself fails it exits
//! with 125 and one `openshell-krun-launch: <what failed and why>` line on
//! stderr, as `openshell-sandbox-launch` does.
//!
//! The configuration is `openshell_vm::krun::KrunLaunch` (pure, validated,
//! unit-tested there). Start at [`launch_from_args`]; [`preflight`] checks
//! what libkrun would only discover once the guest is running; [`vm`] holds
//! every libkrun call, the fork and the wait (and so every `unsafe`).

mod preflight;
mod vm;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use openshell_vm::krun::KrunLaunch;

/// The launch itself failed (nothing of the guest ran).
const LAUNCH_FAILED: u8 = 125;

fn main() -> ExitCode {
    match launch_from_args() {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            eprintln!(
                "openshell-krun-launch: {}",
                format!("{err:#}").replace('\n', " ")
            );
            ExitCode::from(LAUNCH_FAILED)
        }
    }
}

fn launch_from_args() -> anyhow::Result<u8> {
    // Die with the gateway; if it already died before we asked, stop here.
    vm::die_with_parent()?;
    // A SIGTERM during set-up is held, then forwarded to the VM, instead of
    // killing the launcher half-way.
    vm::hold_signals()?;

    let path = config_path(std::env::args_os().skip(1))?;
    let json = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let launch =
        KrunLaunch::parse(&json).with_context(|| format!("invalid config {}", path.display()))?;
    preflight::check(&launch)?;
    let ctx = vm::configure(&launch)?;
    vm::run(ctx)
}

/// `--config <path>` or `--config=<path>`, and nothing else.
fn config_path(mut args: impl Iterator<Item = OsString>) -> anyhow::Result<PathBuf> {
    let (first, second) = (args.next(), args.next());
    if let Some(extra) = args.next() {
        bail!("unexpected argument {extra:?}; usage: openshell-krun-launch --config <path.json>");
    }
    match (first, second) {
        (Some(flag), Some(path)) if flag == "--config" => Ok(path.into()),
        (Some(flag), None) => match flag.to_str().and_then(|f| f.strip_prefix("--config=")) {
            Some(path) if !path.is_empty() => Ok(path.into()),
            _ => bail!("usage: openshell-krun-launch --config <path.json>"),
        },
        _ => bail!("usage: openshell-krun-launch --config <path.json>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> anyhow::Result<PathBuf> {
        config_path(a.iter().map(OsString::from))
    }

    #[test]
    fn the_config_path_comes_from_one_flag() {
        assert_eq!(
            args(&["--config", "/a.json"]).unwrap(),
            PathBuf::from("/a.json")
        );
        assert_eq!(
            args(&["--config=/b.json"]).unwrap(),
            PathBuf::from("/b.json")
        );
    }

    #[test]
    fn anything_else_on_the_command_line_is_refused() {
        for bad in [
            &[][..],
            &["/a.json"],
            &["--config"],
            &["--config="],
            &["--config", "/a.json", "--extra"],
            &["--cfg", "/a.json"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }
}
