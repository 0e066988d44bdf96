//! The pure half of the cgroup code: which hierarchy, which directories,
//! which writes. Everything here takes text the kernel gave (mountinfo,
//! `/proc/self/cgroup`, `cgroup.controllers`) and returns a decision, so every
//! rule is a unit test; the launcher's `cgroup` module does the reads and
//! writes, and the gateway uses [`sandbox_parents`] to find leftovers.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::LaunchConfig;

/// CFS period; the quota is `cpu_millis` thousandths of it.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Every sandbox's CPU weight, half a default cgroup's (v1 `cpu.shares`
/// 1024, v2 `cpu.weight` 100): under contention the gateway and the host
/// keep twice a sandbox's share, whatever its limit. A weight bounds
/// nothing while the CPUs are idle; `cpu_millis` is the cap.
pub const CPU_SHARES_V1: u64 = 512;
pub const CPU_WEIGHT_V2: u64 = 50;

/// Where sandboxes go, under each v1 controller's mount or the v2 base.
pub const SANDBOXES: &str = "openshell";

/// The memory the supervisor may use beside sandbox code's limit: enough
/// for its runtime and relays' bounded buffers, small enough that a
/// supervisor bug cannot take the host's memory.
pub const SUPERVISOR_MEMORY_MIB: u64 = 128;

/// Where in a sandbox's cgroup a process or a limit goes. A sandbox's
/// directory holds two leaves, so that sandbox code filling its memory or
/// tasks limit (with tmpfs pages no OOM kill frees, say) can never get its
/// supervisor killed or starved (issue 14 item 7):
///
/// - `supervisor`: for a supervised launch, init and the program (the
///   supervisor); its own small memory limit and no tasks limit.
/// - `workload`: sandbox code, under the spec's memory and tasks limits;
///   for a launch that is not supervised, init and the program too.
///
/// The CPU quota and weight are the sandbox's as a whole, on its directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Sandbox,
    Supervisor,
    Workload,
}

impl Place {
    /// The two leaves, in the order they are created (removed in reverse).
    pub const LEAVES: [Place; 2] = [Place::Supervisor, Place::Workload];

    /// A sandbox's cgroup directories in the order they can be removed
    /// (only an empty cgroup without children can be): leaves first.
    pub fn removal_order(sandbox: &Path) -> [PathBuf; 3] {
        [
            Place::Workload.dir(sandbox),
            Place::Supervisor.dir(sandbox),
            sandbox.to_owned(),
        ]
    }

    /// The directory for this place in the sandbox's cgroup `sandbox`.
    pub fn dir(self, sandbox: &Path) -> PathBuf {
        match self {
            Place::Sandbox => sandbox.to_owned(),
            Place::Supervisor => sandbox.join("supervisor"),
            Place::Workload => sandbox.join("workload"),
        }
    }
}

/// On v2, the leaf the processes of the base cgroup are moved into, so that
/// the base may hand controllers to the sandboxes (the "no internal
/// processes" rule). Launchers started by the gateway are born in it.
pub const GATEWAY_LEAF: &str = "openshell-gateway";

/// Where every sandbox's cgroup lives, as the launcher lays them out for a
/// launcher born in the cgroup `proc_self_cgroup` describes (the gateway's
/// children are born in the gateway's): `<mount>/openshell` for each v1
/// controller mounted, or `<base>/openshell` on v2. Empty when there is no
/// hierarchy under `under`.
pub fn sandbox_parents(mountinfo: &str, proc_self_cgroup: &str, under: &Path) -> Vec<PathBuf> {
    let mounts = parse_mountinfo(mountinfo);
    let mut parents: Vec<PathBuf> = match choose(&mounts, under) {
        Hierarchy::V1 { mounts } => mounts
            .into_iter()
            .map(|(_, mount)| mount.join(SANDBOXES))
            .collect(),
        Hierarchy::V2 { mount_point, root } => own_v2_cgroup(proc_self_cgroup)
            .and_then(|own| v2_base(&mount_point, &root, &own).ok())
            .map(|base| base.join(SANDBOXES))
            .into_iter()
            .collect(),
        Hierarchy::Absent => Vec::new(),
    };
    // Controllers mounted together (cpu,cpuacct) share one directory.
    parents.sort();
    parents.dedup();
    parents
}

