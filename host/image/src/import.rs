//! Importing an image from files: an OCI image layout directory
//! (`oci-layout`, `index.json`, `blobs/`), an OCI archive (a tar of one), or a
//! `docker save` tarball (`manifest.json`; layers as `<id>/layer.tar` or, from
//! Docker 25, `blobs/sha256/<hex>`), any of them optionally gzip or zstd
//! compressed. A tarball with both an `index.json` and a `manifest.json`
//! (Docker 25 writes both) is read as OCI, keeping its manifest digest.
//!
//! Verification and unpacking are the same as a pull's. Every file the
//! source names (blob paths in `manifest.json` are free text) is opened
//! beneath the source directory, so a hostile tarball cannot make the store
//! read a host file.
//!
//! The image's name: the `name` argument wins; else an OCI
//! `org.opencontainers.image.ref.name` annotation that is a full name (a bare
//! tag such as `v1` is not: then a name must be passed), else containerd's
//! `io.containerd.image.name`, else `docker save`'s RepoTags.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::digest::Hashing;
use crate::error::io_err;
use crate::oci::{self, Compression, Document, ManifestPlan};
use crate::reference::ImageRef;
use crate::store::Staging;
use crate::{Digest, Image, ImageError, ImageStore, MAX_JSON_BYTES};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

impl ImageStore {
    /// Imports the image at `path` (see the module doc for the formats and
    /// where its name comes from) and returns it as stored.
    pub fn import(&self, path: &Path, name: Option<&str>) -> Result<Image, ImageError> {
        let name = match name {
            None => None,
            Some(n) => {
                let r = ImageRef::parse(n)?;
                if r.digest.is_some() {
                    return Err(ImageError::InvalidReference {
                        reference: n.to_string(),
                        reason: "an import is named by a tag, not a digest",
                        source: None,
                    });
                }
                Some(r.to_string())
            }
        };
        let mut staging = Staging::new(self)?;
        let meta = std::fs::metadata(path).map_err(io_err("stat", path))?;
        let src_dir = if meta.is_dir() {
            path.to_path_buf()
        } else {
            let scratch = staging.scratch("source")?;
            extract_archive(path, &scratch)?;
            scratch
        };
        let src = Source::open(path, &src_dir)?;
        let (digest, names) = if src.exists("index.json") {
            import_oci(&mut staging, &src, name)?
        } else if src.exists("manifest.json") {
            import_docker_save(&mut staging, &src, name)?
        } else {
            return Err(ImageError::InvalidImage {
                what: path.display().to_string(),
                reason: "it is neither an OCI layout (index.json, blobs/) nor a `docker save` (manifest.json)".into(),
            });
        };
        staging.commit(&digest, &names)?;
        self.get(&digest)
    }
}

/// A directory to read an image from, every path opened beneath it.
struct Source {
    shown: PathBuf,
    dir: std::os::fd::OwnedFd,
}

impl Source {
    fn open(shown: &Path, dir: &Path) -> Result<Source, ImageError> {
        let dir = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::io("open", dir, e.into()))?;
        Ok(Source {
            shown: shown.to_path_buf(),
            dir,
        })
    }

    fn what(&self, rel: &str) -> String {
        format!("{} in {}", rel, self.shown.display())
    }

    fn file(&self, rel: &str) -> Result<Option<File>, ImageError> {
        match rustix::fs::openat2(
            &self.dir,
            OsStr::from_bytes(rel.as_bytes()),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::XDEV) => Err(ImageError::InvalidImage {
                what: self.shown.display().to_string(),
                reason: format!("`{rel}` leads outside it"),
            }),
            Err(e) => Err(ImageError::io("open", self.shown.join(rel), e.into())),
        }
    }

    fn exists(&self, rel: &str) -> bool {
        matches!(self.file(rel), Ok(Some(_)))
    }

    fn need(&self, rel: &str) -> Result<File, ImageError> {
        self.file(rel)?.ok_or_else(|| ImageError::InvalidImage {
            what: self.shown.display().to_string(),
            reason: format!("it lacks `{rel}`"),
        })
    }

    /// A JSON-sized file, bounded.
    fn small(&self, rel: &str) -> Result<Vec<u8>, ImageError> {
        let mut bytes = Vec::new();
        self.need(rel)?
            .take(MAX_JSON_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err("read", self.shown.join(rel)))?;
        if bytes.len() > MAX_JSON_BYTES {
            return Err(ImageError::TooLarge {
                what: self.what(rel),
                limit: format!("{MAX_JSON_BYTES} bytes"),
            });
        }
        Ok(bytes)
    }

    fn blob_rel(d: &Digest) -> String {
        format!("blobs/sha256/{}", d.hex())
    }

    /// A small blob of an OCI layout, checked against its digest.
    fn small_blob(&self, d: &Digest, what: &str) -> Result<Vec<u8>, ImageError> {
        let bytes = self.small(&Self::blob_rel(d))?;
        let got = Digest::of(&bytes);
        if &got != d {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                expected: d.clone(),
                got,
            });
        }
        Ok(bytes)
    }
}

