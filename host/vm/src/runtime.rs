//! The staged VM runtime (`scripts/vm-setup.sh`, `scripts/vm-rootfs.sh`)
//! and the backend choice.
//!
//! The setup script boots a tiny guest under each backend with a short
//! timeout and caches the verdict in `<runtime>/backend` as `key=value`
//! lines. Opening `/dev/kvm` proves nothing (on these machines it is
//! `kvm_pvm`, where real guests die), so the host trusts only that probe.

use std::path::{Path, PathBuf};

use crate::VmError;

/// Which hypervisor runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Krun,
    QemuKvm,
    QemuTcg,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Krun => "krun",
            Backend::QemuKvm => "qemu-kvm",
            Backend::QemuTcg => "qemu-tcg",
        }
    }

    /// How a user should read the isolation it gives.
    pub fn isolation(self) -> &'static str {
        match self {
            Backend::Krun | Backend::QemuKvm => "vm-kvm",
            Backend::QemuTcg => "vm-tcg",
        }
    }
}

/// What the operator asked for (`OPENSHELL_VM_BACKEND`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    #[default]
    Auto,
    Krun,
    Qemu,
}

impl BackendChoice {
    pub fn parse(s: &str) -> Result<Self, VmError> {
        match s {
            "" | "auto" => Ok(Self::Auto),
            "krun" => Ok(Self::Krun),
            "qemu" => Ok(Self::Qemu),
            other => Err(VmError::Invalid(format!(
                "unknown VM backend {other:?}: use krun, qemu or auto"
            ))),
        }
    }
}

/// The cached probe verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// `krun`, `qemu-kvm`, `qemu-tcg` or `none`.
    pub backend: String,
    pub qemu_kvm: String,
    pub qemu_tcg: String,
    pub krun: String,
}

impl Probe {
    pub fn parse(text: &str) -> Self {
        let mut p = Probe::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let slot = match k.trim() {
                "backend" => &mut p.backend,
                "qemu-kvm" => &mut p.qemu_kvm,
                "qemu-tcg" => &mut p.qemu_tcg,
                "krun" => &mut p.krun,
                _ => continue,
            };
            *slot = v.trim().to_owned();
        }
        p
    }

    fn ok(verdict: &str) -> bool {
        verdict.starts_with("ok")
    }
}

/// The backend to use: the operator's choice where the probe allows it.
/// Pure, so every combination is tested.
pub fn select(choice: BackendChoice, probe: &Probe) -> Result<Backend, VmError> {
    let kvm = Probe::ok(&probe.qemu_kvm);
    let tcg = Probe::ok(&probe.qemu_tcg);
    match choice {
        BackendChoice::Krun if kvm => Err(VmError::Unavailable(
            "the libkrun launcher (openshell-krun-launch) builds, but the gateway does not start it yet: it needs the guest root as a directory, not the initramfs; use --vm-backend qemu"
                .into(),
        )),
        BackendChoice::Krun => Err(VmError::Unavailable(format!(
            "the libkrun backend cannot boot a guest here: {}",
            probe.krun
        ))),
        BackendChoice::Qemu | BackendChoice::Auto if kvm => Ok(Backend::QemuKvm),
        BackendChoice::Qemu | BackendChoice::Auto if tcg => Ok(Backend::QemuTcg),
        BackendChoice::Qemu | BackendChoice::Auto => Err(VmError::Unavailable(format!(
            "no VM backend booted the probe guest (qemu-kvm: {}; qemu-tcg: {}); re-run `just vm-setup -- --reprobe`",
            or_unprobed(&probe.qemu_kvm),
            or_unprobed(&probe.qemu_tcg)
        ))),
    }
}

fn or_unprobed(s: &str) -> &str {
    if s.is_empty() { "not probed" } else { s }
}

/// The files a VM launch needs, found in the runtime dir.
#[derive(Clone, Debug)]
pub struct VmRuntime {
    pub dir: PathBuf,
    pub qemu: PathBuf,
    pub gvproxy: PathBuf,
    pub kernel: PathBuf,
    pub base_initrd: PathBuf,
    pub backend: Backend,
    /// The host's TSC rate; under TCG the guest's TSC runs at it.
    pub tsc_khz: Option<u32>,
}

