//! The supervisor gRPC service, one instance per sandbox socket: the
//! control session (hello, heartbeats, relay requests) and relay streams.
//!
//! Each socket has a [`SocketBudget`]: control and relay streams draw on
//! separate quotas (a flood of relay streams cannot keep the session from
//! reconnecting), a stream over its quota is refused at once, and every
//! complaint about the socket's peer goes through one log throttle.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_server::Supervisor;
use pb::gateway_message::Msg as Out;
use pb::supervisor_message::Msg as In;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::relay::RelayConn;
use super::{LogThrottle, SocketLimits, Supervisors};
use crate::error::{ApiError, echo, to_status};
use crate::streams::first_message;

type Frames<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What one socket's peer may hold at once, and its log allowance.
#[derive(Debug)]
pub struct SocketBudget {
    pub limits: SocketLimits,
    control: Arc<Semaphore>,
    relays: Arc<Semaphore>,
    pub(super) egress: Arc<Semaphore>,
    pub log: LogThrottle,
}

impl SocketBudget {
    pub fn new(limits: SocketLimits) -> Self {
        Self {
            limits,
            control: Arc::new(Semaphore::new(limits.control_streams)),
            relays: Arc::new(Semaphore::new(limits.relay_streams)),
            egress: Arc::new(Semaphore::new(limits.egress_streams)),
            log: LogThrottle::default(),
        }
    }

    fn take(&self, quota: &Arc<Semaphore>, what: &str) -> Result<OwnedSemaphorePermit, Status> {
        quota.clone().try_acquire_owned().map_err(|_| {
            to_status(ApiError::Busy {
                message: format!("this sandbox already has its limit of {what} streams open"),
                retry_after: std::time::Duration::from_secs(1),
            })
        })
    }
}

pub struct SupervisorService {
    pub sandbox: SandboxId,
    pub supervisors: Arc<Supervisors>,
    pub budget: Arc<SocketBudget>,
}

impl SupervisorService {
    /// The egress handler, for the live session's supervisor only: it
    /// proves the launch secret on its control stream and is told the
    /// session's egress token there. Anyone else who reaches the socket
    /// (any process of a VM guest reaches its forwarder) is refused.
    fn egress_handler(&self, token: &str) -> Option<&Arc<dyn super::EgressHandler>> {
        self.supervisors.egress_for(self.sandbox, token)
    }
}

fn msg(m: Out) -> pb::GatewayMessage {
    pb::GatewayMessage { msg: Some(m) }
}

/// Ends when the inner stream does; holds its quota permit (and whatever
/// else counts the stream) until dropped.
fn holding<T: Send + 'static, G: Send + 'static>(rx: mpsc::Receiver<T>, guard: G) -> Frames<T> {
    Box::pin(futures::StreamExt::map(ReceiverStream::new(rx), move |m| {
        let _ = &guard;
        Ok(m)
    }))
}

#[tonic::async_trait]
impl Supervisor for SupervisorService {
    type ConnectSupervisorStream = Frames<pb::GatewayMessage>;
    type RelayStreamStream = Frames<pb::RelayFrame>;

