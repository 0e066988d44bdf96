//! The libkrun backend's launch configuration, pure and validated.
//!
//! libkrun's `krun_start_enter` turns the calling process into the VM, so
//! each VM runs in its own launcher process (`host/krun-launch`); this is
//! what that launcher is told, as JSON. libkrun puts argv and env on the
//! guest kernel command line, and does NOT quote `KRUN_WORKDIR` /
//! `KRUN_INIT`: every string here is checked against a strict alphabet so
//! none can add a kernel parameter. The launcher calls [`KrunLaunch::parse`]
//! and nothing else decides what reaches libkrun.
//!
//! Not selected on these machines: the boot probe shows a KVM guest cannot
//! boot (`/dev/kvm` is `kvm_pvm`; guests die with KVM_EXIT_INTERNAL_ERROR),
//! and libkrun has no software fallback.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{MAX_SOCKET_PATH, VmError};
/// x86's kernel command line holds 2048 bytes; libkrun's own parameters
/// (console, init, rlimits) take some, so ours must leave them room.
pub const MAX_KRUN_CMDLINE: usize = 1536;
/// `krun_add_net_unixstream` virtio-net features: none. gvproxy's
/// `-listen-qemu` socket carries plain Ethernet frames (QEMU's stream
/// netdev negotiates no offloads either), so no checksum or TSO offload is
/// offered to the guest. Slower than libkrun's gvproxy defaults, but the
/// frames are exactly what the QEMU backend sends over the same socket.
pub const NET_FEATURES: u32 = 0;
/// `krun_add_net_unixstream` flags: none. The guest init configures eth0
/// statically (no DHCP client), as under QEMU.
pub const NET_FLAGS: u32 = 0;

/// What the libkrun launcher configures, in the order it calls libkrun.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KrunLaunch {
    /// `krun_set_vm_config`.
    pub vcpus: u8,
    pub memory_mib: u32,
    /// `krun_set_root`: the guest's root directory (virtio-fs).
    pub root: PathBuf,
    /// `krun_set_workdir` (unquoted on the kernel command line).
    pub workdir: String,
    /// `krun_add_net_unixstream`: gvproxy's `-listen-qemu` socket.
    pub net_socket: PathBuf,
    pub mac: [u8; 6],
    /// `krun_set_console_output`: the guest console, appended to a file.
    pub console: PathBuf,
    /// `krun_set_exec`: the guest program and its environment.
    pub exec: String,
    pub env: Vec<(String, String)>,
    /// Directory holding `libkrunfw.so.5`, which libkrun loads at run time.
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

/// An environment name: `[A-Za-z_][A-Za-z0-9_]*`, and not libkrun's own
/// `KRUN_*` (a `KRUN_INIT` in the environment would replace the program).
fn env_name_ok(k: &str) -> bool {
    let mut bytes = k.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !k.starts_with("KRUN_")
}

