//! The control stream: hello, heartbeats, relay requests, reconnects.

use std::sync::Arc;
use std::time::Duration;

use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use pb::gateway_message::Msg as In;
use pb::supervisor_message::Msg as Out;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Config;
use crate::ssh::SshServer;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum SessionEnd {
    /// The session was accepted and later ended: reconnect at once.
    Ended(String),
    /// Never accepted: back off.
    Failed(String),
}

/// Connects, serves, reconnects; never returns.
pub async fn run_forever(cfg: Config, ssh: Arc<SshServer>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match session_once(&cfg, &ssh).await {
            SessionEnd::Ended(why) => {
                tracing::warn!("session ended: {why}; reconnecting");
                backoff = MIN_BACKOFF;
                continue;
            }
            SessionEnd::Failed(why) => tracing::warn!("cannot open a session: {why}"),
        }
        // Full jitter keeps a fleet of supervisors from reconnecting in step.
        let wait = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

pub async fn connect(endpoint: &str) -> Result<Channel, String> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        let path = path.to_owned();
        let ep = Endpoint::try_from("http://sandbox.invalid")
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT);
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        });
        tokio::time::timeout(CONNECT_TIMEOUT, ep.connect_with_connector(connector))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect {endpoint}: {e}"))
    } else {
        let ep = Endpoint::try_from(endpoint.to_owned())
            .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        tokio::time::timeout(CONNECT_TIMEOUT, ep.connect())
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect {endpoint}: {e}"))
    }
}

fn out(m: Out) -> pb::SupervisorMessage {
    pb::SupervisorMessage { msg: Some(m) }
}

async fn session_once(cfg: &Config, ssh: &Arc<SshServer>) -> SessionEnd {
    let channel = match connect(&cfg.endpoint).await {
        Ok(c) => c,
        Err(e) => return SessionEnd::Failed(e),
    };
    let mut client = SupervisorClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(32);
    let hello = Out::Hello(pb::SupervisorHello {
        sandbox_id: cfg.sandbox_id.clone(),
        instance_id: uuid::Uuid::new_v4().to_string(),
        secret: cfg.secret.clone(),
        ssh_host_key: ssh.public_key().to_owned(),
    });
    let _ = tx.send(out(hello)).await;
    let call = client.connect_supervisor(ReceiverStream::new(rx));
    let mut inbound = match tokio::time::timeout(HELLO_TIMEOUT, call).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => return SessionEnd::Failed(s.message().to_owned()),
        Err(_) => return SessionEnd::Failed("the gateway did not answer".into()),
    };
    let interval = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::GatewayMessage {
            msg: Some(In::Accepted(a)),
        }))) => Duration::from_millis(a.heartbeat_interval_ms.max(100).into()),
        Ok(Ok(Some(pb::GatewayMessage {
            msg: Some(In::Rejected(r)),
        }))) => return SessionEnd::Failed(format!("rejected: {}", r.reason)),
        Ok(Ok(_)) => return SessionEnd::Failed("unexpected first message".into()),
        Ok(Err(s)) => return SessionEnd::Failed(s.message().to_owned()),
        Err(_) => return SessionEnd::Failed("no answer to hello".into()),
    };
    tracing::info!(?interval, "session accepted");

    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            // Two silent intervals mean the stream is dead (or we were
            // frozen): drop it and reconnect.
            m = tokio::time::timeout(interval * 2, inbound.message()) => match m {
                Err(_) => return SessionEnd::Ended("the gateway went silent".into()),
                Ok(Err(s)) => return SessionEnd::Ended(s.message().to_owned()),
                Ok(Ok(None)) => return SessionEnd::Ended("the gateway closed the session".into()),
                Ok(Ok(Some(pb::GatewayMessage { msg: Some(In::RelayOpen(open)) }))) => {
                    let (cfg, ssh, channel, tx) = (cfg.clone(), ssh.clone(), channel.clone(), tx.clone());
                    tokio::spawn(async move {
                        let id = open.channel_id.clone();
                        if let Err(e) = crate::relay::serve(&cfg, &ssh, channel, open).await {
                            tracing::warn!(channel = id, "relay failed: {e}");
                            let _ = tx.send(out(Out::RelayFailed(pb::RelayOpenFailed {
                                channel_id: id,
                                message: e,
                            }))).await;
                        }
                    });
                }
                Ok(Ok(Some(_))) => {}
            },
            _ = tick.tick() => {
                if tx.send(out(Out::Heartbeat(pb::Heartbeat {}))).await.is_err() {
                    return SessionEnd::Ended("cannot send a heartbeat".into());
                }
            }
        }
    }
}
