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

/// Bytes per read between two sockets: nothing waits in a channel here,
/// so a larger buffer costs one allocation per direction.
const SOCKET_CHUNK: usize = 256 * 1024;

/// Between the client's socket (passed by the supervisor) and the
/// destination, until both sides have closed their halves (or the task is
/// aborted: dropping both closes both).
pub async fn sockets(client: TcpStream, dest: TcpStream, bucket: Bucket) {
    let (cr, cw) = client.into_split();
    let (dr, dw) = dest.into_split();
    let up = pump(cr, dw, bucket.clone());
    let down = pump(dr, cw, bucket);
    tokio::pin!(up, down);
    // A half closed in order waits for the other; a failed one (a reset)
    // ends both at once, so a silent destination holds nothing after its
    // client went away.
    tokio::select! {
        clean = &mut up => if clean { down.await; },
        clean = &mut down => if clean { up.await; },
    }
}

/// Copies until `from` ends; true if it ended in order (and `to` was shut
/// down), false on an error either side.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bucket: Bucket,
) -> bool {
    let mut buf = vec![0u8; SOCKET_CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) => return to.shutdown().await.is_ok(),
            Err(_) => return false,
            Ok(n) => {
                bucket.spend(n).await;
                if to.write_all(&buf[..n]).await.is_err() {
                    return false;
                }
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

    #[tokio::test]
    async fn an_unbounded_bucket_never_waits() {
        let b = Bucket::new(0);
        let start = std::time::Instant::now();
        b.spend(usize::MAX).await;
        assert!(start.elapsed() < Duration::from_millis(50));
    }
}
