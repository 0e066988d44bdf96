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
    // Outlives every session: the main process does not end with one.
    let main = Arc::new(crate::main_process::MainProcess::default());
    let (uplink_tx, uplink) = crate::egress::Uplink::new();
    match tokio::net::TcpListener::bind(crate::egress::PROXY_ADDR).await {
        Ok(l) => {
            tokio::spawn(crate::egress::proxy::serve(l, uplink.clone()));
        }
        Err(e) => tracing::warn!(
            "cannot listen on {} for the egress proxy: {e}; sandbox code has no network",
            crate::egress::PROXY_ADDR
        ),
    }
    start_resolver(&uplink).await;
    loop {
        let ended = session_once(&cfg, &ssh, &main, &uplink_tx).await;
        uplink_tx.send_replace(None);
        match ended {
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

/// The sandbox's DNS stub, and `/etc/resolv.conf` naming it. Without it
/// sandbox code still reaches what its policy allows through the proxy.
async fn start_resolver(uplink: &crate::egress::Uplink) {
    use crate::egress::dns;
    match tokio::net::UdpSocket::bind(dns::STUB_ADDR).await {
        Ok(socket) => {
            tokio::spawn(dns::Stub::new(uplink.clone()).serve(socket));
        }
        Err(e) => {
            tracing::warn!(
                "cannot listen on {} for the DNS stub: {e}; names resolve only through the proxy",
                dns::STUB_ADDR
            );
            return;
        }
    }
    if let Err(e) = dns::install_resolv_conf() {
        tracing::warn!(
            "cannot point /etc/resolv.conf at the DNS stub: {e}; sandbox code must name {} itself",
            dns::STUB_ADDR
        );
    }
}

/// The gateway's CA and the name on its certificate, for an `https://`
/// endpoint.
#[derive(Clone, Debug)]
pub struct GatewayTrust {
    pub ca_pem: String,
    pub server_name: String,
}

pub async fn connect(
    endpoint: &str,
    trust: Option<&GatewayTrust>,
) -> Result<Channel, ConnectError> {
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
        let mut ep = Endpoint::try_from(endpoint.to_owned())
            .map_err(bad)?
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(t) = trust {
            // Only the gateway's own CA: no system roots in a guest.
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca_pem))
                .domain_name(&t.server_name);
            ep = ep.tls_config(tls).map_err(bad)?;
        }
        tokio::time::timeout(CONNECT_TIMEOUT, ep.connect())
            .await
            .map_err(timed_out)?
            .map_err(transport)
    }
}

/// This supervisor process's id, the same for every session it opens: a
/// new one tells the gateway the sandbox's supervisor started afresh (and
/// its main process with it).
fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().to_string())
}

fn out(m: Out) -> pb::SupervisorMessage {
    pb::SupervisorMessage { msg: Some(m) }
}