/// The controllers a sandbox's limits use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    /// The kernel's name for it, in mount options and `cgroup.controllers`.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A cgroup filesystem, from one line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    /// The cgroup the mount shows at its mount point (`/` unless a container
    /// was given a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub version: CgroupVersion,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// A v1 hierarchy and the controllers bound to it (`name=systemd` has none).
    V1 {
        controllers: Vec<String>,
    },
    V2,
}

/// Every cgroup mount in mountinfo text, in order.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// `36 25 0:32 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup rw,memory`:
/// id, parent, device, root, mount point, options, optional fields up to
/// `-`, then filesystem type, source and superblock options.
fn parse_mountinfo_line(line: &str) -> Option<CgroupMount> {
    let mut fields = line.split(' ');
    let root = unescape(fields.nth(3)?);
    let mount_point = unescape(fields.next()?);
    let mut after_dash = fields.skip_while(|field| *field != "-").skip(1);
    let fs_type = after_dash.next()?;
    let super_options = after_dash.nth(1).unwrap_or_default();
    let version = match fs_type {
        "cgroup2" => CgroupVersion::V2,
        "cgroup" => CgroupVersion::V1 {
            controllers: super_options
                .split(',')
                .filter(|option| Controller::ALL.iter().any(|c| c.name() == *option))
                .map(str::to_owned)
                .collect(),
        },
        _ => return None,
    };
    Some(CgroupMount {
        root: root.into(),
        mount_point: mount_point.into(),
        version,
    })
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which hierarchy a sandbox's limits go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// The mount point of each of our controllers that a v1 hierarchy carries.
    V1 { mounts: Vec<(Controller, PathBuf)> },
    /// The unified hierarchy, and the cgroup its mount point shows.
    V2 { mount_point: PathBuf, root: PathBuf },
    /// No cgroup filesystem at all.
    Absent,
}

/// Chooses among the mounts at or under `under`: v1 if any of them carries
/// one of our controllers (a hybrid host binds them all to v1, leaving its
/// cgroup2 mount without them), else cgroup2, else nothing.
pub fn choose(mounts: &[CgroupMount], under: &Path) -> Hierarchy {
    let visible: Vec<&CgroupMount> = mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(under))
        .collect();
    let mut v1 = Vec::new();
    for controller in Controller::ALL {
        let carrier = visible.iter().find(|m| match &m.version {
            CgroupVersion::V1 { controllers } => controllers.iter().any(|c| c == controller.name()),
            CgroupVersion::V2 => false,
        });
        if let Some(mount) = carrier {
            v1.push((controller, mount.mount_point.clone()));
        }
    }
    if !v1.is_empty() {
        return Hierarchy::V1 { mounts: v1 };
    }
    match visible.iter().find(|m| m.version == CgroupVersion::V2) {
        Some(mount) => Hierarchy::V2 {
            mount_point: mount.mount_point.clone(),
            root: mount.root.clone(),
        },
        None => Hierarchy::Absent,
    }
}

/// One value written into a controller file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitWrite {
    pub controller: Controller,
    pub place: Place,
    pub file: &'static str,
    pub value: String,
    /// Skipped when the kernel lacks the file (swap accounting is optional,
    /// and without it there is no swap to limit).
    pub optional: bool,
}

/// The controllers a config's limits need: each must be there, or the launch fails.
pub fn required(config: &LaunchConfig) -> BTreeSet<Controller> {
    let mut needed = BTreeSet::new();
    if config.memory_bytes().is_some() {
        needed.insert(Controller::Memory);
    }
    if config.max_processes > 0 {
        needed.insert(Controller::Pids);
    }
    if config.cpu_millis > 0 {
        needed.insert(Controller::Cpu);
    }
    needed
}

fn write(
    controller: Controller,
    place: Place,
    file: &'static str,
    value: String,
    optional: bool,
) -> LimitWrite {
    LimitWrite {
        controller,
        place,
        file,
        value,
        optional,
    }
}

