//! The launcher's integration tests: the real binary, real namespaces, real
//! cgroups. Like the gateway that runs the launcher, they need root, cgroup
//! v1 (memory, pids, cpu) and user namespaces; `cgroups` also mounts cgroup
//! filesystems of its own; `v2_vm` boots a QEMU guest with only cgroup v2
//! (the staged VM runtime) and runs the launcher there.

mod cgroups;
mod config;
mod harness;
mod image_root;
mod isolation;
mod lifecycle;
mod limits;
mod symlinks;
mod v2_vm;
