//! Issue 13, item 1: a sandbox cannot knock the gateway over through its
//! supervisor socket. Sandbox code cannot connect at all; a hostile
//! supervisor (this test process, root, standing in for one) can, and its
//! floods of connections, unfinished streams and oversized hellos cost only
//! bounded memory, descriptors and log lines, while the gateway keeps
//! answering Health and another sandbox's exec keeps working.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::harness::{TestGateway, condition};
use crate::process::{exec, process_gateway, ready};

#[tokio::test]
async fn issue_13_sandbox_code_cannot_connect_to_its_supervisor_socket() {
    let mut gw = process_gateway().await;
    ready(&mut gw, "sock-a", 0).await;
    // Both the supervisor socket and the egress socket (where the
    // supervisor hands over client connections).
    let probe = "import socket\n\
        for p in ['/run/openshell/gateway.sock', '/run/openshell/egress.sock']:\n\
        \x20   s = socket.socket(socket.AF_UNIX)\n\
        \x20   try:\n        s.connect(p)\n        print('connected')\n\
        \x20   except OSError as e:\n        print(type(e).__name__)\n";
    let ran = exec(&mut gw, "sock-a", &["/usr/bin/python3", "-c", probe], None)
        .await
        .unwrap();
    assert_eq!(
        ran.exit,
        0,
        "{ran:?} {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let out = ran.out();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["PermissionError", "PermissionError"],
        "uid 1000 inside the sandbox reached a supervisor socket: {out:?}"
    );
    // The supervisor itself still connects (the sandbox is Ready and exec ran).
    gw.stop().await;
}

/// The gateway under attack, a sandbox whose socket is attacked (the echo
/// fixture, no real supervisor) and a process sandbox that must keep working.
struct Siege {
    gw: TestGateway,
    socket: PathBuf,
    _state: tempfile::TempDir,
}

impl Siege {
    async fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        let cfg = TestGateway::config(state.path(), Some("sqlite::memory:"));
        let mut gw = TestGateway::start_alone(cfg).await;
        gw.load_process().await;
        ready(&mut gw, "bystander", 0).await;
        gw.load("echo", "fixture-echo", &["log", "files"]).await;
        let sb = gw.create("target", "echo").await.unwrap();
        gw.wait_for("target", "launched", |s| condition(s, "Driver").is_some())
            .await;
        let id = SandboxId::parse(&sb.id).unwrap();
        gw.runtime().supervisors().expect_secret(id, "s3cret");
        let socket = gw.runtime().plugins().supervisor_socket(&sb.id);
        Self {
            gw,
            socket,
            _state: state,
        }
    }

    /// Health from another client, each within 2 s, until `stop` flips.
    async fn watch_health(&self) -> (tokio::task::JoinHandle<(usize, Vec<String>)>, Stop) {
        let mut other = TestGateway::client_for(&self.gw).await;
        let stop = Stop::default();
        let done = stop.0.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failures) = (0, Vec::new());
            while !done.load(Ordering::SeqCst) {
                let call = other.client.health(pb::HealthRequest {});
                match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(s)) => failures.push(format!("{s}")),
                    Err(_) => failures.push("no answer within 2 s".into()),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failures)
        });
        (task, stop)
    }

    async fn bystander_exec_works(&mut self) {
        let call = exec(
            &mut self.gw,
            "bystander",
            &["/bin/echo", "still here"],
            None,
        );
        let ran = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the bystander's exec finished")
            .expect("the bystander's exec succeeded");
        assert_eq!(ran.out(), "still here\n");
    }

    async fn finish(mut self, health: tokio::task::JoinHandle<(usize, Vec<String>)>, stop: Stop) {
        self.bystander_exec_works().await;
        stop.0.store(true, Ordering::SeqCst);
        let (ok, failures) = health.await.unwrap();
        assert!(
            failures.is_empty(),
            "Health failed under attack: {failures:?}"
        );
        assert!(ok > 0);
        self.gw.stop().await;
    }
}

