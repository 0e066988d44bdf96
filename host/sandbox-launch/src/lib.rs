//! `openshell-sandbox-launch` as a library: the launch config, the
//! contract between the gateway (which writes `launch.json`) and the launcher
//! binary (which reads it), and the pure cgroup layout both must agree on
//! (where a sandbox's cgroups are, so the gateway can sweep leftovers). Pure
//! types, validation and decisions, no I/O, so the gateway can depend on it
//! without pulling in the launcher.
//!
//! The launcher itself (namespaces, cgroups, the new root) is the binary in
//! `src/main.rs`.

pub mod cgroup_plan;
pub mod config;
