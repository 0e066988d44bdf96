//! One SSH connection over a relay: the relay's `data` frames are copied to
//! and from one end of an in-memory duplex pipe; russh runs the session on
//! the other end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openshell_proto::v1 as pb;
use pb::relay_frame::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::CHUNK;
use super::handler::Connection;
use super::host_key::SshServer;
use crate::Config;

/// How long one side of a closing relay waits for the other to finish.
const LINGER: Duration = Duration::from_secs(5);

impl SshServer {
    /// Runs one SSH connection over an opened relay until either side
    /// closes it.
    pub async fn serve(
        &self,
        cfg: &Config,
        mut inbound: tonic::Streaming<pb::RelayFrame>,
        tx: mpsc::Sender<pb::RelayFrame>,
    ) {
        let (ours, theirs) = tokio::io::duplex(4 * CHUNK);
        let (mut from_ssh, mut to_ssh) = tokio::io::split(ours);
        let handler = Connection {
            cfg: Arc::new(cfg.clone()),
            channels: HashMap::new(),
        };
        let config = self.config.clone();
        // The session is spawned by russh; run_stream itself already talks
        // (it exchanges version lines), so it runs beside the pumps.
        let server = async move {
            match russh::server::run_stream(config, theirs, handler).await {
                Ok(session) => session.await,
                Err(e) => Err(e),
            }
        };
        // Gateway → SSH server. Reads the relay to its end even after the
        // server is gone, so the gateway's last frames are not reset away.
        let gateway_to_ssh = async move {
            let mut open = true;
            while let Ok(Some(f)) = inbound.message().await {
                if let Some(Frame::Data(bytes)) = f.frame
                    && open
                {
                    open = to_ssh.write_all(&bytes).await.is_ok();
                }
            }
            let _ = to_ssh.shutdown().await;
        };
        // SSH server → gateway; ends (and closes our half of the relay) when
        // the session drops its end of the pipe.
        let ssh_to_gateway = async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match from_ssh.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let frame = pb::RelayFrame {
                            frame: Some(Frame::Data(bytes::Bytes::copy_from_slice(&buf[..n]))),
                        };
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let pumps = async {
            tokio::pin!(gateway_to_ssh, ssh_to_gateway);
            tokio::select! {
                () = &mut gateway_to_ssh => {
                    let _ = tokio::time::timeout(LINGER, &mut ssh_to_gateway).await;
                }
                () = &mut ssh_to_gateway => {
                    let _ = tokio::time::timeout(LINGER, &mut gateway_to_ssh).await;
                }
            }
        };
        let (result, ()) = tokio::join!(server, pumps);
        tracing::debug!("ssh connection ended: {result:?}");
    }
}
