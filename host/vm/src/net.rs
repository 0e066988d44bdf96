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

/// Host directories any user may write: read-only for a VM's host
/// processes (a compromised gvproxy or QEMU must not leave files for other
/// users, or fill a shared tmpfs).
pub const WORLD_WRITABLE: [&str; 5] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue"];

/// Who a VM's host processes (gvproxy, QEMU) run as: the sandbox's own
/// slot uid, never root, with at most the groups it needs (`kvm`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub groups: Vec<u32>,
}

/// Makes `cmd`'s child die with the thread that spawns it (spawn it from a
/// long-lived thread), with `netns` start inside that namespace, and with
/// `run_as` give it a private mount namespace in which every world-writable
/// host directory ([`WORLD_WRITABLE`]) is read-only, then drop root (std's
/// own uid change runs before this hook, too early for `setns` and
/// `mount`, which need root). What it can write is then what it was handed:
/// its socket dir, and descriptors.
pub fn confine_child(cmd: &mut Command, netns: Option<Arc<OwnedFd>>, run_as: Option<RunAs>) {
    use nix::mount::{MsFlags, mount};
    use nix::unistd::{Gid, Uid};
    let groups: Vec<Gid> = run_as
        .as_ref()
        .map(|r| r.groups.iter().copied().map(Gid::from_raw).collect())
        .unwrap_or_default();
    // Built before the fork: nothing may allocate between fork and exec.
    let read_only: Vec<std::ffi::CString> = WORLD_WRITABLE
        .iter()
        .filter(|d| Path::new(d).is_dir())
        .filter_map(|d| std::ffi::CString::new(*d).ok())
        .collect();
    let hook = move || -> std::io::Result<()> {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        if let Some(fd) = &netns {
            nix::sched::setns(fd.as_ref(), CloneFlags::CLONE_NEWNET)?;
        }
        if let Some(r) = &run_as {
            nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
            let none: Option<&std::ffi::CStr> = None;
            // Nothing done here propagates back to the host.
            mount(
                none,
                c"/",
                none,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                none,
            )?;
            for d in &read_only {
                let d = d.as_c_str();
                mount(Some(d), d, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)?;
                let ro = MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV;
                mount(none, d, none, ro, none)?;
            }
            nix::unistd::setgroups(&groups)?;
            let (g, u) = (Gid::from_raw(r.uid), Uid::from_raw(r.uid));
            nix::unistd::setresgid(g, g, g)?;
            nix::unistd::setresuid(u, u, u)?;
            // A credential change clears the parent-death signal.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        }
        Ok(())
    };
    #[allow(unsafe_code, reason = "pre_exec runs between fork and exec")]
    // SAFETY: the hook runs in the forked child before exec and makes only
    // async-signal-safe system calls (prctl, setns, unshare, mount,
    // setgroups, setresgid, setresuid) on values built before the fork; it
    // allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Passes `fds` (at most [`MAX_PASSED`]) to `cmd`'s child as descriptors
/// `first`, `first + 1`, ... (without close-on-exec), for a child that
/// reopens them by `/dev/fd/N`. Runs after any earlier `pre_exec` hook.
pub fn pass_fds(cmd: &mut Command, fds: Arc<Vec<OwnedFd>>, first: i32) {
    use std::os::fd::AsRawFd;
    assert!(
        fds.len() <= MAX_PASSED,
        "pass_fds takes at most {MAX_PASSED}"
    );
    let hook = move || -> std::io::Result<()> {
        let n = fds.len();
        let check = |r: i32| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(r)
            }
        };
        // Two phases, so a source that sits on another's target number is
        // copied away before that target is overwritten. A fixed array:
        // nothing may allocate between fork and exec.
        let mut high = [0i32; MAX_PASSED];
        #[allow(
            unsafe_code,
            reason = "fcntl, dup2 and close on raw descriptor numbers"
        )]
        // SAFETY: each call takes descriptor numbers: sources are open
        // (owned by the Arc the hook holds), copies are this child's own,
        // and the targets are plain slots in a child about to exec.
        unsafe {
            for (k, fd) in fds.iter().enumerate() {
                high[k] = check(nix::libc::fcntl(
                    fd.as_raw_fd(),
                    nix::libc::F_DUPFD_CLOEXEC,
                    first + n as i32,
                ))?;
            }
            for (k, &h) in high.iter().enumerate().take(n) {
                // dup2's copy is not close-on-exec.
                check(nix::libc::dup2(h, first + k as i32))?;
                nix::libc::close(h);
            }
        }
        Ok(())
    };
    #[allow(unsafe_code, reason = "pre_exec runs between fork and exec")]
    // SAFETY: the hook makes only async-signal-safe calls (fcntl, dup2,
    // close) on descriptors opened before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Where a binary exec'd through `/proc/self/fd` is passed (above the
