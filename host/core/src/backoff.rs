//! The one retry delay: exponential growth with full jitter.
//!
//! Each failure draws a delay uniformly from `0..=ceiling`, then doubles the
//! ceiling up to `max`; a success resets it to `min`. Full jitter (rather
//! than a fixed delay) keeps a fleet of clients that failed together, say
//! every supervisor when the gateway restarts, from retrying in step.
//!
//! Pure: the caller supplies the randomness (a uniform `u64`, e.g.
//! `rand::random()`) and does the sleeping, so tests fix both.

use std::time::Duration;

/// The smallest ceiling; a zero `min` is raised to it so the ceiling can grow.
const FLOOR: Duration = Duration::from_micros(1);

/// Retry delays for one loop. Start at [`Backoff::new`], call
/// [`Backoff::next_delay`] after each failure and [`Backoff::reset`] after a
/// success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// Delays whose ceiling starts at `min` and never exceeds `max` (a `max`
    /// below `min` is raised to `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(FLOOR);
        Self {
            min,
            max: max.max(min),
            ceiling: min,
        }
    }

    /// The bound the next delay is drawn under.
    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }

    /// The delay before the next attempt, `random / u64::MAX` of the current
    /// ceiling; then the ceiling doubles (up to `max`). Ceilings beyond
    /// `u64::MAX` nanoseconds (584 years) are treated as that.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let ceiling = u64::try_from(self.ceiling.as_nanos()).unwrap_or(u64::MAX);
        // Exact integer scaling: u64 * u64 fits in u128, and the quotient is
        // at most `ceiling`.
        let nanos = u128::from(ceiling) * u128::from(random) / u128::from(u64::MAX);
        let delay = Duration::from_nanos(u64::try_from(nanos).unwrap_or(ceiling));
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        delay
    }

    /// After a success: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.ceiling = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_ceiling_doubles_from_min_up_to_max() {
        let mut b = Backoff::new(S, 5 * S);
        let ceilings: Vec<_> = (0..5)
            .map(|_| {
                let c = b.ceiling();
                b.next_delay(0);
                c
            })
            .collect();
        assert_eq!(ceilings, [S, 2 * S, 4 * S, 5 * S, 5 * S]);
    }

    #[test]
    fn the_delay_spans_zero_to_the_ceiling() {
        let mut b = Backoff::new(S, 8 * S);
        assert_eq!(b.clone().next_delay(0), Duration::ZERO);
        assert_eq!(b.clone().next_delay(u64::MAX), S);
        assert_eq!(b.next_delay(1 << 63), S / 2);
    }

    #[test]
    fn reset_starts_again_from_min() {
        let mut b = Backoff::new(S, 30 * S);
        for _ in 0..10 {
            b.next_delay(1);
        }
        assert_eq!(b.ceiling(), 30 * S);
        b.reset();
        assert_eq!(b.ceiling(), S);
        assert_eq!(b, Backoff::new(S, 30 * S));
    }

    #[test]
    fn a_zero_min_still_grows_and_a_small_max_is_raised() {
        let mut b = Backoff::new(Duration::ZERO, S);
        b.next_delay(0);
        assert!(b.ceiling() > Duration::ZERO);
        assert_eq!(Backoff::new(2 * S, S).ceiling(), 2 * S);
        let mut capped = Backoff::new(2 * S, S);
        capped.next_delay(0);
        assert_eq!(capped.ceiling(), 2 * S);
    }

    #[test]
    fn huge_ceilings_do_not_overflow() {
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        let d = b.next_delay(u64::MAX);
        assert_eq!(d, Duration::from_nanos(u64::MAX));
        assert_eq!(b.ceiling(), Duration::MAX);
    }

    fn arb_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (0u64..10_000_000_000).prop_map(Duration::from_nanos),
            any::<u64>().prop_map(Duration::from_nanos),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    proptest! {
        /// Every delay is at most the ceiling it was drawn under, which is
        /// between min and max; failures never shrink the ceiling.
        #[test]
        fn delays_stay_under_a_growing_bounded_ceiling(
            min in arb_duration(),
            max in arb_duration(),
            randoms in prop::collection::vec(any::<u64>(), 0..80),
        ) {
            let mut b = Backoff::new(min, max);
            let (lo, hi) = (b.min, b.max);
            prop_assert!(lo >= min && lo <= hi);
            for r in randoms {
                let before = b.ceiling();
                prop_assert!(lo <= before && before <= hi);
                let d = b.next_delay(r);
                prop_assert!(d <= before);
                prop_assert!(b.ceiling() >= before);
                prop_assert!(b.ceiling() == hi || b.ceiling() == before.saturating_mul(2));
            }
            b.reset();
            prop_assert_eq!(b.ceiling(), lo);
        }

        /// More randomness never means a shorter wait (for the same ceiling).
        #[test]
        fn the_delay_grows_with_the_random_draw(min in arb_duration(), a: u64, c: u64) {
            let b = Backoff::new(min, min);
            let (lo, hi) = (a.min(c), a.max(c));
            prop_assert!(b.clone().next_delay(lo) <= b.clone().next_delay(hi));
        }
    }
}
