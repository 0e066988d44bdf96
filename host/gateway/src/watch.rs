//! "Something changed" signals for watchers.
//!
//! One broadcast channel carries the id of every sandbox whose stored record
//! changed, sent after the commit. Watchers re-read the store; a lagging
//! watcher loses nothing but a few redundant signals, so it just re-reads.

use openshell_core::SandboxId;
use tokio::sync::broadcast;

#[derive(Clone, Debug)]
pub struct WatchBus {
    tx: broadcast::Sender<SandboxId>,
}

impl Default for WatchBus {
    fn default() -> Self {
        Self::new()
    }
}

impl WatchBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self { tx }
    }

    pub fn notify(&self, id: SandboxId) {
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(id);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SandboxId> {
        self.tx.subscribe()
    }
}