impl VmRuntime {
    /// Reads the runtime dir; every missing piece is named with the task
    /// that makes it.
    pub fn load(dir: &Path, choice: BackendChoice) -> Result<Self, VmError> {
        let need = |rel: &str, task: &str| {
            let p = dir.join(rel);
            if p.exists() {
                Ok(p)
            } else {
                Err(VmError::Unavailable(format!(
                    "{} is missing: run `just {task}`",
                    p.display()
                )))
            }
        };
        let gvproxy = need("bin/gvproxy", "vm-setup")?;
        let kernel = need("kernel/vmlinux", "vm-setup")?;
        let base_initrd = need("rootfs/base.cpio", "vm-rootfs")?;
        let probe_file = need("backend", "vm-setup")?;
        let probe = std::fs::read_to_string(&probe_file)
            .map_err(VmError::io(format!("reading {}", probe_file.display())))?;
        let backend = select(choice, &Probe::parse(&probe))?;
        // A QEMU staged in the runtime dir wins over the system one, so a
        // runtime dir can carry everything a launch runs.
        let staged_qemu = dir.join("bin/qemu-system-x86_64");
        let qemu = Some(staged_qemu)
            .filter(|p| p.is_file())
            .or_else(|| find_on_path("qemu-system-x86_64"))
            .ok_or_else(|| {
                VmError::Unavailable(
                    "qemu-system-x86_64 is not installed: run `just vm-setup`".into(),
                )
            })?;
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Ok(Self {
            dir: dir.to_owned(),
            qemu,
            gvproxy,
            kernel,
            base_initrd,
            backend,
            tsc_khz: tsc_khz(&cpuinfo),
        })
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first `cpu MHz` in /proc/cpuinfo, in kHz.
pub fn tsc_khz(cpuinfo: &str) -> Option<u32> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split_once(':')?.1.trim().parse().ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: &str = "backend=qemu-tcg\nqemu-kvm=unbootable: kvm_pvm\nqemu-tcg=ok: 1.4s\nkrun=not selected: the KVM probe guest did not boot\n";

    #[test]
    fn the_probe_file_parses() {
        let p = Probe::parse(HERE);
        assert_eq!(p.backend, "qemu-tcg");
        assert!(p.krun.contains("did not boot"));
    }

    #[test]
    fn auto_and_qemu_pick_tcg_where_kvm_cannot_boot() {
        let p = Probe::parse(HERE);
        assert_eq!(select(BackendChoice::Auto, &p).unwrap(), Backend::QemuTcg);
        assert_eq!(select(BackendChoice::Qemu, &p).unwrap(), Backend::QemuTcg);
    }

    #[test]
    fn krun_is_refused_with_the_probes_reason_where_kvm_cannot_boot() {
        let e = select(BackendChoice::Krun, &Probe::parse(HERE)).unwrap_err();
        assert!(e.to_string().contains("did not boot"), "{e}");
    }

    #[test]
    fn krun_where_kvm_boots_is_refused_until_the_gateway_starts_its_launcher() {
        // FIXME(issue 6): openshell-krun-launch builds and is tested, but
        // caps/vm.rs does not start it yet (libkrun needs a root directory).
        let p = Probe::parse("qemu-kvm=ok: 0.3s\nqemu-tcg=ok: 1.4s\n");
        let e = select(BackendChoice::Krun, &p).unwrap_err();
        assert!(e.to_string().contains("openshell-krun-launch"), "{e}");
    }

    #[test]
    fn kvm_is_preferred_when_it_booted() {
        let p = Probe::parse("qemu-kvm=ok: 0.3s\nqemu-tcg=ok: 1.4s\n");
        assert_eq!(select(BackendChoice::Auto, &p).unwrap(), Backend::QemuKvm);
    }

    #[test]
    fn nothing_bootable_says_how_to_reprobe() {
        let e = select(BackendChoice::Auto, &Probe::default()).unwrap_err();
        assert!(e.to_string().contains("--reprobe"), "{e}");
    }

    #[test]
    fn tcg_reports_vm_tcg_isolation() {
        assert_eq!(Backend::QemuTcg.isolation(), "vm-tcg");
        assert_eq!(Backend::Krun.isolation(), "vm-kvm");
    }

    #[test]
    fn tsc_rate_comes_from_cpuinfo() {
        assert_eq!(
            tsc_khz("processor: 0\ncpu MHz\t\t: 2000.000\n"),
            Some(2_000_000)
        );
        assert_eq!(tsc_khz("nothing"), None);
    }

    #[test]
    fn unknown_backend_names_are_refused() {
        assert!(BackendChoice::parse("firecracker").is_err());
        assert_eq!(BackendChoice::parse("").unwrap(), BackendChoice::Auto);
    }
}
