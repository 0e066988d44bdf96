//! Starting gateways and finding driver components for tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openshell_gateway::{Gateway, GatewayConfig};
use openshell_proto::v1 as pb;
use openshell_proto::v1::open_shell_client::OpenShellClient;
use tonic::transport::Channel;

pub type Client = OpenShellClient<Channel>;

pub struct TestGateway {
    pub gw: Option<Gateway>,
    pub client: Client,
    _tmp: Option<tempfile::TempDir>,
    /// Shared by every gateway, held alone by [`TestGateway::start_alone`].
    _turn: Option<Turn>,
}

/// Tests run in parallel, but a load test saturates this machine's CPUs
/// and would make latency assertions elsewhere fail: it runs alone.
/// (gateways running, one running alone). Not a fair lock on purpose: a
/// test may start a second gateway while holding its first.
static TURNS: std::sync::Mutex<(usize, bool)> = std::sync::Mutex::new((0, false));

enum Turn {
    Shared,
    Alone,
}

impl Turn {
    async fn take(alone: bool) -> Turn {
        loop {
            {
                let mut t = TURNS.lock().unwrap_or_else(|p| p.into_inner());
                match (alone, *t) {
                    (false, (n, false)) => {
                        *t = (n + 1, false);
                        return Turn::Shared;
                    }
                    (true, (0, false)) => {
                        *t = (0, true);
                        return Turn::Alone;
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut t = TURNS.lock().unwrap_or_else(|p| p.into_inner());
        match self {
            Turn::Shared => t.0 -= 1,
            Turn::Alone => t.1 = false,
        }
    }
}

impl TestGateway {
    /// A gateway on a fresh state dir with an in-memory database.
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().to_owned();
        let mut gw = Self::start_on(&state, Some("sqlite::memory:")).await;
        gw._tmp = Some(tmp);
        gw
    }

    /// A gateway on `state`, with the database given or the default SQLite file.
    pub async fn start_on(state: &Path, db_url: Option<&str>) -> Self {
        Self::start_with(Self::config(state, db_url)).await
    }

    /// A gateway with a configuration made by [`Self::config`] and then changed.
    pub async fn start_with(cfg: GatewayConfig) -> Self {
        let turn = Turn::take(false).await;
        Self::start_in_turn(cfg, turn).await
    }

    /// Like [`Self::start_with`], once no other test gateway runs, and
    /// keeping others from starting until this one is dropped.
    pub async fn start_alone(cfg: GatewayConfig) -> Self {
        let turn = Turn::take(true).await;
        Self::start_in_turn(cfg, turn).await
    }

    async fn start_in_turn(cfg: GatewayConfig, turn: Turn) -> Self {
        let gw = Gateway::start(cfg).await.expect("gateway starts");
        let client = client(&format!("http://{}", gw.addr)).await;
        Self {
            gw: Some(gw),
            client,
            _tmp: None,
            _turn: Some(turn),
        }
    }

    /// What every test gateway runs with: tight relay limits and a short
    /// heartbeat so tests see their effects quickly.
    pub fn config(state: &Path, db_url: Option<&str>) -> GatewayConfig {
        GatewayConfig {
            bind: "127.0.0.1".parse().unwrap(),
            port: 0,
            db_url: db_url.map(str::to_owned),
            state_dir: state.to_owned(),
            drivers: vec![],
            driver_dir: None,
            embedded_drivers: &[],
            metrics_addr: None,
            disable_tls: true,
            disable_auth: true,
            plugin_call_timeout: Duration::from_secs(2),
            heartbeat: Duration::from_millis(300),
            tls_sans: vec![],
            vm: Default::default(),
            relays: openshell_gateway::supervisor::RelayLimits {
                per_sandbox: 2,
                total: 3,
                claim_timeout: Duration::from_millis(500),
                ..Default::default()
            },
            launcher: Some(bin("openshell-sandbox-launch")),
            supervisor: Some(bin("openshell-supervisor")),
            limits: Default::default(),
            uid_base: None,
            // The CLI tests run the sandbox disk; in-process gateways here
            // would each mount one in the test process.
            disk: openshell_plugin::disk::DiskConfig::OFF,
            images: Default::default(),
            default_policy: None,
            egress: Default::default(),
        }
    }

    /// Another client of the same gateway, as a separate handle.
    pub async fn client_for(gw: &TestGateway) -> TestGateway {
        let addr = gw.gw.as_ref().expect("running").addr;
        TestGateway {
            gw: None,
            client: client(&format!("http://{addr}")).await,
            _tmp: None,
            _turn: None,
        }
    }

    pub fn runtime(&self) -> std::sync::Arc<openshell_gateway::runtime::ComputeRuntime> {
        self.gw.as_ref().expect("running").runtime.clone()
    }

    pub async fn stop(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.shutdown().await.unwrap();
        }
    }

    /// Loads the bundled process driver with its documented grants.
    pub async fn load_process(&mut self) {
        let wasm = std::fs::read(wasm("openshell-driver-process")).unwrap();
        self.client
            .load_plugin(pb::LoadPluginRequest {
                name: "process".into(),
                component: wasm.into(),
                grants: vec![
                    "log".into(),
                    "files".into(),
                    "image".into(),
                    "process".into(),
                ],
            })
            .await
            .unwrap();
    }

    pub async fn load(&mut self, name: &str, fixture: &str, grants: &[&str]) -> pb::Plugin {
        self.try_load(name, fixture, grants)
            .await
            .unwrap_or_else(|s| panic!("loading {fixture}: {s}"))
    }

    pub async fn try_load(
        &mut self,
        name: &str,
        fixture: &str,
        grants: &[&str],
    ) -> Result<pb::Plugin, tonic::Status> {
        let component = std::fs::read(wasm(fixture)).unwrap();
        let r = self
            .client
            .load_plugin(pb::LoadPluginRequest {
                name: name.into(),
                component: component.into(),
                grants: grants.iter().map(|g| g.to_string()).collect(),
            })
            .await?;
        Ok(r.into_inner().plugin.unwrap())
    }

    pub async fn create(&mut self, name: &str, driver: &str) -> Result<pb::Sandbox, tonic::Status> {
        let r = self
            .client
            .create_sandbox(pb::CreateSandboxRequest {
                name: name.into(),
                spec: Some(pb::SandboxSpec {
                    driver: driver.into(),
                    ..Default::default()
                }),
                request_id: String::new(),
                policy: String::new(),
            })
            .await?;
        Ok(r.into_inner().sandbox.unwrap())
    }

    pub async fn get(&mut self, name: &str) -> Result<pb::Sandbox, tonic::Status> {
        let r = self
            .client
            .get_sandbox(pb::GetSandboxRequest { name: name.into() })
            .await?;
        Ok(r.into_inner().sandbox.unwrap())
    }

    pub async fn total(&mut self) -> u64 {
        self.client
            .list_sandboxes(pb::ListSandboxesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .total
    }

    /// Polls until `pred` holds for the sandbox, or panics after 15 s.
    pub async fn wait_for(
        &mut self,
        name: &str,
        what: &str,
        pred: impl Fn(&pb::Sandbox) -> bool,
    ) -> pb::Sandbox {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let sb = self.get(name).await.unwrap();
            if pred(&sb) {
                return sb;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{name} never reached {what}: {sb:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestGateway {
    /// On a failing test, show what every sandbox's supervisor logged.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Some(gw) = &self.gw else { return };
        let dir = gw.runtime.plugins().config().sandboxes_dir.clone();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let log = e.path().join("supervisor.log");
            if let Ok(text) = std::fs::read_to_string(&log) {
                eprintln!("--- {} ---\n{text}", log.display());
            }
        }
    }
}

pub async fn client(url: &str) -> Client {
    let ch = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .expect("connect to the test gateway");
    OpenShellClient::new(ch).max_encoding_message_size(64 << 20)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// A workspace binary built by `cargo build` (the test profile's debug dir).
pub fn bin(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

/// Path of a driver component built by `just drivers`.
pub fn wasm(crate_name: &str) -> PathBuf {
    let dir = std::env::var_os("OPENSHELL_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip2/release"));
    let path = dir.join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        path.is_file(),
        "{} is missing: build the driver components first with `just drivers`",
        path.display()
    );
    path
}

pub fn phase(sb: &pb::Sandbox) -> pb::SandboxPhase {
    pb::SandboxPhase::try_from(sb.phase).unwrap()
}

pub fn condition<'a>(sb: &'a pb::Sandbox, kind: &str) -> Option<&'a pb::Condition> {
    sb.conditions.iter().find(|c| c.r#type == kind)
}
