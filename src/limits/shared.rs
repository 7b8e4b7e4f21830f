//! The per-key limits of several instances on one PostgreSQL database: the same semantics as
//! the in-process limiter, decided by the database in one round trip per admission
//! (`store::limits`), and settled in one statement when the answer is done. When the limits
//! cannot be checked (the database is unreachable, this instance lost its lease), `[limits]
//! on_store_error` decides: refuse with 503 `store_unavailable` (closed), or admit unchecked
//! (open), counted either way and logged at most once a minute. An admission call that fails
//! may still have committed; its ticket is kept, and the slot it may hold is released by that
//! ticket once the database answers again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;

use super::{lock, Limit, Permit, RateHeaders, Refusal, Refused, WindowUse};
use crate::cluster::Instance;
use crate::config::OnStoreError;
use crate::store::limits::{self, Admission, Connections, Outcome};

/// How often a store failure is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Settles whose statement failed, tried again before the next admission; bounded so a long
/// outage cannot grow it without end (the slots of those lost are freed when the lease of this
/// instance runs out, or never if it stays alive: counted in the log line).
const UNSETTLED_MAX: usize = 100_000;

/// Admissions (and their reported tokens) whose settle statement failed.
type Unsettled = Arc<Mutex<Vec<(i64, Option<u64>)>>>;

/// How long a lost answer's ticket is looked for: past the longest an admission call can still
/// commit after its caller gave up on it (the statement timeout, 30 s unless the URL's options
/// raise it), with room to spare.
const LOST_FOR: Duration = Duration::from_secs(120);

/// How often the tickets of lost answers are looked for at most: one statement for all of them.
const LOST_EVERY: Duration = Duration::from_secs(1);

/// An admission call that failed after it may have committed: the database may hold an
/// admission in flight that this instance never learnt of.
#[derive(Debug)]
struct LostAnswer {
    instance: String,
    key: i64,
    ticket: i64,
    failed_at: Instant,
}

/// The answers lost, and when they were last looked for.
#[derive(Debug, Default)]
struct Lost {
    answers: Vec<LostAnswer>,
    looked: Option<Instant>,
}

/// The shared limiter: the store, this instance, and the policy for store failures.
#[derive(Debug)]
pub(crate) struct Shared {
    db: Connections,
    instance: Arc<Instance>,
    on_error: OnStoreError,
    errors: IntCounterVec,
    last_logged: Mutex<Option<Instant>>,
    unsettled: Unsettled,
    /// The next admission's ticket: unique within this process, so within this instance.
    tickets: AtomicI64,
    lost: Mutex<Lost>,
    /// Set once every one of the limiter's connections has been open: until then a burst on
    /// one key (whose admissions each hold a connection while they wait for its lock) can
    /// outrun the pool, so `/readyz` says `limits_connecting`.
    connected: AtomicBool,
}

impl Shared {
    pub(crate) fn new(
        db: Connections,
        instance: Arc<Instance>,
        on_error: OnStoreError,
        errors: IntCounterVec,
    ) -> Shared {
        Shared {
            db,
            instance,
            on_error,
            errors,
            last_logged: Mutex::new(None),
            unsettled: Arc::default(),
            tickets: AtomicI64::new(1),
            lost: Mutex::default(),
            connected: AtomicBool::new(false),
        }
    }

    /// Whether the limiter's connections have all been opened since start-up. It stays true
    /// after: a connection lost later is the database's trouble, which `/readyz` reports as
    /// `store_unavailable`.
    pub(crate) fn is_connected(&self) -> bool {
        if self.connected.load(Ordering::Relaxed) {
            return true;
        }
        let open = self.db.all_open();
        if open {
            self.connected.store(true, Ordering::Relaxed);
        }
        open
    }

