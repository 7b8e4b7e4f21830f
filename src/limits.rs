//! Exact per-key limits, kept in this process: requests and tokens per sliding minute, and
//! requests in flight. syncgate is one process, so every admission for a key passes through one
//! lock and a limit of 100 a minute lets exactly 100 through, with no shared store to ask.
//!
//! Semantics, for each key id and the [`Limits`] passed with each call (`None` is unlimited):
//!
//! - **Requests per minute** (`rpm`): at most `rpm` admissions in any sliding 60 s window. The
//!   key keeps a log of its admission instants, never more than `rpm` of them; an admission at
//!   `t` counts until `t + 60 s`, when it leaves the window. A fixed window would admit twice the
//!   limit across a boundary; the log does not.
//! - **Tokens per minute** (`tpm`): the token charges of the admissions in the window sum to at
//!   most `tpm`. A request is charged its estimate at admission, and [`Permit::reconcile`]
//!   replaces the charge with what the provider reported, so later admissions see the truth. A
//!   request whose estimate alone exceeds `tpm` can never fit and is refused with the full window
//!   as its wait.
//! - **In flight** (`max_in_flight`): at most that many [`Permit`]s alive at once; dropping a
//!   permit frees its slot, exactly once, on every path.
//! - The checks and the charge happen together under the key's lock, so concurrent callers can
//!   never overshoot a limit. Each key has its own lock; the map of keys is locked only to find it.
//! - A refusal names the limit that refused and how long to wait: for requests and tokens the
//!   time until enough of the window expires for this request to fit, for in flight one second.
//!   When several limits refuse, the longest wait is reported, so a retry after it is not refused
//!   again by a limit already known to be full.
//! - Headers follow OpenAI's `x-ratelimit-*` names, for the limits the key has: the limit, what
//!   remains in the window (never negative), and the time until the window is empty again.
//! - Time is passed in, never read here. A key's time never runs backwards: a caller whose
//!   instant is older than the key's latest admission is treated as arriving at that admission.
//! - Memory per key is bounded: the log holds only admissions inside the window (at most `rpm`
//!   when the key has a request limit) and is pruned on every admission, so a key idle for a
//!   minute holds no entries after its next call. [`Limiter::forget`] drops a key entirely.
//!
//! On PostgreSQL several instances share one database, so the same semantics are kept there
//! instead (`shared.rs`, one round trip per admission): [`Limiter::admit_key`] picks.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

mod shared;
pub(crate) use shared::Shared;

/// The span the request and token limits count over.
const WINDOW: Duration = Duration::from_secs(60);

/// How long a request refused for want of an in-flight slot is told to wait: slots free up as
/// soon as any request of the key finishes, which cannot be predicted.
const IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);

/// A key's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Requests admitted in any sliding 60 s window.
    pub(crate) rpm: Option<u32>,
    /// Tokens charged in any sliding 60 s window.
    pub(crate) tpm: Option<u64>,
    /// Requests admitted and not yet finished (permits alive).
    pub(crate) max_in_flight: Option<u32>,
}

impl Limits {
    /// Whether admissions must be logged: only the windowed limits need the log.
    fn is_windowed(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

/// The limit that refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// The key's requests per minute were used up.
    Requests,
    /// The key's tokens per minute could not hold this request's estimate.
    Tokens,
    /// The key already had its maximum number of requests in flight.
    InFlight,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Requests => "requests per minute",
            Limit::Tokens => "tokens per minute",
            Limit::InFlight => "requests in flight",
        })
    }
}

/// Why a keyed request was not admitted, whichever limiter decided.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Over one of the key's limits.
    Limit(Refusal),
    /// The shared limiter found the key revoked (by another instance, perhaps a moment ago).
    Revoked,
    /// The shared limiter found the key expired.
    Expired,
    /// The shared limiter does not know the key.
    Unknown,
    /// The shared limits could not be checked and `[limits] on_store_error = "closed"`.
    StoreUnavailable,
}

/// Admits requests against per-key limits; shared by every worker.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    /// Each key's state behind its own lock, so keys do not wait on each other's window work.
    keys: Mutex<HashMap<i64, Arc<Mutex<KeyState>>>>,
    /// The limits kept in the database instead, on PostgreSQL.
    shared: Option<Shared>,
}

impl Limiter {
    /// A limiter that has admitted nothing yet, keeping its counts in this process.
    pub(crate) fn new() -> Limiter {
        Limiter::default()
    }