/// Unpacks an image archive (plain, gzip or zstd tar) into `into`: regular
/// files, directories and links only, none outside `into` (the tar crate's
/// `unpack_in` skips those). Owners are not kept; this is only a source.
fn extract_archive(path: &Path, into: &Path) -> Result<(), ImageError> {
    let unreadable = |source| ImageError::ArchiveUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut file = BufReader::with_capacity(256 * 1024, file);
    let head = file.fill_buf().map_err(unreadable)?;
    let reader: Box<dyn Read> = match Compression::sniff(head) {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(unreadable)?)
        }
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular | T::Continuous | T::Directory | T::Symlink | T::Link => {
                entry
                    .unpack_in(into)
                    .map_err(|e| ImageError::io("extract", path, e))?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_full_name(n: &str) -> bool {
    n.contains('/') || n.contains(':')
}

/// The names an OCI index entry gives its image, if they are full names.
fn names_from_annotations(
    ann: Option<&HashMap<String, String>>,
) -> Result<Option<String>, ImageError> {
    let Some(ann) = ann else { return Ok(None) };
    for key in [REF_NAME, CONTAINERD_NAME] {
        if let Some(n) = ann.get(key).filter(|n| is_full_name(n)) {
            return Ok(Some(ImageRef::parse(n)?.to_string()));
        }
    }
    Ok(None)
}

fn platform() -> (String, String) {
    ("linux".into(), "amd64".into())
}

fn import_oci(
    staging: &mut Staging<'_>,
    src: &Source,
    name: Option<String>,
) -> Result<(Digest, Vec<String>), ImageError> {
    let index_what = src.what("index.json");
    let Document::Index(index) = oci::parse_document(&index_what, &src.small("index.json")?)?
    else {
        return Err(ImageError::InvalidImage {
            what: index_what,
            reason: "it is a manifest, not an index".into(),
        });
    };
    // Candidates: (manifest digest, its annotations' full name, its ref.name).
    let mut candidates: Vec<(Digest, Option<String>, Option<String>)> = Vec::new();
    for entry in index.manifests() {
        let d = oci::descriptor_digest(&index_what, entry)?;
        let ann = entry.annotations().as_ref();
        let full = names_from_annotations(ann)?;
        let ref_name = ann.and_then(|a| a.get(REF_NAME)).cloned();
        match entry.media_type().to_string().as_str() {
            oci::OCI_INDEX | oci::DOCKER_LIST => {
                let what = src.what(&Source::blob_rel(&d));
                let Document::Index(inner) =
                    oci::parse_document(&what, &src.small_blob(&d, &what)?)?
                else {
                    return Err(ImageError::InvalidImage {
                        what,
                        reason: "it is listed as an index but is a manifest".into(),
                    });
                };
                let shown = ref_name
                    .clone()
                    .unwrap_or_else(|| src.shown.display().to_string());
                candidates.push((
                    oci::select_platform(&shown, &inner, &platform())?,
                    full,
                    ref_name,
                ));
            }
            _ => {
                let other_platform = entry.platform().as_ref().is_some_and(|p| {
                    (p.os().to_string(), p.architecture().to_string()) != platform()
                });
                if !other_platform {
                    candidates.push((d, full, ref_name));
                }
            }
        }
    }
    let chosen = match candidates.len() {
        0 => {
            return Err(ImageError::NoPlatform {
                reference: src.shown.display().to_string(),
                wanted: "linux/amd64".into(),
                available: Vec::new(),
            });
        }
        1 => candidates.remove(0),
        _ => {
            // Several images: the name's tag (or the full name) picks one.
            let wanted = name.as_deref().map(|n| {
                (
                    n.to_string(),
                    n.rsplit_once(':').map(|(_, t)| t.to_string()),
                )
            });
            let pick = wanted.and_then(|(full, tag)| {
                candidates.iter().position(|(_, f, r)| {
                    f.as_deref() == Some(&full) || (r.is_some() && r.as_deref() == tag.as_deref())
                })
            });
            match pick {
                Some(i) => candidates.remove(i),
                None => {
                    return Err(ImageError::AmbiguousImport {
                        path: src.shown.clone(),
                        names: candidates
                            .iter()
                            .map(|(d, f, r)| {
                                f.clone().or(r.clone()).unwrap_or_else(|| d.to_string())
                            })
                            .collect(),
                    });
                }
            }
        }
    };
    let (digest, full, _) = chosen;
    let names = match name.or(full).or(docker_repo_tag(src)?) {
        Some(n) => vec![n],
        None => {
            return Err(ImageError::NameRequired {
                path: src.shown.clone(),
            });
        }
    };
    let what = format!("manifest {digest} in {}", src.shown.display());
    let manifest_bytes = src.small_blob(&digest, &what)?;
    let Document::Manifest(manifest) = oci::parse_document(&what, &manifest_bytes)? else {
        return Err(ImageError::InvalidImage {
            what,
            reason: "it is an index where a manifest was expected".into(),
        });
    };
    let plan = oci::plan_manifest(&what, &manifest)?;
    let config_what = format!("the config of {what}");
    let config_bytes = src.small_blob(&plan.config, &config_what)?;
    let layer_src = |d: &Digest| Source::blob_rel(d);
    stage_image(
        staging,
        src,
        &what,
        &digest,
        &manifest_bytes,
        &plan,
        &config_bytes,
        &layer_src,
    )?;
    Ok((digest, names))
}

/// A Docker 25 tarball's first RepoTag, for an OCI index without names.
fn docker_repo_tag(src: &Source) -> Result<Option<String>, ImageError> {
    if !src.exists("manifest.json") {
        return Ok(None);
    }
    let entries: Vec<DockerSaveEntry> = parse_json(src, "manifest.json")?;
    match entries.first().and_then(|e| e.repo_tags.first()) {
        Some(t) => Ok(Some(ImageRef::parse(t)?.to_string())),
        None => Ok(None),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(src: &Source, rel: &str) -> Result<T, ImageError> {
    serde_json::from_slice(&src.small(rel)?).map_err(|source| ImageError::InvalidJson {
        what: src.what(rel),
        source,
    })
}

#[derive(serde::Deserialize)]
struct DockerSaveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a `docker save` path states, if it is content-addressed
/// (`<hex>.json`, `blobs/sha256/<hex>`, `<hex>/layer.tar` is an id, not one).
fn stated_digest(rel: &str) -> Option<Digest> {
    let last = rel.rsplit('/').next()?;
    let hex = last.strip_suffix(".json").unwrap_or(last);
    if rel.starts_with("blobs/sha256/") || last.ends_with(".json") {
        Digest::parse(&format!("sha256:{hex}")).ok()
    } else {
        None
    }
}

fn import_docker_save(
    staging: &mut Staging<'_>,
    src: &Source,
    name: Option<String>,
) -> Result<(Digest, Vec<String>), ImageError> {
    let mut entries: Vec<DockerSaveEntry> = parse_json(src, "manifest.json")?;
    let entry = match entries.len() {
        0 => {
            return Err(ImageError::InvalidImage {
                what: src.what("manifest.json"),
                reason: "it lists no image".into(),
            });
        }
        1 => entries.remove(0),
        _ => {
            let pick = name.as_ref().and_then(|n| {
                entries.iter().position(|e| {
                    e.repo_tags
                        .iter()
                        .any(|t| ImageRef::parse(t).is_ok_and(|r| &r.to_string() == n))
                })
            });
            match pick {
                Some(i) => entries.remove(i),
                None => {
                    return Err(ImageError::AmbiguousImport {
                        path: src.shown.clone(),
                        names: entries.iter().flat_map(|e| e.repo_tags.clone()).collect(),
                    });
                }
            }
        }
    };
    let names = match name {
        Some(n) => vec![n],
        None => {
            let mut names = Vec::new();
            for t in &entry.repo_tags {
                names.push(ImageRef::parse(t)?.to_string());
            }
            if names.is_empty() {
                return Err(ImageError::NameRequired {
                    path: src.shown.clone(),
                });
            }
            names
        }
    };
    let config_what = src.what(&entry.config);
    let config_bytes = src.small(&entry.config)?;
    let config_digest = Digest::of(&config_bytes);
    if let Some(stated) = stated_digest(&entry.config)
        && stated != config_digest
    {
        return Err(ImageError::DigestMismatch {
            what: config_what,
            expected: stated,
            got: config_digest,
        });
    }
    if entry.layers.len() > crate::MAX_LAYERS {
        return Err(ImageError::TooLarge {
            what: src.what("manifest.json"),
            limit: format!("{} layers", crate::MAX_LAYERS),
        });
    }
    // Layer blobs carry no digest here: hash each while staging it, then
    // describe it in a manifest built from those digests.
    let mut layers = Vec::new();
    let mut layer_paths: HashMap<Digest, String> = HashMap::new();
    for rel in &entry.layers {
        let what = src.what(rel);
        let mut file = BufReader::with_capacity(256 * 1024, src.need(rel)?);
        let compression = Compression::sniff(
            file.fill_buf()
                .map_err(io_err("read", src.shown.join(rel)))?,
        );
        let (digest, size) = stage_unaddressed_blob(staging, file, &what)?;
        if let Some(stated) = stated_digest(rel)
            && stated != digest
        {
            return Err(ImageError::DigestMismatch {
                what,
                expected: stated,
                got: digest,
            });
        }
        layer_paths.insert(digest.clone(), rel.clone());
        layers.push((digest, size, compression));
    }
    let manifest_bytes =
        oci::synthesized_manifest((&config_digest, config_bytes.len() as u64), &layers);
    let digest = Digest::of(&manifest_bytes);
    let plan = ManifestPlan {
        config: config_digest,
        config_size: config_bytes.len() as u64,
        layers,
    };
    let what = format!("the image in {}", src.shown.display());
    let layer_src = |d: &Digest| layer_paths[d].clone();
    stage_image(
        staging,
        src,
        &what,
        &digest,
        &manifest_bytes,
        &plan,
        &config_bytes,
        &layer_src,
    )?;
    Ok((digest, names))
}

/// Copies a blob whose digest is not known in advance into staging,
/// returning its digest and size.
fn stage_unaddressed_blob(
    staging: &mut Staging<'_>,
    reader: impl Read,
    what: &str,
) -> Result<(Digest, u64), ImageError> {
    let tmp = staging.scratch("unaddressed")?.join("blob");
    let mut out = Hashing::new(
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?,
    );
    let mut reader = reader;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImageError::io("read", what, e)),
        };
        std::io::Write::write_all(&mut out, &buf[..n]).map_err(io_err("write", &tmp))?;
    }
    let (digest, size, file) = out.finish();
    file.sync_all().map_err(io_err("sync", &tmp))?;
    staging.pin(&digest);
    let staged = staging.staged_blob_path(&digest);
    std::fs::rename(&tmp, &staged).map_err(io_err("rename", &staged))?;
    staging.blob_staged(&digest);
    Ok((digest, size))
}

