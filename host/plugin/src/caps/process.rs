//! `openshell:compute/process`: the confined supervisor process of a
//! sandbox. The host runs `openshell-sandbox-launch` (namespaces, cgroups,
//! a read-only root) which runs the supervisor inside. The table of running
//! processes is keyed by sandbox id and owned by the host, so it outlives
//! the plugin instance that spawned them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use wasmtime::component::Resource;

use crate::bindings::openshell::compute::process::{
    Host, HostSandboxProcess, ProcessStatus, SpawnSpec,
};
use crate::bindings::types::CapError;
use crate::caps::{CallState, CapabilityError, limits};
use crate::children::{HostChild, Spawner};
use crate::private_file::write_private;
use openshell_sandbox_launch::cgroup_plan::Place;

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

/// Where the process capability finds its binaries.
#[derive(Clone, Debug, Default)]
pub struct ProcessConfig {
    pub launcher: Option<PathBuf>,
    pub supervisor: Option<PathBuf>,
    /// The static supervisor, for sandboxes rooted in an image.
    pub static_supervisor: Option<PathBuf>,
    /// In-sandbox uids 0..65536 map to host uids from here.
    pub uid_base: u32,
}

struct Proc {
    /// The launcher; dropping the entry kills it.
    child: HostChild,
}

/// Running sandbox processes by sandbox id.
pub struct ProcessTable {
    running: Mutex<HashMap<String, Arc<Proc>>>,
    events: mpsc::UnboundedSender<HostEvent>,
    spawner: Arc<Spawner>,
    pub config: ProcessConfig,
}

impl std::fmt::Debug for ProcessTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTable").finish_non_exhaustive()
    }
}

impl ProcessTable {
    /// Launchers are forked by `spawner`, the host's one spawner thread.
    pub fn new(
        spawner: Arc<Spawner>,
        events: mpsc::UnboundedSender<HostEvent>,
        config: ProcessConfig,
    ) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            events,
            spawner,
            config,
        }
    }

    fn get(&self, sandbox_id: &str) -> Option<Arc<Proc>> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(sandbox_id).cloned()
    }

    fn status(&self, sandbox_id: &str) -> Option<ProcessStatus> {
        self.get(sandbox_id).map(|p| match p.child.exited() {
            None => ProcessStatus::Running,
            Some(s) => ProcessStatus::Exited(s),
        })
    }

    /// Whether the host holds a launcher of this sandbox that has exited
    /// (not one that runs, nor one it forgot after stopping it).
    pub fn has_exited(&self, sandbox_id: &str) -> bool {
        matches!(self.status(sandbox_id), Some(ProcessStatus::Exited(_)))
    }

    /// Host processes (launchers) currently alive.
    pub fn running(&self) -> usize {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .values()
            .filter(|p| p.child.exited().is_none())
            .count()
    }

    /// The host uid a sandbox's root maps to for a slot.
    pub fn uid_base(&self, slot: u32) -> u32 {
        self.config.uid_base + slot * 65_536
    }

    async fn spawn(&self, sandbox_id: &str, cmd: Command) -> Result<(), CapError> {
        if matches!(self.status(sandbox_id), Some(ProcessStatus::Running)) {
            return Err(CapError::Invalid(
                "this sandbox's process is already running".into(),
            ));
        }
        // Abandoned here, the spawner kills what nobody received; past this
        // point there is no await before the table owns the child.
        let child = self
            .spawner
            .spawn(cmd)
            .await
            .map_err(|e| CapError::Failed(format!("cannot start the sandbox launcher: {e}")))?;
        child.report_exit(sandbox_id, "the sandbox process", self.events.clone());
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox_id.to_owned(), Arc::new(Proc { child }));
        Ok(())
    }

    /// SIGTERM, up to `grace` for it to exit, then SIGKILL. Returns the
    /// exit status, or None if nothing ran.
    pub async fn stop(&self, sandbox_id: &str, grace: Duration) -> Option<i32> {
        self.get(sandbox_id)?.child.stop(grace).await
    }

    /// Removes the empty cgroups of sandboxes not in `keep` (left by
    /// launchers that died with an earlier gateway), on cgroup v1 or v2.
    /// Non-empty ones stay.
    pub fn sweep_stale_cgroups(&self, keep: &std::collections::HashSet<String>) -> usize {
        sweep_stale_cgroups_in(&sandbox_cgroup_parents(), keep, Duration::from_secs(60))
    }

    /// Stops a sandbox's process at once and forgets it. Also removes the
    /// sandbox's cgroups, which a launcher killed outright (for example with
    /// a previous gateway) could not remove itself.
    pub async fn kill(&self, sandbox_id: &str) {
        self.stop(sandbox_id, Duration::ZERO).await;
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox_id);
        for parent in sandbox_cgroup_parents() {
            // Only empty cgroups can be removed; a missing one is fine.
            for dir in Place::removal_order(&parent.join(sandbox_id)) {
                let _ = tokio::fs::remove_dir(dir).await;
            }
        }
    }
}

