//! Gateway start-up and shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openshell_plugin::{PluginHost, PluginHostConfig};
use openshell_proto::v1::open_shell_server::OpenShellServer;
use openshell_store::Store;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::runtime::{ComputeRuntime, RuntimeOptions, SandboxLimits, bundled_grants};
use crate::service::Service;
use crate::supervisor::SupervisorOptions;

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub bind: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// Defaults to a SQLite file in the state dir.
    pub db_url: Option<String>,
    pub state_dir: PathBuf,
    /// Bundled drivers to load at start, by name.
    pub drivers: Vec<String>,
    /// Where to load them from; default: `embedded_drivers`, else
    /// [`driver_search_path`].
    pub driver_dir: Option<PathBuf>,
    /// Driver components built into the running binary (the CLI's).
    pub embedded_drivers: &'static [EmbeddedDriver],
    /// Where to serve Prometheus metrics (`GET /metrics`); default: nowhere.
    pub metrics_addr: Option<SocketAddr>,
    pub disable_tls: bool,
    pub disable_auth: bool,
    /// Wall-clock deadline for one driver plugin call.
    pub plugin_call_timeout: Duration,
    /// Supervisor heartbeat interval.
    pub heartbeat: Duration,
    /// Limits on relays waiting for a supervisor.
    pub relays: crate::supervisor::RelayLimits,
    /// Extra names and addresses for the server certificate.
    pub tls_sans: Vec<String>,
    /// Where the VM runtime is staged and which backend to use.
    pub vm: openshell_plugin::VmConfig,
    /// The launcher and supervisor binaries for process sandboxes; default:
    /// next to the running executable.
    pub launcher: Option<PathBuf>,
    pub supervisor: Option<PathBuf>,
    /// Backpressure: how many sandboxes may exist, how many launch at once.
    pub limits: SandboxLimits,
    /// Host uid where the sandboxes' id table starts; default: what the
    /// state dir recorded, or [`crate::uid_range::DEFAULT_BASE`] for a new one.
    pub uid_base: Option<u32>,
    /// The sandbox disk: pool size and the default sandbox size (size 0:
    /// off). The disk reserve is in `limits`.
    pub disk: openshell_plugin::disk::DiskConfig,
    /// Images: the static supervisor, the default image, how to pull.
    pub images: ImageOptions,
    /// The network policy (YAML) of sandboxes created without one; `None`:
    /// they reach nothing.
    pub default_policy: Option<String>,
    /// Egress limits and the gateway's own name table.
    pub egress: crate::egress::EgressOptions,
}

/// A bundled driver component built into the binary.
#[derive(Clone, Copy)]
pub struct EmbeddedDriver {
    pub name: &'static str,
    pub wasm: &'static [u8],
}

impl std::fmt::Debug for EmbeddedDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedDriver")
            .field("name", &self.name)
            .field("bytes", &self.wasm.len())
            .finish()
    }
}

/// What the gateway needs for sandboxes rooted in images. The store
/// itself is always `<state>/images` (root-only).
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    /// The static (musl) supervisor; default: `openshell-supervisor-static`
    /// next to the running executable, else cargo's musl build of the same
    /// profile.
    pub static_supervisor: Option<PathBuf>,
    /// The image of process sandboxes created without one.
    pub default_image: Option<String>,
    /// Registries (host[:port]) that may be pulled over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// `USER:PASSWORD` for registries, over `~/.docker/config.json`.
    pub registry_auth: Option<String>,
}

