//! Loading components and calling their exports safely.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder};

use openshell_core::{Event, Resources};

use crate::bindings::types::{self as wit, DriverError, DriverEvent, Isolation};
use crate::bindings::{ComputeDriver, ComputeDriverPre};
use crate::caps::{
    CallState, HostEvent, ProcessConfig, ProcessTable, SandboxScope, Services, VmConfig, VmTable,
};
use crate::grants::{self, Capability, GrantError};

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
    /// Host uid that a process sandbox's root maps to.
    pub uid_base: u32,
    /// The VM runtime and backend choice, for VM sandboxes.
    pub vm: VmConfig,
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
            uid_base: 100_000,
            vm: VmConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("the component is {len} bytes; the limit is {MAX_COMPONENT}")]
    TooLarge { len: usize },
    #[error("not a valid WebAssembly component: {source:#}")]
    InvalidComponent {
        #[source]
        source: wasmtime::Error,
    },
    #[error(
        "the component does not implement the openshell:compute@0.1.0 compute-driver world: {source:#}"
    )]
    WrongWorld {
        #[source]
        source: wasmtime::Error,
    },
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("the component's describe() failed: {0}")]
    Describe(#[source] CallError),
    #[error("plugin {name:?} is not loaded")]
    NotFound { name: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the WebAssembly engine: {source:#}")]
    Engine {
        #[source]
        source: wasmtime::Error,
    },
}

/// Why a call into a plugin did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The driver says the request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The driver cannot honour the request here.
    #[error("{0}")]
    Unsupported(String),
    /// The driver tried and failed.
    #[error("{reason}: {message}")]
    Failed { reason: String, message: String },
    /// The plugin trapped (a bug, a memory blow-up, a runaway loop).
    #[error("plugin {plugin} trapped: {message}")]
    Trapped { plugin: String, message: String },
    /// The call ran past its deadline and was abandoned.
    #[error("plugin {plugin} did not answer within {after:?}")]
    TimedOut { plugin: String, after: Duration },
    #[error("plugin {plugin} returned {len} bytes of state; the limit is {MAX_STATE}")]
    StateTooLarge { plugin: String, len: usize },
}

impl CallError {
    /// The reason the sandbox's conditions show for this failure.
    pub fn reason(&self) -> &str {
        match self {
            CallError::Invalid(_) | CallError::Unsupported(_) => "DriverRejected",
            CallError::Failed { reason, .. } => reason,
            CallError::Trapped { .. } | CallError::StateTooLarge { .. } => "DriverFailed",
            CallError::TimedOut { .. } => "DriverTimedOut",
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
}

/// What a driver returned: events for the state machine and its state blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub state: Vec<u8>,
}

/// A loaded driver.
pub struct Plugin {
    pub name: String,
    pub digest: String,
    pub grants: Vec<Capability>,
    pub imports: Vec<Capability>,
    pub info: DriverInfo,
    pub path: PathBuf,
    pre: ComputeDriverPre<CallState>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

struct Shared {
    config: PluginHostConfig,
    services: Arc<Services>,
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
        let mut wcfg = Config::new();
        wcfg.epoch_interruption(true);
        wcfg.max_wasm_stack(512 << 10);
        let engine = Engine::new(&wcfg).map_err(|source| PluginError::Engine { source })?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|source| PluginError::Engine { source })?;
        ComputeDriver::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|source| PluginError::Engine { source })?;

        for dir in [&config.plugins_dir, &config.sandboxes_dir] {
            std::fs::create_dir_all(dir).map_err(|source| PluginError::Io {
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

        let process_cfg = ProcessConfig {
            launcher: config.launcher.clone(),
            supervisor: config.supervisor.clone(),
            uid_base: config.uid_base,
        };
        let services = Arc::new(Services {
            vms: VmTable::new(events.clone(), config.vm.clone()),
            processes: ProcessTable::new(events, process_cfg),
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
            std::fs::create_dir_all(&dir).map_err(|e| io("cannot create", e))?;
            write_atomic(&path, bytes).map_err(|e| io("cannot write into", e))?;
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
            std::fs::create_dir_all(&cache_dir).and_then(|_| write_atomic(&cached, &compiled))
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

    /// The state directory of a sandbox (created on demand by calls).
    pub fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        self.shared.config.sandboxes_dir.join(sandbox_id)
    }

    /// Creates a sandbox's state dir (mode 0711: only the gateway can list
    /// it) before anything else puts files in it.
    pub fn ensure_sandbox_dir(&self, sandbox_id: &str) -> std::io::Result<PathBuf> {
        let path = self.sandbox_dir(sandbox_id);
        create_private_dir(&path)?;
        Ok(path)
    }

    /// The unix socket a sandbox's supervisor dials; the process capability
    /// mounts its directory at `/run/openshell` inside the sandbox.
    pub fn supervisor_socket(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("run/gateway.sock")
    }
}

/// A sandbox's state dir: only the gateway may list it (the sandbox sees
/// just the parts mounted into it).
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o711))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Runs one export call in a fresh instance under every limit. A trap or a
/// timeout only fails this call: the instance (and its store) is dropped.
macro_rules! guarded_call {
    ($plugin:expr, $scope:expr, |$drv:ident, $store:ident| $call:expr) => {{
        let plugin: &Plugin = $plugin;
        let after = plugin.shared.config.call_timeout;
        let run = async {
            let mut $store = plugin.new_store($scope);
            let instance = plugin.pre.instantiate_async(&mut $store).await?;
            let $drv = instance.openshell_compute_driver();
            let $store = &mut $store;
            $call.await
        };
        match tokio::time::timeout(after, run).await {
            Err(_) => Err(CallError::TimedOut {
                plugin: plugin.name.clone(),
                after,
            }),
            Ok(Err(trap)) => Err(CallError::Trapped {
                plugin: plugin.name.clone(),
                message: trap_message(&trap),
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }};
}

/// The first line of a trap, without wasmtime's backtrace.
fn trap_message(e: &wasmtime::Error) -> String {
    let full = format!("{e:#}");
    let first = full.lines().next().unwrap_or("trap").trim();
    if let Some(t) = e.downcast_ref::<wasmtime::Trap>() {
        format!("{t}")
    } else {
        first.chars().take(300).collect()
    }
}

impl Plugin {
    fn new_store(&self, scope: SandboxScope) -> Store<CallState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.shared.config.memory_limit)
            .instances(32)
            .tables(64)
            .memories(8)
            .trap_on_grow_failure(true)
            .build();
        let state = CallState::new(scope, self.shared.services.clone(), limits);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }

    fn scope(&self, sandbox: Option<&DriverSpec>) -> Result<SandboxScope, CallError> {
        let Some(spec) = sandbox else {
            return Ok(SandboxScope {
                plugin: self.name.clone(),
                sandbox_id: String::new(),
                sandbox_name: String::new(),
                state_path: None,
                dir: None,
            });
        };
        let id = spec.id.as_str();
        let path = self.shared.config.sandboxes_dir.join(id);
        // Every call opens the dir; only the first creates it.
        let open = || cap_std::fs::Dir::open_ambient_dir(&path, cap_std::ambient_authority());
        let dir = open()
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => create_private_dir(&path).and_then(|_| open()),
                _ => Err(e),
            })
            .map_err(|e| CallError::Failed {
                reason: "StateDirUnavailable".into(),
                message: format!("cannot open {}: {e}", path.display()),
            })?;
        Ok(SandboxScope {
            plugin: self.name.clone(),
            sandbox_id: id.to_owned(),
            sandbox_name: spec.name.clone(),
            state_path: Some(path),
            dir: Some(Arc::new(dir)),
        })
    }

    pub async fn describe(&self) -> Result<DriverInfo, CallError> {
        let scope = self.scope(None)?;
        let info = guarded_call!(self, scope, |drv, store| drv.call_describe(store))?;
        Ok(DriverInfo {
            name: openshell_core::phase::driver_message(&info.name),
            version: openshell_core::phase::driver_message(&info.version),
            description: openshell_core::phase::driver_message(&info.description),
            isolation: match info.isolation {
                Isolation::Process => "process",
                Isolation::Vm => "vm",
            },
        })
    }

    pub async fn validate(&self, spec: &DriverSpec) -> Result<(), CallError> {
        let scope = self.scope(None)?;
        let spec = to_wit(spec);
        let r = guarded_call!(self, scope, |drv, store| drv.call_validate(store, &spec))?;
        r.map_err(from_driver_error)
    }

    pub async fn create(
        &self,
        spec: &DriverSpec,
        secret: &str,
        state: &[u8],
    ) -> Result<Outcome, CallError> {
        let scope = self.scope(Some(spec))?;
        let (wspec, ctx) = (to_wit(spec), launch_ctx(secret));
        let r = guarded_call!(self, scope, |drv, store| drv
            .call_create(store, &wspec, &ctx, state))?;
        self.outcome(r)
    }

    pub async fn resume(
        &self,
        spec: &DriverSpec,
        secret: &str,
        state: &[u8],
    ) -> Result<Outcome, CallError> {
        let scope = self.scope(Some(spec))?;
        let (wspec, ctx) = (to_wit(spec), launch_ctx(secret));
        let r = guarded_call!(self, scope, |drv, store| drv
            .call_resume(store, &wspec, &ctx, state))?;
        self.outcome(r)
    }

    pub async fn delete(&self, spec: &DriverSpec, state: &[u8]) -> Result<(), CallError> {
        let scope = self.scope(Some(spec))?;
        let wspec = to_wit(spec);
        let r = guarded_call!(self, scope, |drv, store| drv
            .call_delete(store, &wspec, state))?;
        r.map_err(from_driver_error)
    }

    pub async fn on_event(
        &self,
        spec: &DriverSpec,
        state: &[u8],
        event: &HostEvent,
    ) -> Result<Outcome, CallError> {
        let scope = self.scope(Some(spec))?;
        let wspec = to_wit(spec);
        let ev = match event {
            HostEvent::Exited { status, .. } => wit::HostEvent::ProcessExited(*status),
            HostEvent::PollFailed { message, .. } => wit::HostEvent::PollFailed(message.clone()),
        };
        let r = guarded_call!(self, scope, |drv, store| drv
            .call_on_event(store, &wspec, state, &ev))?;
        self.outcome(r)
    }

    fn outcome(&self, r: Result<wit::Outcome, DriverError>) -> Result<Outcome, CallError> {
        let out = r.map_err(from_driver_error)?;
        if out.state.len() > MAX_STATE {
            return Err(CallError::StateTooLarge {
                plugin: self.name.clone(),
                len: out.state.len(),
            });
        }
        Ok(Outcome {
            events: out.events.into_iter().map(to_event).collect(),
            state: out.state,
        })
    }

    /// Time one instantiate, for benchmarks.
    pub async fn time_instantiate(&self) -> Result<Duration, CallError> {
        let scope = self.scope(None)?;
        let start = Instant::now();
        let mut store = self.new_store(scope);
        self.pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| CallError::Trapped {
                plugin: self.name.clone(),
                message: trap_message(&e),
            })?;
        Ok(start.elapsed())
    }
}

fn to_wit(spec: &DriverSpec) -> wit::SandboxSpec {
    wit::SandboxSpec {
        id: spec.id.clone(),
        name: spec.name.clone(),
        environment: spec.environment.clone(),
        resources: wit::Resources {
            vcpus: spec.resources.vcpus,
            memory_mib: spec.resources.memory_mib,
            max_processes: spec.resources.max_processes,
        },
    }
}

fn launch_ctx(secret: &str) -> wit::LaunchContext {
    wit::LaunchContext {
        secret: secret.to_owned(),
    }
}

/// The only conversion from what a plugin says to domain events. There is
/// no arm that yields readiness: the WIT variant has none.
pub(crate) fn to_event(e: DriverEvent) -> Event {
    match e {
        DriverEvent::Starting(message) => Event::DriverStarting { message },
        DriverEvent::Progress(message) => Event::DriverProgress { message },
        DriverEvent::Failed(f) => Event::DriverFailed {
            reason: f.reason,
            message: f.message,
        },
        DriverEvent::Exited(status) => Event::DriverExited { status },
    }
}

fn from_driver_error(e: DriverError) -> CallError {
    use openshell_core::phase::{driver_message, driver_reason};
    match e {
        DriverError::Invalid(m) => CallError::Invalid(driver_message(&m)),
        DriverError::Unsupported(m) => CallError::Unsupported(driver_message(&m)),
        DriverError::Failed(f) => CallError::Failed {
            reason: driver_reason(&f.reason),
            message: driver_message(&f.message),
        },
    }
}

#[cfg(test)]
mod tests {
    //! Fuzzing (issue 8): whatever a plugin returns, the domain sees only
    //! safe values and never readiness.
    use super::*;
    use openshell_core::phase::MAX_MESSAGE_LEN;
    use openshell_core::{Phase, Status};
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["\\PC{0,40}", "(?s).{0,1500}", "[A-Z][A-Za-z0-9]{0,70}"]
    }

    fn arb_driver_event() -> impl Strategy<Value = DriverEvent> {
        prop_oneof![
            text().prop_map(DriverEvent::Starting),
            text().prop_map(DriverEvent::Progress),
            (text(), text()).prop_map(|(reason, message)| DriverEvent::Failed(wit::Failure {
                reason,
                message
            })),
            any::<i32>().prop_map(DriverEvent::Exited),
        ]
    }

    fn arb_driver_error() -> impl Strategy<Value = DriverError> {
        prop_oneof![
            text().prop_map(DriverError::Invalid),
            text().prop_map(DriverError::Unsupported),
            (text(), text()).prop_map(|(reason, message)| DriverError::Failed(wit::Failure {
                reason,
                message
            })),
        ]
    }

    fn safe(s: &str) -> bool {
        s.len() <= MAX_MESSAGE_LEN && !s.chars().any(char::is_control)
    }

    proptest! {
        #[test]
        fn plugin_events_never_make_a_sandbox_ready_and_are_stored_sanitised(
            e in arb_driver_event(),
            connected: bool,
        ) {
            let mut before = Status::provisioning(0);
            if connected {
                before = openshell_core::apply(&before, &Event::SupervisorConnected, 1).unwrap();
            }
            let event = to_event(e);
            prop_assert!(!matches!(event, Event::SupervisorConnected));
            if let Ok(after) = openshell_core::apply(&before, &event, 2) {
                if before.phase != Phase::Ready {
                    prop_assert_ne!(after.phase, Phase::Ready);
                }
                if let Some(d) = &after.driver {
                    prop_assert!(safe(&d.message), "{:?}", d.message);
                    prop_assert!(safe(&d.reason) && d.reason.len() <= 64, "{:?}", d.reason);
                }
            }
        }

        #[test]
        fn plugin_errors_are_sanitised(e in arb_driver_error()) {
            match from_driver_error(e) {
                CallError::Invalid(m) | CallError::Unsupported(m) => prop_assert!(safe(&m)),
                CallError::Failed { reason, message } => {
                    prop_assert!(safe(&message));
                    prop_assert!((1..=64).contains(&reason.len()));
                    prop_assert!(reason.chars().all(|c| c.is_ascii_alphanumeric()));
                }
                other => prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }
}