/// Where this host's launchers put sandbox cgroups (v1 or v2), read from
/// the gateway's own mountinfo and cgroup: its launchers are born there.
pub(crate) fn sandbox_cgroup_parents() -> Vec<std::path::PathBuf> {
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    openshell_sandbox_launch::cgroup_plan::sandbox_parents(
        &read("/proc/self/mountinfo"),
        &read("/proc/self/cgroup"),
        Path::new("/"),
    )
}

/// [`ProcessTable::sweep_stale_cgroups`] over the given parent directories.
/// Cgroups younger than `min_age` stay.
fn sweep_stale_cgroups_in(
    parents: &[std::path::PathBuf],
    keep: &std::collections::HashSet<String>,
    min_age: Duration,
) -> usize {
    let mut removed = 0;
    for root in parents {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // A launcher (of another gateway on this host, say) creates
            // its cgroup a moment before moving into it: leave young ones.
            let young = e
                .metadata()
                .and_then(|m| m.modified())
                .map_or(true, |t| t.elapsed().unwrap_or_default() < min_age);
            // A live sandbox's `workload` leaf is empty between commands;
            // removing it would leave its supervisor's descriptors pointing
            // at nothing. Another gateway's sandbox is live too: only a
            // sandbox whose whole cgroup is empty goes.
            if young || keep.contains(&name) || occupied(&e.path()) {
                continue;
            }
            for dir in Place::removal_order(&e.path()) {
                let _ = std::fs::remove_dir(dir);
            }
            if !e.path().exists() {
                removed += 1;
            }
        }
    }
    removed
}

/// Whether any process is in a sandbox's cgroup `dir` or its leaves (an
/// unreadable `cgroup.procs` counts as occupied).
fn occupied(dir: &Path) -> bool {
    Place::removal_order(dir).iter().any(|d| {
        match std::fs::read_to_string(d.join("cgroup.procs")) {
            Ok(procs) => !procs.trim().is_empty(),
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        }
    })
}

/// Names in a sandbox's state dir that belong to the host (the run dir, the
/// new root's mount point, an image root's writable layer, overlayfs's work
/// dir and the layers' mount points); files the host keeps there all have a
/// dot in their name (`launch.json`, `supervisor.log`, `initrd.cpio`, ...).
const RESERVED: [&str; 5] = ["run", "root", UPPER, WORK, "lower"];

/// An image root's writable layer and overlayfs's work dir, in the state dir.
const UPPER: &str = "upper";
const WORK: &str = "work";

/// The launch of a sandbox rooted in an image: the layers, the image's
/// environment under the spec's, its `User` and `WorkingDir` for the
/// supervisor, and the static supervisor (the image's libc is not ours).
fn image_launch(
    config: &mut openshell_sandbox_launch::config::LaunchConfig,
    image: &crate::caps::ImageHandle,
    static_supervisor: Option<&PathBuf>,
) -> Result<(), CapError> {
    let supervisor = static_supervisor.ok_or_else(|| {
        CapError::Unavailable(
            "sandboxes rooted in an image need the static supervisor (cargo build -p openshell-supervisor --target x86_64-unknown-linux-musl; just build does it)".into(),
        )
    })?;
    config.program = supervisor.clone();
    let state = &config.state_dir;
    config.image = Some(openshell_sandbox_launch::config::ImageRoot {
        layers: image.layers.clone(),
        upper: state.join(UPPER),
        work: state.join(WORK),
    });
    config.env =
        crate::caps::image::environment(&image.image.config, std::mem::take(&mut config.env));
    Ok(())
}

