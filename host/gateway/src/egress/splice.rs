//! Bytes between an egress relay and the connection the gateway dialled,
//! both ways, under the sandbox's byte rate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_proto::v1 as pb;
use pb::relay_frame::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::supervisor::RelayConn;

/// Bytes per read and frame: small enough that a stalled connection holds
/// little (the relay's channel holds 4 frames), large enough to stream.
pub const CHUNK: usize = 64 * 1024;

/// One sandbox's byte budget, shared by its connections: a bucket that
/// may go into debt by one chunk and is paid back at `rate` bytes per
/// second (a second's worth at most is saved up).
#[derive(Clone, Debug)]
pub struct Bucket(Option<Arc<Mutex<State>>>);

#[derive(Debug)]
struct State {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// `rate` 0: unbounded.
    pub fn new(rate: u64) -> Self {
        Self((rate > 0).then(|| {
            Arc::new(Mutex::new(State {
                rate: rate as f64,
                tokens: rate as f64,
                at: Instant::now(),
            }))
        }))
    }

    /// Spends `n` bytes, waiting while the bucket is in debt.
    pub async fn spend(&self, n: usize) {
        let Some(state) = &self.0 else { return };
        let wait = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let earned = now.duration_since(s.at).as_secs_f64() * s.rate;
            s.tokens = (s.tokens + earned).min(s.rate);
            s.at = now;
            s.tokens -= n as f64;
            (s.tokens < 0.0).then(|| Duration::from_secs_f64(-s.tokens / s.rate))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

fn data(b: prost::bytes::Bytes) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(Frame::Data(b)),
    }
}

/// Until both sides have closed their halves (or the task is aborted:
/// dropping both ends closes both connections).
pub async fn splice(stream: TcpStream, conn: RelayConn, bucket: Bucket) {
    let (mut rd, mut wr) = stream.into_split();
    let RelayConn {
        mut from_sandbox,
        to_sandbox,
    } = conn;
    let down_bucket = bucket.clone();
    let down = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            // A relay the supervisor dropped (a stop, a reconnect) ends this
            // even if the destination stays silent.
            let read = tokio::select! {
                r = rd.read(&mut buf) => r,
                () = to_sandbox.closed() => return,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    down_bucket.spend(n).await;
                    let b = prost::bytes::Bytes::copy_from_slice(&buf[..n]);
                    if to_sandbox.send(data(b)).await.is_err() {
                        return;
                    }
                }
            }
        }
        // Dropping `to_sandbox` closes our half of the relay.
    };
    let up = async move {
        while let Ok(Some(f)) = from_sandbox.message().await {
            if let Some(Frame::Data(b)) = f.frame {
                bucket.spend(b.len()).await;
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::join!(up, down);
}

/// The pipe between two sockets (bytes in flight per direction): what a
/// socket-to-pipe splice moves at once.
const PIPE: usize = 1 << 20;

/// Between the client's socket (passed by the supervisor) and the
/// destination, until both sides have closed their halves (or the task is
/// aborted: dropping both closes both).
pub async fn sockets(client: TcpStream, dest: TcpStream, bucket: Bucket) {
    let up = pump(&client, &dest, bucket.clone());
    let down = pump(&dest, &client, bucket);
    tokio::pin!(up, down);
    // A half closed in order waits for the other; a failed one (a reset)
    // ends both at once, so a silent destination holds nothing after its
    // client went away.
    tokio::select! {
        clean = &mut up => if clean { down.await; },
        clean = &mut down => if clean { up.await; },
    }
}

/// Moves bytes from `from` to `to` until `from` ends, through a pipe with
/// splice(2): the kernel hands the pages on, nothing is copied through
/// this process. True if it ended in order (and `to`'s write half was shut
/// down), false on an error either side.
async fn pump(from: &TcpStream, to: &TcpStream, bucket: Bucket) -> bool {
    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
    use tokio::io::Interest;
    let Ok((pipe_r, pipe_w)) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) else {
        return false;
    };
    // The default is 64 KiB; a larger pipe is fewer system calls per byte.
    let _ = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(PIPE as i32));
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let moved = from
            .async_io(Interest::READABLE, || {
                splice(from, None, &pipe_w, None, PIPE, flags).map_err(std::io::Error::from)
            })
            .await;
        let n = match moved {
            Ok(0) => {
                let down = nix::sys::socket::Shutdown::Write;
                return nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(to), down)
                    .is_ok();
            }
            Ok(n) => n,
            Err(_) => return false,
        };
        bucket.spend(n).await;
        let mut left = n;
        while left > 0 {
            let sent = to
                .async_io(Interest::WRITABLE, || {
                    splice(&pipe_r, None, to, None, left, flags).map_err(std::io::Error::from)
                })
                .await;
            match sent {
                Ok(m) if m > 0 => left -= m,
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_holds_a_rate_over_time() {
        let b = Bucket::new(1000);
        let start = Instant::now();
        // A second's worth is saved up; the next 3000 bytes take 3 s.
        for _ in 0..40 {
            b.spend(100).await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2900), "{took:?}");
        assert!(took <= Duration::from_millis(3200), "{took:?}");
    }

    /// Both ways, in order: what goes in one end comes out the other,
    /// intact, and a half-close passes through as a half-close.
    #[tokio::test]
    async fn sockets_carry_both_ways_and_pass_half_closes_on() {
        use sha2::{Digest, Sha256};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (client_end, near) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (dest_end, far) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (mut client_end, mut dest_end) = (client_end.unwrap(), dest_end.unwrap());
        let task = tokio::spawn(sockets(near.unwrap().0, far.unwrap().0, Bucket::new(0)));
        let up: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let want = Sha256::digest(&up);
        let writer = tokio::spawn(async move {
            client_end.write_all(&up).await.unwrap();
            client_end.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_end.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        dest_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(Sha256::digest(&got), want, "{} bytes", got.len());
        dest_end.write_all(b"reply").await.unwrap();
        dest_end.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_unbounded_bucket_never_waits() {
        let b = Bucket::new(0);
        let start = std::time::Instant::now();
        b.spend(usize::MAX).await;
        assert!(start.elapsed() < Duration::from_millis(50));
    }
}
