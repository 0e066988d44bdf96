//! The OCI and Docker formats, as pure functions: which media types the store
//! takes, choosing a platform from an index, checking a manifest against its
//! config, and the manifest a `docker save` tarball is given. No I/O here;
//! pull and import fetch the bytes, these rules judge them.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Serialize;

use crate::{Digest, ImageConfig, ImageError, MAX_JSON_BYTES, MAX_LAYERS};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What a registry is asked for (Accept): both formats, image and index.
pub(crate) const ACCEPTED_MANIFESTS: &[&str] =
    &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer media type (OCI and Docker, distributable or not).
    pub(crate) fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// From the first bytes of a blob: `docker save` names no media types.
    pub(crate) fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    pub(crate) fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// One layer as the store will fetch, verify and unpack it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LayerPlan {
    pub(crate) blob: Digest,
    pub(crate) size: u64,
    pub(crate) compression: Compression,
    /// The digest of the uncompressed tar (the config's `rootfs.diff_ids[i]`).
    pub(crate) diff_id: Digest,
}

/// A manifest, parsed and checked, before its config is known.
#[derive(Clone, Debug)]
pub(crate) struct ManifestPlan {
    pub(crate) config: Digest,
    pub(crate) config_size: u64,
    /// Blob, size, compression; diff ids come from the config.
    pub(crate) layers: Vec<(Digest, u64, Compression)>,
}

/// A top-level JSON document: an image manifest or an index of them.
pub(crate) enum Document {
    Manifest(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

fn check_len(what: &str, bytes: &[u8]) -> Result<(), ImageError> {
    if bytes.len() > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            limit: format!("{} bytes", MAX_JSON_BYTES),
        });
    }
    Ok(())
}

fn json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ImageError> {
    check_len(what, bytes)?;
    serde_json::from_slice(bytes).map_err(|source| ImageError::InvalidJson {
        what: what.to_string(),
        source,
    })
}

/// Parses a manifest or an index, told apart by `mediaType` (or, where a
/// writer left it out, by which list it has).
pub(crate) fn parse_document(what: &str, bytes: &[u8]) -> Result<Document, ImageError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u32>,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = json(what, bytes)?;
    if probe.schema_version != Some(2) {
        return Err(ImageError::Unsupported {
            what: what.to_string(),
            media_type: probe
                .media_type
                .unwrap_or_else(|| format!("schemaVersion {:?}", probe.schema_version)),
        });
    }
    match probe.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => Ok(Document::Index(Box::new(json(what, bytes)?))),
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => {
            Ok(Document::Manifest(Box::new(json(what, bytes)?)))
        }
        None if probe.manifests.is_some() => Ok(Document::Index(Box::new(json(what, bytes)?))),
        None => Ok(Document::Manifest(Box::new(json(what, bytes)?))),
        Some(other) => Err(ImageError::Unsupported {
            what: what.to_string(),
            media_type: other.to_string(),
        }),
    }
}

pub(crate) fn descriptor_digest(what: &str, d: &Descriptor) -> Result<Digest, ImageError> {
    let text = d.digest().to_string();
    Digest::parse(&text).map_err(|_| ImageError::Unsupported {
        what: format!("{what} (digest {text})"),
        media_type: d.media_type().to_string(),
    })
}

/// Checks an image manifest: a config the store understands and layers of
/// supported media types, at most `MAX_LAYERS` of them.
pub(crate) fn plan_manifest(
    what: &str,
    manifest: &ImageManifest,
) -> Result<ManifestPlan, ImageError> {
    let config = manifest.config();
    let config_type = config.media_type().to_string();
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(ImageError::Unsupported {
            what: format!("the config of {what}"),
            media_type: config_type,
        });
    }
    if config.size() > MAX_JSON_BYTES as u64 {
        return Err(ImageError::TooLarge {
            what: format!("the config of {what} ({} bytes)", config.size()),
            limit: format!("{MAX_JSON_BYTES} bytes"),
        });
    }
    if manifest.layers().len() > MAX_LAYERS {
        return Err(ImageError::TooLarge {
            what: format!("{what} ({} layers)", manifest.layers().len()),
            limit: format!("{MAX_LAYERS} layers"),
        });
    }
    let mut layers = Vec::with_capacity(manifest.layers().len());
    for (i, layer) in manifest.layers().iter().enumerate() {
        let media_type = layer.media_type().to_string();
        let compression =
            Compression::from_media_type(&media_type).ok_or_else(|| ImageError::Unsupported {
                what: format!("layer {} of {what}", i + 1),
                media_type: media_type.clone(),
            })?;
        layers.push((
            descriptor_digest(&format!("layer {} of {what}", i + 1), layer)?,
            layer.size(),
            compression,
        ));
    }
    Ok(ManifestPlan {
        config: descriptor_digest(&format!("the config of {what}"), config)?,
        config_size: config.size(),
        layers,
    })
}

