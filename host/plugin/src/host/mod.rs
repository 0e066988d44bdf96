//! The plugin host: the engine and its epoch ticker, the compiled-code
//! cache, and the loaded plugins. Calls are in [`call`], errors in
//! [`error`].

mod call;
mod error;
mod state_dir;

pub use call::Plugin;
pub use error::{CallError, PluginError};
pub use state_dir::secure_state_dir;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use openshell_core::{Event, Resources};

use crate::bindings::{ComputeDriver, ComputeDriverPre};
use crate::caps::{CallState, HostEvent, ProcessConfig, ProcessTable, Services, VmConfig, VmTable};
use crate::children::Spawner;
use crate::grants::{self, Capability};
use crate::private_file::write_private;

/// Largest state blob a driver may ask the host to keep.
pub const MAX_STATE: usize = 64 * 1024;
/// Largest component accepted.
pub const MAX_COMPONENT: usize = 32 << 20;

#[derive(Clone, Debug)]
pub struct PluginHostConfig {
    /// Where component bytes and the compiled-code cache live.
    pub plugins_dir: PathBuf,
    /// Parent of every sandbox's state directory.
    pub sandboxes_dir: PathBuf,
    /// Linear-memory cap per plugin instance.
    pub memory_limit: usize,
    /// Wall-clock deadline for one export call.
    pub call_timeout: Duration,
    /// Deadline for one capability call that does I/O.
    pub io_timeout: Duration,
    /// `openshell-sandbox-launch`, for process sandboxes.
    pub launcher: Option<PathBuf>,
    /// `openshell-supervisor`, run inside each process sandbox.
    pub supervisor: Option<PathBuf>,
    /// The static (musl) supervisor, run inside process sandboxes rooted in
    /// an image: it must not depend on the image's libc.
    pub static_supervisor: Option<PathBuf>,
    /// The image store and how to pull; `None`: no image capability.
    pub images: Option<Arc<crate::caps::Images>>,
    /// Host uid that a process sandbox's root maps to.
    pub uid_base: u32,
    /// The VM runtime and backend choice, for VM sandboxes.
    pub vm: VmConfig,
    /// The sandbox disk (quotas on what sandboxes store); off by default
    /// here, on by default in the gateway.
    pub disk: crate::disk::DiskConfig,
    /// Told how long each export call took (the gateway's metrics).
    pub on_call: Option<CallObserver>,
}

/// A callback given the plugin's name and how long one of its export calls
/// took, whatever it returned.
#[derive(Clone)]
pub struct CallObserver(pub Arc<CallFn>);

/// What a [`CallObserver`] calls: the plugin's name, the call's duration.
pub type CallFn = dyn Fn(&str, Duration) + Send + Sync;

impl std::fmt::Debug for CallObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallObserver")
    }
}

impl PluginHostConfig {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            plugins_dir: state_dir.join("plugins"),
            sandboxes_dir: state_dir.join("sandboxes"),
            memory_limit: 64 << 20,
            call_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(5),
            launcher: None,
            supervisor: None,
            static_supervisor: None,
            images: None,
            uid_base: 100_000,
            vm: VmConfig::default(),
            disk: crate::disk::DiskConfig::OFF,
            on_call: None,
        }
    }
}

/// What `describe()` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    /// "process" or "vm".
    pub isolation: &'static str,
}

/// A sandbox as a driver sees it.
#[derive(Clone, Debug)]
pub struct DriverSpec {
    pub id: String,
    pub name: String,
    pub environment: Vec<(String, String)>,
    pub resources: Resources,
    /// The host uid range the gateway allocated to this sandbox (None for
    /// calls not about a stored sandbox, such as validate).
    pub uid_slot: Option<u32>,
    /// The image asked for, with its digest once resolved.
    pub image: Option<openshell_core::SandboxImage>,
}

/// What a driver returned: events for the state machine and its state blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub state: Vec<u8>,
}

pub(crate) struct Shared {
    pub(crate) config: PluginHostConfig,
    pub(crate) services: Arc<Services>,
}

