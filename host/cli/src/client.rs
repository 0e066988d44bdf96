//! Connecting to the gateway and turning failures into advice.

use anyhow::anyhow;
use openshell_proto::v1::open_shell_client::OpenShellClient;
use tonic::transport::Channel;

pub type Client = OpenShellClient<Channel>;

pub async fn connect(endpoint: &str) -> anyhow::Result<Client> {
    let ep = Channel::from_shared(endpoint.to_owned()).map_err(|_| {
        anyhow!(
            "{endpoint:?} is not a valid gateway endpoint; use a URL such as http://127.0.0.1:8080"
        )
    })?;
    let channel = ep
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| {
            anyhow!(
                "cannot reach the gateway at {endpoint}: {e}; start one with `openshell gateway start` or point --gateway-endpoint (OPENSHELL_GATEWAY_ENDPOINT) at it"
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
