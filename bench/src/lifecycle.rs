//! create → Ready per driver, with a stage breakdown: API + store
//! (CreateSandbox returns), the driver's create call (its `Driver`
//! condition is stored), the supervisor's connect-back (READY is stored),
//! and delivery (the watch stream hands READY to the client).

use std::time::Duration;

use crate::gateway::{self, BenchGateway, CreateTimes};
use crate::stats::Samples;

/// Per-stage samples over the measured runs.
#[derive(Clone, Debug, Default)]
pub struct Stages {
    pub api: Samples,
    pub driver: Samples,
    pub connect: Samples,
    pub delivery: Samples,
    pub total: Samples,
}

impl Stages {
    pub fn push(&mut self, t: &CreateTimes) {
        self.api.push(t.ack);
        self.driver.push(t.driver.saturating_sub(t.ack));
        self.connect.push(t.ready.saturating_sub(t.driver));
        self.delivery.push(t.seen.saturating_sub(t.ready));
        self.total.push(t.seen);
    }
}

/// Creates (from `image`, if given), watches to READY and deletes one
/// sandbox per run, one at a time.
pub async fn create_to_ready(
    gw: &mut BenchGateway,
    driver: &str,
    image: Option<&str>,
    warmup: usize,
    runs: usize,
    timeout: Duration,
    budget: Duration,
) -> anyhow::Result<Stages> {
    let mut stages = Stages::default();
    let started = std::time::Instant::now();
    for i in 0..warmup + runs {
        let name = format!("bench-{driver}-{i}");
        let t =
            gateway::create_from_to_ready(&mut gw.client, driver, &name, image, timeout).await?;
        gateway::delete_and_wait(&mut gw.client, &name).await?;
        if i >= warmup {
            stages.push(&t);
        }
        if started.elapsed() > budget && stages.total.len() >= 3 {
            break;
        }
    }
    Ok(stages)
}

/// The VM driver, if its component and runtime are here: loads it and
/// measures create → Ready; otherwise why it was skipped.
pub async fn vm(gw: &mut BenchGateway, runs: usize) -> Result<Stages, String> {
    let file = gateway::wasm("openshell-driver-vm");
    if !file.is_file() {
        return Err(format!(
            "the VM driver is not built yet ({} does not exist)",
            file.display()
        ));
    }
    let grants: Vec<&str> = openshell_gateway::runtime::bundled_grants("vm")
        .unwrap_or_default()
        .iter()
        .map(|g| g.as_str())
        .collect();
    gw.load("vm", &file, &grants)
        .await
        .map_err(|e| format!("the VM driver does not load: {e:#}"))?;
    // The first boot may stage a rootfs; it is a warm-up, reported apart.
    let probe = gateway::create_to_ready(
        &mut gw.client,
        "vm",
        "bench-vm-probe",
        Duration::from_secs(180),
    )
    .await
    .map_err(|e| format!("the VM driver cannot boot a sandbox here: {e:#}"))?;
    let _ = gateway::delete_and_wait(&mut gw.client, "bench-vm-probe").await;
    eprintln!("  vm first boot (warm-up): {:?}", probe.seen);
    create_to_ready(
        gw,
        "vm",
        None,
        0,
        runs,
        Duration::from_secs(180),
        Duration::from_secs(150),
    )
    .await
    .map_err(|e| format!("a VM run failed: {e:#}"))
}
