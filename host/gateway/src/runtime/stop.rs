//! Stopping and starting a sandbox. A stop stores Stopped first, then (in
//! an owned task the request waits for) ends the sandbox's supervisor
//! session and listener and everything the host launched for it; its
//! state dir (files, upper layer, a VM's disk), spec and uid slot stay. A
//! start stores the relaunch (Provisioning) and resumes it through its
//! driver, as recovery does after a gateway restart. Which phases may do
//! either is the phase machine's to say.

use std::sync::Arc;
use std::time::Duration;

use openshell_core::{Event, Sandbox, SandboxId};
use openshell_proto::v1 as pb;

use super::{ComputeRuntime, now_ms};
use crate::error::ApiError;

/// How long a stopping sandbox's launcher or QEMU has after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a VM's guest may take to write its page cache to its disk
/// before the VM stops anyway.
const GUEST_SYNC: Duration = Duration::from_secs(10);

impl ComputeRuntime {
    /// Stops a Ready sandbox and returns it Stopped once nothing of it
    /// runs. `message` says why (a request, an idle timeout). A Stopped one
    /// is returned as it is.
    pub async fn stop(
        self: &Arc<Self>,
        name_or_id: &str,
        message: &str,
    ) -> Result<Sandbox, ApiError> {
        let sb = self.find(name_or_id).await?;
        let event = Event::StopRequested {
            message: message.to_owned(),
        };
        let (sb, changed) = self.request(sb, &event).await?;
        if changed {
            self.logs.event(sb.id, format!("stopping ({message})"));
            let me = self.clone();
            let stopping = sb.clone();
            // Owned, so a client that hangs up cannot leave a Stopped
            // sandbox running; the request waits for it.
            let started = std::time::Instant::now();
            let _ = tokio::spawn(async move { me.halt(&stopping).await }).await;
            tracing::info!(sandbox = %sb.id, elapsed = ?started.elapsed(), "sandbox stopped");
        }
        Ok(sb)
    }

    /// Starts a Stopped sandbox through its driver's `resume`; returns it
    /// Provisioning. One that runs or is starting is returned as it is.
    pub async fn start(self: &Arc<Self>, name_or_id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.find(name_or_id).await?;
        let plugin =
            self.plugins
                .get(&sb.spec.driver)
                .ok_or_else(|| ApiError::DriverNotLoaded {
                    driver: sb.spec.driver.clone(),
                    loaded: self.driver_names().join(", "),
                })?;
        let (sb, changed) = self.request(sb, &Event::StartRequested).await?;
        if changed {
            self.logs.event(sb.id, "starting");
            // The idle clock restarts with the sandbox.
            if let Err(e) = self.store.record_activity(sb.id, now_ms()).await {
                tracing::warn!(sandbox = %sb.id, "cannot record the start as activity: {e}");
            }
            let me = self.clone();
            let launched = sb.clone();
            tokio::spawn(async move { me.launch(plugin, launched, true).await });
        }
        Ok(sb)
    }

    /// Applies one user-requested event: the stored sandbox and whether it
    /// changed, or the phase machine's rejection as FailedPrecondition.
    async fn request(&self, sb: Sandbox, event: &Event) -> Result<(Sandbox, bool), ApiError> {
        let now = now_ms();
        let mut outcome = Ok(false);
        let stored = self
            .store
            .modify_sandbox(sb.id, |s| {
                outcome = openshell_core::apply(&s.status, event, now).map(|next| {
                    let changed = next != s.status;
                    if changed {
                        s.status = next;
                        s.updated_at_ms = now;
                    }
                    changed
                });
                matches!(outcome, Ok(true))
            })
            .await?;
        let Some(stored) = stored else {
            return Err(ApiError::SandboxNotFound {
                name: sb.name.to_string(),
            });
        };
        match outcome {
            Ok(changed) => {
                if changed {
                    self.watch.notify(stored.id);
                }
                Ok((stored, changed))
            }
            Err(rejection) => Err(ApiError::WrongPhase {
                name: stored.name.to_string(),
                phase: rejection.phase,
                action: match event {
                    Event::StopRequested { .. } => "stopped",
                    _ => "started",
                },
            }),
        }
    }

    /// Ends everything of a sandbox that runs, keeping its files. The
    /// session goes first (without a disconnect event), so nothing can
    /// reach the sandbox while it stops; the exits its processes report
    /// come to a Stopped sandbox and change nothing.
    async fn halt(&self, sb: &Sandbox) {
        if self.plugins.vms().backend(&sb.id.to_string()).is_some() {
            self.sync_guest(sb).await;
        }
        self.supervisors.stop(sb.id);
        let id = sb.id.to_string();
        self.plugins.processes().stop(&id, STOP_GRACE).await;
        self.plugins.processes().kill(&id).await;
        self.plugins.vms().stop(&id, STOP_GRACE).await;
        self.plugins.vms().kill(&id).await;
    }

    /// Runs `sync` in a VM's guest, so what it wrote reaches its disk
    /// before QEMU ends (best effort: a guest that does not answer within
    /// [`GUEST_SYNC`] loses its page cache, as after a power cut).
    async fn sync_guest(&self, sb: &Sandbox) {
        let synced = tokio::time::timeout(
            GUEST_SYNC,
            self.run_quietly(sb.id, &sb.name.to_string(), "sync"),
        )
        .await;
        match synced {
            Ok(Ok(0)) => {}
            Ok(Ok(code)) => tracing::warn!(sandbox = %sb.id, code, "sync in the guest failed"),
            Ok(Err(e)) => tracing::warn!(sandbox = %sb.id, "cannot sync the guest: {e}"),
            Err(_) => {
                tracing::warn!(sandbox = %sb.id, "the guest did not sync within {GUEST_SYNC:?}")
            }
        }
    }

    /// Runs `program` in the sandbox over a relay, with no input, and
    /// returns its exit code; output is dropped.
    async fn run_quietly(&self, id: SandboxId, name: &str, program: &str) -> Result<i32, ApiError> {
        let start = pb::ExecStart {
            sandbox: id.to_string(),
            argv: vec![program.to_owned()],
            ..Default::default()
        };
        let mut conn = self
            .supervisors
            .open_relay(id, name, pb::relay_open::Purpose::Exec(start))
            .await?;
        let eof = pb::RelayFrame {
            frame: Some(pb::relay_frame::Frame::ExecInput(pb::ExecClientMessage {
                msg: Some(pb::exec_client_message::Msg::StdinEof(true)),
            })),
        };
        let _ = conn.to_sandbox.send(eof).await;
        while let Some(frame) = conn.from_sandbox.message().await? {
            if let Some(pb::relay_frame::Frame::ExecOutput(pb::ExecServerMessage {
                msg: Some(pb::exec_server_message::Msg::Exit(code)),
            })) = frame.frame
            {
                return Ok(code);
            }
        }
        Err(ApiError::SupervisorGone {
            what: "the command exited",
            detail: String::new(),
        })
    }

    /// Whether a host event is about what runs now: an exit of a child the
    /// host already forgot (a stopped sandbox's) or replaced (one started
    /// again since) is late news.
    pub(super) fn is_current_exit(&self, sandbox_id: &str) -> bool {
        self.plugins.processes().has_exited(sandbox_id) || self.plugins.vms().has_exited(sandbox_id)
    }
}