    /// A limiter whose counts live in the shared database.
    pub(crate) fn shared(shared: Shared) -> Limiter {
        Limiter {
            keys: Mutex::default(),
            shared: Some(shared),
        }
    }

    /// Whether the limiter can take a burst: in-process limits always can; shared ones once
    /// all their connections are open.
    pub(crate) fn is_connected(&self) -> bool {
        self.shared.as_ref().is_none_or(Shared::is_connected)
    }

    /// Admits one keyed request: in the database when the limits are shared, else here.
    pub(crate) fn admit_key(
        &self,
        key: i64,
        limits: &Limits,
        tokens: u64,
        now: Instant,
    ) -> Result<Permit, Refused> {
        match &self.shared {
            Some(shared) => shared.admit(key, tokens),
            None => self.admit(key, limits, tokens, now).map_err(Refused::Limit),
        }
    }

    /// Admits one request for `key` estimated at `tokens`, or says which limit refused it and
    /// how long to wait. The checks and the charge are one step under the key's lock.
    pub(crate) fn admit(
        &self,
        key: i64,
        limits: &Limits,
        tokens: u64,
        now: Instant,
    ) -> Result<Permit, Refusal> {
        let state = self.state_of(key);
        let (seq, headers) = {
            let mut key_state = lock(&state);
            let now = key_state.observe(now);
            if let Some(refusal) = key_state.refusal(limits, tokens, now) {
                return Err(refusal);
            }
            let seq = key_state.charge(limits, tokens, now);
            (seq, key_state.headers(limits, now))
        };
        Ok(Permit {
            slot: Slot::Local { state, seq },
            headers,
            released: AtomicBool::new(false),
        })
    }

    /// Drops the state of a key (revoked). Permits still alive for it free their slots in the
    /// dropped state and leave any later state of the key alone.
    pub(crate) fn forget(&self, key: i64) {
        lock(&self.keys).remove(&key);
    }

    /// The state of `key`, created empty on first use.
    fn state_of(&self, key: i64) -> Arc<Mutex<KeyState>> {
        Arc::clone(lock(&self.keys).entry(key).or_default())
    }
}

/// Held while a request is in flight: dropping it frees the in-flight slot.
#[derive(Debug)]
pub(crate) struct Permit {
    slot: Slot,
    headers: RateHeaders,
    /// Set once the in-flight slot is given back, so it is given back exactly once.
    released: AtomicBool,
}

impl Permit {
    /// Gives the in-flight slot back now (the answer is complete); dropping the permit later
    /// does nothing more.
    pub(crate) fn release(&self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            match &self.slot {
                Slot::Local { state, .. } => {
                    let mut state = lock(state);
                    state.in_flight = state.in_flight.saturating_sub(1);
                }
                Slot::Shared(slot) => slot.settle(),
                Slot::Unchecked => {}
            }
        }
    }

    /// Replaces the admission estimate with the provider's reported tokens (may be more or
    /// less). Nothing changes once the admission has left the window: it no longer counts.
    pub(crate) fn reconcile(&self, actual_tokens: u64) {
        match &self.slot {
            Slot::Local {
                state,
                seq: Some(seq),
            } => lock(state).recharge(*seq, actual_tokens),
            Slot::Shared(slot) => slot.reconcile(actual_tokens),
            Slot::Local { seq: None, .. } | Slot::Unchecked => {}
        }
    }

    /// The `x-ratelimit-*` headers as of this admission, for the limits the key has.
    pub(crate) fn headers(&self) -> Vec<(&'static str, String)> {
        self.headers.render()
    }
}

/// Where a permit's slot is held.
#[derive(Debug)]
enum Slot {
    /// In this process's limiter.
    Local {
        state: Arc<Mutex<KeyState>>,
        /// This admission's entry in the key's log; `None` when the key had no windowed limit.
        seq: Option<u64>,
    },
    /// In the shared database.
    Shared(shared::Slot),
    /// Nowhere: admitted without limits to check (a shared key with no limits, or admitted
    /// open while the shared limits could not be checked).
    Unchecked,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.release();
    }
}

/// Why a request was not admitted and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The limit that refused (the one with the longest wait when several did).
    pub(crate) limit: Limit,
    /// The exact time until the request would fit, as far as this key's window knows.
    pub(crate) retry_after: Duration,
    headers: RateHeaders,
}

