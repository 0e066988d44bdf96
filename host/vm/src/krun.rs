//! The libkrun backend's launch configuration, pure and validated.
//!
//! libkrun's `krun_start_enter` turns the calling process into the VM, so
//! each VM runs in its own launcher process; this is what that launcher is
//! told. libkrun puts argv and env on the guest kernel command line, and
//! does NOT quote `KRUN_WORKDIR` / `KRUN_INIT`: every string here is checked
//! against a strict alphabet so none can add a kernel parameter.
//!
//! Not selected on these machines: the boot probe shows a KVM guest cannot
//! boot (`/dev/kvm` is `kvm_pvm`; guests die with KVM_EXIT_INTERNAL_ERROR),
//! and libkrun has no software fallback. The launcher binary itself (linking
//! the `libkrun` crate, =1.19.7 with `net`) is not part of this build yet.

use std::path::PathBuf;

use crate::VmError;

/// What the libkrun launcher configures, in the order it calls libkrun.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KrunLaunch {
    pub vcpus: u8,
    pub memory_mib: u32,
    /// `krun_set_root`: the guest's root directory.
    pub root: PathBuf,
    /// `krun_add_net_unixstream`: gvproxy's `-listen-qemu` socket.
    pub net_socket: PathBuf,
    pub mac: [u8; 6],
    /// `krun_set_workdir` (unquoted on the kernel command line).
    pub workdir: String,
    /// `krun_set_exec`: the guest program and its environment.
    pub exec: String,
    pub env: Vec<(String, String)>,
    /// Directory holding `libkrunfw.so.5`.
    pub libkrunfw_dir: PathBuf,
}

/// Characters allowed in any string that reaches the guest kernel command
/// line: no spaces, quotes, or anything a shell or the kernel's parser
/// would treat specially.
pub fn cmdline_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:/=-".contains(&b))
}

impl KrunLaunch {
    pub fn new(
        vcpus: u32,
        memory_mib: u64,
        root: PathBuf,
        net_socket: PathBuf,
        env: Vec<(String, String)>,
        libkrunfw_dir: PathBuf,
    ) -> Result<Self, VmError> {
        let vcpus = u8::try_from(vcpus.max(1))
            .map_err(|_| VmError::Invalid(format!("{vcpus} vcpus: libkrun takes at most 255")))?;
        let memory_mib = u32::try_from(memory_mib)
            .map_err(|_| VmError::Invalid(format!("{memory_mib} MiB is too much memory")))?;
        let launch = Self {
            vcpus,
            memory_mib,
            root,
            net_socket,
            // gvproxy's DHCP hands 192.168.127.2 to the first MAC it sees;
            // a locally administered, fixed MAC keeps that stable.
            mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
            workdir: "/sandbox".into(),
            exec: "/bin/openshell-supervisor".into(),
            env,
            libkrunfw_dir,
        };
        launch.validate()?;
        Ok(launch)
    }

    /// Refuses any string libkrun would put on the kernel command line
    /// unless it is [`cmdline_safe`].
    pub fn validate(&self) -> Result<(), VmError> {
        for (what, s) in [("workdir", &self.workdir), ("exec", &self.exec)] {
            if !cmdline_safe(s) {
                return Err(VmError::Invalid(format!(
                    "libkrun {what} {s:?} has characters that could change the guest kernel command line"
                )));
            }
        }
        for (k, v) in &self.env {
            if !cmdline_safe(k) || !(v.is_empty() || cmdline_safe(v)) {
                return Err(VmError::Invalid(format!(
                    "environment {k}: only [A-Za-z0-9_.:/=-] may reach the libkrun guest's kernel command line"
                )));
            }
        }
        if self.net_socket.as_os_str().len() > 107 {
            return Err(VmError::Invalid(format!(
                "{} is longer than a unix socket path may be",
                self.net_socket.display()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn new(e: &[(&str, &str)]) -> Result<KrunLaunch, VmError> {
        KrunLaunch::new(
            2,
            512,
            "/s/root".into(),
            "/s/net.sock".into(),
            env(e),
            "/rt/libkrunfw".into(),
        )
    }

    #[test]
    fn a_normal_launch_validates() {
        let l = new(&[
            ("OPENSHELL_ENDPOINT", "http://192.168.127.254:4100"),
            ("OPENSHELL_SANDBOX_SECRET", "c2VjcmV0-abc_1"),
        ])
        .unwrap();
        assert_eq!((l.vcpus, l.memory_mib), (2, 512));
        assert_eq!(l.exec, "/bin/openshell-supervisor");
    }

    #[test]
    fn values_that_could_inject_kernel_parameters_are_refused() {
        for bad in ["a b", "x\"y", "init=/bin/sh 1", "a'b", "a\nb", "$(x)"] {
            assert!(new(&[("K", bad)]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_unsafe_workdir_is_refused() {
        let mut l = new(&[]).unwrap();
        l.workdir = "/sandbox init=/bin/sh".into();
        assert!(l.validate().is_err());
    }

    #[test]
    fn vcpus_and_memory_must_fit_libkruns_types() {
        assert!(KrunLaunch::new(300, 512, "/r".into(), "/n".into(), vec![], "/l".into()).is_err());
        assert_eq!(
            KrunLaunch::new(0, 512, "/r".into(), "/n".into(), vec![], "/l".into())
                .unwrap()
                .vcpus,
            1
        );
    }
}
