//! Gateway integration tests: a real gateway on a loopback TCP port, real
//! SQLite, real driver components built from `drivers/`.

mod harness;
mod load;
mod plugins;
mod process;
mod readiness;
mod relays;
mod sandboxes;
mod ssh;
mod structure;
mod supervisor_socket;
