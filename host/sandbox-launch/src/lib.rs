//! `openshell-sandbox-launch` as a library: only the launch config, the
//! contract between the gateway (which writes `launch.json`) and the launcher
//! binary (which reads it). Pure serde types and validation, no I/O, so the
//! gateway can depend on it without pulling in the launcher.
//!
//! The launcher itself (namespaces, cgroups, the new root) is the binary in
//! `src/main.rs`.

pub mod config;
