//! An in-process gateway on loopback, started the way the API tests start
//! theirs, and the gRPC calls the benchmarks make against it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use openshell_gateway::{Gateway, GatewayConfig};
use openshell_proto::v1 as pb;
use openshell_proto::v1::open_shell_client::OpenShellClient;
use pb::exec_client_message::Msg as C;
use pb::exec_server_message::Msg as S;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub type Client = OpenShellClient<Channel>;

/// `$CARGO_TARGET_DIR`, or `target/` next to the workspace root.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A workspace binary of the profile this bench was built with (`just
/// bench`: `perf`, a release build): the one beside this executable.
pub fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| target_dir().join("debug").join(name))
}

/// The cargo profile this bench was built with, by its output directory.
pub fn profile() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// A driver component built by `just drivers`.
pub fn wasm(crate_name: &str) -> PathBuf {
    let dir = std::env::var_os("OPENSHELL_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip2/release"));
    dir.join(format!("{}.wasm", crate_name.replace('-', "_")))
}

pub struct BenchGateway {
    pub gw: Gateway,
    pub url: String,
    pub client: Client,
    state: tempfile::TempDir,
}

impl BenchGateway {
    /// A gateway on a fresh state dir with the default on-disk SQLite
    /// database (what `openshell gateway start` uses), on 127.0.0.1, that
    /// may pull from `insecure_registry` over plain HTTP.
    pub async fn start(insecure_registry: Option<&str>) -> anyhow::Result<Self> {
        for b in ["openshell-sandbox-launch", "openshell-supervisor"] {
            if !bin(b).is_file() {
                bail!(
                    "{} is missing: run `cargo build --workspace` first",
                    bin(b).display()
                );
            }
        }
        let state = tempfile::Builder::new()
            .prefix("openshell-bench")
            .tempdir()?;
        // The egress rows' test name (on the host's loopback).
        let hosts = state.path().join("egress-hosts");
        std::fs::write(&hosts, format!("127.0.0.1 {}\n", crate::egress::NAME))?;
        let egress = openshell_gateway::egress::EgressOptions {
            resolver: openshell_gateway::egress::Resolver::from_hosts_file(&hosts)?,
            ..Default::default()
        };
        let gw = Gateway::start(GatewayConfig {
            bind: "127.0.0.1".parse()?,
            port: 0,
            db_url: None,
            state_dir: state.path().to_owned(),
            drivers: vec![],
            driver_dir: None,
            embedded_drivers: &[],
            metrics_addr: None,
            disable_tls: true,
            disable_auth: true,
            plugin_call_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(5),
            launcher: Some(bin("openshell-sandbox-launch")),
            supervisor: Some(bin("openshell-supervisor")),
            relays: Default::default(),
            tls_sans: vec![],
            vm: openshell_plugin::VmConfig {
                runtime_dir: std::env::var_os("OPENSHELL_VM_RUNTIME").map(Into::into),
                ..Default::default()
            },
            limits: Default::default(),
            uid_base: None,
            disk: Default::default(),
            images: openshell_gateway::server::ImageOptions {
                insecure_registries: insecure_registry.into_iter().map(Into::into).collect(),
                ..Default::default()
            },
            default_policy: None,
            egress,
        })
        .await?;
        let url = format!("http://{}", gw.addr);
        let client = client(&url).await?;
        Ok(Self {
            gw,
            url,
            client,
            state,
        })
    }

    /// Uploads a driver component over gRPC, as `openshell plugin load` does.
    pub async fn load(&mut self, name: &str, file: &Path, grants: &[&str]) -> anyhow::Result<()> {
        let component =
            std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        self.client
            .load_plugin(pb::LoadPluginRequest {
                name: name.into(),
                component: component.into(),
                grants: grants.iter().map(|g| g.to_string()).collect(),
            })
            .await?;
        Ok(())
    }

    /// A client for a second listener serving this same gateway runtime
    /// with TCP_NODELAY on accepted sockets. A diagnostic: the gateway's
    /// own listener (host/gateway/src/server.rs) does not set it, and the
    /// difference shows what Nagle's algorithm costs streaming RPCs.
    pub async fn nodelay_client(&self) -> anyhow::Result<Client> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let runtime = self.gw.runtime.clone();
        let service = openshell_gateway::service::Service {
            shutdown: runtime.shutdown_signal(),
            runtime,
        };
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut stop = self.gw.runtime.shutdown_signal();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::open_shell_server::OpenShellServer::new(service))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        );
        client(&format!("http://{addr}")).await
    }

    /// The gateway's state dir (sandboxes' sockets are under it).
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.gw.shutdown().await?;
        Ok(())
    }
}

