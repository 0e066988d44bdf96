//! `openshell doctor`: can this host run sandboxes, and what to fix.
//!
//! [`gather`] reads the host once into [`Facts`]; [`checks`] turns them
//! into verdicts with no I/O, so every verdict is unit-tested. It uses the
//! rules the gateway uses: the launcher's cgroup choice
//! (`cgroup_plan::choose`) and the VM runtime's own loader and cached boot
//! probe (`openshell_vm::runtime`), never `/dev/kvm` alone, which proves
//! nothing (a PVM `/dev/kvm` opens but boots no unmodified guest).
//!
//! Exit 1 only when process sandboxes cannot run; what only VMs need is a
//! warning.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use openshell_sandbox_launch::cgroup_plan::{self, Controller, Hierarchy};
use openshell_vm::runtime::{BackendChoice, Probe, VmRuntime};

use crate::args::Doctor;

/// GiB a gateway keeps free by default (`--disk-reserve-gib`).
const RESERVE_GIB: u64 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub level: Level,
    pub what: &'static str,
    pub says: String,
}

/// What the host looks like, read once.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub root: bool,
    /// `/proc/sys/user/max_user_namespaces`.
    pub max_user_namespaces: Option<u64>,
    /// `/proc/self/mountinfo`.
    pub mountinfo: String,
    /// `cgroup.controllers` of the cgroup2 mount, on a v2 host.
    pub v2_controllers: Option<String>,
    /// `/proc/filesystems` lists `overlay`.
    pub overlayfs: bool,
    pub dev_kvm: bool,
    /// Loaded kvm modules (`kvm_intel`, `kvm_amd`, `kvm_pvm`).
    pub kvm_modules: Vec<String>,
    /// `qemu-system-x86_64` on PATH or in the runtime.
    pub qemu: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    /// What loading the runtime said: its backend, or what is missing.
    pub runtime: Option<Result<String, String>>,
    /// The runtime's cached probe file, if any.
    pub probe: Option<Probe>,
    /// Launcher and supervisor next to this binary: (name, found).
    pub binaries: Vec<(&'static str, bool)>,
    pub state_dir: PathBuf,
    /// Free bytes on the state dir's filesystem (or its nearest parent).
    pub free_bytes: Option<u64>,
}

pub fn run(a: Doctor) -> ExitCode {
    let checks = checks(&gather(a));
    for c in &checks {
        let tag = match c.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        println!("{tag}  {:<16} {}", c.what, c.says);
    }
    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    let warned = checks.iter().filter(|c| c.level == Level::Warn).count();
    if failed > 0 {
        println!("{failed} problem(s) stop process sandboxes here; fix the FAIL lines first.");
        ExitCode::FAILURE
    } else {
        println!("process sandboxes can run here ({warned} warning(s)).");
        ExitCode::SUCCESS
    }
}

pub fn gather(a: Doctor) -> Facts {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mountinfo = read("/proc/self/mountinfo").unwrap_or_default();
    let v2_controllers =
        match cgroup_plan::choose(&cgroup_plan::parse_mountinfo(&mountinfo), Path::new("/")) {
            Hierarchy::V2 { mount_point, .. } => {
                std::fs::read_to_string(mount_point.join("cgroup.controllers")).ok()
            }
            Hierarchy::V1 { .. } | Hierarchy::Absent => None,
        };
    let kvm_modules = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .map(str::to_owned)
        .collect();
    let runtime_dir = a.vm_runtime.clone();
    let runtime = runtime_dir.as_deref().map(|dir| {
        VmRuntime::load(dir, BackendChoice::Auto)
            .map(|rt| rt.backend.as_str().to_owned())
            .map_err(|e| e.to_string())
    });
    let probe = runtime_dir
        .as_deref()
        .and_then(|d| std::fs::read_to_string(d.join("backend")).ok())
        .map(|text| Probe::parse(&text));
    let staged_qemu = runtime_dir
        .as_deref()
        .map(|d| d.join("bin/qemu-system-x86_64"))
        .filter(|p| p.is_file());
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned));
    let binaries = ["openshell-sandbox-launch", "openshell-supervisor"]
        .into_iter()
        .map(|b| (b, exe_dir.as_deref().is_some_and(|d| d.join(b).is_file())))
        .collect();
    let state_dir = a
        .state_dir
        .unwrap_or_else(crate::gateway::default_state_dir);
    Facts {
        root: rustix::process::geteuid().is_root(),
        max_user_namespaces: read("/proc/sys/user/max_user_namespaces")
            .and_then(|s| s.trim().parse().ok()),
        mountinfo,
        v2_controllers,
        overlayfs: read("/proc/filesystems").is_some_and(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("overlay"))
        }),
        dev_kvm: Path::new("/dev/kvm").exists(),
        kvm_modules,
        qemu: staged_qemu.or_else(|| on_path("qemu-system-x86_64")),
        runtime_dir,
        runtime,
        probe,
        binaries,
        free_bytes: free_bytes(&state_dir),
        state_dir,
    }
}

