//! Retention: the `sg-retention` thread deletes request-log rows older than
//! `[log] retention_days`, once at start and then every hour. It deletes a few hundred rows per
//! write, with a pause between, so no write holds its locks for long and request-log rows keep
//! flowing while a large backlog is cleared. The backend says how one batch is deleted.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{now_ms, Background, StoreError};
use crate::metrics::StoreMetrics;
use crate::time::MS_PER_DAY;

/// Rows deleted per write: small enough that a batch commits in milliseconds.
pub(crate) const BATCH_ROWS: usize = 500;

/// Deletes at most `limit` request-log rows logged before `cutoff_ms`, oldest first, in one
/// write; returns how many.
pub(crate) type Expire = Box<dyn Fn(i64, usize) -> Result<usize, StoreError> + Send>;
/// Between two batches, so the writer's other work goes first.
const BATCH_PAUSE: Duration = Duration::from_millis(20);
/// Between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// The running retention thread; stopped by [`Retention::stop`].
pub(crate) struct Retention(Background);

impl Retention {
    /// Starts deleting rows older than `retention_days` days with `expire`.
    pub(crate) fn spawn(
        expire: Expire,
        retention_days: u64,
        metrics: StoreMetrics,
    ) -> std::io::Result<Retention> {
        let keep_ms = i64::try_from(retention_days)
            .unwrap_or(i64::MAX)
            .saturating_mul(MS_PER_DAY);
        Background::spawn("sg-retention", move |stopped| {
            Sweeper {
                expire,
                retention_days,
                keep_ms,
                stopped,
                metrics,
            }
            .run();
        })
        .map(Retention)
    }

    /// Stops the thread between two batches and waits for it. Idempotent.
    pub(crate) fn stop(&self) {
        self.0.stop();
    }
}

/// The thread's state.
struct Sweeper {
    expire: Expire,
    retention_days: u64,
    keep_ms: i64,
    stopped: Receiver<()>,
    metrics: StoreMetrics,
}

impl Sweeper {
    fn run(&self) {
        loop {
            let (deleted, running) = self.sweep();
            if deleted > 0 {
                log::info!(
                    "retention: deleted {deleted} request-log rows older than {} days",
                    self.retention_days
                );
            }
            if !running || self.told_to_stop(SWEEP_EVERY) {
                return;
            }
        }
    }

    /// Deletes the rows older than the cutoff, batch by batch. Returns how many, and false
    /// when the thread must end (told to stop, or the store closed).
    fn sweep(&self) -> (u64, bool) {
        let cutoff_ms = now_ms().saturating_sub(self.keep_ms);
        let mut deleted = 0;
        loop {
            match self.delete_batch(cutoff_ms) {
                Ok(n) => {
                    deleted += n as u64;
                    self.metrics.log_rows_expired.inc_by(n as u64);
                    if n < BATCH_ROWS {
                        return (deleted, true);
                    }
                }
                Err(StoreError::Closed) => return (deleted, false),
                Err(e) => {
                    log::warn!(
                        "retention: cannot delete old request-log rows: {e}; next try in an hour"
                    );
                    return (deleted, true);
                }
            }
            if self.told_to_stop(BATCH_PAUSE) {
                return (deleted, false);
            }
        }
    }

    /// One write deleting at most [`BATCH_ROWS`] rows; returns how many it did.
    fn delete_batch(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        (self.expire)(cutoff_ms, BATCH_ROWS)
    }

    /// Waits `pause`, returning early with true once [`Retention::stop`] is called.
    fn told_to_stop(&self, pause: Duration) -> bool {
        !matches!(
            self.stopped.recv_timeout(pause),
            Err(RecvTimeoutError::Timeout)
        )
    }
}
