//! CLI integration tests: the real `openshell` binary against a real gateway
//! process (`openshell gateway start`) on a loopback port, with the driver
//! fixtures built from `drivers/` (`just drivers`).
//!
//! Every test starts its own gateway in its own temp dir, so they run in
//! parallel; [`harness::Gateway`] kills its process even when a test panics.

mod backpressure;
mod crash;
mod egress;
mod everyday;
mod flood;
mod gateway;
mod habits;
mod harness;
mod images;
mod process;
mod resources;
mod restart;
mod sandbox;
mod seccomp;
mod security;
mod shell;
mod ssh;
mod state_dir;
mod stop_start;
mod vm;
mod vm_images;
