//! The sandbox's main process: started once per supervisor process, on the
//! gateway's first `main` relay, and owned by us, not by any relay, so it
//! outlives the gateway's restarts. Its output is split into lines and
//! held in a bounded buffer, numbered, until a relay streams it to the
//! gateway (which keeps the log); a relay that comes back after a
//! reconnect resumes from the number it asks for.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use openshell_proto::v1 as pb;
use pb::relay_frame::Frame;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

use crate::Config;
use crate::spawn::{self, Stream};

/// Output held for the gateway, at most (older lines are dropped first;
/// the gateway sees the gap in the numbers).
const MAX_HELD_BYTES: usize = 4 << 20;
/// A line longer than this is cut into records of this size.
const MAX_LINE: usize = 16 * 1024;

#[derive(Default)]
struct Held {
    started: bool,
    records: VecDeque<pb::MainOutput>,
    bytes: usize,
    next_seq: u64,
}

/// The main process's buffered output; one per supervisor process.
pub struct MainProcess {
    held: Mutex<Held>,
    /// The next sequence number, for relays waiting for more.
    pushed: watch::Sender<u64>,
}

impl Default for MainProcess {
    fn default() -> Self {
        Self {
            held: Mutex::default(),
            pushed: watch::channel(0).0,
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl MainProcess {
    fn push(&self, source: pb::LogSource, data: Vec<u8>, exit_code: Option<i32>) {
        let seq = {
            let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let seq = h.next_seq;
            h.next_seq += 1;
            h.bytes += data.len();
            h.records.push_back(pb::MainOutput {
                seq,
                record: Some(pb::LogRecord {
                    time_ms: now_ms(),
                    source: source as i32,
                    data: data.into(),
                    exit_code,
                }),
            });
            while h.bytes > MAX_HELD_BYTES {
                let Some(old) = h.records.pop_front() else {
                    break;
                };
                h.bytes -= old.record.map_or(0, |r| r.data.len());
            }
            seq
        };
        self.pushed.send_replace(seq + 1);
    }

    /// Starts `start` unless a main process was started already.
    fn start_once(self: &Arc<Self>, cfg: &Config, start: &pb::ExecStart) {
        {
            let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if h.started {
                return;
            }
            h.started = true;
        }
        let cmd = spawn::Command {
            argv: start.argv.iter().map(Into::into).collect(),
            env: start.environment.clone().into_iter().collect(),
            workdir: (!start.workdir.is_empty()).then(|| start.workdir.clone()),
            tty: None,
        };
        let spawned = match spawn::spawn(cfg, &cmd) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("openshell: {}\n", crate::report::wire(&e));
                self.push(pb::LogSource::Stderr, msg.into_bytes(), None);
                let code = e.exit_code();
                self.push(pb::LogSource::Event, exited(code), Some(code));
                return;
            }
        };
        let spawn::Spawned {
            mut child,
            stdin,
            readers,
            ..
        } = spawned;
        drop(stdin);
        let me = self.clone();
        tokio::spawn(async move {
            let pumps: Vec<_> = readers
                .into_iter()
                .map(|(stream, r)| tokio::spawn(lines(me.clone(), stream, r)))
                .collect();
            let code = spawn::exit_code(child.wait().await);
            for p in pumps {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), p).await;
            }
            me.push(pb::LogSource::Event, exited(code), Some(code));
        });
    }

    /// Serves one `main` relay: starts the process if need be, then sends
    /// every record from `from_seq` on as it comes, until the gateway
    /// closes the relay.
    pub async fn serve(
        self: Arc<Self>,
        cfg: &Config,
        m: pb::MainProcess,
        mut inbound: tonic::Streaming<pb::RelayFrame>,
        tx: mpsc::Sender<pb::RelayFrame>,
    ) {
        if let Some(start) = &m.start {
            self.start_once(cfg, start);
        }
        let mut next = m.from_seq;
        let mut pushed = self.pushed.subscribe();
        loop {
            let batch: Vec<pb::MainOutput> = {
                let h = self.held.lock().unwrap_or_else(|p| p.into_inner());
                h.records
                    .iter()
                    .filter(|r| r.seq >= next)
                    .cloned()
                    .collect()
            };
            for r in batch {
                next = r.seq + 1;
                let f = pb::RelayFrame {
                    frame: Some(Frame::MainOutput(r)),
                };
                if tx.send(f).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = pushed.changed() => if changed.is_err() { return },
                // The gateway closed the relay (or is gone).
                f = inbound.message() => if !matches!(f, Ok(Some(_))) { return },
            }
        }
    }
}

fn exited(code: i32) -> Vec<u8> {
    format!("main process exited with code {code}").into_bytes()
}

/// Reads one stream of the main process into records, a line each.
async fn lines(
    main: Arc<MainProcess>,
    stream: Stream,
    mut r: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
) {
    let source = match stream {
        Stream::Stdout => pb::LogSource::Stdout,
        Stream::Stderr => pb::LogSource::Stderr,
    };
    let mut line = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            line.push(b);
            if b == b'\n' || line.len() >= MAX_LINE {
                main.push(source, std::mem::take(&mut line), None);
            }
        }
    }
    if !line.is_empty() {
        main.push(source, line, None);
    }
}