/// descriptors QEMU is handed).
pub const EXEC_FD: i32 = 9;

/// The most descriptors [`pass_fds`] passes.
pub const MAX_PASSED: usize = 8;

/// Guest connections the forwarder relays at once. The supervisor socket
/// serves four (its `SocketLimits::connections`); more would only hold two
/// gateway descriptors each while they wait in its backlog. At the cap the
/// forwarder stops accepting, so a guest's flood waits in the kernel's
/// listen queue (no gateway descriptor) instead of in the gateway.
pub const FORWARD_CONNECTIONS: usize = 8;

/// How long the forwarder sleeps after a resource error (EMFILE, ENFILE,
/// ENOBUFS) instead of retrying at once, which would spin a core.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// TLS for the guest supervisor's hop (issue 14, item 5): the forwarder
/// terminates it with the gateway's server certificate, which the guest
/// verifies against `ca_pem` under `server_name` (both sent on the identity
/// channel). No supervisor connection crosses a network in plaintext.
#[derive(Clone)]
pub struct SupervisorTls {
    pub ca_pem: String,
    pub server_name: String,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for SupervisorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A guest connection, past TLS when the hop has it.
enum Guest {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// A guest must finish its TLS handshake by then.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Relays each connection on the namespace's listener to the sandbox's
/// supervisor socket, at most `max` at a time, through `tls` when set,
/// until the task is aborted.
pub async fn forward(
    listener: std::net::TcpListener,
    target: PathBuf,
    max: usize,
    tls: Option<SupervisorTls>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("the VM forwarder cannot start: {e}");
            return;
        }
    };
    let budget = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    let unreachable = Arc::new(RateLimited::default());
    loop {
        let Ok(permit) = budget.clone().acquire_owned().await else {
            return;
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                if is_resource_error(&e) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let target = target.clone();
        let unreachable = unreachable.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // TLS first: a guest that does not finish it never reaches the
            // supervisor socket (nor takes one of its connections).
            let guest = match tls {
                None => Guest::Plain(tcp),
                Some(tls) => {
                    match tokio::time::timeout(TLS_HANDSHAKE, tls.acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => Guest::Tls(Box::new(s)),
                        _ => return,
                    }
                }
            };
            match tokio::net::UnixStream::connect(&target).await {
                Ok(unix) => match guest {
                    Guest::Plain(s) => relay(s, unix).await,
                    Guest::Tls(s) => relay(*s, unix).await,
                },
                Err(e) => unreachable.warn(|n| {
                    tracing::warn!(
                        "VM forwarder: cannot reach {} ({n} times since the last line): {e}",
                        target.display()
                    )
                }),
            }
        });
    }
}