/// What to write on v1, in order. No limit means no write: a fresh cgroup is
/// unlimited.
pub fn v1_writes(config: &LaunchConfig) -> Vec<LimitWrite> {
    let mut writes = Vec::new();
    for (place, bytes) in memory_limits(config) {
        // memsw (memory + swap) must never be below the memory limit, so it
        // comes second; equal values mean the sandbox cannot use swap.
        let bytes = bytes.to_string();
        let memory = Controller::Memory;
        writes.push(write(
            memory,
            place,
            "memory.limit_in_bytes",
            bytes.clone(),
            false,
        ));
        writes.push(write(
            memory,
            place,
            "memory.memsw.limit_in_bytes",
            bytes,
            true,
        ));
    }
    if config.max_processes > 0 {
        let max = config.max_processes.to_string();
        writes.push(write(
            Controller::Pids,
            Place::Workload,
            "pids.max",
            max,
            false,
        ));
    }
    let cpu = |file, value: u64, optional| {
        write(
            Controller::Cpu,
            Place::Sandbox,
            file,
            value.to_string(),
            optional,
        )
    };
    if config.cpu_millis > 0 {
        writes.push(cpu("cpu.cfs_period_us", CPU_PERIOD_US, false));
        writes.push(cpu(
            "cpu.cfs_quota_us",
            config.cpu_millis * CPU_PERIOD_US / 1000,
            false,
        ));
    }
    // The cpu controller's directory exists whenever it is mounted, limit
    // or not, so the default weight applies to every sandbox on v1.
    writes.push(cpu("cpu.shares", CPU_SHARES_V1, true));
    writes
}

/// What to write on v2, in order; the same limits as [`v1_writes`].
pub fn v2_writes(config: &LaunchConfig) -> Vec<LimitWrite> {
    let mut writes = Vec::new();
    for (place, bytes) in memory_limits(config) {
        let memory = Controller::Memory;
        writes.push(write(memory, place, "memory.max", bytes.to_string(), false));
        // v2 limits swap on its own (not memory + swap): none, as on v1.
        writes.push(write(memory, place, "memory.swap.max", "0".into(), true));
    }
    if config.max_processes > 0 {
        let max = config.max_processes.to_string();
        writes.push(write(
            Controller::Pids,
            Place::Workload,
            "pids.max",
            max,
            false,
        ));
    }
    if config.cpu_millis > 0 {
        let quota = config.cpu_millis * CPU_PERIOD_US / 1000;
        let cpu = |file, value| write(Controller::Cpu, Place::Sandbox, file, value, false);
        writes.push(cpu("cpu.max", format!("{quota} {CPU_PERIOD_US}")));
        // On v2 the cpu controller is enabled only for a cpu limit (a
        // controller the gateway's cgroup was not delegated would fail the
        // launch), so the default weight comes with it.
        writes.push(cpu("cpu.weight", CPU_WEIGHT_V2.to_string()));
    }
    writes
}

/// The memory limits in bytes and where they go: sandbox code's, and with
/// it (for a supervised launch) the supervisor's own.
fn memory_limits(config: &LaunchConfig) -> Vec<(Place, u64)> {
    let Some(bytes) = config.memory_bytes() else {
        return Vec::new();
    };
    let mut limits = vec![(Place::Workload, bytes)];
    if config.supervised {
        limits.push((Place::Supervisor, SUPERVISOR_MEMORY_MIB << 20));
    }
    limits
}

/// The v1 plan: a directory under each mounted controller, or the first
/// controller a limit needs that no hierarchy carries.
pub fn v1_dirs(
    mounts: &[(Controller, PathBuf)],
    config: &LaunchConfig,
) -> Result<Vec<(Controller, PathBuf)>, Controller> {
    if let Some(missing) = required(config)
        .into_iter()
        .find(|needed| !mounts.iter().any(|(c, _)| c == needed))
    {
        return Err(missing);
    }
    Ok(mounts
        .iter()
        .map(|(c, mount)| (*c, mount.join(SANDBOXES).join(&config.sandbox_id)))
        .collect())
}

/// This process's cgroup in the unified hierarchy: the `0::<path>` line of
/// `/proc/self/cgroup`.
pub fn own_v2_cgroup(proc_self_cgroup: &str) -> Option<PathBuf> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .filter(|path| path.starts_with('/'))
        .map(PathBuf::from)
}

/// Why the v2 base could not be found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutsideMount;

