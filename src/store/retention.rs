//! Retention: the `sg-retention` thread deletes request-log rows older than
//! `[log] retention_days` and finished jobs older than `[jobs] retention_days`, once at start
//! and then every hour. It deletes a few hundred rows per write, with a pause between, so no
//! write holds its locks for long and request-log rows keep flowing while a large backlog is
//! cleared. The backend says how one batch of each kind is deleted.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use prometheus::IntCounter;

use super::{now_ms, Background, StoreError};
use crate::metrics::StoreMetrics;
use crate::time::MS_PER_DAY;

/// Rows deleted per write: small enough that a batch commits in milliseconds.
pub(crate) const BATCH_ROWS: usize = 500;

/// Deletes at most `limit` rows of a kind that are older than `cutoff_ms` (logged before it,
/// or finished before it), oldest first, in one write; returns how many.
pub(crate) type Expire = Box<dyn Fn(Rows, i64, usize) -> Result<usize, StoreError> + Send>;
/// Between two batches, so the writer's other work goes first.
const BATCH_PAUSE: Duration = Duration::from_millis(20);
/// Between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// What retention deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    /// Request-log rows, by the time they were logged.
    Log,
    /// Succeeded, failed and cancelled jobs, by the time they finished; never a queued or
    /// running one.
    Jobs,
}

impl Rows {
    /// What the log lines call them.
    fn noun(self) -> &'static str {
        match self {
            Rows::Log => "request-log rows",
            Rows::Jobs => "finished jobs",
        }
    }

    /// The counter of deleted rows: `syncgate_store_log_rows_expired_total` or
    /// `syncgate_store_jobs_expired_total`.
    fn counter(self, metrics: &StoreMetrics) -> &IntCounter {
        match self {
            Rows::Log => &metrics.log_rows_expired,
            Rows::Jobs => &metrics.jobs_expired,
        }
    }
}

/// How many days each kind of row is kept; 0 keeps it for ever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Keep {
    /// `[log] retention_days`.
    pub(crate) log_days: u64,
    /// `[jobs] retention_days`.
    pub(crate) jobs_days: u64,
}

impl Keep {
    /// The kinds that expire, with their days.
    fn expiring(self) -> Vec<(Rows, u64)> {
        [(Rows::Log, self.log_days), (Rows::Jobs, self.jobs_days)]
            .into_iter()
            .filter(|(_, days)| *days > 0)
            .collect()
    }
}

/// The running retention thread; stopped by [`Retention::stop`].
pub(crate) struct Retention(Background);

impl Retention {
    /// Starts deleting what `keep` says is old with `expire`; `None` when nothing expires.
    pub(crate) fn spawn(
        expire: Expire,
        keep: Keep,
        metrics: StoreMetrics,
    ) -> std::io::Result<Option<Retention>> {
        let expiring = keep.expiring();
        if expiring.is_empty() {
            return Ok(None);
        }
        Background::spawn("sg-retention", move |stopped| {
            Sweeper {
                expire,
                expiring,
                stopped,
                metrics,
            }
            .run();
        })
        .map(|thread| Some(Retention(thread)))
    }

    /// Stops the thread between two batches and waits for it. Idempotent.
    pub(crate) fn stop(&self) {
        self.0.stop();
    }
}

/// The thread's state.
struct Sweeper {
    expire: Expire,
    /// Each kind that expires and its days, swept in this order.
    expiring: Vec<(Rows, u64)>,
    stopped: Receiver<()>,
    metrics: StoreMetrics,
}

impl Sweeper {
    fn run(&self) {
        loop {
            for &(rows, days) in &self.expiring {
                let (deleted, running) = self.sweep(rows, days);
                if deleted > 0 {
                    log::info!(
                        "retention: deleted {deleted} {} older than {days} days",
                        rows.noun()
                    );
                }
                if !running {
                    return;
                }
            }
            if self.told_to_stop(SWEEP_EVERY) {
                return;
            }
        }
    }

