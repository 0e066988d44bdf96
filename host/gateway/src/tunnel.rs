//! Byte tunnels: a client's stream of data frames paired with a relay
//! whose frames are raw bytes both ways (SSH connections, forwarded TCP
//! connections). Either side ends it by closing its half; the client's
//! stream ends OK once the sandbox side has closed.

use std::sync::Arc;

use openshell_proto::v1 as pb;
use prost::bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::error::{ApiError, to_status};
use crate::runtime::ComputeRuntime;
use crate::supervisor::relay::{Activity, RelayConn, SandboxFrames};

/// How a client's frame type carries bytes.
pub trait DataFrame: Send + 'static {
    /// The bytes a frame carries; `None` for frames that carry none.
    fn into_data(self) -> Option<Bytes>;
    fn from_data(b: Bytes) -> Self;
}

fn data(bytes: Bytes) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::Data(bytes)),
    }
}

/// Pumps `inbound` into the relay and the relay into the returned stream.
/// `what` names the tunnel in the error a client gets if the supervisor
/// goes away mid-way.
pub fn pipe<F: DataFrame>(
    runtime: &Arc<ComputeRuntime>,
    conn: RelayConn,
    mut inbound: Streaming<F>,
    what: &'static str,
) -> ReceiverStream<Result<F, Status>> {
    let (out_tx, out_rx) = mpsc::channel(64);
    let to_sandbox = conn.to_sandbox;
    let activity = Activity::new();
    let activity_in = activity.clone();
    // Ends the client → sandbox pump when the sandbox side is done.
    let (done_tx, mut done_rx) = oneshot::channel::<()>();
    // Client → sandbox. When the client closes its stream (or the sandbox
    // side ends), dropping `to_sandbox` closes the relay towards the
    // supervisor, which closes its end.
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                m = inbound.message() => m,
                _ = &mut done_rx => return,
            };
            match m {
                Ok(Some(f)) => {
                    let Some(bytes) = f.into_data() else { continue };
                    activity_in.touch();
                    if to_sandbox.send(data(bytes)).await.is_err() {
                        return;
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
    });
    // Sandbox → client, until the supervisor closes its half.
    let idle = runtime.supervisors().relays().limits.idle_timeout;
    let mut frames = SandboxFrames::new(conn.from_sandbox, activity, idle);
    tokio::spawn(async move {
        let _done = done_tx;
        loop {
            let Some(frame) = frames.next(&out_tx).await else {
                return;
            };
            match frame {
                Ok(Some(pb::RelayFrame {
                    frame: Some(pb::relay_frame::Frame::Data(bytes)),
                })) => {
                    if out_tx.send(Ok(F::from_data(bytes))).await.is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(s) => {
                    let gone = ApiError::SupervisorGone {
                        what,
                        detail: s.message().to_owned(),
                    };
                    let _ = out_tx.send(Err(to_status(gone))).await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(out_rx)
}

impl DataFrame for pb::SshTunnelFrame {
    fn into_data(self) -> Option<Bytes> {
        match self.frame {
            Some(pb::ssh_tunnel_frame::Frame::Data(b)) => Some(b),
            _ => None,
        }
    }
    fn from_data(b: Bytes) -> Self {
        Self {
            frame: Some(pb::ssh_tunnel_frame::Frame::Data(b)),
        }
    }
}

impl DataFrame for pb::ForwardTcpFrame {
    fn into_data(self) -> Option<Bytes> {
        match self.frame {
            Some(pb::forward_tcp_frame::Frame::Data(b)) => Some(b),
            _ => None,
        }
    }
    fn from_data(b: Bytes) -> Self {
        Self {
            frame: Some(pb::forward_tcp_frame::Frame::Data(b)),
        }
    }
}
