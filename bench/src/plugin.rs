//! Plugin overhead, on the plugin host directly (no gRPC): one instantiate
//! from the pre-linked component, one export call with host imports, and
//! loading a stored component from the compiled cache after a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use openshell_core::Resources;
use openshell_plugin::{Capability, DriverSpec, PluginHost, PluginHostConfig};
use tokio::sync::mpsc;

use crate::gateway;
use crate::stats::Samples;

pub struct PluginCosts {
    /// `InstancePre::instantiate_async` into a fresh store.
    pub instantiate: Samples,
    /// fixture-echo `describe()`: fresh instance + a call with no imports.
    pub describe: Samples,
    /// fixture-echo `create()`: fresh instance + scope (state dir) + a call
    /// that imports files.write-file and log.
    pub create: Samples,
    /// `PluginHost::new` on an existing state dir (engine, linker, threads).
    pub host_new: Samples,
    /// `load_stored` of the process driver after a restart: read, digest,
    /// cached deserialize, import check, pre-link, describe().
    pub cached_load: Samples,
    /// The compiled-cache lookup alone (`compile_cached`) for the same bytes.
    pub cache_lookup: Samples,
    /// First load with an empty cache (Cranelift compile), one run.
    pub cold_load: Duration,
    pub component_kib: u64,
}

fn host(state: &Path) -> anyhow::Result<PluginHost> {
    let (tx, _rx) = mpsc::unbounded_channel();
    Ok(PluginHost::new(PluginHostConfig::new(state), tx)?)
}

fn spec() -> DriverSpec {
    DriverSpec {
        id: "00000000-0000-4000-8000-00000000be4c".into(),
        name: "bench".into(),
        environment: vec![],
        resources: Resources::default(),
        uid_slot: Some(7),
        image: None,
    }
}

pub async fn measure(warmup: usize, runs: usize, load_runs: usize) -> anyhow::Result<PluginCosts> {
    let state = tempfile::Builder::new()
        .prefix("openshell-bench-plugin")
        .tempdir()?;
    let echo = std::fs::read(gateway::wasm("fixture-echo")).context("fixture-echo.wasm")?;
    let process_file = gateway::wasm("openshell-driver-process");
    let process = std::fs::read(&process_file)
        .with_context(|| format!("reading {}", process_file.display()))?;
    let process_grants = [
        Capability::Log,
        Capability::Files,
        Capability::Image,
        Capability::Process,
    ];

    let h = host(state.path())?;
    let t = Instant::now();
    let (proc_plugin, _) = h.install("process", &process, &process_grants).await?;
    let cold_load = t.elapsed();
    let stored = proc_plugin.path.clone();
    let (plugin, _) = h
        .install("echo", &echo, &[Capability::Log, Capability::Files])
        .await?;

    let mut instantiate = Samples::default();
    let mut describe = Samples::default();
    let mut create = Samples::default();
    let spec = spec();
    for i in 0..warmup + runs {
        let d = plugin.time_instantiate().await?;
        let t = Instant::now();
        plugin.describe().await?;
        let ds = t.elapsed();
        let t = Instant::now();
        plugin.create(&spec, "secret", &[]).await?;
        let c = t.elapsed();
        if i >= warmup {
            instantiate.push(d);
            describe.push(ds);
            create.push(c);
        }
    }
    drop(h);

    let mut host_new = Samples::default();
    let mut cached_load = Samples::default();
    let mut cache_lookup = Samples::default();
    // The host stores a component as `<sha256 hex>.wasm`.
    let digest = stored
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned();
    for i in 0..1 + load_runs {
        let t = Instant::now();
        let h = host(state.path())?;
        let n = t.elapsed();
        let t = Instant::now();
        h.load_stored("process", &stored, &process_grants).await?;
        let l = t.elapsed();
        let t = Instant::now();
        h.compile_cached(&process, &digest).await?;
        let c = t.elapsed();
        if i >= 1 {
            host_new.push(n);
            cached_load.push(l);
            cache_lookup.push(c);
        }
    }
    Ok(PluginCosts {
        instantiate,
        describe,
        create,
        host_new,
        cached_load,
        cache_lookup,
        cold_load,
        component_kib: process.len() as u64 / 1024,
    })
}
