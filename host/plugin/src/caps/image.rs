//! `openshell:compute/image`: images from the host's store, for a driver to
//! root its sandbox in. The host does the I/O (pulls, unpacking, every
//! check in `openshell-image`); the driver only says which image.
//!
//! The gateway resolves (and pulls) a sandbox's image when the sandbox is
//! created, before anything is stored, so a launch normally finds it in
//! the store; a pull from inside a call is bounded by the call's deadline.

use std::path::PathBuf;
use std::sync::Arc;

use openshell_image::{Digest, Image, ImageError, ImageStore, PullOptions};
use wasmtime::component::Resource;

use crate::bindings::openshell::compute::image::{Host, HostPreparedImage, ImageInfo};
use crate::bindings::types::CapError;
use crate::caps::{CallState, CapabilityError, limits};

/// The store and how to pull into it.
#[derive(Debug)]
pub struct Images {
    pub store: Arc<ImageStore>,
    pub pull: PullOptions,
}

/// A prepared image; valid for one call. Carries what a launch needs.
#[derive(Debug)]
pub struct ImageHandle {
    pub(crate) image: Image,
    /// Unpacked layers, bottom first.
    pub(crate) layers: Vec<PathBuf>,
}

fn info(image: &Image) -> ImageInfo {
    ImageInfo {
        digest: image.digest.to_string(),
        size: image.size,
        layers: image.layers.len() as u32,
    }
}

/// A sandbox's environment rooted in an image with config `cfg`: the
/// image's variables under `env` (the spec's and the host's win, and an
/// image cannot set the supervisor's own), then its `User` and
/// `WorkingDir` for the supervisor. The same for both kinds of sandbox.
pub(crate) fn environment(
    cfg: &openshell_image::ImageConfig,
    mut env: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = cfg
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with("OPENSHELL_") && openshell_core::validate::is_env_key(k))
        .filter(|(k, _)| !env.iter().any(|(s, _)| s == k))
        .cloned()
        .collect();
    out.append(&mut env);
    out.push((
        "OPENSHELL_IMAGE_USER".into(),
        cfg.user.clone().unwrap_or_default(),
    ));
    let workdir = cfg.working_dir.clone().filter(|w| w.starts_with('/'));
    out.push((
        "OPENSHELL_IMAGE_WORKDIR".into(),
        workdir.unwrap_or_else(|| "/sandbox".into()),
    ));
    out
}

/// What a driver is told when the store refuses.
pub fn cap_error(e: ImageError) -> CapError {
    let text = e.to_string();
    match e {
        ImageError::InvalidReference { .. } | ImageError::NotFound { .. } => {
            CapError::Invalid(text)
        }
        ImageError::Unreachable { .. } => CapError::Unavailable(text),
        _ => CapError::Failed(text),
    }
}

impl CallState {
    pub(crate) fn images(&self) -> Result<Arc<Images>, CapError> {
        self.services.images.clone().ok_or_else(|| {
            CapError::Unavailable("this gateway has no image store configured".into())
        })
    }
}

impl Host for CallState {
    async fn resolve(&mut self, reference: String) -> Result<ImageInfo, CapabilityError> {
        self.require_sandbox()?;
        limits::check_path_len("image reference", &reference)?;
        let images = self.images()?;
        let stored = images.store.resolve(&reference).map_err(cap_error)?;
        let image = match stored {
            Some(image) => image,
            None => images
                .store
                .pull(&reference, &images.pull, &|_| {})
                .await
                .map_err(cap_error)?,
        };
        Ok(info(&image))
    }

    async fn prepare(&mut self, digest: String) -> Result<Resource<ImageHandle>, CapabilityError> {
        self.require_sandbox()?;
        let images = self.images()?;
        let digest = Digest::parse(&digest).map_err(cap_error)?;
        let image = images.store.get(&digest).map_err(cap_error)?;
        let layers = images.store.layer_dirs(&image);
        Ok(self.table.push(ImageHandle { image, layers })?)
    }
}

impl HostPreparedImage for CallState {
    async fn info(&mut self, h: Resource<ImageHandle>) -> wasmtime::Result<ImageInfo> {
        Ok(info(&self.table.get(&h)?.image))
    }

    async fn drop(&mut self, h: Resource<ImageHandle>) -> wasmtime::Result<()> {
        self.table.delete(h)?;
        Ok(())
    }
}
