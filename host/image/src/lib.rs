//! The OCI image store: images pulled from registries or imported from
//! files, kept content-addressed under one root-only directory, each layer
//! unpacked once into a directory that every image and sandbox using it
//! shares as an overlayfs lower layer.
//!
//! Start at [`ImageStore`]. The modules:
//! - `store`: the layout on disk, staging and the commit that makes an image
//!   appear all at once, names, gc;
//! - `pull` and `import`: where the bytes come from (a registry through
//!   oci-client; an OCI layout, OCI archive or `docker save` tarball);
//! - `oci`: the formats as pure rules (media types, platform choice, the
//!   manifest of a `docker save` image);
//! - `unpack`: one layer tar into one directory, refusing escapes;
//! - `reference`, `digest`, `error`: the vocabulary.
//!
//! Invariant: a failed pull or import (a bad digest, an escaping entry, a
//! full disk, a dropped connection) leaves the store as it was. Everything is
//! written under `tmp/` and renamed into place only once all of an image is
//! verified; the manifest blob goes last, so an image whose manifest is
//! stored is complete. Images are root-only: the store keeps raw image
//! owners (uids up to [`MAX_IMAGE_ID`]) that a sandbox's user namespace maps.

mod digest;
pub mod disk;
mod error;
mod import;
mod oci;
mod pull;
mod reference;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod unpack;

pub use digest::Digest;
pub use error::ImageError;
pub use reference::normalize_reference;
pub use store::ImageStore;

use std::path::PathBuf;

/// The largest uid or gid an image file may have: a sandbox maps image ids
/// `0..=65534` (its 65536-id slot, the last id kept unmapped as overflow).
pub const MAX_IMAGE_ID: u32 = 65534;

/// The largest manifest, index or config (and `index.json`/`manifest.json`
/// of an import) the store reads: real ones are kilobytes; the bound keeps a
/// hostile source from making the gateway parse gigabytes of JSON.
pub const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;

/// The most layers an image may have. Overlayfs stacks a few hundred lower
/// directories at most (the mount option is one page); Docker caps at 127.
pub const MAX_LAYERS: usize = 128;

/// The most entries one layer tar may have.
pub const MAX_LAYER_ENTRIES: u64 = 2_000_000;

/// The most bytes one layer may decompress to (a small blob can expand to
/// far more than a disk holds).
pub const MAX_LAYER_UNPACKED_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// A stored image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Every name that points at it, normalised (`docker.io/library/python:3.12`).
    pub names: Vec<String>,
    /// The manifest digest: the image's identity.
    pub digest: Digest,
    /// Sum of the compressed layer sizes.
    pub size: u64,
    pub config: ImageConfig,
    /// Layer diff ids (digests of the uncompressed tars), bottom first.
    pub layers: Vec<Digest>,
}

/// What a sandbox takes from the image config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// How to reach a registry.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// `host[:port]` registries allowed over plain http.
    pub insecure_registries: Vec<String>,
    /// `--registry-auth user:pass`; wins over `docker_config`.
    pub auth: Option<(String, String)>,
    /// A `~/.docker/config.json` whose `auths` to use.
    pub docker_config: Option<PathBuf>,
    /// (os, architecture) to choose from an index.
    pub platform: (String, String),
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_registries: Vec::new(),
            auth: None,
            docker_config: None,
            platform: ("linux".into(), "amd64".into()),
        }
    }
}

/// Progress of a pull, reported as bytes arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullProgress {
    pub layers_done: usize,
    pub layers_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What a gc removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub layers_removed: usize,
    /// Disk space given back: removed blobs and unpacked layer files.
    pub reclaimed_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway shares one store across tasks and spawns pulls.
    #[test]
    fn the_store_is_shareable_and_a_pull_can_be_spawned() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<ImageStore>();
        let _ = |store: &ImageStore| {
            let opts = PullOptions::default();
            let pull = store.pull("x", &opts, &|_| {});
            send(&pull);
        };
    }
}
