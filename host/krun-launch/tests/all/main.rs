//! The launcher binary's integration tests. They run the real binary up to
//! the point where it would start a VM, and never past it: no libkrun guest
//! can boot on these machines (`/dev/kvm` is `kvm_pvm`), so every case here
//! must fail before `krun_start_enter`, with one clear line and status 125.

use std::path::Path;
use std::process::{Command, Output};

use openshell_vm::krun::KrunLaunch;

const LAUNCH_FAILED: i32 = 125;

fn launcher() -> Command {
    Command::new(env!("CARGO_BIN_EXE_openshell-krun-launch"))
}

/// A launch whose paths all exist in `dir`, except the gvproxy socket.
fn launch_in(dir: &Path) -> KrunLaunch {
    std::fs::create_dir(dir.join("root")).unwrap();
    KrunLaunch::new(
        1,
        256,
        dir.join("root"),
        dir.join("net.sock"),
        dir.join("console.log"),
        vec![(
            "OPENSHELL_ENDPOINT".into(),
            "http://192.168.127.254:4100".into(),
        )],
        dir.join("libkrunfw"),
    )
    .unwrap()
}

fn run_with(dir: &Path, json: &str) -> Output {
    let config = dir.join("launch.json");
    std::fs::write(&config, json).unwrap();
    launcher().arg("--config").arg(&config).output().unwrap()
}

/// The one stderr line, asserted to be the launcher's.
fn failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(LAUNCH_FAILED), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("openshell-krun-launch: "), "{stderr}");
    stderr
}

#[test]
fn a_missing_gvproxy_socket_fails_before_libkrun_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let launch = launch_in(dir.path());
    let out = run_with(dir.path(), &launch.to_json());
    let e = failure(&out);
    assert!(e.contains("the gvproxy socket"), "{e}");
    assert!(e.contains(&launch.net_socket.display().to_string()), "{e}");
    assert!(e.contains("does not exist"), "{e}");
    assert!(
        !dir.path().join("console.log").exists(),
        "nothing of the VM may have started"
    );
}

#[test]
fn a_missing_libkrunfw_says_to_run_vm_setup() {
    let dir = tempfile::tempdir().unwrap();
    let launch = launch_in(dir.path());
    let _gvproxy = std::os::unix::net::UnixListener::bind(&launch.net_socket).unwrap();
    let e = failure(&run_with(dir.path(), &launch.to_json()));
    assert!(
        e.contains("libkrunfw.so.5 is missing") && e.contains("just vm-setup"),
        "{e}"
    );
}

#[test]
fn a_libkrunfw_that_is_not_a_library_is_refused_before_libkrun_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let launch = launch_in(dir.path());
    let _gvproxy = std::os::unix::net::UnixListener::bind(&launch.net_socket).unwrap();
    std::fs::create_dir(&launch.libkrunfw_dir).unwrap();
    std::fs::write(launch.libkrunfw_dir.join("libkrunfw.so.5"), b"not an ELF").unwrap();
    let e = failure(&run_with(dir.path(), &launch.to_json()));
    assert!(e.contains("cannot load"), "{e}");
}

#[test]
fn a_workdir_that_would_inject_kernel_parameters_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut launch = launch_in(dir.path());
    launch.workdir = "/sandbox init=/bin/sh".into();
    let json = serde_json::to_string(&launch).unwrap();
    let e = failure(&run_with(dir.path(), &json));
    assert!(e.contains("invalid config") && e.contains("workdir"), "{e}");
}

#[test]
fn a_config_that_is_not_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = failure(&run_with(dir.path(), "vcpus = 2"));
    assert!(e.contains("launch.json"), "{e}");
}

#[test]
fn an_unreadable_config_path_is_named() {
    let out = launcher()
        .arg("--config=/nonexistent/launch.json")
        .output()
        .unwrap();
    let e = failure(&out);
    assert!(e.contains("cannot read /nonexistent/launch.json"), "{e}");
}

#[test]
fn no_arguments_print_the_usage() {
    let e = failure(&launcher().output().unwrap());
    assert!(e.contains("usage: openshell-krun-launch --config"), "{e}");
}