impl Refusal {
    /// `retry_after` in whole seconds for a `Retry-After` header: rounded up, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        let has_fraction = self.retry_after.subsec_nanos() > 0;
        (self.retry_after.as_secs() + u64::from(has_fraction)).max(1)
    }

    /// The `x-ratelimit-*` headers as of this refusal, for the limits the key has.
    pub(crate) fn headers(&self) -> Vec<(&'static str, String)> {
        self.headers.render()
    }
}

/// One key's admissions and requests in flight.
#[derive(Debug, Default)]
struct KeyState {
    /// Admissions inside the window, oldest first (instants and `seq` both ascend).
    log: VecDeque<Admission>,
    /// The sum of the token charges in `log`.
    charged: u64,
    /// Permits alive, counted whatever the limits so that a limit set later starts out right.
    in_flight: u32,
    /// The `seq` of the next admission.
    next_seq: u64,
}

/// One admitted request in a key's log.
#[derive(Debug)]
struct Admission {
    /// Identifies the admission for `reconcile`.
    seq: u64,
    /// When it was admitted; it leaves the window at `at + WINDOW`.
    at: Instant,
    /// Tokens charged: the estimate, then the reported count once reconciled.
    tokens: u64,
}

impl KeyState {
    /// Takes `now` as the key's current time, never earlier than its latest admission, and
    /// drops the admissions that have left the window.
    fn observe(&mut self, now: Instant) -> Instant {
        let now = self.log.back().map_or(now, |latest| latest.at.max(now));
        while let Some(oldest) = self.log.front() {
            if !has_expired(oldest.at, now) {
                break;
            }
            self.charged = self.charged.saturating_sub(oldest.tokens);
            self.log.pop_front();
        }
        if self.log.is_empty() {
            // An idle key should hold no memory for a burst it had minutes ago.
            self.log.shrink_to_fit();
        }
        now
    }

    /// The refusal for a request of `tokens` now, if any limit is full.
    fn refusal(&self, limits: &Limits, tokens: u64, now: Instant) -> Option<Refusal> {
        let in_flight_full = limits
            .max_in_flight
            .is_some_and(|max| self.in_flight >= max);
        let waits = [
            limits
                .rpm
                .and_then(|rpm| self.requests_wait(rpm, now))
                .map(|wait| (Limit::Requests, wait)),
            limits
                .tpm
                .and_then(|tpm| self.tokens_wait(tpm, tokens, now))
                .map(|wait| (Limit::Tokens, wait)),
            in_flight_full.then_some((Limit::InFlight, IN_FLIGHT_RETRY)),
        ];
        // The longest wait wins; on a tie, the limit listed first.
        let (limit, retry_after) =
            waits
                .into_iter()
                .flatten()
                .reduce(|longest, next| if next.1 > longest.1 { next } else { longest })?;
        Some(Refusal {
            limit,
            retry_after,
            headers: self.headers(limits, now),
        })
    }

    /// How long until one more request fits under `rpm`, or `None` if it fits now.
    fn requests_wait(&self, rpm: u32, now: Instant) -> Option<Duration> {
        let rpm = rpm as usize;
        let used = self.log.len();
        if used < rpm {
            return None;
        }
        if rpm == 0 {
            return Some(WINDOW);
        }
        // One more fits once only rpm - 1 admissions remain: when log[used - rpm] expires.
        Some(time_to_expiry(self.log[used - rpm].at, now))
    }

    /// How long until `tokens` more fit under `tpm`, or `None` if they fit now.
    fn tokens_wait(&self, tpm: u64, tokens: u64, now: Instant) -> Option<Duration> {
        // The most that may already be charged for `tokens` more to fit.
        let Some(most_charged) = tpm.checked_sub(tokens) else {
            // Larger than the whole limit: it will never fit, and the window is the honest wait.
            return Some(WINDOW);
        };
        if self.charged <= most_charged {
            return None;
        }
        let mut still_charged = self.charged;
        let fits_after = self.log.iter().find(|admission| {
            still_charged = still_charged.saturating_sub(admission.tokens);
            still_charged <= most_charged
        });
        // `charged` is the sum over the log, so some admission always frees enough.
        Some(fits_after.map_or(WINDOW, |admission| time_to_expiry(admission.at, now)))
    }

