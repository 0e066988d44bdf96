//! Pulling from a registry. oci-client speaks the distribution protocol
//! (the `/v2/` ping, anonymous, basic and bearer-token auth); this module
//! decides what to fetch, hashes every blob as it arrives, and stages it.
//!
//! What a pull fetches: the manifest (a tag is always re-resolved; a digest
//! already stored under that name needs no network at all), the platform's
//! manifest from an index, then only the config and layers the store lacks.
//! Downloading layer i+1 overlaps unpacking layer i on a blocking thread.
//!
//! TLS is rustls with ring (see the workspace `Cargo.toml`): installed as the
//! process's default provider if nothing installed one before.

use std::io;
use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use tokio::io::AsyncWriteExt as _;

use crate::digest::Hashing;
use crate::error::io_err;
use crate::oci::{self, Document};
use crate::reference::ImageRef;
use crate::store::Staging;
use crate::{Digest, Image, ImageError, ImageStore, MAX_JSON_BYTES, PullOptions, PullProgress};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Between two reads of one response: a stalled registry fails the pull
/// rather than hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

impl ImageStore {
    /// Pulls `reference` (normalised as Docker does) for `opts.platform` and
    /// stores it under that name. `progress` is called as bytes arrive.
    pub async fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<Image, ImageError> {
        let r = ImageRef::parse(reference)?;
        let name = r.to_string();
        if let Some(d) = &r.digest
            && let Some(image) = self.local_by_digest(&name, d)?
        {
            return Ok(image);
        }
        let registry = Registry::connect(&r, opts).await?;
        let top = registry.manifest(&r.inner, &name).await?;
        let top_digest = Digest::of(&top);
        if let Some(d) = &r.digest
            && d != &top_digest
        {
            return Err(ImageError::DigestMismatch {
                what: format!("the manifest of {name}"),
                expected: d.clone(),
                got: top_digest,
            });
        }
        let (digest, manifest) =
            match oci::parse_document(&format!("the manifest of {name}"), &top)? {
                Document::Manifest(m) => (top_digest, Some((m, top))),
                Document::Index(index) => {
                    (oci::select_platform(&name, &index, &opts.platform)?, None)
                }
            };
        if let Some(image) = self.name_stored(&name, &digest)? {
            return Ok(image);
        }
        let _flight = self.flight(&digest).await;
        // Another pull of this image may have finished while this one waited.
        if let Some(image) = self.name_stored(&name, &digest)? {
            return Ok(image);
        }
        let (manifest, manifest_bytes) = match manifest {
            Some(m) => m,
            None => {
                let bytes = registry.manifest(&r.with_digest(&digest), &name).await?;
                let got = Digest::of(&bytes);
                if got != digest {
                    return Err(ImageError::DigestMismatch {
                        what: format!(
                            "the {}/{} manifest of {name}",
                            opts.platform.0, opts.platform.1
                        ),
                        expected: digest,
                        got,
                    });
                }
                match oci::parse_document(&format!("the manifest of {name}"), &bytes)? {
                    Document::Manifest(m) => (m, bytes),
                    Document::Index(_) => {
                        return Err(ImageError::InvalidImage {
                            what: name,
                            reason: "its index points at another index".into(),
                        });
                    }
                }
            }
        };
        let what = format!("{name} ({digest})");
        let plan = oci::plan_manifest(&what, &manifest)?;
        let mut staging = Staging::new(self)?;
        staging.pin(&digest);
        staging.pin(&plan.config);
        if !staging.blob_stored(&plan.config) {
            let path = staging.staged_blob_path(&plan.config);
            registry
                .blob(
                    &r.inner,
                    &plan.config,
                    plan.config_size,
                    &path,
                    &format!("the config of {what}"),
                    &mut |_| {},
                )
                .await?;
            staging.blob_staged(&plan.config);
        }
        let config_path = staging.blob_source(&plan.config);
        let config_bytes = std::fs::read(&config_path).map_err(io_err("read", &config_path))?;
        let config = oci::plan_config(&what, &plan, &config_bytes)?;
        config.check_platform(&what, &opts.platform)?;

        let mut state = PullProgress {
            layers_done: 0,
            layers_total: config.layers.len(),
            bytes_done: 0,
            bytes_total: config.layers.iter().map(|l| l.size).sum(),
        };
        progress(state);
        let mut pending: Option<(tokio::task::JoinHandle<Result<bool, ImageError>>, Digest)> = None;
        for (i, layer) in config.layers.iter().enumerate() {
            staging.pin(&layer.blob);
            staging.pin(&layer.diff_id);
            if staging.blob_stored(&layer.blob) || staging.has_staged_blob(&layer.blob) {
                state.bytes_done += layer.size;
                progress(state);
            } else {
                let path = staging.staged_blob_path(&layer.blob);
                let layer_what = format!("layer {} ({}) of {what}", i + 1, layer.blob);
                registry
                    .blob(
                        &r.inner,
                        &layer.blob,
                        layer.size,
                        &path,
                        &layer_what,
                        &mut |n| {
                            state.bytes_done += n;
                            progress(state);
                        },
                    )
                    .await?;
                staging.blob_staged(&layer.blob);
            }
            if let Some((job, diff_id)) = pending.take() {
                finish_layer(&mut staging, job, &diff_id).await?;
                state.layers_done += 1;
                progress(state);
            }
            let job = staging.layer_job(layer);
            pending = Some((
                tokio::task::spawn_blocking(move || job.run()),
                layer.diff_id.clone(),
            ));
        }
        if let Some((job, diff_id)) = pending.take() {
            finish_layer(&mut staging, job, &diff_id).await?;
            state.layers_done += 1;
            progress(state);
        }
        staging.add_blob_bytes(&digest, &manifest_bytes, &format!("the manifest of {what}"))?;
        // Flush the unpacked files off the runtime's threads; the commit's
        // own sync then has only its renames left to write.
        let root = self.root().to_path_buf();
        match tokio::task::spawn_blocking(move || crate::store::sync_filesystem(&root)).await {
            Ok(result) => result?,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
        staging.commit(&digest, &[name])?;
        self.get(&digest)
    }

    /// A by-digest reference already stored: under its name, or as a
    /// manifest digest (then named now). No network.
    fn local_by_digest(&self, name: &str, digest: &Digest) -> Result<Option<Image>, ImageError> {
        if let Some(image) = self.resolve(name)?
            && image.names.iter().any(|n| n == name)
        {
            return Ok(Some(image));
        }
        self.name_stored(name, digest)
    }

    /// If image `digest` is stored, points `name` at it and returns it.
    fn name_stored(&self, name: &str, digest: &Digest) -> Result<Option<Image>, ImageError> {
        let mut staging = Staging::new(self)?;
        // Pinned before the check, so a gc cannot take it in between.
        staging.pin(digest);
        if self.stored_image(digest)?.is_none() {
            return Ok(None);
        }
        staging.commit(digest, &[name.to_string()])?;
        self.get(digest).map(Some)
    }
}

async fn finish_layer(
    staging: &mut Staging<'_>,
    job: tokio::task::JoinHandle<Result<bool, ImageError>>,
    diff_id: &Digest,
) -> Result<(), ImageError> {
    match job.await {
        Ok(Ok(true)) => {
            staging.layer_staged(diff_id);
            Ok(())
        }
        Ok(Ok(false)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

static RING: Once = Once::new();

/// One pull's view of one registry: a client with the protocol and
/// credentials for it.
struct Registry {
    client: Client,
    auth: RegistryAuth,
    registry: String,
    insecure: bool,
}

impl Registry {
    async fn connect(r: &ImageRef, opts: &PullOptions) -> Result<Registry, ImageError> {
        RING.call_once(|| {
            // Err means a provider is already installed: that one is used.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let registry = r.registry().to_string();
        let insecure = opts.insecure_registries.iter().any(|h| h == &registry);
        let config = ClientConfig {
            protocol: if insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            // The store chooses the platform itself, to say what exists.
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|source| ImageError::Registry {
            registry: registry.clone(),
            reference: r.to_string(),
            source,
        })?;
        let auth = match &opts.auth {
            Some((user, pass)) => RegistryAuth::Basic(user.clone(), pass.clone()),
            None => match &opts.docker_config {
                Some(path) => docker_config_auth(path, &registry)?,
                None => RegistryAuth::Anonymous,
            },
        };
        let this = Registry {
            client,
            auth,
            registry,
            insecure,
        };
        // The /v2/ ping and, for bearer registries, the token: failures
        // here are the clearest (unreachable, plain http, bad credentials).
        if let Err(e) = this
            .client
            .auth(&r.inner, &this.auth, RegistryOperation::Pull)
            .await
        {
            return Err(this.classify(e, &r.to_string()).await);
        }
        Ok(this)
    }

    fn with_credentials(&self) -> bool {
        !matches!(self.auth, RegistryAuth::Anonymous)
    }

    /// A manifest or index, at most `MAX_JSON_BYTES`.
    async fn manifest(&self, reference: &Reference, name: &str) -> Result<Vec<u8>, ImageError> {
        let (bytes, _) = match self
            .client
            .pull_manifest_raw(reference, &self.auth, oci::ACCEPTED_MANIFESTS)
            .await
        {
            Ok(ok) => ok,
            Err(e) => return Err(self.classify(e, name).await),
        };
        if bytes.len() > MAX_JSON_BYTES {
            return Err(ImageError::TooLarge {
                what: format!("the manifest of {name}"),
                limit: format!("{MAX_JSON_BYTES} bytes"),
            });
        }
        Ok(bytes.to_vec())
    }

    /// Streams blob `d` into a new file at `path`, hashing as bytes arrive;
    /// it must be `size` bytes with digest `d`. `on_bytes` sees each chunk's
    /// length.
    async fn blob(
        &self,
        reference: &Reference,
        d: &Digest,
        size: u64,
        path: &Path,
        what: &str,
        on_bytes: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), ImageError> {
        let desc = OciDescriptor {
            digest: d.to_string(),
            size: size as i64,
            ..OciDescriptor::default()
        };
        let mut stream = match self.client.pull_blob_stream(reference, &desc).await {
            Ok(s) => s.stream,
            Err(e) => return Err(self.classify(e, &reference.whole()).await),
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .await
            .map_err(io_err("create", path))?;
        let mut hash = Hashing::new(());
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client checks the digest too and fails the stream's
                // end on a mismatch; report that as the mismatch it is.
                Err(e) if hash.count() == size => {
                    let (got, _, _) = std::mem::replace(&mut hash, Hashing::new(())).finish();
                    if &got != d {
                        return Err(ImageError::DigestMismatch {
                            what: what.to_string(),
                            expected: d.clone(),
                            got,
                        });
                    }
                    return Err(self
                        .classify(OciDistributionError::IoError(e), &reference.whole())
                        .await);
                }
                Err(e) => {
                    return Err(self
                        .classify(OciDistributionError::IoError(e), &reference.whole())
                        .await);
                }
            };
            if hash.count() + chunk.len() as u64 > size {
                return Err(ImageError::SizeMismatch {
                    what: what.to_string(),
                    expected: size,
                    got: hash.count() + chunk.len() as u64,
                });
            }
            file.write_all(&chunk)
                .await
                .map_err(io_err("write", path))?;
            hash.update(&chunk);
            on_bytes(chunk.len() as u64);
        }
        let (got, count, _) = hash.finish();
        crate::digest::verify(what, d, size, &got, count)?;
        file.sync_all().await.map_err(io_err("sync", path))?;
        Ok(())
    }

    /// Turns a client error into what it means for the user.
    async fn classify(&self, e: OciDistributionError, reference: &str) -> ImageError {
        let registry = self.registry.clone();
        let reference = reference.to_string();
        let unauthorized = |source| ImageError::Unauthorized {
            registry: registry.clone(),
            with_credentials: self.with_credentials(),
            source,
        };
        match &e {
            OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
                if !self.insecure && tls_broke(re) && speaks_plain_http(&self.registry).await {
                    return ImageError::InsecureRefused { registry };
                }
                ImageError::Unreachable {
                    registry,
                    source: e,
                }
            }
            OciDistributionError::IoError(_) | OciDistributionError::RequestError(_) => {
                ImageError::Unreachable {
                    registry,
                    source: e,
                }
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => unauthorized(e),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> =
                    envelope.errors.iter().map(|err| &err.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    unauthorized(e)
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    ImageError::NotInRegistry {
                        registry,
                        reference,
                        source: e,
                    }
                } else {
                    ImageError::Registry {
                        registry,
                        reference,
                        source: e,
                    }
                }
            }
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => unauthorized(e),
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotInRegistry {
                registry,
                reference,
                source: e,
            },
            _ => ImageError::Registry {
                registry,
                reference,
                source: e,
            },
        }
    }
}

/// Whether a connect failure was the TLS handshake breaking (not a
/// certificate rejected: that is a TLS server, just not a trusted one).
fn tls_broke(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return !matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        // io::Error's source() skips the error it wraps; look inside.
        if let Some(inner) = err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return !matches!(tls, rustls::Error::InvalidCertificate(_));
            }
            cur = Some(inner);
            continue;
        }
        cur = err.source();
    }
    false
}

/// Whether `host[:port]` answers plain HTTP: a TLS handshake with it broke,
/// and this tells "not TLS at all" (refused, not tried: the user must say it
/// is allowed) from a broken TLS server. Sends no credentials.
async fn speaks_plain_http(registry: &str) -> bool {
    let addr = if registry
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        registry.to_string()
    } else {
        format!("{registry}:443")
    };
    let probe = async {
        use tokio::io::AsyncReadExt as _;
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {registry}\r\n\r\n").as_bytes())
            .await?;
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await?;
        io::Result::Ok(&head == b"HTTP/")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), probe).await,
        Ok(Ok(true))
    )
}

