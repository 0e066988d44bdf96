//! Imports: the three source formats agree, what lands on disk is right,
//! overlayfs stacks it, and every refusal leaves the store as it was.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use openshell_image::{Digest, ImageError, ImageStore, MAX_IMAGE_ID};

use crate::fixture::{self, Comp, Entry, Kind, Layer, TestImage, dir, file, hardlink, symlink};
use crate::{is_root, listing, new_store, xattrs};

const NAME: &str = "example.test/team/app:v1";

fn layout(image: &TestImage, ref_name: Option<&str>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    image.write_oci_layout(d.path(), ref_name);
    d
}

#[test]
fn layout_archive_and_docker_save_give_the_same_layers_and_config() {
    if !is_root() {
        return;
    }
    let image = TestImage::standard();
    let src = layout(&image, Some(NAME));
    let (_d1, from_layout) = new_store();
    let started = Instant::now();
    let a = from_layout.import(src.path(), None).unwrap();
    eprintln!(
        "import of the 3-layer test image from a layout: {:?}",
        started.elapsed()
    );

    assert_eq!(a.names, vec![NAME.to_string()]);
    assert_eq!(a.digest.to_string(), image.digest());
    let diff_ids: Vec<String> = a.layers.iter().map(|d| d.to_string()).collect();
    assert_eq!(diff_ids, image.diff_ids());
    assert_eq!(
        a.size,
        image
            .layers
            .iter()
            .map(|l| l.blob.len() as u64)
            .sum::<u64>()
    );
    assert_eq!(a.config.user.as_deref(), Some("1234"));
    assert_eq!(a.config.working_dir.as_deref(), Some("/home/app"));
    assert_eq!(
        a.config.env,
        vec![
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string()
            ),
            ("GREETING".to_string(), "hello world".to_string())
        ]
    );
    assert_eq!(a.config.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(a.config.cmd, vec!["echo hi"]);
    check_standard_layers(&from_layout.layer_dirs(&a));

    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("image.oci.tar");
    image.write_oci_archive(&archive, Some(NAME));
    let (_d2, from_archive) = new_store();
    let b = from_archive.import(&archive, None).unwrap();
    assert_eq!(b, a, "an OCI archive is the layout it holds");
    let zst = tmp.path().join("image.oci.tar.zst");
    fs::write(&zst, Comp::Zstd.apply(&fs::read(&archive).unwrap())).unwrap();
    let (_d2z, from_zst) = new_store();
    assert_eq!(
        from_zst.import(&zst, None).unwrap(),
        a,
        "a compressed archive too"
    );

    let save = tmp.path().join("image.docker.tar");
    image.write_docker_save(&save, &["example.test/team/app:v1", "app:latest"]);
    let (_d3, from_save) = new_store();
    let started = Instant::now();
    let c = from_save.import(&save, None).unwrap();
    eprintln!(
        "import of the 3-layer test image from a docker save: {:?}",
        started.elapsed()
    );
    assert_eq!(c.layers, a.layers);
    assert_eq!(c.config, a.config);
    assert_eq!(
        c.names,
        vec!["docker.io/library/app:latest".to_string(), NAME.to_string()]
    );
    assert_ne!(
        c.digest, a.digest,
        "docker save layers are uncompressed: another manifest"
    );
    check_standard_layers(&from_save.layer_dirs(&c));
    for (x, y) in from_layout
        .layer_dirs(&a)
        .iter()
        .zip(from_save.layer_dirs(&c))
    {
        assert_eq!(listing(x), listing(&y), "{x:?} and {y:?} differ");
    }

    // The synthesized manifest is deterministic: the same tarball again is
    // the same image.
    let (_d4, again) = new_store();
    assert_eq!(again.import(&save, None).unwrap().digest, c.digest);
}

