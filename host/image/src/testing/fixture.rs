//! A test-side image builder: layer tars written entry by entry (raw names,
//! so hostile ones can be made too), compressed as asked, and the whole
//! image as an OCI layout, an OCI archive or a `docker save` tarball.

use std::fs;
use std::io::Write;
use std::path::Path;

use sha2::{Digest as _, Sha256};

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

impl Comp {
    pub fn media_type(self) -> &'static str {
        match self {
            Comp::None => "application/vnd.oci.image.layer.v1.tar",
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub fn apply(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Comp::None => tar.to_vec(),
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar).unwrap();
                e.finish().unwrap()
            }
            Comp::Zstd => zstd::encode_all(tar, 3).unwrap(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hardlink(String),
    CharDev(u32, u32),
    Fifo,
}

/// One tar entry, ids and mode explicit.
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub uid: u64,
    pub gid: u64,
    pub mode: u32,
    pub xattrs: Vec<(&'static str, &'static [u8])>,
}

pub const MTIME: u64 = 1_700_000_000;

pub fn file(path: impl Into<String>, content: &[u8], mode: u32) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::File(content.to_vec()),
        uid: 0,
        gid: 0,
        mode,
        xattrs: vec![],
    }
}

pub fn dir(path: impl Into<String>, mode: u32) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::Dir,
        uid: 0,
        gid: 0,
        mode,
        xattrs: vec![],
    }
}

pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::Symlink(target.into()),
        uid: 0,
        gid: 0,
        mode: 0o777,
        xattrs: vec![],
    }
}

pub fn hardlink(path: impl Into<String>, target: impl Into<String>) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::Hardlink(target.into()),
        uid: 0,
        gid: 0,
        mode: 0o644,
        xattrs: vec![],
    }
}

impl Entry {
    pub fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn xattr(mut self, name: &'static str, value: &'static [u8]) -> Entry {
        self.xattrs.push((name, value));
        self
    }
}

/// A tar of `entries`, names written raw into the header (the tar crate's
/// setters refuse `..`, which the hostile tests need).
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        let (ty, data): (tar::EntryType, &[u8]) = match &e.kind {
            Kind::File(d) => (tar::EntryType::Regular, d),
            Kind::Dir => (tar::EntryType::Directory, &[]),
            Kind::Symlink(_) => (tar::EntryType::Symlink, &[]),
            Kind::Hardlink(_) => (tar::EntryType::Link, &[]),
            Kind::CharDev(..) => (tar::EntryType::Char, &[]),
            Kind::Fifo => (tar::EntryType::Fifo, &[]),
        };
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mode(e.mode);
        h.set_mtime(MTIME);
        assert!(e.path.len() < 100);
        let bytes = h.as_mut_bytes();
        bytes[..e.path.len()].copy_from_slice(e.path.as_bytes());
        if let Kind::Symlink(t) | Kind::Hardlink(t) = &e.kind {
            bytes[157..157 + t.len()].copy_from_slice(t.as_bytes());
        }
        if let Kind::CharDev(maj, min) = e.kind {
            h.set_device_major(maj).unwrap();
            h.set_device_minor(min).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

pub struct Layer {
    pub tar: Vec<u8>,
    pub comp: Comp,
    pub blob: Vec<u8>,
}

impl Layer {
    pub fn new(entries: &[Entry], comp: Comp) -> Layer {
        let tar = layer_tar(entries);
        let blob = comp.apply(&tar);
        Layer { tar, comp, blob }
    }
}

/// An image: layers, a config naming their diff ids, a manifest.
pub struct TestImage {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

pub fn config_json(diff_ids: &[String], arch: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": "1234",
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world"],
            "WorkingDir": "/home/app",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"]
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": []
    }))
    .unwrap()
}

impl TestImage {
    pub fn new(layers: Vec<Layer>) -> TestImage {
        TestImage::for_arch(layers, "amd64")
    }

