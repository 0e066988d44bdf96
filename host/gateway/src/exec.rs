//! ExecSandbox: pairs a client's stream with a relay the sandbox's
//! supervisor opens, and pumps frames both ways.

use std::sync::Arc;
use std::time::Duration;

use openshell_core::validate;
use openshell_proto::v1 as pb;
use pb::exec_client_message::Msg as C;
use pb::exec_server_message::Msg as S;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::error::{ApiError, to_status};
use crate::runtime::ComputeRuntime;
use crate::streams::first_message;
use crate::supervisor::relay::{Activity, SandboxFrames};

pub const MAX_ARGV_BYTES: usize = 128 * 1024;
/// Linux's PATH_MAX: no longer workdir can be opened.
pub const MAX_WORKDIR_BYTES: usize = 4096;
/// How long a client has to send `start`.
const FIRST_MESSAGE: Duration = Duration::from_secs(30);

fn check_start(s: &pb::ExecStart) -> Result<(), ApiError> {
    if s.argv.is_empty() || s.argv[0].is_empty() {
        return Err(ApiError::BadField(
            "give a command to run (argv is empty)".into(),
        ));
    }
    let bytes: usize = s.argv.iter().map(String::len).sum::<usize>()
        + s.environment
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    if bytes > MAX_ARGV_BYTES {
        return Err(ApiError::TooLarge {
            what: "the command and environment",
            len: bytes,
            limit: MAX_ARGV_BYTES,
            hint: "",
        });
    }
    if s.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::BadField(
            "arguments must not contain NUL bytes".into(),
        ));
    }
    let env = s.environment.clone().into_iter().collect();
    validate::environment(&env)?;
    if s.workdir.len() > MAX_WORKDIR_BYTES {
        return Err(ApiError::TooLarge {
            what: "workdir",
            len: s.workdir.len(),
            limit: MAX_WORKDIR_BYTES,
            hint: "",
        });
    }
    if !s.workdir.is_empty() && (!s.workdir.starts_with('/') || s.workdir.contains('\0')) {
        return Err(ApiError::BadField(format!(
            "workdir {} must be an absolute path inside the sandbox",
            crate::error::echo(&s.workdir)
        )));
    }
    Ok(())
}

fn input(msg: C) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(pb::relay_frame::Frame::ExecInput(pb::ExecClientMessage {
            msg: Some(msg),
        })),
    }
}

