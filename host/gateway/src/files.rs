//! UploadFiles and DownloadFiles: a tar stream through a relay to the
//! sandbox's file helper, which runs as the sandbox's user (see the
//! supervisor's `files` module). The relay speaks exec's protocol: the
//! stream is the helper's stdin or stdout, its complaint is stderr, and
//! its exit code says how it ended.

use std::sync::Arc;
use std::time::Duration;

use openshell_files::{Limits, TransferError};
use openshell_proto::v1 as pb;
use pb::exec_client_message::Msg as C;
use pb::exec_server_message::Msg as S;
use pb::relay_frame::Frame;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::error::{ApiError, to_status};
use crate::exec::MAX_WORKDIR_BYTES;
use crate::runtime::ComputeRuntime;
use crate::streams::first_message;

/// How long a client has to send `start`.
const FIRST_MESSAGE: Duration = Duration::from_secs(30);
/// The most of the helper's stderr kept for an error message.
const MAX_COMPLAINT: usize = 2048;
/// Tar's own bytes per entry, at most (a header, a long name, padding):
/// what a download may carry beyond its content limit.
const TAR_OVERHEAD_PER_ENTRY: u64 = 3 * 512 + 4096;

/// What every transfer may move.
pub const LIMITS: Limits = Limits {
    max_bytes: 8 << 30,
    max_entries: 200_000,
};

fn check_path(path: &str) -> Result<(), ApiError> {
    if path.len() > MAX_WORKDIR_BYTES {
        return Err(ApiError::TooLarge {
            what: "path",
            len: path.len(),
            limit: MAX_WORKDIR_BYTES,
            hint: "",
        });
    }
    if path.contains('\0') {
        return Err(ApiError::BadField("path must not contain NUL bytes".into()));
    }
    Ok(())
}

fn input(msg: C) -> pb::RelayFrame {
    pb::RelayFrame {
        frame: Some(Frame::ExecInput(pb::ExecClientMessage { msg: Some(msg) })),
    }
}

fn transfer(t: pb::FilesTransfer) -> pb::relay_open::Purpose {
    pb::relay_open::Purpose::Files(pb::FilesTransfer {
        max_bytes: LIMITS.max_bytes,
        max_entries: LIMITS.max_entries,
        ..t
    })
}

/// The helper's exit, as the API's error when it failed.
fn outcome(name: &str, code: i32, complaint: &[u8]) -> Result<(), ApiError> {
    if code == 0 {
        return Ok(());
    }
    let text = String::from_utf8_lossy(complaint);
    let text = text.trim().trim_start_matches("openshell: ");
    Err(ApiError::Transfer {
        name: name.to_owned(),
        kind: TransferError::kind_of_exit(code),
        message: if text.is_empty() {
            format!("the file helper exited with {code}")
        } else {
            text.to_owned()
        },
    })
}

fn keep(buf: &mut Vec<u8>, b: &[u8], limit: usize) {
    let room = limit.saturating_sub(buf.len());
    buf.extend_from_slice(&b[..b.len().min(room)]);
}

fn gone(detail: String) -> ApiError {
    ApiError::SupervisorGone {
        what: "the transfer finished",
        detail,
    }
}

