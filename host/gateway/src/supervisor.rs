//! The supervisor service, one instance per sandbox, served on that
//! sandbox's own unix socket. The socket decides which sandbox a connection
//! belongs to before any message; the hello must also carry the sandbox's
//! launch secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_server::{Supervisor, SupervisorServer};
use pb::gateway_message::Msg as Out;
use pb::supervisor_message::Msg as In;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::relay::RelayConn;
use crate::runtime::{ComputeRuntime, secret_hash};

/// AF_UNIX paths longer than this do not fit `sockaddr_un` on Linux.
pub const MAX_SOCKET_PATH: usize = 107;

type Frames<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct SupervisorService {
    pub sandbox: SandboxId,
    pub runtime: Arc<ComputeRuntime>,
}

fn msg(m: Out) -> pb::GatewayMessage {
    pb::GatewayMessage { msg: Some(m) }
}

/// Compares without an early exit, so timing does not leak the hash.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[tonic::async_trait]
impl Supervisor for SupervisorService {
    type ConnectSupervisorStream = Frames<pb::GatewayMessage>;
    type RelayStreamStream = Frames<pb::RelayFrame>;

    async fn connect_supervisor(
        &self,
        req: Request<Streaming<pb::SupervisorMessage>>,
    ) -> Result<Response<Self::ConnectSupervisorStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let runtime = self.runtime.clone();
        let sandbox = self.sandbox;
        tokio::spawn(async move {
            let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await
            {
                Ok(Ok(Some(pb::SupervisorMessage {
                    msg: Some(In::Hello(h)),
                }))) => h,
                _ => {
                    let _ = tx
                        .send(Ok(msg(Out::Rejected(pb::SessionRejected {
                            reason: "the first message must be hello".into(),
                        }))))
                        .await;
                    return;
                }
            };
            if let Err(reason) = authenticate(&runtime, sandbox, &hello).await {
                tracing::warn!(sandbox = %sandbox, claimed = hello.sandbox_id, "supervisor rejected: {reason}");
                let _ = tx
                    .send(Ok(msg(Out::Rejected(pb::SessionRejected { reason }))))
                    .await;
                return;
            }
            run_session(runtime, sandbox, hello, inbound, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn relay_stream(
        &self,
        req: Request<Streaming<pb::RelayFrame>>,
    ) -> Result<Response<Self::RelayStreamStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no init frame"))??;
        let Some(pb::RelayFrame {
            frame: Some(pb::relay_frame::Frame::Init(init)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first relay frame must be init",
            ));
        };
        let (tx, rx) = mpsc::channel(64);
        let conn = RelayConn {
            from_sandbox: inbound,
            to_sandbox: tx,
        };
        if !self
            .runtime
            .relays
            .claim(self.sandbox, &init.channel_id, conn)
        {
            return Err(Status::not_found("no such relay is waiting"));
        }
        let out = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(futures::StreamExt::map(out, Ok))))
    }
}

async fn authenticate(
    runtime: &ComputeRuntime,
    sandbox: SandboxId,
    hello: &pb::SupervisorHello,
) -> Result<(), String> {
    if hello.sandbox_id != sandbox.to_string() {
        return Err("this socket belongs to another sandbox".into());
    }
    let stored = runtime
        .store
        .get_secret_hash(sandbox)
        .await
        .map_err(|e| format!("cannot check the secret: {e}"))?;
    match stored {
        Some(h) if same(&h, &secret_hash(&hello.secret)) => Ok(()),
        _ => Err("wrong or missing secret".into()),
    }
}

async fn run_session(
    runtime: Arc<ComputeRuntime>,
    sandbox: SandboxId,
    hello: pb::SupervisorHello,
    mut inbound: Streaming<pb::SupervisorMessage>,
    tx: mpsc::Sender<Result<pb::GatewayMessage, Status>>,
) {
    let interval = runtime.heartbeat;
    let (control_tx, mut control_rx) = mpsc::channel(32);
    let (handle, mut superseded) =
        runtime
            .sessions
            .register(sandbox, control_tx, ssh_host_key(&hello.ssh_host_key));
    let instance_id = hello.instance_id;
    tracing::info!(sandbox = %sandbox, instance_id, session = handle.session_id, "supervisor connected");
    let accepted = Out::Accepted(pb::SessionAccepted {
        session_id: handle.session_id.to_string(),
        heartbeat_interval_ms: interval.as_millis() as u32,
    });
    let mut shutdown = runtime.shutdown_signal();
    if tx.send(Ok(msg(accepted))).await.is_ok() {
        let mut tick = tokio::time::interval(interval);
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(pb::SupervisorMessage { msg: Some(In::RelayFailed(f)) })) => {
                        tracing::warn!(sandbox = %sandbox, channel = f.channel_id, "supervisor could not open a relay: {}", f.message);
                        runtime.relays.cancel(&f.channel_id);
                        last_heard = tokio::time::Instant::now();
                    }
                    Ok(Some(_)) => last_heard = tokio::time::Instant::now(),
                    Ok(None) | Err(_) => break,
                },
                Some(out) = control_rx.recv() => {
                    if tx.send(Ok(out)).await.is_err() { break; }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > interval * 2 {
                        tracing::warn!(sandbox = %sandbox, "supervisor silent for two heartbeats; dropping the session");
                        break;
                    }
                    if tx.send(Ok(msg(Out::Heartbeat(pb::Heartbeat {})))).await.is_err() { break; }
                }
                // The guard `wait_for` yields is not Send: drop it inside.
                _ = async { let _ = superseded.wait_for(|s| *s).await; } => break,
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            }
        }
    }
    runtime
        .sessions
        .remove_if_current(sandbox, handle.session_id);
    tracing::info!(sandbox = %sandbox, session = handle.session_id, "supervisor session ended");
}

/// The host key a hello reported, if it looks like one OpenSSH public-key
/// line; anything else is dropped, so a compromised sandbox cannot inject
/// extra lines into the known_hosts files clients write from it.
fn ssh_host_key(reported: &str) -> String {
    let mut parts = reported.split(' ');
    let well_formed = matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(alg), Some(blob), None)
            if (alg.starts_with("ssh-") || alg.starts_with("ecdsa-")) && !blob.is_empty()
    ) && reported.len() <= MAX_HOST_KEY
        && reported
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-+/=@. ".contains(&b));
    if well_formed {
        reported.to_owned()
    } else {
        String::new()
    }
}

/// Longer than any OpenSSH public key of a sane size (RSA-16384 is ~2.8 KB).
const MAX_HOST_KEY: usize = 4096;

/// One unix-socket server per sandbox.
#[derive(Default)]
pub struct SupervisorListeners {
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

impl SupervisorListeners {
    /// Serves the supervisor service for `sandbox` on `path` (replacing a
    /// stale socket), until [`Self::stop`].
    pub fn start(
        &self,
        runtime: Arc<ComputeRuntime>,
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
        let svc = SupervisorServer::new(SupervisorService { sandbox, runtime });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_public_key_line_is_kept_as_a_host_key() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0b29zdGVyL2tleQ==";
        assert_eq!(ssh_host_key(key), key);
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 AAAA comment",
            "ssh-ed25519 AAAA\nevil-host ssh-ed25519 AAAA",
            "ssh-ed25519 AAAA\tx",
            "rm -rf",
        ] {
            assert_eq!(ssh_host_key(bad), "", "{bad:?}");
        }
        assert_eq!(ssh_host_key(&format!("ssh-rsa {}", "A".repeat(5000))), "");
    }
}