#[derive(Default)]
struct Stop(Arc<std::sync::atomic::AtomicBool>);

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// This process's descriptor count once the gateway has accepted whatever
/// it will: it holds still for ten polls in a row (20 s at most).
async fn settled_fds() -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut last, mut still) = (open_fds(), 0);
    while still < 10 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = open_fds();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    last
}

const MB: u64 = 1 << 20;

#[tokio::test]
async fn issue_13_a_flood_of_idle_connections_takes_few_descriptors_and_no_service() {
    let log = LogCounter::install();
    let siege = Siege::start().await;
    let (health, stop) = siege.watch_health().await;
    let before = open_fds();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..1_100 {
        match UnixStream::connect(&siege.socket).await {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    let server_side = settled_fds().await.saturating_sub(before + held.len());
    eprintln!(
        "idle connections: {} open, {refused} refused by the kernel, {server_side} descriptors on the gateway's side",
        held.len()
    );
    assert!(
        server_side < 50,
        "the gateway holds {server_side} descriptors for one socket's idle connections"
    );
    let mut siege = siege;
    siege.bystander_exec_works().await;
    drop(held);
    siege.finish(health, stop).await;
    log.assert_quiet();
}

/// Four connections stream `streams` copies of `message` each to `path`;
/// the gateway's RSS must grow by less than `bound` while it keeps serving.
async fn memory_attack(what: &str, path: &'static str, streams: u32, message: Message, bound: u64) {
    let log = LogCounter::install();
    let siege = Siege::start().await;
    let (health, stop) = siege.watch_health().await;
    let before = rss_bytes();
    let sent = Arc::new(AtomicU64::new(0));
    let attacks: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(raw_streams(
                siege.socket.clone(),
                path,
                streams,
                message.clone(),
                sent.clone(),
            ))
        })
        .collect();
    let peak = watch_rss_until_quiet(&sent).await;
    eprintln!(
        "{what}: {} MB sent, RSS {} MB before, peak {} MB",
        sent.load(Ordering::SeqCst) / MB,
        before / MB,
        peak / MB
    );
    assert!(
        peak.saturating_sub(before) < bound,
        "{what}: RSS grew from {} MB to {} MB",
        before / MB,
        peak / MB
    );
    let mut siege = siege;
    siege.bystander_exec_works().await;
    for a in attacks {
        a.abort();
    }
    siege.finish(health, stop).await;
    log.assert_quiet();
}

#[tokio::test]
async fn issue_13_unfinished_4_mb_streams_do_not_grow_the_gateways_memory() {
    memory_attack(
        "unfinished streams",
        "/openshell.v1.Supervisor/RelayStream",
        100,
        Message::unfinished(4 * MB as usize),
        200 * MB,
    )
    .await;
}

#[tokio::test]
async fn issue_13_hellos_with_a_1_mb_id_cost_neither_memory_nor_log() {
    // Each hello is refused at its length prefix, before it is buffered
    // (the old gateway decoded all 100 MB).
    memory_attack(
        "1 MB hellos",
        "/openshell.v1.Supervisor/ConnectSupervisor",
        25,
        Message::hello_with_id(MB as usize),
        50 * MB,
    )
    .await;
}

/// The highest RSS seen until no attack byte was sent for a second (at
/// most 30 s).
async fn watch_rss_until_quiet(sent: &AtomicU64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut peak, mut last, mut quiet) = (0, u64::MAX, 0);
    while tokio::time::Instant::now() < deadline && quiet < 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_bytes());
        let now = sent.load(Ordering::SeqCst);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    peak
}

/// One gRPC message as raw bytes: a prefix, then filler up to `len`;
/// `send` of them are written (fewer than `len + 5` leaves it unfinished).
#[derive(Clone)]
struct Message {
    head: Vec<u8>,
    /// How many bytes of the framed message to send.
    send: usize,
}

