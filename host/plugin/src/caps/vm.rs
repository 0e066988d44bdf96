//! `openshell:compute/vm`: microVMs, and the table that owns everything a
//! VM sandbox runs on the host (its VM, its network, its staged files),
//! keyed by sandbox id so they outlive the plugin instance that started
//! them. The network lives in [`super::network`], staging in
//! [`super::rootfs`]; the backends themselves (QEMU's command line, the
//! initramfs segment, gvproxy's confinement) in `openshell-vm`.
//!
//! `launch` runs QEMU (TCG or KVM, chosen from the cached boot probe) with
//! its console in `<sandbox>/console.log`, under a boot watchdog (no console
//! output within 3 s: kill and retry once), then reports its exit as a
//! [`HostEvent`]. Every child is a [`crate::children::HostChild`]: a launch
//! abandoned at its deadline kills what it started.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openshell_vm::VmError;
use openshell_vm::net;
use openshell_vm::qemu::{self, QemuLaunch};
use openshell_vm::runtime::{Backend as VmBackend, BackendChoice, VmRuntime};
use tokio::sync::mpsc;
use wasmtime::component::Resource;

use crate::bindings::openshell::compute::vm::{Backend, Host, HostMicrovm, VmSpec, VmStatus};
use crate::bindings::types::CapError;
use crate::caps::network::Net;
use crate::caps::rootfs::Staged;
use crate::caps::{CallState, CapabilityError, HostEvent, limits};
use crate::children::{HostChild, Spawner};

/// No console output for this long after QEMU starts means a silent hang
/// (about 1 boot in 30 under TCG): kill it and try once more.
const BOOT_WATCHDOG: Duration = Duration::from_secs(3);
/// The host's floor on what a VM may ask for, whatever the driver says.
pub const MAX_VCPUS: u32 = 8;
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 128..=8192;

/// Where the VM capability finds its runtime.
#[derive(Clone, Debug, Default)]
pub struct VmConfig {
    /// The runtime dir staged by `just vm-setup` / `just vm-rootfs`.
    pub runtime_dir: Option<PathBuf>,
    pub backend: BackendChoice,
    /// TLS for the guest supervisor's hop; the gateway always sets it.
    /// Without it (tests of the plugin host alone) the hop is plaintext.
    pub supervisor_tls: Option<net::SupervisorTls>,
}

#[derive(Debug)]
pub struct VmHandle {
    sandbox_id: String,
}

struct Vm {
    /// QEMU; dropping the entry kills it.
    child: HostChild,
    backend: VmBackend,
    /// Held open for the VM's life (a restored VM is told anew on it).
    _identity: IdentityChannel,
}

/// The gateway's end of a VM's identity channel: a task that connects to
/// QEMU's socket as soon as it exists, writes the identity (which waits in
/// the socket until the guest's init reads the port) and holds the
/// connection. Aborted on drop.
struct IdentityChannel(tokio::task::AbortHandle);

impl IdentityChannel {
    /// How long QEMU gets to create its socket.
    const READY: Duration = Duration::from_secs(10);

    fn open(socket: PathBuf, message: Vec<u8>) -> Self {
        let task = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let started = Instant::now();
            let mut stream = loop {
                match tokio::net::UnixStream::connect(&socket).await {
                    Ok(s) => break s,
                    Err(_) if started.elapsed() < Self::READY => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => {
                        tracing::warn!(
                            "cannot reach the VM's identity channel {}: {e}",
                            socket.display()
                        );
                        return;
                    }
                }
            };
            if let Err(e) = stream.write_all(&message).await {
                tracing::warn!("cannot send the VM its identity: {e}");
                return;
            }
            // Held until the VM goes (the task is aborted).
            std::future::pending::<()>().await;
        });
        IdentityChannel(task.abort_handle())
    }
}

impl Drop for IdentityChannel {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Running VMs, their networks and staged files, by sandbox id.
pub struct VmTable {
    pub config: VmConfig,
    pub(crate) nets: Mutex<HashMap<String, Net>>,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    pub(crate) staged: Mutex<HashMap<String, Staged>>,
    events: mpsc::UnboundedSender<HostEvent>,
    pub(crate) spawner: Arc<Spawner>,
}

impl std::fmt::Debug for VmTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTable").finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn cap_error(e: VmError) -> CapError {
    match e {
        VmError::Invalid(m) => CapError::Invalid(m),
        VmError::Unavailable(m) => CapError::Unavailable(m),
        e @ VmError::Io { .. } => CapError::Failed(e.to_string()),
    }
}

