//! The compute runtime: the shell around the pure phase machine.
//!
//! Every sandbox change follows one path: load from the store, run
//! [`openshell_core::apply`], store with a revision check (retrying on
//! conflict), notify watchers, then act. Work that must outlive a request
//! (driver create and delete) runs in owned tasks after the durable write,
//! so a client hanging up never strands a sandbox.
//!
//! - `create.rs`: admission, the stored record, the launch through a driver.
//! - `delete.rs`: Deleting, then teardown and the record's removal.
//! - `plugins.rs`: loading and unloading driver components.
//! - `recover.rs`: what a gateway start means for stored plugins and sandboxes.
//! - `stop.rs`: Stopped (nothing runs, files kept) and the start back.
//! - `lifetimes.rs`: the task that enforces ttls and idle timeouts.
//! - `stats.rs`: what a sandbox uses against its limits.

mod create;
mod delete;
mod images;
mod lifetimes;
mod main_process;
mod plugins;
pub mod policy;
mod recover;
mod stats;
mod stop;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openshell_core::{Event, Phase, Sandbox, SandboxId};
use openshell_plugin::{CallError, HostEvent, PluginHost};
use openshell_store::{PluginRecord, Store};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};

use crate::error::ApiError;
use crate::supervisor::{SessionObserver, SupervisorOptions, Supervisors};
use crate::watch::WatchBus;

pub use create::driver_spec;
pub use plugins::bundled_grants;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Tunables of the runtime.
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    pub supervisors: SupervisorOptions,
    pub limits: SandboxLimits,
    /// The image of process sandboxes created without one.
    pub default_image: Option<String>,
    /// Where sandbox logs are kept; `None`: nowhere (logs are empty).
    /// Network decisions go to `network` beside it.
    pub logs_dir: Option<std::path::PathBuf>,
    /// The policy of sandboxes created without one (checked YAML).
    pub default_policy: Option<String>,
    pub egress: crate::egress::EgressOptions,
}

/// Backpressure: past these the gateway refuses creates with
/// ResourceExhausted (with a retry hint, but for the disk reserve: waiting
/// frees no disk), or queues driver launches, rather than run out of
/// processes, memory, file descriptors or disk.
#[derive(Clone, Copy, Debug)]
pub struct SandboxLimits {
    /// Stored sandboxes (any phase, including Deleting) at most.
    pub max_sandboxes: usize,
    /// Driver create/resume calls running at once; more wait their turn.
    pub max_concurrent_launches: usize,
    /// GiB that must stay free on the state dir's filesystem for a create
    /// to be admitted; 0: no reserve.
    pub disk_reserve_gib: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            max_sandboxes: 256,
            max_concurrent_launches: 32,
            disk_reserve_gib: 2,
        }
    }
}