/// A workdir is one plain name directly in the state dir: letters, digits,
/// `-` and `_`, not a name the host uses. The launcher hands it to sandbox
/// code, so it must never be the state dir itself (`.`, ``), outside it
/// (`..`, `/abs`), below something the sandbox once owned (`w/x`, where
/// `x` may be a symlink it planted), or one of the host's own entries.
fn check_workdir(path: &str) -> Result<(), CapError> {
    let plain = !path.is_empty()
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain && !RESERVED.contains(&path) {
        Ok(())
    } else {
        Err(CapError::AccessDenied(format!(
            "workdir {path:?} must be one plain name (letters, digits, '-', '_') directly in the sandbox's state directory, other than {RESERVED:?}"
        )))
    }
}

/// Creates the workdir in the state dir (relative to its handle, so no
/// symlink is followed) and checks it is a real directory.
fn create_workdir(dir: &cap_std::fs::Dir, name: &str) -> Result<(), CapError> {
    let failed = |e: std::io::Error| CapError::Failed(format!("cannot create the workdir: {e}"));
    match dir.create_dir(name) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(failed(e)),
        _ => {}
    }
    let meta = dir.symlink_metadata(name).map_err(failed)?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(CapError::Failed(format!(
            "the workdir {name:?} is not a directory"
        )))
    }
}

