//! SandboxLogs: what the gateway kept of a sandbox's log, then (with
//! `follow`) what is appended, until the client leaves or the sandbox is
//! deleted.

use std::sync::Arc;

use openshell_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::error::{ApiError, to_status};
use crate::runtime::ComputeRuntime;

pub async fn stream(
    runtime: Arc<ComputeRuntime>,
    req: pb::SandboxLogsRequest,
) -> Result<ReceiverStream<Result<pb::LogRecord, Status>>, ApiError> {
    let sb = runtime.find(&req.name).await?;
    let logs = if req.network {
        runtime.egress().audit().logs()
    } else {
        runtime.logs()
    };
    let (mut kept, follower) = logs.read(sb.id).map_err(ApiError::Logs)?;
    kept.retain(|r| r.time_ms >= req.since_ms);
    if req.tail > 0 && kept.len() > req.tail as usize {
        kept.drain(..kept.len() - req.tail as usize);
    }
    let (tx, rx) = mpsc::channel(64);
    let since = req.since_ms;
    tokio::spawn(async move {
        for r in kept {
            if tx.send(Ok(r.to_pb())).await.is_err() {
                return;
            }
        }
        let (true, Some(mut follower)) = (req.follow, follower) else {
            return;
        };
        loop {
            let next = tokio::select! {
                n = follower.next() => n,
                _ = tx.closed() => return,
            };
            match next {
                Ok(Some(records)) => {
                    for r in records.iter().filter(|r| r.time_ms >= since) {
                        if tx.send(Ok(r.to_pb())).await.is_err() {
                            return;
                        }
                    }
                }
                // The sandbox is gone: the log ends.
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(to_status(ApiError::Logs(e)))).await;
                    return;
                }
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}
