//! SshTunnel and GetSshHostKey: an SSH connection to a sandbox is a relay
//! like exec's, whose frames are raw SSH bytes. The SSH server is the
//! sandbox's supervisor; it has no port, and the caller of this RPC is who
//! was authenticated (the in-sandbox server accepts any SSH login).

use std::sync::Arc;
use std::time::Duration;

use openshell_proto::v1 as pb;
use pb::ssh_tunnel_frame::Frame as T;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::error::{ApiError, to_status};
use crate::runtime::ComputeRuntime;
use crate::streams::first_message;
use crate::supervisor::relay::{Activity, Next, SandboxFrames};

/// How long a client has to name the sandbox.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

fn data(bytes: prost::bytes::Bytes) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::Data(bytes)),
    }
}

pub async fn tunnel(
    runtime: Arc<ComputeRuntime>,
    mut inbound: Streaming<pb::SshTunnelFrame>,
) -> Result<ReceiverStream<Result<pb::SshTunnelFrame, Status>>, Status> {
    let first = first_message(&mut inbound, "SshTunnel", "sandbox", FIRST_FRAME_TIMEOUT).await?;
    let pb::SshTunnelFrame {
        frame: Some(T::Sandbox(sandbox)),
    } = first
    else {
        return Err(to_status(ApiError::FirstMessage {
            rpc: "SshTunnel",
            expected: "sandbox",
        }));
    };
    let sb = runtime.ready(&sandbox).await.map_err(to_status)?;
    let conn = runtime
        .supervisors()
        .open_relay(
            sb.id,
            sb.name.as_str(),
            pb::relay_open::Purpose::Ssh(pb::SshTunnel {}),
        )
        .await
        .map_err(to_status)?;

    let (out_tx, out_rx) = mpsc::channel(64);
    let to_sandbox = conn.to_sandbox;
    let activity = Activity::new();
    let activity_in = activity.clone();
    // Ends the client → sandbox pump when the sandbox side is done.
    let (done_tx, mut done_rx) = oneshot::channel::<()>();
    // Client → sandbox. When the client closes its stream (or the sandbox
    // side ends), dropping `to_sandbox` closes the relay towards the
    // supervisor, which ends the SSH session.
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                m = inbound.message() => m,
                _ = &mut done_rx => return,
            };
            match m {
                Ok(Some(pb::SshTunnelFrame {
                    frame: Some(T::Data(bytes)),
                })) => {
                    activity_in.touch();
                    if to_sandbox.send(data(bytes)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    });
    // Sandbox → client, until the supervisor closes its half (the SSH
    // session is over): then the client's stream ends OK.
    let idle = runtime.supervisors().relays().limits.idle_timeout;
    let mut frames = SandboxFrames::new(conn.from_sandbox, activity, idle);
    tokio::spawn(async move {
        let _done = done_tx;
        loop {
            let frame = match frames.next(&out_tx).await {
                Next::Frame(f) => f,
                Next::ClientGone => return,
                Next::Idle => {
                    let _ = out_tx
                        .send(Err(to_status(ApiError::RelayIdle { idle })))
                        .await;
                    return;
                }
            };
            match frame {
                Ok(Some(pb::RelayFrame {
                    frame: Some(pb::relay_frame::Frame::Data(bytes)),
                })) => {
                    let out = pb::SshTunnelFrame {
                        frame: Some(T::Data(bytes)),
                    };
                    if out_tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(s) => {
                    let gone = ApiError::SupervisorGone {
                        what: "the SSH connection ended",
                        detail: s.message().to_owned(),
                    };
                    let _ = out_tx.send(Err(to_status(gone))).await;
                    return;
                }
            }
        }
    });
    Ok(ReceiverStream::new(out_rx))
}

/// The host key the sandbox's live supervisor reported.
pub async fn host_key(runtime: &ComputeRuntime, sandbox: &str) -> Result<String, ApiError> {
    let sb = runtime.find(sandbox).await?;
    let name = sb.name.to_string();
    match runtime.supervisors().sessions().get(sb.id) {
        Some(s) if !s.ssh_host_key.is_empty() => Ok(s.ssh_host_key),
        Some(_) => Err(ApiError::NoSshServer { name }),
        None => Err(ApiError::NoSshHostKey { name }),
    }
}
