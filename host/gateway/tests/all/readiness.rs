//! Gateway-owned readiness, driven by a supervisor client speaking real
//! gRPC over the sandbox's own unix socket.

use std::time::Duration;

use openshell_core::{Event, SandboxId};
use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use pb::gateway_message::Msg as G;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::harness::{TestGateway, condition, phase};

async fn unix_channel(path: std::path::PathBuf) -> Channel {
    Endpoint::try_from("http://sandbox.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// A hand-driven supervisor: says hello and reports the first answer.
pub struct FakeSupervisor {
    tx: mpsc::Sender<pb::SupervisorMessage>,
    inbound: tonic::Streaming<pb::GatewayMessage>,
}

impl FakeSupervisor {
    pub async fn connect(gw: &TestGateway, socket_of: &str, id: &str, secret: &str) -> (Self, G) {
        let socket = gw.runtime().plugins().supervisor_socket(socket_of);
        let mut client = SupervisorClient::new(unix_channel(socket).await);
        let (tx, rx) = mpsc::channel(8);
        tx.send(pb::SupervisorMessage {
            msg: Some(pb::supervisor_message::Msg::Hello(pb::SupervisorHello {
                sandbox_id: id.into(),
                instance_id: "test".into(),
                secret: secret.into(),
                ssh_host_key: String::new(),
            })),
        })
        .await
        .unwrap();
        let mut inbound = client
            .connect_supervisor(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = inbound.message().await.unwrap().unwrap().msg.unwrap();
        (Self { tx, inbound }, first)
    }

    /// Keeps the session alive by answering heartbeats, until dropped.
    pub fn keep_alive(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok(Some(_)) = self.inbound.message().await {
                let hb = pb::SupervisorMessage {
                    msg: Some(pb::supervisor_message::Msg::Heartbeat(pb::Heartbeat {})),
                };
                if self.tx.send(hb).await.is_err() {
                    return;
                }
            }
        })
    }
}

/// A sandbox from the echo fixture (no real supervisor), with a known secret.
pub async fn sandbox_with_secret(gw: &mut TestGateway, name: &str, secret: &str) -> String {
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    let sb = gw.create(name, "echo").await.unwrap();
    gw.wait_for(name, "launched", |s| condition(s, "Driver").is_some())
        .await;
    let id = SandboxId::parse(&sb.id).unwrap();
    gw.runtime().supervisors().expect_secret(id, secret);
    sb.id
}

#[tokio::test]
async fn a_supervisor_session_promotes_and_its_end_demotes() {
    let mut gw = TestGateway::start().await;
    let id = sandbox_with_secret(&mut gw, "r1", "s3cret").await;
    let (sup, first) = FakeSupervisor::connect(&gw, &id, &id, "s3cret").await;
    assert!(matches!(first, G::Accepted(_)), "{first:?}");
    let alive = sup.keep_alive();
    let sb = gw
        .wait_for("r1", "Ready", |s| phase(s) == pb::SandboxPhase::Ready)
        .await;
    assert_eq!(
        condition(&sb, "Ready").unwrap().reason,
        "SupervisorConnected"
    );

    alive.abort();
    let sb = gw
        .wait_for("r1", "demoted", |s| {
            phase(s) == pb::SandboxPhase::Provisioning
        })
        .await;
    assert_eq!(
        condition(&sb, "Ready").unwrap().reason,
        "SupervisorDisconnected"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_silent_supervisor_is_dropped_after_two_heartbeats() {
    let mut gw = TestGateway::start().await;
    let id = sandbox_with_secret(&mut gw, "r2", "s").await;
    // Connect, then never answer (like a SIGSTOPped process).
    let (_frozen, _) = FakeSupervisor::connect(&gw, &id, &id, "s").await;
    gw.wait_for("r2", "Ready", |s| phase(s) == pb::SandboxPhase::Ready)
        .await;
    // Heartbeat is 300 ms in tests; how fast it is noticed is a bench
    // figure, not an assertion: the wait has a generous deadline.
    gw.wait_for("r2", "demoted", |s| {
        phase(s) == pb::SandboxPhase::Provisioning
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_wrong_secret_or_another_sandboxes_id_is_rejected_and_changes_nothing() {
    let mut gw = TestGateway::start().await;
    let a = sandbox_with_secret(&mut gw, "ra", "secret-a").await;
    let b = sandbox_with_secret(&mut gw, "rb", "secret-b").await;
    let before = gw.get("ra").await.unwrap();

    let (_s, first) = FakeSupervisor::connect(&gw, &a, &a, "wrong").await;
    assert!(
        matches!(&first, G::Rejected(r) if r.reason.contains("secret")),
        "{first:?}"
    );
    let (_s, first) = FakeSupervisor::connect(&gw, &a, &a, "").await;
    assert!(matches!(first, G::Rejected(_)), "{first:?}");
    // B's valid credentials on A's socket.
    let (_s, first) = FakeSupervisor::connect(&gw, &a, &b, "secret-b").await;
    assert!(
        matches!(&first, G::Rejected(r) if r.reason.contains("another sandbox")),
        "{first:?}"
    );

    // A rejected hello never registers, so nothing can follow it.
    assert!(
        !gw.runtime()
            .supervisors()
            .sessions()
            .has_session(SandboxId::parse(&a).unwrap())
    );
    assert_eq!(gw.get("ra").await.unwrap(), before);
    assert_eq!(
        phase(&gw.get("rb").await.unwrap()),
        pb::SandboxPhase::Provisioning
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_sandboxes_socket_serves_no_user_api() {
    let mut gw = TestGateway::start().await;
    let id = sandbox_with_secret(&mut gw, "nu", "s").await;
    let socket = gw.runtime().plugins().supervisor_socket(&id);
    let mut user =
        openshell_proto::v1::open_shell_client::OpenShellClient::new(unix_channel(socket).await);
    let err = user.health(pb::HealthRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    let err = user
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    gw.stop().await;
}

#[tokio::test]
async fn a_newer_session_supersedes_and_the_old_ones_end_does_not_demote() {
    let mut gw = TestGateway::start().await;
    let id = sandbox_with_secret(&mut gw, "r3", "s").await;
    let (old, _) = FakeSupervisor::connect(&gw, &id, &id, "s").await;
    let old = old.keep_alive();
    let (new, _) = FakeSupervisor::connect(&gw, &id, &id, "s").await;
    let _new = new.keep_alive();
    gw.wait_for("r3", "Ready", |s| phase(s) == pb::SandboxPhase::Ready)
        .await;
    // The old stream is closed by the gateway; its end must not demote.
    tokio::time::timeout(Duration::from_secs(10), old)
        .await
        .expect("the gateway closes the superseded stream")
        .unwrap();
    // That no demotion follows can only be watched over a window: poll it.
    let until = tokio::time::Instant::now() + Duration::from_millis(700);
    while tokio::time::Instant::now() < until {
        assert_eq!(phase(&gw.get("r3").await.unwrap()), pb::SandboxPhase::Ready);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_session_registered_before_the_driver_update_is_backfilled() {
    let gw = TestGateway::start().await;
    let rt = gw.runtime();
    // The registry holds a session for a sandbox whose record is written
    // afterwards (the register-before-store race).
    let sb = openshell_core::Sandbox::new(
        openshell_core::SandboxName::parse("race").unwrap(),
        Default::default(),
        None,
        1,
    );
    let (tx, _rx) = mpsc::channel(1);
    let _session = rt
        .supervisors()
        .sessions()
        .register(sb.id, tx, String::new(), String::new());
    rt.store().insert_sandbox(&sb).await.unwrap();
    rt.apply(
        sb.id,
        &[Event::DriverStarting {
            message: "booting".into(),
        }],
        None,
    )
    .await;
    let stored = rt.store().get_sandbox(sb.id).await.unwrap().unwrap();
    assert_eq!(stored.status.phase, openshell_core::Phase::Ready);
}

/// Attack (issue 19): another process that reaches the sandbox's socket
/// (any process of a VM guest reaches its forwarder) cannot open egress
/// or ask the resolver on the live session's behalf, naming whatever
/// binary it likes: only the supervisor that proved the launch secret is
/// told the session's egress token. The supervisor itself, with it, is
/// answered.
#[tokio::test]
async fn issue_19_egress_needs_the_live_sessions_token() {
    let mut gw = TestGateway::start().await;
    let id = sandbox_with_secret(&mut gw, "tok", "s3cret").await;
    let (sup, first) = FakeSupervisor::connect(&gw, &id, &id, "s3cret").await;
    let G::Accepted(accepted) = first else {
        panic!("{first:?}")
    };
    assert_eq!(accepted.egress_token.len(), 64, "{accepted:?}");
    let _alive = sup.keep_alive();
    gw.wait_for("tok", "Ready", |s| phase(s) == pb::SandboxPhase::Ready)
        .await;

    let socket = gw.runtime().plugins().supervisor_socket(&id);
    let mut other = SupervisorClient::new(unix_channel(socket).await);
    let curl = vec![pb::EgressBinary {
        path: "/usr/bin/curl".into(),
        sha256: "0".repeat(64),
    }];
    let lookup = |token: &str| pb::EgressLookup {
        name: "allowed.test".into(),
        binaries: curl.clone(),
        token: token.into(),
    };
    let wrong = format!("{}0", &accepted.egress_token[..63]);
    for token in ["", wrong.as_str(), "not-hex"] {
        let err = other.lookup_egress(lookup(token)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains("egress token"), "{err:?}");
    }
    // An egress relay with a forged token is refused before any frame.
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::Init(pb::RelayInit {
            channel_id: String::new(),
            egress: Some(pb::EgressOpen {
                host: "allowed.test".into(),
                port: 80,
                binaries: curl.clone(),
                via: "proxy".into(),
                token: wrong.clone(),
            }),
        })),
    })
    .await
    .unwrap();
    let err = other
        .relay_stream(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert!(err.message().contains("egress token"), "{err:?}");

    // The same call with the session's token is answered (NXDOMAIN: the
    // sandbox has no policy), so what refused the others was the token.
    let found = other
        .lookup_egress(lookup(&accepted.egress_token))
        .await
        .unwrap()
        .into_inner();
    assert!(found.ports.is_empty() && !found.temporary, "{found:?}");
    gw.stop().await;
}

/// One handoff on the egress socket, as a supervisor sends it, passing
/// `fd` (if any); the verdict, or None if the gateway closed without one.
fn hand_off(
    socket: &std::path::Path,
    token: &str,
    fd: Option<std::os::fd::RawFd>,
) -> Option<pb::EgressVerdict> {
    use prost::Message;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let unix = std::os::unix::net::UnixStream::connect(socket).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let body = pb::EgressHandoff {
        open: Some(pb::EgressOpen {
            host: "allowed.test".into(),
            port: 80,
            binaries: vec![pb::EgressBinary {
                path: "/usr/bin/curl".into(),
                sha256: "0".repeat(64),
            }],
            via: "proxy".into(),
            token: token.into(),
        }),
        reply: Default::default(),
        first: Default::default(),
    }
    .encode_to_vec();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    let fds: Vec<_> = fd.into_iter().collect();
    let cmsgs = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    nix::sys::socket::sendmsg::<nix::sys::socket::UnixAddr>(
        unix.as_raw_fd(),
        &[std::io::IoSlice::new(&out)],
        if fds.is_empty() { &[] } else { &cmsgs },
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = (&unix).read_to_end(&mut got);
    (got.len() >= 4).then(|| pb::EgressVerdict::decode(&got[4..]).unwrap())
}

/// Attack (issue 19), on the egress socket where a process sandbox's
/// supervisor hands over client connections: without the live session's
/// token a handoff is refused, and a passed descriptor that is not a
/// connected TCP socket (a file, a listening socket, none at all) is
/// closed without a verdict. With the token and a socket, it is decided.
#[tokio::test]
async fn issue_19_the_egress_socket_takes_only_the_sessions_tcp_sockets() {
    let mut gw = TestGateway::start().await;
    let id = sandbox_with_secret(&mut gw, "hand", "s3cret").await;
    let (sup, first) = FakeSupervisor::connect(&gw, &id, &id, "s3cret").await;
    let G::Accepted(accepted) = first else {
        panic!("{first:?}")
    };
    let _alive = sup.keep_alive();
    gw.wait_for("hand", "Ready", |s| phase(s) == pb::SandboxPhase::Ready)
        .await;
    let socket = gw
        .runtime()
        .plugins()
        .supervisor_socket(&id)
        .with_file_name("egress.sock");
    let token = accepted.egress_token.clone();
    tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let v = hand_off(&socket, "", Some(tcp.as_raw_fd())).expect("a verdict");
        assert!(!v.allowed && v.reason.contains("egress token"), "{v:?}");
        let file = std::fs::File::open("/etc/hostname").unwrap();
        for fd in [Some(file.as_raw_fd()), Some(server.as_raw_fd()), None] {
            assert_eq!(hand_off(&socket, &token, fd), None, "{fd:?}");
        }
        let v = hand_off(&socket, &token, Some(tcp.as_raw_fd())).expect("a verdict");
        assert!(!v.allowed && !v.reason.contains("egress token"), "{v:?}");
    })
    .await
    .unwrap();
    gw.stop().await;
}