/// Copies both ways until the gateway's side ends: a server that closed
/// (a missed handshake deadline, say) ends the relay and frees its slot
/// even if the guest never closes its side.
async fn relay<S>(guest: S, mut unix: tokio::net::UnixStream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::AsyncWriteExt;
    let (mut from_guest, mut to_guest) = tokio::io::split(guest);
    let (mut from_gateway, mut to_gateway) = unix.split();
    let up = async {
        let _ = tokio::io::copy(&mut from_guest, &mut to_gateway).await;
        // The guest half-closed: pass that on, then wait for the answer.
        let _ = to_gateway.shutdown().await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::io::copy(&mut from_gateway, &mut to_guest) => {}
        () = up => {}
    }
}

fn is_resource_error(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// One log line per [`RateLimited::INTERVAL`] at most, saying how many
/// were held back: a guest cannot grow the gateway's log by failing fast.
#[derive(Default)]
struct RateLimited {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimited {
    const INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

    fn warn(&self, log: impl FnOnce(u64)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        if s.0.is_none_or(|t| t.elapsed() >= Self::INTERVAL) {
            log(s.1);
            *s = (Some(std::time::Instant::now()), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    /// A forwarder at `max` on a loopback port, relaying to a unix
    /// listener standing in for the supervisor socket.
    fn forwarder(
        max: usize,
        tls: Option<SupervisorTls>,
    ) -> (
        tempfile::TempDir,
        tokio::net::UnixListener,
        std::net::SocketAddr,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("supervisor.sock");
        let supervisor = tokio::net::UnixListener::bind(&target).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let task = tokio::spawn(forward(listener, target, max, tls));
        (dir, supervisor, addr, task)
    }

    /// Issue 13, item 1 through a VM guest's path: a guest's connection
    /// flood costs the gateway at most `max` relays (two descriptors each);
    /// the rest wait in the listen queue, and each relay that ends lets
    /// exactly one more in.
    #[tokio::test]
    async fn the_forwarder_relays_at_most_its_budget_of_guest_connections() {
        let max = 3;
        let (_dir, supervisor, addr, task) = forwarder(max, None);

        // Forty guest connections, all completed by the kernel (the listen
        // queue takes them); the forwarder must pass on only three.
        let mut guests = Vec::new();
        for _ in 0..40 {
            guests.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut relayed = Vec::new();
        while relayed.len() < max {
            relayed.push(supervisor.accept().await.unwrap().0);
        }
        // Nothing more arrives while those three are held.
        let extra = tokio::time::timeout(Duration::from_millis(500), supervisor.accept()).await;
        assert!(extra.is_err(), "a fourth connection was relayed at once");

        // One relay ends: exactly one more is let in.
        drop(relayed.remove(0));
        let next = tokio::time::timeout(Duration::from_secs(5), supervisor.accept()).await;
        relayed.push(next.expect("a freed slot is used").unwrap().0);
        let extra = tokio::time::timeout(Duration::from_millis(300), supervisor.accept()).await;
        assert!(extra.is_err(), "a freed slot let in more than one");
        task.abort();
        drop(guests);
    }

    /// Issue 14, item 5: with TLS on the hop, a guest that speaks
    /// plaintext HTTP/2 reaches nothing: the supervisor socket never sees a
    /// connection, and the forwarder hangs up.
    #[tokio::test]
    async fn a_plaintext_guest_cannot_reach_the_supervisor_through_a_tls_forwarder() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::rustls;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["openshell-gateway".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let tls = SupervisorTls {
            ca_pem: cert.pem(),
            server_name: "openshell-gateway".into(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        };
        let (_dir, supervisor, addr, task) = forwarder(4, Some(tls));

        let mut guest = tokio::net::TcpStream::connect(addr).await.unwrap();
        guest
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        // The forwarder's TLS gives up on it: an alert or a hang-up.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(15), guest.read(&mut buf)).await;
        assert!(n.is_ok(), "the forwarder neither answered nor hung up");
        let reached = tokio::time::timeout(Duration::from_millis(300), supervisor.accept()).await;
        assert!(
            reached.is_err(),
            "a plaintext guest reached the supervisor socket"
        );
        task.abort();
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