    /// Admits one request of `key` estimated at `tokens`, in the database.
    pub(super) fn admit(&self, key: i64, tokens: u64) -> Result<Permit, Refused> {
        if !self.instance.is_registered() {
            return self.store_failed("this instance holds no lease");
        }
        self.settle_leftovers();
        self.release_lost();
        let instance = self.instance.id();
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let admission = match limits::admit(&self.db, key, &instance, tokens, ticket) {
            Ok(admission) => admission,
            Err(e) => {
                let mut lost = lock(&self.lost);
                if lost.answers.len() < UNSETTLED_MAX {
                    lost.answers.push(LostAnswer {
                        instance,
                        key,
                        ticket,
                        failed_at: Instant::now(),
                    });
                }
                drop(lost);
                return self.store_failed(&e.to_string());
            }
        };
        let headers = headers(&admission);
        match admission.outcome {
            Outcome::Admitted => Ok(Permit {
                slot: match admission.id {
                    Some(id) => super::Slot::Shared(Slot {
                        db: self.db.clone(),
                        admission: id,
                        reported: Mutex::new(None),
                        unsettled: Arc::clone(&self.unsettled),
                    }),
                    None => super::Slot::Unchecked,
                },
                headers,
                released: Default::default(),
            }),
            Outcome::Requests | Outcome::Tokens | Outcome::InFlight => {
                let limit = match admission.outcome {
                    Outcome::Requests => Limit::Requests,
                    Outcome::Tokens => Limit::Tokens,
                    _ => Limit::InFlight,
                };
                Err(Refused::Limit(Refusal {
                    limit,
                    retry_after: Duration::from_millis(admission.wait_ms),
                    headers,
                }))
            }
            Outcome::Revoked => Err(Refused::Revoked),
            Outcome::Expired => Err(Refused::Expired),
            Outcome::Unknown => Err(Refused::Unknown),
            Outcome::Unregistered => {
                self.instance.lost();
                self.store_failed("this instance's lease ran out")
            }
        }
    }

    /// Applies `[limits] on_store_error` to a request whose limits could not be checked.
    fn store_failed(&self, why: &str) -> Result<Permit, Refused> {
        let (outcome, answer) = match self.on_error {
            OnStoreError::Closed => ("refused", Err(Refused::StoreUnavailable)),
            OnStoreError::Open => (
                "admitted",
                Ok(Permit {
                    slot: super::Slot::Unchecked,
                    headers: RateHeaders {
                        requests: None,
                        tokens: None,
                    },
                    released: Default::default(),
                }),
            ),
        };
        self.errors.with_label_values(&[outcome]).inc();
        let mut last = lock(&self.last_logged);
        if last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            log::warn!(
                "shared limits cannot be checked ({why}): keyed requests are {outcome} \
                 ([limits] on_store_error); said at most once a minute"
            );
        }
        answer
    }

    /// Settles again what failed to settle before, while the database answers.
    fn settle_leftovers(&self) {
        let leftovers = std::mem::take(&mut *lock(&self.unsettled));
        let mut still = Vec::new();
        for (admission, tokens) in leftovers {
            if limits::settle(&self.db, admission, tokens).is_err() {
                still.push((admission, tokens));
            }
        }
        if !still.is_empty() {
            lock(&self.unsettled).extend(still);
        }
    }

    /// Releases the slots of admissions whose answers were lost, at most once every
    /// [`LOST_EVERY`], in one statement. A ticket is forgotten once released, once its
    /// instance id is no longer this instance's (the reaper frees that instance's slots when
    /// its lease runs out), or after [`LOST_FOR`] without being found: that call never
    /// admitted anything.
    fn release_lost(&self) {
        let mut lost = lock(&self.lost);
        if lost.answers.is_empty() || lost.looked.is_some_and(|at| at.elapsed() < LOST_EVERY) {
            return;
        }
        lost.looked = Some(Instant::now());
        let instance = self.instance.id();
        lost.answers.retain(|a| a.instance == instance);
        let tickets: Vec<i64> = lost.answers.iter().map(|a| a.ticket).collect();
        let mut keys: Vec<i64> = lost.answers.iter().map(|a| a.key).collect();
        keys.sort_unstable();
        keys.dedup();
        drop(lost);
        if tickets.is_empty() {
            return;
        }
        let Ok(released) = limits::release_lost(&self.db, &instance, &keys, &tickets) else {
            return;
        };
        if !released.is_empty() {
            log::info!(
                "released {} in-flight slot(s) of admissions whose answers were lost",
                released.len()
            );
        }
        let released: HashSet<i64> = released.into_iter().collect();
        lock(&self.lost)
            .answers
            .retain(|a| !released.contains(&a.ticket) && a.failed_at.elapsed() < LOST_FOR);
    }
}

/// A slot held in the database: settled once, with the reported tokens when they came.
#[derive(Debug)]
pub(super) struct Slot {
    db: Connections,
    admission: i64,
    reported: Mutex<Option<u64>>,
    unsettled: Unsettled,
}

