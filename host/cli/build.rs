//! Builds the bundled driver components (`drivers/process`, `drivers/vm`)
//! for wasm32-wasip2 and leaves them in `OUT_DIR`, where `src/bundled.rs`
//! embeds them, so an installed `openshell` needs no `--driver-dir`.
//!
//! The drivers are their own cargo workspace (another target, another
//! release profile), built by a nested cargo into `embedded-drivers/` next
//! to this build's profile dirs: the outer cargo holds the lock of its own
//! profile dir, so the inner one must not share it, and one dir per target
//! dir lets debug, release and clippy builds share one drivers build.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const DRIVERS: [&str; 2] = ["process", "vm"];

fn main() {
    let cli = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = cli.join("../..");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    // What the drivers are built from: their workspace, the WIT world and
    // the host's pure core (a path dependency of theirs). Not drivers/
    // whole, which may hold a target dir.
    for input in [
        "drivers/Cargo.toml",
        "drivers/Cargo.lock",
        "drivers/common",
        "drivers/process",
        "drivers/vm",
        "wit",
        "host/core/Cargo.toml",
        "host/core/src",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(input).display());
    }
    let target_dir = drivers_target_dir(&out);
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(root.join("drivers/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for d in DRIVERS {
        cargo.args(["-p", &format!("openshell-driver-{d}")]);
    }
    // What the outer cargo set for this script is not the drivers' build:
    // host flags, clippy as a wrapper (which would rebuild the drivers on
    // every switch between `cargo build` and `cargo clippy`).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cargo.env_remove(var);
    }
    // Cargo reads `cargo::` lines from this script's stdout: keep the
    // nested build's output on stderr.
    let stderr = std::io::stderr().as_fd().try_clone_to_owned();
    cargo.stdout(Stdio::from(stderr.expect("duplicate stderr")));
    let status = cargo.status().expect("run cargo for the drivers");
    if !status.success() {
        panic!(
            "building the bundled drivers (drivers/, wasm32-wasip2) failed ({status}); \
             if the target is missing: rustup target add wasm32-wasip2 (scripts/setup.sh does it)"
        );
    }
    for d in DRIVERS {
        let file = format!("openshell_driver_{d}.wasm");
        let built = target_dir.join("wasm32-wasip2/release").join(&file);
        std::fs::copy(&built, out.join(&file))
            .unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    }
}

/// `<target dir>/embedded-drivers`, found from `OUT_DIR`
/// (`<target dir>[/<triple>]/<profile>/build/<package>-<hash>/out`).
fn drivers_target_dir(out: &Path) -> PathBuf {
    out.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(|dir| dir.join("embedded-drivers"))
        .unwrap_or_else(|| out.join("embedded-drivers"))
}
