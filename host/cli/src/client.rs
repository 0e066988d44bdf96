//! Connecting to the gateway and turning failures into advice.

use anyhow::anyhow;
use openshell_proto::v1::open_shell_client::OpenShellClient;
use tonic::transport::Channel;

pub type Client = OpenShellClient<Channel>;

/// `host:port` means `http://host:port`.
pub fn normalize(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

pub async fn connect(endpoint: &str) -> anyhow::Result<Client> {
    let endpoint = &normalize(endpoint);
    let ep = Channel::from_shared(endpoint.clone()).map_err(|_| {
        anyhow!(
            "{endpoint:?} is not a valid gateway endpoint; use a URL such as http://127.0.0.1:8080"
        )
    })?;
    let channel = ep
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(" ({c})"));
            anyhow!(
                "cannot reach the gateway at {endpoint}: {e}{cause}; start one with `openshell gateway start` or point --gateway-endpoint (OPENSHELL_GATEWAY_ENDPOINT) at it"
            )
        })?;
    Ok(OpenShellClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// A gRPC status as a one-line error.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow!("{} ({:?})", s.message(), s.code())
}
