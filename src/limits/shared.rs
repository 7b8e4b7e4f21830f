//! The per-key limits of several instances on one PostgreSQL database: the same semantics as
//! the in-process limiter, decided by the database in one round trip per admission
//! (`store::limits`), and settled in one statement when the answer is done. When the limits
//! cannot be checked (the database is unreachable, this instance lost its lease), `[limits]
//! on_store_error` decides: refuse with 503 `store_unavailable` (closed), or admit unchecked
//! (open), counted either way and logged at most once a minute.

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

/// The shared limiter: the store, this instance, and the policy for store failures.
#[derive(Debug)]
pub(crate) struct Shared {
    db: Connections,
    instance: Arc<Instance>,
    on_error: OnStoreError,
    errors: IntCounterVec,
    last_logged: Mutex<Option<Instant>>,
    unsettled: Unsettled,
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
        }
    }

    /// Admits one request of `key` estimated at `tokens`, in the database.
    pub(super) fn admit(&self, key: i64, tokens: u64) -> Result<Permit, Refused> {
        if !self.instance.is_registered() {
            return self.store_failed("this instance holds no lease");
        }
        self.settle_leftovers();
        let admission = match limits::admit(&self.db, key, &self.instance.id(), tokens) {
            Ok(admission) => admission,
            Err(e) => return self.store_failed(&e.to_string()),
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