fn meta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn check_standard_layers(dirs: &[std::path::PathBuf]) {
    assert_eq!(dirs.len(), 3);
    let (l1, l2, l3) = (&dirs[0], &dirs[1], &dirs[2]);

    let hello = meta(&l1.join("etc/hello"));
    assert_eq!(fs::read(l1.join("etc/hello")).unwrap(), b"hello\n");
    assert_eq!(
        (hello.mode() & 0o7777, hello.uid(), hello.gid()),
        (0o644, 0, 0)
    );
    assert_eq!(hello.mtime(), fixture::MTIME as i64);
    assert_eq!(
        meta(&l1.join("etc")).mtime(),
        fixture::MTIME as i64,
        "directory mtimes are set last"
    );
    assert_eq!(
        xattrs(&l1.join("etc/hello")),
        vec![("user.test".to_string(), b"layer one".to_vec())]
    );
    assert_eq!(
        fs::read_link(l1.join("etc/hello-link")).unwrap(),
        Path::new("hello")
    );
    assert_eq!(
        meta(&l1.join("etc/hello-hard")).ino(),
        hello.ino(),
        "a hard link shares the inode"
    );
    assert_eq!(meta(&l1.join("bin/suid")).mode() & 0o7777, 0o4755);
    assert_eq!(meta(&l1.join("tmp")).mode() & 0o7777, 0o1777);
    let srv = meta(&l1.join("srv"));
    assert_eq!((srv.mode() & 0o7777, srv.gid()), (0o2775, 50));
    assert!(
        !l1.join("dev/null").exists() && !l1.join("dev/fifo").exists(),
        "devices and fifos are skipped"
    );
    assert_eq!(fs::read(l1.join("data/gone")).unwrap(), b"soon gone");

    let secret = meta(&l2.join("home/app/secret"));
    assert_eq!(
        (secret.mode() & 0o7777, secret.uid(), secret.gid()),
        (0o750, 1234, 1234)
    );
    let app = meta(&l2.join("home/app"));
    assert_eq!((app.uid(), app.gid()), (1234, 1234));
    let root_only = meta(&l2.join("root-only"));
    assert_eq!((root_only.mode() & 0o7777, root_only.uid()), (0o700, 0));
    assert_eq!(fs::read(l2.join("root-only/file")).unwrap(), b"root's");

    let gone = meta(&l3.join("data/gone"));
    assert!(
        gone.file_type().is_char_device(),
        "a whiteout is a character device"
    );
    assert_eq!(gone.rdev(), 0, "device 0:0");
    assert!(!l3.join("data/.wh.gone").exists());
    assert_eq!(
        xattrs(&l3.join("opq")),
        vec![("user.overlay.opaque".to_string(), b"y".to_vec())]
    );
    assert!(!l3.join("opq/.wh..wh..opq").exists());
    assert_eq!(fs::read(l3.join("opq/new")).unwrap(), b"only me");
    for d in ["made", "made/by", "made/by/unpack"] {
        let m = meta(&l3.join(d));
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o755, 0, 0), "{d}");
    }
    assert_eq!(meta(l3).mode() & 0o7777, 0o755, "a layer root is 0755");
}

/// Unmounts on drop, so a failed assertion leaves no mount behind.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn the_layers_stack_as_overlayfs_lower_layers() {
    if !is_root() {
        return;
    }
    let src = layout(&TestImage::standard(), Some(NAME));
    let (dir, store) = new_store();
    let image = store.import(src.path(), None).unwrap();
    let mut lower: Vec<String> = store
        .layer_dirs(&image)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    lower.reverse(); // overlayfs lists the top layer first
    let merged = dir.path().join("merged");
    fs::create_dir(&merged).unwrap();
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={},userxattr", lower.join(":")))
        .arg(&merged)
        .status()
        .unwrap();
    if !crate::can_run("an overlayfs mount with userxattr", status.success()) {
        return;
    }
    let _mounted = Mounted(&merged);
    assert!(
        !merged.join("data/gone").exists(),
        "the whiteout hides the lower file"
    );
    assert!(merged.join("data").is_dir());
    assert!(
        !merged.join("opq/old").exists(),
        "the opaque dir hides the lower dir's files"
    );
    assert_eq!(fs::read(merged.join("opq/new")).unwrap(), b"only me");
    assert_eq!(fs::read(merged.join("etc/hello")).unwrap(), b"hello\n");
    let secret = meta(&merged.join("home/app/secret"));
    assert_eq!((secret.mode() & 0o7777, secret.uid()), (0o750, 1234));
}

/// Imports a one-layer image and expects `check` of the error, with the
/// store (already holding the standard image) unchanged and /etc/passwd too.
fn refused(entries: Vec<Entry>, check: impl Fn(&ImageError) -> bool) {
    let (_d, store) = new_store();
    store
        .import(layout(&TestImage::standard(), Some(NAME)).path(), None)
        .unwrap();
    let root = _d.path().join("images");
    let before = listing(&root);
    let passwd = fs::read("/etc/passwd").unwrap();
    let hostile = TestImage::new(vec![Layer::new(&entries, Comp::Gzip)]);
    let err = store
        .import(
            layout(&hostile, Some("example.test/hostile:1")).path(),
            None,
        )
        .unwrap_err();
    assert!(check(&err), "unexpected error: {err:?}");
    assert_eq!(listing(&root), before, "a refused import changed the store");
    assert_eq!(fs::read("/etc/passwd").unwrap(), passwd);
    assert!(store.resolve("example.test/hostile:1").unwrap().is_none());
}

