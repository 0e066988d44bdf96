//! `openshell:compute/process`: the confined supervisor process of a
//! sandbox. The table of running processes is keyed by sandbox id and owned
//! by the host, so it outlives the plugin instance that spawned them.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::mpsc;
use wasmtime::component::Resource;

use crate::bindings::openshell::compute::process::{
    Host, HostSandboxProcess, ProcessStatus, SpawnSpec,
};
use crate::bindings::types::CapError;
use crate::caps::CallState;

/// Something the host saw happen to a sandbox's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    Exited { sandbox_id: String, status: i32 },
    PollFailed { sandbox_id: String, message: String },
}

/// A plugin's handle to its sandbox's process; valid for one call.
#[derive(Debug)]
pub struct ProcessHandle {
    sandbox_id: String,
}

/// Running sandbox processes by sandbox id.
#[derive(Debug)]
pub struct ProcessTable {
    running: Mutex<HashMap<String, Child>>,
    events: mpsc::UnboundedSender<HostEvent>,
}

#[derive(Debug)]
struct Child {
    exit: Option<i32>,
}

impl ProcessTable {
    pub fn new(events: mpsc::UnboundedSender<HostEvent>) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            events,
        }
    }

    fn status(&self, sandbox_id: &str) -> Option<ProcessStatus> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(sandbox_id).map(|c| match c.exit {
            None => ProcessStatus::Running,
            Some(s) => ProcessStatus::Exited(s),
        })
    }

    /// Number of sandbox processes the host tracks.
    pub fn len(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[doc(hidden)]
    pub fn events(&self) -> &mpsc::UnboundedSender<HostEvent> {
        &self.events
    }
}

impl Host for CallState {
    async fn spawn(
        &mut self,
        _spec: SpawnSpec,
    ) -> wasmtime::Result<Result<Resource<ProcessHandle>, CapError>> {
        if let Err(e) = self.require_sandbox() {
            return Ok(Err(e));
        }
        Ok(Err(CapError::Unavailable(
            "this gateway build cannot spawn sandbox processes yet".into(),
        )))
    }

    async fn current(&mut self) -> wasmtime::Result<Option<Resource<ProcessHandle>>> {
        let Ok(id) = self.require_sandbox() else {
            return Ok(None);
        };
        let id = id.to_owned();
        if self.services.processes.status(&id).is_none() {
            return Ok(None);
        }
        Ok(Some(self.table.push(ProcessHandle { sandbox_id: id })?))
    }
}

impl HostSandboxProcess for CallState {
    async fn status(&mut self, h: Resource<ProcessHandle>) -> wasmtime::Result<ProcessStatus> {
        let id = &self.table.get(&h)?.sandbox_id;
        Ok(self
            .services
            .processes
            .status(id)
            .unwrap_or(ProcessStatus::Exited(-1)))
    }

    async fn stop(
        &mut self,
        h: Resource<ProcessHandle>,
        _grace_ms: u32,
    ) -> wasmtime::Result<Result<i32, CapError>> {
        let _ = self.table.get(&h)?;
        Ok(Err(CapError::Unavailable(
            "this gateway build cannot spawn sandbox processes yet".into(),
        )))
    }

    async fn drop(&mut self, h: Resource<ProcessHandle>) -> wasmtime::Result<()> {
        // Dropping the handle never stops the process: the host owns it.
        self.table.delete(h)?;
        Ok(())
    }
}
