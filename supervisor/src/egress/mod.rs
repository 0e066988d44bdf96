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
mod handoff;
pub mod proxy;

use std::time::Duration;

use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use pb::relay_frame::Frame;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
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
    /// The gateway's egress socket, where it takes client sockets (a
    /// process sandbox); `None` in a VM guest.
    pub handoff: Option<std::path::PathBuf>,
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

/// A connection the gateway did not take, back to the caller to answer.
pub struct Refused {
    pub client: TcpStream,
    pub error: EgressError,
}

/// Asks the gateway to carry `client` to `host:port` on behalf of
/// `binaries` (the caller, then its ancestors): `reply` goes to the client
/// and `first` to the destination once it is allowed. Where the gateway
/// takes sockets (a process sandbox: `egress.sock`) the client is handed
/// to it and this returns at once; else (a VM guest) the bytes ride an
/// egress relay from here until the connection ends.
pub async fn carry(
    uplink: &Uplink,
    client: TcpStream,
    open: Open<'_>,
    reply: Vec<u8>,
    first: Vec<u8>,
) -> Result<pb::EgressVerdict, Refused> {
    let link = match uplink.link() {
        Ok(l) => l,
        Err(error) => return Err(Refused { client, error }),
    };
    let ask = pb::EgressOpen {
        host: open.host.to_owned(),
        port: open.port.into(),
        binaries: open.binaries,
        via: open.via.to_owned(),
        token: link.token.clone(),
    };
    if let Some(path) = &link.handoff {
        return match handoff::hand_off(path, &client, ask, reply, first).await {
            // The gateway holds the connection now; ours closes.
            Ok(verdict) => Ok(verdict),
            Err(error) => Err(Refused { client, error }),
        };
    }
    let (verdict, from_gateway, to_gateway) = match relay(link.channel, ask).await {
        Ok(r) => r,
        Err(error) => return Err(Refused { client, error }),
    };
    let mut client = client;
    if !reply.is_empty() && client.write_all(&reply).await.is_err() {
        return Ok(verdict);
    }
    crate::forward::pipe(client, first, CHUNK, from_gateway, to_gateway).await;
    Ok(verdict)
}

/// Where a connection goes, and who asks.
pub struct Open<'a> {
    pub host: &'a str,
    pub port: u16,
    pub via: &'a str,
    pub binaries: Vec<pb::EgressBinary>,
}

/// Bytes per read from a client on a relay.
const CHUNK: usize = 32 * 1024;

type RelayEnds = (
    pb::EgressVerdict,
    tonic::Streaming<pb::RelayFrame>,
    mpsc::Sender<pb::RelayFrame>,
);

/// Opens an egress relay and waits for its verdict.
async fn relay(channel: Channel, ask: pb::EgressOpen) -> Result<RelayEnds, EgressError> {
    // Few frames in flight: a stalled connection holds little here.
    let (tx, rx) = mpsc::channel::<pb::RelayFrame>(4);
    let init = pb::RelayFrame {
        frame: Some(Frame::Init(pb::RelayInit {
            channel_id: String::new(),
            egress: Some(ask),
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
    Ok((judged(verdict)?, inbound, tx))
}

/// The verdict if it allows, else why not.
fn judged(verdict: pb::EgressVerdict) -> Result<pb::EgressVerdict, EgressError> {
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
    Ok(verdict)
}
