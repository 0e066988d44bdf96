//! `openshell gateway start`.

use std::process::ExitCode;

use openshell_gateway::{Gateway, GatewayConfig};
use tokio::signal::unix::{SignalKind, signal};

use crate::args::GatewayStart;

pub async fn start(a: GatewayStart) -> anyhow::Result<ExitCode> {
    // Before anything else: a signal that arrives right after the ready
    // line must still mean "shut down cleanly".
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let state_dir = a.state_dir.unwrap_or_else(default_state_dir);
    if a.disable_tls {
        tracing::warn!("--disable-tls: serving plaintext gRPC; use only on a trusted network");
    }
    if a.disable_gateway_auth {
        tracing::warn!("--disable-gateway-auth: every client can drive this gateway");
    }
    if let Some(mib) = a.sandbox_disk_quota_mib {
        anyhow::bail!(
            "--sandbox-disk-quota-mib {mib} (or OPENSHELL_SANDBOX_DISK_QUOTA_MIB) is gone: sandboxes have a disk size in GiB each; \
             set the default with --default-disk-gib N (8 when unset) and a sandbox's own with `openshell sandbox create --disk-gib N`"
        );
    }
    let gw = Gateway::start(GatewayConfig {
        bind: a.bind,
        port: a.port,
        db_url: a.db_url,
        state_dir,
        drivers: a.drivers.into_iter().filter(|d| !d.is_empty()).collect(),
        driver_dir: a.driver_dir,
        embedded_drivers: crate::bundled::DRIVERS,
        metrics_addr: a.metrics_addr,
        disable_tls: a.disable_tls,
        disable_auth: a.disable_gateway_auth,
        tls_sans: a.tls_sans,
        vm: openshell_plugin::VmConfig {
            runtime_dir: a.vm_runtime,
            backend: openshell_plugin::VmBackendChoice::parse(&a.vm_backend)
                .map_err(|e| anyhow::anyhow!("--vm-backend: {e}"))?,
            // The gateway sets it from its own PKI.
            supervisor_tls: None,
        },
        plugin_call_timeout: std::time::Duration::from_secs(a.plugin_call_timeout_secs),
        heartbeat: std::time::Duration::from_millis(a.heartbeat_ms),
        relays: openshell_gateway::supervisor::RelayLimits {
            per_sandbox: a.max_pending_relays_per_sandbox,
            total: a.max_pending_relays,
            claim_timeout: std::time::Duration::from_millis(a.relay_claim_timeout_ms),
            idle_timeout: std::time::Duration::from_secs(a.relay_idle_timeout_secs),
        },
        launcher: a.launcher,
        supervisor: a.supervisor,
        limits: openshell_gateway::runtime::SandboxLimits {
            max_sandboxes: a.max_sandboxes,
            max_concurrent_launches: a.max_concurrent_launches,
            disk_reserve_gib: a.disk_reserve_gib,
        },
        uid_base: a.uid_base,
        disk: openshell_plugin::disk::DiskConfig {
            size_gib: a.sandbox_disk_gib,
            default_gib: a.default_disk_gib,
        },
        images: openshell_gateway::server::ImageOptions {
            static_supervisor: a.static_supervisor,
            default_image: a.default_image,
            insecure_registries: a.insecure_registries,
            registry_auth: a.registry_auth,
        },
        default_policy: match &a.default_policy {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--default-policy {}: {e}", path.display()))?,
            ),
            None => None,
        },
        egress: openshell_gateway::egress::EgressOptions {
            max_connections: a.egress_max_connections,
            bytes_per_second: a.egress_bytes_per_second,
            resolver: match &a.egress_hosts {
                Some(path) => openshell_gateway::egress::Resolver::from_hosts_file(path)?,
                None => Default::default(),
            },
            ..Default::default()
        },
    })
    .await?;
    if gw.client.ca_pem.is_some() || gw.client.token.is_some() {
        // The local CLI finds this gateway (and trusts it) with no flags.
        let endpoint = gw.client.endpoint.replace("0.0.0.0", "127.0.0.1");
        let cfg = crate::config::ClientConfig {
            endpoint,
            ca_pem: gw.client.ca_pem.clone(),
            token: gw.client.token.clone(),
        };
        match crate::config::path() {
            Some(p) => {
                crate::config::save(&cfg, &p)?;
                tracing::info!(path = %p.display(), "client config written");
            }
            None => tracing::warn!("no HOME or OPENSHELL_CONFIG: client config not written"),
        }
    }
    for spec in &a.import_images {
        let (path, name) = match spec.split_once('=') {
            Some((p, n)) => (p, Some(n.to_owned())),
            None => (spec.as_str(), None),
        };
        let started = std::time::Instant::now();
        let image = match gw.runtime.import_image(path.into(), name).await {
            Ok(image) => image,
            Err(e) => {
                gw.shutdown().await?;
                anyhow::bail!("--import-image {path}: {e}");
            }
        };
        tracing::info!(
            "imported {path} as {} ({}) in {:.1?}",
            image.names.join(", "),
            image.digest,
            started.elapsed()
        );
    }
    println!("Server listening on {}", gw.addr);
    if let Some(m) = gw.metrics_addr {
        println!("Metrics on http://{m}/metrics");
    }

    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
    gw.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}

pub fn default_state_dir() -> std::path::PathBuf {
    match std::env::var_os("XDG_STATE_HOME").or_else(|| std::env::var_os("HOME")) {
        Some(base) if std::env::var_os("XDG_STATE_HOME").is_some() => {
            std::path::PathBuf::from(base).join("openshell")
        }
        Some(home) => std::path::PathBuf::from(home).join(".local/state/openshell"),
        None => std::path::PathBuf::from(".openshell"),
    }
}
