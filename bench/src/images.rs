//! create → Ready from an image: the first create of an image (the pull
//! from a registry on loopback, the unpack, then the launch) and a create
//! from an image already in the store, against a create without one.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use openshell_image::testing::fixture::{
    Comp, Entry, Kind, Layer, TestImage, dir, file, host_userland,
};
use openshell_image::testing::registry::Registry;
use openshell_proto::v1 as pb;

use crate::gateway::{self, BenchGateway};
use crate::lifecycle::{self, Stages};

/// The bench image and what it weighs.
pub struct BenchImage {
    pub image: TestImage,
    pub files: usize,
    /// Uncompressed bytes in all layers.
    pub bytes: u64,
}

/// Deterministic incompressible bytes (xorshift), so a layer's size on the
/// wire is its size on disk.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Three layers shaped like a small real image: a userland (`sh` and the
/// libraries it links, gzip), 500 small files (zstd), and 32 MiB of
/// incompressible data in 8 files (plain tar).
pub fn bench_image() -> BenchImage {
    let mut l1: Vec<Entry> = host_userland(&["/bin/sh", "/usr/bin/true"]);
    l1.extend([
        dir("etc/", 0o755),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        dir("tmp/", 0o1777),
    ]);
    let mut l2 = vec![dir("srv/", 0o755)];
    for d in 0..10 {
        l2.push(dir(format!("srv/{d}/"), 0o755));
        for f in 0..50 {
            let body = format!("file {d}/{f}\n").repeat(40);
            l2.push(file(format!("srv/{d}/{f}.txt"), body.as_bytes(), 0o644));
        }
    }
    let mut l3 = vec![dir("data/", 0o755)];
    for i in 0..8u64 {
        l3.push(file(format!("data/blob{i}"), &noise(4 << 20, i + 1), 0o644));
    }
    let layers = [&l1, &l2, &l3];
    let files = layers.iter().map(|l| l.len()).sum();
    let bytes = layers
        .iter()
        .flat_map(|l| l.iter())
        .map(|e| match &e.kind {
            Kind::File(body) => body.len() as u64,
            _ => 0,
        })
        .sum();
    BenchImage {
        image: TestImage::new(vec![
            Layer::new(&l1, Comp::Gzip),
            Layer::new(&l2, Comp::Zstd),
            Layer::new(&l3, Comp::None),
        ]),
        files,
        bytes,
    }
}

pub struct ImageRuns {
    /// Each run pulled the image into an empty store.
    pub first: Stages,
    /// Each run found the image in the store.
    pub cached: Stages,
    /// Compressed bytes pulled per first create.
    pub pulled: u64,
}

/// Unpacked layer directories in the gateway's image store.
fn stored_layers(state: &Path) -> usize {
    std::fs::read_dir(state.join("images/layers/sha256")).map_or(0, |d| d.count())
}

/// `first` creates that each pull the image pushed to `registry` as
/// `reference` into an empty store (it is removed after each), then
/// `cached` creates from it once stored.
pub async fn measure(
    gw: &mut BenchGateway,
    reference: &str,
    first: usize,
    cached: usize,
) -> anyhow::Result<ImageRuns> {
    let mut runs = ImageRuns {
        first: Stages::default(),
        cached: Stages::default(),
        pulled: 0,
    };
    for i in 0..first {
        let layers = stored_layers(gw.state_dir());
        if layers != 0 {
            bail!("the image store still holds {layers} layers: a first create would not pull");
        }
        let name = format!("bench-image-first-{i}");
        let t = gateway::create_from_to_ready(
            &mut gw.client,
            "process",
            &name,
            Some(reference),
            Duration::from_secs(120),
        )
        .await?;
        runs.first.push(&t);
        let listed = gw
            .client
            .list_images(pb::ListImagesRequest {})
            .await?
            .into_inner();
        runs.pulled = listed.images.iter().map(|i| i.size).max().unwrap_or(0);
        gateway::delete_and_wait(&mut gw.client, &name).await?;
        gw.client
            .remove_image(pb::RemoveImageRequest {
                name: reference.into(),
                force: false,
            })
            .await
            .context("removing the image between first creates")?;
    }
    runs.cached = lifecycle::create_to_ready(
        gw,
        "process",
        Some(reference),
        1,
        cached,
        Duration::from_secs(60),
        Duration::from_secs(300),
    )
    .await?;
    Ok(runs)
}

/// Starts the registry and pushes the bench image, or why not.
pub async fn registry(image: &BenchImage) -> Result<(Registry, String), String> {
    let registry = Registry::start(None).ok_or_else(|| {
        "Debian's `docker-registry` is not installed (scripts/setup.sh installs it)".to_owned()
    })?;
    registry.push("bench/image:1", &image.image).await;
    let reference = registry.reference("bench/image:1");
    Ok((registry, reference))
}

/// VM creates from the image (already stored by [`measure`]): the first
/// builds its ext4 disk, the rest find it.
pub struct VmImageRuns {
    pub first: crate::gateway::CreateTimes,
    pub cached: Stages,
}

pub async fn vm(
    gw: &mut BenchGateway,
    reference: &str,
    runs: usize,
) -> anyhow::Result<VmImageRuns> {
    let timeout = Duration::from_secs(180);
    let first = gateway::create_from_to_ready(
        &mut gw.client,
        "vm",
        "bench-vm-image-first",
        Some(reference),
        timeout,
    )
    .await?;
    gateway::delete_and_wait(&mut gw.client, "bench-vm-image-first").await?;
    let cached = lifecycle::create_to_ready(
        gw,
        "vm",
        Some(reference),
        0,
        runs,
        timeout,
        Duration::from_secs(150),
    )
    .await?;
    Ok(VmImageRuns { first, cached })
}