/// The config, checked against the manifest (one diff id per layer) and the
/// platform, turned into what sandboxes need.
pub(crate) fn plan_config(
    what: &str,
    manifest: &ManifestPlan,
    config_bytes: &[u8],
) -> Result<ConfigPlan, ImageError> {
    let config: ImageConfiguration = json(&format!("the config of {what}"), config_bytes)?;
    let platform = (config.os().to_string(), config.architecture().to_string());
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::InvalidImage {
            what: what.to_string(),
            reason: format!(
                "its manifest lists {} layers but its config {} diff ids",
                manifest.layers.len(),
                diff_ids.len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (&(ref blob, size, compression), diff_id) in manifest.layers.iter().zip(diff_ids) {
        layers.push(LayerPlan {
            blob: blob.clone(),
            size,
            compression,
            diff_id: Digest::parse(diff_id)?,
        });
    }
    Ok(ConfigPlan {
        layers,
        config: image_config(&config),
        platform,
    })
}

/// A config, checked against its manifest.
#[derive(Clone, Debug)]
pub(crate) struct ConfigPlan {
    pub(crate) layers: Vec<LayerPlan>,
    pub(crate) config: ImageConfig,
    /// (os, architecture) as the config states them.
    pub(crate) platform: (String, String),
}

impl ConfigPlan {
    /// A single-platform image built for another platform is refused early:
    /// it would fail only when the sandbox runs its first binary.
    pub(crate) fn check_platform(
        &self,
        what: &str,
        wanted: &(String, String),
    ) -> Result<(), ImageError> {
        if &self.platform != wanted {
            return Err(ImageError::NoPlatform {
                reference: what.to_string(),
                wanted: format!("{}/{}", wanted.0, wanted.1),
                available: vec![format!("{}/{}", self.platform.0, self.platform.1)],
            });
        }
        Ok(())
    }
}

fn image_config(config: &ImageConfiguration) -> ImageConfig {
    let Some(c) = config.config() else {
        return ImageConfig::default();
    };
    let env = c
        .env()
        .iter()
        .flatten()
        .filter_map(|kv| match kv.split_once('=') {
            Some((k, v)) => Some((k.to_string(), v.to_string())),
            None => {
                tracing::debug!(entry = %kv, "image Env entry without `=` ignored");
                None
            }
        })
        .collect();
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    ImageConfig {
        env,
        working_dir: non_empty(c.working_dir()),
        user: non_empty(c.user()),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
    }
}

/// Picks the manifest for `platform` from an index, or says which platforms
/// there are. Entries without a platform (attestations, say) are not images
/// for any platform.
pub(crate) fn select_platform(
    reference: &str,
    index: &ImageIndex,
    platform: &(String, String),
) -> Result<Digest, ImageError> {
    let mut available = Vec::new();
    for entry in index.manifests() {
        let Some(p) = entry.platform() else { continue };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        if os == platform.0 && arch == platform.1 {
            return descriptor_digest(reference, entry);
        }
        let name = match p.variant() {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        };
        if !available.contains(&name) && os != "unknown" {
            available.push(name);
        }
    }
    Err(ImageError::NoPlatform {
        reference: reference.to_string(),
        wanted: format!("{}/{}", platform.0, platform.1),
        available,
    })
}

/// The OCI manifest a `docker save` image is stored under. `docker save`
/// writes none (older versions) so the store builds one; it must be the same
/// bytes every time, for the same tarball to get the same digest: a struct
/// with fixed field order, compact JSON.
pub(crate) fn synthesized_manifest(
    config: (&Digest, u64),
    layers: &[(Digest, u64, Compression)],
) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Desc<'a> {
        media_type: &'a str,
        digest: String,
        size: u64,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Manifest<'a> {
        schema_version: u32,
        media_type: &'a str,
        config: Desc<'a>,
        layers: Vec<Desc<'a>>,
    }
    let m = Manifest {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config: Desc {
            media_type: OCI_CONFIG,
            digest: config.0.to_string(),
            size: config.1,
        },
        layers: layers
            .iter()
            .map(|(d, size, c)| Desc {
                media_type: c.oci_media_type(),
                digest: d.to_string(),
                size: *size,
            })
            .collect(),
    };
    serde_json::to_vec(&m).expect("a manifest of strings and numbers serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amd64() -> (String, String) {
        ("linux".into(), "amd64".into())
    }

    fn d(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    #[test]
    fn an_index_yields_the_wanted_platform() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d(1),
            d(2)
        );
        let Document::Index(index) = parse_document("x", index.as_bytes()).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(
            select_platform("x", &index, &amd64()).unwrap().to_string(),
            d(2)
        );
    }

    #[test]
    fn an_index_without_the_platform_lists_what_it_has() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#,
            d(1),
            d(2)
        );
        let Document::Index(index) = parse_document("x", index.as_bytes()).unwrap() else {
            panic!("not an index")
        };
        match select_platform("x", &index, &amd64()) {
            Err(ImageError::NoPlatform {
                available, wanted, ..
            }) => {
                assert_eq!(available, vec!["linux/arm64/v8".to_string()]);
                assert_eq!(wanted, "linux/amd64");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn layer_media_types_map_to_their_compression() {
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar"),
            Some(Compression::None)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.cncf.helm.chart.content.v1.tar+gzip"),
            None
        );
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"etc/"), Compression::None);
    }

    #[test]
    fn a_manifest_with_an_unknown_layer_type_is_unsupported() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":2}},
               "layers":[{{"mediaType":"application/x-foo","digest":"{}","size":3}}]}}"#,
            d(1),
            d(2)
        );
        let Document::Manifest(m) = parse_document("x", m.as_bytes()).unwrap() else {
            panic!("not a manifest")
        };
        assert!(
            matches!(plan_manifest("x", &m), Err(ImageError::Unsupported { media_type, .. }) if media_type == "application/x-foo")
        );
    }

    #[test]
    fn json_over_the_limit_is_refused_before_parsing() {
        let big = vec![b' '; MAX_JSON_BYTES + 1];
        assert!(matches!(
            parse_document("x", &big),
            Err(ImageError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_synthesized_manifest_is_stable_and_parses_back() {
        let config = Digest::parse(&d(1)).unwrap();
        let layers = vec![(Digest::parse(&d(2)).unwrap(), 10, Compression::None)];
        let a = synthesized_manifest((&config, 5), &layers);
        assert_eq!(a, synthesized_manifest((&config, 5), &layers));
        let Document::Manifest(m) = parse_document("x", &a).unwrap() else {
            panic!("not a manifest")
        };
        let plan = plan_manifest("x", &m).unwrap();
        assert_eq!(plan.config, config);
        assert_eq!(plan.layers, layers);
    }

    #[test]
    fn env_entries_split_at_the_first_equals() {
        let config = r#"{"architecture":"amd64","os":"linux","config":{"Env":["A=b=c","NOEQ","E="],"User":"","WorkingDir":"/w"},
               "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let plan = ManifestPlan {
            config: Digest::parse(&d(1)).unwrap(),
            config_size: 0,
            layers: vec![],
        };
        let plan = plan_config("x", &plan, config.as_bytes()).unwrap();
        plan.check_platform("x", &amd64()).unwrap();
        assert!(matches!(
            plan.check_platform("x", &("linux".into(), "arm64".into())),
            Err(ImageError::NoPlatform { .. })
        ));
        let c = plan.config;
        assert_eq!(
            c.env,
            vec![("A".into(), "b=c".into()), ("E".into(), "".into())]
        );
        assert_eq!(c.user, None);
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
    }
}