/// Credentials for `registry` from a docker `config.json`'s `auths` (keys
/// may be `host[:port]`, a URL, or Docker Hub's `https://index.docker.io/v1/`).
/// Credential helpers are not run: an entry without `auth` or a user and
/// password is anonymous.
fn docker_config_auth(path: &Path, registry: &str) -> Result<RegistryAuth, ImageError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(path = %path.display(), "no docker config; pulling anonymously");
            return Ok(RegistryAuth::Anonymous);
        }
        Err(e) => return Err(ImageError::io("read", path, e)),
    };
    Ok(docker_config_lookup(&bytes, registry, path)?.unwrap_or(RegistryAuth::Anonymous))
}

fn docker_config_lookup(
    bytes: &[u8],
    registry: &str,
    path: &Path,
) -> Result<Option<RegistryAuth>, ImageError> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: std::collections::HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config =
        serde_json::from_slice(bytes).map_err(|source| ImageError::InvalidJson {
            what: path.display().to_string(),
            source,
        })?;
    let hub = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    let matches = |key: &str| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        host == registry || (hub.contains(&registry) && hub.contains(&host))
    };
    let Some(entry) = config
        .auths
        .iter()
        .find(|(k, _)| matches(k))
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    if let Some(auth) = &entry.auth {
        let bad = || ImageError::InvalidImage {
            what: path.display().to_string(),
            reason: format!("the `auth` for {registry} is not base64 of user:password"),
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, pass) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(RegistryAuth::Basic(
            user.to_string(),
            pass.to_string(),
        )));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(RegistryAuth::Basic(u.clone(), p.clone()))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: Option<RegistryAuth>) -> Option<(String, String)> {
        match a {
            Some(RegistryAuth::Basic(u, p)) => Some((u, p)),
            _ => None,
        }
    }

    #[test]
    fn docker_config_auths_match_by_host() {
        let cfg = br#"{"auths":{
            "127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},
            "https://index.docker.io/v1/":{"username":"hub","password":"pw"},
            "https://ghcr.io":{"auth":"Z2g6dG9r"}}}"#;
        let p = Path::new("config.json");
        assert_eq!(
            basic(docker_config_lookup(cfg, "127.0.0.1:5000", p).unwrap()),
            Some(("user".into(), "pa:ss".into()))
        );
        assert_eq!(
            basic(docker_config_lookup(cfg, "docker.io", p).unwrap()),
            Some(("hub".into(), "pw".into()))
        );
        assert_eq!(
            basic(docker_config_lookup(cfg, "ghcr.io", p).unwrap()),
            Some(("gh".into(), "tok".into()))
        );
        assert!(docker_config_lookup(cfg, "quay.io", p).unwrap().is_none());
    }

    #[test]
    fn a_docker_config_auth_that_is_not_base64_is_refused() {
        let cfg = br#"{"auths":{"r.io":{"auth":"***"}}}"#;
        assert!(docker_config_lookup(cfg, "r.io", Path::new("c")).is_err());
    }
}
