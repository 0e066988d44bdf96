//! Supervisor sessions: which sandbox has a live supervisor right now.
//!
//! The registry is the only source of `SupervisorConnected` and
//! `SupervisorDisconnected`. Registering supersedes (and closes) an older
//! session of the same sandbox; removal happens only while the session is
//! still the current one, so a late disconnect of a superseded session never
//! demotes a live one. The observer is called after the lock is released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use tokio::sync::{mpsc, watch};

/// Told about every transition, outside the registry's lock.
pub trait SessionObserver: Send + Sync {
    fn on_connected(&self, sandbox: SandboxId);
    fn on_disconnected(&self, sandbox: SandboxId);
}

/// What the rest of the gateway may do with a live session.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    pub session_id: u64,
    /// Messages to the supervisor (relay opens).
    pub control: mpsc::Sender<pb::GatewayMessage>,
    /// Set to true when a newer session replaces this one.
    pub superseded: watch::Sender<bool>,
    /// The SSH host key the supervisor reported in its hello (an OpenSSH
    /// public-key line; empty if it has none). Kept only here, in memory:
    /// each supervisor start generates a new one.
    pub ssh_host_key: String,
    /// The supervisor process's own id (fresh for each start), as its
    /// hello said: a new one means the sandbox's supervisor started afresh.
    pub instance_id: String,
    /// What egress opens and lookups of this session carry
    /// (`SessionAccepted.egress_token`): 32 random bytes, hex.
    pub egress_token: Arc<str>,
}

impl SessionHandle {
    /// Whether `presented` is this session's egress token (constant time).
    pub fn egress_token_is(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        presented.len() == self.egress_token.len()
            && bool::from(presented.as_bytes().ct_eq(self.egress_token.as_bytes()))
    }
}

#[derive(Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<SandboxId, SessionHandle>>,
    next_id: Mutex<u64>,
    /// Sessions replaced by a newer one of the same sandbox: a supervisor
    /// and an imposter holding the same secret would show up here.
    superseded: std::sync::atomic::AtomicU64,
    observer: OnceLock<Arc<dyn SessionObserver>>,
}

impl std::fmt::Debug for SessionRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRegistry").finish_non_exhaustive()
    }
}

impl SessionRegistry {
    /// Installs the observer; the compute runtime does this once at start.
    pub fn set_observer(&self, o: Arc<dyn SessionObserver>) {
        let _ = self.observer.set(o);
    }

    /// Registers a new session, superseding any older one. Returns the
    /// handle and a receiver that flips when this session is superseded.
    pub fn register(
        &self,
        sandbox: SandboxId,
        control: mpsc::Sender<pb::GatewayMessage>,
        ssh_host_key: String,
        instance_id: String,
    ) -> (SessionHandle, watch::Receiver<bool>) {
        let session_id = {
            let mut n = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let (superseded, rx) = watch::channel(false);
        let handle = SessionHandle {
            session_id,
            control,
            superseded,
            ssh_host_key,
            instance_id,
            egress_token: hex::encode(rand::random::<[u8; 32]>()).into(),
        };
        let old = {
            let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.insert(sandbox, handle.clone())
        };
        if let Some(old) = old {
            let total = self
                .superseded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            tracing::warn!(
                sandbox = %sandbox,
                old = old.session_id,
                new = session_id,
                superseded_total = total,
                "a new supervisor session replaced a live one"
            );
            let _ = old.superseded.send(true);
        }
        if let Some(o) = self.observer.get() {
            o.on_connected(sandbox);
        }
        (handle, rx)
    }

    /// Removes the session only if it is still the current one. Returns
    /// whether it was removed (and the observer told).
    pub fn remove_if_current(&self, sandbox: SandboxId, session_id: u64) -> bool {
        let removed = {
            let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&sandbox) {
                Some(h) if h.session_id == session_id => map.remove(&sandbox).is_some(),
                _ => false,
            }
        };
        if removed && let Some(o) = self.observer.get() {
            o.on_disconnected(sandbox);
        }
        removed
    }

    /// Drops a sandbox's session without telling the observer (the sandbox
    /// is being deleted) and closes it.
    pub fn forget(&self, sandbox: SandboxId) {
        let old = {
            let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(&sandbox)
        };
        if let Some(old) = old {
            let _ = old.superseded.send(true);
        }
    }

