//! The gateway's state dir is private: root's and, below a sandbox's own
//! dir, that sandbox's. [`secure_state_dir`] runs once at gateway start,
//! before anything is created: the umask then makes every file the gateway
//! or a host child (SQLite's `-wal` and `-shm`, QEMU's console, gvproxy's
//! log) creates 0600 and every directory 0700, and whatever must be shared
//! says so with an explicit mode (the run dir, 0711; the supervisor socket,
//! handed to the sandbox's root). Sandbox code does not inherit it: the
//! launcher's init sets 022 before it runs anything.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{Mode, umask};

use super::create_private_dir;

/// Files of the default SQLite database; SQLite gives `-wal`, `-shm` and
/// `-journal` the main file's mode.
const DB_FILES: [&str; 4] = [
    "openshell.db",
    "openshell.db-wal",
    "openshell.db-shm",
    "openshell.db-journal",
];

/// Sets this process's umask to 077, then creates `path` (0700) or
/// tightens an existing one, and makes an existing database 0600 (an older
/// gateway left them 0755 and 0644). Refuses a directory that is not the
/// gateway user's own or is sticky (`/tmp`): tightening it would break
/// others, and leaving it open would expose the state.
pub fn secure_state_dir(path: &Path) -> io::Result<()> {
    umask(Mode::from_bits_truncate(0o077));
    if let Ok(meta) = std::fs::metadata(path)
        && (meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o1000 != 0)
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is shared (sticky) or not owned by the gateway's user: give the gateway a directory of its own",
                path.display()
            ),
        ));
    }
    create_private_dir(path)?;
    for name in DB_FILES {
        tighten_file(&path.join(name))?;
    }
    Ok(())
}

/// Makes an existing regular file 0600, never through a symlink.
fn tighten_file(path: &Path) -> io::Result<()> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    let meta = file.metadata()?;
    if meta.is_file() && meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The umask is the process's: tests that set it take turns.
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn an_open_state_dir_and_database_from_an_older_gateway_become_private() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["openshell.db", "openshell.db-wal"] {
            std::fs::write(state.join(f), "rows").unwrap();
            std::fs::set_permissions(state.join(f), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        let _turn = UMASK.lock().unwrap_or_else(|p| p.into_inner());
        let old = umask(Mode::from_bits_truncate(0o022));
        secure_state_dir(&state).unwrap();
        let now = umask(old);
        assert_eq!(now.bits() & 0o777, 0o077, "the umask was not set");
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("openshell.db")), 0o600);
        assert_eq!(mode(&state.join("openshell.db-wal")), 0o600);
    }

    #[test]
    fn a_sticky_shared_directory_is_refused_and_left_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let _turn = UMASK.lock().unwrap_or_else(|p| p.into_inner());
        let old = umask(Mode::from_bits_truncate(0o022));
        let refused = secure_state_dir(&shared);
        umask(old);
        assert!(refused.is_err());
        assert_eq!(mode(&shared), 0o1777);
    }

    #[test]
    fn a_symlinked_database_file_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = tmp.path().join("openshell.db");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(tighten_file(&link).is_err());
        assert_eq!(mode(&target), 0o644);
    }
}
