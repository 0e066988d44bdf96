//! The control stream: hello, heartbeats, relay requests, reconnects.

use std::sync::Arc;
use std::time::Duration;

use openshell_core::Backoff;
use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use pb::gateway_message::Msg as In;
use pb::supervisor_message::Msg as Out;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Config;
use crate::report;
use crate::ssh::SshServer;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why the gateway could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad endpoint {endpoint:?}")]
    BadEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connect {endpoint} timed out after {CONNECT_TIMEOUT:?}")]
    TimedOut { endpoint: String },
    #[error("connect {endpoint}")]
    Transport {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Why a session was never accepted: back off before the next try.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the gateway refused the stream")]
    Refused(#[source] tonic::Status),
    #[error("the gateway did not answer within {HELLO_TIMEOUT:?}")]
    NoAnswer,
    #[error("the gateway rejected our hello: {reason}")]
    Rejected { reason: String },
    #[error("the gateway's first message did not answer our hello")]
    UnexpectedFirstMessage,
}

/// Why an accepted session ended: reconnect at once.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnded {
    #[error("the gateway went silent for two heartbeat intervals")]
    Silent,
    #[error("the control stream failed")]
    Stream(#[source] tonic::Status),
    #[error("the gateway closed the session")]
    Closed,
    #[error("cannot send a heartbeat")]
    Heartbeat,
}

/// Connects, serves, reconnects; never returns.
pub async fn run_forever(cfg: Config, ssh: Arc<SshServer>) {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        match session_once(&cfg, &ssh).await {
            Ok(ended) => {
                tracing::warn!("session ended: {}; reconnecting", report::chain(&ended));
                backoff.reset();
                continue;
            }
            Err(e) => tracing::warn!("cannot open a session: {}", report::chain(&e)),
        }
        tokio::time::sleep(backoff.next_delay(rand::random())).await;
    }
}

pub async fn connect(endpoint: &str) -> Result<Channel, ConnectError> {
    let timed_out = |_| ConnectError::TimedOut {
        endpoint: endpoint.to_owned(),
    };
    let transport = |source| ConnectError::Transport {
        endpoint: endpoint.to_owned(),
        source,
    };
    let bad = |source| ConnectError::BadEndpoint {
        endpoint: endpoint.to_owned(),
        source,
    };
    if let Some(path) = endpoint.strip_prefix("unix://") {
        let path = path.to_owned();
        let ep = Endpoint::try_from("http://sandbox.invalid")
            .map_err(bad)?
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
            .map_err(timed_out)?
            .map_err(transport)
    } else {
        let ep = Endpoint::try_from(endpoint.to_owned())
            .map_err(bad)?
            .connect_timeout(CONNECT_TIMEOUT);
        tokio::time::timeout(CONNECT_TIMEOUT, ep.connect())
            .await
            .map_err(timed_out)?
            .map_err(transport)
    }
}

fn out(m: Out) -> pb::SupervisorMessage {
    pb::SupervisorMessage { msg: Some(m) }
}

/// One session: `Err` if it was never accepted, else why it ended.
async fn session_once(cfg: &Config, ssh: &Arc<SshServer>) -> Result<SessionEnded, SessionError> {
    let channel = connect(&cfg.endpoint).await?;
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
        Ok(Err(s)) => return Err(SessionError::Refused(s)),
        Err(_) => return Err(SessionError::NoAnswer),
    };
    let interval = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::GatewayMessage {
            msg: Some(In::Accepted(a)),
        }))) => Duration::from_millis(a.heartbeat_interval_ms.max(100).into()),
        Ok(Ok(Some(pb::GatewayMessage {
            msg: Some(In::Rejected(r)),
        }))) => return Err(SessionError::Rejected { reason: r.reason }),
        Ok(Ok(_)) => return Err(SessionError::UnexpectedFirstMessage),
        Ok(Err(s)) => return Err(SessionError::Refused(s)),
        Err(_) => return Err(SessionError::NoAnswer),
    };
    tracing::info!(?interval, "session accepted");

    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            // Two silent intervals mean the stream is dead (or we were
            // frozen): drop it and reconnect.
            m = tokio::time::timeout(interval * 2, inbound.message()) => match m {
                Err(_) => return Ok(SessionEnded::Silent),
                Ok(Err(s)) => return Ok(SessionEnded::Stream(s)),
                Ok(Ok(None)) => return Ok(SessionEnded::Closed),
                Ok(Ok(Some(pb::GatewayMessage { msg: Some(In::RelayOpen(open)) }))) => {
                    let (cfg, ssh, channel, tx) = (cfg.clone(), ssh.clone(), channel.clone(), tx.clone());
                    tokio::spawn(async move {
                        let id = open.channel_id.clone();
                        if let Err(e) = crate::relay::serve(&cfg, &ssh, channel, open).await {
                            tracing::warn!(channel = id, "relay failed: {}", report::chain(&e));
                            let _ = tx.send(out(Out::RelayFailed(pb::RelayOpenFailed {
                                channel_id: id,
                                message: report::wire(&e),
                            }))).await;
                        }
                    });
                }
                Ok(Ok(Some(_))) => {}
            },
            _ = tick.tick() => {
                if tx.send(out(Out::Heartbeat(pb::Heartbeat {}))).await.is_err() {
                    return Ok(SessionEnded::Heartbeat);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_is_a_transport_error_naming_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("unix://{}/gateway.sock", dir.path().display());
        let e = connect(&endpoint).await.unwrap_err();
        assert!(
            matches!(&e, ConnectError::Transport { endpoint: ep, .. } if *ep == endpoint),
            "{e:?}"
        );
        let text = report::chain(&e);
        assert!(text.starts_with(&format!("connect {endpoint}: ")), "{text}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[tokio::test]
    async fn a_malformed_endpoint_is_named_as_such() {
        let e = connect("not a uri").await.unwrap_err();
        assert!(matches!(&e, ConnectError::BadEndpoint { .. }), "{e:?}");
        assert!(e.to_string().contains("\"not a uri\""), "{e}");
    }
}