    pub fn for_arch(layers: Vec<Layer>, arch: &str) -> TestImage {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha(&l.tar)).collect();
        let config = config_json(&diff_ids, arch);
        TestImage::with_config(layers, config)
    }

    pub fn with_config(layers: Vec<Layer>, config: Vec<u8>) -> TestImage {
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(&config),
                "size": config.len()
            },
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.comp.media_type(),
                "digest": sha(&l.blob),
                "size": l.blob.len()
            })).collect::<Vec<_>>()
        }))
        .unwrap();
        TestImage {
            layers,
            config,
            manifest,
        }
    }

    /// The three-layer image of the brief: gzip, zstd, uncompressed.
    pub fn standard() -> TestImage {
        TestImage::new(standard_layers())
    }

    pub fn digest(&self) -> String {
        sha(&self.manifest)
    }

    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| sha(&l.tar)).collect()
    }

    /// Every blob: (digest, bytes), manifest last.
    pub fn blobs(&self) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = self
            .layers
            .iter()
            .map(|l| (sha(&l.blob), l.blob.clone()))
            .collect();
        out.push((sha(&self.config), self.config.clone()));
        out.push((self.digest(), self.manifest.clone()));
        out
    }

    /// An OCI image layout in `dir`, `ref_name` as the index annotation.
    pub fn write_oci_layout(&self, dir: &Path, ref_name: Option<&str>) {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        for (d, bytes) in self.blobs() {
            fs::write(blobs.join(hex_of(&d)), bytes).unwrap();
        }
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let mut desc = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": self.digest(),
            "size": self.manifest.len()
        });
        if let Some(r) = ref_name {
            desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": r});
        }
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]});
        fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// The layout above as a tar (an OCI archive).
    pub fn write_oci_archive(&self, path: &Path, ref_name: Option<&str>) {
        let dir = tempfile::tempdir().unwrap();
        self.write_oci_layout(dir.path(), ref_name);
        let mut b = tar::Builder::new(fs::File::create(path).unwrap());
        b.append_dir_all(".", dir.path()).unwrap();
        b.finish().unwrap();
    }

    /// A legacy `docker save` tarball: `<id>/layer.tar` (uncompressed),
    /// `<config hex>.json`, `manifest.json` with RepoTags.
    pub fn write_docker_save(&self, path: &Path, repo_tags: &[&str]) {
        let mut b = tar::Builder::new(fs::File::create(path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(MTIME);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        let config_name = format!("{}.json", hex_of(&sha(&self.config)));
        add(&config_name, &self.config);
        let mut layer_names = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let name = format!("{:064x}/layer.tar", i + 1);
            add(&name, &l.tar);
            layer_names.push(name);
        }
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": repo_tags,
            "Layers": layer_names
        }]);
        add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        b.into_inner().unwrap().flush().unwrap();
    }
}

pub fn standard_layers() -> Vec<Layer> {
    let l1 = vec![
        dir("etc/", 0o755),
        file("etc/hello", b"hello\n", 0o644).xattr("user.test", b"layer one"),
        symlink("etc/hello-link", "hello"),
        hardlink("etc/hello-hard", "etc/hello"),
        dir("data/", 0o755),
        file("data/gone", b"soon gone", 0o644),
        dir("opq/", 0o755),
        file("opq/old", b"hidden by the opaque dir", 0o644),
        dir("bin/", 0o755),
        file("bin/suid", b"#!/bin/sh\n", 0o4755),
        dir("tmp/", 0o1777),
        dir("srv/", 0o2775).owner(0, 50),
        dir("dev/", 0o755),
        Entry {
            path: "dev/null".into(),
            kind: Kind::CharDev(1, 3),
            uid: 0,
            gid: 0,
            mode: 0o666,
            xattrs: vec![],
        },
        Entry {
            path: "dev/fifo".into(),
            kind: Kind::Fifo,
            uid: 0,
            gid: 0,
            mode: 0o644,
            xattrs: vec![],
        },
    ];
    let l2 = vec![
        dir("home/", 0o755),
        dir("home/app/", 0o755).owner(1234, 1234),
        file("home/app/secret", b"s3cret", 0o750).owner(1234, 1234),
        dir("root-only/", 0o700),
        file("root-only/file", b"root's", 0o600),
    ];
    let l3 = vec![
        dir("data/", 0o755),
        file("data/.wh.gone", b"", 0o644),
        dir("opq/", 0o755),
        file("opq/.wh..wh..opq", b"", 0o644),
        file("opq/new", b"only me", 0o644),
        // No parent listed: the unpack makes `made/by/unpack/` 0755.
        file("made/by/unpack/f", b"x", 0o644),
    ];
    vec![
        Layer::new(&l1, Comp::Gzip),
        Layer::new(&l2, Comp::Zstd),
        Layer::new(&l3, Comp::None),
    ]
}

/// File entries for host programs and the shared libraries `ldd` names for
/// them, each at the path the program looks for it: enough userland for a
/// sandbox in a test image to run `sh -c` with these programs.
pub fn host_userland(programs: &[&str]) -> Vec<Entry> {
    let mut paths: Vec<String> = Vec::new();
    for program in programs {
        let ldd = std::process::Command::new("ldd")
            .arg(program)
            .output()
            .unwrap();
        for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
            if word.starts_with('/') && !paths.iter().any(|p| p == word) {
                paths.push(word.to_owned());
            }
        }
        paths.push((*program).to_owned());
    }
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .map(|path| {
            let bytes = fs::read(fs::canonicalize(&path).unwrap()).unwrap();
            file(path.trim_start_matches('/').to_owned(), &bytes, 0o755)
        })
        .collect()
}