pub struct ComputeRuntime {
    store: Store,
    plugins: Arc<PluginHost>,
    watch: WatchBus,
    supervisors: Arc<Supervisors>,
    shutdown: watch::Sender<bool>,
    limits: SandboxLimits,
    /// Stored sandbox records, counted at recovery, up on insert, down on
    /// removal: admission is decided here, without a racy count query.
    admitted: AtomicUsize,
    launches: Semaphore,
    /// Image garbage collection (write) against creates resolving an
    /// image (read): see `images.rs`.
    images_gc: tokio::sync::RwLock<()>,
    /// The image of process sandboxes created without one.
    default_image: Option<String>,
    logs: crate::logs::Logs,
    default_policy: Option<String>,
    egress: Arc<crate::egress::Egress>,
    /// Sandboxes whose main process has a relay pumping into the log.
    main_attached: std::sync::Mutex<std::collections::HashSet<SandboxId>>,
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
        let shutdown = watch::channel(false).0;
        let supervisors = Supervisors::new(
            opts.supervisors,
            Arc::new(SessionEvents(tx)),
            shutdown.subscribe(),
        );
        let audit_dir = opts
            .logs_dir
            .as_ref()
            .map(|d| d.with_file_name("network-logs"));
        let egress = crate::egress::Egress::new(opts.egress.clone(), audit_dir);
        supervisors.set_egress(Arc::new(crate::egress::Handler(egress.clone())));
        let runtime = Arc::new(Self {
            store,
            plugins,
            watch: WatchBus::new(),
            supervisors,
            shutdown,
            limits: opts.limits,
            admitted: AtomicUsize::new(0),
            launches: Semaphore::new(opts.limits.max_concurrent_launches.max(1)),
            images_gc: tokio::sync::RwLock::new(()),
            default_image: opts.default_image,
            logs: crate::logs::Logs::new(opts.logs_dir),
            default_policy: opts.default_policy,
            egress,
            main_attached: Default::default(),
        });
        let weak: Weak<Self> = Arc::downgrade(&runtime);
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let Some(rt) = weak.upgrade() else { return };
                let connected = rt.supervisors.sessions().has_session(id);
                let ev = if connected {
                    Event::SupervisorConnected
                } else {
                    Event::SupervisorDisconnected
                };
                rt.apply(id, &[ev], None).await;
                if connected {
                    rt.logs.event(id, "supervisor connected: Ready");
                    rt.attach_main(id);
                } else {
                    rt.logs.event(id, "supervisor disconnected");
                }
            }
        });
        runtime
    }

    /// The supervisor side: sessions, relays, listeners.
    pub fn supervisors(&self) -> &Arc<Supervisors> {
        &self.supervisors
    }

    /// The store, for tests and tools; request handling goes through the
    /// runtime's own methods.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Sandbox logs.
    pub fn logs(&self) -> &crate::logs::Logs {
        &self.logs
    }

    /// The plugin host and the capabilities' process and VM tables.
    pub fn plugins(&self) -> &PluginHost {
        &self.plugins
    }

    /// Names of the loaded drivers.
    pub fn driver_names(&self) -> Vec<String> {
        self.plugins.list().iter().map(|p| p.name.clone()).collect()
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
        self.supervisors.stop_all();
    }

    /// Tells about every stored change, by sandbox id, after the commit.
    pub fn subscribe(&self) -> broadcast::Receiver<SandboxId> {
        self.watch.subscribe()
    }

    /// Finds a sandbox by name or id.
    pub async fn find(&self, name_or_id: &str) -> Result<Sandbox, ApiError> {
        if name_or_id.is_empty() {
            return Err(ApiError::NoSandboxNamed);
        }
        let found = match SandboxId::parse(name_or_id) {
            Some(id) => self.store.get_sandbox(id).await?,
            None => self.store.get_sandbox_by_name(name_or_id).await?,
        };
        found.ok_or_else(|| ApiError::SandboxNotFound {
            name: name_or_id.to_owned(),
        })
    }

    /// The stored record of `id`, or None once it is gone.
    pub async fn get(&self, id: SandboxId) -> Result<Option<Sandbox>, ApiError> {
        Ok(self.store.get_sandbox(id).await?)
    }

    /// One page of sandboxes, oldest first, and how many exist.
    pub async fn list(&self, limit: u32, offset: u32) -> Result<(Vec<Sandbox>, u64), ApiError> {
        let page = self.store.list_sandboxes(limit, offset).await?;
        let total = self.store.count_sandboxes().await?;
        Ok((page, total))
    }

    /// Stored sandboxes by phase, every phase present (zeros too), walked
    /// by key so deletes during the walk skip nothing.
    pub async fn phase_counts(&self) -> Vec<(Phase, i64)> {
        let mut counts: Vec<(Phase, i64)> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
        let mut after = None;
        while let Ok(page) = self.store.list_sandboxes_after(after.as_ref(), 500).await {
            let Some(last) = page.last() else { break };
            after = Some(openshell_store::PageKey::after(last));
            for sb in &page {
                if let Some(slot) = counts.iter_mut().find(|(p, _)| *p == sb.status.phase) {
                    slot.1 += 1;
                }
            }
        }
        counts
    }

    /// A Ready sandbox with a connected supervisor, for a relay.
    pub async fn ready(&self, name_or_id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.find(name_or_id).await?;
        if sb.status.phase == openshell_core::Phase::Stopped {
            return Err(ApiError::Stopped {
                name: sb.name.to_string(),
            });
        }
        if sb.status.phase != openshell_core::Phase::Ready {
            return Err(ApiError::NotReady {
                name: sb.name.to_string(),
                phase: sb.status.phase,
            });
        }
        Ok(sb)
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
            .supervisors
            .sessions()
            .has_session(id)
            .then_some(Event::SupervisorConnected);
        let mut first_ready = false;
        let r = self
            .store
            .modify_sandbox(id, |sb| {
                let was = sb.status.phase;
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
                first_ready = was == Phase::Provisioning && sb.status.phase == Phase::Ready;
                changed
            })
            .await;
        match r {
            Ok(Some(sb)) => {
                if first_ready {
                    crate::metrics::get().ready_after(sb.created_at_ms, now);
                }
                self.watch.notify(id)
            }
            Ok(None) => tracing::debug!(sandbox = %id, "event for a sandbox that is gone"),
            Err(e) => tracing::error!(sandbox = %id, "cannot store sandbox change: {e}"),
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
        if matches!(event, HostEvent::Exited { .. }) && !self.is_current_exit(&raw_id) {
            tracing::debug!(sandbox = %id, "exit of a process the host no longer runs; ignored");
            return;
        }
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

    /// The stored record of a loaded plugin, if any.
    pub async fn plugin_record(&self, name: &str) -> Result<Option<PluginRecord>, ApiError> {
        Ok(self.store.get_plugin(name).await?)
    }
}

/// How long a client refused for capacity is told to wait.
const RETRY_AFTER: Duration = Duration::from_millis(500);
