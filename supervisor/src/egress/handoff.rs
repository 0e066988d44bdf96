//! Handing a client socket to the gateway (`EgressHandoff` on its egress
//! socket, the socket itself as SCM_RIGHTS): the gateway decides, and if
//! it allows, carries the bytes itself, so they never cross this process.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use openshell_proto::v1 as pb;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};

use super::{EgressError, VERDICT_TIMEOUT};

/// A verdict is a few hundred bytes; anything past this is not one.
const MAX_VERDICT: usize = 64 * 1024;

/// Passes `client` with `open`; the gateway's verdict if it allows.
pub async fn hand_off(
    path: &Path,
    client: &TcpStream,
    open: pb::EgressOpen,
    reply: Vec<u8>,
    first: Vec<u8>,
) -> Result<pb::EgressVerdict, EgressError> {
    let broken = |_| EgressError::NoVerdict;
    let mut unix = UnixStream::connect(path)
        .await
        .map_err(|_| EgressError::NoGateway)?;
    let body = pb::EgressHandoff {
        open: Some(open),
        reply: reply.into(),
        first: first.into(),
    }
    .encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    // The socket rides the first send; the rest of a long message follows.
    let fds = [client.as_raw_fd()];
    let sent = unix
        .async_io(Interest::WRITABLE, || {
            sendmsg::<UnixAddr>(
                unix.as_raw_fd(),
                &[IoSlice::new(&out)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        })
        .await
        .map_err(broken)?;
    unix.write_all(&out[sent..]).await.map_err(broken)?;
    let verdict = tokio::time::timeout(VERDICT_TIMEOUT, async {
        let mut len = [0u8; 4];
        unix.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_VERDICT {
            return Err(io::Error::other("the verdict is too long"));
        }
        let mut body = vec![0u8; len];
        unix.read_exact(&mut body).await?;
        pb::EgressVerdict::decode(body.as_slice()).map_err(io::Error::other)
    })
    .await
    .map_err(|_| EgressError::NoVerdict)?
    .map_err(broken)?;
    super::judged(verdict)
}
