//! QEMU's command line for one sandbox VM: the recipe measured on these
//! machines (`reference/vm-runtime.md`), as a pure function.
//!
//! microvm (0.2-0.3 s faster than q35), the uncompressed kernel booted via
//! PVH, an initramfs root, one virtio-net device on gvproxy's stream
//! socket, the serial console appended to a file, and for a sandbox rooted
//! in an image its two virtio-blk disks. Nothing here comes from
//! the plugin except numbers.

use std::ffi::OsString;
use std::path::PathBuf;

/// QEMU's `-sandbox` policy: everything it offers to deny, denied.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Everything one launch needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuLaunch {
    pub kvm: bool,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// gvproxy's `-listen-qemu` socket.
    pub net_socket: PathBuf,
    /// The identity channel's socket, which QEMU serves
    /// ([`crate::identity`]).
    pub identity_socket: PathBuf,
    pub console: PathBuf,
    /// The host's TSC rate, told to the guest: on a busy host the guest's
    /// PIT calibration fails under TCG and the kernel then hangs.
    pub tsc_khz: Option<u32>,
    /// virtio-blk disks, in this order (the guest finds them by label).
    pub disks: Vec<QemuDisk>,
}

/// A raw disk image QEMU serves to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuDisk {
    pub path: PathBuf,
    pub read_only: bool,
    /// What the guest reads in `/sys/block/vdX/serial` to tell the disks
    /// apart (letters, digits and `-` only: it joins QEMU's option string).
    pub serial: &'static str,
}

impl QemuLaunch {
    /// The kernel command line. `quiet` is left out on purpose: the kernel's
    /// early output is what the boot watchdog waits for.
    pub fn kernel_cmdline(&self) -> String {
        let mut s = String::from("console=ttyS0 panic=-1 reboot=t");
        if let Some(khz) = self.tsc_khz {
            s.push_str(&format!(" tsc_early_khz={khz}"));
        }
        s
    }

    pub fn args(&self) -> Vec<OsString> {
        let (accel, cpu) = if self.kvm {
            ("kvm", "host")
        } else {
            ("tcg", "max")
        };
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        for s in [
            "-M",
            "microvm,x-option-roms=off",
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.vcpus.max(1).to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            // QEMU's own seccomp filter: no exec or fork (so no `exec:`
            // migration URI either), no privilege changes, no obsolete
            // calls, no scheduler or resource changes.
            "-sandbox",
            SANDBOX,
        ] {
            push(s);
        }
        let path = |label: &str, p: &PathBuf| {
            let mut s = OsString::from(label);
            s.push(p.as_os_str());
            s
        };
        a.push("-chardev".into());
        let mut chardev = path("file,id=con0,path=", &self.console);
        chardev.push("");
        a.push(chardev);
        a.extend(["-serial".into(), "chardev:con0".into()]);
        a.extend(["-kernel".into(), self.kernel.clone().into_os_string()]);
        a.extend(["-initrd".into(), self.initrd.clone().into_os_string()]);
        a.extend(["-append".into(), self.kernel_cmdline().into()]);
        a.push("-netdev".into());
        a.push(path(
            "stream,id=n0,server=off,addr.type=unix,addr.path=",
            &self.net_socket,
        ));
        a.extend(["-device".into(), "virtio-net-device,netdev=n0".into()]);
        for (i, disk) in self.disks.iter().enumerate() {
            a.push("-drive".into());
            // A read-only disk is shared by many VMs; a writable one
            // passes the guest's discards on, so deleted files give the
            // host its space (and the sandbox its quota) back. Guest
            // flushes reach the host file (cache=writeback honours them).
            let mut drive = path("file=", &disk.path);
            drive.push(format!(
                ",format=raw,if=none,id=disk{i},{}",
                if disk.read_only {
                    "readonly=on"
                } else {
                    "cache=writeback,discard=unmap"
                }
            ));
            a.push(drive);
            a.extend([
                "-device".into(),
                format!("virtio-blk-device,drive=disk{i},serial={}", disk.serial).into(),
            ]);
        }
        // The identity channel: a virtio-serial port on a socket QEMU
        // listens on (without waiting for the gateway to connect).
        a.push("-chardev".into());
        a.push(path(
            "socket,id=ident,server=on,wait=off,path=",
            &self.identity_socket,
        ));
        a.extend(["-device".into(), "virtio-serial-device".into()]);
        a.extend([
            "-device".into(),
            format!(
                "virtserialport,chardev=ident,name={}",
                crate::identity::PORT_NAME
            )
            .into(),
        ]);
        a
    }
}