fn escapes(entry: &'static str) -> impl Fn(&ImageError) -> bool {
    move |e| matches!(e, ImageError::LayerEscapes { entry: got, .. } if got == entry)
}

#[test]
fn a_dotdot_entry_is_refused() {
    if !is_root() {
        return;
    }
    refused(
        vec![file("ok", b"1", 0o644), file("../x", b"x", 0o644)],
        escapes("../x"),
    );
    refused(vec![file("a/../../x", b"x", 0o644)], escapes("a/../../x"));
}

#[test]
fn an_entry_through_a_symlink_out_of_the_layer_is_refused() {
    if !is_root() {
        return;
    }
    refused(
        vec![
            symlink("link", "/etc"),
            file("link/passwd", b"root::0:0::/:/bin/sh\n", 0o644),
        ],
        escapes("link/passwd"),
    );
    refused(
        vec![
            dir("a/", 0o755),
            symlink("a/up", "../.."),
            file("a/up/x", b"x", 0o644),
        ],
        escapes("a/up/x"),
    );
}

#[test]
fn a_hard_link_out_of_the_layer_is_refused() {
    if !is_root() {
        return;
    }
    refused(vec![hardlink("evil", "/etc/passwd")], escapes("evil"));
    refused(vec![hardlink("evil", "etc/passwd")], escapes("evil"));
    refused(
        vec![symlink("up", ".."), hardlink("evil", "up/x")],
        escapes("evil"),
    );
}

#[test]
fn a_symlink_inside_the_layer_may_be_followed() {
    if !is_root() {
        return;
    }
    let layer = vec![
        dir("usr/", 0o755),
        dir("usr/lib/", 0o755),
        symlink("lib", "usr/lib"),
        file("lib/libc.so", b"elf", 0o755),
        // A symlink may point anywhere; only going through it is checked.
        symlink("etc-link", "/etc/passwd"),
    ];
    let (_d, store) = new_store();
    let image = store
        .import(
            layout(
                &TestImage::new(vec![Layer::new(&layer, Comp::None)]),
                Some(NAME),
            )
            .path(),
            None,
        )
        .unwrap();
    let l = &store.layer_dirs(&image)[0];
    assert_eq!(fs::read(l.join("usr/lib/libc.so")).unwrap(), b"elf");
    assert_eq!(
        fs::read_link(l.join("etc-link")).unwrap(),
        Path::new("/etc/passwd")
    );
}

#[test]
fn ids_over_the_maximum_are_refused() {
    if !is_root() {
        return;
    }
    refused(
        vec![file("f", b"x", 0o644).owner(70000, 0)],
        |e| matches!(e, ImageError::UidOutOfRange { entry, kind: "uid", id: 70000, max, .. } if entry == "f" && *max == MAX_IMAGE_ID),
    );
    refused(vec![dir("d/", 0o755).owner(0, 65535)], |e| {
        matches!(
            e,
            ImageError::UidOutOfRange {
                kind: "gid",
                id: 65535,
                ..
            }
        )
    });
    // The maximum itself is fine.
    let (_d, store) = new_store();
    let layer = vec![file("f", b"x", 0o644).owner(65534, 65534)];
    store
        .import(
            layout(
                &TestImage::new(vec![Layer::new(&layer, Comp::None)]),
                Some(NAME),
            )
            .path(),
            None,
        )
        .unwrap();
}

