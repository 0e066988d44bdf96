//! The image store's integration tests, on real files and a real registry
//! (Debian's `docker-registry`, which `scripts/setup.sh` installs).
//!
//! The store needs root (it chowns and makes device nodes). Without root, or
//! without `docker-registry` for the pull tests, a test says so loudly on
//! stderr and passes, except under CI (`CI` set), where it fails.

mod disk;
mod import;
mod open;
mod pull;
mod store;

pub use openshell_image::testing::{can_run, fixture, registry};

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use openshell_image::ImageStore;

pub fn is_root() -> bool {
    can_run("root", rustix::process::geteuid().is_root())
}

/// A fresh store in a temp dir (the dir kept alive by the returned guard).
pub fn new_store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("images")).unwrap();
    (dir, store)
}

/// Everything under `root` that a change would show: type, mode, owner,
/// size, content digest, link target, device number, xattrs; not times
/// (directory mtimes move when `tmp/` is used and emptied).
pub fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let m = fs::symlink_metadata(&path).unwrap();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        out.insert(rel, describe(&path, &m));
        if m.is_dir() {
            walk(root, &path, out);
        }
    }
}

pub fn describe(path: &Path, m: &fs::Metadata) -> String {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir".to_string()
    } else if ft.is_symlink() {
        format!("symlink->{}", fs::read_link(path).unwrap().display())
    } else if ft.is_char_device() {
        format!("chardev {}", m.rdev())
    } else if ft.is_file() {
        format!(
            "file {} {}",
            m.len(),
            fixture::sha(&fs::read(path).unwrap())
        )
    } else {
        "other".to_string()
    };
    format!(
        "{kind} mode={:o} {}:{} xattrs={:?}",
        m.mode() & 0o7777,
        m.uid(),
        m.gid(),
        xattrs(path)
    )
}

pub fn xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(n) => n,
        Err(_) => return vec![],
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut value = vec![0u8; 4096];
        if let Ok(len) = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..]) {
            out.push((name, value[..len].to_vec()));
        }
    }
    out.sort();
    out
}