/// Opens `supervisor.log` for appending: never through a symlink, only a
/// regular file, and 0600 even if an older gateway made it 0644.
fn open_supervisor_log(state: &Path) -> Result<std::fs::File, CapError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed =
        |e: std::io::Error| CapError::Failed(format!("cannot open the supervisor log: {e}"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(state.join("supervisor.log"))
        .map_err(failed)?;
    if !log.metadata().map_err(failed)?.is_file() {
        return Err(CapError::Failed(
            "the supervisor log is not a regular file".into(),
        ));
    }
    log.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(failed)?;
    Ok(log)
}

/// The gateway serves the sandbox's supervisor socket at `run/gateway.sock`
/// and its egress socket at `run/egress.sock` (mode 0600, root's): only
/// the sandbox's uid 0, its supervisor, may connect; sandbox code (uid
/// 1000) may not. Not following a symlink; a socket the gateway does not
/// serve (no gateway, as in plugin tests) is nothing to hand over.
fn hand_socket_to_sandbox_root(state: &Path, uid_base: u32) -> Result<(), CapError> {
    for name in ["run/gateway.sock", "run/egress.sock"] {
        match std::os::unix::fs::lchown(state.join(name), Some(uid_base), Some(uid_base)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CapError::Failed(format!(
                    "cannot hand the supervisor's {name} to the sandbox: {e}"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

impl CallState {
    fn launch_command(
        &self,
        id: &str,
        slot: u32,
        spec: &SpawnSpec,
        image: Option<&crate::caps::ImageHandle>,
    ) -> Result<Command, CapError> {
        // What the plugin asked is checked before anything the host has.
        check_workdir(&spec.workdir)?;
        let cfg = &self.services.processes.config;
        let (Some(launcher), Some(supervisor)) = (&cfg.launcher, &cfg.supervisor) else {
            return Err(CapError::Unavailable(
                "process sandboxes need openshell-sandbox-launch and openshell-supervisor installed next to the gateway".into(),
            ));
        };
        for (k, _) in &spec.environment {
            if !openshell_core::validate::is_env_key(k) {
                return Err(CapError::Invalid(format!(
                    "environment key {k:?} is invalid"
                )));
            }
        }
        let dir = self.dir()?;
        create_workdir(&dir, &spec.workdir)?;
        let state = self
            .scope
            .state_path
            .clone()
            .ok_or_else(|| CapError::AccessDenied("no sandbox state directory".into()))?;
        let uid_base = self.services.processes.uid_base(slot);
        hand_socket_to_sandbox_root(&state, uid_base)?;
        let mut env = spec.environment.clone();
        // Host floor: sandbox code never runs as the sandbox's root.
        env.retain(|(k, _)| k != "OPENSHELL_SANDBOX_UID");
        env.push(("OPENSHELL_SANDBOX_UID".into(), "1000".into()));
        let c = &spec.confinement;
        // The launcher's own type: the schema is checked here at compile
        // time; the launcher validates what it reads.
        let mut config = openshell_sandbox_launch::config::LaunchConfig {
            sandbox_id: id.to_owned(),
            hostname: self.scope.sandbox_name.clone(),
            workdir: state.join(&spec.workdir),
            run_dir: state.join("run"),
            state_dir: state.clone(),
            program: supervisor.clone(),
            args: Vec::new(),
            env,
            uid_base,
            isolate_network: c.isolate_network,
            memory_mib: c.memory_mib,
            max_processes: c.max_processes.into(),
            cpu_millis: c.cpu_millis.into(),
            cgroup_root: None,
            image: None,
            supervised: true,
        };
        if let Some(image) = image {
            image_launch(&mut config, image, cfg.static_supervisor.as_ref())?;
        }
        let json = config
            .to_json()
            .map_err(|e| CapError::Failed(format!("cannot encode the launch config: {e}")))?;
        // It carries the sandbox's secret: readable by the gateway's user only.
        let config_path = state.join("launch.json");
        write_private(&config_path, json.as_bytes())
            .map_err(|e| CapError::Failed(format!("cannot write the launch config: {e}")))?;
        // Checked as before (a regular file, 0600, no symlink), but the
        // launcher (and the supervisor after it) write into a pipe the
        // gateway copies into it under a bound (crate::logs).
        drop(open_supervisor_log(&state)?);
        let failed =
            |e: std::io::Error| CapError::Failed(format!("cannot open the supervisor log: {e}"));
        let (log, _) = crate::logs::pump(&state.join("supervisor.log"), crate::logs::MAX_LOG)
            .map_err(failed)?;
        let log2 = log.try_clone().map_err(failed)?;
        // The config arrives on stdin and argv[0] is a plain name: the
        // sandbox's init is a copy of the launcher, so its command line is
        // what `ps` shows sandbox code, and it must name no host path.
        let config_file = std::fs::File::open(&config_path)
            .map_err(|e| CapError::Failed(format!("cannot open the launch config: {e}")))?;
        let mut cmd = Command::new(launcher);
        std::os::unix::process::CommandExt::arg0(&mut cmd, "openshell-sandbox-init");
        cmd.args(["--config", "-", "--sandbox", &config.sandbox_id])
            .env_clear()
            .stdin(config_file)
            .stdout(log)
            .stderr(log2);
        Ok(cmd)
    }
}

impl Host for CallState {
    async fn spawn(
        &mut self,
        spec: SpawnSpec,
        root: Option<Resource<crate::caps::ImageHandle>>,
    ) -> Result<Resource<ProcessHandle>, CapabilityError> {
        let id = self.require_sandbox()?.to_owned();
        limits::check_environment(&spec.environment)?;
        limits::check_path_len("workdir", &spec.workdir)?;
        // The gateway allocated and stored it: unique among live records,
        // so no two sandboxes (running or not) ever share a range.
        let slot = self.scope.uid_slot.ok_or_else(|| {
            CapError::Invalid("this sandbox has no uid range assigned by the gateway".into())
        })?;
        if slot >= openshell_core::uid_slot::UID_SLOTS {
            return Err(CapError::Invalid(format!("uid slot {slot} is out of range")).into());
        }
        let image = match &root {
            Some(h) => Some(self.table.get(h)?),
            None => None,
        };
        let cmd = self.launch_command(&id, slot, &spec, image)?;
        let services = self.services.clone();
        services.processes.spawn(&id, cmd).await?;
        Ok(self.table.push(ProcessHandle { sandbox_id: id })?)
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
        grace_ms: u32,
    ) -> Result<i32, CapabilityError> {
        let id = self.table.get(&h)?.sandbox_id.clone();
        // Bounded: never longer than the capability I/O deadline.
        let grace = Duration::from_millis(grace_ms.into()).min(self.services.io_timeout);
        let services = self.services.clone();
        let status = services.processes.stop(&id, grace).await;
        Ok(status.ok_or_else(|| CapError::Invalid("nothing is running".into()))?)
    }

    async fn drop(&mut self, h: Resource<ProcessHandle>) -> wasmtime::Result<()> {
        // Dropping the handle never stops the process: the host owns it.
        self.table.delete(h)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: another gateway's sweep removed a live sandbox's empty
    /// `workload` leaf, so its commands ran outside their limits.
    #[test]
    fn a_sweep_leaves_every_cgroup_of_a_live_sandbox() {
        let pids = Path::new("/sys/fs/cgroup/pids");
        if nix::sys::statfs::statfs(pids).map_or(true, |s| s.filesystem_type().0 != 0x27e0eb) {
            eprintln!(
                "SKIP a_sweep_leaves_every_cgroup_of_a_live_sandbox: no cgroup v1 pids hierarchy at {}",
                pids.display()
            );
            return;
        }
        let parent = pids.join(format!("openshell-sweep-test-{}", std::process::id()));
        for id in ["live", "dead"] {
            for dir in Place::removal_order(&parent.join(id)).iter().rev() {
                std::fs::create_dir_all(dir).unwrap();
            }
        }
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(
            parent.join("live/supervisor/cgroup.procs"),
            sleeper.id().to_string(),
        )
        .unwrap();
        let removed = sweep_stale_cgroups_in(
            std::slice::from_ref(&parent),
            &Default::default(),
            Duration::ZERO,
        );
        let live_workload = parent.join("live/workload").exists();
        let dead = parent.join("dead").exists();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        for dir in Place::removal_order(&parent.join("live")) {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(&parent);
        assert_eq!(removed, 1);
        assert!(live_workload, "the live sandbox's empty leaf was removed");
        assert!(!dead, "the dead sandbox's cgroup stayed");
    }

    #[test]
    fn every_uid_range_fits_in_a_uid() {
        let max_base =
            u64::from(1u32 << 31) + u64::from(openshell_core::uid_slot::UID_SLOTS) * 65_536;
        assert!(
            max_base + 65_536 < u64::from(u32::MAX),
            "ranges fit in a uid"
        );
    }

    #[test]
    fn a_workdir_is_one_plain_name_directly_in_the_state_dir() {
        for good in ["workdir", "w", "my-work_2"] {
            assert!(check_workdir(good).is_ok(), "{good:?}");
        }
        let bad = [
            "",
            ".",
            "..",
            "./",
            "./w",
            "w/.",
            "w/..",
            "a/b",
            "/abs",
            "../up",
            "a/../../b",
            "a\0b",
            "run",
            "root",
            "launch.json",
            "supervisor.log",
            "initrd.cpio",
            ".tmp-x",
            "w ",
            "w\n",
        ];
        for bad in bad {
            assert!(
                matches!(check_workdir(bad), Err(CapError::AccessDenied(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_supervisor_log_is_never_opened_through_a_symlink_and_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (state, elsewhere) = (tmp.path().join("state"), tmp.path().join("elsewhere"));
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::symlink(&elsewhere, state.join("supervisor.log")).unwrap();
        assert!(open_supervisor_log(&state).is_err());
        assert!(!elsewhere.exists(), "the append followed the symlink");

        std::fs::remove_file(state.join("supervisor.log")).unwrap();
        std::fs::write(state.join("supervisor.log"), "old\n").unwrap();
        let open = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(state.join("supervisor.log"), open).unwrap();
        open_supervisor_log(&state).unwrap();
        let mode = std::fs::metadata(state.join("supervisor.log"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_workdir_that_is_a_symlink_is_refused_and_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let (state, elsewhere) = (tmp.path().join("state"), tmp.path().join("elsewhere"));
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::symlink(&elsewhere, state.join("w")).unwrap();
        let dir = cap_std::fs::Dir::open_ambient_dir(&state, cap_std::ambient_authority()).unwrap();
        assert!(create_workdir(&dir, "w").is_err());
        create_workdir(&dir, "fresh").unwrap();
        create_workdir(&dir, "fresh").unwrap();
        assert!(state.join("fresh").is_dir());
    }
}
