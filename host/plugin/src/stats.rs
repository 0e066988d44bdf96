//! What a sandbox uses, read on the host: its cgroup (a process sandbox),
//! its QEMU process (a VM) and its state dir's qgroup on the sandbox disk.
//! The parsers are pure and unit-tested; [`PluginHost::usage`] does the
//! reads. Nothing here is a limit: limits are applied by the launcher, the
//! VM backend and `disk.rs`; this only reads back what they set.

use std::path::{Path, PathBuf};

use crate::PluginHost;
use openshell_sandbox_launch::cgroup_plan::{CPU_PERIOD_US, Place};

/// A sandbox's usage against its limits; a limit of 0 means none applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// `cgroup`, `qemu`, or `none` when nothing of the sandbox runs.
    pub source: &'static str,
    pub cpu_ns: u64,
    pub cpu_limit_millis: u32,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u32,
    pub pids_limit: u32,
    pub disk_bytes: u64,
    pub disk_limit_bytes: u64,
}

/// A cgroup limit file's value: `max`, v1's "unlimited" (a page-rounded
/// `i64::MAX`) and `-1` are no limit.
pub fn parse_limit(raw: &str) -> Option<u64> {
    let raw = raw.trim();
    if raw == "max" || raw == "-1" {
        return None;
    }
    raw.parse::<u64>().ok().filter(|v| *v < (1 << 62))
}

/// A CFS quota over a period as thousandths of a core (0: none).
pub fn cpu_millis(quota_us: Option<u64>, period_us: u64) -> u32 {
    match quota_us {
        Some(q) if period_us > 0 => u32::try_from(q * 1000 / period_us).unwrap_or(u32::MAX),
        _ => 0,
    }
}

/// v2 `cpu.max`: `"max 100000"` or `"50000 100000"`.
pub fn parse_cpu_max(raw: &str) -> u32 {
    let mut it = raw.split_whitespace();
    let quota = it.next().and_then(parse_limit);
    let period = it
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(CPU_PERIOD_US);
    cpu_millis(quota, period)
}

/// v2 `cpu.stat`'s `usage_usec`, in ns.
pub fn parse_cpu_stat(raw: &str) -> Option<u64> {
    raw.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|us| us.saturating_mul(1000))
}

/// CPU time in clock ticks from `/proc/PID/stat`: the process's own user
/// and system time and that of the children it reaped (fields 14-17).
pub fn parse_proc_stat_ticks(raw: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses.
    let rest = &raw[raw.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); fields 14..=17 are at 11..=14.
    let ticks = fields.get(11..15)?;
    ticks
        .iter()
        .try_fold(0u64, |sum, f| Some(sum + f.parse::<u64>().ok()?))
}

