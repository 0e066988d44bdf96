//! Host children: every process a capability starts (sandbox launchers,
//! QEMU, gvproxy) is forked by one [`Spawner`] and owned by a [`HostChild`].
//!
//! - One long-lived thread forks every child. A parent-death signal set in
//!   a child fires when the *thread* that forked it exits, and async runtime
//!   threads come and go; this one lives as long as the plugin host.
//! - A [`HostChild`] kills its process when dropped, so a capability future
//!   abandoned at its deadline takes what it started along. A spawn whose
//!   requester gave up is not started; one whose reply nobody received is
//!   dropped, and so killed, by the spawner thread.
//! - Each child has a small waiter thread that reaps it and publishes its
//!   exit (the exit watch). It waits with `WNOWAIT` and reaps under the same
//!   lock signals are sent under, so a signal never reaches a reused pid.

use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot, watch};

use crate::caps::HostEvent;

/// How long a stop waits for a killed child to be reaped.
const REAP_DEADLINE: Duration = Duration::from_secs(5);

/// Why a host child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("the host spawner thread is gone")]
    SpawnerGone,
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

struct SpawnJob {
    cmd: Command,
    reply: oneshot::Sender<Result<HostChild, ChildError>>,
}

/// Forks every host child from one long-lived thread.
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<SpawnJob>,
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner").finish_non_exhaustive()
    }
}

impl Spawner {
    /// Starts the spawner thread; it ends when the spawner is dropped.
    pub fn new() -> io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("host-spawner".into())
            .spawn(move || {
                for mut job in rx {
                    if job.reply.is_closed() {
                        continue;
                    }
                    // A reply nobody receives comes back here and is dropped,
                    // which kills the child; its waiter reaps it.
                    let _ = job.reply.send(HostChild::spawn(&mut job.cmd));
                }
            })?;
        Ok(Self { jobs })
    }

    /// Starts `cmd` on the spawner thread. Dropping the returned future at
    /// any point leaves no process behind.
    pub async fn spawn(&self, cmd: Command) -> Result<HostChild, ChildError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(SpawnJob { cmd, reply })
            .map_err(|_| ChildError::SpawnerGone)?;
        rx.await.map_err(|_| ChildError::SpawnerGone)?
    }
}

/// Who hears about a child's exit.
struct Report {
    sandbox_id: String,
    what: &'static str,
    events: mpsc::UnboundedSender<HostEvent>,
}

struct Shared {
    pid: u32,
    /// `None` once reaped: from then on the pid may belong to someone else.
    child: Mutex<Option<Child>>,
    report: Mutex<Option<Report>>,
    /// Set when waiting failed (the exit is then unknown).
    poll_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running host child. Dropping it kills the process (its waiter reaps it).
pub struct HostChild {
    shared: Arc<Shared>,
    exit: watch::Receiver<Option<i32>>,
}

impl std::fmt::Debug for HostChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostChild")
            .field("pid", &self.shared.pid)
            .field("exit", &*self.exit.borrow())
            .finish()
    }
}

/// The exit code a shell would report: the code, or 128+signal.
pub fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code()
        .or_else(|| st.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

impl HostChild {
    /// Forks `cmd` and starts its waiter. Runs on the spawner thread.
    fn spawn(cmd: &mut Command) -> Result<Self, ChildError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd.spawn().map_err(|source| ChildError::Spawn {
            program: program.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            pid: child.id(),
            child: Mutex::new(None),
            report: Mutex::new(None),
            poll_error: Mutex::new(None),
        });
        let (exit_tx, exit) = watch::channel(None);
        let waiter = shared.clone();
        let started = std::thread::Builder::new()
            .name("host-child-wait".into())
            .stack_size(64 << 10)
            .spawn(move || wait_and_reap(&waiter, &exit_tx));
        if let Err(source) = started {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ChildError::Spawn { program, source });
        }
        *lock(&shared.child) = Some(child);
        Ok(Self { shared, exit })
    }

    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// The exit code, once the child has exited and been reaped.
    pub fn exited(&self) -> Option<i32> {
        *self.exit.borrow()
    }

    /// Waits for the exit; None if it cannot be known (waiting failed).
    pub async fn wait(&self) -> Option<i32> {
        let mut exit = self.exit.clone();
        exit.wait_for(Option::is_some).await.ok().and_then(|v| *v)
    }

    /// Sends `sig` unless the child is already reaped.
    pub fn signal(&self, sig: Signal) {
        if lock(&self.shared.child).is_some() {
            let _ = kill(Pid::from_raw(self.shared.pid as i32), sig);
        }
    }

    /// SIGTERM, up to `grace` for it to exit, then SIGKILL. Returns the
    /// exit code, or None if it could not be seen to exit.
    pub async fn stop(&self, grace: Duration) -> Option<i32> {
        if let Some(code) = self.exited() {
            return Some(code);
        }
        if !grace.is_zero() {
            self.signal(Signal::SIGTERM);
            if let Ok(code) = tokio::time::timeout(grace, self.wait()).await {
                return code;
            }
        }
        self.signal(Signal::SIGKILL);
        tokio::time::timeout(REAP_DEADLINE, self.wait())
            .await
            .ok()
            .flatten()
    }

    /// Reports the exit (or a failure to wait) as a [`HostEvent`], once,
    /// even if the child has already exited.
    pub fn report_exit(
        &self,
        sandbox_id: &str,
        what: &'static str,
        events: mpsc::UnboundedSender<HostEvent>,
    ) {
        let report = Report {
            sandbox_id: sandbox_id.to_owned(),
            what,
            events,
        };
        // The waiter publishes before it takes the slot, so checking under
        // the slot's lock sends exactly once.
        let mut slot = lock(&self.shared.report);
        match (self.exited(), lock(&self.shared.poll_error).clone()) {
            (Some(status), _) => send_exit(report, status),
            (None, Some(message)) => send_poll_failed(report, message),
            (None, None) => *slot = Some(report),
        }
    }
}

impl Drop for HostChild {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

fn send_exit(r: Report, status: i32) {
    let _ = r.events.send(HostEvent::Exited {
        sandbox_id: r.sandbox_id,
        status,
    });
}

fn send_poll_failed(r: Report, message: String) {
    let message = format!("cannot wait for {}: {message}", r.what);
    let _ = r.events.send(HostEvent::PollFailed {
        sandbox_id: r.sandbox_id,
        message,
    });
}

/// The waiter thread: block until the child exits without reaping it, then
/// reap it under the signal lock and publish the exit.
fn wait_and_reap(shared: &Shared, exit_tx: &watch::Sender<Option<i32>>) {
    let pid = Pid::from_raw(shared.pid as i32);
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
    let waited = loop {
        match waitid(Id::Pid(pid), flags) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    if let Err(e) = waited {
        *lock(&shared.poll_error) = Some(e.to_string());
        if let Some(r) = lock(&shared.report).take() {
            send_poll_failed(r, e.to_string());
        }
        return;
    }
    // The child is a zombie now, so this does not block for long; the
    // spawner may still be filling the slot in, hence the retry.
    let status = loop {
        let mut slot = lock(&shared.child);
        if let Some(mut child) = slot.take() {
            break child.wait().map(exit_code).unwrap_or(-1);
        }
        drop(slot);
        std::thread::yield_now();
    };
    let _ = exit_tx.send(Some(status));
    if let Some(r) = lock(&shared.report).take() {
        send_exit(r, status);
    }
}
