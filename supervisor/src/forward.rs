//! Port forwarding: one relay per TCP connection to a port on the
//! sandbox's own loopback. We dial it from inside, before the relay opens,
//! so a port nobody listens on is a relay failure with the reason; then
//! bytes go both ways until either side closes its half.

use openshell_proto::v1 as pb;
use pb::relay_frame::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Why a forward could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("port {port} is not a TCP port (1-65535)")]
    BadPort { port: u32 },
    #[error("nothing accepts connections on port {port} in the sandbox")]
    Refused {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Dials 127.0.0.1:port as the sandbox sees it.
pub async fn dial(f: &pb::TcpForward) -> Result<TcpStream, ForwardError> {
    let port = u16::try_from(f.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(ForwardError::BadPort { port: f.port })?;
    let s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|source| ForwardError::Refused { port, source })?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn data(b: bytes::Bytes) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(Frame::Data(b)),
    }
}

/// Pumps a TCP connection and a relay into each other until both sides
/// have closed their halves: `first` (bytes already read from the
/// connection) goes out before anything else, then reads of up to `chunk`
/// bytes. Forwards and egress connections both ride it.
pub async fn pipe(
    stream: TcpStream,
    first: Vec<u8>,
    chunk: usize,
    mut inbound: tonic::Streaming<pb::RelayFrame>,
    tx: mpsc::Sender<pb::RelayFrame>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let up = async move {
        if !first.is_empty() && tx.send(data(first.into())).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; chunk];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send(data(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        // Dropping `tx` closes our half of the relay.
    };
    let down = async move {
        while let Ok(Some(f)) = inbound.message().await {
            if let Some(Frame::Data(b)) = f.frame
                && wr.write_all(&b).await.is_err()
            {
                break;
            }
        }
        // The gateway closed its half: no more bytes for the connection.
        let _ = wr.shutdown().await;
    };
    tokio::join!(up, down);
}
