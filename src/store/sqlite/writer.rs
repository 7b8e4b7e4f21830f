//! The one thread that writes to the database. Writes from every worker meet here, so SQLite's
//! single write lock is never fought over: each transaction carries many rows (group commit).
//!
//! Two bounded channels feed it:
//! - acknowledged writes (a conversation turn), each a closure run in its own savepoint; the
//!   caller waits until the transaction holding it has committed, so a 200 means "on disk";
//! - request-log rows, which no client waits for. While they arrive the writer commits them
//!   every `log_flush` (one wake-up per interval, not per row); an acknowledged write arriving
//!   in between is committed at once, with whatever log rows are waiting.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use rusqlite::{Connection, TransactionBehavior};

use super::requests;
use crate::config::{Durability, LogOverflow, StoreConfig};
use crate::metrics::StoreMetrics;
use crate::store::requests::RequestRow;
use crate::store::StoreError;

/// An acknowledged write: runs inside the batch's transaction, in a savepoint of its own, so
/// one that fails (a constraint) is rolled back alone and the rest of the batch commits.
pub(crate) type WriteFn = Box<dyn FnOnce(&Connection) -> rusqlite::Result<()> + Send>;

/// How long a worker waits for room in a full write queue before answering 503.
const WRITE_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// An acknowledged write on its way to the writer. However it ends — committed, failed, or
/// dropped unrun because the writer stopped — its caller is told exactly once.
struct Op {
    run: Option<WriteFn>,
    done: Arc<Done>,
}

impl Drop for Op {
    /// An op dropped before it was answered (the writer stopped with it queued) fails.
    fn drop(&mut self) {
        self.done.finish(Err(StoreError::Closed));
    }
}

/// Where the writer reports an acknowledged write's outcome, after the commit.
struct Done {
    outcome: Mutex<Outcome>,
    ready: Condvar,
}

enum Outcome {
    Pending,
    Ready(Result<(), StoreError>),
    Taken,
}

impl Done {
    fn new() -> Arc<Done> {
        Arc::new(Done {
            outcome: Mutex::new(Outcome::Pending),
            ready: Condvar::new(),
        })
    }

