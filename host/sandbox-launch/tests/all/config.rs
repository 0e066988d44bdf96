//! Refused launches: exit 125 and one line saying why, before anything runs.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::harness::{LAUNCHER, Outcome, Sandbox};

const MARKER: &str = "touch /sandbox/ran";

fn assert_refused(sandbox: &Sandbox, outcome: &Outcome, why: &str) {
    assert_eq!(outcome.code, Some(125), "{outcome:?}");
    let lines: Vec<&str> = outcome.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{outcome:?}");
    assert!(
        lines[0].starts_with("openshell-sandbox-launch: "),
        "{outcome:?}"
    );
    assert!(lines[0].contains(why), "{why:?} in {:?}", lines[0]);
    assert!(!sandbox.workdir().join("ran").exists(), "the program ran");
    for dir in sandbox.cgroup_dirs() {
        assert!(!dir.exists(), "{dir:?}");
    }
}

#[test]
fn a_relative_path_is_refused() {
    let mut sandbox = Sandbox::new(MARKER);
    sandbox.set("workdir", json!("work"));
    let outcome = sandbox.run();
    assert_refused(
        &sandbox,
        &outcome,
        "workdir must be an absolute path, got \"work\"",
    );
}

#[test]
fn a_parent_component_is_refused() {
    let mut sandbox = Sandbox::new(MARKER);
    let sneaky = sandbox.workdir().join("../work");
    sandbox.set("workdir", json!(sneaky));
    let outcome = sandbox.run();
    assert_refused(&sandbox, &outcome, "workdir must not contain `..`");
}

#[test]
fn a_missing_field_is_refused() {
    let mut sandbox = Sandbox::new(MARKER);
    sandbox.remove("uid_base");
    let outcome = sandbox.run();
    assert_refused(&sandbox, &outcome, "missing field `uid_base`");
}

#[test]
fn a_missing_config_file_or_flag_is_refused() {
    let sandbox = Sandbox::new(MARKER);
    let mut cmd = std::process::Command::new(LAUNCHER);
    cmd.args(["--config", "/nonexistent/config.json"]);
    assert_refused(&sandbox, &sandbox.run_command(cmd), "cannot read config");
    let cmd = std::process::Command::new(LAUNCHER);
    assert_refused(
        &sandbox,
        &sandbox.run_command(cmd),
        "usage: openshell-sandbox-launch --config",
    );
}

#[test]
fn a_workdir_that_does_not_exist_is_refused() {
    let mut sandbox = Sandbox::new(MARKER);
    let missing = sandbox.dir.path().join("missing");
    sandbox.set("workdir", json!(missing));
    let outcome = sandbox.run();
    assert_refused(&sandbox, &outcome, "cannot inspect workdir");
}

#[test]
fn a_state_dir_others_can_write_is_refused() {
    let sandbox = Sandbox::new(MARKER);
    let state = sandbox.dir.path().join("state");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
    let outcome = sandbox.run();
    assert_refused(&sandbox, &outcome, "must be a directory owned by root");
}

#[test]
fn a_program_that_cannot_be_executed_is_a_launch_failure() {
    let mut sandbox = Sandbox::new(MARKER);
    let not_executable = sandbox.dir.path().join("program");
    fs::write(&not_executable, "not a binary").unwrap();
    sandbox.set("program", json!(not_executable));
    let outcome = sandbox.run();
    assert_refused(
        &sandbox,
        &outcome,
        "cannot execute \"/run/openshell-bin/program\"",
    );
}
