//! The cgroup limits, observed from inside.

use serde_json::json;

use crate::harness::Sandbox;

const ALLOCATE: &str = "python3 -c \"b = bytearray(200 << 20); print('survived')\"";

#[test]
fn a_program_over_the_memory_limit_is_killed() {
    let mut sandbox = Sandbox::new(ALLOCATE);
    sandbox.set("memory_mib", json!(32));
    let outcome = sandbox.run();
    assert_ne!(outcome.code, Some(0), "{outcome:?}");
    assert!(!outcome.stdout_text().contains("survived"), "{outcome:?}");
}

#[test]
fn without_a_memory_limit_the_same_program_survives() {
    let outcome = Sandbox::new(ALLOCATE).run();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stdout, ["survived"]);
}

// Each child lives until the parent exits (its pipe reads end-of-file then),
// not for a fixed time: a slow machine cannot free pids mid-count.
const FORK_50: &str = r#"
import os
r, w = os.pipe()
ok = 0
for _ in range(50):
    try:
        pid = os.fork()
    except OSError:
        continue
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    ok += 1
print(ok)
"#;

fn forks_that_succeed(max_processes: u64) -> u32 {
    let mut sandbox = Sandbox::new("python3 /sandbox/fork.py");
    sandbox.set("max_processes", json!(max_processes));
    sandbox.add_file("fork.py", FORK_50);
    let outcome = sandbox.run();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    outcome.stdout[0].parse().unwrap()
}

#[test]
fn the_process_limit_makes_forks_fail() {
    let ok = forks_that_succeed(8);
    // init, sh and python take three of the eight.
    assert!((1..50).contains(&ok), "{ok} of 50 forks succeeded");
    assert!(ok <= 5, "{ok} of 50 forks succeeded");
}

#[test]
fn without_a_process_limit_all_forks_succeed() {
    assert_eq!(forks_that_succeed(0), 50);
}
