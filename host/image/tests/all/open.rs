//! Opening a store: its permissions, one owner, and crash leftovers.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use openshell_image::{ImageError, ImageStore};

use crate::is_root;

#[test]
fn open_makes_a_private_root_owned_layout() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state/images");
    let store = ImageStore::open(&root).unwrap();
    let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
    for sub in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
        assert!(root.join(sub).is_dir(), "{sub}");
    }
    assert!(matches!(
        ImageStore::open(&root),
        Err(ImageError::StoreBusy { .. })
    ));
    drop(store);
    ImageStore::open(&root).unwrap();
}

#[test]
fn a_store_others_can_read_is_refused() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    match ImageStore::open(&root) {
        Err(ImageError::InsecureStore { mode, uid, .. }) => assert_eq!((mode, uid), (0o755, 0)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn open_removes_what_a_crash_left_in_tmp() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    drop(ImageStore::open(&root).unwrap());
    let leftover = root.join("tmp/stage-1-0/layers/x");
    fs::create_dir_all(&leftover).unwrap();
    fs::write(leftover.join("f"), b"partial").unwrap();
    fs::set_permissions(&leftover, fs::Permissions::from_mode(0o500)).unwrap();
    fs::write(root.join("tmp/record-1-1"), b"{").unwrap();
    let _store = ImageStore::open(&root).unwrap();
    assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
}
