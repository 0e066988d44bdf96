//! Issue 13 item 3: the launcher chowns the workdir to the sandbox user, so
//! a workdir that is the state dir itself, or a path through something
//! sandbox code owned on an earlier launch (where it can plant a symlink),
//! would hand a host path to the sandbox. Each is refused before anything
//! runs, and the host path keeps its owner and mode.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use serde_json::json;

use crate::harness::Sandbox;

/// Owner and mode, as the attack would change them.
fn stat(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.mode() & 0o7777)
}

/// A root-owned host directory the sandbox must never get.
fn host_dir(sandbox: &Sandbox) -> std::path::PathBuf {
    let host = sandbox.dir.path().join("host");
    fs::create_dir(&host).unwrap();
    fs::set_permissions(&host, fs::Permissions::from_mode(0o750)).unwrap();
    host
}

#[test]
fn issue_13_a_workdir_that_is_the_state_dir_or_holds_it_is_refused() {
    let mut sandbox = Sandbox::new("echo ran");
    let state = sandbox.dir.path().join("state");
    let before = stat(&state);
    for workdir in [state.clone(), sandbox.dir.path().to_owned()] {
        sandbox.set("workdir", json!(workdir));
        let outcome = sandbox.run();
        assert_eq!(outcome.code, Some(125), "{workdir:?}: {outcome:?}");
        assert!(outcome.stdout.is_empty(), "{outcome:?}");
        assert_eq!(stat(&state), before, "{workdir:?}");
    }
}

#[test]
fn issue_13_a_workdir_that_is_a_symlink_to_a_host_dir_is_not_followed() {
    let mut sandbox = Sandbox::new("echo ran");
    let host = host_dir(&sandbox);
    let link = sandbox.dir.path().join("state/w");
    symlink(&host, &link).unwrap();
    sandbox.set("workdir", json!(link));
    let outcome = sandbox.run();
    assert_eq!(outcome.code, Some(125), "{outcome:?}");
    assert_eq!(stat(&host), (0, 0o750), "the chown followed the symlink");
}

#[test]
fn issue_13_a_workdir_below_one_the_sandbox_owned_is_refused_even_through_its_symlink() {
    // First launch: the sandbox owns `work` and plants a symlink in it.
    let mut sandbox = Sandbox::new("ln -s /host-target /sandbox/escape && mkdir /sandbox/sub");
    let host = host_dir(&sandbox);
    let outcome = sandbox.run();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    // Repoint the planted link at the host dir (its absolute path outside).
    let escape = sandbox.workdir().join("escape");
    fs::remove_file(&escape).unwrap();
    symlink(&host, &escape).unwrap();
    for workdir in [escape, sandbox.workdir().join("sub")] {
        sandbox.set("workdir", json!(workdir));
        let outcome = sandbox.run();
        assert_eq!(outcome.code, Some(125), "{workdir:?}: {outcome:?}");
        assert!(
            outcome.stderr.contains("not root's"),
            "{workdir:?}: {outcome:?}"
        );
    }
    assert_eq!(stat(&host), (0, 0o750), "the chown followed the symlink");
}