impl KrunLaunch {
    /// The launch of a sandbox's supervisor, with the host's fixed choices
    /// (MAC, workdir, program).
    pub fn new(
        vcpus: u32,
        memory_mib: u64,
        root: PathBuf,
        net_socket: PathBuf,
        console: PathBuf,
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
            workdir: "/sandbox".into(),
            net_socket,
            // gvproxy's DHCP hands 192.168.127.2 to the first MAC it sees;
            // a locally administered, fixed MAC keeps that stable.
            mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
            console,
            exec: "/bin/openshell-supervisor".into(),
            env,
            libkrunfw_dir,
        };
        launch.validate()?;
        Ok(launch)
    }

    /// The launcher's side: JSON in, a validated launch out. No I/O.
    pub fn parse(json: &str) -> Result<Self, VmError> {
        let launch: Self = serde_json::from_str(json)
            .map_err(|e| VmError::Invalid(format!("the libkrun launch config: {e}")))?;
        launch.validate()?;
        Ok(launch)
    }

    /// The gateway's side: what [`KrunLaunch::parse`] reads back.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a KrunLaunch always serializes")
    }

    /// Refuses any string libkrun would put on the kernel command line
    /// unless it is [`cmdline_safe`], and any path libkrun cannot take.
    pub fn validate(&self) -> Result<(), VmError> {
        if self.vcpus == 0 {
            return Err(VmError::Invalid("a VM needs at least one vcpu".into()));
        }
        if self.memory_mib == 0 {
            return Err(VmError::Invalid("a VM needs some memory".into()));
        }
        for (what, s) in [("workdir", &self.workdir), ("exec", &self.exec)] {
            if !cmdline_safe(s) || !s.starts_with('/') {
                return Err(VmError::Invalid(format!(
                    "libkrun {what} {s:?} must be an absolute path of [A-Za-z0-9_.:/=-]: anything else could change the guest kernel command line"
                )));
            }
        }
        for (k, v) in &self.env {
            if !env_name_ok(k) {
                return Err(VmError::Invalid(format!(
                    "environment name {k:?}: only [A-Za-z_][A-Za-z0-9_]* and not KRUN_*"
                )));
            }
            if !(v.is_empty() || cmdline_safe(v)) {
                return Err(VmError::Invalid(format!(
                    "environment {k}: only [A-Za-z0-9_.:/=-] may reach the libkrun guest's kernel command line"
                )));
            }
        }
        let cmdline = self.cmdline_len();
        if cmdline > MAX_KRUN_CMDLINE {
            return Err(VmError::Invalid(format!(
                "the program, workdir and environment take {cmdline} bytes of the guest kernel command line; at most {MAX_KRUN_CMDLINE} fit"
            )));
        }
        for (what, p) in [
            ("root", &self.root),
            ("net_socket", &self.net_socket),
            ("console", &self.console),
            ("libkrunfw_dir", &self.libkrunfw_dir),
        ] {
            check_path(what, p)?;
        }
        if self.net_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::Invalid(format!(
                "{} is longer than {MAX_SOCKET_PATH} bytes, the limit for a unix socket path",
                self.net_socket.display()
            )));
        }
        Ok(())
    }

    /// What `krun_start_enter` adds to the kernel command line for us:
    /// `KRUN_INIT=<exec> KRUN_WORKDIR=<workdir>` and each `"K=V"`.
    fn cmdline_len(&self) -> usize {
        let fixed = " KRUN_INIT= KRUN_WORKDIR=".len() + self.exec.len() + self.workdir.len();
        let env: usize = self.env.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        fixed + env
    }

    /// `krun_set_exec`'s environment, as `K=V` strings.
    pub fn envp(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

/// A path handed to libkrun: absolute, UTF-8 (libkrun refuses anything
/// else with a bare EINVAL), no control characters.
fn check_path(what: &str, p: &Path) -> Result<(), VmError> {
    let ok = p.is_absolute()
        && p.to_str()
            .is_some_and(|s| !s.chars().any(|c| c.is_control()));
    if ok {
        Ok(())
    } else {
        Err(VmError::Invalid(format!(
            "libkrun {what} {p:?} must be an absolute UTF-8 path without control characters"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_env as env;

    fn new(e: &[(&str, &str)]) -> Result<KrunLaunch, VmError> {
        KrunLaunch::new(
            2,
            512,
            "/s/root".into(),
            "/s/net.sock".into(),
            "/s/console.log".into(),
            env(e),
            "/rt/libkrunfw".into(),
        )
    }

    fn sized(vcpus: u32, memory_mib: u64) -> Result<KrunLaunch, VmError> {
        KrunLaunch::new(
            vcpus,
            memory_mib,
            "/r".into(),
            "/n".into(),
            "/c".into(),
            vec![],
            "/l".into(),
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
        assert_eq!(
            l.envp()[0],
            "OPENSHELL_ENDPOINT=http://192.168.127.254:4100"
        );
    }

    #[test]
    fn values_that_could_inject_kernel_parameters_are_refused() {
        for bad in ["a b", "x\"y", "init=/bin/sh 1", "a'b", "a\nb", "$(x)"] {
            assert!(new(&[("K", bad)]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn environment_names_must_be_plain_and_not_libkruns_own() {
        for bad in ["KRUN_INIT", "KRUN_WORKDIR", "A=B", "1X", "a-b", ""] {
            let e = new(&[(bad, "v")]).unwrap_err();
            assert!(e.to_string().contains("environment name"), "{bad:?}: {e}");
        }
        assert!(new(&[("_OK_1", "")]).is_ok());
    }

    #[test]
    fn an_unsafe_workdir_is_refused() {
        let mut l = new(&[]).unwrap();
        l.workdir = "/sandbox init=/bin/sh".into();
        assert!(l.validate().is_err());
        l.workdir = "sandbox".into();
        assert!(l.validate().is_err(), "relative workdir");
    }

    #[test]
    fn an_unsafe_exec_is_refused() {
        let mut l = new(&[]).unwrap();
        l.exec = "/bin/sh\" init=/x".into();
        assert!(l.validate().is_err());
    }

    #[test]
    fn vcpus_and_memory_must_fit_libkruns_types() {
        assert!(sized(300, 512).is_err());
        assert!(sized(2, u64::from(u32::MAX) + 1).is_err());
        assert_eq!(sized(0, 512).unwrap().vcpus, 1);
    }

    #[test]
    fn zero_vcpus_or_memory_in_a_config_are_refused() {
        let mut l = new(&[]).unwrap();
        l.vcpus = 0;
        assert!(l.validate().is_err());
        let mut l = new(&[]).unwrap();
        l.memory_mib = 0;
        assert!(l.validate().is_err());
    }

    #[test]
    fn paths_must_be_absolute_and_free_of_control_characters() {
        let mut l = new(&[]).unwrap();
        l.root = "relative/root".into();
        assert!(l.validate().unwrap_err().to_string().contains("root"));
        let mut l = new(&[]).unwrap();
        l.console = "/s/con\nsole".into();
        assert!(l.validate().unwrap_err().to_string().contains("console"));
    }

    #[test]
    fn a_socket_path_too_long_for_sockaddr_un_is_refused() {
        let mut l = new(&[]).unwrap();
        l.net_socket = PathBuf::from(format!("/{}", "s".repeat(107)));
        let e = l.validate().unwrap_err();
        assert!(e.to_string().contains("107 bytes"), "{e}");
    }

    #[test]
    fn an_environment_too_big_for_the_kernel_command_line_is_refused() {
        let big = "x".repeat(MAX_KRUN_CMDLINE);
        let e = new(&[("BIG", &big)]).unwrap_err();
        assert!(e.to_string().contains("kernel command line"), "{e}");
    }

    #[test]
    fn the_json_round_trips() {
        let l = new(&[("A", "1")]).unwrap();
        assert_eq!(KrunLaunch::parse(&l.to_json()).unwrap(), l);
    }

    #[test]
    fn parsing_validates_what_it_reads() {
        let mut l = new(&[]).unwrap();
        l.workdir = "/x root=/dev/sda".into();
        let json = serde_json::to_string(&l).unwrap();
        let e = KrunLaunch::parse(&json).unwrap_err();
        assert!(e.to_string().contains("workdir"), "{e}");
    }

    #[test]
    fn unknown_or_missing_fields_are_refused() {
        let l = new(&[]).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&l.to_json()).unwrap();
        v["kernel_cmdline"] = "init=/bin/sh".into();
        assert!(KrunLaunch::parse(&v.to_string()).is_err());
        let mut v: serde_json::Value = serde_json::from_str(&l.to_json()).unwrap();
        v.as_object_mut().unwrap().remove("net_socket");
        let e = KrunLaunch::parse(&v.to_string()).unwrap_err();
        assert!(e.to_string().contains("net_socket"), "{e}");
    }
}
