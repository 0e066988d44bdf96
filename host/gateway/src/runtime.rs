//! The compute runtime: the shell around the pure phase machine.
//!
//! Every sandbox change follows one path: load from the store, run
//! [`openshell_core::apply`], store with a revision check (retrying on
//! conflict), notify watchers, then act. Work that must outlive a request
//! (driver create and delete) runs in owned tasks after the durable write,
//! so a client hanging up never strands a sandbox.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openshell_core::{Event, Phase, Sandbox, SandboxId, SandboxName, SandboxSpec, validate};
use openshell_plugin::{CallError, Capability, DriverSpec, HostEvent, Plugin, PluginHost};
use openshell_store::{PluginRecord, Store, StoreError};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::error::ApiError;
use crate::relay::{RelayLimits, RelayTable};
use crate::sessions::{SessionObserver, SessionRegistry};
use crate::supervisor::SupervisorListeners;
use crate::watch::WatchBus;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Grants each bundled driver needs, as its documentation lists them.
pub fn bundled_grants(driver: &str) -> Option<&'static [Capability]> {
    use Capability::*;
    match driver {
        "process" => Some(&[Log, Files, Process]),
        "vm" => Some(&[Log, Files, Network, Rootfs, Vm]),
        _ => None,
    }
}

/// Tunables of the runtime.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOptions {
    /// Supervisor heartbeat; a session silent for two is dropped.
    pub heartbeat: Duration,
    pub relays: RelayLimits,
    pub limits: SandboxLimits,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            relays: RelayLimits::default(),
            limits: SandboxLimits::default(),
        }
    }
}

/// Backpressure: past these the gateway refuses creates with
/// ResourceExhausted and a retry hint, or queues driver launches, rather
/// than run out of processes, memory or file descriptors.
#[derive(Clone, Copy, Debug)]
pub struct SandboxLimits {
    /// Stored sandboxes (any phase, including Deleting) at most.
    pub max_sandboxes: usize,
    /// Driver create/resume calls running at once; more wait their turn.
    pub max_concurrent_launches: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            max_sandboxes: 256,
            max_concurrent_launches: 32,
        }
    }
}

/// How long a client refused for capacity is told to wait.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// One admitted sandbox record: released on drop unless the record was
/// stored.
struct Admission<'a>(Option<&'a AtomicUsize>);

impl Admission<'_> {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

pub struct ComputeRuntime {
    pub store: Store,
    pub plugins: Arc<PluginHost>,
    pub watch: WatchBus,
    pub sessions: Arc<SessionRegistry>,
    pub relays: RelayTable,
    pub listeners: SupervisorListeners,
    pub heartbeat: Duration,
    shutdown: watch::Sender<bool>,
    limits: SandboxLimits,
    /// Stored sandbox records, counted at recovery, up on insert, down on
    /// removal: admission is decided here, without a racy count query.
    admitted: AtomicUsize,
    launches: Semaphore,
}

/// Turns registry transitions into stored phase changes, in order, off the
/// registry's lock. Each nudge is applied as the registry's current truth,
/// so a quick disconnect-reconnect can never leave a stale phase behind.
struct SessionEvents(mpsc::UnboundedSender<SandboxId>);

impl SessionObserver for SessionEvents {
    fn on_connected(&self, sandbox: SandboxId) {
        let _ = self.0.send(sandbox);
    }
    fn on_disconnected(&self, sandbox: SandboxId) {
        let _ = self.0.send(sandbox);
    }
}

