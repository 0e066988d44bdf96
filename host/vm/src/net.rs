//! A VM's network: one gvproxy per VM, confined so that the guest reaches
//! the gateway and nothing else.
//!
//! gvproxy NATs the guest's 192.168.127.254 to the host's 127.0.0.1 (every
//! port) and forwards other egress. So it runs in its own network
//! namespace, holding only a loopback interface. The one listener on that
//! loopback is created here, from a thread that entered the namespace, and
//! the gateway's [`forward`] task relays each connection to the sandbox's
//! own supervisor unix socket (unix sockets are reached by path, which no
//! network namespace hides). Any other port the guest dials is refused by
//! the empty namespace; outside addresses have no route.
//!
//! Needs CAP_SYS_ADMIN (the gateway runs as root for VM sandboxes): an
//! unprivileged process cannot give one thread a new network namespace
//! without a user namespace, which a multithreaded process cannot enter.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nix::sched::CloneFlags;

use crate::VmError;

/// The guest's view of the gateway's forwarder.
pub const GUEST_HOST_ADDR: &str = "192.168.127.254";

/// An empty network namespace with a listener on its loopback.
#[derive(Debug)]
pub struct ConfinedLoopback {
    pub netns: Arc<OwnedFd>,
    pub listener: std::net::TcpListener,
    pub port: u16,
}

impl ConfinedLoopback {
    /// What the guest's supervisor dials.
    pub fn guest_endpoint(&self) -> String {
        format!("http://{GUEST_HOST_ADDR}:{}", self.port)
    }
}

fn ip_binary() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| "ip".into())
}

/// Makes a fresh network namespace from a short-lived thread (a thread's
/// namespace is its own), brings its loopback up, opens a listener there and
/// keeps the namespace alive by fd.
pub fn confined_loopback() -> Result<ConfinedLoopback, VmError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
                VmError::Unavailable(format!(
                    "VM networking is confined to its own network namespace, which needs CAP_SYS_ADMIN: {e}"
                ))
            })?;
            // A child inherits the calling thread's namespace.
            let st = Command::new(ip_binary())
                .args(["link", "set", "lo", "up"])
                .status()
                .map_err(VmError::io("running `ip link set lo up`"))?;
            if !st.success() {
                return Err(VmError::Unavailable(format!(
                    "`ip link set lo up` in the VM's network namespace failed: {st}"
                )));
            }
            let netns: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(VmError::io("opening the VM network namespace"))?
                .into();
            let listener = std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(VmError::io("binding the VM's gateway forwarder"))?;
            let port = listener
                .local_addr()
                .map_err(VmError::io("reading the forwarder's port"))?
                .port();
            listener
                .set_nonblocking(true)
                .map_err(VmError::io("configuring the forwarder"))?;
            Ok(ConfinedLoopback {
                netns: Arc::new(netns),
                listener,
                port,
            })
        })
        .join()
        .map_err(|_| VmError::Unavailable("the namespace thread panicked".into()))?
    })
}

/// gvproxy for one VM: QEMU-style stream socket, no SSH forward (so no host
/// TCP listener), no API socket.
pub fn gvproxy_args(socket: &Path) -> Vec<OsString> {
    let mut listen = OsString::from("unix://");
    listen.push(socket.as_os_str());
    vec![
        "-listen-qemu".into(),
        listen,
        "-ssh-port".into(),
        "-1".into(),
    ]
}

/// Makes `cmd`'s child die with the thread that spawns it (spawn it from a
/// long-lived thread) and, with `netns`, start inside that namespace.
pub fn confine_child(cmd: &mut Command, netns: Option<Arc<OwnedFd>>) {
    let hook = move || -> std::io::Result<()> {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        if let Some(fd) = &netns {
            nix::sched::setns(fd.as_ref(), CloneFlags::CLONE_NEWNET)?;
        }
        Ok(())
    };
    #[allow(unsafe_code, reason = "pre_exec runs between fork and exec")]
    // SAFETY: the hook runs in the forked child before exec and makes only
    // two async-signal-safe system calls (prctl, setns); it allocates
    // nothing and touches no lock.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Relays every connection on the namespace's listener to the sandbox's
/// supervisor socket, until the task is aborted.
pub async fn forward(listener: std::net::TcpListener, target: PathBuf) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("the VM forwarder cannot start: {e}");
            return;
        }
    };
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            match tokio::net::UnixStream::connect(&target).await {
                Ok(mut unix) => {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
                Err(e) => tracing::warn!("VM forwarder: cannot reach {}: {e}", target.display()),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gvproxy_opens_no_ssh_listener_and_no_api_socket() {
        let a: Vec<String> = gvproxy_args(Path::new("/s/net.sock"))
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(a, ["-listen-qemu", "unix:///s/net.sock", "-ssh-port", "-1"]);
        assert!(!a.iter().any(|s| s == "-listen"));
    }

    #[test]
    fn the_confined_loopback_hides_the_hosts_listeners() {
        // Skips only where namespaces are not permitted (not root).
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host_port = host.local_addr().unwrap().port();
        let Ok(c) = confined_loopback() else {
            eprintln!("SKIP: no CAP_SYS_ADMIN to make a network namespace");
            return;
        };
        assert!(c.guest_endpoint().starts_with("http://192.168.127.254:"));
        // From inside the namespace, the host's listener does not exist.
        let fd = c.netns.clone();
        let reached = std::thread::spawn(move || {
            nix::sched::setns(fd.as_ref(), CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpStream::connect(("127.0.0.1", host_port)).is_ok()
        })
        .join()
        .unwrap();
        assert!(
            !reached,
            "a host loopback listener was reachable from the VM namespace"
        );
    }
}
