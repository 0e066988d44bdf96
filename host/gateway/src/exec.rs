//! ExecSandbox: pairs a client's stream with a relay the sandbox's
//! supervisor opens, and pumps frames both ways.

use std::sync::Arc;
use std::time::Duration;

use openshell_core::validate;
use openshell_proto::v1 as pb;
use pb::exec_client_message::Msg as C;
use pb::exec_server_message::Msg as S;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::error::{ApiError, to_status};
use crate::relay::{self, Activity, Next, SandboxFrames};
use crate::runtime::ComputeRuntime;

pub const MAX_ARGV_BYTES: usize = 128 * 1024;

fn check_start(s: &pb::ExecStart) -> Result<(), ApiError> {
    if s.argv.is_empty() || s.argv[0].is_empty() {
        return Err(ApiError::InvalidArgument(
            "give a command to run (argv is empty)".into(),
        ));
    }
    let bytes: usize = s.argv.iter().map(String::len).sum::<usize>()
        + s.environment
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    if bytes > MAX_ARGV_BYTES {
        return Err(ApiError::ResourceExhausted(format!(
            "the command and environment are {bytes} bytes; the limit is {MAX_ARGV_BYTES}"
        )));
    }
    if s.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::InvalidArgument(
            "arguments must not contain NUL bytes".into(),
        ));
    }
    let env = s.environment.clone().into_iter().collect();
    validate::environment(&env)?;
    if !s.workdir.is_empty() && (!s.workdir.starts_with('/') || s.workdir.contains('\0')) {
        return Err(ApiError::InvalidArgument(format!(
            "workdir {:?} must be an absolute path inside the sandbox",
            s.workdir
        )));
    }
    Ok(())
}

pub async fn exec(
    runtime: Arc<ComputeRuntime>,
    mut inbound: Streaming<pb::ExecClientMessage>,
) -> Result<ReceiverStream<Result<pb::ExecServerMessage, Status>>, Status> {
    let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no start message within 30 s"))??;
    let Some(pb::ExecClientMessage {
        msg: Some(C::Start(start)),
    }) = first
    else {
        return Err(Status::invalid_argument(
            "the first ExecSandbox message must be `start`",
        ));
    };
    check_start(&start).map_err(to_status)?;
    let sandbox = start.sandbox.clone();
    let conn = relay::open(&runtime, &sandbox, pb::relay_open::Purpose::Exec(start))
        .await
        .map_err(to_status)?;

    let (out_tx, out_rx) = mpsc::channel(64);
    let to_sandbox = conn.to_sandbox;
    // Traffic in either direction keeps the relay alive.
    let activity = Activity::new();
    let activity_in = activity.clone();
    // Client → sandbox: stdin, EOF, resizes. Ends with the client's stream.
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            activity_in.touch();
            let Some(msg) = m.msg else { continue };
            if matches!(msg, C::Start(_)) {
                continue;
            }
            let frame = pb::RelayFrame {
                frame: Some(pb::relay_frame::Frame::ExecInput(pb::ExecClientMessage {
                    msg: Some(msg),
                })),
            };
            if to_sandbox.send(frame).await.is_err() {
                break;
            }
        }
    });
    // Sandbox → client: output in order, then the exit code.
    let idle = runtime.relays.limits.idle_timeout;
    let mut frames = SandboxFrames::new(conn.from_sandbox, activity, idle);
    tokio::spawn(async move {
        loop {
            let frame = match frames.next(&out_tx).await {
                Next::Frame(f) => f,
                Next::ClientGone => return,
                Next::Idle => {
                    let msg = format!("the relay was idle for {} s and was closed", idle.as_secs());
                    let _ = out_tx.send(Err(Status::deadline_exceeded(msg))).await;
                    return;
                }
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
                    let why = match frame {
                        Err(s) => format!(" ({})", s.message()),
                        _ => String::new(),
                    };
                    let _ = out_tx
                        .send(Err(Status::unavailable(format!(
                            "the sandbox's supervisor went away before the command exited{why}"
                        ))))
                        .await;
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
        let big = "x".repeat(MAX_ARGV_BYTES + 1);
        assert!(matches!(
            check_start(&start(&["echo", &big])),
            Err(ApiError::ResourceExhausted(_))
        ));
    }
}