/// Runs blocking host work (files, namespaces) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CapError> + Send + 'static,
) -> Result<T, CapError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(CapError::Failed(format!("host work panicked: {e}"))))
}

/// A child's stdout and stderr, appended to `path`.
pub(crate) fn log_file(path: &Path) -> Result<(Stdio, Stdio), CapError> {
    // A pipe the gateway copies into the log under a bound, not the file:
    // the child's output cannot fill the disk (crate::logs).
    let failed =
        |e: std::io::Error| CapError::Failed(format!("cannot open {}: {e}", path.display()));
    let (write, _) = crate::logs::pump(path, crate::logs::MAX_LOG).map_err(failed)?;
    let second = write.try_clone().map_err(failed)?;
    Ok((write.into(), second.into()))
}

/// The shape a VM may have: bounded by the host whatever the driver says.
fn check_spec(spec: &VmSpec) -> Result<(), CapError> {
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
    limits::check_environment(&spec.environment)
}

impl VmTable {
    /// VM children are forked by `spawner`, the host's one spawner thread.
    pub fn new(
        spawner: Arc<Spawner>,
        events: mpsc::UnboundedSender<HostEvent>,
        config: VmConfig,
    ) -> Self {
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
    pub(crate) async fn runtime(&self) -> Result<VmRuntime, CapError> {
        let dir = self.config.runtime_dir.clone().ok_or_else(|| {
            CapError::Unavailable(
                "this gateway has no VM runtime: run `just vm-setup` and `just vm-rootfs`, then start it with OPENSHELL_VM_RUNTIME=<repo>/runtime".into(),
            )
        })?;
        let choice = self.config.backend;
        blocking(move || VmRuntime::load(&dir, choice).map_err(cap_error)).await
    }

    fn vm(&self, sandbox_id: &str) -> Option<Arc<Vm>> {
        lock(&self.vms).get(sandbox_id).cloned()
    }

    fn status(&self, sandbox_id: &str) -> Option<VmStatus> {
        self.vm(sandbox_id).map(|v| match v.child.exited() {
            None => VmStatus::Running,
            Some(s) => VmStatus::Exited(s),
        })
    }

    /// Whether the host holds a VM of this sandbox that has exited (not
    /// one that runs, nor one it forgot after stopping it).
    pub fn has_exited(&self, sandbox_id: &str) -> bool {
        matches!(self.status(sandbox_id), Some(VmStatus::Exited(_)))
    }

    /// QEMU processes currently alive.
    pub fn running(&self) -> usize {
        lock(&self.vms)
            .values()
            .filter(|v| v.child.exited().is_none())
            .count()
    }

    /// The pids of a sandbox's QEMU and gvproxy, for tests and diagnostics.
    pub fn pids(&self, sandbox_id: &str) -> (Option<i32>, Option<i32>) {
        (
            self.vm(sandbox_id).map(|v| v.child.pid() as i32),
            lock(&self.nets)
                .get(sandbox_id)
                .map(|n| n.gvproxy.pid() as i32),
        )
    }

    /// The backend of a sandbox's VM, if one was launched.
    pub fn backend(&self, sandbox_id: &str) -> Option<VmBackend> {
        self.vm(sandbox_id).map(|v| v.backend)
    }

    async fn launch(
        &self,
        id: &str,
        dir: &Path,
        spec: &VmSpec,
        run_as: net::RunAs,
        image: Option<VmImage>,
    ) -> Result<(), CapError> {
        if matches!(self.status(id), Some(VmStatus::Running)) {
            return Err(CapError::Invalid(
                "this sandbox's VM is already running".into(),
            ));
        }
        check_spec(spec)?;
        if self.port(id).is_none() {
            return Err(CapError::Invalid(
                "start the sandbox's network before launching its VM".into(),
            ));
        }
        let rt = self.runtime().await?;
        let initrd = dir.join("initrd.cpio");
        let console = dir.join("console.log");
        let sockets = Path::new(SOCKET_ROOT).join(id);
        let net_socket = sockets.join("net.sock");
        let identity_socket = sockets.join("identity.sock");
        for p in [&initrd, &console, &net_socket, &identity_socket] {
            qemu::check_path(p).map_err(cap_error)?;
        }
        openshell_vm::check_socket_path(&identity_socket).map_err(cap_error)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // The host, not the driver, says whom the guest must trust.
        let mut env: Vec<(String, String)> = spec
            .environment
            .iter()
            .filter(|(k, _)| !k.starts_with("OPENSHELL_GATEWAY_"))
            .cloned()
            .collect();
        let disks = match &image {
            Some(image) => {
                env = crate::caps::image::environment(&image.image.config, env);
                Some(image.disks(dir).await?)
            }
            None => None,
        };
        if let Some(tls) = &self.config.supervisor_tls {
            env.push((
                "OPENSHELL_GATEWAY_CA".into(),
                openshell_vm::identity::pem_line(&tls.ca_pem),
            ));
            env.push(("OPENSHELL_GATEWAY_NAME".into(), tls.server_name.clone()));
        }
        let identity =
            openshell_vm::identity::message(&env, now, &rand::random()).map_err(cap_error)?;
        self.write_initrd(id, &rt, &initrd).await?;
        // QEMU runs as the sandbox's uid and cannot pass the root-only
        // state dir: it gets the initramfs as descriptor 3, and as 4 a pipe
        // the gateway copies into console.log under a bound (a guest may
        // write to its console without end).
        // The kernel too (5): the runtime may sit under a directory the
        // sandbox's uid cannot pass (a clone in /root, say).
        let (uid, i, c, k, disks_for_fds) = (
            run_as.uid,
            initrd.clone(),
            console.clone(),
            rt.kernel.clone(),
            disks.clone(),
        );
        let handed: Vec<std::os::fd::OwnedFd> = blocking(move || {
            let (console, _) = crate::logs::pump(&c, crate::logs::MAX_LOG)
                .map_err(|e| CapError::Failed(format!("cannot open {}: {e}", c.display())))?;
            std::os::unix::fs::fchown(&console, Some(uid), Some(uid)).map_err(|e| {
                CapError::Failed(format!("cannot hand the console to the sandbox's uid: {e}"))
            })?;
            let kernel = std::fs::File::open(&k)
                .map_err(|e| CapError::Failed(format!("cannot open {}: {e}", k.display())))?;
            let mut fds = vec![hand_to(&i, uid)?.into(), console, kernel.into()];
            // The image's disk stays root's (0444, shared); the sandbox's
            // own becomes its uid's, read-write.
            if let Some((base, upper)) = &disks_for_fds {
                fds.push(open_nofollow(base, false)?.into());
                let upper_file = open_nofollow(upper, true)?;
                std::os::unix::fs::fchown(&upper_file, Some(uid), Some(uid)).map_err(|e| {
                    CapError::Failed(format!("cannot hand the sandbox's disk to its uid: {e}"))
                })?;
                fds.push(upper_file.into());
            }
            Ok(fds)
        })
        .await?;
        let handed = Arc::new(handed);
        let launch = QemuLaunch {
            kvm: rt.backend == VmBackend::QemuKvm,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: "/dev/fd/5".into(),
            initrd: "/dev/fd/3".into(),
            net_socket,
            identity_socket: identity_socket.clone(),
            console: "/dev/fd/4".into(),
            tsc_khz: rt.tsc_khz,
            disks: match disks {
                Some(_) => vec![
                    qemu::QemuDisk {
                        path: "/dev/fd/6".into(),
                        read_only: true,
                        serial: "openshell-image",
                    },
                    qemu::QemuDisk {
                        path: "/dev/fd/7".into(),
                        read_only: false,
                        serial: "openshell-disk",
                    },
                ],
                None => vec![],
            },
        };
        let qemu_log = dir.join("qemu.log");
        for attempt in 1..=2 {
            let (log, con) = (qemu_log.clone(), console.clone());
            let ((out, err), seen) = blocking(move || {
                let seen = std::fs::metadata(&con).map_or(0, |m| m.len());
                Ok((log_file(&log)?, seen))
            })
            .await?;
            let mut cmd = Command::new(&rt.qemu);
            cmd.args(launch.args())
                .env_clear()
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            net::confine_child(&mut cmd, None, Some(run_as.clone()));
            net::pass_fds(&mut cmd, handed.clone(), 3);
            // Owned from here on: abandoned during the watchdog, it is killed.
            let child = self
                .spawner
                .spawn(cmd)
                .await
                .map_err(|e| CapError::Failed(format!("cannot start QEMU: {e}")))?;
            let channel = IdentityChannel::open(identity_socket.clone(), identity.clone());
            match watch_boot(&child, &console, seen).await {
                Boot::Printed => {
                    child.report_exit(id, "the VM", self.events.clone());
                    lock(&self.vms).insert(
                        id.to_owned(),
                        Arc::new(Vm {
                            child,
                            backend: rt.backend,
                            _identity: channel,
                        }),
                    );
                    return Ok(());
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
                    // Gone before the retry appends to the same console.
                    child.stop(Duration::ZERO).await;
                }
            }
        }
        Err(CapError::Timeout(format!(
            "the VM printed nothing on its console within {BOOT_WATCHDOG:?}, twice"
        )))
    }

    /// SIGTERM to QEMU, up to `grace` for it to exit, then SIGKILL; then the
    /// network goes. Returns the exit status, or None if nothing ran.
    pub async fn stop(&self, id: &str, grace: Duration) -> Option<i32> {
        let status = match self.vm(id) {
            Some(v) => v.child.stop(grace).await,
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

/// Where a VM's unix sockets live (gvproxy's, QEMU's identity channel):
/// outside the state dir, which stays root's 0700, because gvproxy and QEMU
/// run as the sandbox's uid and must reach them by path. The parent is
/// root's 0711 (nobody can list it); each VM's dir is its uid's 0700.
pub(crate) const SOCKET_ROOT: &str = "/run/openshell-vm";

/// A fresh socket dir for sandbox `id`, owned by `uid`.
pub(crate) fn socket_dir(id: &str, uid: u32) -> Result<PathBuf, CapError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let fail = |p: &Path, e: std::io::Error| {
        CapError::Failed(format!("cannot prepare {}: {e}", p.display()))
    };
    let root = Path::new(SOCKET_ROOT);
    match std::fs::DirBuilder::new().mode(0o711).create(root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(fail(root, e)),
        _ => {}
    }
    // Never trust a path someone else could have made: root's, a real dir.
    let meta = std::fs::symlink_metadata(root).map_err(|e| fail(root, e))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(CapError::Failed(format!(
            "{SOCKET_ROOT} must be a directory owned by root and writable only by it"
        )));
    }
    if meta.mode() & 0o777 != 0o711 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| fail(root, e))?;
    }
    let dir = root.join(id);
    // A dir left by a gateway that died goes first.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail(&dir, e))?;
    std::os::unix::fs::lchown(&dir, Some(uid), Some(uid)).map_err(|e| fail(&dir, e))?;
    Ok(dir)
}

