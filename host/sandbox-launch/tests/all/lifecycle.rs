//! Exit statuses, signals, and what is left once the sandbox is gone.

use std::fs;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Sandbox, processes_with_uid, within};

#[test]
fn the_programs_exit_code_passes_through() {
    for code in [0, 3, 124, 126] {
        let outcome = Sandbox::new(&format!("exit {code}")).run();
        assert_eq!(outcome.code, Some(code), "{outcome:?}");
        assert_eq!(outcome.stderr, "");
    }
}

#[test]
fn a_program_killed_by_signal_n_gives_128_plus_n() {
    for (signal, code) in [("KILL", 137), ("TERM", 143), ("SEGV", 139)] {
        let outcome = Sandbox::new(&format!("kill -{signal} $$; sleep 5")).run();
        assert_eq!(outcome.code, Some(code), "{signal}: {outcome:?}");
    }
}

#[test]
fn sigterm_and_sigint_to_the_launcher_reach_the_program() {
    for (signal, code) in [("TERM", 7), ("INT", 8)] {
        let sandbox = Sandbox::new(
            "trap 'echo got TERM; exit 7' TERM; trap 'echo got INT; exit 8' INT; \
             echo ready; while :; do sleep 0.05; done",
        );
        let mut running = sandbox.start();
        running.wait_for_line("ready");
        running.signal(signal);
        let outcome = running.wait();
        assert_eq!(outcome.code, Some(code), "{outcome:?}");
        assert_eq!(outcome.stdout, ["ready", &format!("got {signal}")]);
    }
}

#[test]
fn sigkill_to_the_launcher_kills_everything_inside() {
    let sandbox = Sandbox::new("sleep 1000 & sleep 1000 & echo ready; exec sleep 1000");
    let mut running = sandbox.start();
    running.wait_for_line("ready");
    let inside = processes_with_uid(sandbox.uid_base);
    assert!(inside.len() >= 3, "init and three sleeps: {inside:?}");

    running.child.kill().unwrap();
    running.child.wait().unwrap();
    // The parent-death signals fire at once; the deadline only guards a hang.
    let gone = within(Duration::from_secs(30), || {
        processes_with_uid(sandbox.uid_base).is_empty()
    });
    assert!(
        gone,
        "still running: {:?}",
        processes_with_uid(sandbox.uid_base)
    );
}

#[test]
fn the_sandbox_runs_in_its_own_cgroups_which_are_removed_after_exit() {
    // Inside, a cgroup namespace rooted at the sandbox's cgroups shows `/`;
    // the host sees where they are.
    let sandbox = Sandbox::new("cat /proc/self/cgroup; echo up; exec sleep 30");
    let (host_view, outcome) = sandbox.host_view_of_cgroup(&mut sandbox.command());
    assert!(outcome.stdout.iter().any(|l| l == "0::/"), "{outcome:?}");
    assert!(
        !outcome.stdout.iter().any(|l| l.contains("openshell")),
        "a host cgroup path shows inside: {outcome:?}"
    );
    for controller in ["memory", "pids", "cpu"] {
        let line = format!(":{controller}:/openshell/{}/workload", sandbox.id);
        assert!(
            host_view.lines().any(|l| l.ends_with(&line)),
            "{line} in {host_view:?}"
        );
    }
    for dir in sandbox.cgroup_dirs() {
        assert!(!dir.exists(), "{dir:?} is left behind");
    }
}

#[test]
fn limits_are_in_the_cgroup_files_while_the_sandbox_runs() {
    let mut sandbox = Sandbox::new("echo ready; exec sleep 1000");
    sandbox
        .set("memory_mib", json!(64))
        .set("max_processes", json!(100))
        .set("cpu_millis", json!(250));
    let mut running = sandbox.start();
    running.wait_for_line("ready");
    let [memory, pids, cpu] = <[_; 3]>::try_from(sandbox.cgroup_dirs()).unwrap();
    let read = |path: std::path::PathBuf| fs::read_to_string(path).unwrap().trim().to_owned();
    // Memory and tasks bound sandbox code, in its leaf; CPU the whole sandbox.
    let (memory, pids) = (memory.join("workload"), pids.join("workload"));
    assert_eq!(read(memory.join("memory.limit_in_bytes")), "67108864");
    assert_eq!(read(memory.join("memory.memsw.limit_in_bytes")), "67108864");
    assert_eq!(read(pids.join("pids.max")), "100");
    assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "25000");
    // Every sandbox weighs half a default cgroup (issue 14, item 6).
    assert_eq!(read(cpu.join("cpu.shares")), "512");
    running.signal("TERM");
    assert_eq!(running.wait().code, Some(143));
}