pub async fn exec(
    runtime: Arc<ComputeRuntime>,
    mut inbound: Streaming<pb::ExecClientMessage>,
) -> Result<ReceiverStream<Result<pb::ExecServerMessage, Status>>, Status> {
    let first = first_message(&mut inbound, "ExecSandbox", "start", FIRST_MESSAGE).await?;
    let pb::ExecClientMessage {
        msg: Some(C::Start(start)),
    } = first
    else {
        return Err(to_status(ApiError::FirstMessage {
            rpc: "ExecSandbox",
            expected: "start",
        }));
    };
    check_start(&start).map_err(to_status)?;
    if start.main {
        return main(runtime, start, inbound).await.map_err(to_status);
    }
    let sb = runtime.ready(&start.sandbox).await.map_err(to_status)?;
    crate::metrics::get().execs.inc();
    let conn = runtime
        .supervisors()
        .open_relay(
            sb.id,
            sb.name.as_str(),
            pb::relay_open::Purpose::Exec(start),
        )
        .await
        .map_err(to_status)?;

    let (out_tx, out_rx) = mpsc::channel(64);
    let to_sandbox = conn.to_sandbox;
    // Traffic in either direction keeps the relay alive.
    let activity = Activity::new();
    let activity_in = activity.clone();
    // Resolves when the sandbox → client pump is done with the relay.
    let (done_tx, mut done_rx) = oneshot::channel::<()>();
    // Client → sandbox: stdin, EOF, resizes. A half-close means "no more
    // stdin": it becomes EOF, and the relay towards the supervisor stays
    // open until the command's exit has been read, since closing it tells
    // the supervisor that nobody is listening (and it kills the command).
    // A client that resets its stream is gone: the relay closes at once.
    tokio::spawn(async move {
        let mut eof_sent = false;
        loop {
            let m = tokio::select! {
                m = inbound.message() => m,
                _ = &mut done_rx => return,
            };
            match m {
                Ok(Some(m)) => {
                    activity_in.touch();
                    let Some(msg) = m.msg else { continue };
                    if matches!(msg, C::Start(_)) {
                        continue;
                    }
                    eof_sent |= matches!(msg, C::StdinEof(_));
                    if to_sandbox.send(input(msg)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    if !eof_sent {
                        let _ = to_sandbox.send(input(C::StdinEof(true))).await;
                    }
                    let _ = done_rx.await;
                    return;
                }
                Err(_) => return,
            }
        }
    });
    // Sandbox → client: output in order, then the exit code.
    let idle = runtime.supervisors().relays().limits.idle_timeout;
    let mut frames = SandboxFrames::new(conn.from_sandbox, activity, idle);
    tokio::spawn(async move {
        let _done = done_tx;
        loop {
            let Some(frame) = frames.next(&out_tx).await else {
                return;
            };
            match frame {
                Ok(Some(pb::RelayFrame {
                    frame: Some(pb::relay_frame::Frame::ExecOutput(out)),
                })) => {
                    let exit = matches!(out.msg, Some(S::Exit(_)));
                    if out_tx.send(Ok(out)).await.is_err() || exit {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    let detail = match frame {
                        Err(s) => s.message().to_owned(),
                        _ => String::new(),
                    };
                    let gone = ApiError::SupervisorGone {
                        what: "the command exited",
                        detail,
                    };
                    let _ = out_tx.send(Err(to_status(gone))).await;
                    return;
                }
            }
        }
    });
    Ok(ReceiverStream::new(out_rx))
}

/// An exec of the sandbox's main process: started, then followed in the
/// sandbox's log until it exits. The client's stream is only held open; a
/// client that leaves stops following, never the process.
async fn main(
    runtime: Arc<ComputeRuntime>,
    start: pb::ExecStart,
    mut inbound: Streaming<pb::ExecClientMessage>,
) -> Result<ReceiverStream<Result<pb::ExecServerMessage, Status>>, ApiError> {
    if start.tty || start.timeout_ms != 0 {
        return Err(ApiError::BadField(
            "a main process has no terminal and no timeout".into(),
        ));
    }
    let sb = runtime.ready(&start.sandbox).await?;
    // Positioned before the start: every record of this run follows.
    let (_, follower) = runtime.logs().read(sb.id).map_err(ApiError::Logs)?;
    let mut follower = follower
        .ok_or_else(|| ApiError::Logs(std::io::Error::other("this gateway keeps no logs")))?;
    let spec = crate::logs::MainSpec {
        argv: start.argv,
        env: start.environment.into_iter().collect(),
        workdir: start.workdir,
    };
    runtime.start_main(sb.id, sb.name.as_str(), spec).await?;
    let (out_tx, out_rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut reading = true;
        loop {
            let records = tokio::select! {
                r = follower.next() => r,
                _ = out_tx.closed() => return,
                // Drained, so the request stream stays open; its end (a
                // half-close) means nothing: keep following.
                m = inbound.message(), if reading => {
                    reading = matches!(m, Ok(Some(_)));
                    continue;
                }
            };
            let records = match records {
                Ok(Some(r)) => r,
                Ok(None) => {
                    let gone = ApiError::SupervisorGone {
                        what: "the main process exited",
                        detail: "the sandbox was deleted".into(),
                    };
                    let _ = out_tx.send(Err(to_status(gone))).await;
                    return;
                }
                Err(e) => {
                    let _ = out_tx.send(Err(to_status(ApiError::Logs(e)))).await;
                    return;
                }
            };
            for r in records {
                let msg = match (r.source, r.exit_code) {
                    (pb::LogSource::Stdout, _) => S::Stdout(r.data.into()),
                    (pb::LogSource::Stderr, _) => S::Stderr(r.data.into()),
                    (_, Some(code)) => S::Exit(code),
                    _ => continue,
                };
                let exit = matches!(msg, S::Exit(_));
                if out_tx
                    .send(Ok(pb::ExecServerMessage { msg: Some(msg) }))
                    .await
                    .is_err()
                    || exit
                {
                    return;
                }
            }
        }
    });
    Ok(ReceiverStream::new(out_rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(argv: &[&str]) -> pb::ExecStart {
        pb::ExecStart {
            sandbox: "s".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn exec_requests_are_checked_before_anything_runs() {
        assert!(check_start(&start(&["true"])).is_ok());
        assert!(check_start(&start(&[])).is_err());
        assert!(check_start(&start(&["a\0b"])).is_err());
        let mut s = start(&["env"]);
        s.environment.insert("BAD-KEY".into(), "v".into());
        assert!(check_start(&s).is_err());
        let mut s = start(&["pwd"]);
        s.workdir = "relative".into();
        assert!(check_start(&s).is_err());
        let mut s = start(&["pwd"]);
        s.workdir = format!("/{}", "d".repeat(MAX_WORKDIR_BYTES));
        assert!(matches!(check_start(&s), Err(ApiError::TooLarge { .. })));
        let big = "x".repeat(MAX_ARGV_BYTES + 1);
        assert!(matches!(
            check_start(&start(&["echo", &big])),
            Err(ApiError::TooLarge { .. })
        ));
    }
}