/// A VM sandbox's own disk when the gateway has no sandbox disk (so no
/// quota sizes it).
pub const DEFAULT_DISK_BYTES: u64 = 8 << 30;
/// What a sandbox's quota keeps beside its VM disk: the staged initramfs,
/// console and QEMU logs.
pub const DISK_HEADROOM: u64 = 256 << 20;

/// The size of a VM's own disk for a sandbox disk quota of `quota` bytes
/// (0: none): the quota bounds everything the sandbox stores on the host,
/// so the VM disk is a little smaller and the guest sees ENOSPC first.
pub fn vm_disk_size(quota: u64) -> u64 {
    if quota == 0 {
        DEFAULT_DISK_BYTES
    } else {
        quota.saturating_sub(DISK_HEADROOM).max(DISK_HEADROOM)
    }
}

/// What a VM rooted in an image boots from.
pub(crate) struct VmImage {
    image: openshell_image::Image,
    store: Arc<openshell_image::ImageStore>,
    disk_size: u64,
}

impl VmImage {
    /// The image's shared disk (built now if the gateway has not already)
    /// and the sandbox's own (made at its first launch).
    async fn disks(&self, dir: &Path) -> Result<(PathBuf, PathBuf), CapError> {
        let (store, image) = (self.store.clone(), self.image.clone());
        let base = blocking(move || store.disk(&image).map_err(super::image::cap_error)).await?;
        let upper = dir.join(SANDBOX_DISK);
        let (path, size) = (upper.clone(), self.disk_size);
        blocking(move || {
            openshell_vm::disk::ensure(&path, size)
                .map(drop)
                .map_err(cap_error)
        })
        .await?;
        Ok((base, upper))
    }
}