#[test]
fn a_corrupt_blob_is_a_digest_mismatch_and_changes_nothing() {
    if !is_root() {
        return;
    }
    let image = TestImage::standard();
    let src = layout(&image, Some(NAME));
    let blob = fixture::sha(&image.layers[1].blob);
    let path = src.path().join("blobs/sha256").join(fixture::hex_of(&blob));
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let (_d, store) = new_store();
    let root = _d.path().join("images");
    let before = listing(&root);
    match store.import(src.path(), None) {
        Err(ImageError::DigestMismatch { what, expected, .. }) => {
            assert_eq!(expected.to_string(), blob);
            assert!(what.contains("layer 2"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&root), before);
}

#[test]
fn a_layer_not_matching_its_diff_id_is_refused() {
    if !is_root() {
        return;
    }
    let layers = vec![Layer::new(&[file("a", b"1", 0o644)], Comp::Zstd)];
    let wrong = vec![fixture::sha(b"not this layer")];
    let image = TestImage::with_config(layers, fixture::config_json(&wrong, "amd64"));
    let (_d, store) = new_store();
    let root = _d.path().join("images");
    let before = listing(&root);
    match store.import(layout(&image, Some(NAME)).path(), None) {
        Err(ImageError::DigestMismatch { what, expected, .. }) => {
            assert_eq!(expected.to_string(), wrong[0]);
            assert!(what.contains("uncompressed"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&root), before);
}

#[test]
fn a_bare_tag_annotation_needs_a_name_and_a_given_name_wins() {
    if !is_root() {
        return;
    }
    let image = TestImage::standard();
    let (_d, store) = new_store();
    let bare = layout(&image, Some("v1"));
    assert!(matches!(
        store.import(bare.path(), None),
        Err(ImageError::NameRequired { .. })
    ));
    let unnamed = layout(&image, None);
    assert!(matches!(
        store.import(unnamed.path(), None),
        Err(ImageError::NameRequired { .. })
    ));
    let got = store.import(bare.path(), Some("team/app:v1")).unwrap();
    assert_eq!(got.names, vec!["docker.io/team/app:v1".to_string()]);
    let named = layout(&image, Some(NAME));
    let got = store.import(named.path(), Some("other:2")).unwrap();
    assert_eq!(
        got.names,
        vec![
            "docker.io/library/other:2".to_string(),
            "docker.io/team/app:v1".to_string()
        ]
    );
    assert!(
        store.resolve(NAME).unwrap().is_none(),
        "the given name wins over the annotation"
    );
    assert!(matches!(
        store.import(named.path(), Some("Bad Name")),
        Err(ImageError::InvalidReference { .. })
    ));
}

#[test]
fn a_source_that_points_outside_itself_is_refused() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("save");
    fs::create_dir(&d).unwrap();
    fs::write(
        d.join("manifest.json"),
        br#"[{"Config":"../../../../../../etc/passwd","RepoTags":["x:1"],"Layers":[]}]"#,
    )
    .unwrap();
    let (_s, store) = new_store();
    match store.import(&d, None) {
        Err(ImageError::InvalidImage { reason, .. }) => {
            assert!(reason.contains("outside"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn two_imports_of_one_image_at_once_both_succeed() {
    if !is_root() {
        return;
    }
    let src = layout(&TestImage::standard(), Some(NAME));
    let (_d, store) = new_store();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| store.import(src.path(), None));
        let b = s.spawn(|| store.import(src.path(), None));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    assert_eq!(a.digest, b.digest);
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(
        fs::read_dir(_d.path().join("images/tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn a_full_disk_is_disk_full_and_changes_nothing() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    if !crate::can_run("a tmpfs mount", ok) {
        return;
    }
    let _mounted = Mounted(&mnt);
    let store = ImageStore::open(&mnt.join("images")).unwrap();
    let before = listing(&mnt.join("images"));
    // Incompressible bytes: 3 MiB does not fit in 2 MiB, compressed or not.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let big: Vec<u8> = (0..3 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let entry = Entry {
        path: "big".into(),
        kind: Kind::File(big),
        uid: 0,
        gid: 0,
        mode: 0o644,
        xattrs: vec![],
    };
    let src = layout(
        &TestImage::new(vec![Layer::new(&[entry], Comp::Gzip)]),
        Some(NAME),
    );
    match store.import(src.path(), None) {
        Err(ImageError::DiskFull { path, .. }) => assert!(path.starts_with(&mnt), "{path:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(&mnt.join("images")), before);
    drop(store);
}

#[test]
fn resolve_finds_names_short_names_and_digests() {
    if !is_root() {
        return;
    }
    let (_d, store) = new_store();
    let image = store
        .import(
            layout(&TestImage::standard(), Some(NAME)).path(),
            Some("app:v1"),
        )
        .unwrap();
    let d = image.digest.to_string();
    for q in [
        "app:v1",
        "docker.io/library/app:v1",
        &d,
        &format!("app@{d}"),
        &format!("elsewhere/x@{d}"),
    ] {
        assert_eq!(store.resolve(q).unwrap().as_ref(), Some(&image), "{q}");
    }
    assert_eq!(store.get(&image.digest).unwrap(), image);
    assert!(store.resolve("app:v2").unwrap().is_none());
    let absent = Digest::parse(&fixture::sha(b"absent")).unwrap();
    assert!(store.resolve(&absent.to_string()).unwrap().is_none());
    assert!(matches!(
        store.get(&absent),
        Err(ImageError::NotFound { .. })
    ));
    assert!(matches!(
        store.resolve("UPPER"),
        Err(ImageError::InvalidReference { .. })
    ));
}