/// `VmRSS` (bytes) and `Threads` from `/proc/PID/status`.
pub fn parse_proc_status(raw: &str) -> (u64, u32) {
    let field = |name: &str| {
        raw.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    (
        field("VmRSS:").unwrap_or(0) * 1024,
        field("Threads:").map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
    )
}

/// The VM's size from QEMU's command line (`-m MIB -smp N`, as
/// `openshell-vm` writes it): (memory bytes, thousandths of a core).
pub fn parse_qemu_size(cmdline: &[u8]) -> (u64, u32) {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let after = |flag: &[u8]| {
        args.windows(2)
            .find(|w| w[0] == flag)
            .and_then(|w| std::str::from_utf8(w[1]).ok()?.parse::<u64>().ok())
    };
    (
        after(b"-m").unwrap_or(0) << 20,
        after(b"-smp").map_or(0, |n| u32::try_from(n * 1000).unwrap_or(u32::MAX)),
    )
}

/// Referenced bytes of the first qgroup row of `btrfs qgroup show -rf
/// --raw` (`qgroupid rfer excl max_rfer`).
pub fn parse_qgroup_rfer(raw: &str) -> Option<u64> {
    let row = raw.lines().find(|l| l.starts_with("0/"))?;
    row.split_whitespace().nth(1)?.parse().ok()
}

/// `/proc` counts CPU time in USER_HZ ticks, which Linux fixes at 100 on
/// every architecture it runs sandboxes on, whatever the kernel's HZ.
const USER_HZ: u64 = 100;

fn ticks_to_ns(ticks: u64) -> u64 {
    ticks.saturating_mul(1_000_000_000 / USER_HZ)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The first of `parents/<id>/<rel>` that can be read (v1 keeps each
/// controller's files under its own mount).
fn read_any(parents: &[PathBuf], id: &str, rel: &str) -> Option<String> {
    parents.iter().find_map(|p| read(&p.join(id).join(rel)))
}

impl PluginHost {
    /// What sandbox `id` uses now (see [`Usage`]). `disk_gib` is its stored
    /// disk size. Blocking (it reads files and runs `btrfs`).
    pub fn usage(&self, id: &str, disk_gib: u32) -> Usage {
        let mut u = match self.vms().pids(id) {
            (Some(qemu), _) if self.vms().backend(id).is_some() => qemu_usage(qemu),
            _ => cgroup_usage(&crate::caps::process::sandbox_cgroup_parents(), id),
        };
        if let Some(disk) = self.sandbox_disk() {
            u.disk_limit_bytes = disk.limit_bytes(disk_gib);
            let show = std::process::Command::new("btrfs")
                .args(["qgroup", "show", "-rf", "--raw", "--sync"])
                .arg(self.sandbox_dir(id))
                .output();
            match show {
                Ok(out) if out.status.success() => {
                    u.disk_bytes =
                        parse_qgroup_rfer(&String::from_utf8_lossy(&out.stdout)).unwrap_or(0);
                }
                Ok(out) => tracing::debug!(
                    sandbox = id,
                    "btrfs qgroup show: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => tracing::debug!(sandbox = id, "cannot run btrfs: {e}"),
            }
        }
        u
    }
}

/// A process sandbox: CPU of the whole sandbox, memory and pids of sandbox
/// code (its `workload` leaf, which holds the spec's limits; the
/// supervisor's own small allowance is apart).
fn cgroup_usage(parents: &[PathBuf], id: &str) -> Usage {
    let workload = Place::Workload.dir(Path::new("")).display().to_string();
    let file = |rel: &str| read_any(parents, id, rel);
    let leaf = |name: &str| file(&format!("{workload}/{name}"));
    let Some(procs) = leaf("cgroup.procs") else {
        return Usage {
            source: "none",
            ..Usage::default()
        };
    };
    let memory_bytes = leaf("memory.usage_in_bytes")
        .or_else(|| leaf("memory.current"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let memory_limit_bytes = leaf("memory.limit_in_bytes")
        .or_else(|| leaf("memory.max"))
        .and_then(|v| parse_limit(&v))
        .unwrap_or(0);
    let pids = leaf("pids.current")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| u32::try_from(procs.lines().count()).unwrap_or(u32::MAX));
    let pids_limit = leaf("pids.max")
        .and_then(|v| parse_limit(&v))
        .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
    let cpu_limit_millis = match file("cpu.max") {
        Some(max) => parse_cpu_max(&max),
        None => {
            let period = file("cpu.cfs_period_us")
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(CPU_PERIOD_US);
            cpu_millis(
                file("cpu.cfs_quota_us").and_then(|q| parse_limit(&q)),
                period,
            )
        }
    };
    // v2 counts it; v1 here has cpuacct apart from cpu (the launcher does
    // not join it), so add up the live processes of both leaves, each with
    // the children it reaped.
    let cpu_ns = file("cpu.stat")
        .and_then(|s| parse_cpu_stat(&s))
        .or_else(|| file("cpuacct.usage").and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| {
            let mut ticks = 0;
            for place in Place::LEAVES {
                let rel = format!("{}/cgroup.procs", place.dir(Path::new("")).display());
                for pid in file(&rel).unwrap_or_default().lines() {
                    ticks += read(&Path::new("/proc").join(pid.trim()).join("stat"))
                        .and_then(|s| parse_proc_stat_ticks(&s))
                        .unwrap_or(0);
                }
            }
            ticks_to_ns(ticks)
        });
    Usage {
        source: "cgroup",
        cpu_ns,
        cpu_limit_millis,
        memory_bytes,
        memory_limit_bytes,
        pids,
        pids_limit,
        ..Usage::default()
    }
}

/// A VM: the host's view of its QEMU process, against the VM's size.
fn qemu_usage(pid: i32) -> Usage {
    let proc = Path::new("/proc").join(pid.to_string());
    let Some(stat) = read(&proc.join("stat")) else {
        return Usage {
            source: "none",
            ..Usage::default()
        };
    };
    let (memory_bytes, threads) =
        parse_proc_status(&read(&proc.join("status")).unwrap_or_default());
    let (memory_limit_bytes, cpu_limit_millis) =
        parse_qemu_size(&std::fs::read(proc.join("cmdline")).unwrap_or_default());
    Usage {
        source: "qemu",
        cpu_ns: ticks_to_ns(parse_proc_stat_ticks(&stat).unwrap_or(0)),
        cpu_limit_millis,
        memory_bytes,
        memory_limit_bytes,
        pids: threads,
        ..Usage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_read_back_as_numbers_or_none() {
        assert_eq!(parse_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("-1"), None);
        assert_eq!(parse_limit("9223372036854771712"), None, "v1's unlimited");
        assert_eq!(cpu_millis(Some(50_000), 100_000), 500);
        assert_eq!(cpu_millis(None, 100_000), 0);
        assert_eq!(parse_cpu_max("max 100000\n"), 0);
        assert_eq!(parse_cpu_max("200000 100000\n"), 2000);
        assert_eq!(
            parse_cpu_stat("usage_usec 1500\nuser_usec 1000\n"),
            Some(1_500_000)
        );
    }

    #[test]
    fn proc_files_give_cpu_ticks_memory_and_threads() {
        let stat = "4242 (qemu (x) y) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 0";
        // utime 11, stime 12, cutime 13, cstime 14.
        assert_eq!(parse_proc_stat_ticks(stat), Some(50));
        assert_eq!(parse_proc_stat_ticks("garbage"), None);
        let status = "Name:\tqemu\nVmRSS:\t  204800 kB\nThreads:\t5\n";
        assert_eq!(parse_proc_status(status), (200 << 20, 5));
    }

    #[test]
    fn a_vms_size_is_read_from_qemus_command_line() {
        let cmdline = [
            "qemu-system-x86_64",
            "-m",
            "512",
            "-smp",
            "2",
            "-nodefaults",
            "",
        ]
        .join("\0");
        assert_eq!(parse_qemu_size(cmdline.as_bytes()), (512 << 20, 2000));
        assert_eq!(parse_qemu_size(b""), (0, 0));
    }

    #[test]
    fn the_qgroup_row_gives_referenced_bytes() {
        let show = "qgroupid         rfer         excl     max_rfer \n--------         ----         ----     -------- \n0/257        16384        16384   8589934592 \n";
        assert_eq!(parse_qgroup_rfer(show), Some(16384));
        assert_eq!(parse_qgroup_rfer(""), None);
    }
}