impl Message {
    fn unfinished(len: usize) -> Self {
        let mut head = vec![0u8];
        head.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        Self {
            head,
            send: len + 5 - 1,
        }
    }

    /// A SupervisorMessage { hello: SupervisorHello { sandbox_id: "a" * n } }.
    fn hello_with_id(n: usize) -> Self {
        let mut id_field = vec![0x0a];
        varint(&mut id_field, n);
        let hello_len = id_field.len() + n;
        let mut body = vec![0x0a];
        varint(&mut body, hello_len);
        body.extend_from_slice(&id_field);
        let len = body.len() + n;
        let mut head = vec![0u8];
        head.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        head.extend_from_slice(&body);
        Self {
            head,
            send: len + 5,
        }
    }
}

fn varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A hand-written HTTP/2 client (a hostile supervisor does not use
/// tonic): opens `streams` streams to `path` on one connection and sends
/// `msg` on each, honouring flow control, then keeps them open. Filler
/// comes from one static buffer, so the attacker's memory stays small and
/// the RSS measured is the gateway's.
async fn raw_streams(
    socket: PathBuf,
    path: &'static str,
    streams: u32,
    msg: Message,
    sent: Arc<AtomicU64>,
) {
    static FILLER: [u8; 16_384] = [b'a'; 16_384];
    let Ok(conn) = UnixStream::connect(&socket).await else {
        return;
    };
    let (mut rd, mut wr) = conn.into_split();
    let flow = Arc::new(Flow::default());
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let reader = {
        let flow = flow.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 9];
            while rd.read_exact(&mut head).await.is_ok() {
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut body = vec![0u8; len];
                if rd.read_exact(&mut body).await.is_err() {
                    break;
                }
                match kind {
                    // SETTINGS: apply the initial window, then ack.
                    4 if flags & 1 == 0 => {
                        for s in body.chunks_exact(6) {
                            if u16::from_be_bytes([s[0], s[1]]) == 4 {
                                let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                                flow.set_initial(i64::from(v));
                            }
                        }
                        let _ = ctl_tx.send(frame(4, 1, 0, &[]));
                    }
                    // PING: answer.
                    6 if flags & 1 == 0 => {
                        let _ = ctl_tx.send(frame(6, 1, 0, &body));
                    }
                    8 => {
                        let inc =
                            u32::from_be_bytes([body[0], body[1], body[2], body[3]]) & 0x7fff_ffff;
                        flow.grant(id, i64::from(inc));
                    }
                    // RST_STREAM, or the server's HEADERS ending the stream.
                    3 => flow.kill(id),
                    1 if flags & 1 == 1 => flow.kill(id),
                    7 => flow.kill_all(),
                    _ => {}
                }
                flow.wake.notify_one();
            }
            flow.kill_all();
            flow.wake.notify_one();
        })
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    let ids: Vec<u32> = (0..streams).map(|i| 1 + 2 * i).collect();
    let block = headers(path);
    for &id in &ids {
        out.extend(frame(1, 0x4, id, &block));
        flow.open(id);
    }
    if wr.write_all(&out).await.is_err() {
        reader.abort();
        return;
    }
    let framed: Vec<u8> = msg.head.clone();
    let mut progress: HashMap<u32, usize> = ids.iter().map(|&id| (id, 0)).collect();
    loop {
        while let Ok(c) = ctl_rx.try_recv() {
            if wr.write_all(&c).await.is_err() {
                reader.abort();
                return;
            }
        }
        let mut wrote = false;
        for &id in &ids {
            let done = progress[&id];
            if done >= msg.send {
                continue;
            }
            let want = (msg.send - done).min(FILLER.len());
            let n = flow.take(id, want);
            if n == 0 {
                continue;
            }
            // The message's head, then filler.
            let mut chunk = Vec::with_capacity(n);
            let start = done.min(framed.len());
            chunk.extend_from_slice(&framed[start..(start + n).min(framed.len())]);
            chunk.extend_from_slice(&FILLER[..n - chunk.len()]);
            if wr.write_all(&frame(0, 0, id, &chunk)).await.is_err() {
                reader.abort();
                return;
            }
            progress.insert(id, done + n);
            sent.fetch_add(n as u64, Ordering::SeqCst);
            wrote = true;
        }
        if !wrote {
            if flow.all_dead() {
                break;
            }
            tokio::select! {
                _ = flow.wake.notified() => {}
                Some(c) = ctl_rx.recv() => {
                    if wr.write_all(&c).await.is_err() { break; }
                }
            }
        }
    }
    // Keep the connection open until aborted.
    std::future::pending::<()>().await;
}

