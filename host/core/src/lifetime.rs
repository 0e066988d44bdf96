//! When the gateway ends a sandbox on its own: the one rule, with no clock
//! of its own (the caller passes `now`), so the gateway's enforcing task
//! only loads, asks and acts.
//!
//! - **ttl** deletes: the sandbox is gone at `created_at + ttl`, whatever
//!   its phase (Stopped included), so a forgotten sandbox frees its disk.
//! - **idle timeout** stops: a Ready sandbox whose last relay (exec, SSH)
//!   opened or closed `idle_timeout` ago, with none open now, is stopped;
//!   its files stay and `sandbox start` brings it back. Activity is kept
//!   in the store, so the deadlines survive a gateway restart.

use crate::phase::Phase;
use crate::sandbox::Lifetime;

/// The longest ttl or idle timeout accepted: 366 days.
pub const MAX_SECS: u64 = 366 * 24 * 3600;

/// What a lifetime says to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// The ttl passed: delete.
    Ttl,
    /// Idle for longer than the idle timeout: stop.
    Idle,
}

/// What to do with a sandbox in `phase`, created at `created_ms`, last
/// active at `last_active_ms` (a relay opened or closed, a start or the
/// create), with `open_relays` open, at `now_ms`. The ttl wins over idling.
pub fn due(
    lifetime: &Lifetime,
    phase: Phase,
    created_ms: i64,
    last_active_ms: i64,
    open_relays: usize,
    now_ms: i64,
) -> Option<Expiry> {
    let after = |from: i64, secs: u64| {
        from.saturating_add(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
    };
    let ttl_passed = lifetime.ttl_secs > 0 && now_ms >= after(created_ms, lifetime.ttl_secs);
    let idle = lifetime.idle_timeout_secs > 0
        && open_relays == 0
        && now_ms >= after(last_active_ms.max(created_ms), lifetime.idle_timeout_secs);
    match phase {
        Phase::Deleting => None,
        _ if ttl_passed => Some(Expiry::Ttl),
        Phase::Ready if idle => Some(Expiry::Idle),
        Phase::Ready | Phase::Provisioning | Phase::Error | Phase::Unknown | Phase::Stopped => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn lt(ttl: u64, idle: u64) -> Lifetime {
        Lifetime {
            ttl_secs: ttl,
            idle_timeout_secs: idle,
        }
    }

    #[test]
    fn a_ttl_deletes_in_every_phase_but_deleting_once_it_passes() {
        for phase in Phase::ALL {
            let want = (phase != Phase::Deleting).then_some(Expiry::Ttl);
            assert_eq!(due(&lt(60, 0), phase, 0, 0, 0, MIN), want, "{phase:?}");
            assert_eq!(due(&lt(60, 0), phase, 0, 0, 0, MIN - 1), None, "{phase:?}");
        }
    }

    #[test]
    fn an_idle_timeout_stops_only_a_ready_sandbox_with_no_relay_open() {
        let idle = lt(0, 60);
        assert_eq!(due(&idle, Phase::Ready, 0, 0, 0, MIN), Some(Expiry::Idle));
        assert_eq!(
            due(&idle, Phase::Ready, 0, 0, 1, 10 * MIN),
            None,
            "a relay is open"
        );
        assert_eq!(
            due(&idle, Phase::Ready, 0, 5 * MIN, 0, 5 * MIN + 59_999),
            None
        );
        assert_eq!(
            due(&idle, Phase::Ready, 0, 5 * MIN, 0, 6 * MIN),
            Some(Expiry::Idle)
        );
        for phase in [
            Phase::Stopped,
            Phase::Provisioning,
            Phase::Error,
            Phase::Unknown,
        ] {
            assert_eq!(due(&idle, phase, 0, 0, 0, 10 * MIN), None, "{phase:?}");
        }
    }

    #[test]
    fn no_lifetime_never_expires_and_the_ttl_wins_over_idling() {
        assert_eq!(
            due(&Lifetime::default(), Phase::Ready, 0, 0, 0, i64::MAX),
            None
        );
        assert_eq!(
            due(&lt(60, 60), Phase::Ready, 0, 0, 0, MIN),
            Some(Expiry::Ttl)
        );
        // Huge values saturate instead of wrapping into the past.
        assert_eq!(
            due(&lt(u64::MAX, u64::MAX), Phase::Ready, 0, 0, 0, i64::MAX - 1),
            None
        );
    }
}
