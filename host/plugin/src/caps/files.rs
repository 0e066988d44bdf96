//! `openshell:compute/files`: file operations inside the sandbox's state
//! directory, through a `cap-std` directory handle. `cap-std` resolves every
//! path beneath the handle, so `..`, absolute paths and symlinks that lead
//! outside fail with `PermissionDenied` instead of escaping.

use std::io;
use std::sync::Arc;

use crate::bindings::openshell::compute::files::Host;
use crate::bindings::types::CapError;
use crate::caps::{CallState, CapabilityError, limits};

/// Largest file a plugin may write or read in one call.
pub const MAX_FILE: usize = 16 << 20;

fn check_path(path: &str) -> Result<(), CapError> {
    limits::check_path_len("path", path)?;
    if path.is_empty() || path.contains('\0') {
        return Err(CapError::Invalid(
            "path must be a non-empty relative path".into(),
        ));
    }
    if path.starts_with('/') {
        return Err(CapError::AccessDenied(format!(
            "{path:?} is absolute; paths are relative to the sandbox's state directory"
        )));
    }
    Ok(())
}

fn map_io(path: &str, e: io::Error) -> CapError {
    match e.kind() {
        io::ErrorKind::PermissionDenied => CapError::AccessDenied(format!(
            "{path:?} leads outside the sandbox's state directory"
        )),
        io::ErrorKind::NotFound => CapError::Invalid(format!("{path:?} does not exist")),
        io::ErrorKind::FileTooLarge => CapError::Invalid(format!("{path:?}: {e}")),
        _ => CapError::Failed(format!("{path:?}: {e}")),
    }
}

impl CallState {
    /// Runs blocking file I/O off the async workers, under the I/O deadline.
    /// Returns a future that does not borrow `self` (the store data is not
    /// `Sync`, so it must not be held across an await).
    fn with_dir<T: Send + 'static>(
        &self,
        path: &str,
        op: impl FnOnce(&cap_std::fs::Dir) -> io::Result<T> + Send + 'static,
    ) -> impl Future<Output = Result<T, CapError>> + Send + 'static {
        let prepared = check_path(path).and_then(|_| self.dir());
        let (timeout, path) = (self.services.io_timeout, path.to_owned());
        async move {
            let dir: Arc<cap_std::fs::Dir> = prepared?;
            let task = tokio::task::spawn_blocking(move || op(&dir));
            run_blocking(timeout, &path, task).await
        }
    }
}

async fn run_blocking<T>(
    timeout: std::time::Duration,
    path: &str,
    task: tokio::task::JoinHandle<io::Result<T>>,
) -> Result<T, CapError> {
    {
        match tokio::time::timeout(timeout, task).await {
            Err(_) => Err(CapError::Timeout(format!("file operation on {path:?}"))),
            Ok(Err(join)) => Err(CapError::Failed(format!("file operation panicked: {join}"))),
            Ok(Ok(r)) => r.map_err(|e| map_io(path, e)),
        }
    }
}

impl Host for CallState {
    async fn write_file(&mut self, path: String, contents: Vec<u8>) -> Result<(), CapabilityError> {
        if contents.len() > MAX_FILE {
            return Err(CapError::Invalid(format!(
                "{} bytes is over the {MAX_FILE}-byte file limit",
                contents.len()
            ))
            .into());
        }
        let p = path.clone();
        Ok(self
            .with_dir(&path, move |d| d.write(&p, &contents))
            .await?)
    }

    async fn read_file(&mut self, path: String) -> Result<Vec<u8>, CapabilityError> {
        let p = path.clone();
        let read = self.with_dir(&path, move |d| {
            let len = d.metadata(&p)?.len();
            if len > MAX_FILE as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!("{len} bytes is over the {MAX_FILE}-byte file limit"),
                ));
            }
            d.read(&p)
        });
        Ok(read.await?)
    }

    async fn create_dir(&mut self, path: String) -> Result<(), CapabilityError> {
        let p = path.clone();
        Ok(self.with_dir(&path, move |d| d.create_dir_all(&p)).await?)
    }

    async fn remove(&mut self, path: String) -> Result<(), CapabilityError> {
        let p = path.clone();
        let removed = self.with_dir(&path, move |d| {
            if d.symlink_metadata(&p)?.is_dir() {
                d.remove_dir_all(&p)
            } else {
                d.remove_file(&p)
            }
        });
        Ok(removed.await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_and_empty_paths_are_refused_before_any_io() {
        assert!(matches!(
            check_path("/etc/passwd"),
            Err(CapError::AccessDenied(_))
        ));
        assert!(matches!(check_path(""), Err(CapError::Invalid(_))));
        assert!(matches!(check_path("a\0b"), Err(CapError::Invalid(_))));
        assert!(check_path("a/b.txt").is_ok());
    }

    #[test]
    fn a_path_over_the_length_limit_is_invalid() {
        let long = "a/".repeat(limits::MAX_PATH);
        assert!(matches!(check_path(&long), Err(CapError::Invalid(m)) if m.contains("1024")));
    }
}