impl Shared {
    /// A sandbox's state dir, 0700 and root's: on the sandbox disk a
    /// subvolume limited to `disk_gib` (set again if it exists), else a
    /// plain directory.
    pub(crate) fn create_sandbox_dir(
        &self,
        sandbox_id: &str,
        disk_gib: u32,
    ) -> std::io::Result<PathBuf> {
        match &self.services.disk {
            Some(disk) => disk.create_sandbox_dir(sandbox_id, disk_gib),
            None => {
                let path = self.config.sandboxes_dir.join(sandbox_id);
                create_private_dir(&path)?;
                Ok(path)
            }
        }
    }

    /// The quota in bytes of a sandbox stored with `disk_gib`; 0 without a
    /// sandbox disk.
    pub(crate) fn disk_bytes(&self, disk_gib: u32) -> u64 {
        self.services
            .disk
            .as_ref()
            .map_or(0, |d| d.limit_bytes(disk_gib))
    }
}

/// Owns the engine, the loaded plugins and the host services.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<CallState>,
    shared: Arc<Shared>,
    plugins: RwLock<HashMap<String, Arc<Plugin>>>,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Plugin instances that may be alive at once with the pooling allocator
/// (a call holds one for its duration; launches are capped well below).
/// A call past it fails, it does not wait.
const POOLED_INSTANCES: u32 = 256;

/// The engine: epoch interruption, a bounded wasm stack, and the pooling
/// allocator (an instance is a slot reused warm, not fresh mappings per
/// call), sized to [`POOLED_INSTANCES`] with memories capped at the
/// per-instance limit. Where the pool's address space cannot be reserved
/// (small VA, some emulators), the on-demand allocator, said in the log.
fn engine(memory_limit: usize) -> Result<Engine, PluginError> {
    let mut wcfg = Config::new();
    wcfg.epoch_interruption(true);
    wcfg.max_wasm_stack(512 << 10);
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_component_instances(POOLED_INSTANCES)
        .total_core_instances(POOLED_INSTANCES * 8)
        .total_memories(POOLED_INSTANCES * 2)
        .total_tables(POOLED_INSTANCES * 8)
        .total_stacks(POOLED_INSTANCES)
        .max_memories_per_module(1)
        .max_memory_size(memory_limit)
        // Keep a warm slot's first pages mapped: a call's memory is small.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10);
    let mut pooled = wcfg.clone();
    pooled.allocation_strategy(pool);
    match Engine::new(&pooled) {
        Ok(engine) => Ok(engine),
        Err(e) => {
            tracing::warn!(
                "the plugin pooling allocator is unavailable ({e:#}); instantiating on demand"
            );
            Engine::new(&wcfg).map_err(|source| PluginError::Engine { source })
        }
    }
}

/// How often the epoch advances. Each tick lets a running guest yield, so a
/// runaway loop cannot pin an async worker for longer than this.
const EPOCH_TICK: Duration = Duration::from_millis(10);

