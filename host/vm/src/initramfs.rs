//! The per-sandbox initramfs segment.
//!
//! The kernel unpacks concatenated cpio archives in order, later files
//! replacing earlier ones, so a sandbox's initrd is the shared base
//! (`runtime/rootfs/base.cpio`) followed by a small `newc` archive with the
//! files the driver staged. The environment (with the launch secret) is not
//! in it: it travels over the identity channel ([`crate::identity`]), in
//! the format [`env_file`] makes, and the guest's /init exports each line
//! verbatim.

use crate::VmError;

/// One file in the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative path, no `..`.
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// The environment file: one `KEY=VALUE` per line. Keys must be shell
/// names; values may hold anything but a newline or NUL.
pub fn env_file(env: &[(String, String)]) -> Result<Vec<u8>, VmError> {
    let mut out = Vec::new();
    for (k, v) in env {
        let key_ok = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(VmError::Invalid(format!(
                "environment key {k:?} is not a valid name"
            )));
        }
        if v.contains(['\n', '\r', '\0']) {
            return Err(VmError::Invalid(format!(
                "environment value of {k} contains a newline or NUL, which cannot reach the guest"
            )));
        }
        out.extend_from_slice(format!("{k}={v}\n").as_bytes());
    }
    Ok(out)
}

/// A relative path without `..`, root, or control characters.
pub fn check_path(path: &str) -> Result<(), VmError> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && !path.contains(['\0', '\n'])
        && path.split('/').all(|c| !c.is_empty() && c != "..");
    if ok {
        Ok(())
    } else {
        Err(VmError::Invalid(format!(
            "{path:?} must be a relative path inside the guest's root"
        )))
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, name: &str) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        if mode & 0o040000 != 0 { 2 } else { 1 },
        0, // mtime
        size as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A `newc` archive holding `entries` and every parent directory they need.
pub fn archive(entries: &[Entry]) -> Result<Vec<u8>, VmError> {
    let mut out = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    let mut ino = 1;
    for e in entries {
        check_path(&e.path)?;
        let parts: Vec<&str> = e.path.split('/').collect();
        for i in 1..parts.len() {
            let d = parts[..i].join("/");
            if !dirs.contains(&d) {
                header(&mut out, ino, 0o040755, 0, &d);
                ino += 1;
                dirs.push(d);
            }
        }
        header(
            &mut out,
            ino,
            0o100000 | (e.mode & 0o7777),
            e.contents.len(),
            &e.path,
        );
        ino += 1;
        out.extend_from_slice(&e.contents);
        pad(&mut out);
    }
    header(&mut out, 0, 0, 0, "TRAILER!!!");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_env as env;

    #[test]
    fn the_env_file_is_one_line_per_variable_with_values_verbatim() {
        let f = env_file(&env(&[
            ("A", "x y 'z'"),
            ("OPENSHELL_ENDPOINT", "http://192.168.127.254:1"),
        ]))
        .unwrap();
        assert_eq!(
            f,
            b"A=x y 'z'\nOPENSHELL_ENDPOINT=http://192.168.127.254:1\n"
        );
    }

    #[test]
    fn newlines_and_bad_keys_cannot_reach_the_guest() {
        assert!(env_file(&env(&[("A", "x\nB=y")])).is_err());
        assert!(env_file(&env(&[("A B", "x")])).is_err());
        assert!(env_file(&env(&[("1A", "x")])).is_err());
    }

    #[test]
    fn paths_must_stay_inside_the_root() {
        for bad in ["", "/etc/x", "a/../b", "..", "a//b"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path("etc/openshell/env").is_ok());
    }

    #[test]
    fn an_archive_has_parents_aligned_entries_and_a_trailer() {
        let a = archive(&[Entry {
            path: "etc/openshell/env".into(),
            mode: 0o600,
            contents: b"A=1\n".to_vec(),
        }])
        .unwrap();
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        let etc = text.find("etc\0").unwrap();
        let dir = text.find("etc/openshell\0").unwrap();
        let file = text.find("etc/openshell/env\0").unwrap();
        assert!(etc < dir && dir < file);
        assert!(text.contains("A=1\n"));
        assert!(a.starts_with(b"070701"));
        // The trailer is the last header: 110 header bytes and an 11-byte
        // name (NUL included) padded to 124, so exactly three pad bytes.
        let trailer = &a[a.len() - 124..];
        assert!(trailer.starts_with(b"070701"), "{trailer:?}");
        assert_eq!(&trailer[94..102], b"0000000b", "namesize of TRAILER!!!");
        assert!(a.ends_with(b"TRAILER!!!\0\0\0\0"));
    }
}