/// QEMU's option parser splits on commas; a path with one (or a newline)
/// would add options. Sandbox paths are host-made, but check anyway.
pub fn check_path(p: &std::path::Path) -> Result<(), crate::VmError> {
    let s = p.to_string_lossy();
    if s.contains([',', '\n', '\0']) {
        return Err(crate::VmError::Invalid(format!(
            "{s:?} cannot be passed to QEMU (comma or control character)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> QemuLaunch {
        QemuLaunch {
            kvm: false,
            vcpus: 2,
            memory_mib: 512,
            kernel: "/rt/kernel/vmlinux".into(),
            initrd: "/s/initrd.cpio".into(),
            net_socket: "/s/net/net.sock".into(),
            identity_socket: "/s/net/identity.sock".into(),
            console: "/s/console.log".into(),
            tsc_khz: Some(2_000_000),
            disks: vec![],
        }
    }

    fn joined(l: &QemuLaunch) -> String {
        l.args()
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_uses_the_measured_microvm_recipe() {
        let s = joined(&launch());
        for part in [
            "-M microvm,x-option-roms=off -accel tcg -cpu max -m 512 -smp 2",
            "-nodefaults -no-user-config -display none -no-reboot",
            "-kernel /rt/kernel/vmlinux -initrd /s/initrd.cpio",
            "-netdev stream,id=n0,server=off,addr.type=unix,addr.path=/s/net/net.sock -device virtio-net-device,netdev=n0",
            "-chardev file,id=con0,path=/s/console.log -serial chardev:con0",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-chardev socket,id=ident,server=on,wait=off,path=/s/net/identity.sock -device virtio-serial-device -device virtserialport,chardev=ident,name=org.openshell.identity",
        ] {
            assert!(s.contains(part), "{part:?} missing from {s}");
        }
    }

    #[test]
    fn disks_are_virtio_blk_read_only_or_writable() {
        let mut l = launch();
        assert!(!joined(&l).contains("-drive"), "no disk unless asked");
        l.disks = vec![
            QemuDisk {
                path: "/dev/fd/6".into(),
                read_only: true,
                serial: "openshell-image",
            },
            QemuDisk {
                path: "/dev/fd/7".into(),
                read_only: false,
                serial: "openshell-disk",
            },
        ];
        let s = joined(&l);
        for part in [
            "-drive file=/dev/fd/6,format=raw,if=none,id=disk0,readonly=on -device virtio-blk-device,drive=disk0,serial=openshell-image",
            "-drive file=/dev/fd/7,format=raw,if=none,id=disk1,cache=writeback,discard=unmap -device virtio-blk-device,drive=disk1,serial=openshell-disk",
        ] {
            assert!(s.contains(part), "{part:?} missing from {s}");
        }
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let mut l = launch();
        l.kvm = true;
        assert!(joined(&l).contains("-accel kvm -cpu host"));
    }

    #[test]
    fn the_kernel_is_told_the_tsc_rate_and_is_not_quiet() {
        let c = launch().kernel_cmdline();
        assert_eq!(c, "console=ttyS0 panic=-1 reboot=t tsc_early_khz=2000000");
    }

    #[test]
    fn zero_vcpus_means_one() {
        let mut l = launch();
        l.vcpus = 0;
        assert!(joined(&l).contains("-smp 1 "));
    }

    #[test]
    fn paths_with_commas_are_refused() {
        assert!(check_path("/tmp/a,b".as_ref()).is_err());
        assert!(check_path("/tmp/ab".as_ref()).is_ok());
    }
}
