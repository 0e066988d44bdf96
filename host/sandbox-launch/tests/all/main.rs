//! The launcher's integration tests: the real binary, real namespaces, real
//! cgroups. Like the gateway that runs the launcher, they need root, cgroup
//! v1 (memory, pids, cpu) and user namespaces; `cgroups` also mounts cgroup
//! filesystems of its own.

mod cgroups;
mod config;
mod harness;
mod isolation;
mod lifecycle;
mod limits;
