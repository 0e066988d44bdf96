//! The egress socket: a process sandbox's supervisor passes each client
//! connection of sandbox code here (SCM_RIGHTS), with what it asks for
//! (`EgressHandoff`), and the gateway carries the bytes between that
//! socket and the destination itself. One copy, in one process, where the
//! relay costs a frame through the supervisor and HTTP/2 both ways.
//!
//! The socket is private like `gateway.sock` (0600, the sandbox root's,
//! in the same directory), a handoff carries the live session's egress
//! token, and the passed descriptor must be a connected TCP socket: a
//! descriptor of any other kind is refused and closed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockType, recvmsg, sockopt};
use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use prost::Message;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::Supervisors;

/// A handoff (its length prefix aside) is at most this: an `EgressOpen`
/// is bounded well below it, and `first` holds at most a request head and
/// what arrived with it.
const MAX_HANDOFF: usize = 256 * 1024;
/// The whole handoff must arrive within this.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handoffs being received at once, per sandbox.
const MAX_RECEIVING: usize = 64;

/// A client connection passed by the supervisor, and what to do with it.
#[derive(Debug)]
pub struct Handoff {
    /// Where the verdict goes (the supervisor answers a refusal itself).
    pub unix: UnixStream,
    /// Sandbox code's connection.
    pub client: TcpStream,
    pub reply: prost::bytes::Bytes,
    pub first: prost::bytes::Bytes,
    /// The connection's share of the socket's egress quota.
    pub permit: OwnedSemaphorePermit,
}

/// Tells the supervisor the verdict (a length, then the message).
pub async fn answer(unix: &mut UnixStream, verdict: &pb::EgressVerdict) {
    let body = verdict.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    let _ = tokio::time::timeout(RECEIVE_TIMEOUT, unix.write_all(&out)).await;
}

/// Serves `listener` until `stop` flips.
pub fn serve(
    listener: UnixListener,
    sandbox: SandboxId,
    supervisors: Arc<Supervisors>,
    egress: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let receiving = Arc::new(Semaphore::new(MAX_RECEIVING));
        loop {
            // At the cap, stop accepting: the supervisor's connect waits in
            // the backlog instead of losing its handoff.
            let Ok(slot) = receiving.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok((unix, _)) = accepted else {
                // Out of descriptors: let some close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (supervisors, egress) = (supervisors.clone(), egress.clone());
            tokio::spawn(async move {
                let received = tokio::time::timeout(RECEIVE_TIMEOUT, receive(&unix)).await;
                drop(slot);
                match received {
                    Ok(Ok((handoff, client))) => {
                        take(sandbox, &supervisors, &egress, unix, handoff, client).await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(sandbox = %sandbox, "egress handoff refused: {e}")
                    }
                    Err(_) => tracing::debug!(sandbox = %sandbox, "egress handoff timed out"),
                }
            });
        }
    });
}

async fn take(
    sandbox: SandboxId,
    supervisors: &Supervisors,
    egress: &Arc<Semaphore>,
    mut unix: UnixStream,
    handoff: pb::EgressHandoff,
    client: TcpStream,
) {
    let refuse = |reason: &str| pb::EgressVerdict {
        allowed: false,
        reason: reason.to_owned(),
        ..Default::default()
    };
    let Some(open) = handoff.open else {
        return answer(&mut unix, &refuse("the handoff names no destination")).await;
    };
    if let Err(e) = super::service::check_egress_open(&open) {
        return answer(&mut unix, &refuse(e.message())).await;
    }
    let Some(handler) = supervisors.egress_for(sandbox, &open.token) else {
        let e = crate::error::ApiError::NoEgressSession.to_string();
        return answer(&mut unix, &refuse(&e)).await;
    };
    let Ok(permit) = egress.clone().try_acquire_owned() else {
        return answer(
            &mut unix,
            &refuse("this sandbox has its limit of egress streams open"),
        )
        .await;
    };
    let handoff = Handoff {
        unix,
        client,
        reply: handoff.reply,
        first: handoff.first,
        permit,
    };
    handler.open_socket(sandbox, open, handoff);
}

/// Reads one handoff and the socket passed with it.
async fn receive(unix: &UnixStream) -> Result<(pb::EgressHandoff, TcpStream), String> {
    let mut buf = vec![0u8; 4 + MAX_HANDOFF];
    let mut len = 0;
    let mut passed: Option<OwnedFd> = None;
    let want = loop {
        let (n, fd) = unix
            .async_io(Interest::READABLE, || {
                recv_with_fd(unix.as_raw_fd(), &mut buf[len..])
            })
            .await
            .map_err(|e| format!("cannot read the handoff: {e}"))?;
        if n == 0 {
            return Err("the supervisor closed before the handoff ended".into());
        }
        // One socket per handoff: any other passed descriptor is closed.
        if passed.is_none() {
            passed = fd;
        }
        len += n;
        if len >= 4 {
            let want = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if want > MAX_HANDOFF {
                return Err(format!(
                    "the handoff is {want} bytes; at most {MAX_HANDOFF}"
                ));
            }
            if len >= 4 + want {
                break want;
            }
        }
    };
    let handoff = pb::EgressHandoff::decode(&buf[4..4 + want])
        .map_err(|e| format!("the handoff does not decode: {e}"))?;
    let fd = passed.ok_or("no socket was passed with the handoff")?;
    Ok((handoff, connected_tcp(fd)?))
}

fn recv_with_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut first = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                #[allow(unsafe_code, reason = "taking ownership of descriptors passed to us")]
                // SAFETY: the kernel installed `raw` in our table for this
                // message just now; nothing else refers to it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if first.is_none() {
                    first = Some(owned);
                }
            }
        }
    }
    Ok((msg.bytes, first))
}

/// The descriptor as a TCP connection, or why it is not one.
fn connected_tcp(fd: OwnedFd) -> Result<TcpStream, String> {
    let not = |what: &str| {
        Err(format!(
            "the passed descriptor is {what}, not a connected TCP socket"
        ))
    };
    match nix::sys::socket::getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(_) => return not("another kind of socket"),
        Err(_) => return not("not a socket"),
    }
    if nix::sys::socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(true) {
        return not("a listening socket");
    }
    let std = std::net::TcpStream::from(fd);
    // A unix or other stream socket has no inet addresses.
    if std.local_addr().is_err() || std.peer_addr().is_err() {
        return not("not a connected inet socket");
    }
    std.set_nonblocking(true)
        .map_err(|e| format!("cannot make the passed socket non-blocking: {e}"))?;
    TcpStream::from_std(std).map_err(|e| format!("cannot use the passed socket: {e}"))
}

/// The egress socket's path beside the supervisor socket.
pub fn path_beside(supervisor_socket: &Path) -> std::path::PathBuf {
    supervisor_socket.with_file_name("egress.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_connected_tcp_socket_is_taken() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(connected_tcp(OwnedFd::from(c)).is_ok());
        let e = connected_tcp(OwnedFd::from(l)).unwrap_err();
        assert!(e.contains("listening"), "{e}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = connected_tcp(OwnedFd::from(a)).unwrap_err();
        assert!(e.contains("not a connected inet socket"), "{e}");
        let f = std::fs::File::open("/etc/hostname").unwrap();
        let e = connected_tcp(OwnedFd::from(f)).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = connected_tcp(OwnedFd::from(u)).unwrap_err();
        assert!(e.contains("another kind"), "{e}");
    }
}