#[derive(Default)]
struct Flow {
    state: Mutex<FlowState>,
    wake: tokio::sync::Notify,
}

struct FlowState {
    conn: i64,
    initial: i64,
    streams: HashMap<u32, i64>,
    dead: HashSet<u32>,
    all_dead: bool,
}

impl Default for FlowState {
    fn default() -> Self {
        Self {
            conn: 65_535,
            initial: 65_535,
            streams: HashMap::new(),
            dead: HashSet::new(),
            all_dead: false,
        }
    }
}

impl Flow {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.state.lock().unwrap()
    }
    fn open(&self, id: u32) {
        let mut s = self.lock();
        let w = s.initial;
        s.streams.insert(id, w);
    }
    fn set_initial(&self, v: i64) {
        let mut s = self.lock();
        let delta = v - s.initial;
        s.initial = v;
        for w in s.streams.values_mut() {
            *w += delta;
        }
    }
    fn grant(&self, id: u32, inc: i64) {
        let mut s = self.lock();
        if id == 0 {
            s.conn += inc;
        } else if let Some(w) = s.streams.get_mut(&id) {
            *w += inc;
        }
    }
    fn kill(&self, id: u32) {
        self.lock().dead.insert(id);
    }
    fn kill_all(&self) {
        self.lock().all_dead = true;
    }
    fn all_dead(&self) -> bool {
        let s = self.lock();
        s.all_dead || s.streams.keys().all(|id| s.dead.contains(id))
    }
    /// Up to `want` bytes the windows allow on `id` now.
    fn take(&self, id: u32, want: usize) -> usize {
        let mut s = self.lock();
        if s.all_dead || s.dead.contains(&id) {
            return 0;
        }
        let stream = s.streams.get(&id).copied().unwrap_or(0);
        let n = (want as i64).min(stream).min(s.conn).max(0);
        s.conn -= n;
        if let Some(w) = s.streams.get_mut(&id) {
            *w -= n;
        }
        n as usize
    }
}