/// One session: `Err` if it was never accepted, else why it ended.
async fn session_once(
    cfg: &Config,
    ssh: &Arc<SshServer>,
    main: &Arc<crate::main_process::MainProcess>,
    uplink: &tokio::sync::watch::Sender<Option<crate::egress::Link>>,
) -> Result<SessionEnded, SessionError> {
    let channel = connect(&cfg.endpoint, cfg.gateway_tls.as_ref()).await?;
    let mut client = SupervisorClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(32);
    let hello = Out::Hello(pb::SupervisorHello {
        sandbox_id: cfg.sandbox_id.clone(),
        instance_id: instance_id().to_owned(),
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
    let (interval, token) = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::GatewayMessage {
            msg: Some(In::Accepted(a)),
        }))) => (
            Duration::from_millis(a.heartbeat_interval_ms.max(100).into()),
            a.egress_token,
        ),
        Ok(Ok(Some(pb::GatewayMessage {
            msg: Some(In::Rejected(r)),
        }))) => return Err(SessionError::Rejected { reason: r.reason }),
        Ok(Ok(_)) => return Err(SessionError::UnexpectedFirstMessage),
        Ok(Err(s)) => return Err(SessionError::Refused(s)),
        Err(_) => return Err(SessionError::NoAnswer),
    };
    tracing::info!(?interval, "session accepted");
    // Egress rides a connection of its own: a saturated or stalled
    // outbound connection never holds the window heartbeats need.
    match connect(&cfg.endpoint, cfg.gateway_tls.as_ref()).await {
        Ok(channel) => {
            // A process sandbox's gateway takes client sockets beside the
            // supervisor socket; a VM guest has only the network hop.
            let handoff = cfg
                .endpoint
                .strip_prefix("unix://")
                .map(|p| std::path::Path::new(p).with_file_name("egress.sock"))
                .filter(|p| p.exists());
            uplink.send_replace(Some(crate::egress::Link {
                channel,
                token,
                handoff,
            }));
        }
        Err(e) => tracing::warn!("no egress connection this session: {}", report::chain(&e)),
    }

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
                    let (cfg, ssh, main, channel, tx) = (cfg.clone(), ssh.clone(), main.clone(), channel.clone(), tx.clone());
                    tokio::spawn(async move {
                        let id = open.channel_id.clone();
                        if let Err(e) = crate::relay::serve(&cfg, &ssh, &main, channel, open).await {
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
        let e = connect(&endpoint, None).await.unwrap_err();
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
        let e = connect("not a uri", None).await.unwrap_err();
        assert!(matches!(&e, ConnectError::BadEndpoint { .. }), "{e:?}");
        assert!(e.to_string().contains("\"not a uri\""), "{e}");
    }

    /// A CA and a server certificate it signed for `name`.
    fn pki(name: &str) -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca.clone().self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca_cert.pem(), cert.pem(), key.serialize_pem())
    }

    fn trust(ca_pem: &str) -> GatewayTrust {
        GatewayTrust {
            ca_pem: ca_pem.to_owned(),
            server_name: "openshell-gateway".into(),
        }
    }

    /// Issue 14, item 5: the first bytes a supervisor sends on an https
    /// endpoint (a VM guest's hop) are a TLS ClientHello, where a plaintext
    /// one sends the HTTP/2 preface.
    #[tokio::test]
    async fn on_an_https_endpoint_the_first_bytes_are_a_tls_client_hello() {
        use tokio::io::AsyncReadExt;
        let (ca, _, _) = pki("openshell-gateway");
        for (scheme, tls) in [("https", Some(trust(&ca))), ("http", None)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("{scheme}://{}", listener.local_addr().unwrap());
            let dial = tokio::spawn(async move { connect(&endpoint, tls.as_ref()).await });
            let (mut s, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 6];
            s.read_exact(&mut first).await.unwrap();
            if scheme == "https" {
                // Record type handshake, TLS 1.x, handshake type ClientHello.
                assert_eq!(
                    (first[0], first[1], first[5]),
                    (0x16, 0x03, 0x01),
                    "{first:02x?}"
                );
            } else {
                assert_eq!(&first, b"PRI * ", "plaintext h2 starts with its preface");
            }
            dial.abort();
        }
    }

    /// Issue 14, item 5: a supervisor that was given another CA refuses a
    /// gateway whose certificate that CA did not sign; with the right CA
    /// the handshake completes.
    #[tokio::test]
    async fn a_supervisor_given_a_wrong_ca_refuses_the_gateway() {
        use rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls;
        let (right_ca, cert, key) = pki("openshell-gateway");
        let (wrong_ca, _, _) = pki("openshell-gateway");
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));

        for (ca, should_pass) in [(&wrong_ca, false), (&right_ca, true)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("https://{}", listener.local_addr().unwrap());
            let t = trust(ca);
            let dial = tokio::spawn(async move { connect(&endpoint, Some(&t)).await });
            let (tcp, _) = listener.accept().await.unwrap();
            let accepted = acceptor.accept(tcp).await;
            assert_eq!(accepted.is_ok(), should_pass, "{:?}", accepted.err());
            if !should_pass {
                let dialled = dial.await.unwrap();
                assert!(
                    dialled.is_err(),
                    "the supervisor accepted a gateway its CA did not sign"
                );
            } else {
                dial.abort();
            }
        }
    }
}
