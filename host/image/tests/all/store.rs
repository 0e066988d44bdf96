//! Names, removal and gc.

use std::collections::HashSet;
use std::fs;

use openshell_image::{Digest, GcReport, ImageError};

use crate::fixture::{self, Comp, Layer, TestImage, file, standard_layers};
use crate::{is_root, new_store};

fn count(dir: &std::path::Path) -> usize {
    fs::read_dir(dir).unwrap().count()
}

/// The standard image, and a second one sharing its bottom layer.
fn two_images() -> (TestImage, TestImage) {
    let a = TestImage::standard();
    let mut layers = standard_layers();
    layers.truncate(1);
    layers.push(Layer::new(&[file("only-in-b", b"b", 0o644)], Comp::Gzip));
    (a, TestImage::new(layers))
}

#[test]
fn gc_removes_what_no_name_or_kept_digest_reaches() {
    if !is_root() {
        return;
    }
    let (a, b) = two_images();
    let (dir, store) = new_store();
    let (la, lb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    a.write_oci_layout(la.path(), Some("example.test/a:1"));
    b.write_oci_layout(lb.path(), Some("example.test/b:1"));
    let ia = store.import(la.path(), None).unwrap();
    let ib = store.import(lb.path(), None).unwrap();
    let blobs = dir.path().join("images/blobs/sha256");
    let layers = dir.path().join("images/layers/sha256");
    // a: 3 layers + config + manifest; b: 1 new layer + config + manifest.
    assert_eq!((count(&blobs), count(&layers)), (8, 4));
    assert_eq!(
        store.gc(&HashSet::new()).unwrap(),
        GcReport::default(),
        "named images are kept"
    );

    let removed = store.remove("example.test/a:1").unwrap();
    assert_eq!(removed.digest, ia.digest);
    assert_eq!(store.list().unwrap(), vec![ib.clone()]);
    // Digest-only until a gc: a sandbox using it still finds it.
    assert_eq!(store.get(&ia.digest).unwrap().names, Vec::<String>::new());
    let kept: HashSet<Digest> = [ia.digest.clone()].into();
    let report = store.gc(&kept).unwrap();
    assert_eq!(
        (report.blobs_removed, report.layers_removed),
        (0, 0),
        "a kept digest keeps its image"
    );
    assert!(store.get(&ia.digest).is_ok());

    let report = store.gc(&HashSet::new()).unwrap();
    // a's own: layers 2 and 3 (blobs and directories), config, manifest.
    assert_eq!((report.blobs_removed, report.layers_removed), (4, 2));
    let blob_bytes =
        (a.layers[1].blob.len() + a.layers[2].blob.len() + a.config.len() + a.manifest.len())
            as u64;
    assert!(
        report.reclaimed_bytes > blob_bytes,
        "blobs and layer files: {report:?}"
    );
    assert!(matches!(
        store.get(&ia.digest),
        Err(ImageError::NotFound { .. })
    ));
    assert_eq!(
        store.get(&ib.digest).unwrap(),
        ib,
        "the shared bottom layer stays for b"
    );
    for d in store.layer_dirs(&ib) {
        assert!(d.is_dir());
    }

    store.remove(&ib.digest.to_string()).unwrap();
    assert!(store.list().unwrap().is_empty());
    store.gc(&HashSet::new()).unwrap();
    assert_eq!(
        (count(&blobs), count(&layers)),
        (0, 0),
        "remove then gc empties the store"
    );
    assert_eq!(count(&dir.path().join("images/tmp")), 0);
}

#[test]
fn removing_what_is_not_there_is_not_found() {
    if !is_root() {
        return;
    }
    let (_d, store) = new_store();
    assert!(matches!(
        store.remove("nothing:here"),
        Err(ImageError::NotFound { .. })
    ));
    assert!(matches!(
        store.remove(&fixture::sha(b"x")),
        Err(ImageError::NotFound { .. })
    ));
}

#[test]
fn a_name_moves_to_the_image_imported_last() {
    if !is_root() {
        return;
    }
    let (a, b) = two_images();
    let (_d, store) = new_store();
    let (la, lb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    a.write_oci_layout(la.path(), None);
    b.write_oci_layout(lb.path(), None);
    store.import(la.path(), Some("app:1")).unwrap();
    let ib = store.import(lb.path(), Some("app:1")).unwrap();
    assert_eq!(store.resolve("app:1").unwrap().unwrap().digest, ib.digest);
    assert_eq!(
        store.list().unwrap().len(),
        1,
        "the first image has no name left"
    );
}
