//! Relays: a channel the gateway asked for, opened by us on the connection
//! we dialled (nothing connects into the sandbox). The first frame names
//! the channel; what follows depends on the purpose: an exec ([`crate::exec`])
//! or an SSH connection ([`crate::ssh`]).

use std::time::Duration;

use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use pb::relay_open::Purpose;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::Config;
use crate::ssh::SshServer;

/// Serves one relay: opens the stream, then runs what it is for. An error
/// means the relay could not be opened (the gateway is told).
pub async fn serve(
    cfg: &Config,
    ssh: &SshServer,
    channel: Channel,
    open: pb::RelayOpen,
) -> Result<(), String> {
    let Some(purpose) = open.purpose else {
        return Err("unsupported relay purpose".into());
    };
    let (tx, rx) = mpsc::channel::<pb::RelayFrame>(64);
    let init = pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::Init(pb::RelayInit {
            channel_id: open.channel_id.clone(),
        })),
    };
    tx.send(init)
        .await
        .map_err(|_| "relay closed".to_string())?;
    let mut client = SupervisorClient::new(channel);
    let inbound = client
        .relay_stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("cannot open the relay: {}", s.message()))?
        .into_inner();
    match purpose {
        Purpose::Exec(start) => crate::exec::run(cfg, start, inbound, tx).await,
        Purpose::Ssh(_) => ssh.serve(cfg, inbound, tx).await,
    }
    Ok(())
}

/// Keeps the relay open until the gateway closes it (it has read
/// everything): dropping our end first would reset the stream and could
/// lose the last frames still in flight.
pub async fn linger(mut inbound: tonic::Streaming<pb::RelayFrame>) {
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    tracing::debug!("relay closed: {r:?}");
}