    pub fn get(&self, sandbox: SandboxId) -> Option<SessionHandle> {
        let map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&sandbox).cloned()
    }

    pub fn has_session(&self, sandbox: SandboxId) -> bool {
        self.get(sandbox).is_some()
    }

    /// Whether `sandbox` has a live session whose egress token is `token`.
    pub fn egress_token_is(&self, sandbox: SandboxId, token: &str) -> bool {
        self.get(sandbox).is_some_and(|h| h.egress_token_is(token))
    }

    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// How many sessions were replaced by a newer one (a counter).
    pub fn superseded(&self) -> u64 {
        self.superseded.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counts {
        connected: AtomicUsize,
        disconnected: AtomicUsize,
        reentered: AtomicUsize,
        registry: OnceLock<Arc<SessionRegistry>>,
    }

    impl SessionObserver for Counts {
        fn on_connected(&self, s: SandboxId) {
            self.connected.fetch_add(1, Ordering::SeqCst);
            // Proves the lock is released: re-entering would deadlock.
            if self.registry.get().unwrap().has_session(s) {
                self.reentered.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn on_disconnected(&self, _: SandboxId) {
            self.disconnected.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn setup() -> (Arc<SessionRegistry>, Arc<Counts>) {
        let reg = Arc::new(SessionRegistry::default());
        let counts = Arc::new(Counts::default());
        let _ = counts.registry.set(reg.clone());
        reg.set_observer(counts.clone());
        (reg, counts)
    }

    fn chan() -> mpsc::Sender<pb::GatewayMessage> {
        mpsc::channel(1).0
    }

    #[test]
    fn the_observer_fires_once_per_transition_outside_the_lock() {
        let (reg, c) = setup();
        let id = SandboxId::new();
        let (h, _) = reg.register(id, chan(), String::new(), String::new());
        assert!(reg.remove_if_current(id, h.session_id));
        assert!(
            !reg.remove_if_current(id, h.session_id),
            "second removal is a no-op"
        );
        assert_eq!(c.connected.load(Ordering::SeqCst), 1);
        assert_eq!(c.disconnected.load(Ordering::SeqCst), 1);
        assert_eq!(c.reentered.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_new_session_supersedes_the_old_and_the_old_cannot_remove_it() {
        let (reg, c) = setup();
        let id = SandboxId::new();
        let (old, old_rx) = reg.register(id, chan(), String::new(), String::new());
        let (new, _) = reg.register(id, chan(), String::new(), String::new());
        assert!(*old_rx.borrow(), "the old session is told to close");
        assert_eq!(reg.superseded(), 1, "a supersede is counted");
        assert!(!reg.remove_if_current(id, old.session_id));
        assert_eq!(reg.get(id).unwrap().session_id, new.session_id);
        assert_eq!(
            c.disconnected.load(Ordering::SeqCst),
            0,
            "a live sandbox is not demoted"
        );
        assert!(reg.remove_if_current(id, new.session_id));
        assert_eq!(c.disconnected.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn racing_registrations_leave_at_most_one_current_session_and_never_a_removed_one() {
        let (reg, c) = setup();
        let id = SandboxId::new();
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    let (h, _) = reg.register(id, chan(), String::new(), String::new());
                    (h.session_id, reg.remove_if_current(id, h.session_id))
                })
            })
            .collect();
        let results: Vec<(u64, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let removed = results.iter().filter(|(_, r)| *r).count();
        assert_eq!(c.connected.load(Ordering::SeqCst), 16);
        assert_eq!(c.disconnected.load(Ordering::SeqCst), removed);
        match reg.get(id) {
            // What is left is a session whose own removal lost to a newer one.
            Some(current) => assert!(
                results.contains(&(current.session_id, false)),
                "the current session {} was reported removed",
                current.session_id
            ),
            // Nothing left: the last registration removed itself.
            None => assert!(removed >= 1, "an empty registry means someone removed"),
        }
        assert!(reg.len() <= 1);
    }

    #[test]
    fn forgetting_a_sandbox_closes_its_session_without_a_disconnect() {
        let (reg, c) = setup();
        let id = SandboxId::new();
        let (_, rx) = reg.register(id, chan(), String::new(), String::new());
        reg.forget(id);
        assert!(*rx.borrow());
        assert!(!reg.has_session(id));
        assert_eq!(c.disconnected.load(Ordering::SeqCst), 0);
    }
}