    async fn connect_supervisor(
        &self,
        req: Request<Streaming<pb::SupervisorMessage>>,
    ) -> Result<Response<Self::ConnectSupervisorStream>, Status> {
        let permit = self.budget.take(&self.budget.control, "control")?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let supervisors = self.supervisors.clone();
        let sandbox = self.sandbox;
        let budget = self.budget.clone();
        tokio::spawn(async move {
            let within = budget.limits.first_message;
            let first = tokio::time::timeout(within, inbound.message()).await;
            let hello = match first {
                Ok(Ok(Some(pb::SupervisorMessage {
                    msg: Some(In::Hello(h)),
                }))) => h,
                other => {
                    let why = match other {
                        Err(_) => format!("no hello within {} s", within.as_secs()),
                        Ok(Err(s)) => format!("unreadable hello: {}", echo(s.message())),
                        Ok(Ok(_)) => "the first message was not a hello".to_owned(),
                    };
                    if let Some(dropped) = budget.log.allow() {
                        tracing::warn!(sandbox = %sandbox, dropped, "supervisor rejected: {why}");
                    }
                    reject(
                        &tx,
                        "the first message must be a hello (within the size limit)",
                    )
                    .await;
                    return;
                }
            };
            if let Err(reason) = supervisors.authenticate(sandbox, &hello) {
                if let Some(dropped) = budget.log.allow() {
                    tracing::warn!(
                        sandbox = %sandbox,
                        claimed = %echo(&hello.sandbox_id),
                        dropped,
                        "supervisor rejected: {reason}"
                    );
                }
                reject(&tx, &reason.to_string()).await;
                return;
            }
            run_session(supervisors, &budget, sandbox, hello, inbound, tx).await;
            drop(permit);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn relay_stream(
        &self,
        req: Request<Streaming<pb::RelayFrame>>,
    ) -> Result<Response<Self::RelayStreamStream>, Status> {
        let within = self.budget.limits.first_message;
        let mut inbound = req.into_inner();
        let first = first_message(&mut inbound, "RelayStream", "init", within).await?;
        let pb::RelayFrame {
            frame: Some(pb::relay_frame::Frame::Init(init)),
        } = first
        else {
            return Err(to_status(ApiError::FirstMessage {
                rpc: "RelayStream",
                expected: "init",
            }));
        };
        if let Some(open) = init.egress {
            let permit = self.budget.take(&self.budget.egress, "egress")?;
            check_egress_open(&open)?;
            // Few frames in flight per connection: 256 of them, stalled,
            // hold 4 × 64 KiB each here (see egress::splice::CHUNK).
            let (tx, rx) = mpsc::channel(4);
            let conn = RelayConn {
                from_sandbox: inbound,
                to_sandbox: tx,
            };
            // Only a supervisor that proved the launch secret speaks for
            // its sandbox's code.
            let Some(handler) = self.egress_handler(&open.token) else {
                return Err(to_status(ApiError::NoEgressSession));
            };
            handler.open(self.sandbox, open, conn);
            return Ok(Response::new(holding(rx, permit)));
        }
        let (tx, rx) = mpsc::channel(64);
        let conn = RelayConn {
            from_sandbox: inbound,
            to_sandbox: tx,
        };
        let permit = self.budget.take(&self.budget.relays, "relay")?;
        if !self
            .supervisors
            .relays()
            .claim(self.sandbox, &init.channel_id, conn)
        {
            return Err(to_status(ApiError::UnknownRelay {
                channel: init.channel_id,
            }));
        }
        // Open until the relay's stream ends: what idle timeouts count.
        let open = self.supervisors.open_relays().opened(self.sandbox);
        Ok(Response::new(holding(rx, (permit, open))))
    }

    async fn lookup_egress(
        &self,
        req: Request<pb::EgressLookup>,
    ) -> Result<Response<pb::EgressLookupResult>, Status> {
        // Lookups share the egress quota: a flood of them holds no more
        // than a flood of connections.
        let _permit = self.budget.take(&self.budget.egress, "egress")?;
        let lookup = req.into_inner();
        check_egress_lookup(&lookup)?;
        let Some(handler) = self.egress_handler(&lookup.token) else {
            return Err(to_status(ApiError::NoEgressSession));
        };
        Ok(Response::new(handler.lookup(self.sandbox, lookup).await))
    }
}

/// Bounds what a supervisor reports of a connection before anything keeps
/// it (a VM guest's supervisor is only as trusted as the guest).
pub(super) fn check_egress_open(open: &pb::EgressOpen) -> Result<(), Status> {
    if open.host.is_empty() || open.host.len() > 255 {
        return bad_egress("egress open", "host must be 1 to 255 bytes");
    }
    check_binaries("egress open", &open.binaries)?;
    if open.via.len() > 16 {
        return bad_egress("egress open", "via is longer than 16 bytes");
    }
    Ok(())
}

fn check_egress_lookup(lookup: &pb::EgressLookup) -> Result<(), Status> {
    if lookup.name.is_empty() || lookup.name.len() > 253 {
        return bad_egress("egress lookup", "name must be 1 to 253 bytes");
    }
    check_binaries("egress lookup", &lookup.binaries)
}

fn bad_egress(what: &str, why: &str) -> Result<(), Status> {
    Err(to_status(ApiError::BadField(format!("{what}: {why}"))))
}

fn check_binaries(what: &str, binaries: &[pb::EgressBinary]) -> Result<(), Status> {
    let bad = |why: &str| bad_egress(what, why);
    if binaries.len() > 16 {
        return bad("at most 16 binaries");
    }
    for b in binaries {
        if b.path.len() > 4096 {
            return bad("a binary path is longer than 4096 bytes");
        }
        if !(b.sha256.is_empty()
            || (b.sha256.len() == 64 && b.sha256.bytes().all(|c| c.is_ascii_hexdigit())))
        {
            return bad("a binary's sha256 is not 64 hex digits");
        }
    }
    Ok(())
}

async fn reject(tx: &mpsc::Sender<Result<pb::GatewayMessage, Status>>, reason: &str) {
    let rejected = Out::Rejected(pb::SessionRejected {
        reason: reason.to_owned(),
    });
    let _ = tx.send(Ok(msg(rejected))).await;
}

async fn run_session(
    supervisors: Arc<Supervisors>,
    budget: &SocketBudget,
    sandbox: SandboxId,
    hello: pb::SupervisorHello,
    mut inbound: Streaming<pb::SupervisorMessage>,
    tx: mpsc::Sender<Result<pb::GatewayMessage, Status>>,
) {
    let interval = supervisors.heartbeat();
    let (control_tx, mut control_rx) = mpsc::channel(32);
    let (handle, mut superseded) = supervisors.sessions().register(
        sandbox,
        control_tx,
        ssh_host_key(&hello.ssh_host_key),
        hello.instance_id.chars().take(64).collect(),
    );
    let instance_id = echo(&hello.instance_id);
    tracing::info!(sandbox = %sandbox, instance_id = %instance_id, session = handle.session_id, "supervisor connected");
    let accepted = Out::Accepted(pb::SessionAccepted {
        session_id: handle.session_id.to_string(),
        heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        egress_token: handle.egress_token.to_string(),
    });
    let mut shutdown = supervisors.shutdown_signal();
    if tx.send(Ok(msg(accepted))).await.is_ok() {
        let mut tick = tokio::time::interval(interval);
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(pb::SupervisorMessage { msg: Some(In::RelayFailed(f)) })) => {
                        if let Some(dropped) = budget.log.allow() {
                            tracing::warn!(
                                sandbox = %sandbox,
                                channel = %echo(&f.channel_id),
                                dropped,
                                "supervisor could not open a relay: {}",
                                echo(&f.message)
                            );
                        }
                        // Only this sandbox's own pending relays can be failed.
                        supervisors.relays().cancel_for(sandbox, &f.channel_id, &f.message);
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
pub(crate) const MAX_HOST_KEY: usize = 4096;

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