/// Every verdict, in the order a reader fixes them. Pure.
pub fn checks(f: &Facts) -> Vec<Check> {
    let check = |level, what, says: String| Check { level, what, says };
    let mut out = Vec::new();
    out.push(if f.root {
        check(Level::Ok, "root", "running as root".into())
    } else {
        check(
            Level::Fail,
            "root",
            "not root: the gateway needs root (namespaces, cgroups, idmapped mounts); run it with sudo".into(),
        )
    });
    out.push(match f.max_user_namespaces {
        Some(n) if n > 0 => check(
            Level::Ok,
            "user namespaces",
            format!("enabled (user.max_user_namespaces = {n})"),
        ),
        Some(_) => check(
            Level::Fail,
            "user namespaces",
            "disabled (user.max_user_namespaces = 0): sysctl -w user.max_user_namespaces=15000".into(),
        ),
        None => check(
            Level::Fail,
            "user namespaces",
            "this kernel has none (no /proc/sys/user/max_user_namespaces): use a kernel built with CONFIG_USER_NS".into(),
        ),
    });
    out.push(cgroup_check(f));
    out.push(if f.overlayfs {
        check(
            Level::Ok,
            "overlayfs",
            "available (sandboxes rooted in images)".into(),
        )
    } else {
        check(
            Level::Warn,
            "overlayfs",
            "not in /proc/filesystems: sandboxes rooted in images need it; modprobe overlay".into(),
        )
    });
    out.push(kvm_check(f));
    out.extend(vm_checks(f));
    for (name, found) in &f.binaries {
        out.push(if *found {
            check(Level::Ok, "binaries", format!("{name} is next to openshell"))
        } else {
            check(
                Level::Fail,
                "binaries",
                format!(
                    "{name} is not next to openshell: install with `just install` (or pass gateway start --launcher/--supervisor)"
                ),
            )
        });
    }
    // STATE/sandboxes/<uuid>/run/gateway.sock must fit a unix socket path.
    let socket =
        f.state_dir.as_os_str().len() + "/sandboxes/".len() + 36 + "/run/gateway.sock".len();
    out.push(if socket <= openshell_vm::MAX_SOCKET_PATH {
        check(
            Level::Ok,
            "state dir",
            format!("{} (sandbox sockets fit)", f.state_dir.display()),
        )
    } else {
        check(
            Level::Fail,
            "state dir",
            format!(
                "{} is too deep: a sandbox's socket path would be {socket} bytes, unix sockets allow {}; pass a shorter --state-dir",
                f.state_dir.display(),
                openshell_vm::MAX_SOCKET_PATH
            ),
        )
    });
    out.push(match f.free_bytes {
        Some(free) if free >= RESERVE_GIB << 30 => check(
            Level::Ok,
            "disk",
            format!(
                "{} free for {} (creates need {RESERVE_GIB} GiB free)",
                crate::output::bytes(free),
                f.state_dir.display()
            ),
        ),
        Some(free) => check(
            Level::Warn,
            "disk",
            format!(
                "only {} free for {}: creates are refused below {RESERVE_GIB} GiB (--disk-reserve-gib); free some space",
                crate::output::bytes(free),
                f.state_dir.display()
            ),
        ),
        None => check(
            Level::Warn,
            "disk",
            format!("cannot tell the free space for {}", f.state_dir.display()),
        ),
    });
    out
}

/// The launcher's own choice of hierarchy, and whether it has the
/// controllers limits need (limits fail closed without them).
fn cgroup_check(f: &Facts) -> Check {
    let names = |cs: &[Controller]| cs.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ");
    let mounts = cgroup_plan::parse_mountinfo(&f.mountinfo);
    let (level, says) = match cgroup_plan::choose(&mounts, Path::new("/")) {
        Hierarchy::V1 { mounts } => {
            let have: Vec<Controller> = mounts.iter().map(|(c, _)| *c).collect();
            let missing: Vec<Controller> = Controller::ALL
                .into_iter()
                .filter(|c| !have.contains(c))
                .collect();
            if missing.is_empty() {
                (Level::Ok, format!("cgroup v1 ({} mounted)", names(&have)))
            } else {
                (
                    Level::Warn,
                    format!(
                        "cgroup v1 without {}: sandboxes asking for those limits fail to launch; mount the controller or boot with cgroup v2",
                        names(&missing)
                    ),
                )
            }
        }
        Hierarchy::V2 { mount_point, .. } => {
            let available = f.v2_controllers.as_deref().unwrap_or_default();
            let available = cgroup_plan::controller_names(available);
            let missing: Vec<Controller> = Controller::ALL
                .into_iter()
                .filter(|c| !available.contains(c.name()))
                .collect();
            if missing.is_empty() {
                (
                    Level::Ok,
                    format!(
                        "cgroup v2 at {} (memory, pids, cpu available)",
                        mount_point.display()
                    ),
                )
            } else {
                (
                    Level::Warn,
                    format!(
                        "cgroup v2 without {}: delegate them to the gateway's cgroup (cgroup.subtree_control) or limits fail to launch",
                        names(&missing)
                    ),
                )
            }
        }
        Hierarchy::Absent => (
            Level::Fail,
            "no cgroup filesystem mounted: mount cgroup2 on /sys/fs/cgroup".into(),
        ),
    };
    Check {
        level,
        what: "cgroups",
        says,
    }
}

