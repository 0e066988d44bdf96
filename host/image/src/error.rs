//! Every way the image store can fail, one variant per meaning. Each message
//! says what happened and what to do about it; causes stay `#[source]`s.

use std::io;
use std::path::PathBuf;

use oci_client::errors::OciDistributionError;

use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "`{reference}` is not a valid image reference ({reason}); write it as NAME[:TAG][@sha256:DIGEST], e.g. `python:3.12`"
    )]
    InvalidReference {
        reference: String,
        reason: &'static str,
        #[source]
        source: Option<oci_client::ParseError>,
    },

    #[error("`{digest}` is not a sha256 digest; write it as `sha256:` and 64 lowercase hex digits")]
    InvalidDigest { digest: String },

    #[error("image `{image}` is not in the store; pull or import it first")]
    NotFound { image: String },

    #[error(
        "{path} names no image (no full name in its annotations or RepoTags); pass a name, e.g. `--name example.com/team/app:v1`"
    )]
    NameRequired { path: PathBuf },

    #[error("{path} holds several images ({}); pass a name whose tag picks one", .names.join(", "))]
    AmbiguousImport { path: PathBuf, names: Vec<String> },

    #[error(
        "registry {registry} cannot be reached; check the name, the network and that it serves TLS"
    )]
    Unreachable {
        registry: String,
        #[source]
        source: OciDistributionError,
    },

    #[error(
        "registry {registry} speaks plain HTTP, which would expose the image and any credentials; list it as an insecure registry if that is intended"
    )]
    InsecureRefused { registry: String },

    #[error("registry {registry} refused {}; {}", if *.with_credentials { "these credentials" } else { "anonymous access" }, if *.with_credentials { "check the user and password (--registry-auth user:pass or the docker config)" } else { "pass --registry-auth user:pass or log in with docker" })]
    Unauthorized {
        registry: String,
        with_credentials: bool,
        #[source]
        source: OciDistributionError,
    },

    #[error("registry {registry} has no image `{reference}`; check the name and tag")]
    NotInRegistry {
        registry: String,
        reference: String,
        #[source]
        source: OciDistributionError,
    },

    #[error("registry {registry} failed the request for `{reference}`")]
    Registry {
        registry: String,
        reference: String,
        #[source]
        source: OciDistributionError,
    },

    #[error("`{reference}` has no image for {wanted}, only for: {}; pick an image built for {wanted}", if .available.is_empty() { "none".to_string() } else { .available.join(", ") })]
    NoPlatform {
        reference: String,
        wanted: String,
        available: Vec<String>,
    },

    #[error(
        "{what} has digest {got}, not the {expected} it is addressed by: the source is corrupt or was changed; fetch it again or rebuild it"
    )]
    DigestMismatch {
        what: String,
        expected: Digest,
        got: Digest,
    },

    #[error("{what} is {got} bytes, not the {expected} its descriptor says; the source is corrupt")]
    SizeMismatch {
        what: String,
        expected: u64,
        got: u64,
    },

    #[error("{what} is over the limit of {limit}; this store refuses it")]
    TooLarge { what: String, limit: String },

    #[error(
        "layer {layer}: entry `{entry}` {reason}, outside the layer; the image is malformed or hostile, do not use it"
    )]
    LayerEscapes {
        layer: Digest,
        entry: String,
        reason: &'static str,
    },

    #[error(
        "layer {layer}: entry `{entry}` has {kind} {id}, over the maximum {max} a sandbox can map; rebuild the image with ids up to {max}"
    )]
    UidOutOfRange {
        layer: Digest,
        entry: String,
        kind: &'static str,
        id: u64,
        max: u32,
    },

    #[error("layer {layer}: entry `{entry}` {reason}; the layer is malformed")]
    LayerInvalidEntry {
        layer: Digest,
        entry: String,
        reason: &'static str,
    },

    #[error("layer {layer} cannot be read as a {compression} tar; the layer is corrupt")]
    LayerUnreadable {
        layer: Digest,
        compression: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} cannot be read as an image archive (a tar of an OCI layout or a `docker save`, optionally gzip or zstd compressed)"
    )]
    ArchiveUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{what} is not valid JSON of its kind; the image is corrupt")]
    InvalidJson {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{what} is not a usable image: {reason}")]
    InvalidImage { what: String, reason: String },

    #[error("{what} has media type `{media_type}`, which this store does not support")]
    Unsupported { what: String, media_type: String },

    #[error("cannot build the VM disk of image {image}: {reason}")]
    DiskBuild { image: String, reason: String },

    #[error("the disk holding {path} is full; free space (an image gc may help) and retry")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "image store {path} has mode {mode:o} and owner uid {uid}; it must be a directory of mode 700 owned by root (chmod 700, chown root), or choose another"
    )]
    InsecureStore { path: PathBuf, mode: u32, uid: u32 },

    #[error(
        "the image store needs root (it keeps image files' owners and makes whiteout device nodes); run the gateway as root"
    )]
    NotRoot,

    #[error("image store {path} is in use by another process; stop it or use another directory")]
    StoreBusy { path: PathBuf },

    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// Wraps an I/O failure: ENOSPC (and EDQUOT, a full quota) becomes
    /// `DiskFull`, since the fix is the same and the caller should see it.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> ImageError {
        let path = path.into();
        let full = matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) || source.raw_os_error().is_some_and(|e| {
            e == rustix::io::Errno::NOSPC.raw_os_error()
                || e == rustix::io::Errno::DQUOT.raw_os_error()
        });
        if full {
            ImageError::DiskFull { path, source }
        } else {
            ImageError::Io { op, path, source }
        }
    }
}

/// `map_err` shorthand: `.map_err(io_err("read", &path))`.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |e| ImageError::io(op, path, e)
}
