//! The supervisor gRPC service, one instance per sandbox socket: the
//! control session (hello, heartbeats, relay requests) and relay streams.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_server::Supervisor;
use pb::gateway_message::Msg as Out;
use pb::supervisor_message::Msg as In;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Supervisors;
use super::relay::RelayConn;
use crate::error::{ApiError, to_status};

/// How long a new stream has for its first message.
const FIRST_MESSAGE: Duration = Duration::from_secs(10);

type Frames<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct SupervisorService {
    pub sandbox: SandboxId,
    pub supervisors: Arc<Supervisors>,
}

fn msg(m: Out) -> pb::GatewayMessage {
    pb::GatewayMessage { msg: Some(m) }
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
        let supervisors = self.supervisors.clone();
        let sandbox = self.sandbox;
        tokio::spawn(async move {
            let hello = match tokio::time::timeout(FIRST_MESSAGE, inbound.message()).await {
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
            if let Err(reason) = supervisors.authenticate(sandbox, &hello) {
                tracing::warn!(
                    sandbox = %sandbox,
                    claimed = %crate::error::echo(&hello.sandbox_id),
                    "supervisor rejected: {reason}"
                );
                let _ = tx
                    .send(Ok(msg(Out::Rejected(pb::SessionRejected {
                        reason: reason.to_string(),
                    }))))
                    .await;
                return;
            }
            run_session(supervisors, sandbox, hello, inbound, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn relay_stream(
        &self,
        req: Request<Streaming<pb::RelayFrame>>,
    ) -> Result<Response<Self::RelayStreamStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(FIRST_MESSAGE, inbound.message())
            .await
            .map_err(|_| {
                to_status(ApiError::FirstMessageTimeout {
                    expected: "init",
                    within: FIRST_MESSAGE,
                })
            })?
            .map_err(|s| to_status(s.into()))?;
        let Some(pb::RelayFrame {
            frame: Some(pb::relay_frame::Frame::Init(init)),
        }) = first
        else {
            return Err(to_status(ApiError::FirstMessage {
                rpc: "RelayStream",
                expected: "init",
            }));
        };
        let (tx, rx) = mpsc::channel(64);
        let conn = RelayConn {
            from_sandbox: inbound,
            to_sandbox: tx,
        };
        if !self
            .supervisors
            .relays()
            .claim(self.sandbox, &init.channel_id, conn)
        {
            return Err(to_status(ApiError::UnknownRelay {
                channel: init.channel_id,
            }));
        }
        let out = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(futures::StreamExt::map(out, Ok))))
    }
}

async fn run_session(
    supervisors: Arc<Supervisors>,
    sandbox: SandboxId,
    hello: pb::SupervisorHello,
    mut inbound: Streaming<pb::SupervisorMessage>,
    tx: mpsc::Sender<Result<pb::GatewayMessage, Status>>,
) {
    let interval = supervisors.heartbeat();
    let (control_tx, mut control_rx) = mpsc::channel(32);
    let (handle, mut superseded) =
        supervisors
            .sessions()
            .register(sandbox, control_tx, ssh_host_key(&hello.ssh_host_key));
    let instance_id = crate::error::echo(&hello.instance_id);
    tracing::info!(sandbox = %sandbox, instance_id, session = handle.session_id, "supervisor connected");
    let accepted = Out::Accepted(pb::SessionAccepted {
        session_id: handle.session_id.to_string(),
        heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
    });
    let mut shutdown = supervisors.shutdown_signal();
    if tx.send(Ok(msg(accepted))).await.is_ok() {
        let mut tick = tokio::time::interval(interval);
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(pb::SupervisorMessage { msg: Some(In::RelayFailed(f)) })) => {
                        tracing::warn!(
                            sandbox = %sandbox,
                            channel = %crate::error::echo(&f.channel_id),
                            "supervisor could not open a relay: {}",
                            crate::error::echo(&f.message)
                        );
                        // Only this sandbox's own pending relays can be failed.
                        supervisors.relays().cancel_for(sandbox, &f.channel_id);
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
    supervisors
        .sessions()
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
