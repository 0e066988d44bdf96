//! `openshell:compute/log`: plugin log lines, tagged and length-capped.

use crate::bindings::openshell::compute::log::{Host, Level};
use crate::caps::CallState;

const MAX_LINE: usize = 4096;

impl Host for CallState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let message = openshell_core::phase::driver_message(&message[..floor(&message, MAX_LINE)]);
        let (plugin, sandbox) = (&self.scope.plugin, &self.scope.sandbox_id);
        match level {
            Level::Debug => tracing::debug!(plugin, sandbox, "{message}"),
            Level::Info => tracing::info!(plugin, sandbox, "{message}"),
            Level::Warn => tracing::warn!(plugin, sandbox, "{message}"),
            Level::Error => tracing::error!(plugin, sandbox, "{message}"),
        }
        Ok(())
    }
}

fn floor(s: &str, max: usize) -> usize {
    let mut i = s.len().min(max);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
