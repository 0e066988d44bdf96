//! Running one exec request over a relay.
//!
//! The command runs in its own process group (so a timeout or a vanished
//! client kills the whole tree), as the sandbox's unprivileged uid with
//! `no_new_privs`, with our environment minus the secret. Without a tty,
//! stdout and stderr stream separately, each in order; with one, the
//! terminal's output streams as stdout.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use openshell_proto::v1 as pb;
use openshell_proto::v1::supervisor_client::SupervisorClient;
use pb::exec_client_message::Msg as C;
use pb::exec_server_message::Msg as S;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::Config;

const CHUNK: usize = 32 * 1024;

fn output(m: S) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::ExecOutput(pb::ExecServerMessage {
            msg: Some(m),
        })),
    }
}

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, nix::pty::Winsize);

fn winsize(w: Option<&pb::WindowSize>) -> nix::pty::Winsize {
    let w = w.cloned().unwrap_or(pb::WindowSize { rows: 24, cols: 80 });
    nix::pty::Winsize {
        ws_row: w.rows.clamp(1, 1000) as u16,
        ws_col: w.cols.clamp(1, 1000) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn resize(master: &OwnedFd, w: &pb::WindowSize) {
    let ws = winsize(Some(w));
    #[allow(unsafe_code, reason = "TIOCSWINSZ has no safe wrapper")]
    // SAFETY: `master` is an open pty master for the life of this call and
    // `ws` is a valid Winsize the kernel only reads.
    let _ = unsafe { set_winsize(master.as_raw_fd(), &ws) };
}

/// Serves one relay: opens the stream, runs the command, pumps frames.
pub async fn serve_relay(
    cfg: &Config,
    channel: Channel,
    open: pb::RelayOpen,
) -> Result<(), String> {
    let Some(pb::relay_open::Purpose::Exec(start)) = open.purpose else {
        return Err("unsupported relay purpose".into());
    };
    let (tx, rx) = mpsc::channel::<pb::RelayFrame>(64);
    let init = pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::Init(pb::RelayInit {
            channel_id: open.channel_id.clone(),
        })),
    };
    tx.send(init)
        .await
        .map_err(|_| "relay closed".to_string())?;
    let mut client = SupervisorClient::new(channel);
    let inbound = client
        .relay_stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("cannot open the relay: {}", s.message()))?
        .into_inner();
    run(cfg, start, inbound, tx).await;
    Ok(())
}

struct Spawned {
    child: tokio::process::Child,
    stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    readers: Vec<(bool, Box<dyn AsyncRead + Send + Unpin>)>,
    master: Option<OwnedFd>,
}

