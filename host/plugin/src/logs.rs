//! Bounded logs for host children (issue 14, item 6). A child's output
//! (a launcher and its supervisor, gvproxy, QEMU and the guest's serial
//! console) goes into a pipe, not a file the child appends to; a task of
//! the gateway's copies it into the log, rotating to `<log>.1` once the log
//! would pass [`MAX_LOG`] bytes. So a guest that floods its console, or a
//! supervisor that floods its stderr, costs at most two logs' worth of
//! disk, and the child never holds a descriptor on the log itself.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;

/// The most one log holds before it is rotated (one previous log is kept).
pub const MAX_LOG: u64 = 4 << 20;

/// A pipe whose write end is for the child (blocking, close-on-exec until
/// handed over as stdio or passed explicitly) and whose read end a task
/// copies into `path` under `max`. The task ends when every write end has
/// closed; its handle is for tests.
pub(crate) fn pump(path: &Path, max: u64) -> io::Result<(OwnedFd, tokio::task::JoinHandle<()>)> {
    let mut log = Log::open(path.to_owned(), max)?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // Only our end is non-blocking: a child writing to a full pipe waits.
    let flags = nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Err(e) = log.write(&buf[..n]) {
                        tracing::warn!("cannot write {}: {e}", log.path.display());
                        return;
                    }
                }
            }
        }
    });
    Ok((write, task))
}

struct Log {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max: u64,
}

impl Log {
    fn open(path: PathBuf, max: u64) -> io::Result<Log> {
        let file = open_private(&path)?;
        let size = file.metadata()?.len();
        Ok(Log {
            path,
            file,
            size,
            max,
        })
    }

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        use std::io::Write;
        if self.size > 0 && self.size + chunk.len() as u64 > self.max {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, &old)?;
            self.file = open_private(&self.path)?;
            self.size = 0;
        }
        // A chunk is at most the pipe buffer, far below any sane `max`;
        // cut it anyway so a log never passes its bound.
        let take = chunk
            .len()
            .min(usize::try_from(self.max).unwrap_or(usize::MAX));
        self.file.write_all(&chunk[..take])?;
        self.size += take as u64;
        Ok(())
    }
}

/// Append-only, 0600, never through a symlink in its place.
fn open_private(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that writes 20 MB to its stdout leaves at most two logs of
    /// the bound on disk, the newest holding the end of what it wrote.
    // Two workers: the child blocks on a full pipe until the pump reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flooding_child_leaves_at_most_two_bounded_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let max = 1 << 20;
        let (write, task) = pump(&path, max).unwrap();
        let status = tokio::process::Command::new("sh")
            .args(["-c", "head -c 20000000 /dev/zero; printf THE-END"])
            .stdout(std::process::Stdio::from(write))
            .status()
            .await
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(std::time::Duration::from_secs(30), task)
            .await
            .expect("the pump ends when the child's end closes")
            .unwrap();
        let now = std::fs::read(&path).unwrap();
        let old = std::fs::metadata(dir.path().join("console.log.1"))
            .unwrap()
            .len();
        assert!(
            now.len() as u64 <= max && old <= max,
            "{} and {old} bytes",
            now.len()
        );
        assert!(
            now.ends_with(b"THE-END"),
            "the newest log has the newest output"
        );
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 2, "only the log and one rotated log");
    }
}