fn kvm_check(f: &Facts) -> Check {
    let pvm = f.kvm_modules.iter().any(|m| m == "kvm_pvm");
    let (level, says) = match (f.dev_kvm, pvm) {
        (false, _) => (
            Level::Warn,
            "no /dev/kvm: VMs run under TCG (software emulation, no hardware isolation)".to_owned(),
        ),
        (true, true) => (
            Level::Warn,
            "/dev/kvm is PVM (kvm_pvm, a software nested hypervisor): unmodified guests die on it, so VMs run under TCG (software emulation, no hardware isolation)".to_owned(),
        ),
        (true, false) => (
            Level::Ok,
            format!(
                "/dev/kvm present ({}); the runtime's boot probe decides whether guests boot on it",
                if f.kvm_modules.is_empty() {
                    "module unknown".to_owned()
                } else {
                    f.kvm_modules.join(", ")
                }
            ),
        ),
    };
    Check {
        level,
        what: "kvm",
        says,
    }
}

/// QEMU, the staged runtime and what its boot probe found.
fn vm_checks(f: &Facts) -> Vec<Check> {
    let mut out = Vec::new();
    let tcg_verdict = f
        .probe
        .as_ref()
        .map(|p| p.qemu_tcg.clone())
        .filter(|v| !v.is_empty());
    out.push(match (&f.qemu, tcg_verdict) {
        (None, _) => Check {
            level: Level::Warn,
            what: "tcg",
            says: "qemu-system-x86_64 is not installed: VM sandboxes need it; run `just vm-stage`"
                .into(),
        },
        (Some(q), Some(v)) => Check {
            level: if v.starts_with("ok") {
                Level::Ok
            } else {
                Level::Warn
            },
            what: "tcg",
            says: format!("QEMU TCG ({}): {v}", q.display()),
        },
        (Some(q), None) => Check {
            level: Level::Ok,
            what: "tcg",
            says: if f.runtime_dir.is_some() {
                format!(
                    "QEMU TCG available ({}); its boot probe has not run: run `just vm-stage`",
                    q.display()
                )
            } else {
                format!(
                    "QEMU TCG available ({}); give --vm-runtime to see its boot probe",
                    q.display()
                )
            },
        },
    });
    let (level, says) = match (&f.runtime_dir, &f.runtime) {
        (None, _) | (_, None) => (
            Level::Warn,
            "no VM runtime given (--vm-runtime or OPENSHELL_VM_RUNTIME): VM sandboxes need one; run `just vm-stage` and pass its runtime/".to_owned(),
        ),
        (Some(dir), Some(Ok(backend))) => (
            Level::Ok,
            format!("staged at {}, VMs use {backend}", dir.display()),
        ),
        (Some(dir), Some(Err(e))) => (
            Level::Warn,
            format!(
                "{} cannot run VMs: {e}{}",
                dir.display(),
                if e.contains("just ") {
                    ""
                } else {
                    " (run `just vm-stage`)"
                }
            ),
        ),
    };
    out.push(Check {
        level,
        what: "vm runtime",
        says,
    });
    out
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Free bytes (for an unprivileged user, as the reserve counts them) on
/// the filesystem of `dir`, or of its nearest existing parent.
fn free_bytes(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let s = rustix::fs::statvfs(existing).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This project's machines: cgroup v1 (systemd's named hierarchy too),
    /// a PVM /dev/kvm, QEMU whose TCG probe booted.
    fn here() -> Facts {
        Facts {
            root: true,
            max_user_namespaces: Some(96369),
            mountinfo: [
                "30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755",
                "31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu",
                "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
                "33 30 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids",
                "34 30 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd",
            ]
            .join("\n"),
            overlayfs: true,
            dev_kvm: true,
            kvm_modules: vec!["kvm_pvm".into()],
            qemu: Some("/usr/bin/qemu-system-x86_64".into()),
            runtime_dir: Some("/rt".into()),
            runtime: Some(Ok("qemu-tcg".into())),
            probe: Some(Probe::parse(
                "backend=qemu-tcg\nqemu-kvm=unbootable: kvm_pvm\nqemu-tcg=ok: probe guest booted in 1.4s\n",
            )),
            binaries: vec![
                ("openshell-sandbox-launch", true),
                ("openshell-supervisor", true),
            ],
            state_dir: "/state".into(),
            free_bytes: Some(80 << 30),
            v2_controllers: None,
        }
    }

    fn find<'a>(checks: &'a [Check], what: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.what == what)
            .unwrap_or_else(|| panic!("no {what} check"))
    }

    #[test]
    fn this_machine_names_cgroup_v1_the_pvm_kvm_and_tcg_and_nothing_fails() {
        let checks = checks(&here());
        assert!(checks.iter().all(|c| c.level != Level::Fail), "{checks:?}");
        let cg = find(&checks, "cgroups");
        assert!(
            cg.says.starts_with("cgroup v1 (memory, pids, cpu"),
            "{cg:?}"
        );
        let kvm = find(&checks, "kvm");
        assert!(kvm.says.contains("PVM"), "{kvm:?}");
        assert!(kvm.says.contains("TCG"), "{kvm:?}");
        let tcg = find(&checks, "tcg");
        assert_eq!(tcg.level, Level::Ok);
        assert!(tcg.says.contains("QEMU TCG"), "{tcg:?}");
        assert!(find(&checks, "vm runtime").says.contains("qemu-tcg"));
    }

    #[test]
    fn a_missing_runtime_says_to_run_vm_stage_and_only_warns() {
        let mut f = here();
        f.runtime = Some(Err("/rt/bin/gvproxy is missing: run `just vm-setup`".into()));
        f.probe = None;
        let checks = checks(&f);
        let rt = find(&checks, "vm runtime");
        assert_eq!(rt.level, Level::Warn);
        assert!(rt.says.contains("just vm-setup"), "{rt:?}");
        assert!(find(&checks, "tcg").says.contains("just vm-stage"));
        f.runtime_dir = None;
        f.runtime = None;
        let checks = super::checks(&f);
        assert!(find(&checks, "vm runtime").says.contains("just vm-stage"));
        assert!(checks.iter().all(|c| c.level != Level::Fail));
    }

    #[test]
    fn cgroup_v2_without_delegated_controllers_is_named() {
        let mut f = here();
        f.mountinfo = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw".into();
        f.v2_controllers = Some("cpuset cpu io memory pids".into());
        let c = cgroup_check(&f);
        assert_eq!(c.level, Level::Ok);
        assert!(c.says.starts_with("cgroup v2"), "{c:?}");
        f.v2_controllers = Some("cpu io".into());
        let c = cgroup_check(&f);
        assert_eq!(c.level, Level::Warn);
        assert!(c.says.contains("memory, pids"), "{c:?}");
    }

    #[test]
    fn what_process_sandboxes_need_fails_and_says_the_fix() {
        let mut f = here();
        f.root = false;
        f.max_user_namespaces = Some(0);
        f.mountinfo.clear();
        f.binaries[0].1 = false;
        let failed: Vec<_> = checks(&f)
            .into_iter()
            .filter(|c| c.level == Level::Fail)
            .collect();
        let says: Vec<_> = failed.iter().map(|c| c.says.as_str()).collect();
        assert_eq!(failed.len(), 4, "{says:?}");
        assert!(says[0].contains("sudo"));
        assert!(says[1].contains("sysctl"));
        assert!(says[2].contains("mount cgroup2"));
        assert!(says[3].contains("just install"));
    }

    #[test]
    fn hardware_kvm_is_left_to_the_boot_probe_and_no_kvm_means_tcg() {
        let mut f = here();
        f.kvm_modules = vec!["kvm_intel".into()];
        let c = kvm_check(&f);
        assert_eq!(c.level, Level::Ok);
        assert!(c.says.contains("boot probe"), "{c:?}");
        f.dev_kvm = false;
        assert!(kvm_check(&f).says.contains("TCG"));
    }

    #[test]
    fn a_state_dir_too_deep_for_sandbox_sockets_fails() {
        let mut f = here();
        f.state_dir = format!("/tmp/{}/.local/state/openshell", "x".repeat(40)).into();
        let c = find(&checks(&f), "state dir").clone();
        assert_eq!(c.level, Level::Fail);
        assert!(c.says.contains("shorter --state-dir"), "{c:?}");
        assert_eq!(find(&checks(&here()), "state dir").level, Level::Ok);
    }

    #[test]
    fn low_disk_warns_with_the_reserve() {
        let mut f = here();
        f.free_bytes = Some(1 << 30);
        let c = find(&checks(&f), "disk").clone();
        assert_eq!(c.level, Level::Warn);
        assert!(c.says.contains("--disk-reserve-gib"), "{c:?}");
    }
}