pub async fn upload(
    runtime: Arc<ComputeRuntime>,
    mut inbound: Streaming<pb::UploadFilesMessage>,
) -> Result<pb::UploadFilesResponse, Status> {
    use pb::upload_files_message::Msg as M;
    let first = first_message(&mut inbound, "UploadFiles", "start", FIRST_MESSAGE).await?;
    let Some(M::Start(start)) = first.msg else {
        return Err(to_status(ApiError::FirstMessage {
            rpc: "UploadFiles",
            expected: "start",
        }));
    };
    check_path(&start.path).map_err(to_status)?;
    let sb = runtime.ready(&start.sandbox).await.map_err(to_status)?;
    let name = sb.name.to_string();
    let conn = runtime
        .supervisors()
        .open_relay(
            sb.id,
            &name,
            transfer(pb::FilesTransfer {
                path: start.path,
                upload: true,
                overwrite: start.overwrite,
                ..Default::default()
            }),
        )
        .await
        .map_err(to_status)?;
    // Client → helper's stdin. At the end the sender is handed back and
    // kept until the exit is read: closing it tells the supervisor that
    // nobody listens, and it would kill the helper.
    let to_sandbox = conn.to_sandbox;
    let mut pump = tokio::spawn(async move {
        loop {
            match inbound.message().await {
                Ok(Some(pb::UploadFilesMessage {
                    msg: Some(M::Data(b)),
                })) => {
                    if to_sandbox.send(input(C::Stdin(b))).await.is_err() {
                        return Err(None);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let _ = to_sandbox.send(input(C::StdinEof(true))).await;
                    return Ok(to_sandbox);
                }
                Err(s) => return Err(Some(s)),
            }
        }
    });
    let mut from = conn.from_sandbox;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut held = None;
    let code = loop {
        tokio::select! {
            r = &mut pump, if held.is_none() => match r {
                Ok(Ok(tx)) => held = Some(tx),
                // The client reset its stream: dropping the relay kills the helper.
                Ok(Err(Some(s))) => return Err(to_status(s.into())),
                _ => return Err(to_status(gone(String::new()))),
            },
            f = from.message() => match f {
                Ok(Some(pb::RelayFrame { frame: Some(Frame::ExecOutput(o)) })) => match o.msg {
                    Some(S::Stdout(b)) => keep(&mut stdout, &b, MAX_COMPLAINT),
                    Some(S::Stderr(b)) => keep(&mut stderr, &b, MAX_COMPLAINT),
                    Some(S::Exit(code)) => break code,
                    None => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => return Err(to_status(gone(String::new()))),
                Err(s) => return Err(to_status(gone(s.message().to_owned()))),
            },
        }
    };
    pump.abort();
    outcome(&name, code, &stderr).map_err(to_status)?;
    let written: serde_json::Value = serde_json::from_slice(&stdout).unwrap_or_default();
    let count = |k: &str| written.get(k).and_then(serde_json::Value::as_u64);
    let (Some(entries), Some(bytes)) = (count("entries"), count("bytes")) else {
        return Err(to_status(gone(format!(
            "its file helper reported {:?}",
            String::from_utf8_lossy(&stdout)
        ))));
    };
    Ok(pb::UploadFilesResponse { entries, bytes })
}

pub async fn download(
    runtime: Arc<ComputeRuntime>,
    req: pb::DownloadFilesRequest,
) -> Result<ReceiverStream<Result<pb::DownloadFilesChunk, Status>>, Status> {
    check_path(&req.path).map_err(to_status)?;
    if req.path.is_empty() {
        return Err(to_status(ApiError::BadField(
            "give the path of a file or directory in the sandbox".into(),
        )));
    }
    let sb = runtime.ready(&req.sandbox).await.map_err(to_status)?;
    let name = sb.name.to_string();
    let conn = runtime
        .supervisors()
        .open_relay(
            sb.id,
            &name,
            transfer(pb::FilesTransfer {
                path: req.path,
                upload: false,
                ..Default::default()
            }),
        )
        .await
        .map_err(to_status)?;
    let _ = conn.to_sandbox.send(input(C::StdinEof(true))).await;
    // A sandbox's stream is bounded here too, whatever its helper says.
    let cap = LIMITS.max_bytes + LIMITS.max_entries * TAR_OVERHEAD_PER_ENTRY;
    let (out_tx, out_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        // Held until the end: dropping it ends the helper.
        let _to_sandbox = conn.to_sandbox;
        let mut from = conn.from_sandbox;
        let (mut sent, mut stderr) = (0u64, Vec::new());
        let end = loop {
            match from.message().await {
                Ok(Some(pb::RelayFrame {
                    frame: Some(Frame::ExecOutput(o)),
                })) => match o.msg {
                    Some(S::Stdout(b)) => {
                        sent += b.len() as u64;
                        if sent > cap {
                            break Err(ApiError::Transfer {
                                name: name.clone(),
                                kind: openshell_files::FailureKind::Limit,
                                message: format!(
                                    "the download passed the gateway's limit of {cap} bytes"
                                ),
                            });
                        }
                        let chunk = pb::DownloadFilesChunk { data: b };
                        if out_tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Some(S::Stderr(b)) => keep(&mut stderr, &b, MAX_COMPLAINT),
                    Some(S::Exit(code)) => break outcome(&name, code, &stderr),
                    None => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => break Err(gone(String::new())),
                Err(s) => break Err(gone(s.message().to_owned())),
            }
        };
        if let Err(e) = end {
            let _ = out_tx.send(Err(to_status(e))).await;
        }
    });
    Ok(ReceiverStream::new(out_rx))
}
