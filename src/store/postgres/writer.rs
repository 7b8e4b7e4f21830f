//! The request log on PostgreSQL: rows no client waits for, queued on a bounded channel and
//! copied in batches by one `sg-log-writer` thread with `COPY … FROM STDIN`, which measured
//! 2–3 times the rows per second of a multi-row INSERT here (docs/decisions/0003). While rows
//! arrive it copies them every `log_flush`, sleeping between batches rather than waiting on the
//! queue (so a logged request does not wake it); at close it copies what is queued, then stops.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender};

use super::Pool;
use crate::config::{LogOverflow, StoreConfig};
use crate::metrics::StoreMetrics;
use crate::store::requests::RequestRow;
use crate::store::Background;

/// The senders' side of the log writer, shared by every thread.
pub(super) struct LogWriter {
    logs: Sender<RequestRow>,
    overflow: LogOverflow,
    metrics: StoreMetrics,
    /// Told to stop, the thread copies what is queued, then ends.
    thread: Background,
}

impl LogWriter {
    pub(super) fn spawn(
        pool: Pool,
        available: Arc<AtomicBool>,
        config: &StoreConfig,
        metrics: StoreMetrics,
    ) -> std::io::Result<LogWriter> {
        let (logs, inbox) = crossbeam_channel::bounded(config.log_queue);
        let (flush, batch_max) = (config.log_flush, config.batch_max);
        let copier_metrics = metrics.clone();
        let thread = Background::spawn("sg-log-writer", move |stopped| {
            Copier {
                pool,
                available,
                inbox,
                stopped,
                flush,
                batch_max,
                metrics: copier_metrics,
            }
            .run();
        })?;
        Ok(LogWriter {
            logs,
            overflow: config.log_overflow,
            metrics,
            thread,
        })
    }

    pub(super) fn log(&self, row: RequestRow) {
        crate::store::queue_log_row(&self.logs, self.overflow, &self.metrics, row);
    }

    pub(super) fn queue_depth(&self) -> usize {
        self.logs.len()
    }

    /// Copies what is queued and stops the thread. Idempotent.
    pub(super) fn close(&self) {
        self.thread.stop();
    }
}

/// The thread's state.
struct Copier {
    pool: Pool,
    /// The probe's verdict: while the database cannot be reached, a batch waits for it.
    available: Arc<AtomicBool>,
    inbox: Receiver<RequestRow>,
    stopped: Receiver<()>,
    flush: Duration,
    batch_max: usize,
    metrics: StoreMetrics,
}

impl Copier {
    fn run(&self) {
        // Whether the last batch found rows waiting: then the thread sleeps out `flush` and
        // takes what came, instead of waiting on the queue, where each row sent would wake it
        // (a wake-up per logged request: a context switch each way on a saturated machine).
        let mut flowing = false;
        loop {
            let mut batch = Vec::new();
            if !flowing {
                select! {
                    recv(self.inbox) -> row => match row {
                        Ok(row) => batch.push(row),
                        Err(_) => return,
                    },
                    recv(self.stopped) -> _ => return self.copy_the_rest(),
                }
            }
            // Whatever else arrives within `flush` goes in the same batch; a full batch goes
            // at once, and the next one does not wait.
            if batch.len() + self.inbox.len() < self.batch_max && !self.pause(self.flush) {
                batch.extend(self.inbox.try_iter().take(self.batch_max - batch.len()));
                if !batch.is_empty() {
                    self.copy(&batch);
                }
                return self.copy_the_rest();
            }
            batch.extend(self.inbox.try_iter().take(self.batch_max - batch.len()));
            flowing = !batch.is_empty();
            if flowing {
                self.copy(&batch);
            }
        }
    }

    /// At close: copies what is queued, in batches.
    fn copy_the_rest(&self) {
        let rest: Vec<RequestRow> = self.inbox.try_iter().collect();
        for batch in rest.chunks(self.batch_max.max(1)) {
            self.copy(batch);
        }
    }

    /// Copies one batch in one transaction. While the database cannot be reached the batch
    /// waits for it (and newer rows wait in the bounded queue, then are dropped and counted
    /// there); a batch the database refuses, or one still waiting at close, is dropped and
    /// counted.
    fn copy(&self, rows: &[RequestRow]) {
        loop {
            let started = Instant::now();
            match self.try_copy(rows) {
                Ok(()) => {
                    self.metrics.batch_rows.observe(rows.len() as f64);
                    self.metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return;
                }
                Err(_) if self.database_is_away() => {}
                Err(e) => {
                    log::error!("database copy of {} log rows failed: {e}", rows.len());
                    self.metrics.log_rows_dropped.inc_by(rows.len() as u64);
                    return;
                }
            }
        }
    }

    /// After a failed copy: whether the database cannot be reached (the probe, given a moment
    /// to notice a database that just went away, says so), in which case it has waited a
    /// little for it to come back. False when told to stop meanwhile.
    fn database_is_away(&self) -> bool {
        let away = !self.available.load(Ordering::SeqCst)
            || (self.pause(Duration::from_millis(1500)) && !self.available.load(Ordering::SeqCst));
        away && self.pause(Duration::from_millis(250))
    }

    /// Waits `pause`; false when told to stop meanwhile.
    fn pause(&self, pause: Duration) -> bool {
        matches!(
            self.stopped.recv_timeout(pause),
            Err(RecvTimeoutError::Timeout)
        )
    }

    fn try_copy(&self, rows: &[RequestRow]) -> anyhow::Result<()> {
        let mut conn = self.pool.get_timeout(Duration::from_secs(1))?;
        let mut tx = conn.transaction()?;
        let mut sink = tx.copy_in(super::requests::COPY_SQL)?;
        let mut text = Vec::with_capacity(rows.len() * 256);
        for row in rows {
            super::requests::copy_line(&mut text, row);
        }
        sink.write_all(&text)?;
        sink.finish()?;
        tx.commit()?;
        Ok(())
    }
}