impl Slot {
    pub(super) fn reconcile(&self, tokens: u64) {
        *lock(&self.reported) = Some(tokens);
    }

    /// Frees the slot and records the reported tokens: one statement. A failure keeps it to be
    /// tried again before the next admission.
    pub(super) fn settle(&self) {
        let tokens = *lock(&self.reported);
        if let Err(e) = limits::settle(&self.db, self.admission, tokens) {
            log::debug!("cannot settle admission {}: {e}", self.admission);
            let mut unsettled = lock(&self.unsettled);
            if unsettled.len() < UNSETTLED_MAX {
                unsettled.push((self.admission, tokens));
            }
        }
    }
}

/// The `x-ratelimit-*` values the database returned, for the limits the key has.
fn headers(a: &Admission) -> RateHeaders {
    RateHeaders {
        requests: a.rpm.map(|rpm| WindowUse {
            limit: rpm,
            remaining: rpm.saturating_sub(a.requests_used),
            reset: Duration::from_millis(a.requests_reset_ms),
        }),
        tokens: a.tpm.map(|tpm| WindowUse {
            limit: tpm,
            remaining: tpm.saturating_sub(a.tokens_charged),
            reset: Duration::from_millis(a.tokens_reset_ms),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Lease;
    use crate::store::keys::NewKey;
    use crate::store::testing::{insert_key, postgres_db};

    #[test]
    fn a_slot_whose_admission_answer_was_lost_is_released_before_the_next_admission() {
        let Some(db) = postgres_db("shared_lost_answer") else {
            return;
        };
        let store = db.open();
        let instance = Arc::new(Instance::new("127.0.0.1:1".into()));
        let _lease = Lease::start(Arc::clone(&instance), &store, Duration::from_secs(60)).unwrap();
        let errors = IntCounterVec::new(prometheus::Opts::new("e", "e"), &["outcome"]).unwrap();
        let db = limits::connections(&store, 2).unwrap();
        let shared = Shared::new(
            db.clone(),
            Arc::clone(&instance),
            OnStoreError::Closed,
            errors,
        );
        let new = NewKey {
            max_in_flight: Some(1),
            ..NewKey::default()
        };
        let key = insert_key(&store, new);

        // The call commits, but its answer never reaches the limiter: what admit keeps when
        // the call fails.
        let ticket = shared.tickets.fetch_add(1, Ordering::Relaxed);
        let committed = limits::admit(&db, key, &instance.id(), 0, ticket).unwrap();
        assert_eq!(committed.outcome, Outcome::Admitted);
        let refused = limits::admit(&db, key, &instance.id(), 0, 0).unwrap();
        assert_eq!(
            refused.outcome,
            Outcome::InFlight,
            "the lost admission holds the slot"
        );
        lock(&shared.lost).answers.push(LostAnswer {
            instance: instance.id(),
            key,
            ticket,
            failed_at: Instant::now(),
        });

        let permit = shared
            .admit(key, 0)
            .expect("the lost slot was released first");
        assert!(lock(&shared.lost).answers.is_empty(), "found, so forgotten");
        assert!(
            matches!(shared.admit(key, 0), Err(Refused::Limit(r)) if r.limit == Limit::InFlight),
            "the permit holds the one slot"
        );
        drop(permit);
        assert!(shared.admit(key, 0).is_ok(), "the permit's drop settled it");
    }

    #[test]
    fn the_database_numbers_render_as_the_in_process_headers_would() {
        let admission = Admission {
            outcome: Outcome::Admitted,
            id: Some(1),
            rpm: Some(20),
            requests_used: 2,
            requests_reset_ms: 60_000,
            tpm: Some(1000),
            tokens_charged: 300,
            tokens_reset_ms: 59_300,
            wait_ms: 0,
        };
        assert_eq!(
            headers(&admission).render(),
            vec![
                ("x-ratelimit-limit-requests", "20".to_string()),
                ("x-ratelimit-remaining-requests", "18".to_string()),
                ("x-ratelimit-reset-requests", "1m0s".to_string()),
                ("x-ratelimit-limit-tokens", "1000".to_string()),
                ("x-ratelimit-remaining-tokens", "700".to_string()),
                ("x-ratelimit-reset-tokens", "59.3s".to_string()),
            ]
        );
        let unlimited = Admission {
            rpm: None,
            tpm: None,
            ..admission
        };
        assert!(headers(&unlimited).render().is_empty());
    }
}