/// The directory of the base cgroup: the one the gateway was started in.
/// A launcher born in the [`GATEWAY_LEAF`] (because an earlier launch moved
/// the gateway there) uses the leaf's parent. `own` and `mount_root` are both
/// cgroup paths; the result is `mount_point` plus `own` relative to the
/// mount's root.
pub fn v2_base(mount_point: &Path, mount_root: &Path, own: &Path) -> Result<PathBuf, OutsideMount> {
    let own = match own.file_name() {
        Some(name) if name == GATEWAY_LEAF => own.parent().unwrap_or(own),
        _ => own,
    };
    let relative = own.strip_prefix(mount_root).map_err(|_| OutsideMount)?;
    Ok(mount_point.join(relative))
}

/// Names in a `cgroup.controllers` or `cgroup.subtree_control` file.
pub fn controller_names(text: &str) -> BTreeSet<&str> {
    text.split_whitespace().collect()
}

/// The first of `needed` that `available` (a `cgroup.controllers` file)
/// lacks.
pub fn first_missing(needed: &BTreeSet<Controller>, available: &str) -> Option<Controller> {
    let available = controller_names(available);
    needed
        .iter()
        .copied()
        .find(|c| !available.contains(c.name()))
}

/// The `cgroup.subtree_control` line enabling those of `needed` that
/// `enabled` lacks; `None` if nothing is missing.
pub fn enable_line(needed: &BTreeSet<Controller>, enabled: &str) -> Option<String> {
    let enabled = controller_names(enabled);
    let line: Vec<String> = needed
        .iter()
        .filter(|c| !enabled.contains(c.name()))
        .map(|c| format!("+{c}"))
        .collect();
    (!line.is_empty()).then(|| line.join(" "))
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

    /// This machine's: v1 controllers plus a v2 mount without them.
    const HYBRID: &str = "\
25 1 0:23 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// Current Debian, Ubuntu, Fedora: only the unified hierarchy.
    const UNIFIED: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
26 22 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
30 26 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    /// Debian 10 style: cpu co-mounted with cpuacct.
    const COMOUNTED: &str = "\
30 26 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
31 26 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,memory
";

    #[test]
    fn mountinfo_yields_only_cgroup_mounts_with_their_controllers() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 6);
        assert_eq!(
            mounts[0],
            CgroupMount {
                root: "/".into(),
                mount_point: "/sys/fs/cgroup/cpu".into(),
                version: CgroupVersion::V1 {
                    controllers: vec!["cpu".into()]
                },
            }
        );
        assert_eq!(
            mounts[4].version,
            CgroupVersion::V1 {
                controllers: vec![]
            }
        );
        assert_eq!(mounts[5].version, CgroupVersion::V2);
        assert_eq!(
            parse_mountinfo(COMOUNTED)[0].version,
            CgroupVersion::V1 {
                controllers: vec!["cpu".into()]
            }
        );
    }

    #[test]
    fn mountinfo_optional_fields_and_escapes_are_understood() {
        let line =
            r"40 30 0:40 /a\040b /mnt/my\040cgroups\134x rw shared:5 master:2 - cgroup2 none rw";
        assert_eq!(
            parse_mountinfo(line),
            [CgroupMount {
                root: "/a b".into(),
                mount_point: r"/mnt/my cgroups\x".into(),
                version: CgroupVersion::V2,
            }]
        );
        assert_eq!(unescape(r"a\0b\12"), r"a\0b\12", "not an escape");
    }

    #[test]
    fn malformed_mountinfo_lines_are_ignored() {
        assert!(parse_mountinfo("\n1 2\n1 2 3 / /x rw cgroup2\n").is_empty());
    }

    #[test]
    fn a_hybrid_host_stays_on_v1() {
        let chosen = choose(&parse_mountinfo(HYBRID), Path::new("/"));
        assert_eq!(
            chosen,
            Hierarchy::V1 {
                mounts: vec![
                    (Controller::Memory, "/sys/fs/cgroup/memory".into()),
                    (Controller::Pids, "/sys/fs/cgroup/pids".into()),
                    (Controller::Cpu, "/sys/fs/cgroup/cpu".into()),
                ]
            }
        );
    }

    #[test]
    fn a_unified_only_host_uses_v2() {
        assert_eq!(
            choose(&parse_mountinfo(UNIFIED), Path::new("/")),
            Hierarchy::V2 {
                mount_point: "/sys/fs/cgroup".into(),
                root: "/".into()
            }
        );
    }

    #[test]
    fn only_mounts_under_the_cgroup_root_count() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(
            choose(&mounts, Path::new("/sys/fs/cgroup/unified")),
            Hierarchy::V2 {
                mount_point: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            }
        );
        assert_eq!(
            choose(&mounts, Path::new("/sys/fs/cgroup/pids")),
            Hierarchy::V1 {
                mounts: vec![(Controller::Pids, "/sys/fs/cgroup/pids".into())]
            }
        );
        // Component-wise: `/sys/fs/cgroup/p` is not a prefix of `.../pids`.
        assert_eq!(
            choose(&mounts, Path::new("/sys/fs/cgroup/p")),
            Hierarchy::Absent
        );
        assert_eq!(choose(&mounts, Path::new("/tmp")), Hierarchy::Absent);
    }

    #[test]
    fn a_v1_limit_without_its_controller_is_refused_not_skipped() {
        let mounts = [(Controller::Pids, PathBuf::from("/cg/pids"))];
        assert_eq!(
            v1_dirs(&mounts, &config_with(64, 0, 0)),
            Err(Controller::Memory)
        );
        assert_eq!(
            v1_dirs(&mounts, &config_with(0, 0, 100)),
            Err(Controller::Cpu)
        );
        assert_eq!(
            v1_dirs(&mounts, &config_with(0, 8, 0)),
            Ok(vec![(Controller::Pids, "/cg/pids/openshell/s".into())])
        );
        // Without a limit the controller is not needed: no directory, no error.
        assert_eq!(v1_dirs(&[], &config_with(0, 0, 0)), Ok(vec![]));
    }

    #[test]
    fn only_configured_limits_require_a_controller() {
        assert!(required(&config_with(0, 0, 0)).is_empty());
        assert_eq!(
            required(&config_with(1, 1, 10)),
            BTreeSet::from(Controller::ALL)
        );
        assert_eq!(
            required(&config_with(0, 4, 0)),
            BTreeSet::from([Controller::Pids])
        );
    }

    #[test]
    fn no_limits_write_only_the_default_cpu_weight() {
        assert_eq!(
            files(&v1_writes(&config_with(0, 0, 0))),
            [("cpu.shares", "512")]
        );
        // v2 enables no controller without a limit, so it writes nothing.
        assert!(v2_writes(&config_with(0, 0, 0)).is_empty());
        // With a cpu limit v2 gets the same half weight.
        let v2 = v2_writes(&config_with(0, 0, 250));
        assert_eq!(files(&v2).last(), Some(&("cpu.weight", "50")));
    }

    #[test]
    fn v1_memory_is_limited_in_bytes_with_swap_capped_at_the_same_value() {
        let writes = v1_writes(&config_with(32, 0, 0));
        assert_eq!(
            files(&writes)[..2],
            [
                ("memory.limit_in_bytes", "33554432"),
                ("memory.memsw.limit_in_bytes", "33554432")
            ]
        );
        assert!(!writes[0].optional && writes[1].optional);
    }

    #[test]
    fn v2_memory_is_limited_in_bytes_with_no_swap() {
        let writes = v2_writes(&config_with(32, 0, 0));
        assert_eq!(
            files(&writes),
            [("memory.max", "33554432"), ("memory.swap.max", "0")]
        );
        assert!(!writes[0].optional && writes[1].optional);
    }

    #[test]
    fn pids_are_limited_by_count_on_both_versions() {
        for writes in [
            v1_writes(&config_with(0, 8, 0)),
            v2_writes(&config_with(0, 8, 0)),
        ] {
            assert_eq!(files(&writes)[..1], [("pids.max", "8")]);
        }
    }

    #[test]
    fn cpu_millis_are_thousandths_of_a_100ms_period() {
        assert_eq!(
            files(&v1_writes(&config_with(0, 0, 250)))[..2],
            [
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "25000")
            ]
        );
        assert_eq!(
            files(&v1_writes(&config_with(0, 0, 2000)))[1],
            ("cpu.cfs_quota_us", "200000")
        );
        assert_eq!(
            files(&v2_writes(&config_with(0, 0, 250)))[..1],
            [("cpu.max", "25000 100000")]
        );
    }

    #[test]
    fn every_write_belongs_to_a_required_controller() {
        let config = config_with(16, 16, 500);
        for write in v1_writes(&config).iter().chain(&v2_writes(&config)) {
            assert!(required(&config).contains(&write.controller), "{write:?}");
        }
    }

    #[test]
    fn the_own_cgroup_is_the_unified_line_of_proc_self_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/user.slice/a.scope\n";
        assert_eq!(own_v2_cgroup(hybrid), Some("/user.slice/a.scope".into()));
        assert_eq!(own_v2_cgroup("0::/\n"), Some("/".into()));
        assert_eq!(own_v2_cgroup("4:memory:/x\n"), None);
    }

    /// Issue 13: the gateway finds leftover sandbox cgroups where the
    /// launcher made them, on v2 as on v1, even after the first launch moved
    /// the gateway into its leaf.
    #[test]
    fn the_gateway_sweeps_where_launchers_put_sandbox_cgroups() {
        let root = Path::new("/");
        for own in [
            "/system.slice/os.service",
            "/system.slice/os.service/openshell-gateway",
        ] {
            assert_eq!(
                sandbox_parents(UNIFIED, &format!("0::{own}\n"), root),
                [PathBuf::from(
                    "/sys/fs/cgroup/system.slice/os.service/openshell"
                )],
                "from {own}"
            );
        }
        assert_eq!(
            sandbox_parents(COMOUNTED, "", root),
            [
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/openshell"),
                PathBuf::from("/sys/fs/cgroup/memory/openshell"),
            ]
        );
        let hybrid = sandbox_parents(HYBRID, "0::/user.slice\n", root);
        assert!(
            hybrid.contains(&PathBuf::from("/sys/fs/cgroup/pids/openshell")),
            "{hybrid:?}"
        );
        assert!(
            !hybrid
                .iter()
                .any(|p| p.starts_with("/sys/fs/cgroup/unified")),
            "{hybrid:?}"
        );
        assert!(sandbox_parents("", "0::/\n", root).is_empty());
        assert!(
            sandbox_parents(UNIFIED, "4:memory:/x\n", root).is_empty(),
            "no v2 line, no guess"
        );
    }

    #[test]
    fn the_v2_base_is_the_gateways_cgroup_even_from_its_leaf() {
        let mount = Path::new("/sys/fs/cgroup");
        let root = Path::new("/");
        let service = Path::new("/system.slice/openshell.service");
        assert_eq!(
            v2_base(mount, root, service),
            Ok("/sys/fs/cgroup/system.slice/openshell.service".into())
        );
        assert_eq!(
            v2_base(mount, root, &service.join(GATEWAY_LEAF)),
            Ok("/sys/fs/cgroup/system.slice/openshell.service".into())
        );
        assert_eq!(v2_base(mount, root, root), Ok(mount.into()));
        assert_eq!(
            v2_base(mount, root, &root.join(GATEWAY_LEAF)),
            Ok(mount.into())
        );
    }

    #[test]
    fn a_v2_mount_of_a_subtree_is_joined_relative_to_its_root() {
        let mount = Path::new("/mnt/cg");
        let root = Path::new("/system.slice");
        assert_eq!(
            v2_base(mount, root, Path::new("/system.slice/gw.service")),
            Ok("/mnt/cg/gw.service".into())
        );
        assert_eq!(
            v2_base(mount, root, Path::new("/user.slice")),
            Err(OutsideMount)
        );
    }

    #[test]
    fn a_v2_limit_needs_its_controller_delegated() {
        let needed = BTreeSet::from([Controller::Memory, Controller::Pids]);
        assert_eq!(first_missing(&needed, "cpu io memory pids\n"), None);
        assert_eq!(
            first_missing(&needed, "hugetlb\n"),
            Some(Controller::Memory)
        );
        assert_eq!(first_missing(&needed, "memory\n"), Some(Controller::Pids));
        assert_eq!(first_missing(&BTreeSet::new(), ""), None);
    }

    #[test]
    fn only_controllers_not_yet_enabled_are_enabled() {
        let needed = BTreeSet::from(Controller::ALL);
        assert_eq!(enable_line(&needed, ""), Some("+memory +pids +cpu".into()));
        assert_eq!(enable_line(&needed, "cpu memory\n"), Some("+pids".into()));
        assert_eq!(enable_line(&needed, "cpu io memory pids\n"), None);
        assert_eq!(enable_line(&BTreeSet::new(), ""), None);
    }
}
