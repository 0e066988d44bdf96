//! Relays: a channel the gateway asked for, opened by us on the connection
//! we dialled (nothing connects into the sandbox). The first frame names
//! the channel; what follows depends on the purpose: an exec ([`crate::exec`])
//! an SSH connection ([`crate::ssh`]), a file transfer ([`crate::files`])
//! a TCP connection to a port inside ([`crate::forward`]), or the main
//! process's output ([`crate::main_process`]).

use std::sync::Arc;
use std::time::Duration;

use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use pb::relay_open::Purpose;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::Config;
use crate::main_process::MainProcess;
use crate::ssh::SshServer;

/// Why a relay could not be opened; the gateway is told (bounded, see
/// [`crate::report::wire`]).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("unsupported relay purpose")]
    UnsupportedPurpose,
    #[error("the relay closed before its first frame was sent")]
    Closed,
    #[error("cannot open the relay")]
    Open(#[source] tonic::Status),
    #[error(transparent)]
    Forward(#[from] crate::forward::ForwardError),
}

/// Serves one relay: opens the stream, then runs what it is for. An error
/// means the relay could not be opened.
pub async fn serve(
    cfg: &Config,
    ssh: &SshServer,
    main: &Arc<MainProcess>,
    channel: Channel,
    open: pb::RelayOpen,
) -> Result<(), RelayError> {
    let Some(purpose) = open.purpose else {
        return Err(RelayError::UnsupportedPurpose);
    };
    // A forward dials its port first: a refusal is the relay's failure.
    let tcp = match &purpose {
        Purpose::Forward(f) => Some(crate::forward::dial(f).await?),
        _ => None,
    };
    // At most 16 frames (2 MiB of output) wait here for the gateway; past
    // that the pumps stop reading and the command's pipe fills.
    let (tx, rx) = mpsc::channel::<pb::RelayFrame>(16);
    let init = pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::Init(pb::RelayInit {
            channel_id: open.channel_id.clone(),
            egress: None,
        })),
    };
    tx.send(init).await.map_err(|_| RelayError::Closed)?;
    let mut client = SupervisorClient::new(channel);
    let inbound = client
        .relay_stream(ReceiverStream::new(rx))
        .await
        .map_err(RelayError::Open)?
        .into_inner();
    match purpose {
        Purpose::Exec(start) => crate::exec::run(cfg, start, inbound, tx).await,
        Purpose::Ssh(_) => ssh.serve(cfg, inbound, tx).await,
        Purpose::Main(m) => main.clone().serve(cfg, m, inbound, tx).await,
        Purpose::Files(t) => crate::files::serve(cfg, t, inbound, tx).await,
        Purpose::Forward(_) => {
            if let Some(tcp) = tcp {
                crate::forward::pipe(tcp, Vec::new(), crate::exec::CHUNK, inbound, tx).await;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            endpoint: "unix:///nonexistent".into(),
            gateway_tls: None,
            sandbox_id: "id".into(),
            secret: "s".into(),
            run_as: None,
            child_env: Default::default(),
            workload_cgroups: Vec::new(),
            image_user: None,
            image: None,
            workdir: crate::spawn::DEFAULT_WORKDIR.into(),
        }
    }

    #[tokio::test]
    async fn a_relay_without_a_purpose_is_refused_before_anything_is_opened() {
        // Lazy: nothing listens there, and nothing may be dialled.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let ssh = SshServer::generate().unwrap();
        let open = pb::RelayOpen {
            channel_id: "c1".into(),
            purpose: None,
        };
        let main = Arc::default();
        let e = serve(&cfg(), &ssh, &main, channel, open).await.unwrap_err();
        assert!(matches!(e, RelayError::UnsupportedPurpose), "{e:?}");
        assert_eq!(crate::report::wire(&e), "unsupported relay purpose");
    }
}
