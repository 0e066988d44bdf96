//! `openshell:compute/{network,rootfs,vm}`: microVMs and their networks.
//!
//! The backends themselves (QEMU's command line, the libkrun plan, the
//! initramfs segment, gvproxy's confinement) live in `openshell-vm`; this
//! module owns the running things, keyed by sandbox id so they outlive the
//! plugin instance that started them:
//!
//! - `network.start`: an empty network namespace with one loopback
//!   listener, a forwarder task from it to the sandbox's supervisor socket,
//!   and gvproxy inside the namespace (`<sandbox>/net.sock`, `gvproxy.log`).
//! - `rootfs.stage`: files for the sandbox's initramfs segment.
//! - `vm.launch`: QEMU (TCG or KVM, chosen by the host from the cached boot
//!   probe), console in `<sandbox>/console.log`, a boot watchdog (no console
//!   output within 3 s: kill and retry once), and a waiter that reports the
//!   exit as a [`HostEvent`].
//!
//! Children are forked from one long-lived thread with a parent-death
//! signal, so a gateway killed outright takes its VMs and gvproxies along.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use openshell_vm::VmError;
use openshell_vm::initramfs::{self, Entry};
use openshell_vm::net;
use openshell_vm::qemu::{self, QemuLaunch};
use openshell_vm::runtime::{Backend as VmBackend, BackendChoice, VmRuntime};
use tokio::sync::{mpsc, oneshot, watch};
use wasmtime::component::Resource;

use crate::bindings::openshell::compute::network::{self, HostVmNetwork};
use crate::bindings::openshell::compute::rootfs::{self, HostStagedRootfs};
use crate::bindings::openshell::compute::vm::{self, Backend, HostMicrovm, VmSpec, VmStatus};
use crate::bindings::types::CapError;
use crate::caps::{CallState, HostEvent};

/// No console output for this long after QEMU starts means a silent hang
/// (about 1 boot in 30 under TCG): kill it and try once more.
const BOOT_WATCHDOG: Duration = Duration::from_secs(3);
/// How long gvproxy gets to create its socket.
const NET_READY: Duration = Duration::from_secs(3);
/// The host's floor on what a VM may ask for, whatever the driver says.
const MAX_VCPUS: u32 = 8;
const MEMORY_MIB: std::ops::RangeInclusive<u64> = 128..=8192;
/// AF_UNIX paths longer than this do not fit `sockaddr_un` on Linux.
const MAX_SOCKET_PATH: usize = 107;

/// Where the VM capability finds its runtime.
#[derive(Clone, Debug, Default)]
pub struct VmConfig {
    /// The runtime dir staged by `just vm-setup` / `just vm-rootfs`.
    pub runtime_dir: Option<PathBuf>,
    pub backend: BackendChoice,
}

#[derive(Debug)]
pub struct NetworkHandle {
    sandbox_id: String,
}
#[derive(Debug)]
pub struct RootfsHandle {
    sandbox_id: String,
}
#[derive(Debug)]
pub struct VmHandle {
    sandbox_id: String,
}

struct Net {
    port: u16,
    gvproxy: i32,
    forwarder: tokio::task::AbortHandle,
    _netns: Arc<OwnedFd>,
}

struct Vm {
    pid: i32,
    backend: VmBackend,
    exit: watch::Receiver<Option<i32>>,
}

struct SpawnJob {
    cmd: Command,
    reply: oneshot::Sender<std::io::Result<Child>>,
}

/// Running VMs, their networks and staged files, by sandbox id.
pub struct VmTable {
    pub config: VmConfig,
    nets: Mutex<HashMap<String, Net>>,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    staged: Mutex<HashMap<String, Vec<Entry>>>,
    events: mpsc::UnboundedSender<HostEvent>,
    spawner: std::sync::mpsc::Sender<SpawnJob>,
}

impl std::fmt::Debug for VmTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTable").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cap_error(e: VmError) -> CapError {
    match e {
        VmError::Invalid(m) => CapError::Invalid(m),
        VmError::Unavailable(m) => CapError::Unavailable(m),
        e @ VmError::Io { .. } => CapError::Failed(e.to_string()),
    }
}