/// The sandbox's own disk, in its state dir.
pub const SANDBOX_DISK: &str = "disk.ext4";

fn open_nofollow(path: &Path, write: bool) -> Result<std::fs::File, CapError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| CapError::Failed(format!("cannot open {}: {e}", path.display())))
}

/// Opens `path` (never through a symlink) for QEMU to read, handing the
/// file to the sandbox's `uid`: QEMU, running as that uid, reopens it
/// through `/dev/fd`, which checks the file's own permissions but no
/// directory above it.
pub(crate) fn hand_to(path: &Path, uid: u32) -> Result<std::fs::File, CapError> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| {
        CapError::Failed(format!(
            "cannot hand {} to the sandbox's uid: {e}",
            path.display()
        ))
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(fail)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(uid)).map_err(fail)?;
    Ok(f)
}

enum Boot {
    Printed,
    Silent,
    Exited(i32),
}

/// Waits for the console to grow past `seen` bytes.
async fn watch_boot(child: &HostChild, console: &Path, seen: u64) -> Boot {
    let started = Instant::now();
    loop {
        if tokio::fs::metadata(console)
            .await
            .is_ok_and(|m| m.len() > seen)
        {
            return Boot::Printed;
        }
        if let Some(status) = child.exited() {
            return Boot::Exited(status);
        }
        if started.elapsed() > BOOT_WATCHDOG {
            return Boot::Silent;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl CallState {
    pub(crate) fn vm_scope(&self) -> Result<(String, PathBuf, net::RunAs), CapError> {
        let id = self.require_sandbox()?.to_owned();
        let dir = self
            .scope
            .state_path
            .clone()
            .ok_or_else(|| CapError::AccessDenied("no sandbox state directory".into()))?;
        // The gateway allocated and stored it: no other sandbox has it.
        let slot = self.scope.uid_slot.ok_or_else(|| {
            CapError::Failed("this sandbox has no uid range: the gateway did not assign one".into())
        })?;
        let uid = self.services.processes.uid_base(slot);
        // QEMU opens /dev/kvm through its group on a KVM host.
        let groups = std::fs::metadata("/dev/kvm")
            .map(|m| vec![std::os::unix::fs::MetadataExt::gid(&m)])
            .unwrap_or_default();
        Ok((id, dir, net::RunAs { uid, groups }))
    }
}

impl Host for CallState {
    async fn launch(
        &mut self,
        spec: VmSpec,
        root: Resource<super::RootfsHandle>,
        net: Resource<super::NetworkHandle>,
        image: Option<Resource<super::ImageHandle>>,
    ) -> Result<Resource<VmHandle>, CapabilityError> {
        let (id, dir, run_as) = self.vm_scope()?;
        let image = match image {
            Some(h) => {
                let store = self.images()?.store.clone();
                Some(VmImage {
                    image: self.table.get(&h)?.image.clone(),
                    store,
                    disk_size: vm_disk_size(self.scope.disk_bytes),
                })
            }
            None => None,
        };
        // Both handles must be this sandbox's (they always are: handles are
        // per call and per sandbox, but the check is cheap).
        if self.table.get(&root)?.sandbox_id != id || self.table.get(&net)?.sandbox_id != id {
            return Err(CapError::AccessDenied(
                "the rootfs and network must be this sandbox's".into(),
            )
            .into());
        }
        let services = self.services.clone();
        services.vms.launch(&id, &dir, &spec, run_as, image).await?;
        Ok(self.table.push(VmHandle { sandbox_id: id })?)
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

    async fn stop(&mut self, h: Resource<VmHandle>, grace_ms: u32) -> Result<i32, CapabilityError> {
        let id = self.table.get(&h)?.sandbox_id.clone();
        let grace = Duration::from_millis(grace_ms.into()).min(self.services.io_timeout);
        let services = self.services.clone();
        let status = services.vms.stop(&id, grace).await;
        Ok(status.ok_or_else(|| CapError::Invalid("no VM is running".into()))?)
    }

    async fn drop(&mut self, h: Resource<VmHandle>) -> wasmtime::Result<()> {
        // Dropping the handle never stops the VM: the host owns it.
        self.table.delete(h)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vcpus: u32, memory_mib: u64, environment: Vec<(String, String)>) -> VmSpec {
        VmSpec {
            vcpus,
            memory_mib,
            environment,
        }
    }

    #[test]
    fn a_vm_spec_outside_the_hosts_bounds_is_invalid() {
        check_spec(&spec(2, 512, vec![])).unwrap();
        for bad in [
            spec(MAX_VCPUS + 1, 512, vec![]),
            spec(1, 64, vec![]),
            spec(1, 1 << 20, vec![]),
            spec(
                1,
                512,
                vec![("A".into(), "x".repeat(limits::MAX_ENV_VALUE + 1))],
            ),
        ] {
            assert!(
                matches!(check_spec(&bad), Err(CapError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
