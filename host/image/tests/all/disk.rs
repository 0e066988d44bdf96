//! VM disks: the image flattened into ext4 with ids shifted by one, built
//! once, collected with the image.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use openshell_image::disk::ID_SHIFT;
use openshell_image::{ImageStore, testing::fixture::TestImage};

use crate::{is_root, listing, new_store};

/// A disk mounted read-only (as the guest mounts it), unmounted on drop.
/// (The temp dir is held so the mount point outlives the mount.)
struct Mounted(
    PathBuf,
    #[allow(dead_code, reason = "held, not read")] tempfile::TempDir,
);

impl Mounted {
    fn new(disk: &Path) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,ro"])
            .arg(disk)
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount {disk:?}");
        Mounted(dir.path().to_owned(), dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn imported(store: &ImageStore, image: &TestImage, name: &str) -> openshell_image::Image {
    let layout = tempfile::tempdir().unwrap();
    image.write_oci_layout(layout.path(), Some(name));
    store.import(layout.path(), None).unwrap()
}

#[test]
fn the_disk_holds_the_merged_image_with_ids_shifted_by_one() {
    if !is_root() {
        return;
    }
    let (_dir, store) = new_store();
    let image = imported(&store, &TestImage::standard(), "example.test/std:1");
    let disk = store.disk(&image).unwrap();
    let meta = fs::metadata(&disk).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid()),
        (0o444, 0),
        "shared read-only, root's"
    );
    let m = Mounted::new(&disk);
    let got = listing(&m.0);
    let s = |id: u32| id + ID_SHIFT;
    let root = fs::metadata(&m.0).unwrap();
    assert_eq!(
        (root.uid(), root.gid(), root.mode() & 0o7777),
        (s(0), s(0), 0o755),
        "the image's root is image root's"
    );
    let want = |path: &str, needle: &str| {
        let entry = got
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the disk: {got:#?}"));
        assert!(entry.contains(needle), "{path}: {entry} lacks {needle}");
    };
    want("etc/hello", &format!("mode=644 {}:{}", s(0), s(0)));
    want(
        "etc/hello",
        "\"user.test\", [108, 97, 121, 101, 114, 32, 111, 110, 101]",
    );
    want("etc/hello-link", "symlink->hello");
    want("bin/suid", "mode=4755");
    want("tmp", "mode=1777");
    want("srv", &format!("mode=2775 {}:{}", s(0), s(50)));
    want(
        "home/app/secret",
        &format!("mode=750 {}:{}", s(1234), s(1234)),
    );
    want("root-only", &format!("mode=700 {}:{}", s(0), s(0)));
    want("opq/new", "file 7");
    want("made/by/unpack/f", "file 1");
    // Device nodes are skipped at unpack (a sandbox's /dev is its own);
    // mke2fs's lost+found would be a real-root directory in the guest.
    for gone in ["data/gone", "opq/old", "dev/null", "dev/fifo", "lost+found"] {
        assert!(!got.contains_key(gone), "{gone} must not be on the disk");
    }
    assert!(
        !got.keys().any(|k| k.contains(".wh.")),
        "no whiteout file reaches the disk"
    );
    let (a, b) = (
        fs::metadata(m.0.join("etc/hello")).unwrap(),
        fs::metadata(m.0.join("etc/hello-hard")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hard links stay links");
    assert!(
        fs::metadata(m.0.join("opq")).is_ok_and(|d| d.is_dir()),
        "the opaque dir itself stays"
    );
}

#[test]
fn a_disk_is_built_once_and_collected_with_its_image() {
    if !is_root() {
        return;
    }
    let (dir, store) = new_store();
    let image = imported(&store, &TestImage::standard(), "example.test/std:1");
    let first = store.disk(&image).unwrap();
    let ino = fs::metadata(&first).unwrap().ino();
    let again = store.disk(&image).unwrap();
    assert_eq!(
        (again.clone(), fs::metadata(&again).unwrap().ino()),
        (first.clone(), ino),
        "the second call finds the first disk"
    );
    assert_eq!(
        fs::read_dir(dir.path().join("images/tmp")).unwrap().count(),
        0,
        "no staging left behind"
    );
    let kept: HashSet<_> = [image.digest.clone()].into();
    store.remove("example.test/std:1").unwrap();
    store.gc(&kept).unwrap();
    assert!(first.is_file(), "a digest a sandbox holds keeps its disk");
    store.gc(&HashSet::new()).unwrap();
    assert!(!first.exists(), "collected with the image");
}
