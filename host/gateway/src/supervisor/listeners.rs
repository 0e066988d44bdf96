//! One unix-socket server per sandbox. The socket decides which sandbox a
//! connection belongs to before any message is read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_core::SandboxId;
use openshell_proto::v1::supervisor_server::SupervisorServer;
use tokio::sync::watch;

use super::Supervisors;
use super::service::SupervisorService;

/// AF_UNIX paths longer than this do not fit `sockaddr_un` on Linux.
pub const MAX_SOCKET_PATH: usize = 107;

/// One unix-socket server per sandbox.
#[derive(Default)]
pub struct Listeners {
    running: Mutex<HashMap<SandboxId, watch::Sender<bool>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "the supervisor socket path {path} is {len} bytes; unix sockets allow {MAX_SOCKET_PATH}: use a shorter --state-dir"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("cannot listen on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Listeners {
    /// Serves the supervisor service for `sandbox` on `path` (replacing a
    /// stale socket), until [`Self::stop`].
    pub fn start(
        &self,
        supervisors: Arc<Supervisors>,
        sandbox: SandboxId,
        path: &Path,
    ) -> Result<(), ListenError> {
        use std::os::unix::fs::PermissionsExt;
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(ListenError::PathTooLong {
                path: path.to_owned(),
                len,
            });
        }
        let io = |source| ListenError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
            // The sandbox's unprivileged root must reach the socket.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
        // The secret, not the file mode, authenticates the supervisor.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;

        let (stop_tx, mut stop_rx) = watch::channel(false);
        if let Some(old) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox, stop_tx)
        {
            let _ = old.send(true);
        }
        let svc = SupervisorServer::new(SupervisorService {
            sandbox,
            supervisors,
        });
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(15)))
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    },
                )
                .await;
            if let Err(e) = r {
                tracing::warn!(sandbox = %sandbox, "supervisor listener failed: {e}");
            }
        });
        Ok(())
    }

    pub fn stop(&self, sandbox: SandboxId) {
        if let Some(tx) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sandbox)
        {
            let _ = tx.send(true);
        }
    }

    pub fn stop_all(&self) {
        let all: Vec<_> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, tx) in all {
            let _ = tx.send(true);
        }
    }
}
