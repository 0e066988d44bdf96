//! Prometheus metrics (`gateway start --metrics-addr`): what the gateway
//! counts, and the plain-HTTP `GET /metrics` that serves them.
//!
//! One set per process ([`get`]): a hook is one line where the thing
//! happens (a create stored, an exec started, a relay asked for, a plugin
//! call returned), with nothing threaded through the layers. The cost is
//! that gateways started in one process (the gateway crate's own tests)
//! share counters; the `openshell` binary runs one. Sandboxes by phase are
//! not counted at all: each scrape reads them from the store, so they can
//! never drift from it.
//!
//! Egress decisions are registered and stay zero until the egress policy
//! exists; a dashboard can be built against the name now.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use openshell_core::Phase;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Scrapes served at once.
const MAX_CONNECTIONS: usize = 16;

type PluginLabel = [(&'static str, String); 1];
type PhaseLabel = [(&'static str, &'static str); 1];

pub struct Metrics {
    /// Sandboxes stored by CreateSandbox (idempotent retries not counted).
    pub creates: Counter,
    /// From a create being stored to the sandbox's first Ready.
    create_seconds: Histogram,
    /// ExecSandbox calls that reached a Ready sandbox's supervisor.
    pub execs: Counter,
    /// Relays asked of supervisors (exec, SSH).
    pub relays: Counter,
    plugin_call_seconds: Family<PluginLabel, Histogram>,
    /// Egress decisions by verdict (allow, deny): zero for now.
    pub egress: Family<[(&'static str, &'static str); 1], Counter>,
    phases: Family<PhaseLabel, Gauge>,
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("openshell");
        let creates = Counter::default();
        registry.register("sandbox_creates", "Sandboxes created", creates.clone());
        // 50 ms to ~100 s: a process sandbox is Ready in tens of ms, a VM
        // under TCG in seconds, one pulling an image in minutes.
        let create_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "sandbox_create_seconds",
            "Seconds from a create being stored to the sandbox's first Ready",
            create_seconds.clone(),
        );
        let execs = Counter::default();
        registry.register("execs", "Commands run by ExecSandbox", execs.clone());
        let relays = Counter::default();
        registry.register(
            "relays",
            "Relays asked of supervisors (exec, SSH)",
            relays.clone(),
        );
        let plugin_call_seconds = Family::<PluginLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 9))
        });
        registry.register(
            "plugin_call_seconds",
            "Seconds one driver plugin call took, by plugin",
            plugin_call_seconds.clone(),
        );
        let egress = Family::<[(&'static str, &'static str); 1], Counter>::default();
        // An empty family is not written at all: make both verdicts, at 0.
        for verdict in ["allow", "deny"] {
            let _ = egress.get_or_create(&[("verdict", verdict)]);
        }
        registry.register(
            "egress_decisions",
            "Egress decisions by verdict (no egress policy yet: always zero)",
            egress.clone(),
        );
        let phases = Family::default();
        registry.register("sandboxes", "Stored sandboxes by phase", phases.clone());
        Self {
            creates,
            create_seconds,
            execs,
            relays,
            plugin_call_seconds,
            egress,
            phases,
            registry,
        }
    }

    /// A sandbox stored at `created_ms` became Ready at `now_ms`.
    pub fn ready_after(&self, created_ms: i64, now_ms: i64) {
        let ms = now_ms.saturating_sub(created_ms).max(0);
        self.create_seconds.observe(ms as f64 / 1000.0);
    }

    pub fn plugin_call(&self, plugin: &str, took: Duration) {
        self.plugin_call_seconds
            .get_or_create(&[("plugin", plugin.to_owned())])
            .observe(took.as_secs_f64());
    }

    /// The text exposition, with sandboxes by phase as `counts` says.
    pub fn render(&self, counts: &[(Phase, i64)]) -> String {
        for (phase, n) in counts {
            self.phases
                .get_or_create(&[("phase", phase.as_str())])
                .set(*n);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// This process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// Serves `GET /metrics` (HTTP/1.1, plaintext) on `listener` until
/// `shutdown`; `phases` counts stored sandboxes by phase at each scrape (the
/// runtime's, handed in so this module depends on nothing above it). Bind
/// it to loopback or a scraper-only network: it has no authentication,
/// and says nothing secret.
pub fn serve<F, Fut>(listener: TcpListener, phases: F, mut shutdown: watch::Receiver<bool>)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Vec<(Phase, i64)>> + Send,
{
    use hyper::{Method, Request, Response, StatusCode};
    let serve_one = move |stream, phases: F| async move {
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let phases = phases.clone();
            async move {
                if req.method() == Method::GET && req.uri().path() == "/metrics" {
                    let text = get().render(&phases().await);
                    Response::builder()
                        .header(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(text)
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body("only GET /metrics is served here\n".to_owned())
                }
            }
        });
        let io = hyper_util::rt::TokioIo::new(stream);
        // One request per connection, its headers within 10 s: a scraper
        // reconnects, and nobody can park idle connections here.
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .header_read_timeout(Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(io, svc);
        if let Err(e) = conn.await {
            tracing::debug!("metrics connection: {e}");
        }
    };
    // Budgeted like every other listener: past the limit a connection is
    // closed at once.
    let budget = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = budget.clone().try_acquire_owned() else {
                        continue;
                    };
                    let one = serve_one(stream, phases.clone());
                    tokio::spawn(async move {
                        one.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off, never spin.
                    tracing::warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_and_phase() {
        let m = Metrics::new();
        m.creates.inc();
        m.ready_after(1_000, 1_250);
        m.execs.inc();
        m.relays.inc();
        m.plugin_call("process", Duration::from_millis(3));
        let counts: Vec<_> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
        let text = m.render(&counts);
        for line in [
            "openshell_sandbox_creates_total 1",
            "openshell_sandbox_create_seconds_count 1",
            "openshell_sandbox_create_seconds_sum 0.25",
            "openshell_execs_total 1",
            "openshell_relays_total 1",
            "openshell_plugin_call_seconds_count{plugin=\"process\"} 1",
            "openshell_sandboxes{phase=\"Ready\"} 0",
            "openshell_egress_decisions_total{verdict=\"deny\"} 0",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