    /// Records the outcome; only the first call counts.
    fn finish(&self, outcome: Result<(), StoreError>) {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*slot, Outcome::Pending) {
            *slot = Outcome::Ready(outcome);
            self.ready.notify_one();
        }
    }

    fn wait(&self) -> Result<(), StoreError> {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Outcome::Ready(_) = &*slot {
                let Outcome::Ready(outcome) = std::mem::replace(&mut *slot, Outcome::Taken) else {
                    unreachable!("matched Ready just above");
                };
                return outcome;
            }
            slot = self
                .ready
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The senders' side of the writer, shared by every thread.
pub(crate) struct Writer {
    ops: Sender<Op>,
    logs: Sender<RequestRow>,
    overflow: LogOverflow,
    metrics: StoreMetrics,
    closed: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Starts the writer thread on its own connection.
    pub(crate) fn spawn(
        conn: Connection,
        config: &StoreConfig,
        metrics: StoreMetrics,
    ) -> std::io::Result<Writer> {
        let (ops, op_inbox) = crossbeam_channel::bounded(config.write_queue);
        let (logs, log_inbox) = crossbeam_channel::bounded(config.log_queue);
        let closed = Arc::new(AtomicBool::new(false));
        let mut state = Batcher {
            conn,
            ops: op_inbox,
            logs: log_inbox,
            flush: config.log_flush,
            batch_max: config.batch_max,
            durability: config.durability,
            synchronous: None,
            metrics: metrics.clone(),
            closed: Arc::clone(&closed),
        };
        let thread = thread::Builder::new()
            .name("sg-writer".into())
            .spawn(move || state.run())?;
        Ok(Writer {
            ops,
            logs,
            overflow: config.log_overflow,
            metrics,
            closed,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `write` in the writer's next transaction and returns once that has committed.
    pub(crate) fn write(&self, write: WriteFn) -> Result<(), StoreError> {
        let done = Done::new();
        let op = Op {
            run: Some(write),
            done: Arc::clone(&done),
        };
        match self.ops.send_timeout(op, WRITE_QUEUE_WAIT) {
            Ok(()) => done.wait(),
            Err(SendTimeoutError::Timeout(_)) => Err(StoreError::Busy),
            Err(SendTimeoutError::Disconnected(_)) => Err(StoreError::Closed),
        }
    }

    /// Runs `write` like [`Writer::write`] and hands back what it returned, once committed.
    pub(crate) fn call<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = Arc::new(Mutex::new(None));
        let filled = Arc::clone(&slot);
        self.write(Box::new(move |conn| {
            let value = write(conn)?;
            *filled.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
            Ok(())
        }))?;
        let value = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        // A write that returned Ok filled the slot before its commit was reported.
        value.ok_or_else(|| StoreError::Failed("the write left no result".into()))
    }

    /// Queues a request-log row; never waits longer than the overflow policy allows. A row
    /// that finds no room is dropped and counted.
    pub(crate) fn log(&self, row: RequestRow) {
        crate::store::queue_log_row(&self.logs, self.overflow, &self.metrics, row);
    }

    /// Rows and writes waiting for the writer.
    pub(crate) fn queue_depth(&self) -> usize {
        self.ops.len() + self.logs.len()
    }

    /// Commits what is queued and stops the writer; later rows are dropped (counted), later
    /// acknowledged writes fail. Idempotent.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wakes the writer if it is waiting for work; it then drains both queues and exits.
        let wake = Op {
            run: Some(Box::new(|_| Ok(()))),
            done: Done::new(),
        };
        let _ = self.ops.send_timeout(wake, WRITE_QUEUE_WAIT);
        crate::store::join_once(&self.thread);
    }
}

/// The writer thread's state.
struct Batcher {
    conn: Connection,
    ops: Receiver<Op>,
    logs: Receiver<RequestRow>,
    flush: Duration,
    batch_max: usize,
    durability: Durability,
    /// The `synchronous` setting last applied to the connection.
    synchronous: Option<&'static str>,
    metrics: StoreMetrics,
    closed: Arc<AtomicBool>,
}

impl Batcher {
    fn run(&mut self) {
        let mut ops = Vec::new();
        let mut rows = Vec::new();
        // Whether log rows were flowing at the last commit: then the writer collects them
        // every `flush` instead of waking for each.
        let mut flowing = false;
        loop {
            let closing = self.closed.load(Ordering::SeqCst);
            if !closing {
                self.wait_for_work(flowing, &mut ops, &mut rows);
            }
            while ops.len() < self.batch_max {
                match self.ops.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            while rows.len() + ops.len() < self.batch_max {
                match self.logs.try_recv() {
                    Ok(row) => rows.push(row),
                    Err(_) => break,
                }
            }
            if ops.is_empty() && rows.is_empty() {
                if closing {
                    return;
                }
                flowing = false;
                continue;
            }
            flowing = !rows.is_empty();
            self.commit(&mut ops, &mut rows);
        }
    }

    /// Sleeps until there is something to write. With log rows flowing, only an acknowledged
    /// write wakes it before `flush` is up.
    fn wait_for_work(&self, flowing: bool, ops: &mut Vec<Op>, rows: &mut Vec<RequestRow>) {
        if flowing || !self.logs.is_empty() {
            match self.ops.recv_timeout(self.flush) {
                Ok(op) => ops.push(op),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            return;
        }
        select! {
            recv(self.ops) -> op => if let Ok(op) = op { ops.push(op) },
            recv(self.logs) -> row => if let Ok(row) = row { rows.push(row) },
        }
    }

    /// One transaction: the log rows, then each acknowledged write in its savepoint. The
    /// writes' callers are told after the commit (or its failure).
    fn commit(&mut self, ops: &mut Vec<Op>, rows: &mut Vec<RequestRow>) {
        let acknowledged = !ops.is_empty();
        let synchronous = match (acknowledged, self.durability) {
            (true, Durability::Full) => "FULL",
            _ => "NORMAL",
        };
        if self.synchronous != Some(synchronous) {
            match self.conn.pragma_update(None, "synchronous", synchronous) {
                Ok(()) => self.synchronous = Some(synchronous),
                Err(e) => log::error!("cannot set synchronous = {synchronous}: {e}"),
            }
        }
        let started = Instant::now();
        let size = ops.len() + rows.len();
        let mut finished: Vec<(Op, Result<(), StoreError>)> = Vec::with_capacity(ops.len());
        let committed = (|| -> rusqlite::Result<()> {
            let mut tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            requests::insert(&tx, rows)?;
            for mut op in ops.drain(..) {
                let Some(run) = op.run.take() else {
                    continue;
                };
                let sp = tx.savepoint()?;
                // Dropping the savepoint undoes a failed write alone; the batch goes on. A
                // write that panics fails like one that errs, and the writer lives on.
                let outcome = match panic::catch_unwind(AssertUnwindSafe(|| run(&sp))) {
                    Ok(Ok(())) => sp.commit().map_err(StoreError::from),
                    Ok(Err(e)) => Err(StoreError::from(e)),
                    Err(_) => {
                        log::error!("a database write panicked; it was rolled back");
                        Err(StoreError::Failed("the write panicked".to_string()))
                    }
                };
                finished.push((op, outcome));
            }
            tx.commit()
        })();
        // Ops not yet run when the transaction failed are answered with its error too.
        for op in ops.drain(..) {
            finished.push((op, Err(StoreError::Closed)));
        }
        match committed {
            Ok(()) => {
                self.metrics.batch_rows.observe(size as f64);
                self.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                for (op, outcome) in finished {
                    op.done.finish(outcome);
                }
            }
            Err(e) => {
                log::error!("database commit of {size} rows failed: {e}");
                self.metrics.log_rows_dropped.inc_by(rows.len() as u64);
                let why = e.to_string();
                for (op, _) in finished {
                    op.done.finish(Err(StoreError::Failed(why.clone())));
                }
            }
        }
        rows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::sqlite::migrate;

    fn temp_db(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "syncgate-writer-{name}-{}-{}.db",
            std::process::id(),
            fastrand::u64(..)
        ));
        path
    }

    fn open(path: &std::path::Path) -> Connection {
        let mut conn = Connection::open(path).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .unwrap();
        migrate::migrate(&mut conn).unwrap();
        conn
    }

    fn config(overflow: LogOverflow, log_queue: usize) -> StoreConfig {
        StoreConfig {
            read_pool: 2,
            write_queue: 64,
            log_queue,
            log_overflow: overflow,
            log_flush: Duration::from_millis(5),
            batch_max: 1000,
            durability: Durability::Full,
        }
    }

    fn row(i: usize) -> RequestRow {
        RequestRow {
            request_id: format!("r{i}"),
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            status: 200,
            ..RequestRow::default()
        }
    }

    fn count(path: &std::path::Path, sql: &str) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    fn cleanup(path: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn rows_are_committed_in_batches_and_close_flushes_the_rest() {
        let path = temp_db("batches");
        let metrics = Metrics::new();
        let writer = Writer::spawn(
            open(&path),
            &config(LogOverflow::Block(Duration::from_secs(1)), 10_000),
            metrics.store.clone(),
        )
        .unwrap();
        for i in 0..5000 {
            writer.log(row(i));
        }
        writer.close();
        assert_eq!(count(&path, "SELECT count(*) FROM requests"), 5000);
        let batches = metrics.store.batch_rows.get_sample_count();
        assert!(
            batches < 5000 / 4,
            "5000 rows took {batches} transactions: not grouped"
        );
        assert_eq!(metrics.store.log_rows_dropped.get(), 0);
        cleanup(&path);
    }

    #[test]
    fn a_failing_write_is_rolled_back_alone_and_the_others_commit() {
        let path = temp_db("savepoint");
        let metrics = Metrics::new();
        let writer = Arc::new(
            Writer::spawn(
                open(&path),
                &config(LogOverflow::Drop, 100),
                metrics.store.clone(),
            )
            .unwrap(),
        );
        let insert = |id: &'static str| -> WriteFn {
            Box::new(move |c: &Connection| {
                c.execute(
                    "INSERT INTO conversations (id, created_ms) VALUES (?1, 1)",
                    [id],
                )
                .map(drop)
            })
        };
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let writer = Arc::clone(&writer);
                let id: &'static str = Box::leak(format!("c{i}").into_boxed_str());
                thread::spawn(move || writer.write(insert(id)))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        // The same id again breaks the primary key: only this write fails.
        let err = writer.write(insert("c3")).unwrap_err();
        assert!(err.is_unique_violation(), "{err}");
        writer.write(insert("c99")).unwrap();
        writer.close();
        assert_eq!(count(&path, "SELECT count(*) FROM conversations"), 17);
        cleanup(&path);
    }

    #[test]
    fn a_panicking_write_fails_alone_and_a_write_after_close_is_refused() {
        let path = temp_db("panic");
        let metrics = Metrics::new();
        let writer = Writer::spawn(
            open(&path),
            &config(LogOverflow::Drop, 100),
            metrics.store.clone(),
        )
        .unwrap();
        let err = writer
            .write(Box::new(|_: &Connection| panic!("a bug in a write")))
            .unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
        writer
            .write(Box::new(|c: &Connection| {
                c.execute(
                    "INSERT INTO conversations (id, created_ms) VALUES ('ok', 1)",
                    [],
                )
                .map(drop)
            }))
            .unwrap();
        writer.close();
        let after = writer.write(Box::new(|_: &Connection| Ok(())));
        assert!(matches!(after, Err(StoreError::Closed)), "{after:?}");
        assert_eq!(count(&path, "SELECT count(*) FROM conversations"), 1);
        cleanup(&path);
    }

    #[test]
    fn a_full_log_queue_drops_rows_and_counts_them_under_the_drop_policy() {
        let path = temp_db("drop");
        let metrics = Metrics::new();
        let conn = open(&path);
        // Hold the write lock from another connection so the writer cannot drain.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let writer =
            Writer::spawn(conn, &config(LogOverflow::Drop, 10), metrics.store.clone()).unwrap();
        for i in 0..100 {
            writer.log(row(i));
        }
        let dropped = metrics.store.log_rows_dropped.get();
        // At most the queue (10) plus the batch the writer holds (up to 10) got through.
        assert!(dropped >= 80, "dropped {dropped}");
        blocker.execute_batch("COMMIT").unwrap();
        writer.close();
        assert_eq!(
            count(&path, "SELECT count(*) FROM requests") + dropped as i64,
            100
        );
        cleanup(&path);
    }
}
