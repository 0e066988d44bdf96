use std::os::unix::fs::symlink;

use super::*;

fn limits() -> Limits {
    Limits::default()
}

fn host() -> Unpack {
    Unpack {
        overwrite: false,
        limits: limits(),
        keep_special_bits: false,
    }
}

fn packed(src: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    pack(src, &mut out, limits(), &mut |_| {}).unwrap();
    out
}

/// Every path under `root` with its kind, mode, contents or link target.
fn tree(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    walk(root, &mut |name, path, meta| {
        let what = if meta.file_type().is_symlink() {
            format!("link {}", fs::read_link(path).unwrap().display())
        } else if meta.is_dir() {
            format!("dir {:o}", meta.permissions().mode() & 0o7777)
        } else {
            let bytes = fs::read(path).unwrap();
            format!("file {:o} {bytes:?}", meta.permissions().mode() & 0o7777)
        };
        out.push((
            name.strip_prefix(tree_name(root).unwrap())
                .unwrap()
                .to_path_buf(),
            what,
        ));
        Ok(())
    })
    .unwrap();
    out
}

fn sample(dir: &Path) -> PathBuf {
    let src = dir.join("proj");
    fs::create_dir_all(src.join("sub/deep")).unwrap();
    fs::write(src.join("a.txt"), b"hello").unwrap();
    fs::write(src.join("sub/deep/big"), vec![7u8; 300_000]).unwrap();
    fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("/etc", src.join("etc-link")).unwrap();
    symlink("a.txt", src.join("rel-link")).unwrap();
    fs::create_dir(src.join("locked")).unwrap();
    fs::write(src.join("locked/f"), b"x").unwrap();
    fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o555)).unwrap();
    src
}

#[test]
fn a_tree_comes_back_identical_with_links_kept_as_links() {
    let d = tempfile::tempdir().unwrap();
    let src = sample(d.path());
    let bytes = packed(&src);
    let dst = d.path().join("copy");
    let s = unpack(bytes.as_slice(), &dst, host(), &mut |_| {}).unwrap();
    assert_eq!(tree(&src), tree(&dst));
    assert_eq!(
        fs::read_link(dst.join("etc-link")).unwrap(),
        Path::new("/etc")
    );
    assert_eq!((s.entries, s.bytes), (10, 5 + 300_000 + 18 + 1));
}