fn log_file(path: &Path) -> Result<(Stdio, Stdio), CapError> {
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let (a, b) = (open(), open());
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a.into(), b.into())),
        (Err(e), _) | (_, Err(e)) => Err(CapError::Failed(format!(
            "cannot open {}: {e}",
            path.display()
        ))),
    }
}

fn check_socket_path(p: &Path) -> Result<(), CapError> {
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(CapError::Unavailable(format!(
            "{} is longer than {MAX_SOCKET_PATH} bytes, the limit for a unix socket path: use a shorter --state-dir (for example under /tmp)",
            p.display()
        )));
    }
    qemu::check_path(p).map_err(cap_error)
}

impl VmTable {
    pub fn new(events: mpsc::UnboundedSender<HostEvent>, config: VmConfig) -> Self {
        // Same reason as the process table: the parent-death signal is tied
        // to the forking *thread*, so fork from one that lives as long as
        // the gateway.
        let (spawner, jobs) = std::sync::mpsc::channel::<SpawnJob>();
        let _ = std::thread::Builder::new()
            .name("vm-spawner".into())
            .spawn(move || {
                for mut job in jobs {
                    let _ = job.reply.send(job.cmd.spawn());
                }
            });
        Self {
            config,
            nets: Mutex::new(HashMap::new()),
            vms: Mutex::new(HashMap::new()),
            staged: Mutex::new(HashMap::new()),
            events,
            spawner,
        }
    }

    /// Read on every launch, so `just vm-setup` after gateway start counts.
    fn runtime(&self) -> Result<VmRuntime, CapError> {
        let dir = self.config.runtime_dir.as_ref().ok_or_else(|| {
            CapError::Unavailable(
                "this gateway has no VM runtime: run `just vm-setup` and `just vm-rootfs`, then start it with OPENSHELL_VM_RUNTIME=<repo>/runtime".into(),
            )
        })?;
        VmRuntime::load(dir, self.config.backend).map_err(cap_error)
    }

    async fn spawn(&self, cmd: Command) -> Result<Child, CapError> {
        let (reply, rx) = oneshot::channel();
        let gone = || CapError::Failed("the VM spawner thread is gone".into());
        self.spawner
            .send(SpawnJob { cmd, reply })
            .map_err(|_| gone())?;
        rx.await
            .map_err(|_| gone())?
            .map_err(|e| CapError::Failed(format!("cannot start a VM process: {e}")))
    }

    /// The gateway's port inside the sandbox's network namespace.
    fn port(&self, sandbox_id: &str) -> Option<u16> {
        lock(&self.nets).get(sandbox_id).map(|n| n.port)
    }

    fn vm(&self, sandbox_id: &str) -> Option<Arc<Vm>> {
        lock(&self.vms).get(sandbox_id).cloned()
    }

    fn status(&self, sandbox_id: &str) -> Option<VmStatus> {
        self.vm(sandbox_id).map(|v| match *v.exit.borrow() {
            None => VmStatus::Running,
            Some(s) => VmStatus::Exited(s),
        })
    }

    /// QEMU processes currently alive.
    pub fn running(&self) -> usize {
        lock(&self.vms)
            .values()
            .filter(|v| v.exit.borrow().is_none())
            .count()
    }

    /// The pids of a sandbox's QEMU and gvproxy, for tests and diagnostics.
    pub fn pids(&self, sandbox_id: &str) -> (Option<i32>, Option<i32>) {
        (
            self.vm(sandbox_id).map(|v| v.pid),
            lock(&self.nets).get(sandbox_id).map(|n| n.gvproxy),
        )
    }

    /// The backend of a sandbox's VM, if one was launched.
    pub fn backend(&self, sandbox_id: &str) -> Option<VmBackend> {
        self.vm(sandbox_id).map(|v| v.backend)
    }