impl ComputeRuntime {
    pub fn new(store: Store, plugins: Arc<PluginHost>, opts: RuntimeOptions) -> Arc<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sessions = Arc::new(SessionRegistry::default());
        sessions.set_observer(Arc::new(SessionEvents(tx)));
        let runtime = Arc::new(Self {
            store,
            plugins,
            watch: WatchBus::new(),
            sessions,
            relays: RelayTable::new(opts.relays),
            listeners: SupervisorListeners::default(),
            heartbeat: opts.heartbeat,
            shutdown: watch::channel(false).0,
            limits: opts.limits,
            admitted: AtomicUsize::new(0),
            launches: Semaphore::new(opts.limits.max_concurrent_launches.max(1)),
        });
        let weak: Weak<Self> = Arc::downgrade(&runtime);
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let Some(rt) = weak.upgrade() else { return };
                let ev = if rt.sessions.has_session(id) {
                    Event::SupervisorConnected
                } else {
                    Event::SupervisorDisconnected
                };
                rt.apply(id, &[ev], None).await;
            }
        });
        runtime
    }

    /// How strongly a sandbox is isolated, as far as the host knows.
    pub fn isolation(&self, sb: &Sandbox) -> &'static str {
        match self.plugins.get(&sb.spec.driver).map(|p| p.info.isolation) {
            Some("process") => "process",
            Some(_) => self
                .plugins
                .vms()
                .backend(&sb.id.to_string())
                .map_or("unknown", |b| b.isolation()),
            None => "unknown",
        }
    }

    /// Flips to true when the gateway shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Ends sessions, listeners and watches.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
        self.listeners.stop_all();
    }

    /// Finds a sandbox by name or id.
    pub async fn find(&self, name_or_id: &str) -> Result<Sandbox, ApiError> {
        if name_or_id.is_empty() {
            return Err(ApiError::InvalidArgument(
                "give a sandbox name or id".into(),
            ));
        }
        let found = match SandboxId::parse(name_or_id) {
            Some(id) => self.store.get_sandbox(id).await?,
            None => self.store.get_sandbox_by_name(name_or_id).await?,
        };
        found.ok_or_else(|| {
            ApiError::NotFound(format!(
                "no sandbox named {name_or_id:?}; `openshell sandbox list` shows what exists"
            ))
        })
    }

    fn resolve_driver(&self, asked: &str) -> Result<Arc<Plugin>, ApiError> {
        let loaded = self.plugins.list();
        let names = || {
            loaded
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if asked.is_empty() {
            return match loaded.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(ApiError::FailedPrecondition(
                    "no driver plugins are loaded: start the gateway with --drivers, or run `openshell plugin load`".into(),
                )),
                _ => Err(ApiError::InvalidArgument(format!(
                    "this gateway has several drivers ({}); choose one with --driver",
                    names()
                ))),
            };
        }
        validate::driver_name(asked)?;
        self.plugins.get(asked).ok_or_else(|| {
            ApiError::FailedPrecondition(format!(
                "driver {asked:?} is not loaded; loaded drivers: [{}]. Load it with `openshell plugin load`",
                names()
            ))
        })
    }

    /// Validates and stores a new sandbox, then launches it in the
    /// background. Returns the stored record (Provisioning).
    pub async fn create(
        self: &Arc<Self>,
        name: &str,
        mut spec: SandboxSpec,
        request_id: &str,
    ) -> Result<Sandbox, ApiError> {
        let request_id = if request_id.is_empty() {
            None
        } else {
            validate::request_id(request_id)?;
            if let Some(existing) = self.store.get_sandbox_by_request_id(request_id).await? {
                return Ok(existing);
            }
            Some(request_id.to_owned())
        };
        let name = if name.is_empty() {
            None
        } else {
            Some(SandboxName::parse(name)?)
        };
        validate::environment(&spec.environment)?;
        validate::resources(&spec.resources)?;
        let plugin = self.resolve_driver(&spec.driver)?;
        spec.driver = plugin.name.clone();

        let probe = driver_spec_of("", name.as_ref().map_or("", |n| n.as_str()), &spec);
        plugin
            .validate(&probe)
            .await
            .map_err(|source| ApiError::Driver {
                driver: plugin.name.clone(),
                source,
            })?;

        let admission = self.admit()?;
        let (stored, fresh) = self.insert(name, spec, request_id).await?;
        if !fresh {
            return Ok(stored);
        }
        admission.keep();
        self.watch.notify(stored.id);
        let me = self.clone();
        let launched = stored.clone();
        tokio::spawn(async move { me.launch(plugin, launched, false).await });
        Ok(stored)
    }

    /// Reserves room for one more sandbox record, or refuses with a hint.
    fn admit(&self) -> Result<Admission<'_>, ApiError> {
        let max = self.limits.max_sandboxes;
        self.admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|n| ApiError::Busy {
                message: format!("{n} sandboxes exist (limit {max}); delete some or retry later"),
                retry_after: RETRY_AFTER,
            })?;
        Ok(Admission(Some(&self.admitted)))
    }

    /// Sandbox records the gateway counts against `max_sandboxes`.
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Stores a new record; `false` with the existing one when a concurrent
    /// create with the same request_id stored it first.
    async fn insert(
        &self,
        name: Option<SandboxName>,
        spec: SandboxSpec,
        request_id: Option<String>,
    ) -> Result<(Sandbox, bool), ApiError> {
        let generated = name.is_none();
        let mut name = name.unwrap_or_else(|| SandboxName::generate(&mut rand::rng()));
        for _ in 0..8 {
            let sb = Sandbox::new(name.clone(), spec.clone(), request_id.clone(), now_ms());
            match self.store.insert_sandbox(&sb).await {
                Ok(stored) => return Ok((stored, true)),
                Err(StoreError::NameTaken { .. }) if generated => {
                    name = SandboxName::generate(&mut rand::rng());
                }
                Err(StoreError::NameTaken { name }) => {
                    return Err(ApiError::AlreadyExists(format!(
                        "a sandbox named {name:?} already exists; choose another name or delete it first"
                    )));
                }
                // A concurrent retry of the same request won the race.
                Err(StoreError::RequestIdTaken { request_id }) => {
                    if let Some(existing) =
                        self.store.get_sandbox_by_request_id(&request_id).await?
                    {
                        return Ok((existing, false));
                    }
                    return Err(ApiError::Unavailable(
                        "a concurrent create with this request_id is in flight; retry".into(),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Unavailable(
            "could not find a free sandbox name; retry or pass --name".into(),
        ))
    }

    /// Calls the driver's create (or resume) with a fresh secret and applies
    /// what it says. Runs in its own task.
    async fn launch(self: Arc<Self>, plugin: Arc<Plugin>, sb: Sandbox, resume: bool) {
        // Queued, not refused: the sandbox is already stored and admitted.
        let Ok(_permit) = self.launches.acquire().await else {
            return;
        };
        let secret = new_secret();
        let hash = secret_hash(&secret);
        if let Err(e) = self.store.set_secret_hash(sb.id, Some(&hash)).await {
            tracing::error!(sandbox = %sb.id, "cannot store the sandbox secret: {e}");
            self.fail(
                sb.id,
                "StoreFailed",
                "could not record the sandbox's credential",
            )
            .await;
            return;
        }
        if let Err(e) = self.plugins.ensure_sandbox_dir(&sb.id.to_string()) {
            tracing::error!(sandbox = %sb.id, "cannot create the sandbox's state dir: {e}");
            self.fail(sb.id, "StateDirUnavailable", &e.to_string())
                .await;
            return;
        }
        let socket = self.plugins.supervisor_socket(&sb.id.to_string());
        if let Err(e) = self.listeners.start(self.clone(), sb.id, &socket) {
            tracing::error!(sandbox = %sb.id, "{e}");
            self.fail(sb.id, "SocketFailed", &e.to_string()).await;
            return;
        }
        let spec = driver_spec(&sb);
        let result = if resume {
            plugin.resume(&spec, &secret, &sb.driver_state).await
        } else {
            plugin.create(&spec, &secret, &sb.driver_state).await
        };
        match result {
            Ok(out) => self.apply(sb.id, &out.events, Some(out.state)).await,
            Err(e) => self.driver_failed(sb.id, &plugin.name, &e).await,
        }
    }

    async fn driver_failed(&self, id: SandboxId, driver: &str, e: &CallError) {
        tracing::warn!(sandbox = %id, driver, "driver call failed: {e}");
        self.fail(id, e.reason(), &e.to_string()).await;
    }

    async fn fail(&self, id: SandboxId, reason: &str, message: &str) {
        let ev = Event::DriverFailed {
            reason: reason.into(),
            message: message.into(),
        };
        self.apply(id, std::slice::from_ref(&ev), None).await;
    }

    /// Applies events (and a new driver state) to a stored sandbox.
    ///
    /// If the sandbox's supervisor already holds a session (it registered
    /// before this update was stored), the sandbox is promoted on the spot.
    pub async fn apply(&self, id: SandboxId, events: &[Event], state: Option<Vec<u8>>) {
        let now = now_ms();
        let backfill = self
            .sessions
            .has_session(id)
            .then_some(Event::SupervisorConnected);
        let r = self
            .store
            .modify_sandbox(id, |sb| {
                let mut changed = false;
                for e in events.iter().chain(backfill.as_ref()) {
                    match openshell_core::apply(&sb.status, e, now) {
                        Ok(next) if next != sb.status => {
                            sb.status = next;
                            changed = true;
                        }
                        Ok(_) => {}
                        Err(r) => tracing::debug!(sandbox = %id, "{r}"),
                    }
                }
                if let Some(s) = &state
                    && &sb.driver_state != s
                {
                    sb.driver_state = s.clone();
                    changed = true;
                }
                if changed {
                    sb.updated_at_ms = now;
                }
                changed
            })
            .await;
        match r {
            Ok(Some(_)) => self.watch.notify(id),
            Ok(None) => tracing::debug!(sandbox = %id, "event for a sandbox that is gone"),
            Err(e) => tracing::error!(sandbox = %id, "cannot store sandbox change: {e}"),
        }
    }

    /// Marks a sandbox Deleting and tears it down in the background.
    pub async fn delete(self: &Arc<Self>, name_or_id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.find(name_or_id).await?;
        let already = sb.status.phase == Phase::Deleting;
        self.apply(sb.id, &[Event::DeleteRequested], None).await;
        let sb = self.find(&sb.id.to_string()).await?;
        if !already {
            let me = self.clone();
            let doomed = sb.clone();
            tokio::spawn(async move { me.finish_delete(doomed).await });
        }
        Ok(sb)
    }

    async fn finish_delete(&self, sb: Sandbox) {
        self.sessions.forget(sb.id);
        match self.plugins.get(&sb.spec.driver) {
            Some(plugin) => {
                if let Err(e) = plugin.delete(&driver_spec(&sb), &sb.driver_state).await {
                    tracing::warn!(sandbox = %sb.id, "driver delete failed; removing anyway: {e}");
                }
            }
            None => tracing::warn!(
                sandbox = %sb.id,
                driver = sb.spec.driver,
                "driver is not loaded; removing the record without it"
            ),
        }
        // Whatever the driver did, nothing the host launched may outlive the record.
        self.plugins.processes().kill(&sb.id.to_string()).await;
        self.plugins.vms().kill(&sb.id.to_string()).await;
        self.listeners.stop(sb.id);
        let dir = self.plugins.sandbox_dir(&sb.id.to_string());
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(sandbox = %sb.id, "cannot remove {}: {e}", dir.display());
        }
        match self.store.delete_sandbox(sb.id).await {
            Ok(removed) => {
                if removed {
                    self.admitted.fetch_sub(1, Ordering::SeqCst);
                }
                self.watch.notify(sb.id)
            }
            Err(e) => tracing::error!(sandbox = %sb.id, "cannot delete the record: {e}"),
        }
    }

    /// Handles what the host saw happen to a sandbox's process.
    pub async fn on_host_event(&self, event: HostEvent) {
        let raw_id = match &event {
            HostEvent::Exited { sandbox_id, .. } | HostEvent::PollFailed { sandbox_id, .. } => {
                sandbox_id.clone()
            }
        };
        let Some(id) = SandboxId::parse(&raw_id) else {
            return;
        };
        let Ok(Some(sb)) = self.store.get_sandbox(id).await else {
            return;
        };
        let Some(plugin) = self.plugins.get(&sb.spec.driver) else {
            return;
        };
        match plugin
            .on_event(&driver_spec(&sb), &sb.driver_state, &event)
            .await
        {
            Ok(out) => self.apply(id, &out.events, Some(out.state)).await,
            Err(e) => self.driver_failed(id, &plugin.name, &e).await,
        }
    }

    /// Runs host events through the drivers until the channel closes.
    pub fn spawn_host_events(self: &Arc<Self>, mut rx: mpsc::UnboundedReceiver<HostEvent>) {
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                me.on_host_event(ev).await;
            }
        });
    }

    /// Loads a component under `name`, records it, and makes it current.
    pub async fn load_plugin(
        &self,
        name: &str,
        bytes: &[u8],
        grants: &[String],
    ) -> Result<(Arc<Plugin>, bool), ApiError> {
        validate::driver_name(name)?;
        let grants = grants
            .iter()
            .map(|g| Capability::parse(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(openshell_plugin::PluginError::from)?;
        let (plugin, replaced) = self.plugins.install(name, bytes, &grants).await?;
        self.store
            .upsert_plugin(&PluginRecord {
                name: plugin.name.clone(),
                digest: plugin.digest.clone(),
                version: plugin.info.version.clone(),
                grants: plugin
                    .grants
                    .iter()
                    .map(|g| g.as_str().to_owned())
                    .collect(),
                wasm_path: plugin.path.display().to_string(),
                loaded_at_ms: now_ms(),
            })
            .await?;
        tracing::info!(plugin = name, digest = %plugin.digest, replaced, "plugin loaded");
        Ok((plugin, replaced))
    }

    pub async fn unload_plugin(&self, name: &str, force: bool) -> Result<(), ApiError> {
        if self.plugins.get(name).is_none() && self.store.get_plugin(name).await?.is_none() {
            return Err(ApiError::NotFound(format!(
                "no plugin named {name:?}; `openshell plugin list` shows what is loaded"
            )));
        }
        let users = self.store.list_sandboxes_by_driver(name).await?;
        if !users.is_empty() && !force {
            return Err(ApiError::FailedPrecondition(format!(
                "{} sandbox(es) use plugin {name:?} (for example {:?}); delete them first or pass --force",
                users.len(),
                users[0].name.as_str()
            )));
        }
        self.plugins.remove(name);
        self.store.delete_plugin(name).await?;
        Ok(())
    }

    /// Start-up: reload recorded plugins, then settle what a restart means
    /// for each stored sandbox.
    pub async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        for rec in self.store.list_plugins().await? {
            let grants: Vec<Capability> = rec
                .grants
                .iter()
                .filter_map(|g| Capability::parse(g).ok())
                .collect();
            let started = std::time::Instant::now();
            match self
                .plugins
                .load_stored(&rec.name, std::path::Path::new(&rec.wasm_path), &grants)
                .await
            {
                Ok(_) => {
                    tracing::info!(plugin = rec.name, elapsed = ?started.elapsed(), "plugin reloaded")
                }
                Err(e) => tracing::error!(plugin = rec.name, "cannot reload plugin: {e}"),
            }
        }
        let stored = usize::try_from(self.store.count_sandboxes().await?).unwrap_or(usize::MAX);
        self.admitted.store(stored, Ordering::SeqCst);
        let mut known = std::collections::HashSet::new();
        let mut offset = 0;
        loop {
            let page = self.store.list_sandboxes(500, offset).await?;
            if page.is_empty() {
                break;
            }
            offset += page.len() as u32;
            known.extend(page.iter().map(|sb| sb.id.to_string()));
            for sb in page {
                match sb.status.phase {
                    Phase::Deleting => {
                        let me = self.clone();
                        tokio::spawn(async move { me.finish_delete(sb).await });
                    }
                    Phase::Error => {}
                    Phase::Provisioning | Phase::Ready | Phase::Unknown => {
                        self.apply(sb.id, &[Event::GatewayRestarted], None).await;
                        self.resume(sb).await;
                    }
                }
            }
        }
        let swept = self.plugins.processes().sweep_stale_cgroups(&known);
        if swept > 0 {
            tracing::info!(swept, "removed cgroups of sandboxes that no longer exist");
        }
        Ok(())
    }
}

impl ComputeRuntime {
    /// Relaunches a stored sandbox after a restart through its driver's
    /// `resume`, with a fresh secret.
    async fn resume(self: &Arc<Self>, sb: Sandbox) {
        let Some(plugin) = self.plugins.get(&sb.spec.driver) else {
            let msg = format!(
                "driver {:?} is not loaded after the restart",
                sb.spec.driver
            );
            self.fail(sb.id, "DriverMissing", &msg).await;
            return;
        };
        let me = self.clone();
        tokio::spawn(async move { me.launch(plugin, sb, true).await });
    }
}

pub fn driver_spec(sb: &Sandbox) -> DriverSpec {
    driver_spec_of(&sb.id.to_string(), sb.name.as_str(), &sb.spec)
}

fn driver_spec_of(id: &str, name: &str, spec: &SandboxSpec) -> DriverSpec {
    DriverSpec {
        id: id.to_owned(),
        name: name.to_owned(),
        environment: spec.environment.clone().into_iter().collect(),
        resources: spec.resources,
    }
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Only this hash of a sandbox secret is ever stored.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}