/// Issue 14 item 7: a supervised program (the supervisor) lives beside
/// the limits, with its own small memory limit, and moves what it starts
/// into them through the descriptors it is handed.
#[test]
fn a_supervised_program_runs_outside_the_limits_and_moves_its_commands_into_them() {
    let mut sandbox = Sandbox::new(
        "echo \"fds=$OPENSHELL_WORKLOAD_CGROUP_FDS\"; grep memory /proc/self/cgroup; \
         sh -c 'for fd in $(echo $OPENSHELL_WORKLOAD_CGROUP_FDS | tr , \" \"); do \
                  echo 0 >&$fd || exit 1; done; grep memory /proc/self/cgroup'; \
         ls -l /proc/self/fd | grep -c cgroup.procs; echo up; exec sleep 30",
    );
    sandbox
        .set("memory_mib", json!(64))
        .set("supervised", json!(true));
    let mut running = sandbox.start();
    running.wait_for_line("up");
    let memory = &sandbox.cgroup_dirs()[0];
    let read = |path: std::path::PathBuf| fs::read_to_string(path).unwrap().trim().to_owned();
    assert_eq!(
        read(memory.join("supervisor/memory.limit_in_bytes")),
        (128u64 << 20).to_string()
    );
    assert_eq!(
        read(memory.join("workload/memory.limit_in_bytes")),
        "67108864"
    );
    let supervisor_procs = read(memory.join("supervisor/cgroup.procs"));
    assert_eq!(
        supervisor_procs.lines().count(),
        2,
        "init and the program: {supervisor_procs}"
    );
    running.signal("TERM");
    let outcome = running.wait();
    let out = &outcome.stdout;
    // One descriptor per v1 hierarchy the launcher uses.
    assert!(
        out.iter()
            .any(|l| l.starts_with("fds=") && l.split(',').count() == 3),
        "{outcome:?}"
    );
    assert!(
        out.iter().any(|l| l.ends_with(":memory:/../supervisor")),
        "the program is in the supervisor's cgroup: {outcome:?}"
    );
    assert!(
        out.iter().any(|l| l.ends_with(":memory:/")),
        "the command moved itself into the workload (the namespace root): {outcome:?}"
    );
    assert!(
        out.iter().any(|l| l == "3"),
        "the program holds the descriptors: {outcome:?}"
    );
}

/// Issue 14 item 7, the attack: sandbox code fills its memory limit with
/// tmpfs pages, which no OOM kill frees. The OOM killer may pick only
/// within sandbox code's cgroup; the supervised program lives on.
#[test]
fn filling_the_workload_with_tmpfs_cannot_get_the_supervisor_oom_killed() {
    let mut sandbox = Sandbox::new(
        "sh -c 'for fd in $(echo $OPENSHELL_WORKLOAD_CGROUP_FDS | tr , \" \"); do \
                  echo 0 >&$fd; done; head -c 100M /dev/zero > /dev/shm/fill'; \
         echo \"filler=$?\"; echo up; exec sleep 30",
    );
    sandbox
        .set("memory_mib", json!(32))
        .set("supervised", json!(true));
    let mut running = sandbox.start();
    running.wait_for_line("up");
    let memory = &sandbox.cgroup_dirs()[0];
    // v1's `oom_control` counts the OOM kills in a cgroup.
    let kills = |leaf: &str| {
        let control = fs::read_to_string(memory.join(leaf).join("memory.oom_control")).unwrap();
        control
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .map(|n| n.parse::<u64>().unwrap())
    };
    let (workload, supervisor) = (kills("workload"), kills("supervisor"));
    running.signal("TERM");
    let outcome = running.wait();
    assert!(
        workload.is_some_and(|n| n > 0),
        "the kill was in sandbox code's cgroup: {workload:?} {outcome:?}"
    );
    assert_eq!(supervisor, Some(0), "{outcome:?}");
    // The filler died of the OOM kill (SIGKILL: 137); the program printed on.
    assert!(
        outcome.stdout.iter().any(|l| l == "filler=137"),
        "{outcome:?}"
    );
    assert_eq!(outcome.code, Some(143), "{outcome:?}");
}

#[test]
fn relaunching_after_a_killed_launcher_reuses_then_removes_its_cgroups() {
    let sandbox = Sandbox::new("echo ready; exec sleep 1000");
    let mut running = sandbox.start();
    running.wait_for_line("ready");
    running.child.kill().unwrap();
    running.child.wait().unwrap();
    drop(running);
    let gone = within(Duration::from_secs(30), || {
        processes_with_uid(sandbox.uid_base).is_empty()
    });
    assert!(
        gone,
        "still running: {:?}",
        processes_with_uid(sandbox.uid_base)
    );
    assert!(
        sandbox.cgroup_dirs()[0].exists(),
        "a SIGKILLed launcher cannot clean up"
    );

    let mut again = Sandbox::new("exit 0");
    again.set("sandbox_id", json!(sandbox.id));
    let outcome = again.run();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(!sandbox.cgroup_dirs()[0].exists());
}