/// Stages a whole image: manifest, config, every layer blob (from `src`
/// where not already stored or staged) and its unpacked directory.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per source format; a struct would only rename them"
)]
fn stage_image(
    staging: &mut Staging<'_>,
    src: &Source,
    what: &str,
    digest: &Digest,
    manifest_bytes: &[u8],
    plan: &ManifestPlan,
    config_bytes: &[u8],
    layer_rel: &dyn Fn(&Digest) -> String,
) -> Result<(), ImageError> {
    let config = oci::plan_config(what, plan, config_bytes)?;
    config.check_platform(what, &platform())?;
    staging.pin(digest);
    staging.pin(&plan.config);
    staging.add_blob_bytes(&plan.config, config_bytes, &format!("the config of {what}"))?;
    for (i, layer) in config.layers.iter().enumerate() {
        staging.pin(&layer.blob);
        staging.pin(&layer.diff_id);
        if !staging.blob_stored(&layer.blob) && !staging.has_staged_blob(&layer.blob) {
            let layer_what = format!("layer {} ({}) of {what}", i + 1, layer.blob);
            staging.add_blob_reader(
                &layer.blob,
                layer.size,
                src.need(&layer_rel(&layer.blob))?,
                &layer_what,
            )?;
        }
        staging.add_layer(layer)?;
    }
    staging.add_blob_bytes(digest, manifest_bytes, what)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_content_addressed_docker_save_paths_state_a_digest() {
        let hex = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(stated_digest(&format!("{hex}.json")).unwrap().hex(), hex);
        assert_eq!(
            stated_digest(&format!("blobs/sha256/{hex}")).unwrap().hex(),
            hex
        );
        assert_eq!(stated_digest(&format!("{hex}/layer.tar")), None);
        assert_eq!(stated_digest("config.json"), None);
    }

    #[test]
    fn a_bare_tag_is_not_a_full_name() {
        assert!(!is_full_name("v1"));
        assert!(!is_full_name("latest"));
        assert!(is_full_name("team/app"));
        assert!(is_full_name("app:v1"));
    }
}
