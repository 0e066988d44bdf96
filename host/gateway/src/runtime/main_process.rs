//! The sandbox's main process, as the gateway keeps it: what it is
//! (`main.json` in the sandbox's log dir), started on the live supervisor
//! and re-attached after every reconnect, its records stored in the log
//! ([`crate::logs`]). A supervisor process that never ran it (the sandbox
//! restarted) starts it again, after a marker record, unless it had exited.

use std::sync::Arc;

use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use pb::relay_frame::Frame;

use super::ComputeRuntime;
use crate::error::ApiError;
use crate::logs::{MainSpec, Record};

impl ComputeRuntime {
    /// Records `spec` as the sandbox's main process and starts it; refused
    /// if it has one.
    pub async fn start_main(
        self: &Arc<Self>,
        id: SandboxId,
        name: &str,
        spec: MainSpec,
    ) -> Result<(), ApiError> {
        match self.logs.set_main_spec(id, &spec) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ApiError::MainExists {
                    name: name.to_owned(),
                });
            }
            Err(e) => return Err(ApiError::Logs(e)),
        }
        self.attach_main(id);
        Ok(())
    }

    /// Starts or resumes the main process's relay on the live session, if
    /// the sandbox has a main process and nothing is attached already.
    pub(crate) fn attach_main(self: &Arc<Self>, id: SandboxId) {
        let Some(spec) = self.logs.main_spec(id) else {
            return;
        };
        let Some(session) = self.supervisors.sessions().get(id) else {
            return;
        };
        {
            let mut attached = self.main_attached.lock().unwrap_or_else(|p| p.into_inner());
            if !attached.insert(id) {
                return;
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.pump_main(id, spec, &session.instance_id).await {
                tracing::info!(sandbox = %id, "main process relay ended: {e}");
            }
            me.main_attached
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    async fn pump_main(
        &self,
        id: SandboxId,
        spec: MainSpec,
        instance: &str,
    ) -> Result<(), ApiError> {
        let ran_here = self.logs.main_instance(id).as_deref() == Some(instance);
        let (next, exited) = self.logs.main_progress(id).map_err(ApiError::Logs)?;
        // A main process that exited is never run again; one a restart of
        // the sandbox interrupted is started again by its new supervisor.
        if exited {
            return Ok(());
        }
        let from_seq = if ran_here {
            next
        } else {
            let mut marker = Record::event(format!(
                "main process {}: {}",
                if self.logs.main_instance(id).is_some() {
                    "started again (the sandbox restarted)"
                } else {
                    "started"
                },
                shown(&spec.argv)
            ));
            marker.marker = true;
            self.logs.append(id, &[marker]);
            self.logs
                .set_main_instance(id, instance)
                .map_err(ApiError::Logs)?;
            0
        };
        let sb = self
            .get(id)
            .await?
            .ok_or_else(|| ApiError::SandboxNotFound {
                name: id.to_string(),
            })?;
        let start = pb::ExecStart {
            sandbox: id.to_string(),
            argv: spec.argv,
            environment: spec.env.into_iter().collect(),
            workdir: spec.workdir,
            ..Default::default()
        };
        let conn = self
            .supervisors
            .open_relay(
                id,
                sb.name.as_str(),
                pb::relay_open::Purpose::Main(pb::MainProcess {
                    start: Some(start),
                    from_seq,
                }),
            )
            .await?;
        // Held while we read: dropping it closes the relay.
        let _to_sandbox = conn.to_sandbox;
        let mut from = conn.from_sandbox;
        let mut next = from_seq;
        while let Some(f) = from.message().await? {
            let Some(Frame::MainOutput(out)) = f.frame else {
                continue;
            };
            let Some(r) = out.record else { continue };
            if out.seq < next {
                continue;
            }
            if out.seq > next {
                self.logs.event(
                    id,
                    format!(
                        "{} lines of output were lost while the gateway was away",
                        out.seq - next
                    ),
                );
            }
            next = out.seq + 1;
            let exited = r.exit_code.is_some();
            let source = pb::LogSource::try_from(r.source).unwrap_or(pb::LogSource::Event);
            self.logs.append(
                id,
                &[Record {
                    seq: out.seq,
                    time_ms: r.time_ms,
                    source,
                    exit_code: r.exit_code,
                    marker: false,
                    // A sandbox's line: bounded by its supervisor, and here.
                    data: r.data.iter().take(64 * 1024).copied().collect(),
                }],
            );
            if exited {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// A command line for an event, shortened.
fn shown(argv: &[String]) -> String {
    let s = argv.join(" ");
    if s.len() <= 200 {
        return s;
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