    /// Records an admission at `now` and returns its `seq` if the log was needed.
    fn charge(&mut self, limits: &Limits, tokens: u64, now: Instant) -> Option<u64> {
        self.in_flight += 1;
        if !limits.is_windowed() {
            return None;
        }
        let tokens = if limits.tpm.is_some() { tokens } else { 0 };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.charged = self.charged.saturating_add(tokens);
        self.log.push_back(Admission {
            seq,
            at: now,
            tokens,
        });
        Some(seq)
    }

    /// Replaces the token charge of admission `seq`, if it is still in the window.
    fn recharge(&mut self, seq: u64, tokens: u64) {
        if let Ok(index) = self
            .log
            .binary_search_by_key(&seq, |admission| admission.seq)
        {
            let admission = &mut self.log[index];
            self.charged = self
                .charged
                .saturating_sub(admission.tokens)
                .saturating_add(tokens);
            admission.tokens = tokens;
        }
    }

    /// The header values for the key's windowed limits as the log stands at `now`.
    fn headers(&self, limits: &Limits, now: Instant) -> RateHeaders {
        let requests = limits.rpm.map(|rpm| WindowUse {
            limit: u64::from(rpm),
            remaining: u64::from(rpm).saturating_sub(self.log.len() as u64),
            reset: self
                .log
                .back()
                .map_or(Duration::ZERO, |latest| time_to_expiry(latest.at, now)),
        });
        let tokens = limits.tpm.map(|tpm| WindowUse {
            limit: tpm,
            remaining: tpm.saturating_sub(self.charged),
            reset: self
                .log
                .iter()
                .rev()
                .find(|admission| admission.tokens > 0)
                .map_or(Duration::ZERO, |latest| time_to_expiry(latest.at, now)),
        });
        RateHeaders { requests, tokens }
    }
}

/// A snapshot of the windowed limits, rendered as OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RateHeaders {
    requests: Option<WindowUse>,
    tokens: Option<WindowUse>,
}

/// How much of one windowed limit is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WindowUse {
    limit: u64,
    remaining: u64,
    /// Time until every charge in the window has expired.
    reset: Duration,
}

impl RateHeaders {
    /// The header names and values, requests first, for the limits in the snapshot.
    fn render(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(requests) = &self.requests {
            headers.extend([
                ("x-ratelimit-limit-requests", requests.limit.to_string()),
                (
                    "x-ratelimit-remaining-requests",
                    requests.remaining.to_string(),
                ),
                ("x-ratelimit-reset-requests", format_reset(requests.reset)),
            ]);
        }
        if let Some(tokens) = &self.tokens {
            headers.extend([
                ("x-ratelimit-limit-tokens", tokens.limit.to_string()),
                ("x-ratelimit-remaining-tokens", tokens.remaining.to_string()),
                ("x-ratelimit-reset-tokens", format_reset(tokens.reset)),
            ]);
        }
        headers
    }
}

/// Whether an admission at `at` has left the window by `now`.
fn has_expired(at: Instant, now: Instant) -> bool {
    at + WINDOW <= now
}

/// The time from `now` until an admission at `at` leaves the window.
fn time_to_expiry(at: Instant, now: Instant) -> Duration {
    (at + WINDOW).saturating_duration_since(now)
}

/// A duration as OpenAI writes resets (`"0s"`, `"250ms"`, `"59.3s"`, `"1m0s"`, `"6m0s"`),
/// rounded up to the millisecond so a wait never reads shorter than it is.
fn format_reset(wait: Duration) -> String {
    let millis = wait.as_nanos().div_ceil(1_000_000);
    if millis == 0 {
        return "0s".to_string();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let minutes = millis / 60_000;
    let seconds = format_seconds(millis % 60_000);
    if minutes == 0 {
        format!("{seconds}s")
    } else {
        format!("{minutes}m{seconds}s")
    }
}

/// Milliseconds as seconds with only the decimals they need (`59300` → `"59.3"`).
fn format_seconds(millis: u128) -> String {
    let (whole, fraction) = (millis / 1000, millis % 1000);
    if fraction == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{fraction:03}")
            .trim_end_matches('0')
            .to_string()
    }
}

