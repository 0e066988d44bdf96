//! Connecting to the gateway (TLS with its CA, the token on every call)
//! and turning failures into advice.

use anyhow::{Context, anyhow};
use openshell_proto::v1::open_shell_client::OpenShellClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::config::ClientConfig;

/// The name every openshell gateway certificate carries.
const SERVER_NAME: &str = "openshell-gateway";
const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:8080";

/// Adds `authorization: Bearer TOKEN` to every request.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = OpenShellClient<InterceptedService<Channel, Token>>;

/// Where and how to connect: explicit flags and environment first, then
/// the saved client config.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub endpoint: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
}

/// `host:port` means `http://host:port`.
pub fn normalize(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

pub fn resolve(t: &Target) -> anyhow::Result<ClientConfig> {
    let saved = crate::config::load()?;
    let mut cfg = match (&t.endpoint, saved) {
        // An explicit endpoint keeps the saved CA and token only when they
        // belong to that same endpoint.
        (Some(ep), Some(s)) if normalize(ep) == s.endpoint => s,
        (Some(ep), _) => ClientConfig {
            endpoint: normalize(ep),
            ..Default::default()
        },
        (None, Some(s)) => s,
        (None, None) => ClientConfig {
            endpoint: DEFAULT_ENDPOINT.into(),
            ..Default::default()
        },
    };
    if let Some(f) = &t.ca_file {
        cfg.ca_pem = Some(
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        );
    }
    if let Ok(tok) = std::env::var("OPENSHELL_TOKEN") {
        cfg.token = Some(tok);
    }
    Ok(cfg)
}

pub async fn connect(t: &Target) -> anyhow::Result<Client> {
    let cfg = resolve(t)?;
    let endpoint = &cfg.endpoint;
    let mut ep = Channel::from_shared(endpoint.clone()).map_err(|_| {
        anyhow!(
            "{endpoint:?} is not a valid gateway endpoint; use a URL such as https://127.0.0.1:8080"
        )
    })?;
    if endpoint.starts_with("https://") {
        let ca = cfg.ca_pem.as_deref().ok_or_else(|| {
            anyhow!(
                "{endpoint} uses TLS, but no CA is known for it: pass --ca-file (the gateway's tls/ca.crt) or use the client config `openshell gateway start` wrote"
            )
        })?;
        ep = ep.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(SERVER_NAME),
        )?;
    }
    let channel = ep
        .connect_timeout(std::time::Duration::from_secs(5))
        // Exec output arrives in frames of up to 128 KiB: let the gateway
        // send each in two HTTP/2 frames, not eight, and keep a few in
        // flight per stream.
        .max_frame_size(256 * 1024)
        .initial_stream_window_size(2 << 20)
        .initial_connection_window_size(8 << 20)
        .connect()
        .await
        .map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(" ({c})"));
            anyhow!(
                "cannot reach the gateway at {endpoint}: {e}{cause}; start one with `openshell gateway start` or point --gateway-endpoint (OPENSHELL_GATEWAY_ENDPOINT) at it"
            )
        })?;
    let token = match &cfg.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow!("the token contains characters a header cannot carry"))?,
        ),
        None => None,
    };
    Ok(OpenShellClient::with_interceptor(channel, Token(token))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// A gRPC status as a one-line error.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow!("{} ({:?})", s.message(), s.code())
}