impl PluginHost {
    /// Builds the engine and starts its epoch ticker. Host events (process
    /// exits) are sent to `events`.
    pub fn new(
        config: PluginHostConfig,
        events: mpsc::UnboundedSender<HostEvent>,
    ) -> Result<Self, PluginError> {
        let engine = engine(config.memory_limit)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|source| PluginError::Engine { source })?;
        ComputeDriver::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|source| PluginError::Engine { source })?;

        for dir in [&config.plugins_dir, &config.sandboxes_dir] {
            create_private_dir(dir).map_err(|source| PluginError::Io {
                what: "cannot create",
                path: dir.clone(),
                source,
            })?;
        }

        // A plain thread, not a tokio task: a runtime starved by a guest
        // must still see the epoch advance.
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|source| PluginError::Io {
                what: "cannot start the epoch thread for",
                path: config.plugins_dir.clone(),
                source,
            })?;

        let disk = crate::disk::SandboxDisk::open(
            state_dir_of(&config),
            &config.sandboxes_dir,
            config.disk,
        )
        .map_err(|source| PluginError::Disk { source })?;
        let process_cfg = ProcessConfig {
            launcher: config.launcher.clone(),
            supervisor: config.supervisor.clone(),
            static_supervisor: config.static_supervisor.clone(),
            uid_base: config.uid_base,
        };
        // One spawner thread forks every host child (process and VM).
        let spawner = Arc::new(Spawner::new().map_err(|source| PluginError::Io {
            what: "cannot start the host spawner thread for",
            path: config.plugins_dir.clone(),
            source,
        })?);
        let services = Arc::new(Services {
            vms: VmTable::new(spawner.clone(), events.clone(), config.vm.clone()),
            processes: ProcessTable::new(spawner, events, process_cfg),
            disk,
            images: config.images.clone(),
            io_timeout: config.io_timeout,
        });
        Ok(Self {
            engine,
            linker,
            shared: Arc::new(Shared { config, services }),
            plugins: RwLock::new(HashMap::new()),
            ticker_stop,
        })
    }

    pub fn config(&self) -> &PluginHostConfig {
        &self.shared.config
    }

    pub fn processes(&self) -> &ProcessTable {
        &self.shared.services.processes
    }

    pub fn vms(&self) -> &VmTable {
        &self.shared.services.vms
    }

    /// Validates, grant-checks and compiles `bytes`, stores them under the
    /// plugins dir and makes the plugin current under `name` (replacing an
    /// older build). Returns the plugin and whether one was replaced.
    pub async fn install(
        &self,
        name: &str,
        bytes: &[u8],
        grants: &[Capability],
    ) -> Result<(Arc<Plugin>, bool), PluginError> {
        if bytes.len() > MAX_COMPONENT {
            return Err(PluginError::TooLarge { len: bytes.len() });
        }
        let digest = hex::encode(Sha256::digest(bytes));
        let dir = self.shared.config.plugins_dir.join(name);
        let path = dir.join(format!("{digest}.wasm"));
        if !path.exists() {
            let io = |what, source| PluginError::Io {
                what,
                path: dir.clone(),
                source,
            };
            create_private_dir(&dir).map_err(|e| io("cannot create", e))?;
            write_private(&path, bytes).map_err(|e| io("cannot write into", e))?;
        }
        let plugin = self.load(name, &path, grants).await?;
        let replaced = self.insert(plugin.clone());
        Ok((plugin, replaced))
    }

    /// Loads a component already stored at `path` (gateway start-up) and
    /// makes it current. Uses the compiled-code cache when it can.
    pub async fn load_stored(
        &self,
        name: &str,
        path: &Path,
        grants: &[Capability],
    ) -> Result<Arc<Plugin>, PluginError> {
        let plugin = self.load(name, path, grants).await?;
        self.insert(plugin.clone());
        Ok(plugin)
    }

    fn insert(&self, plugin: Arc<Plugin>) -> bool {
        let mut map = self.plugins.write().unwrap_or_else(|p| p.into_inner());
        map.insert(plugin.name.clone(), plugin).is_some()
    }

    async fn load(
        &self,
        name: &str,
        path: &Path,
        grants: &[Capability],
    ) -> Result<Arc<Plugin>, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Io {
            what: "cannot read",
            path: path.to_owned(),
            source,
        })?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let component = self.compile_cached(&bytes, &digest).await?;

        let ty = component.component_type();
        let import_names: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let imports = grants::check(import_names.iter().map(String::as_str), grants)?;
        let export_names: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        grants::check_exports(export_names.iter().map(String::as_str))?;

        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(ComputeDriverPre::new)
            .map_err(|source| PluginError::WrongWorld { source })?;
        let mut plugin = Plugin {
            name: name.to_owned(),
            digest,
            grants: grants.to_vec(),
            imports,
            info: DriverInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
                isolation: "process",
            },
            path: path.to_owned(),
            pre,
            shared: self.shared.clone(),
        };
        plugin.info = plugin.describe().await.map_err(PluginError::Describe)?;
        Ok(Arc::new(plugin))
    }

    /// Compiles a component, or loads its compiled form from the on-disk
    /// cache keyed by content digest and engine compatibility.
    pub async fn compile_cached(
        &self,
        bytes: &[u8],
        digest: &str,
    ) -> Result<Component, PluginError> {
        let mut h = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let cache_dir = self.shared.config.plugins_dir.join("cache");
        let cached = cache_dir.join(format!("{digest}-{:016x}.cwasm", h.finish()));
        // Read, not mmap: a cache file truncated under a live mapping would
        // kill the gateway with SIGBUS.
        if let Ok(bytes) = std::fs::read(&cached) {
            // SAFETY: the file was written by `precompile_component` below,
            // into a directory only the gateway writes, under a name that
            // binds it to these exact bytes and this engine configuration;
            // wasmtime still checks its header and version.
            #[allow(unsafe_code, reason = "loading our own precompiled cache")]
            let loaded = unsafe { Component::deserialize(&self.engine, &bytes) };
            match loaded {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %cached.display(), "ignoring unusable compiled cache: {e:#}")
                }
            }
        }
        let engine = self.engine.clone();
        let owned = bytes.to_vec();
        let compiled = tokio::task::spawn_blocking(move || engine.precompile_component(&owned))
            .await
            .map_err(|e| PluginError::InvalidComponent {
                source: wasmtime::Error::msg(e.to_string()),
            })?
            .map_err(|source| PluginError::InvalidComponent { source })?;
        if let Err(e) =
            create_private_dir(&cache_dir).and_then(|_| write_private(&cached, &compiled))
        {
            tracing::warn!(path = %cached.display(), "cannot write compiled cache: {e}");
        }
        // SAFETY: `compiled` was produced by this engine's
        // `precompile_component` a moment ago.
        #[allow(unsafe_code, reason = "deserializing what this engine just compiled")]
        let component = unsafe { Component::deserialize(&self.engine, &compiled) };
        component.map_err(|source| PluginError::InvalidComponent { source })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        let map = self.plugins.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Plugin>> {
        let map = self.plugins.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = map.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Plugin>> {
        let mut map = self.plugins.write().unwrap_or_else(|p| p.into_inner());
        map.remove(name)
    }

    /// The gateway's state dir: where the sandbox disk's image lives, on
    /// the host's own filesystem.
    pub fn state_dir(&self) -> &Path {
        state_dir_of(&self.shared.config)
    }

    /// The sandbox disk's size and default sandbox size; `None` when there
    /// is no sandbox disk (off, not root, or a state dir from before it).
    pub fn disk_sizes(&self) -> Option<openshell_core::validate::DiskSizes> {
        self.shared.services.disk.as_ref().map(|d| d.sizes())
    }

    pub(crate) fn sandbox_disk(&self) -> Option<&crate::disk::SandboxDisk> {
        self.shared.services.disk.as_ref()
    }

    /// Detaches the sandbox disk, if there is one (at gateway shutdown).
    pub fn detach_disk(&self) {
        if let Some(disk) = &self.shared.services.disk {
            disk.detach();
        }
    }

    /// The state directory of a sandbox (created on demand by calls).
    pub fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        self.shared.config.sandboxes_dir.join(sandbox_id)
    }

    /// Creates a sandbox's state dir (0700, root's: see
    /// [`create_private_dir`]) before anything else puts files in it, and
    /// (again at every launch) limits it to `disk_gib` on the sandbox disk.
    pub fn ensure_sandbox_dir(&self, sandbox_id: &str, disk_gib: u32) -> std::io::Result<PathBuf> {
        self.shared.create_sandbox_dir(sandbox_id, disk_gib)
    }

    /// The unix socket a sandbox's supervisor dials; the process capability
    /// mounts its directory at `/run/openshell` inside the sandbox.
    pub fn supervisor_socket(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("run/gateway.sock")
    }
}

/// The state dir is the parent of `sandboxes/` (see [`PluginHostConfig::new`]).
fn state_dir_of(config: &PluginHostConfig) -> &Path {
    config.sandboxes_dir.parent().unwrap_or(Path::new("/"))
}

/// A directory only the gateway's user may enter (0700): a sandbox's state
/// dir, `sandboxes/`, `plugins/` and what is under it. Nothing of a sandbox
/// needs to traverse these on the host: its launcher's init opens what it
/// binds while its file access is still root's, and a VM's QEMU and
/// gvproxy run as root. An existing directory is tightened (an older
/// gateway made them 0755 or 0711); a symlink in its place is refused,
/// never chmodded through.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("{} is not a directory (a symlink?)", path.display()),
        ));
    }
    if meta.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn private_dirs_are_created_0700_and_older_open_ones_are_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b");
        create_private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
    }

    #[test]
    fn a_symlink_in_place_of_a_private_dir_is_refused_and_its_target_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_private_dir(&link).is_err());
        assert_eq!(mode(&target), 0o755);
    }
}