    /// Deletes the `rows` older than `days`, batch by batch. Returns how many, and false when
    /// the thread must end (told to stop, or the store closed).
    fn sweep(&self, rows: Rows, days: u64) -> (u64, bool) {
        let keep_ms = i64::try_from(days)
            .unwrap_or(i64::MAX)
            .saturating_mul(MS_PER_DAY);
        let cutoff_ms = now_ms().saturating_sub(keep_ms);
        let mut deleted = 0;
        loop {
            match (self.expire)(rows, cutoff_ms, BATCH_ROWS) {
                Ok(n) => {
                    deleted += n as u64;
                    rows.counter(&self.metrics).inc_by(n as u64);
                    if n < BATCH_ROWS {
                        return (deleted, true);
                    }
                }
                Err(StoreError::Closed) => return (deleted, false),
                Err(e) => {
                    log::warn!(
                        "retention: cannot delete old {}: {e}; next try in an hour",
                        rows.noun()
                    );
                    return (deleted, true);
                }
            }
            if self.told_to_stop(BATCH_PAUSE) {
                return (deleted, false);
            }
        }
    }

    /// Waits `pause`, returning early with true once [`Retention::stop`] is called.
    fn told_to_stop(&self, pause: Duration) -> bool {
        !matches!(
            self.stopped.recv_timeout(pause),
            Err(RecvTimeoutError::Timeout)
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crossbeam_channel::Sender;

    use super::*;
    use crate::metrics::Metrics;

    /// Each batch the backend was asked for: of which rows, and how many it deleted.
    type Asked = Arc<Mutex<Vec<(Rows, usize)>>>;

    /// A sweeper whose backend has `log` request-log rows and `jobs` finished jobs to delete,
    /// recording each batch asked for; the sender keeps its stop channel open (dropped, it
    /// would read as "stop").
    fn sweeper(log: usize, jobs: usize) -> (Sweeper, Asked, Sender<()>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let left = Mutex::new([log, jobs]);
        let expire: Expire = {
            let asked = Arc::clone(&asked);
            Box::new(move |rows, _cutoff_ms, limit| {
                let mut left = left.lock().unwrap();
                let slot = &mut left[usize::from(rows == Rows::Jobs)];
                let n = (*slot).min(limit);
                *slot -= n;
                asked.lock().unwrap().push((rows, n));
                Ok(n)
            })
        };
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let keep = Keep {
            log_days: 30,
            jobs_days: 7,
        };
        let sweeper = Sweeper {
            expire,
            expiring: keep.expiring(),
            stopped,
            metrics: Metrics::new().store,
        };
        (sweeper, asked, stop)
    }

    #[test]
    fn a_sweep_deletes_batch_after_batch_until_one_comes_back_short() {
        let (s, asked, _stop) = sweeper(1200, 0);
        assert_eq!(s.sweep(Rows::Log, 30), (1200, true));
        assert_eq!(
            *asked.lock().unwrap(),
            [(Rows::Log, 500), (Rows::Log, 500), (Rows::Log, 200)]
        );
        assert_eq!(s.metrics.log_rows_expired.get(), 1200);
        assert_eq!(s.metrics.jobs_expired.get(), 0);
    }

    #[test]
    fn finished_jobs_are_swept_by_the_same_loop_and_counted_apart() {
        let (s, asked, _stop) = sweeper(3, 1000);
        assert_eq!(s.expiring, [(Rows::Log, 30), (Rows::Jobs, 7)]);
        assert_eq!(s.sweep(Rows::Jobs, 7), (1000, true));
        // A full last batch needs one more look to know nothing is left.
        assert_eq!(
            *asked.lock().unwrap(),
            [(Rows::Jobs, 500), (Rows::Jobs, 500), (Rows::Jobs, 0)]
        );
        assert_eq!(s.metrics.jobs_expired.get(), 1000);
        assert_eq!(s.metrics.log_rows_expired.get(), 0);
    }

    #[test]
    fn only_kinds_kept_for_a_limited_time_expire() {
        let jobs_only = Keep {
            log_days: 0,
            jobs_days: 7,
        };
        assert_eq!(jobs_only.expiring(), [(Rows::Jobs, 7)]);
        assert!(Keep::default().expiring().is_empty());
        let nothing =
            Box::new(|_, _, _| -> Result<usize, StoreError> { panic!("nothing expires") });
        let metrics = Metrics::new().store;
        assert!(Retention::spawn(nothing, Keep::default(), metrics)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_closed_store_ends_the_sweep() {
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let s = Sweeper {
            expire: Box::new(|_, _, _| Err(StoreError::Closed)),
            expiring: vec![(Rows::Log, 1)],
            stopped,
            metrics: Metrics::new().store,
        };
        assert_eq!(s.sweep(Rows::Log, 1), (0, false));
        drop(stop);
    }
}
