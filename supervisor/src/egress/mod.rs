//! Egress from inside: sandbox code's outbound connections, handed to the
//! gateway, which decides and dials (nothing here decides anything).
//!
//! Sandbox code reaches us through the HTTP proxy on the sandbox's
//! loopback ([`proxy`], named by the proxy variables every command gets),
//! or, ignoring those, by connecting to the address our resolver gave it
//! for a name ([`dns`]).
//! For each connection we find who is calling ([`callers`]), open an
//! egress relay on a connection of its own to the gateway, wait for its
//! verdict, and then carry bytes.

pub mod callers;
pub mod dns;
pub mod proxy;

use std::time::Duration;

use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use pb::relay_frame::Frame;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Where the proxy listens, inside the sandbox.
pub const PROXY_ADDR: &str = "127.0.0.1:3128";

/// The gateway's answer must come within this (its own dial is bounded
/// by its connect timeout).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(30);

/// The proxy variables sandbox code gets, so ordinary clients use the
/// proxy; loopback stays direct (it is the sandbox's own).
pub fn proxy_env() -> Vec<(&'static str, String)> {
    let url = format!("http://{PROXY_ADDR}");
    let mut v: Vec<(&'static str, String)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "grpc_proxy",
    ]
    .into_iter()
    .map(|k| (k, url.clone()))
    .collect();
    let no_proxy = "localhost,127.0.0.1,::1".to_owned();
    v.push(("NO_PROXY", no_proxy.clone()));
    v.push(("no_proxy", no_proxy));
    v.push(("NODE_USE_ENV_PROXY", "1".into()));
    v
}

/// The connection to the gateway egress relays ride, while a session is
/// up (`None` between sessions).
#[derive(Clone, Debug)]
pub struct Uplink(watch::Receiver<Option<Link>>);

/// A session's egress connection and the token its opens carry
/// (`SessionAccepted.egress_token`).
#[derive(Clone, Debug)]
pub struct Link {
    pub channel: Channel,
    pub token: String,
}

impl Uplink {
    pub fn new() -> (watch::Sender<Option<Link>>, Self) {
        let (tx, rx) = watch::channel(None);
        (tx, Self(rx))
    }

    fn link(&self) -> Result<Link, EgressError> {
        self.0.borrow().clone().ok_or(EgressError::NoGateway)
    }
}

/// Why a connection goes nowhere: the gateway's verdict, or why there was
/// none.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("the sandbox is not connected to its gateway")]
    NoGateway,
    #[error("the gateway refused the egress relay")]
    Relay(#[source] tonic::Status),
    #[error("the gateway gave no verdict")]
    NoVerdict,
    #[error("refused by policy: {reason}")]
    Denied { rule: String, reason: String },
    #[error("the gateway could not reach it: {reason}")]
    Unreachable { reason: String },
}

/// An allowed connection: its relay, both ways.
pub struct Allowed {
    pub verdict: pb::EgressVerdict,
    pub from_gateway: tonic::Streaming<pb::RelayFrame>,
    pub to_gateway: mpsc::Sender<pb::RelayFrame>,
}

/// Asks the gateway for a connection to `host:port` on behalf of
/// `binaries` (the caller, then its ancestors).
pub async fn open(
    uplink: &Uplink,
    host: &str,
    port: u16,
    via: &str,
    binaries: Vec<pb::EgressBinary>,
) -> Result<Allowed, EgressError> {
    let Link { channel, token } = uplink.link()?;
    // Few frames in flight: a stalled connection holds little here.
    let (tx, rx) = mpsc::channel::<pb::RelayFrame>(4);
    let init = pb::RelayFrame {
        frame: Some(Frame::Init(pb::RelayInit {
            channel_id: String::new(),
            egress: Some(pb::EgressOpen {
                host: host.to_owned(),
                port: port.into(),
                binaries,
                via: via.to_owned(),
                token,
            }),
        })),
    };
    tx.send(init).await.map_err(|_| EgressError::NoGateway)?;
    let mut inbound = SupervisorClient::new(channel)
        .relay_stream(ReceiverStream::new(rx))
        .await
        .map_err(EgressError::Relay)?
        .into_inner();
    let first = tokio::time::timeout(VERDICT_TIMEOUT, inbound.message()).await;
    let verdict = match first {
        Ok(Ok(Some(pb::RelayFrame {
            frame: Some(Frame::EgressVerdict(v)),
        }))) => v,
        _ => return Err(EgressError::NoVerdict),
    };
    if verdict.unreachable {
        return Err(EgressError::Unreachable {
            reason: verdict.reason,
        });
    }
    if !verdict.allowed {
        return Err(EgressError::Denied {
            rule: verdict.rule,
            reason: verdict.reason,
        });
    }
    Ok(Allowed {
        verdict,
        from_gateway: inbound,
        to_gateway: tx,
    })
}