fn frame(kind: u8, flags: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// HPACK literals without indexing (no Huffman, no table).
fn headers(path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "sandbox.invalid"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        b.push(0);
        b.push(u8::try_from(k.len()).unwrap());
        b.extend_from_slice(k.as_bytes());
        b.push(u8::try_from(v.len()).unwrap());
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// Counts what the gateway logs at INFO and above on this test's thread
/// (the test runtime is single-threaded, so every gateway task logs here).
struct LogCounter {
    bytes: Arc<AtomicUsize>,
    lines: Arc<AtomicUsize>,
    _guard: tracing::subscriber::DefaultGuard,
}

/// The most the whole attack may add to the log (the old gateway wrote a
/// line per rejected hello: 108 lines for 100 of them).
const LOG_BUDGET: usize = 64 * 1024;
const LOG_LINES: usize = 50;

impl LogCounter {
    fn install() -> Self {
        let bytes = Arc::new(AtomicUsize::new(0));
        let lines = Arc::new(AtomicUsize::new(0));
        let sub = Counting {
            bytes: bytes.clone(),
            lines: lines.clone(),
        };
        Self {
            bytes,
            lines,
            _guard: tracing::subscriber::set_default(sub),
        }
    }

    fn assert_quiet(&self) {
        let (bytes, lines) = (
            self.bytes.load(Ordering::SeqCst),
            self.lines.load(Ordering::SeqCst),
        );
        eprintln!("the gateway logged {lines} lines, {bytes} bytes");
        assert!(
            bytes < LOG_BUDGET && lines < LOG_LINES,
            "{lines} lines, {bytes} bytes logged"
        );
    }
}

struct Counting {
    bytes: Arc<AtomicUsize>,
    lines: Arc<AtomicUsize>,
}

struct Measure(usize);

impl tracing::field::Visit for Measure {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0 += f.name().len() + format!("{v:?}").len() + 2;
    }
}

impl tracing::Subscriber for Counting {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::INFO
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut m = Measure(0);
        e.record(&mut m);
        self.bytes.fetch_add(m.0, Ordering::SeqCst);
        self.lines.fetch_add(1, Ordering::SeqCst);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The same flood from where a compromised supervisor really sits: inside
/// a process sandbox, as its uid 0 (the supervisor's own uid), through the
/// socket path the sandbox sees. `nsenter` joins the supervisor's user and
/// mount namespaces, which makes the flood uid 0 of the sandbox, as the
/// supervisor is.
#[tokio::test]
async fn issue_13_a_flood_from_inside_a_sandbox_as_its_supervisors_uid_is_bounded() {
    let state = tempfile::tempdir().unwrap();
    let cfg = TestGateway::config(state.path(), Some("sqlite::memory:"));
    let mut gw = TestGateway::start_alone(cfg).await;
    gw.load_process().await;
    ready(&mut gw, "bystander", 0).await;
    let victim = ready(&mut gw, "victim", 0).await;
    let supervisor = crate::process::sandbox_pids(&victim.id)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("openshell-supervisor"))
        .map(|(pid, _)| pid)
        .expect("the victim's supervisor runs");

    let script = "import socket, sys\n\
        held, refused = [], 0\n\
        for _ in range(1100):\n\
        \x20   s = socket.socket(socket.AF_UNIX)\n\
        \x20   try:\n\
        \x20       s.connect('/run/openshell/gateway.sock'); held.append(s)\n\
        \x20   except OSError:\n\
        \x20       refused += 1\n\
        print('uid', __import__('os').getuid(), 'held', len(held), 'refused', refused, flush=True)\n\
        sys.stdin.read()\n";
    let before = open_fds();
    let mut flood = tokio::process::Command::new("nsenter")
        .args([
            "-t",
            &supervisor.to_string(),
            "-U",
            "-m",
            "--",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("nsenter runs");
    let mut out = tokio::io::BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line),
    )
    .await
    .expect("the flood reports")
    .unwrap();
    eprintln!("flood from inside the sandbox: {}", line.trim());
    assert!(
        line.starts_with("uid 0 "),
        "the flood runs as the supervisor's uid: {line}"
    );

    // The gateway holds few descriptors for it and keeps serving.
    let server_side = settled_fds().await.saturating_sub(before);
    assert!(
        server_side < 50,
        "the gateway holds {server_side} descriptors for the flood"
    );
    let mut other = TestGateway::client_for(&gw).await;
    for i in 0..5 {
        let call = other.client.health(pb::HealthRequest {});
        tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .unwrap_or_else(|_| panic!("health call {i} hung under the flood"))
            .unwrap();
    }
    let ran = tokio::time::timeout(
        Duration::from_secs(10),
        exec(&mut gw, "bystander", &["/bin/echo", "still here"], None),
    )
    .await
    .expect("the bystander's exec finished")
    .unwrap();
    assert_eq!(ran.out(), "still here\n");

    // The flood ends; the victim's own supervisor still serves it.
    drop(flood.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(10), flood.wait()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match exec(&mut gw, "victim", &["/bin/echo", "victim ok"], None).await {
            Ok(r) if r.out() == "victim ok\n" => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the victim never served again: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.stop().await;
}
