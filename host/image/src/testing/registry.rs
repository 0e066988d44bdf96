//! A real registry for the pull tests: Debian's `docker-registry` on a free
//! loopback port with its own storage, killed (by pid) when dropped, and a
//! pusher built on oci-client's push API that uploads a test image's exact
//! bytes, so pulled digests can be compared with imported ones.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::can_run;
use super::fixture::TestImage;

pub struct Registry {
    child: Child,
    pub addr: String,
    dir: tempfile::TempDir,
    auth: Option<(String, String)>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have_registry() -> bool {
    Command::new("docker-registry")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `GET path` over plain HTTP/1.0; the status code, if anything answered.
fn get_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

impl Registry {
    /// Starts a registry (with htpasswd basic auth if `auth` is given), or
    /// returns None after saying loudly why not.
    pub fn start(auth: Option<(&str, &str)>) -> Option<Registry> {
        if !can_run(
            "docker-registry (apt-get install docker-registry)",
            have_registry(),
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        if let Some((user, pass)) = auth {
            let hash = bcrypt::hash_with_result(pass, 4)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoA);
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.path().join("access.log")).unwrap())
            .stderr(fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let mut registry = Registry {
            child,
            addr,
            dir,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        registry.wait_ready();
        Some(registry)
    }

    /// Polls `/v2/` until it answers (200, or 401 with auth on).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(200 | 401) = get_status(&self.addr, "/v2/") {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("docker-registry exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry not ready: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// Where the registry keeps blob `digest` (to corrupt it).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = super::fixture::hex_of(digest);
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// How many times each blob was fetched (200), by digest. Asks for a
    /// sentinel first and waits for its log line: the registry logs each
    /// request after answering it.
    pub fn blob_gets(&self) -> HashMap<String, usize> {
        let sentinel = format!("/v2/?sentinel={}", free_port());
        get_status(&self.addr, &sentinel);
        let log = self.dir.path().join("access.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains(&sentinel) {
                break text;
            }
            assert!(Instant::now() < deadline, "sentinel never logged");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = HashMap::new();
        for line in text.lines() {
            let Some(req) = line.split('"').nth(1) else {
                continue;
            };
            let status = line
                .split('"')
                .nth(2)
                .unwrap_or("")
                .trim()
                .split(' ')
                .next()
                .unwrap_or("");
            if req.starts_with("GET ") && req.contains("/blobs/sha256:") && status == "200" {
                let digest = req
                    .split("/blobs/")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap();
                *out.entry(digest.to_string()).or_insert(0) += 1;
            }
        }
        out
    }

    async fn pusher(&self) -> Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        })
        .unwrap();
        if let Some((u, p)) = &self.auth {
            client
                .store_auth_if_needed(&self.addr, &RegistryAuth::Basic(u.clone(), p.clone()))
                .await;
        }
        client
    }

    /// Pushes `image`'s blobs and manifest, byte for byte, as `repo_tag`.
    pub async fn push(&self, repo_tag: &str, image: &TestImage) {
        let reference: Reference = self.reference(repo_tag).parse().unwrap();
        let client = self.pusher().await;
        for (digest, bytes) in image.blobs().into_iter().rev().skip(1) {
            client.push_blob(&reference, bytes, &digest).await.unwrap();
        }
        client
            .push_manifest_raw(
                &reference,
                image.manifest.clone(),
                http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
            )
            .await
            .unwrap();
    }

    /// Pushes an index of already pushed manifests: (image, architecture).
    pub async fn push_index(&self, repo_tag: &str, images: &[(&TestImage, &str)]) -> Vec<u8> {
        let reference: Reference = self.reference(repo_tag).parse().unwrap();
        let client = self.pusher().await;
        let manifests: Vec<serde_json::Value> = images
            .iter()
            .map(|(image, arch)| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": image.digest(),
                    "size": image.manifest.len(),
                    "platform": {"os": "linux", "architecture": arch}
                })
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests
        }))
        .unwrap();
        client
            .push_manifest_raw(
                &reference,
                index.clone(),
                http::HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
            )
            .await
            .unwrap();
        index
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Child::kill signals this child's pid only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
