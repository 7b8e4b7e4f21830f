//! When to retry a provider call and how long to wait first: exponential backoff with full
//! jitter (base 100 ms), `Retry-After` honoured when it fits before the deadline, and a retry
//! budget per provider so retries cannot multiply an outage.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Retries on one target after its first attempt, at most.
pub(crate) const MAX_RETRIES_PER_TARGET: u32 = 2;
/// The first backoff's upper bound; each retry doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The longest a single backoff may be, whatever the attempt.
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Retries may be at most this share of the calls to a provider over the window...
const BUDGET_RATIO: f64 = 0.2;
/// ...but a quiet provider may always have this many in the window, so one failing call
/// after an idle spell is still retried.
const BUDGET_FLOOR: u64 = 10;
/// The window the budget counts over, in one-second buckets.
const WINDOW_SECS: usize = 60;

/// How long to wait before retry number `retry` (0 for the first retry): a uniform draw from
/// [0, min(cap, base × 2^retry)]: "full jitter", so clients that failed together do not
/// retry together.
pub(crate) fn backoff(retry: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << retry.min(16))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(fastrand::f64())
}

/// The wait before the next attempt, or `None` if it would not end before `deadline`.
/// A provider's `Retry-After` wins over our own backoff when it gave one.
pub(crate) fn wait_before_retry(
    retry: u32,
    retry_after: Option<Duration>,
    now: Instant,
    deadline: Instant,
) -> Option<Duration> {
    let wait = retry_after.unwrap_or_else(|| backoff(retry));
    (now + wait < deadline).then_some(wait)
}

/// Calls and retries to one provider over the last minute.
pub(crate) struct RetryBudget {
    window: Mutex<Window>,
}

struct Window {
    start: Instant,
    /// Per second: (second index since `start`, calls, retries).
    buckets: [(u64, u64, u64); WINDOW_SECS],
}

impl RetryBudget {
    pub(crate) fn new() -> RetryBudget {
        RetryBudget {
            window: Mutex::new(Window {
                start: Instant::now(),
                buckets: [(u64::MAX, 0, 0); WINDOW_SECS],
            }),
        }
    }

    /// Counts one attempt (first tries and retries alike).
    pub(crate) fn record_call(&self, now: Instant) {
        self.with_bucket(now, |b| b.1 += 1);
    }

    /// Takes one retry from the budget if it has room; counts it when it does.
    pub(crate) fn try_retry(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let second = now.saturating_duration_since(w.start).as_secs();
        let (calls, retries) = w
            .buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 + WINDOW_SECS as u64 > second)
            .fold((0, 0), |(c, r), b| (c + b.1, r + b.2));
        let allowed = ((calls as f64 * BUDGET_RATIO) as u64).max(BUDGET_FLOOR);
        if retries >= allowed {
            return false;
        }
        let b = bucket(&mut w, second);
        b.2 += 1;
        true
    }

    fn with_bucket(&self, now: Instant, f: impl FnOnce(&mut (u64, u64, u64))) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let second = now.saturating_duration_since(w.start).as_secs();
        f(bucket(&mut w, second));
    }
}

/// The bucket for `second`, emptied first if it still holds an older second.
fn bucket(w: &mut Window, second: u64) -> &mut (u64, u64, u64) {
    let b = &mut w.buckets[(second % WINDOW_SECS as u64) as usize];
    if b.0 != second {
        *b = (second, 0, 0);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_below_a_doubling_ceiling() {
        for retry in 0..4 {
            let ceiling = BACKOFF_BASE * (1 << retry);
            let draws: Vec<Duration> = (0..200).map(|_| backoff(retry)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Full jitter spreads the draws: some are well under half the ceiling.
            assert!(draws.iter().any(|d| *d < ceiling / 2), "retry {retry}");
        }
        assert!(backoff(30) <= BACKOFF_CAP);
    }

    #[test]
    fn retry_after_is_honoured_only_when_it_fits() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(5);
        let two = Some(Duration::from_secs(2));
        assert_eq!(wait_before_retry(0, two, now, deadline), two);
        assert_eq!(
            wait_before_retry(0, Some(Duration::from_secs(9)), now, deadline),
            None
        );
        assert!(wait_before_retry(0, None, now, deadline).unwrap() <= BACKOFF_BASE);
        assert_eq!(wait_before_retry(0, None, now, now), None);
    }

    #[test]
    fn retries_stay_within_a_fifth_of_calls_above_the_floor() {
        let budget = RetryBudget::new();
        let now = Instant::now();
        for _ in 0..100 {
            budget.record_call(now);
        }
        let granted = (0..100).filter(|_| budget.try_retry(now)).count();
        assert_eq!(granted, 20);
        // A quiet provider still gets the floor.
        let quiet = RetryBudget::new();
        quiet.record_call(now);
        let granted = (0..100).filter(|_| quiet.try_retry(now)).count();
        assert_eq!(granted as u64, BUDGET_FLOOR);
    }

    #[test]
    fn the_window_forgets_after_a_minute() {
        let budget = RetryBudget::new();
        let t0 = Instant::now();
        while budget.try_retry(t0) {}
        assert!(!budget.try_retry(t0 + Duration::from_secs(30)));
        assert!(budget.try_retry(t0 + Duration::from_secs(61)));
    }
}
