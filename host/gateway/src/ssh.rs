//! SshTunnel, ForwardTcp and GetSshHostKey: an SSH connection to a sandbox is a relay
//! like exec's, whose frames are raw SSH bytes. The SSH server is the
//! sandbox's supervisor; it has no port, and the caller of this RPC is who
//! was authenticated (the in-sandbox server accepts any SSH login).

use std::sync::Arc;
use std::time::Duration;

use openshell_proto::v1 as pb;
use pb::ssh_tunnel_frame::Frame as T;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::error::{ApiError, to_status};
use crate::runtime::ComputeRuntime;
use crate::streams::first_message;

/// How long a client has to name the sandbox.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

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
    Ok(crate::tunnel::pipe(
        &runtime,
        conn,
        inbound,
        "the SSH connection ended",
    ))
}

/// ForwardTcp: one TCP connection to a port on the sandbox's loopback,
/// dialled by its supervisor.
pub async fn forward(
    runtime: Arc<ComputeRuntime>,
    mut inbound: Streaming<pb::ForwardTcpFrame>,
) -> Result<ReceiverStream<Result<pb::ForwardTcpFrame, Status>>, Status> {
    use pb::forward_tcp_frame::Frame as F;
    let first = first_message(&mut inbound, "ForwardTcp", "start", FIRST_FRAME_TIMEOUT).await?;
    let pb::ForwardTcpFrame {
        frame: Some(F::Start(start)),
    } = first
    else {
        return Err(to_status(ApiError::FirstMessage {
            rpc: "ForwardTcp",
            expected: "start",
        }));
    };
    if !(1..=65535).contains(&start.port) {
        return Err(to_status(ApiError::BadField(format!(
            "port {} is not a TCP port: give 1-65535",
            start.port
        ))));
    }
    let sb = runtime.ready(&start.sandbox).await.map_err(to_status)?;
    let conn = runtime
        .supervisors()
        .open_relay(
            sb.id,
            sb.name.as_str(),
            pb::relay_open::Purpose::Forward(pb::TcpForward { port: start.port }),
        )
        .await
        .map_err(to_status)?;
    Ok(crate::tunnel::pipe(
        &runtime,
        conn,
        inbound,
        "the forwarded connection ended",
    ))
}

/// The host key the sandbox's live supervisor reported.
pub async fn host_key(runtime: &ComputeRuntime, sandbox: &str) -> Result<String, ApiError> {
    let sb = runtime.find(sandbox).await?;
    let name = sb.name.to_string();
    match runtime.supervisors().sessions().get(sb.id) {
        Some(s) if !s.ssh_host_key.is_empty() => Ok(s.ssh_host_key),
        Some(_) => Err(ApiError::NoSshServer { name }),
        None if sb.status.phase == openshell_core::Phase::Stopped => {
            Err(ApiError::Stopped { name })
        }
        None => Err(ApiError::NoSshHostKey { name }),
    }
}
