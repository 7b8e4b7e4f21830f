//! The request log on PostgreSQL: rows no client waits for, queued on a bounded channel and
//! copied in batches by one `sg-log-writer` thread with `COPY … FROM STDIN`, which measured
//! 2–3 times the rows per second of a multi-row INSERT here (docs/decisions/0003). While rows
//! arrive it copies them every `log_flush`; at close it copies what is queued, then stops.

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use super::Pool;
use crate::config::{LogOverflow, StoreConfig};
use crate::metrics::StoreMetrics;
use crate::store::requests::RequestRow;

/// The senders' side of the log writer, shared by every thread.
pub(super) struct LogWriter {
    logs: Sender<RequestRow>,
    overflow: LogOverflow,
    metrics: StoreMetrics,
    /// Dropped to stop the thread, which then copies what is queued.
    stop: Mutex<Option<Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl LogWriter {
    pub(super) fn spawn(
        pool: Pool,
        config: &StoreConfig,
        metrics: StoreMetrics,
    ) -> std::io::Result<LogWriter> {
        let (logs, inbox) = crossbeam_channel::bounded(config.log_queue);
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let copier = Copier {
            pool,
            inbox,
            stopped,
            flush: config.log_flush,
            batch_max: config.batch_max,
            metrics: metrics.clone(),
        };
        let thread = thread::Builder::new()
            .name("sg-log-writer".into())
            .spawn(move || copier.run())?;
        Ok(LogWriter {
            logs,
            overflow: config.log_overflow,
            metrics,
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(Some(thread)),
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
        drop(
            self.stop
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        crate::store::join_once(&self.thread);
    }
}

/// The thread's state.
struct Copier {
    pool: Pool,
    inbox: Receiver<RequestRow>,
    stopped: Receiver<()>,
    flush: Duration,
    batch_max: usize,
    metrics: StoreMetrics,
}

impl Copier {
    fn run(&self) {
        loop {
            let first = select! {
                recv(self.inbox) -> row => match row {
                    Ok(row) => row,
                    Err(_) => return,
                },
                recv(self.stopped) -> _ => {
                    let rest: Vec<RequestRow> = self.inbox.try_iter().collect();
                    for batch in rest.chunks(self.batch_max.max(1)) {
                        self.copy(batch);
                    }
                    return;
                }
            };
            // Whatever else arrives within `flush` goes in the same batch.
            let mut batch = vec![first];
            let deadline = Instant::now() + self.flush;
            while batch.len() < self.batch_max {
                match self.inbox.recv_deadline(deadline) {
                    Ok(row) => batch.push(row),
                    Err(_) => break,
                }
            }
            self.copy(&batch);
        }
    }

    /// Copies one batch in one transaction; a batch that fails is dropped and counted.
    fn copy(&self, rows: &[RequestRow]) {
        let started = Instant::now();
        match self.try_copy(rows) {
            Ok(()) => {
                self.metrics.batch_rows.observe(rows.len() as f64);
                self.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                log::error!("database copy of {} log rows failed: {e}", rows.len());
                self.metrics.log_rows_dropped.inc_by(rows.len() as u64);
            }
        }
    }

    fn try_copy(&self, rows: &[RequestRow]) -> anyhow::Result<()> {
        let mut conn = self.pool.get()?;
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