/// A new HTTP/2 connection to the gateway.
pub async fn client(url: &str) -> anyhow::Result<Client> {
    // The CLI's HTTP/2 settings (host/cli/src/client.rs).
    let ch = Channel::from_shared(url.to_owned())?
        .max_frame_size(256 * 1024)
        .initial_stream_window_size(2 << 20)
        .initial_connection_window_size(8 << 20)
        .connect()
        .await?;
    Ok(OpenShellClient::new(ch))
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// When each stage of one create ended, measured from just before the
/// CreateSandbox call. `driver` and `ready` are the server's own condition
/// timestamps (millisecond resolution, same clock: the gateway runs in this
/// process); `seen` is when the watch stream delivered READY to the client.
#[derive(Clone, Copy, Debug)]
pub struct CreateTimes {
    /// CreateSandbox returned (API + validate + store insert).
    pub ack: Duration,
    /// The driver's `Driver` condition was stored (its create call returned).
    pub driver: Duration,
    /// READY was stored (the supervisor dialled back and registered).
    pub ready: Duration,
    /// The client saw READY on the watch stream.
    pub seen: Duration,
}

/// Creates a sandbox and watches it to READY.
pub async fn create_to_ready(
    client: &mut Client,
    driver: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<CreateTimes> {
    create_from_to_ready(client, driver, name, None, timeout).await
}

/// Creates a sandbox rooted in `image` (none: the host root) and watches it
/// to READY.
pub async fn create_from_to_ready(
    client: &mut Client,
    driver: &str,
    name: &str,
    image: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<CreateTimes> {
    let t0_ms = wall_ms();
    let t0 = Instant::now();
    client
        .create_sandbox(pb::CreateSandboxRequest {
            name: name.into(),
            spec: Some(pb::SandboxSpec {
                driver: driver.into(),
                image: image.unwrap_or_default().into(),
                ..Default::default()
            }),
            request_id: String::new(),
            policy: String::new(),
        })
        .await?;
    let ack = t0.elapsed();
    let mut t = watch_to_ready(client, name, t0, t0_ms, timeout).await?;
    t.ack = ack;
    Ok(t)
}

/// Watches `name` until READY. `ack` is left zero for the caller.
pub async fn watch_to_ready(
    client: &mut Client,
    name: &str,
    t0: Instant,
    t0_ms: i64,
    timeout: Duration,
) -> anyhow::Result<CreateTimes> {
    let mut stream = client
        .watch_sandbox(pb::WatchSandboxRequest {
            name: name.into(),
            until_settled: true,
        })
        .await?
        .into_inner();
    let deadline = t0 + timeout;
    let since_t0 = |ms: i64| Duration::from_millis((ms - t0_ms).max(0) as u64);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(ev) = tokio::time::timeout(left, stream.message())
            .await
            .with_context(|| format!("{name} not Ready within {timeout:?}"))??
        else {
            bail!("the watch on {name} ended before READY");
        };
        let seen = t0.elapsed();
        let sb = match ev.event {
            Some(pb::watch_sandbox_event::Event::Sandbox(sb)) => sb,
            _ => bail!("{name} was deleted while starting"),
        };
        let at = |kind: &str| {
            sb.conditions
                .iter()
                .find(|c| c.r#type == kind)
                .map(|c| since_t0(c.last_transition_time_ms))
        };
        match pb::SandboxPhase::try_from(sb.phase) {
            Ok(pb::SandboxPhase::Ready) => {
                let ready = at("Ready").unwrap_or(seen).min(seen);
                return Ok(CreateTimes {
                    ack: Duration::ZERO,
                    driver: at("Driver").unwrap_or(ready).min(ready),
                    ready,
                    seen,
                });
            }
            Ok(pb::SandboxPhase::Error) => bail!(
                "{name} went to ERROR: {}",
                sb.conditions
                    .iter()
                    .find(|c| c.r#type == "Ready")
                    .map_or(String::new(), |c| format!("{}: {}", c.reason, c.message))
            ),
            _ => {}
        }
    }
}

/// Deletes a sandbox and waits until its record is gone.
pub async fn delete_and_wait(client: &mut Client, name: &str) -> anyhow::Result<()> {
    let mut stream = client
        .watch_sandbox(pb::WatchSandboxRequest {
            name: name.into(),
            until_settled: false,
        })
        .await?
        .into_inner();
    client
        .delete_sandbox(pb::DeleteSandboxRequest { name: name.into() })
        .await?;
    let wait = async {
        while let Some(ev) = stream.message().await? {
            if let Some(pb::watch_sandbox_event::Event::Deleted(_)) = ev.event {
                return Ok(());
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .with_context(|| format!("{name} not deleted within 30 s"))?
}

/// What one exec produced, without keeping the bytes.
#[derive(Debug, Default)]
pub struct ExecResult {
    pub stdout_bytes: u64,
    /// The first [`KEPT`] bytes of stdout.
    pub stdout: Vec<u8>,
    pub exit: i32,
}

/// Stdout bytes an [`ExecResult`] keeps.
const KEPT: usize = 1 << 20;

/// Runs `argv` in a READY sandbox and drains its output.
pub async fn exec(client: &mut Client, sandbox: &str, argv: &[&str]) -> anyhow::Result<ExecResult> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::ExecClientMessage {
        msg: Some(C::Start(pb::ExecStart {
            sandbox: sandbox.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    })
    .await?;
    let mut stream = client
        .exec_sandbox(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut out = ExecResult::default();
    while let Some(m) = stream.message().await? {
        match m.msg {
            Some(S::Stdout(b)) => {
                out.stdout_bytes += b.len() as u64;
                let room = KEPT.saturating_sub(out.stdout.len());
                out.stdout.extend_from_slice(&b[..b.len().min(room)]);
            }
            Some(S::Stderr(_)) | None => {}
            Some(S::Exit(code)) => {
                out.exit = code;
                drop(tx);
                return Ok(out);
            }
        }
    }
    bail!("exec {argv:?} ended without an exit frame")
}