/// Locks `mutex` even if a thread panicked while holding it: every update here leaves the state
/// usable, and a dropped permit must free its slot whatever happened elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::thread;

    const KEY: i64 = 7;
    const THREADS: usize = 60;

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn rpm(limit: u32) -> Limits {
        Limits {
            rpm: Some(limit),
            ..Limits::default()
        }
    }

    fn tpm(limit: u64) -> Limits {
        Limits {
            tpm: Some(limit),
            ..Limits::default()
        }
    }

    /// Calls `admit` from `THREADS` threads released together, all at instant `now`.
    fn admit_all_at_once(
        limiter: &Limiter,
        limits: &Limits,
        tokens: u64,
        now: Instant,
    ) -> Vec<Result<Permit, Refusal>> {
        let barrier = Barrier::new(THREADS);
        thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        limiter.admit(KEY, limits, tokens, now)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("admitting thread panicked"))
                .collect()
        })
    }

    fn admitted(results: &[Result<Permit, Refusal>]) -> usize {
        results.iter().filter(|result| result.is_ok()).count()
    }

    fn refused_by(results: &[Result<Permit, Refusal>]) -> Vec<Limit> {
        results
            .iter()
            .filter_map(|result| result.as_ref().err().map(|refusal| refusal.limit))
            .collect()
    }

    fn refusal(result: Result<Permit, Refusal>) -> Refusal {
        result.expect_err("expected a refusal")
    }

    fn logged(limiter: &Limiter, key: i64) -> usize {
        lock(&limiter.state_of(key)).log.len()
    }

    #[test]
    fn concurrent_admissions_never_exceed_rpm() {
        let limiter = Limiter::new();
        let results = admit_all_at_once(&limiter, &rpm(20), 1, Instant::now());
        assert_eq!(admitted(&results), 20);
        assert_eq!(refused_by(&results), vec![Limit::Requests; THREADS - 20]);
    }

    #[test]
    fn concurrent_admissions_never_exceed_tpm() {
        let limiter = Limiter::new();
        let results = admit_all_at_once(&limiter, &tpm(1000), 100, Instant::now());
        assert_eq!(admitted(&results), 10);
        assert_eq!(refused_by(&results), vec![Limit::Tokens; THREADS - 10]);
    }

    #[test]
    fn concurrent_admissions_never_exceed_max_in_flight_and_dropping_frees_slots() {
        let limiter = Limiter::new();
        let limits = Limits {
            max_in_flight: Some(5),
            ..Limits::default()
        };
        let now = Instant::now();
        let held = admit_all_at_once(&limiter, &limits, 1, now);
        assert_eq!(admitted(&held), 5);
        assert_eq!(refused_by(&held), vec![Limit::InFlight; THREADS - 5]);
        let retry = held.iter().find_map(|result| result.as_ref().err());
        assert_eq!(
            retry.map(|refusal| refusal.retry_after),
            Some(IN_FLIGHT_RETRY)
        );

        drop(held);
        let again = admit_all_at_once(&limiter, &limits, 1, now);
        assert_eq!(admitted(&again), 5);
    }

    #[test]
    fn rpm_window_slides_rather_than_resetting() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        for _ in 0..20 {
            limiter.admit(KEY, &rpm(20), 0, t0).expect("within rpm");
        }
        let refused = refusal(limiter.admit(KEY, &rpm(20), 0, t0 + secs(59)));
        assert_eq!(refused.limit, Limit::Requests);
        assert_eq!(refused.retry_after, secs(1));
        assert_eq!(refused.retry_after_secs(), 1);

        limiter
            .admit(KEY, &rpm(20), 0, t0 + WINDOW)
            .expect("the first minute's admissions have left the window");
    }

    #[test]
    fn rpm_refuses_across_a_fixed_window_boundary() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        for _ in 0..20 {
            limiter
                .admit(KEY, &rpm(20), 0, t0 + secs(50))
                .expect("within rpm");
        }
        // A fixed minute starting at t0 + 60 s would admit here; the sliding window does not.
        let refused = refusal(limiter.admit(KEY, &rpm(20), 0, t0 + ms(70500)));
        assert_eq!(refused.retry_after, ms(39500));
        assert_eq!(refused.retry_after_secs(), 40);
    }

    #[test]
    fn rpm_retry_after_waits_for_the_oldest_admission_that_must_expire() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        for second in 0..3 {
            let at = t0 + secs(second * 10);
            limiter.admit(KEY, &rpm(3), 0, at).expect("within rpm");
        }
        let refused = refusal(limiter.admit(KEY, &rpm(3), 0, t0 + secs(25)));
        assert_eq!(refused.retry_after, secs(35));
        // Lowering the limit to 2 means two of the three must expire: the second at t0 + 70 s.
        let refused = refusal(limiter.admit(KEY, &rpm(2), 0, t0 + secs(25)));
        assert_eq!(refused.retry_after, secs(45));
    }

    #[test]
    fn reconciling_downward_frees_tokens_for_the_next_admission() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        let first = limiter.admit(KEY, &tpm(1000), 500, t0).expect("within tpm");
        let _second = limiter
            .admit(KEY, &tpm(1000), 500, t0 + secs(1))
            .expect("within tpm");
        let refused = refusal(limiter.admit(KEY, &tpm(1000), 400, t0 + secs(2)));
        assert_eq!(refused.limit, Limit::Tokens);
        assert_eq!(refused.retry_after, secs(58));

        first.reconcile(100);
        limiter
            .admit(KEY, &tpm(1000), 400, t0 + secs(2))
            .expect("the 400 tokens freed by reconcile");
        refusal(limiter.admit(KEY, &tpm(1000), 1, t0 + secs(2)));
    }

    #[test]
    fn reconciling_upward_blocks_later_admissions() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        let _first = limiter.admit(KEY, &tpm(1000), 100, t0).expect("within tpm");
        let second = limiter
            .admit(KEY, &tpm(1000), 500, t0 + secs(1))
            .expect("within tpm");
        second.reconcile(900);

        // With the estimate of 500, 200 more would fit (800). Reconciled to 900, they fit only
        // once both earlier charges have left the window, the 900 at t0 + 1 s last.
        let refused = refusal(limiter.admit(KEY, &tpm(1000), 200, t0 + secs(10)));
        assert_eq!(refused.retry_after, secs(51));
        refusal(limiter.admit(KEY, &tpm(1000), 200, t0 + secs(60)));
        limiter
            .admit(KEY, &tpm(1000), 200, t0 + secs(61))
            .expect("the reconciled charge has left the window");
    }

    #[test]
    fn an_estimate_larger_than_tpm_is_refused_for_the_full_window() {
        let limiter = Limiter::new();
        let refused = refusal(limiter.admit(KEY, &tpm(1000), 1001, Instant::now()));
        assert_eq!(refused.limit, Limit::Tokens);
        assert_eq!(refused.retry_after, WINDOW);
        assert_eq!(refused.retry_after_secs(), 60);
    }

    #[test]
    fn the_longest_wait_names_the_refusing_limit() {
        let limiter = Limiter::new();
        let limits = Limits {
            rpm: Some(2),
            tpm: Some(100),
            max_in_flight: Some(2),
        };
        let t0 = Instant::now();
        let _first = limiter.admit(KEY, &limits, 10, t0).expect("within limits");
        let _second = limiter
            .admit(KEY, &limits, 90, t0 + secs(20))
            .expect("within limits");
        // All three refuse: requests until t0 + 60 s, in flight for 1 s, and the 50 tokens need
        // both charges gone, until t0 + 80 s.
        let refused = refusal(limiter.admit(KEY, &limits, 50, t0 + secs(30)));
        assert_eq!(refused.limit, Limit::Tokens);
        assert_eq!(refused.retry_after, secs(50));
    }

    #[test]
    fn headers_cover_every_windowed_limit_of_the_key() {
        let limiter = Limiter::new();
        let limits = Limits {
            rpm: Some(20),
            tpm: Some(1000),
            max_in_flight: Some(5),
        };
        let t0 = Instant::now();
        let _first = limiter.admit(KEY, &limits, 300, t0).expect("within limits");
        let second = limiter
            .admit(KEY, &limits, 0, t0 + ms(700))
            .expect("within limits");
        assert_eq!(
            second.headers(),
            vec![
                ("x-ratelimit-limit-requests", "20".to_string()),
                ("x-ratelimit-remaining-requests", "18".to_string()),
                ("x-ratelimit-reset-requests", "1m0s".to_string()),
                ("x-ratelimit-limit-tokens", "1000".to_string()),
                ("x-ratelimit-remaining-tokens", "700".to_string()),
                ("x-ratelimit-reset-tokens", "59.3s".to_string()),
            ]
        );
    }

    #[test]
    fn headers_cover_only_the_limits_the_key_has() {
        let limiter = Limiter::new();
        let permit = limiter
            .admit(KEY, &tpm(500), 200, Instant::now())
            .expect("within tpm");
        assert_eq!(
            permit.headers(),
            vec![
                ("x-ratelimit-limit-tokens", "500".to_string()),
                ("x-ratelimit-remaining-tokens", "300".to_string()),
                ("x-ratelimit-reset-tokens", "1m0s".to_string()),
            ]
        );
    }

    #[test]
    fn a_refusal_reports_nothing_remaining() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        limiter.admit(KEY, &rpm(1), 0, t0).expect("within rpm");
        let refused = refusal(limiter.admit(KEY, &rpm(1), 0, t0 + secs(15)));
        assert_eq!(
            refused.headers(),
            vec![
                ("x-ratelimit-limit-requests", "1".to_string()),
                ("x-ratelimit-remaining-requests", "0".to_string()),
                ("x-ratelimit-reset-requests", "45s".to_string()),
            ]
        );
    }

    #[test]
    fn a_key_without_limits_always_admits_and_sends_no_headers() {
        let limiter = Limiter::new();
        let now = Instant::now();
        let permits: Vec<Permit> = (0..1000)
            .map(|_| {
                limiter
                    .admit(KEY, &Limits::default(), u64::MAX, now)
                    .expect("unlimited")
            })
            .collect();
        assert!(permits.iter().all(|permit| permit.headers().is_empty()));
        assert_eq!(logged(&limiter, KEY), 0);
    }

    #[test]
    fn an_idle_key_holds_no_entries_after_its_next_call() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        for _ in 0..50 {
            limiter
                .admit(KEY, &tpm(10_000), 10, t0)
                .expect("within tpm");
        }
        assert_eq!(logged(&limiter, KEY), 50);
        limiter
            .admit(KEY, &tpm(10_000), 10, t0 + secs(61))
            .expect("within tpm");
        assert_eq!(logged(&limiter, KEY), 1);
    }

    #[test]
    fn forget_drops_the_key_and_old_permits_leave_the_new_state_alone() {
        let limiter = Limiter::new();
        let limits = Limits {
            max_in_flight: Some(1),
            ..Limits::default()
        };
        let now = Instant::now();
        let old = limiter.admit(KEY, &limits, 0, now).expect("first slot");
        limiter.forget(KEY);
        assert!(lock(&limiter.keys).is_empty());

        let new = limiter
            .admit(KEY, &limits, 0, now)
            .expect("a forgotten key starts afresh");
        drop(old);
        refusal(limiter.admit(KEY, &limits, 0, now));
        drop(new);
        limiter
            .admit(KEY, &limits, 0, now)
            .expect("the slot was freed");
    }

    #[test]
    fn keys_are_limited_independently() {
        let limiter = Limiter::new();
        let now = Instant::now();
        limiter.admit(1, &rpm(1), 0, now).expect("key 1");
        limiter
            .admit(2, &rpm(1), 0, now)
            .expect("key 2 has its own window");
        refusal(limiter.admit(1, &rpm(1), 0, now));
    }

    #[test]
    fn an_instant_older_than_the_latest_admission_is_treated_as_that_admission() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        limiter
            .admit(KEY, &rpm(1), 0, t0 + secs(10))
            .expect("within rpm");
        let refused = refusal(limiter.admit(KEY, &rpm(1), 0, t0));
        assert_eq!(refused.retry_after, WINDOW);
    }

    #[test]
    fn retry_after_secs_rounds_up_to_at_least_one() {
        let refusal_after = |retry_after| Refusal {
            limit: Limit::Requests,
            retry_after,
            headers: RateHeaders {
                requests: None,
                tokens: None,
            },
        };
        assert_eq!(refusal_after(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(refusal_after(ms(200)).retry_after_secs(), 1);
        assert_eq!(refusal_after(secs(3)).retry_after_secs(), 3);
        assert_eq!(refusal_after(ms(3001)).retry_after_secs(), 4);
    }

    #[test]
    fn resets_are_written_as_openai_durations() {
        assert_eq!(format_reset(Duration::ZERO), "0s");
        assert_eq!(format_reset(Duration::from_nanos(1)), "1ms");
        assert_eq!(format_reset(ms(250)), "250ms");
        assert_eq!(format_reset(secs(1)), "1s");
        assert_eq!(format_reset(ms(59300)), "59.3s");
        assert_eq!(format_reset(secs(60)), "1m0s");
        assert_eq!(format_reset(ms(61050)), "1m1.05s");
        assert_eq!(format_reset(secs(360)), "6m0s");
    }
}
