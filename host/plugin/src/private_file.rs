//! The one way the host writes a file that may hold a secret (launch
//! configs) or must never be seen half-written (components, compiled
//! code): a fresh temporary file beside the target, created 0600, then
//! renamed over it. Nothing that was there before (a stale `.tmp`, a
//! world-readable old file) lends the result its mode.

use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` atomically, readable and writable by the
/// gateway's user only.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates with O_EXCL and mode 0600 under a random name.
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_preexisting_world_readable_tmp_or_target_does_not_make_the_result_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("launch.json");
        for stale in [
            path.with_extension("json.tmp"),
            path.with_extension("tmp"),
            path.clone(),
        ] {
            std::fs::write(&stale, "old").unwrap();
            std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        write_private(&path, b"{\"secret\":1}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"secret\":1}");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_write_leaves_no_temporary_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join("a"), b"1").unwrap();
        write_private(&dir.path().join("a"), b"2").unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a"]);
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"2");
    }
}
