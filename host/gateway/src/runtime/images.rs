//! Images: what the API and a create ask of the image store. The store
//! (`openshell-image`) does the I/O and the checks; this decides when, and
//! which sandboxes hold an image.
//!
//! A sandbox holds its image by digest from the moment its record is
//! stored until the record is removed. Garbage collection keeps those
//! digests and every named image; `images_gc` orders it against creates,
//! so a layer a create just resolved cannot be collected before the
//! sandbox that uses it is stored.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use openshell_image::{Digest, GcReport, Image, PullProgress};
use openshell_plugin::Images;

use super::ComputeRuntime;
use crate::error::ApiError;

/// Sandbox records read per page when looking for an image's users.
const PAGE: u32 = 500;

impl ComputeRuntime {
    fn images(&self) -> Result<Arc<Images>, ApiError> {
        self.plugins
            .config()
            .images
            .clone()
            .ok_or(ApiError::NoImageStore)
    }

    /// The stored image `reference` names, pulled first if the store lacks
    /// it (two callers pulling one image download it once: the store
    /// serialises per reference).
    pub async fn pull_image(
        &self,
        reference: &str,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<Image, ApiError> {
        let images = self.images()?;
        let store = images.store.clone();
        let asked = reference.to_owned();
        let stored = tokio::task::spawn_blocking(move || store.resolve(&asked))
            .await
            .map_err(|_| ApiError::ShuttingDown)??;
        match stored {
            Some(image) => Ok(image),
            None => Ok(images.store.pull(reference, &images.pull, progress).await?),
        }
    }

    /// The VM disk of a stored image, built if the store lacks it.
    pub async fn image_disk(&self, image: Image) -> Result<std::path::PathBuf, ApiError> {
        let images = self.images()?;
        tokio::task::spawn_blocking(move || images.store.disk(&image))
            .await
            .map_err(|_| ApiError::ShuttingDown)?
            .map_err(ApiError::from)
    }

    /// Imports an archive (a file the caller wrote) into the store.
    pub async fn import_image(
        &self,
        archive: std::path::PathBuf,
        name: Option<String>,
    ) -> Result<Image, ApiError> {
        let images = self.images()?;
        tokio::task::spawn_blocking(move || images.store.import(&archive, name.as_deref()))
            .await
            .map_err(|_| ApiError::ShuttingDown)?
            .map_err(ApiError::from)
    }

    /// Where the API's uploads wait for their import: in the store's own
    /// root-only tree, so an archive is never readable by other users.
    pub fn image_upload_dir(&self) -> Result<std::path::PathBuf, ApiError> {
        Ok(self.images()?.store.upload_dir())
    }

    /// Every stored image with the names of the sandboxes rooted in it.
    pub async fn list_images(&self) -> Result<Vec<(Image, Vec<String>)>, ApiError> {
        let images = self.images()?;
        let users = self.image_users().await?;
        let list = tokio::task::spawn_blocking(move || images.store.list())
            .await
            .map_err(|_| ApiError::ShuttingDown)??;
        Ok(list
            .into_iter()
            .map(|image| {
                let names = users.get(&image.digest.to_string()).cloned();
                (image, names.unwrap_or_default())
            })
            .collect())
    }

    /// Removes an image's name, refusing while sandboxes use it unless
    /// `force`, then collects what nothing uses.
    pub async fn remove_image(&self, name: &str, force: bool) -> Result<(Image, u64), ApiError> {
        let images = self.images()?;
        let _gc = self.images_gc.write().await;
        let store = images.store.clone();
        let asked = name.to_owned();
        let image = tokio::task::spawn_blocking(move || store.resolve(&asked))
            .await
            .map_err(|_| ApiError::ShuttingDown)??
            .ok_or_else(|| ApiError::ImageNotFound {
                name: name.to_owned(),
            })?;
        let users = self.image_users().await?;
        if let Some(using) = users.get(&image.digest.to_string()).filter(|_| !force) {
            return Err(ApiError::ImageInUse {
                image: name.to_owned(),
                count: using.len(),
                example: using[0].clone(),
            });
        }
        let store = images.store.clone();
        let asked = name.to_owned();
        let keep = users.keys().filter_map(|d| Digest::parse(d).ok()).collect();
        let (removed, report) = tokio::task::spawn_blocking(move || {
            let removed = store.remove(&asked)?;
            let report = store.gc(&keep)?;
            Ok::<_, openshell_image::ImageError>((removed, report))
        })
        .await
        .map_err(|_| ApiError::ShuttingDown)??;
        Ok((removed, report.reclaimed_bytes))
    }

    /// Collects what no named image and no sandbox record uses (after a
    /// sandbox's record is removed). Best effort: a failure is logged.
    pub(super) async fn collect_images(&self) {
        let Ok(images) = self.images() else { return };
        let _gc = self.images_gc.write().await;
        let keep: HashSet<Digest> = match self.image_users().await {
            Ok(users) => users.keys().filter_map(|d| Digest::parse(d).ok()).collect(),
            Err(e) => {
                tracing::warn!("image garbage collection skipped: {e}");
                return;
            }
        };
        let result = tokio::task::spawn_blocking(move || images.store.gc(&keep)).await;
        match result {
            Ok(Ok(GcReport {
                reclaimed_bytes, ..
            })) if reclaimed_bytes > 0 => {
                tracing::info!("image garbage collection reclaimed {reclaimed_bytes} bytes");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("image garbage collection failed: {e}"),
            Err(_) => {}
        }
    }

    /// Sandbox names by the image digest they are rooted in.
    async fn image_users(&self) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
        let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_sandboxes_after(after.as_ref(), PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(openshell_store::PageKey::after(last));
            for sb in &page {
                if let Some(image) = sb.spec.image.as_ref().filter(|i| !i.digest.is_empty()) {
                    users
                        .entry(image.digest.clone())
                        .or_default()
                        .push(sb.name.to_string());
                }
            }
        }
        Ok(users)
    }
}
