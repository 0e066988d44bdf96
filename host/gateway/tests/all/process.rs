//! The process driver end to end: real driver component, real launcher,
//! real supervisor, exec over relays.

use std::time::Duration;

use openshell_proto::v1 as pb;
use pb::exec_client_message::Msg as C;
use pb::exec_server_message::Msg as S;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::{TestGateway, condition, phase};

/// Everything one exec produced.
#[derive(Debug, Default)]
pub struct Ran {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: i32,
    /// The order of stream switches, e.g. "oe" for stdout then stderr.
    pub order: String,
}

impl Ran {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

pub async fn exec(
    gw: &mut TestGateway,
    sandbox: &str,
    argv: &[&str],
    stdin: Option<&[u8]>,
) -> Result<Ran, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::ExecClientMessage {
        msg: Some(C::Start(pb::ExecStart {
            sandbox: sandbox.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    if let Some(data) = stdin {
        tx.send(pb::ExecClientMessage {
            msg: Some(C::Stdin(data.to_vec().into())),
        })
        .await
        .unwrap();
        tx.send(pb::ExecClientMessage {
            msg: Some(C::StdinEof(true)),
        })
        .await
        .unwrap();
    }
    let mut stream = gw
        .client
        .exec_sandbox(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut ran = Ran::default();
    while let Some(m) = stream.message().await? {
        match m.msg.unwrap() {
            S::Stdout(b) => {
                ran.stdout.extend(b);
                ran.order.push('o');
            }
            S::Stderr(b) => {
                ran.stderr.extend(b);
                ran.order.push('e');
            }
            S::Exit(code) => {
                ran.exit = code;
                drop(tx);
                return Ok(ran);
            }
        }
    }
    panic!("no exit frame")
}

pub async fn process_gateway() -> TestGateway {
    let mut gw = TestGateway::start().await;
    gw.load_process().await;
    gw
}

pub async fn ready(gw: &mut TestGateway, name: &str, memory_mib: u64) -> pb::Sandbox {
    gw.client
        .create_sandbox(pb::CreateSandboxRequest {
            name: name.into(),
            spec: Some(pb::SandboxSpec {
                driver: "process".into(),
                environment: [("GREETING".to_string(), "hello".to_string())].into(),
                resources: Some(pb::Resources {
                    memory_mib,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            request_id: String::new(),
            policy: String::new(),
        })
        .await
        .unwrap();
    gw.wait_for(name, "Ready", |s| phase(s) == pb::SandboxPhase::Ready)
        .await
}

/// Host pids of processes whose environment names this sandbox.
pub fn sandbox_pids(id: &str) -> Vec<(i32, String)> {
    let needle = format!("OPENSHELL_SANDBOX_ID={id}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

fn supervisor_pid(id: &str) -> i32 {
    let pids = sandbox_pids(id);
    pids.iter()
        .find(|(_, cmd)| cmd.contains("openshell-supervisor"))
        .unwrap_or_else(|| panic!("no supervisor for {id}: {pids:?}"))
        .0
}

/// Launcher processes (outside the sandbox) for this sandbox id.
fn launcher_pids(id: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("openshell-sandbox-init") && cmd.contains(id) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn exec_runs_commands_with_their_exit_codes_streams_and_stdin() {
    let mut gw = process_gateway().await;
    ready(&mut gw, "p1", 0).await;

    let r = exec(&mut gw, "p1", &["echo", "hi"], None).await.unwrap();
    assert_eq!((r.out().as_str(), r.exit), ("hi\n", 0));
    let r = exec(&mut gw, "p1", &["sh", "-c", "exit 3"], None)
        .await
        .unwrap();
    assert_eq!(r.exit, 3);
    let r = exec(
        &mut gw,
        "p1",
        &[
            "sh",
            "-c",
            "echo o1; sleep 0.1; echo e1 >&2; sleep 0.1; echo o2; sleep 0.1; echo e2 >&2",
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.out(), "o1\no2\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "e1\ne2\n");
    assert_eq!(r.order, "oeoe", "streams arrive separately and in order");
    let r = exec(&mut gw, "p1", &["cat"], Some(b"data\n"))
        .await
        .unwrap();
    assert_eq!(r.out(), "data\n");
    let r = exec(&mut gw, "p1", &["sh", "-c", "echo $GREETING"], None)
        .await
        .unwrap();
    assert_eq!(
        r.out(),
        "hello\n",
        "the spec's environment reaches sandbox code"
    );
    let r = exec(&mut gw, "p1", &["no-such-command"], None)
        .await
        .unwrap();
    assert_eq!(r.exit, 127);
    gw.stop().await;
}

/// Regression, issue 12 bug 1: a client that sends `start` and half-closes
/// its request stream (grpcurl, SDKs sending a fixed list, Python iterators)
/// must get all output and the exit code; the half-close means "no more
/// stdin", not "kill the command". Intermittent before the fix, so it runs
/// a few times; the command also reads stdin, which must see EOF.
#[tokio::test]
async fn issue_12_a_half_closed_exec_stream_still_gets_all_output_and_the_code() {
    let mut gw = process_gateway().await;
    ready(&mut gw, "half", 0).await;
    for round in 0..8 {
        let start = pb::ExecClientMessage {
            msg: Some(C::Start(pb::ExecStart {
                sandbox: "half".into(),
                argv: ["sh", "-c", "cat; echo to-out; echo to-err >&2; exit 3"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                ..Default::default()
            })),
        };
        // A stream of exactly one message: the request half ends after it.
        let mut stream = gw
            .client
            .exec_sandbox(tokio_stream::iter(vec![start]))
            .await
            .unwrap()
            .into_inner();
        let mut ran = Ran::default();
        let exit = loop {
            match stream.message().await {
                Ok(Some(m)) => match m.msg.unwrap() {
                    S::Stdout(b) => ran.stdout.extend(b),
                    S::Stderr(b) => ran.stderr.extend(b),
                    S::Exit(code) => break code,
                },
                Ok(None) => panic!("round {round}: the stream ended without an exit"),
                Err(e) => panic!("round {round}: {e}"),
            }
        };
        assert_eq!(exit, 3, "round {round}");
        assert_eq!(ran.out(), "to-out\n", "round {round}");
        assert_eq!(ran.stderr, b"to-err\n", "round {round}");
    }
    gw.stop().await;
}

/// Identities (issue 12): each sandbox launches on the host uid range the
/// gateway allocated and stored with its record, distinct per sandbox, above
/// every range useradd hands out.
#[tokio::test]
async fn each_sandbox_launches_on_its_own_stored_uid_range() {
    let mut gw = process_gateway().await;
    let mut bases = Vec::new();
    for name in ["u1", "u2"] {
        let sb = ready(&mut gw, name, 0).await;
        let id = openshell_core::SandboxId::parse(&sb.id).unwrap();
        let stored = gw.runtime().store().get_sandbox(id).await.unwrap().unwrap();
        let slot = stored.uid_slot.expect("a slot is stored at create");
        let launch = gw
            .runtime()
            .plugins()
            .sandbox_dir(&sb.id)
            .join("launch.json");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&launch).unwrap()).unwrap();
        let base = cfg["uid_base"].as_u64().unwrap();
        let expected = u64::from(openshell_gateway::uid_range::DEFAULT_BASE)
            + u64::from(slot) * openshell_gateway::uid_range::IDS_PER_SLOT;
        assert_eq!(base, expected, "{name} runs on its stored slot {slot}");
        bases.push(base);
        let r = exec(&mut gw, name, &["sh", "-c", "stat -c %u /sandbox"], None)
            .await
            .unwrap();
        assert_eq!(r.exit, 0, "{r:?}");
    }
    assert_ne!(bases[0], bases[1], "two sandboxes never share a range");
    gw.stop().await;
}

#[tokio::test]
async fn exec_on_a_sandbox_that_is_not_ready_fails_precondition() {
    let mut gw = process_gateway().await;
    gw.load("echo", "fixture-echo", &["log", "files"]).await;
    gw.create("never", "echo").await.unwrap();
    let err = exec(&mut gw, "never", &["true"], None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not Ready"), "{err}");
    gw.stop().await;
}

#[tokio::test]
async fn a_timed_out_command_exits_124_and_its_tree_is_killed() {
    let mut gw = process_gateway().await;
    ready(&mut gw, "t1", 0).await;
    let (tx, rx) = mpsc::channel(2);
    tx.send(pb::ExecClientMessage {
        msg: Some(C::Start(pb::ExecStart {
            sandbox: "t1".into(),
            argv: ["sh", "-c", "sleep 100 & sleep 100"]
                .map(String::from)
                .to_vec(),
            timeout_ms: 300,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut s = gw
        .client
        .exec_sandbox(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut exit = None;
    let t = std::time::Instant::now();
    while let Some(m) = s.message().await.unwrap() {
        if let Some(S::Exit(c)) = m.msg {
            exit = Some(c);
            eprintln!("exit after {:?}", t.elapsed());
            break;
        }
    }
    assert_eq!(exit, Some(124));
    // The response ends after the exit even though our request stream is open.
    let end = tokio::time::timeout(Duration::from_secs(3), s.message()).await;
    eprintln!("after exit: {end:?} at {:?}", t.elapsed());
    assert!(matches!(end, Ok(Ok(None))), "{end:?}");
    drop(tx);
    let left = exec(
        &mut gw,
        "t1",
        &["sh", "-c", "ps -eo comm | grep -c '^sleep' || true"],
        None,
    )
    .await
    .unwrap();
    assert_eq!(left.out().trim(), "0", "the whole tree is gone");
    gw.stop().await;
}

#[tokio::test]
async fn inside_a_sandbox_host_loopback_state_secrets_and_memory_are_out_of_reach() {
    let mut gw = process_gateway().await;
    let sb = ready(&mut gw, "c1", 64).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let probe = format!(
        "import socket; s=socket.socket(); s.settimeout(2); print(s.connect_ex(('127.0.0.1',{port})))"
    );
    let r = exec(&mut gw, "c1", &["python3", "-c", &probe], None)
        .await
        .unwrap();
    assert_ne!(
        r.out().trim(),
        "0",
        "connected to a host loopback listener: {r:?}"
    );

    let state = gw
        .runtime()
        .plugins()
        .config()
        .sandboxes_dir
        .parent()
        .unwrap()
        .to_owned();
    let r = exec(&mut gw, "c1", &["ls", state.to_str().unwrap()], None)
        .await
        .unwrap();
    assert_ne!(r.exit, 0, "the gateway's state dir is visible: {r:?}");
    let db_probe = exec(
        &mut gw,
        "c1",
        &[
            "sh",
            "-c",
            "find / -name 'openshell.db*' 2>/dev/null | head -1",
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(db_probe.out(), "", "{db_probe:?}");

    let r = exec(
        &mut gw,
        "c1",
        &["sh", "-c", "env; cat /proc/1/environ"],
        None,
    )
    .await
    .unwrap();
    let everything = format!("{}{}", r.out(), String::from_utf8_lossy(&r.stderr));
    assert!(
        !everything.contains("OPENSHELL_SANDBOX_SECRET"),
        "{everything}"
    );
    assert!(!everything.contains("SANDBOX_UID"), "{everything}");
    let r = exec(&mut gw, "c1", &["id", "-u"], None).await.unwrap();
    assert_eq!(
        r.out().trim(),
        "1000",
        "sandbox code is not the sandbox's root"
    );

    let hog = "b = bytearray(300 << 20); print('survived')";
    let r = exec(&mut gw, "c1", &["python3", "-c", hog], None)
        .await
        .unwrap();
    assert!(!r.out().contains("survived"), "{r:?}");
    assert_eq!(r.exit, 137, "killed by the memory limit: {r:?}");
    assert_eq!(
        phase(&gw.get(&sb.id).await.unwrap()),
        pb::SandboxPhase::Ready,
        "the sandbox survives"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stopped_supervisor_is_demoted_and_promoted_again_and_a_killed_one_errors() {
    let mut gw = process_gateway().await;
    let sb = ready(&mut gw, "s1", 0).await;
    let pid = nix::unistd::Pid::from_raw(supervisor_pid(&sb.id));

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let down = gw
        .wait_for("s1", "demoted", |s| {
            phase(s) == pb::SandboxPhase::Provisioning
        })
        .await;
    assert_eq!(
        condition(&down, "Ready").unwrap().reason,
        "SupervisorDisconnected"
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let up = gw
        .wait_for("s1", "Ready again", |s| phase(s) == pb::SandboxPhase::Ready)
        .await;
    assert_eq!(
        condition(&up, "Ready").unwrap().reason,
        "SupervisorConnected"
    );

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let dead = gw
        .wait_for("s1", "Error", |s| phase(s) == pb::SandboxPhase::Error)
        .await;
    assert_eq!(condition(&dead, "Ready").unwrap().reason, "ProcessExited");
    assert_eq!(condition(&dead, "Driver").unwrap().reason, "ProcessExited");
    gw.stop().await;
}

#[tokio::test]
async fn a_100_mib_stream_arrives_intact() {
    let mut gw = process_gateway().await;
    ready(&mut gw, "big", 0).await;
    let r = exec(
        &mut gw,
        "big",
        &[
            "sh",
            "-c",
            "head -c 104857600 /dev/urandom > /tmp/f && sha256sum /tmp/f | cut -d' ' -f1",
        ],
        None,
    )
    .await
    .unwrap();
    let want = r.out().trim().to_owned();
    let t = std::time::Instant::now();
    let r = exec(&mut gw, "big", &["cat", "/tmp/f"], None)
        .await
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r.stdout.len(), 100 << 20);
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&r.stdout)), want);
    eprintln!(
        "100 MiB over the relay in {secs:.2} s ({:.0} MiB/s)",
        100.0 / secs
    );
    gw.stop().await;
}

#[tokio::test]
async fn deleting_every_sandbox_leaves_no_process_behind() {
    let mut gw = process_gateway().await;
    let mut ids = Vec::new();
    for n in ["d1", "d2", "d3"] {
        ids.push(ready(&mut gw, n, 0).await.id);
    }
    let mut uids = std::collections::HashSet::new();
    for id in &ids {
        assert!(!sandbox_pids(id).is_empty());
        assert!(!launcher_pids(id).is_empty());
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", supervisor_pid(id))).unwrap();
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap()
            .to_owned();
        assert!(
            !uid.contains("\t0\t"),
            "a sandbox's root is not host root: {uid}"
        );
        uids.insert(uid);
    }
    assert_eq!(
        uids.len(),
        ids.len(),
        "each sandbox has its own host uid range"
    );
    for n in ["d1", "d2", "d3"] {
        gw.client
            .delete_sandbox(pb::DeleteSandboxRequest { name: n.into() })
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = ids
            .iter()
            .flat_map(|id| {
                sandbox_pids(id)
                    .into_iter()
                    .map(|p| p.0)
                    .chain(launcher_pids(id))
            })
            .collect();
        if left.is_empty() && gw.total().await == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.runtime().plugins().processes().running(), 0);
    gw.stop().await;
}
