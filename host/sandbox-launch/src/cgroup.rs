//! cgroup v1 limits: `/sys/fs/cgroup/{memory,pids,cpu}/openshell/<sandbox_id>`.
//!
//! [`Cgroups::create`] makes the directories and writes the limits before
//! anything runs; [`Cgroups::add`] moves the sandbox's init in while it still
//! waits for the go-ahead, so everything it forks is counted. Dropping
//! [`Cgroups`] kills whatever is left in them and removes the directories.
//!
//! A controller that is not mounted is reported on stderr and skipped: the
//! sandbox still runs, without that limit. A controller that is mounted but
//! refuses a write fails the launch.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::LaunchConfig;
use crate::error::{LaunchError, os, warn};
use crate::sys;

/// Where the v1 controllers are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The controllers a sandbox gets a directory in, limit or not (the
/// directory is also how leftovers are found and killed).
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// CFS period; the quota is `cpu_millis` thousandths of it.
const CPU_PERIOD_US: u64 = 100_000;

/// How long teardown waits for killed tasks to leave a cgroup.
const TEARDOWN_DEADLINE: Duration = Duration::from_secs(3);

/// One value written into a controller file.
#[derive(Debug, PartialEq, Eq)]
struct LimitWrite {
    controller: &'static str,
    file: &'static str,
    value: String,
    /// Skip when the kernel lacks the file (swap accounting is optional).
    optional: bool,
}

/// What to write, in order. No limit means no write: a fresh cgroup is
/// unlimited.
fn limit_writes(config: &LaunchConfig) -> Vec<LimitWrite> {
    let write = |controller, file, value: u64, optional| LimitWrite {
        controller,
        file,
        value: value.to_string(),
        optional,
    };
    let mut writes = Vec::new();
    if let Some(bytes) = config.memory_bytes() {
        // memsw (memory + swap) must never be below the memory limit, so it
        // comes second; equal values mean the sandbox cannot use swap.
        writes.push(write("memory", "memory.limit_in_bytes", bytes, false));
        writes.push(write("memory", "memory.memsw.limit_in_bytes", bytes, true));
    }
    if config.max_processes > 0 {
        writes.push(write("pids", "pids.max", config.max_processes, false));
    }
    if config.cpu_millis > 0 {
        let quota = config.cpu_millis * CPU_PERIOD_US / 1000;
        writes.push(write("cpu", "cpu.cfs_period_us", CPU_PERIOD_US, false));
        writes.push(write("cpu", "cpu.cfs_quota_us", quota, false));
    }
    writes
}

/// The sandbox's cgroup directories, removed on drop.
#[derive(Debug)]
pub struct Cgroups {
    dirs: Vec<PathBuf>,
}

impl Cgroups {
    /// Creates the directories and writes the limits.
    pub fn create(config: &LaunchConfig) -> Result<Cgroups, LaunchError> {
        let writes = limit_writes(config);
        // Pushed as they are made, so a failure half-way removes the rest.
        let mut cgroups = Cgroups { dirs: Vec::new() };
        for controller in CONTROLLERS {
            let root = Path::new(CGROUP_ROOT).join(controller);
            if !root.join("cgroup.procs").exists() {
                warn(&format!(
                    "cgroup v1 controller `{controller}` is not mounted at {}; \
                     its limit is not enforced",
                    root.display()
                ));
                continue;
            }
            let dir = root.join("openshell").join(&config.sandbox_id);
            if dir.exists() {
                // Left by a launcher that was SIGKILLed; whatever is still
                // in it belongs to a sandbox that is already gone.
                remove(&dir)
                    .map_err(os(format!("cannot remove stale cgroup {}", dir.display())))?;
            }
            fs::create_dir_all(&dir)
                .map_err(os(format!("cannot create cgroup {}", dir.display())))?;
            cgroups.dirs.push(dir.clone());
            for limit in writes.iter().filter(|w| w.controller == controller) {
                let file = dir.join(limit.file);
                if limit.optional && !file.exists() {
                    continue;
                }
                fs::write(&file, &limit.value).map_err(os(format!(
                    "cannot write {} to {}",
                    limit.value,
                    file.display()
                )))?;
            }
        }
        Ok(cgroups)
    }

    /// Moves `pid` (and so everything it will fork) into every cgroup.
    pub fn add(&self, pid: i32) -> Result<(), LaunchError> {
        for dir in &self.dirs {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(os(format!(
                "cannot move the sandbox into {}",
                procs.display()
            )))?;
        }
        Ok(())
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Err(err) = remove(dir) {
                warn(&format!("cannot remove cgroup {}: {err}", dir.display()));
            }
        }
    }
}

/// SIGKILLs every task left in `dir` until it is empty, then removes it.
fn remove(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + TEARDOWN_DEADLINE;
    loop {
        let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
        for pid in procs.lines().filter_map(|line| line.trim().parse().ok()) {
            // ESRCH just means it died on its own meanwhile.
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn config_with(memory_mib: u64, max_processes: u64, cpu_millis: u64) -> LaunchConfig {
        let json = serde_json::json!({
            "sandbox_id": "s", "hostname": "h", "state_dir": "/s", "workdir": "/w",
            "run_dir": "/r", "program": "/p", "args": [], "env": [],
            "uid_base": 100000, "isolate_network": false,
            "memory_mib": memory_mib, "max_processes": max_processes, "cpu_millis": cpu_millis,
        });
        config::parse(&json.to_string()).unwrap()
    }

    fn files(writes: &[LimitWrite]) -> Vec<(&str, &str)> {
        writes.iter().map(|w| (w.file, w.value.as_str())).collect()
    }

    #[test]
    fn no_limits_write_nothing() {
        assert!(limit_writes(&config_with(0, 0, 0)).is_empty());
    }

    #[test]
    fn memory_is_limited_in_bytes_with_swap_capped_at_the_same_value() {
        let writes = limit_writes(&config_with(32, 0, 0));
        assert_eq!(
            files(&writes),
            [
                ("memory.limit_in_bytes", "33554432"),
                ("memory.memsw.limit_in_bytes", "33554432")
            ]
        );
        assert!(!writes[0].optional && writes[1].optional);
    }

    #[test]
    fn pids_are_limited_by_count() {
        assert_eq!(
            files(&limit_writes(&config_with(0, 8, 0))),
            [("pids.max", "8")]
        );
    }

    #[test]
    fn cpu_millis_are_thousandths_of_a_100ms_period() {
        assert_eq!(
            files(&limit_writes(&config_with(0, 0, 250))),
            [
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "25000")
            ]
        );
        assert_eq!(
            files(&limit_writes(&config_with(0, 0, 2000)))[1],
            ("cpu.cfs_quota_us", "200000")
        );
    }
}