    async fn start_network(&self, id: &str, dir: &Path) -> Result<(), CapError> {
        self.stop_network(id);
        let rt = self.runtime()?;
        let socket = dir.join("net.sock");
        let target = dir.join("run/gateway.sock");
        check_socket_path(&socket)?;
        check_socket_path(&target)?;
        let _ = std::fs::remove_file(&socket);
        let confined = net::confined_loopback().map_err(cap_error)?;
        let (out, err) = log_file(&dir.join("gvproxy.log"))?;
        let mut cmd = Command::new(&rt.gvproxy);
        cmd.args(net::gvproxy_args(&socket))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        net::confine_child(&mut cmd, Some(confined.netns.clone()));
        let mut child = self.spawn(cmd).await?;
        let gvproxy = child.id() as i32;
        let started = Instant::now();
        while !socket.exists() {
            if started.elapsed() > NET_READY || matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CapError::Failed(format!(
                    "gvproxy did not create {} (see gvproxy.log)",
                    socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // gvproxy exits when its VM disconnects; reap it.
        let _ = std::thread::Builder::new()
            .name("gvproxy-wait".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let _ = child.wait();
            });
        let port = confined.port;
        let forwarder = tokio::spawn(net::forward(confined.listener, target)).abort_handle();
        lock(&self.nets).insert(
            id.to_owned(),
            Net {
                port,
                gvproxy,
                forwarder,
                _netns: confined.netns,
            },
        );
        Ok(())
    }

    fn stop_network(&self, id: &str) {
        if let Some(n) = lock(&self.nets).remove(id) {
            n.forwarder.abort();
            let _ = kill(Pid::from_raw(n.gvproxy), Signal::SIGKILL);
        }
    }

    async fn launch(&self, id: &str, dir: &Path, spec: &VmSpec) -> Result<(), CapError> {
        if matches!(self.status(id), Some(VmStatus::Running)) {
            return Err(CapError::Invalid(
                "this sandbox's VM is already running".into(),
            ));
        }
        if spec.vcpus > MAX_VCPUS {
            return Err(CapError::Invalid(format!(
                "{} vcpus: this host allows at most {MAX_VCPUS}",
                spec.vcpus
            )));
        }
        if !MEMORY_MIB.contains(&spec.memory_mib) {
            return Err(CapError::Invalid(format!(
                "{} MiB: a VM needs {}..={} MiB",
                spec.memory_mib,
                MEMORY_MIB.start(),
                MEMORY_MIB.end()
            )));
        }
        if self.port(id).is_none() {
            return Err(CapError::Invalid(
                "start the sandbox's network before launching its VM".into(),
            ));
        }
        let rt = self.runtime()?;
        let initrd = dir.join("initrd.cpio");
        let console = dir.join("console.log");
        let net_socket = dir.join("net.sock");
        for p in [&initrd, &console, &net_socket] {
            qemu::check_path(p).map_err(cap_error)?;
        }
        self.write_initrd(id, &rt, &initrd, &spec.environment)?;
        let launch = QemuLaunch {
            kvm: rt.backend == VmBackend::QemuKvm,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: rt.kernel.clone(),
            initrd,
            net_socket,
            console: console.clone(),
            tsc_khz: rt.tsc_khz,
        };
        let mut child = None;
        for attempt in 1..=2 {
            let (out, err) = log_file(&dir.join("qemu.log"))?;
            let mut cmd = Command::new(&rt.qemu);
            cmd.args(launch.args())
                .env_clear()
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            net::confine_child(&mut cmd, None);
            let seen = std::fs::metadata(&console).map_or(0, |m| m.len());
            let mut c = self.spawn(cmd).await?;
            match watch_boot(&mut c, &console, seen).await {
                Boot::Printed => {
                    child = Some(c);
                    break;
                }
                Boot::Exited(status) => {
                    return Err(CapError::Failed(format!(
                        "QEMU exited with status {status} before the guest printed anything (see qemu.log)"
                    )));
                }
                Boot::Silent => {
                    tracing::warn!(
                        sandbox = id,
                        attempt,
                        "VM printed nothing within {BOOT_WATCHDOG:?}; killing it"
                    );
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        let Some(child) = child else {
            return Err(CapError::Timeout(format!(
                "the VM printed nothing on its console within {BOOT_WATCHDOG:?}, twice"
            )));
        };
        let pid = child.id() as i32;
        let exit = super::process::watch_exit(child, id, "the VM", self.events.clone());
        lock(&self.vms).insert(
            id.to_owned(),
            Arc::new(Vm {
                pid,
                backend: rt.backend,
                exit,
            }),
        );
        Ok(())
    }

    /// The base initramfs followed by this sandbox's segment.
    fn write_initrd(
        &self,
        id: &str,
        rt: &VmRuntime,
        initrd: &Path,
        env: &[(String, String)],
    ) -> Result<(), CapError> {
        let mut entries = lock(&self.staged).remove(id).unwrap_or_default();
        entries.push(Entry {
            path: initramfs::ENV_FILE.into(),
            mode: 0o600,
            contents: initramfs::env_file(env).map_err(cap_error)?,
        });
        let segment = initramfs::archive(&entries).map_err(cap_error)?;
        let mut bytes = std::fs::read(&rt.base_initrd).map_err(|e| {
            CapError::Failed(format!("cannot read {}: {e}", rt.base_initrd.display()))
        })?;
        // Each cpio segment starts 4-byte aligned.
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes.extend_from_slice(&segment);
        std::fs::write(initrd, bytes)
            .map_err(|e| CapError::Failed(format!("cannot write {}: {e}", initrd.display())))
    }

    /// SIGTERM to QEMU, up to `grace` for it to exit, then SIGKILL; then the
    /// network goes. Returns the exit status, or None if nothing ran.
    pub async fn stop(&self, id: &str, grace: Duration) -> Option<i32> {
        let status = match self.vm(id) {
            Some(v) => {
                let mut exit = v.exit.clone();
                if exit.borrow().is_none() {
                    let _ = kill(Pid::from_raw(v.pid), Signal::SIGTERM);
                    if tokio::time::timeout(grace, exit.wait_for(Option::is_some))
                        .await
                        .is_err()
                    {
                        let _ = kill(Pid::from_raw(v.pid), Signal::SIGKILL);
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            exit.wait_for(Option::is_some),
                        )
                        .await;
                    }
                }
                *exit.borrow()
            }
            None => None,
        };
        self.stop_network(id);
        status
    }

    /// Stops everything of a sandbox at once and forgets it.
    pub async fn kill(&self, id: &str) {
        self.stop(id, Duration::ZERO).await;
        lock(&self.vms).remove(id);
        lock(&self.staged).remove(id);
    }
}

enum Boot {
    Printed,
    Silent,
    Exited(i32),
}

/// Waits for the console to grow past `seen` bytes.
async fn watch_boot(child: &mut Child, console: &Path, seen: u64) -> Boot {
    let started = Instant::now();
    loop {
        if std::fs::metadata(console).is_ok_and(|m| m.len() > seen) {
            return Boot::Printed;
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Boot::Exited(super::process::exit_code(st));
        }
        if started.elapsed() > BOOT_WATCHDOG {
            return Boot::Silent;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl CallState {
    fn vm_scope(&self) -> Result<(String, PathBuf), CapError> {
        let id = self.require_sandbox()?.to_owned();
        let dir = self
            .scope
            .state_path
            .clone()
            .ok_or_else(|| CapError::AccessDenied("no sandbox state directory".into()))?;
        Ok((id, dir))
    }
}

impl network::Host for CallState {
    async fn start(&mut self) -> wasmtime::Result<Result<Resource<NetworkHandle>, CapError>> {
        let (id, dir) = match self.vm_scope() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let services = self.services.clone();
        if let Err(e) = services.vms.start_network(&id, &dir).await {
            return Ok(Err(e));
        }
        Ok(Ok(self.table.push(NetworkHandle { sandbox_id: id })?))
    }
}

impl HostVmNetwork for CallState {
    async fn guest_endpoint(&mut self, h: Resource<NetworkHandle>) -> wasmtime::Result<String> {
        let id = &self.table.get(&h)?.sandbox_id;
        Ok(match self.services.vms.port(id) {
            Some(port) => format!("http://{}:{port}", net::GUEST_HOST_ADDR),
            None => String::new(),
        })
    }

    async fn drop(&mut self, h: Resource<NetworkHandle>) -> wasmtime::Result<()> {
        // The host owns the network; dropping the handle keeps it.
        self.table.delete(h)?;
        Ok(())
    }
}

impl rootfs::Host for CallState {
    async fn stage(&mut self) -> wasmtime::Result<Result<Resource<RootfsHandle>, CapError>> {
        let id = match self.require_sandbox() {
            Ok(id) => id.to_owned(),
            Err(e) => return Ok(Err(e)),
        };
        lock(&self.services.vms.staged).insert(id.clone(), Vec::new());
        Ok(Ok(self.table.push(RootfsHandle { sandbox_id: id })?))
    }
}

impl HostStagedRootfs for CallState {
    async fn write_file(
        &mut self,
        h: Resource<RootfsHandle>,
        path: String,
        contents: Vec<u8>,
        mode: u32,
    ) -> wasmtime::Result<Result<(), CapError>> {
        let id = self.table.get(&h)?.sandbox_id.clone();
        if let Err(e) = initramfs::check_path(&path) {
            return Ok(Err(CapError::AccessDenied(e.to_string())));
        }
        if path == initramfs::ENV_FILE {
            return Ok(Err(CapError::AccessDenied(format!(
                "{path} is written by the host from the VM spec's environment"
            ))));
        }
        lock(&self.services.vms.staged)
            .entry(id)
            .or_default()
            .push(Entry {
                path,
                mode,
                contents,
            });
        Ok(Ok(()))
    }

    async fn drop(&mut self, h: Resource<RootfsHandle>) -> wasmtime::Result<()> {
        self.table.delete(h)?;
        Ok(())
    }
}

impl vm::Host for CallState {
    async fn launch(
        &mut self,
        spec: VmSpec,
        root: Resource<RootfsHandle>,
        net: Resource<NetworkHandle>,
    ) -> wasmtime::Result<Result<Resource<VmHandle>, CapError>> {
        let (id, dir) = match self.vm_scope() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        // Both handles must be this sandbox's (they always are: handles are
        // per call and per sandbox, but the check is cheap).
        if self.table.get(&root)?.sandbox_id != id || self.table.get(&net)?.sandbox_id != id {
            return Ok(Err(CapError::AccessDenied(
                "the rootfs and network must be this sandbox's".into(),
            )));
        }
        let services = self.services.clone();
        if let Err(e) = services.vms.launch(&id, &dir, &spec).await {
            return Ok(Err(e));
        }
        Ok(Ok(self.table.push(VmHandle { sandbox_id: id })?))
    }

    async fn current(&mut self) -> wasmtime::Result<Option<Resource<VmHandle>>> {
        let Ok(id) = self.require_sandbox() else {
            return Ok(None);
        };
        let id = id.to_owned();
        if self.services.vms.status(&id).is_none() {
            return Ok(None);
        }
        Ok(Some(self.table.push(VmHandle { sandbox_id: id })?))
    }
}

impl HostMicrovm for CallState {
    async fn backend(&mut self, h: Resource<VmHandle>) -> wasmtime::Result<Backend> {
        let id = &self.table.get(&h)?.sandbox_id;
        Ok(match self.services.vms.backend(id) {
            Some(VmBackend::Krun) => Backend::Krun,
            Some(VmBackend::QemuKvm) => Backend::QemuKvm,
            Some(VmBackend::QemuTcg) | None => Backend::QemuTcg,
        })
    }

    async fn status(&mut self, h: Resource<VmHandle>) -> wasmtime::Result<VmStatus> {
        let id = &self.table.get(&h)?.sandbox_id;
        Ok(self.services.vms.status(id).unwrap_or(VmStatus::Exited(-1)))
    }

    async fn stop(
        &mut self,
        h: Resource<VmHandle>,
        grace_ms: u32,
    ) -> wasmtime::Result<Result<i32, CapError>> {
        let id = self.table.get(&h)?.sandbox_id.clone();
        let grace = Duration::from_millis(grace_ms.into()).min(self.services.io_timeout);
        let services = self.services.clone();
        Ok(services
            .vms
            .stop(&id, grace)
            .await
            .ok_or_else(|| CapError::Invalid("no VM is running".into())))
    }

    async fn drop(&mut self, h: Resource<VmHandle>) -> wasmtime::Result<()> {
        // Dropping the handle never stops the VM: the host owns it.
        self.table.delete(h)?;
        Ok(())
    }
}