impl GatewayConfig {
    /// Checks every tunable, whoever built the config (the CLI, a test, the
    /// bench): a zero interval would panic a timer, a zero deadline would
    /// fail every call.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let durations = [
            ("plugin call timeout", self.plugin_call_timeout),
            ("heartbeat", self.heartbeat),
            ("relay claim timeout", self.relays.claim_timeout),
            ("relay idle timeout", self.relays.idle_timeout),
        ];
        for (what, d) in durations {
            if d < MIN_DURATION {
                return Err(ConfigError::TooShort { what, got: d });
            }
        }
        let counts = [
            ("relays per sandbox", self.relays.per_sandbox),
            ("relays in total", self.relays.total),
            ("max sandboxes", self.limits.max_sandboxes),
            (
                "max concurrent launches",
                self.limits.max_concurrent_launches,
            ),
        ];
        for (what, n) in counts {
            if n == 0 {
                return Err(ConfigError::Zero { what });
            }
        }
        match self.disk.default_gib {
            Some(0) => {
                return Err(ConfigError::Zero {
                    what: "the default sandbox disk size",
                });
            }
            Some(default_gib) if u64::from(default_gib) > self.disk.size_gib => {
                return Err(ConfigError::DiskDefault {
                    default_gib,
                    size_gib: self.disk.size_gib,
                });
            }
            _ => {}
        }
        if self.egress.max_connections == 0 {
            return Err(ConfigError::Zero {
                what: "egress connections per sandbox",
            });
        }
        if let Some(yaml) = &self.default_policy {
            crate::runtime::policy::parse(yaml).map_err(|e| ConfigError::DefaultPolicy {
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// Shorter than this, a timer or deadline is a misconfiguration.
const MIN_DURATION: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the {what} is {got:?}; it must be at least {MIN_DURATION:?}")]
    TooShort { what: &'static str, got: Duration },
    #[error("{what} is 0; it must be at least 1")]
    Zero { what: &'static str },
    #[error(
        "the default sandbox disk size ({default_gib} GiB) is more than the sandbox disk ({size_gib} GiB; 0 is none): lower --default-disk-gib or raise --sandbox-disk-gib"
    )]
    DiskDefault { default_gib: u32, size_gib: u64 },
    #[error("the default policy (--default-policy) is refused: {reason}")]
    DefaultPolicy { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid gateway configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    UidRange(#[from] crate::uid_range::UidRangeError),
    #[error(
        "refusing to serve on {bind} without TLS and authentication: drop --disable-tls and --disable-gateway-auth, or bind 127.0.0.1"
    )]
    InsecureBind { bind: IpAddr },
    #[error("cannot set up TLS or the token: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot use state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database: {0}")]
    Store(#[from] openshell_store::StoreError),
    #[error("cannot open the image store: {0}")]
    Images(#[source] Box<openshell_image::ImageError>),
    #[error("--registry-auth must be USER:PASSWORD")]
    RegistryAuth,
    #[error("cannot start the plugin host: {0}")]
    Plugins(#[from] openshell_plugin::PluginError),
    #[error("unknown bundled driver {name:?}: bundled drivers are process and vm")]
    UnknownDriver { name: String },
    #[error("driver {name:?} not found; looked for {file} in: {searched}")]
    DriverMissing {
        name: String,
        file: String,
        searched: String,
    },
    #[error("cannot load bundled driver {name:?}: {source}")]
    DriverLoad {
        name: String,
        #[source]
        source: crate::error::ApiError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("startup recovery failed: {0}")]
    Recover(#[source] crate::error::ApiError),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot set up the API listener: {0}")]
    Incoming(#[from] crate::incoming::IncomingError),
}

/// How a client reaches this gateway.
#[derive(Clone)]
pub struct ClientInfo {
    /// `https://ADDR` or `http://ADDR`.
    pub endpoint: String,
    /// The CA that signed the server certificate (TLS only).
    pub ca_pem: Option<String>,
    /// The token every user RPC must carry (auth only).
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientInfo")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Checks the gateway token on every user RPC (a no-op with auth off).
#[derive(Clone)]
struct TokenCheck(Option<Arc<str>>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(token) = &self.0 else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if bool::from(g.as_bytes().ct_eq(token.as_bytes())) => Ok(req),
            Some(_) => {
                // Never log what was sent: it may be a near-miss of the token.
                tracing::warn!(peer = ?req.remote_addr(), "rejected a request with a wrong token");
                Err(tonic::Status::unauthenticated(
                    "the gateway token is wrong: use the one `openshell gateway start` wrote to the client config, or OPENSHELL_TOKEN",
                ))
            }
            None => {
                tracing::warn!(peer = ?req.remote_addr(), "rejected a request without a token");
                Err(tonic::Status::unauthenticated(
                    "this gateway requires a token: the CLI reads it from its config (OPENSHELL_CONFIG) or OPENSHELL_TOKEN",
                ))
            }
        }
    }
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    /// Where `GET /metrics` is served, if asked.
    pub metrics_addr: Option<SocketAddr>,
    pub client: ClientInfo,
    pub runtime: Arc<ComputeRuntime>,
    task: JoinHandle<Result<(), GatewayError>>,
}

impl Gateway {
    pub async fn start(mut cfg: GatewayConfig) -> Result<Gateway, GatewayError> {
        // Either protection off is fine on loopback (development); a
        // reachable address needs both.
        cfg.validate()?;
        let secure = !cfg.disable_tls && !cfg.disable_auth;
        if !(cfg.bind.is_loopback() || secure) {
            return Err(GatewayError::InsecureBind { bind: cfg.bind });
        }
        // Umask 077 and a 0700 state dir before anything is created in it:
        // the database, its -wal and -shm, logs and a VM's initrd are
        // nobody else's (issue 13 item 2).
        openshell_plugin::secure_state_dir(&cfg.state_dir).map_err(|source| {
            GatewayError::StateDir {
                path: cfg.state_dir.clone(),
                source,
            }
        })?;
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| GatewayError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        // Launchers and sockets get paths from here: make them absolute
        // once, so `--state-dir .state` means the same thing everywhere.
        cfg.state_dir =
            std::fs::canonicalize(&cfg.state_dir).map_err(|source| GatewayError::StateDir {
                path: cfg.state_dir.clone(),
                source,
            })?;
        let uid_base = crate::uid_range::resolve(&cfg.state_dir, cfg.uid_base)?;
        crate::uid_range::check_subordinate(
            uid_base,
            &[Path::new("/etc/subuid"), Path::new("/etc/subgid")],
        )?;
        let db_url = cfg.db_url.clone().unwrap_or_else(|| {
            format!("sqlite://{}", cfg.state_dir.join("openshell.db").display())
        });
        let store = Store::connect(&db_url).await?;

        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut host_cfg = PluginHostConfig::new(&cfg.state_dir);
        host_cfg.call_timeout = cfg.plugin_call_timeout;
        host_cfg.uid_base = uid_base;
        host_cfg.disk = cfg.disk;
        host_cfg.on_call = Some(openshell_plugin::CallObserver(Arc::new(|plugin, took| {
            crate::metrics::get().plugin_call(plugin, took)
        })));
        host_cfg.launcher = cfg
            .launcher
            .clone()
            .or_else(|| sibling_binary("openshell-sandbox-launch"));
        host_cfg.supervisor = cfg
            .supervisor
            .clone()
            .or_else(|| sibling_binary("openshell-supervisor"));
        host_cfg.static_supervisor = cfg
            .images
            .static_supervisor
            .clone()
            .or_else(static_supervisor_beside);
        if host_cfg.launcher.is_none() || host_cfg.supervisor.is_none() {
            tracing::warn!(
                "openshell-sandbox-launch or openshell-supervisor is not next to this binary: process sandboxes will fail to launch; install with `just install` or pass --launcher and --supervisor"
            );
        }
        host_cfg.images = Some(Arc::new(open_images(&cfg.state_dir, &cfg.images)?));
        // Always made, even when the API port is plaintext: a VM guest's
        // supervisor dials over TLS verified against this CA.
        let pki = crate::tls::ensure_pki(&cfg.state_dir, &cfg.tls_sans, cfg.bind)?;
        host_cfg.vm = cfg.vm.clone();
        host_cfg.vm.supervisor_tls = Some(openshell_plugin::SupervisorTls {
            ca_pem: pki.ca_pem.clone(),
            server_name: crate::tls::SERVER_NAME.into(),
            acceptor: crate::incoming::tls_acceptor(&pki.cert_pem, &pki.key_pem)?,
        });
        let plugins = Arc::new(PluginHost::new(host_cfg, events_tx)?);
        let runtime = ComputeRuntime::new(
            store,
            plugins,
            RuntimeOptions {
                supervisors: SupervisorOptions {
                    heartbeat: cfg.heartbeat,
                    relays: cfg.relays,
                },
                limits: cfg.limits,
                default_image: cfg.images.default_image.clone(),
                logs_dir: Some(cfg.state_dir.join("logs")),
                default_policy: cfg.default_policy.clone(),
                egress: cfg.egress.clone(),
            },
        );
        runtime.spawn_host_events(events_rx);
        // Drivers first (the recorded ones, then the bundled ones, which
        // replace a recorded one of the same name), then the sandboxes: a
        // sandbox whose driver is about to load must not be DriverMissing.
        runtime
            .reload_plugins()
            .await
            .map_err(GatewayError::Recover)?;
        for name in &cfg.drivers {
            load_bundled(
                &runtime,
                name,
                cfg.driver_dir.as_deref(),
                cfg.embedded_drivers,
            )
            .await?;
        }
        runtime.recover().await.map_err(GatewayError::Recover)?;
        // After recovery: a ttl that passed while no gateway ran acts now.
        runtime.spawn_lifetimes();
        let metrics_addr = match cfg.metrics_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| GatewayError::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| GatewayError::Bind { addr, source })?;
                let rt = Arc::downgrade(&runtime);
                let phases = move || {
                    let rt = rt.clone();
                    async move {
                        match rt.upgrade() {
                            Some(rt) => rt.phase_counts().await,
                            None => Vec::new(),
                        }
                    }
                };
                crate::metrics::serve(listener, phases, runtime.shutdown_signal());
                tracing::info!(addr = %bound, "metrics serving at /metrics");
                runtime.egress().refuse(bound);
                Some(bound)
            }
            None => None,
        };

        // Before the first connection: the budget below is cut to fit.
        let nofile = crate::incoming::raise_fd_limit();
        let addr = SocketAddr::new(cfg.bind, cfg.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Bind { addr, source })?;
        runtime.egress().refuse(addr);

        let pki = (!cfg.disable_tls).then(|| pki.clone());
        let token = if cfg.disable_auth {
            None
        } else {
            Some(crate::tls::ensure_token(&cfg.state_dir)?)
        };
        let check = TokenCheck(token.as_deref().map(Arc::from));
        let client = ClientInfo {
            endpoint: format!("{}://{addr}", if pki.is_some() { "https" } else { "http" }),
            ca_pem: pki.as_ref().map(|p| p.ca_pem.clone()),
            token,
        };
        let service = Service {
            runtime: runtime.clone(),
            shutdown: runtime.shutdown_signal(),
        };
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(openshell_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the embedded descriptor set is valid");
        // Older grpcurl and Python's grpcio-reflection speak only v1alpha.
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(openshell_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("the embedded descriptor set is valid");
        let api = OpenShellServer::new(service)
            .max_decoding_message_size(openshell_plugin::host_limits::MAX_COMPONENT + (1 << 20));
        let api = tonic::service::interceptor::InterceptedService::new(api, check.clone());
        let reflection =
            tonic::service::interceptor::InterceptedService::new(reflection, check.clone());
        let reflection_alpha =
            tonic::service::interceptor::InterceptedService::new(reflection_alpha, check);
        // The gateway accepts and handshakes itself (`incoming`): tonic's
        // own TLS has no handshake deadline and no connection limit.
        let tls = pki
            .as_ref()
            .map(|p| crate::incoming::tls_acceptor(&p.cert_pem, &p.key_pem))
            .transpose()?;
        let (incoming, track) = crate::incoming::incoming(
            listener,
            tls,
            crate::incoming::ConnectionLimits::default().within_fd_limit(nofile),
        );
        let mut builder = tonic::transport::Server::builder().layer(track);
        let mut stop = runtime.shutdown_signal();
        let task = tokio::spawn(async move {
            builder
                .add_service(api)
                .add_service(reflection)
                .add_service(reflection_alpha)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await?;
            Ok(())
        });
        tracing::info!(%addr, "gateway serving");
        Ok(Gateway {
            addr,
            metrics_addr,
            client,
            runtime,
            task,
        })
    }

    /// Stops accepting, ends open streams, and waits for in-flight requests.
    pub async fn shutdown(self) -> Result<(), GatewayError> {
        self.runtime.begin_shutdown();
        let served = match self.task.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("gateway task failed: {e}");
                Ok(())
            }
        };
        // Host state outside the state dir goes with the gateway.
        self.runtime.plugins().vms().remove_socket_dirs();
        self.runtime.plugins().detach_disk();
        served
    }
}

/// A binary installed next to the running executable, if there is one.
/// The static supervisor next to the executable, or (in a cargo target
/// dir) the x86_64-unknown-linux-musl build of the executable's profile.
fn static_supervisor_beside() -> Option<PathBuf> {
    if let Some(p) = sibling_binary("openshell-supervisor-static") {
        return Some(p);
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // target/<profile>/openshell, or target/<profile>/deps/<test binary>.
    let dir = if dir.ends_with("deps") {
        dir.parent()?
    } else {
        dir
    };
    let profile = dir.file_name()?;
    let p = dir
        .parent()?
        .join("x86_64-unknown-linux-musl")
        .join(profile)
        .join("openshell-supervisor");
    p.is_file().then_some(p)
}

/// Opens the image store under the state dir, with how to pull into it.
fn open_images(
    state_dir: &Path,
    opts: &ImageOptions,
) -> Result<openshell_plugin::Images, GatewayError> {
    let store = openshell_image::ImageStore::shared(&state_dir.join("images"))
        .map_err(|e| GatewayError::Images(Box::new(e)))?;
    let auth = match &opts.registry_auth {
        Some(raw) => {
            let (user, pass) = raw.split_once(':').ok_or(GatewayError::RegistryAuth)?;
            Some((user.to_owned(), pass.to_owned()))
        }
        None => None,
    };
    let docker_config = std::env::var_os("DOCKER_CONFIG")
        .map(|d| PathBuf::from(d).join("config.json"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")))
        .filter(|p| p.is_file());
    Ok(openshell_plugin::Images {
        store,
        pull: openshell_image::PullOptions {
            insecure_registries: opts.insecure_registries.clone(),
            auth,
            docker_config,
            platform: ("linux".into(), "amd64".into()),
        },
    })
}

fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join(name);
    p.is_file().then_some(p)
}

/// Where bundled drivers are looked for, in order.
pub fn driver_search_path(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = explicit {
        return vec![dir.to_owned()];
    }
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
    {
        dirs.push(exe_dir.join("drivers"));
        dirs.push(exe_dir);
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".local/lib/openshell/drivers"));
    }
    dirs.push(PathBuf::from("/usr/local/lib/openshell/drivers"));
    dirs
}

/// Loads bundled driver `name`: from `driver_dir` when given, else the
/// embedded build, else the first file on [`driver_search_path`].
async fn load_bundled(
    runtime: &ComputeRuntime,
    name: &str,
    driver_dir: Option<&Path>,
    embedded: &[EmbeddedDriver],
) -> Result<(), GatewayError> {
    let grants = bundled_grants(name).ok_or_else(|| GatewayError::UnknownDriver {
        name: name.to_owned(),
    })?;
    let grants: Vec<String> = grants.iter().map(|g| g.as_str().to_owned()).collect();
    let built_in = embedded.iter().find(|d| d.name == name);
    if let (None, Some(d)) = (driver_dir, built_in) {
        runtime
            .load_plugin(name, d.wasm, &grants)
            .await
            .map_err(|source| GatewayError::DriverLoad {
                name: name.to_owned(),
                source,
            })?;
        tracing::info!(driver = name, "bundled driver loaded (embedded)");
        return Ok(());
    }
    let file = format!("openshell_driver_{name}.wasm");
    let dirs = driver_search_path(driver_dir);
    let Some(path) = dirs.iter().map(|d| d.join(&file)).find(|p| p.is_file()) else {
        return Err(GatewayError::DriverMissing {
            name: name.to_owned(),
            file,
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let bytes = std::fs::read(&path).map_err(|source| GatewayError::StateDir {
        path: path.clone(),
        source,
    })?;
    runtime
        .load_plugin(name, &bytes, &grants)
        .await
        .map_err(|source| GatewayError::DriverLoad {
            name: name.to_owned(),
            source,
        })?;
    tracing::info!(driver = name, path = %path.display(), "bundled driver loaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GatewayConfig {
        GatewayConfig {
            bind: "127.0.0.1".parse().unwrap(),
            port: 0,
            db_url: Some("sqlite::memory:".into()),
            state_dir: std::env::temp_dir(),
            drivers: vec![],
            driver_dir: None,
            embedded_drivers: &[],
            metrics_addr: None,
            disable_tls: true,
            disable_auth: true,
            plugin_call_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(15),
            relays: Default::default(),
            tls_sans: vec![],
            vm: Default::default(),
            launcher: None,
            supervisor: None,
            limits: Default::default(),
            uid_base: None,
            disk: openshell_plugin::disk::DiskConfig::OFF,
            images: Default::default(),
            default_policy: None,
            egress: Default::default(),
        }
    }

    /// Regression, issue 12 bug 7: zero intervals panicked a timer and a
    /// zero call timeout failed every call; now the config is refused.
    #[test]
    fn issue_12_zero_durations_and_limits_are_refused_whoever_builds_the_config() {
        assert_eq!(config().validate(), Ok(()));
        type Break = fn(&mut GatewayConfig);
        let cases: [(&str, Break); 9] = [
            ("heartbeat", |c| c.heartbeat = Duration::ZERO),
            ("plugin call timeout", |c| {
                c.plugin_call_timeout = Duration::ZERO
            }),
            ("relay idle timeout", |c| {
                c.relays.idle_timeout = Duration::ZERO
            }),
            ("relay claim timeout", |c| {
                c.relays.claim_timeout = Duration::from_millis(1)
            }),
            ("relays per sandbox", |c| c.relays.per_sandbox = 0),
            ("max sandboxes", |c| c.limits.max_sandboxes = 0),
            ("max concurrent launches", |c| {
                c.limits.max_concurrent_launches = 0
            }),
            ("default sandbox disk size is 0", |c| {
                c.disk = openshell_plugin::disk::DiskConfig {
                    size_gib: 64,
                    default_gib: Some(0),
                }
            }),
            ("more than the sandbox disk (64 GiB", |c| {
                c.disk = openshell_plugin::disk::DiskConfig {
                    size_gib: 64,
                    default_gib: Some(65),
                }
            }),
        ];
        for (what, break_it) in cases {
            let mut c = config();
            break_it(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[tokio::test]
    async fn a_gateway_with_a_zero_heartbeat_does_not_start() {
        let mut c = config();
        c.heartbeat = Duration::ZERO;
        match Gateway::start(c).await {
            Err(GatewayError::Config(ConfigError::TooShort { what, .. })) => {
                assert_eq!(what, "heartbeat")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a zero heartbeat was accepted"),
        }
    }
}