#[test]
fn into_an_existing_directory_the_tree_keeps_its_name_as_cp_does() {
    let d = tempfile::tempdir().unwrap();
    let src = sample(d.path());
    let into = d.path().join("existing");
    fs::create_dir(&into).unwrap();
    unpack(packed(&src).as_slice(), &into, host(), &mut |_| {}).unwrap();
    assert_eq!(tree(&src), tree(&into.join("proj")));
    // A single file likewise.
    unpack(
        packed(&src.join("a.txt")).as_slice(),
        &into,
        host(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(fs::read(into.join("a.txt")).unwrap(), b"hello");
}

#[test]
fn existing_files_are_replaced_only_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("f");
    fs::write(&src, b"new").unwrap();
    let dst = d.path().join("g");
    fs::write(&dst, b"old").unwrap();
    let e = unpack(packed(&src).as_slice(), &dst, host(), &mut |_| {}).unwrap_err();
    assert!(matches!(e, TransferError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("--overwrite"), "{e}");
    assert_eq!(fs::read(&dst).unwrap(), b"old");
    let how = Unpack {
        overwrite: true,
        ..host()
    };
    unpack(packed(&src).as_slice(), &dst, how, &mut |_| {}).unwrap();
    assert_eq!(fs::read(&dst).unwrap(), b"new");
    // Merging into a directory: a clash is refused without --overwrite.
    let into = d.path().join("into");
    fs::create_dir(&into).unwrap();
    fs::write(into.join("f"), b"old").unwrap();
    let e = unpack(packed(&src).as_slice(), &into, host(), &mut |_| {}).unwrap_err();
    assert!(matches!(e, TransferError::Exists { .. }), "{e}");
    assert_eq!(e.exit_code(), 3);
}

#[test]
fn limits_on_entries_and_bytes_are_enforced_on_both_sides() {
    let d = tempfile::tempdir().unwrap();
    let src = sample(d.path());
    let few = Limits {
        max_bytes: u64::MAX,
        max_entries: 3,
    };
    let small = Limits {
        max_bytes: 1000,
        max_entries: u64::MAX,
    };
    for (l, want) in [(few, 4), (small, 4)] {
        let e = pack(&src, Vec::new(), l, &mut |_| {}).unwrap_err();
        assert_eq!(e.exit_code(), want, "{e}");
        let how = Unpack {
            limits: l,
            ..host()
        };
        let e = unpack(
            packed(&src).as_slice(),
            &d.path().join("x"),
            how,
            &mut |_| {},
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), want, "{e}");
        assert!(
            !d.path().join("x").exists(),
            "a failed transfer leaves nothing"
        );
    }
    assert_eq!(measure(&src, limits()).unwrap().bytes, 300_024);
}

/// An archive with raw names, as a hostile sandbox could send one.
fn hostile(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link) in entries {
        let mut h = tar::Header::new_old();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o4755);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        let data: &[u8] = if *kind == tar::EntryType::Regular {
            b"pwned"
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_archives_write_nothing_outside_the_destination() {
    use tar::EntryType as T;
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"safe").unwrap();
    let o = outside.display().to_string();
    let cases: Vec<Vec<(&str, T, &str)>> = vec![
        vec![
            ("t", T::Directory, ""),
            ("t/../../outside/victim", T::Regular, ""),
        ],
        vec![("/abs", T::Regular, "")],
        vec![
            ("t", T::Directory, ""),
            ("t/l", T::Symlink, &o),
            ("t/l/victim", T::Regular, ""),
        ],
        vec![
            ("t", T::Directory, ""),
            ("t/l", T::Symlink, &o),
            ("t/l/new", T::Regular, ""),
        ],
        vec![("t", T::Directory, ""), ("t/h", T::Link, "/etc/passwd")],
        vec![("t", T::Directory, ""), ("t/dev", T::Char, "")],
        vec![("t", T::Directory, ""), ("u", T::Regular, "")],
    ];
    for (i, case) in cases.iter().enumerate() {
        let into = d.path().join(format!("into{i}"));
        fs::create_dir(&into).unwrap();
        for how in [
            host(),
            Unpack {
                overwrite: true,
                ..host()
            },
        ] {
            let e = unpack(hostile(case).as_slice(), &into, how, &mut |_| {});
            let dst = d.path().join(format!("new{i}"));
            let e2 = unpack(hostile(case).as_slice(), &dst, how, &mut |_| {});
            assert!(e2.is_err(), "case {i} as a new tree: {case:?}");
            if i < 6 {
                assert!(e.is_err(), "case {i}: {case:?}");
            }
        }
        assert_eq!(
            fs::read(outside.join("victim")).unwrap(),
            b"safe",
            "case {i}"
        );
        assert!(!outside.join("new").exists(), "case {i}");
    }
}

#[test]
fn set_uid_bits_from_an_archive_are_dropped_on_the_host() {
    let d = tempfile::tempdir().unwrap();
    let archive = hostile(&[
        ("t", tar::EntryType::Directory, ""),
        ("t/suid", tar::EntryType::Regular, ""),
    ]);
    let dst = d.path().join("t");
    unpack(archive.as_slice(), &dst, host(), &mut |_| {}).unwrap();
    let mode = fs::metadata(dst.join("suid")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    let dst = d.path().join("kept");
    let keep = Unpack {
        keep_special_bits: true,
        ..host()
    };
    unpack(archive.as_slice(), &dst, keep, &mut |_| {}).unwrap();
    let mode = fs::metadata(dst.join("suid")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o4755);
}

#[test]
fn a_path_without_a_name_is_refused() {
    let e = pack(Path::new("/"), Vec::new(), limits(), &mut |_| {}).unwrap_err();
    assert_eq!(e.exit_code(), 5, "{e}");
    let e = pack(
        Path::new("/nonexistent/x"),
        Vec::new(),
        limits(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, TransferError::NotFound { .. }), "{e}");
}
