//! Creating a sandbox: validate, admit, store (Provisioning), then launch
//! through its driver in an owned task.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use openshell_core::{Sandbox, SandboxImage, SandboxName, SandboxSpec, uid_slot, validate};
use openshell_plugin::{DriverSpec, Plugin};
use openshell_store::StoreError;
use rand::RngCore;

use super::{ComputeRuntime, RETRY_AFTER, now_ms};
use crate::error::ApiError;

/// One admitted sandbox record: released on drop unless the record was
/// stored.
struct Admission<'a>(Option<&'a AtomicUsize>);

impl Admission<'_> {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl ComputeRuntime {
    fn resolve_driver(&self, asked: &str) -> Result<Arc<Plugin>, ApiError> {
        let loaded = self.plugins.list();
        let names = || {
            loaded
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if asked.is_empty() {
            return match loaded.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(ApiError::NoDriverLoaded),
                _ => Err(ApiError::AmbiguousDriver { loaded: names() }),
            };
        }
        validate::driver_name(asked)?;
        self.plugins
            .get(asked)
            .ok_or_else(|| ApiError::DriverNotLoaded {
                driver: asked.to_owned(),
                loaded: names(),
            })
    }

    /// Validates and stores a new sandbox, then launches it in the
    /// background. Returns the stored record (Provisioning).
    pub async fn create(
        self: &Arc<Self>,
        name: &str,
        mut spec: SandboxSpec,
        request_id: &str,
    ) -> Result<Sandbox, ApiError> {
        let request_id = if request_id.is_empty() {
            None
        } else {
            validate::request_id(request_id)?;
            if let Some(existing) = self.store.get_sandbox_by_request_id(request_id).await? {
                return Ok(existing);
            }
            Some(request_id.to_owned())
        };
        let name = if name.is_empty() {
            None
        } else {
            Some(SandboxName::parse(name)?)
        };
        validate::environment(&spec.environment)?;
        validate::resources(&spec.resources)?;
        validate::lifetime(&spec.lifetime)?;
        spec.resources.disk_gib =
            validate::disk_gib(spec.resources.disk_gib, self.plugins.disk_sizes())?;
        spec.policy = self.policy_for_create(spec.policy.take())?;
        let plugin = self.resolve_driver(&spec.driver)?;
        spec.driver = plugin.name.clone();
        if spec.image.is_none() && plugin.info.isolation == "process" {
            spec.image = self.default_image.clone().map(|reference| SandboxImage {
                reference,
                digest: String::new(),
            });
        }

        let probe = driver_spec_of("", name.as_ref().map_or("", |n| n.as_str()), &spec);
        plugin
            .validate(&probe)
            .await
            .map_err(|source| ApiError::Driver {
                driver: plugin.name.clone(),
                source,
            })?;

        admit_host_pids(&read_host_tasks().await)?;
        let free = read_free_bytes(self.plugins.state_dir().to_owned()).await;
        admit_free_disk(free, self.limits.disk_reserve_gib)?;
        let admission = self.admit()?;
        // Held until the record that holds the image is stored, so garbage
        // collection cannot take the layers in between.
        let _gc = self.images_gc.read().await;
        if let Some(image) = &mut spec.image {
            // Pulled before anything is stored: a failure stores nothing.
            let pulled = self.pull_image(&image.reference, &|_| {}).await?;
            image.digest = pulled.digest.to_string();
            // A VM boots a disk of the image: built here, once per image,
            // so the driver's launch (under its call deadline) finds it.
            if plugin.info.isolation != "process" {
                self.image_disk(pulled).await?;
            }
        }
        let (stored, fresh) = self.insert(name, spec, request_id).await?;
        if !fresh {
            return Ok(stored);
        }
        admission.keep();
        self.logs.ensure(stored.id);
        self.install_policy(&stored);
        self.logs
            .event(stored.id, format!("created ({})", stored.spec.driver));
        crate::metrics::get().creates.inc();
        self.watch.notify(stored.id);
        let me = self.clone();
        let launched = stored.clone();
        tokio::spawn(async move { me.launch(plugin, launched, false).await });
        Ok(stored)
    }

    /// Reserves room for one more sandbox record, or refuses with a hint.
    fn admit(&self) -> Result<Admission<'_>, ApiError> {
        let max = self.limits.max_sandboxes;
        self.admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|n| ApiError::Busy {
                message: format!("{n} sandboxes exist (limit {max}); delete some or retry later"),
                retry_after: RETRY_AFTER,
            })?;
        Ok(Admission(Some(&self.admitted)))
    }

    /// Sandbox records the gateway counts against `max_sandboxes`.
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Stores a new record with its own host uid slot; `false` with the
    /// existing one when a concurrent create with the same request_id
    /// stored it first.
    async fn insert(
        &self,
        name: Option<SandboxName>,
        spec: SandboxSpec,
        request_id: Option<String>,
    ) -> Result<(Sandbox, bool), ApiError> {
        let generated = name.is_none();
        let mut name = name.unwrap_or_else(|| SandboxName::generate(&mut rand::rng()));
        let mut sb = Sandbox::new(name.clone(), spec, request_id, now_ms());
        let in_use: HashSet<u32> = self.store.uid_slots_in_use().await?.into_iter().collect();
        let mut slots = uid_slot::candidates(sb.id, &in_use);
        sb.uid_slot = Some(slots.next().ok_or(ApiError::NoFreeUidSlot {
            slots: uid_slot::UID_SLOTS,
        })?);
        // Each attempt fixes one clash: a generated name taken, or a slot
        // another create took since `in_use` was read.
        for _ in 0..64 {
            match self.store.insert_sandbox(&sb).await {
                Ok(stored) => return Ok((stored, true)),
                Err(StoreError::NameTaken { .. }) if generated => {
                    name = SandboxName::generate(&mut rand::rng());
                    sb.name = name.clone();
                }
                Err(StoreError::NameTaken { name }) => return Err(ApiError::NameTaken { name }),
                Err(StoreError::SlotTaken { .. }) => {
                    sb.uid_slot = Some(slots.next().ok_or(ApiError::NoFreeUidSlot {
                        slots: uid_slot::UID_SLOTS,
                    })?);
                }
                // A concurrent retry of the same request won the race.
                Err(StoreError::RequestIdTaken { request_id }) => {
                    return match self.store.get_sandbox_by_request_id(&request_id).await? {
                        Some(existing) => Ok((existing, false)),
                        None => Err(ApiError::CreateInFlight),
                    };
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::NoFreeName)
    }

    /// Calls the driver's create (or resume) with a fresh secret and applies
    /// what it says. Runs in its own task.
    pub(super) async fn launch(self: Arc<Self>, plugin: Arc<Plugin>, sb: Sandbox, resume: bool) {
        // Queued, not refused: the sandbox is already stored and admitted.
        let Ok(_permit) = self.launches.acquire().await else {
            return;
        };
        let secret = new_secret();
        // Every launch, so a resume sets the stored size again.
        if let Err(e) = self
            .plugins
            .ensure_sandbox_dir(&sb.id.to_string(), sb.spec.resources.disk_gib)
        {
            tracing::error!(sandbox = %sb.id, "cannot create the sandbox's state dir: {e}");
            self.fail(sb.id, "StateDirUnavailable", &e.to_string())
                .await;
            return;
        }
        let socket = self.plugins.supervisor_socket(&sb.id.to_string());
        if let Err(e) = self.supervisors.listen(sb.id, &socket, &secret) {
            tracing::error!(sandbox = %sb.id, "{e}");
            self.fail(sb.id, "SocketFailed", &e.to_string()).await;
            return;
        }
        let spec = driver_spec(&sb);
        let result = if resume {
            plugin.resume(&spec, &secret, &sb.driver_state).await
        } else {
            plugin.create(&spec, &secret, &sb.driver_state).await
        };
        match result {
            Ok(out) => self.apply(sb.id, &out.events, Some(out.state)).await,
            Err(e) => self.driver_failed(sb.id, &plugin.name, &e).await,
        }
    }
}

/// What a driver is told about a stored sandbox.
pub fn driver_spec(sb: &Sandbox) -> DriverSpec {
    DriverSpec {
        uid_slot: sb.uid_slot,
        ..driver_spec_of(&sb.id.to_string(), sb.name.as_str(), &sb.spec)
    }
}

/// What a driver is told about a sandbox not yet stored (validate).
fn driver_spec_of(id: &str, name: &str, spec: &SandboxSpec) -> DriverSpec {
    DriverSpec {
        id: id.to_owned(),
        name: name.to_owned(),
        environment: spec.environment.clone().into_iter().collect(),
        resources: spec.resources,
        uid_slot: None,
        image: spec.image.clone(),
    }
}

/// A per-launch secret: given only to the driver's launch call; the gateway
/// keeps only its digest.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Above this share of `pid_max` in use on the host, creates are refused:
/// every sandbox may fork up to its pids limit (512 by default), and 256 of
/// them exceed a common `pid_max` of 32768, so the host would run out first.
const MAX_HOST_TASK_SHARE: f64 = 0.85;

/// Tasks on the host and the host's `pid_max`, if procfs tells.
#[derive(Debug, Default, PartialEq, Eq)]
struct HostTasks {
    running: Option<u64>,
    pid_max: Option<u64>,
}

async fn read_host_tasks() -> HostTasks {
    let loadavg = tokio::fs::read_to_string("/proc/loadavg").await.ok();
    let pid_max = tokio::fs::read_to_string("/proc/sys/kernel/pid_max")
        .await
        .ok();
    HostTasks {
        // "0.15 0.10 0.05 2/345 6789": the fourth field is running/total.
        running: loadavg
            .as_deref()
            .and_then(|l| l.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok()),
        pid_max: pid_max.and_then(|p| p.trim().parse().ok()),
    }
}

/// Refuses a create, with a retry hint, when the host's pid space is
/// nearly used up; unknown numbers admit (the sandbox's own pids limit
/// still applies).
fn admit_host_pids(t: &HostTasks) -> Result<(), ApiError> {
    let (Some(running), Some(pid_max)) = (t.running, t.pid_max) else {
        return Ok(());
    };
    if running as f64 > pid_max as f64 * MAX_HOST_TASK_SHARE {
        return Err(ApiError::Busy {
            message: format!(
                "the host runs {running} tasks of its pid_max {pid_max}; delete some sandboxes or retry later"
            ),
            retry_after: RETRY_AFTER,
        });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem holding
/// `dir` (statvfs `f_bavail`), if it tells.
async fn read_free_bytes(dir: std::path::PathBuf) -> Option<u64> {
    let stat = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&dir))
        .await
        .ok()?;
    match stat {
        Ok(s) => Some(s.blocks_available().saturating_mul(s.fragment_size())),
        Err(e) => {
            tracing::warn!("cannot read the free space of the state dir: {e}");
            None
        }
    }
}

/// Refuses a create, before anything is stored, when the filesystem of the
/// state dir (which the sandbox disk's sparse image, the image store and
/// the database grow into) has less than `reserve_gib` free; 0 is off.
/// Unknown free space admits, as unknown pid numbers do: the sandbox's own
/// quota still bounds it.
fn admit_free_disk(free_bytes: Option<u64>, reserve_gib: u64) -> Result<(), ApiError> {
    let Some(free_bytes) = free_bytes else {
        return Ok(());
    };
    if reserve_gib > 0 && free_bytes < reserve_gib.saturating_mul(1 << 30) {
        return Err(ApiError::DiskReserve {
            free_bytes,
            reserve_gib,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_are_refused_when_the_state_dirs_disk_is_below_the_reserve() {
        let gib = 1u64 << 30;
        assert!(admit_free_disk(Some(3 * gib), 2).is_ok());
        assert!(admit_free_disk(Some(2 * gib), 2).is_ok());
        let refused = admit_free_disk(Some(gib + (gib >> 1)), 2).unwrap_err();
        assert!(matches!(
            refused,
            ApiError::DiskReserve { reserve_gib: 2, .. }
        ));
        let message = refused.to_string();
        assert!(message.contains("1.5 GiB free"), "{message}");
        assert!(message.contains("reserve of 2 GiB"), "{message}");
        // Off, and unknown.
        assert!(admit_free_disk(Some(0), 0).is_ok());
        assert!(admit_free_disk(None, 2).is_ok());
    }

    #[tokio::test]
    async fn this_hosts_free_space_is_read() {
        let free = read_free_bytes(std::env::temp_dir()).await;
        assert!(free.is_some_and(|n| n > 0), "{free:?}");
    }

    #[test]
    fn creates_are_refused_when_the_hosts_pid_space_is_nearly_used() {
        let t = |running, pid_max| HostTasks {
            running: Some(running),
            pid_max: Some(pid_max),
        };
        assert!(admit_host_pids(&t(1_000, 32_768)).is_ok());
        assert!(matches!(
            admit_host_pids(&t(30_000, 32_768)),
            Err(ApiError::Busy { .. })
        ));
        assert!(admit_host_pids(&HostTasks::default()).is_ok());
    }

    #[tokio::test]
    async fn this_hosts_task_count_and_pid_max_are_read() {
        let t = read_host_tasks().await;
        assert!(t.running.is_some_and(|n| n > 0), "{t:?}");
        assert!(t.pid_max.is_some_and(|n| n >= 301), "{t:?}");
    }
}