fn spawn(cfg: &Config, start: &pb::ExecStart) -> std::io::Result<Spawned> {
    let mut cmd = tokio::process::Command::new(&start.argv[0]);
    cmd.args(&start.argv[1..])
        .env_clear()
        .envs(&cfg.child_env)
        .envs(&start.environment)
        .kill_on_drop(true);
    let workdir = if start.workdir.is_empty() {
        "/sandbox"
    } else {
        &start.workdir
    };
    if std::path::Path::new(workdir).is_dir() {
        cmd.current_dir(workdir);
    } else if !start.workdir.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("workdir {workdir} does not exist"),
        ));
    }
    if let Some(uid) = cfg.run_as {
        cmd.uid(uid).gid(uid);
    }
    let tty = start.tty;
    let pty = if tty {
        Some(nix::pty::openpty(
            Some(&winsize(start.window.as_ref())),
            None,
        )?)
    } else {
        None
    };
    if let Some(p) = &pty {
        cmd.stdin(p.slave.try_clone()?)
            .stdout(p.slave.try_clone()?)
            .stderr(p.slave.try_clone()?);
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
    }
    #[allow(
        unsafe_code,
        reason = "session and privilege setup between fork and exec"
    )]
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (setsid, ioctl, prctl).
    unsafe {
        cmd.pre_exec(move || {
            if tty {
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::sys::prctl::set_no_new_privs()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    match pty {
        Some(p) => {
            drop(p.slave);
            let read = std::fs::File::from(p.master.try_clone()?);
            let write = std::fs::File::from(p.master.try_clone()?);
            Ok(Spawned {
                child,
                stdin: Some(Box::new(tokio::fs::File::from_std(write))),
                readers: vec![(true, Box::new(tokio::fs::File::from_std(read)))],
                master: Some(p.master),
            })
        }
        None => Ok(Spawned {
            stdin: child.stdin.take().map(|s| Box::new(s) as _),
            readers: vec![
                (true, Box::new(child.stdout.take().expect("piped")) as _),
                (false, Box::new(child.stderr.take().expect("piped")) as _),
            ],
            child,
            master: None,
        }),
    }
}

async fn run(
    cfg: &Config,
    start: pb::ExecStart,
    mut inbound: tonic::Streaming<pb::RelayFrame>,
    tx: mpsc::Sender<pb::RelayFrame>,
) {
    let spawned = match spawn(cfg, &start) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(argv0 = start.argv[0], "cannot spawn: {e}");
            let msg = format!("openshell: cannot run {}: {e}\n", start.argv[0]);
            let _ = tx.send(output(S::Stderr(msg.into_bytes()))).await;
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let _ = tx.send(output(S::Exit(code))).await;
            linger(inbound).await;
            return;
        }
    };
    let Spawned {
        mut child,
        mut stdin,
        readers,
        master,
    } = spawned;
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));

    let mut pumps = Vec::new();
    for (is_stdout, mut r) in readers {
        let tx = tx.clone();
        pumps.push(tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let chunk = buf[..n].to_vec();
                        let m = if is_stdout {
                            S::Stdout(chunk)
                        } else {
                            S::Stderr(chunk)
                        };
                        if tx.send(output(m)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }

    let timeout = match start.timeout_ms {
        0 => Duration::MAX,
        ms => Duration::from_millis(ms),
    };
    let deadline = tokio::time::sleep(timeout.min(Duration::from_secs(100 * 365 * 86400)));
    tokio::pin!(deadline);
    let kill_tree = || {
        if let Some(pg) = pgid {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    };
    let code = loop {
        tokio::select! {
            st = child.wait() => {
                use std::os::unix::process::ExitStatusExt;
                break match st {
                    Ok(st) => st.code().or_else(|| st.signal().map(|s| 128 + s)).unwrap_or(1),
                    Err(_) => 1,
                };
            }
            _ = &mut deadline => {
                kill_tree();
                let _ = child.wait().await;
                break 124;
            }
            f = inbound.message() => match f {
                Ok(Some(pb::RelayFrame { frame: Some(pb::relay_frame::Frame::ExecInput(m)) })) => match m.msg {
                    Some(C::Stdin(bytes)) => {
                        if let Some(w) = stdin.as_mut()
                            && (w.write_all(&bytes).await.is_err() || w.flush().await.is_err())
                        {
                            stdin = None;
                        }
                    }
                    Some(C::StdinEof(_)) => {
                        if master.is_some() {
                            // A terminal has no EOF of its own: send ^D.
                            if let Some(w) = stdin.as_mut() {
                                let _ = w.write_all(&[4]).await;
                            }
                        } else {
                            stdin = None;
                        }
                    }
                    Some(C::Resize(w)) => {
                        if let Some(m) = &master {
                            resize(m, &w);
                        }
                    }
                    Some(C::Start(_)) | None => {}
                },
                Ok(Some(_)) => {}
                // The client (or gateway) is gone: nobody will read the result.
                Ok(None) | Err(_) => {
                    kill_tree();
                    let _ = child.kill().await;
                    return;
                }
            }
        }
    };
    drop(stdin);
    drop(master);
    // Let the pipes drain; a background process holding them open gets
    // two seconds before the exit is reported anyway.
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
    }
    let _ = tx.send(output(S::Exit(code))).await;
    linger(inbound).await;
}

/// Keeps the relay open until the gateway closes it (it has read the exit):
/// dropping our end first would reset the stream and could lose the last
/// frames still in flight.
async fn linger(mut inbound: tonic::Streaming<pb::RelayFrame>) {
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    tracing::debug!("relay closed: {r:?}");
}
