//! The `writer` scenario: the database writer on its own, in this process, against the way it
//! replaces (a transaction per row, from many threads at once), on the same disk in the same
//! run. Two kinds of write: request-log rows (no one waits; the log's `synchronous = NORMAL`)
//! and acknowledged writes (the caller waits for the commit; `synchronous = FULL`). With
//! `--db postgres://…` the same two, through the store's API, on PostgreSQL too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::{params, Connection, TransactionBehavior};
use serde_json::json;

use super::postgres::ScratchDatabase;
use super::report::{Outcome, Row};
use super::Bench;
use crate::config::{Durability, LogOverflow, StoreConfig};
use crate::metrics::Metrics;
use crate::store::requests::RequestRow;
use crate::store::{self, Writer};

/// Threads producing request-log rows (as workers would).
const LOG_THREADS: usize = 8;
/// Threads making acknowledged writes, each waiting for its commit (as conversation turns do).
const ACK_THREADS: usize = 16;

pub(crate) fn writer(b: &mut Bench) -> anyhow::Result<Outcome> {
    let window = (b.duration / 2).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let scratch = Scratch::new()?;

    b.phase(format!(
        "writer: request-log rows from {LOG_THREADS} threads, group commit"
    ));
    let grouped = grouped_log_rows(&scratch.db("grouped-log"), window)?;
    b.bar.inc(1);
    b.phase(format!(
        "writer: request-log rows from {LOG_THREADS} threads, a transaction per row"
    ));
    let per_row_log = per_row(&scratch.db("per-row-log"), window, LOG_THREADS, "NORMAL")?;
    b.bar.inc(1);
    b.phase(format!(
        "writer: acknowledged writes from {ACK_THREADS} threads, group commit"
    ));
    let grouped_acks = grouped_acknowledged(&scratch.db("grouped-ack"), window)?;
    b.bar.inc(1);
    b.phase(format!(
        "writer: acknowledged writes from {ACK_THREADS} threads, a transaction each"
    ));
    let per_ack = per_row(&scratch.db("per-row-ack"), window, ACK_THREADS, "FULL")?;
    b.bar.inc(1);

    let postgres = match b.postgres.clone() {
        Some(pg) => Some(postgres_rates(b, &pg, window)?),
        None => None,
    };

    let mut json = json!({
        "log_rows_per_s": grouped.per_s(),
        "log_rows_per_s_transaction_per_row": per_row_log.per_s(),
        "log_rows_per_batch": grouped.per_batch(),
        "acknowledged_per_s": grouped_acks.per_s(),
        "acknowledged_per_s_transaction_each": per_ack.per_s(),
        "acknowledged_per_batch": grouped_acks.per_batch(),
        "busy_errors_transaction_per_row": per_row_log.busy + per_ack.busy,
        "log_threads": LOG_THREADS,
        "acknowledged_threads": ACK_THREADS,
    });
    let mut rows = vec![
        Row::info(
            "request-log rows/s, group commit",
            format!(
                "{:.0} ({:.0} rows a transaction); a transaction per row: {:.0}",
                grouped.per_s(),
                grouped.per_batch(),
                per_row_log.per_s()
            ),
        ),
        Row::info(
            "acknowledged writes/s, synchronous = FULL",
            format!(
                "{:.0} ({:.1} a transaction); a transaction each: {:.0}{}",
                grouped_acks.per_s(),
                grouped_acks.per_batch(),
                per_ack.per_s(),
                busy_note(per_row_log.busy + per_ack.busy)
            ),
        ),
    ];
    if let Some((log, acks)) = postgres {
        json["postgres"] = json!({
            "log_rows_per_s": log.per_s(),
            "log_rows_per_batch": log.per_batch(),
            "acknowledged_per_s": acks.per_s(),
        });
        rows.push(Row::goal(
            "PostgreSQL: request-log rows/s (COPY)",
            format!("{:.0} ({:.0} rows a batch)", log.per_s(), log.per_batch()),
            "≥ 50,000",
            log.per_s() >= 50_000.0,
        ));
        rows.push(Row::goal(
            "PostgreSQL: acknowledged writes/s",
            format!("{:.0} (a transaction each)", acks.per_s()),
            "≥ 1,000",
            acks.per_s() >= 1000.0,
        ));
    }
    Ok(Outcome::new("writer", json, rows))
}

/// Phases the PostgreSQL half adds to the writer scenario.
pub(crate) const POSTGRES_PHASES: u64 = 2;

/// Request-log rows and acknowledged writes per second on PostgreSQL, through the store's API
/// (as a server writes them), in a scratch database made for the run and dropped after it.
fn postgres_rates(
    b: &mut Bench,
    server: &crate::database::Postgres,
    window: Duration,
) -> anyhow::Result<(Rate, Rate)> {
    let scratch = ScratchDatabase::create(server, "writer")?;
    let db = scratch.database();
    b.phase(format!(
        "writer: PostgreSQL request-log rows from {LOG_THREADS} threads"
    ));
    let log = postgres_log_rows(&db, window)?;
    b.bar.inc(1);
    b.phase(format!(
        "writer: PostgreSQL acknowledged writes from {ACK_THREADS} threads"
    ));
    let acks = postgres_acknowledged(&db, window)?;
    b.bar.inc(1);
    Ok((log, acks))
}

/// Rows queued from [`LOG_THREADS`] threads for `window`, timed until the log writer has
/// copied the last of them (it drains its queue at close).
fn postgres_log_rows(db: &crate::database::Database, window: Duration) -> anyhow::Result<Rate> {
    let metrics = Metrics::new();
    let store = store::Store::open(
        db,
        &config(Durability::Full),
        store::Keep::default(),
        metrics.store.clone(),
    )?;
    let queued = AtomicU64::new(0);
    let started = Instant::now();
    run_for(window, LOG_THREADS, |t, stop| {
        let mut i = (t as u64) << 40;
        while !stop.load(Ordering::Relaxed) {
            store.log(sample_row(i));
            i += 1;
            queued.fetch_add(1, Ordering::Relaxed);
        }
    });
    store.close();
    let took = started.elapsed();
    let dropped = metrics.store.log_rows_dropped.get();
    anyhow::ensure!(dropped == 0, "{dropped} log rows were dropped");
    Ok(Rate {
        rows: queued.into_inner(),
        transactions: metrics.store.batch_rows.get_sample_count(),
        took,
        busy: 0,
    })
}

/// Conversations created by [`ACK_THREADS`] threads for `window`, each waiting for its commit.
fn postgres_acknowledged(db: &crate::database::Database, window: Duration) -> anyhow::Result<Rate> {
    let metrics = Metrics::new();
    let mut config = config(Durability::Full);
    config.read_pool = ACK_THREADS;
    let store = store::Store::open(db, &config, store::Keep::default(), metrics.store.clone())?;
    let acked = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let started = Instant::now();
    run_for(window, ACK_THREADS, |_, stop| {
        while !stop.load(Ordering::Relaxed) {
            let conversation = store::conversations::Conversation {
                id: store::new_id("conv"),
                title: Some("bench".into()),
                model: None,
                system: None,
                created_ms: store::now_ms(),
            };
            match store::conversations::create(&store, conversation, None) {
                Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
        }
    });
    let took = started.elapsed();
    store.close();
    let failed = failed.into_inner();
    anyhow::ensure!(failed == 0, "{failed} acknowledged writes failed");
    let rows = acked.into_inner();
    Ok(Rate {
        rows,
        transactions: rows,
        took,
        busy: 0,
    })
}

fn busy_note(busy: u64) -> String {
    if busy == 0 {
        String::new()
    } else {
        format!(" ({busy} SQLITE_BUSY errors)")
    }
}

/// Rows (or writes) committed in a window, and in how many transactions.
struct Rate {
    rows: u64,
    transactions: u64,
    took: Duration,
    busy: u64,
}

impl Rate {
    fn per_s(&self) -> f64 {
        self.rows as f64 / self.took.as_secs_f64().max(1e-9)
    }

    fn per_batch(&self) -> f64 {
        self.rows as f64 / self.transactions.max(1) as f64
    }
}

/// A request-log row as a chat call writes it.
fn sample_row(i: u64) -> RequestRow {
    RequestRow {
        request_id: format!("{i:032x}"),
        ts_ms: store::now_ms(),
        method: "POST".into(),
        route: "/v1/chat/completions".into(),
        model: Some("bench".into()),
        provider: Some("up".into()),
        upstream_model: Some("bench-model".into()),
        attempts: 1,
        status: 200,
        total_ms: 1.25,
        queue_ms: 0.01,
        upstream_ms: 1.1,
        overhead_ms: 0.14,
        prompt_tokens: Some(12),
        completion_tokens: Some(9),
        ..RequestRow::default()
    }
}

fn config(durability: Durability) -> StoreConfig {
    StoreConfig {
        read_pool: 1,
        write_queue: 1024,
        log_queue: 10_000,
        // The producers outrun any disk: they wait for room rather than drop.
        log_overflow: LogOverflow::Block(Duration::from_secs(60)),
        log_flush: Duration::from_millis(10),
        batch_max: 1000,
        durability,
    }
}

/// Runs `threads` copies of `work(thread index, stop flag)` for `window`.
fn run_for(window: Duration, threads: usize, work: impl Fn(usize, &AtomicBool) + Sync) {
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        for t in 0..threads {
            let (work, stop) = (&work, &stop);
            scope.spawn(move || work(t, stop));
        }
        thread::sleep(window);
        stop.store(true, Ordering::Relaxed);
    });
}

fn grouped_log_rows(db: &Path, window: Duration) -> anyhow::Result<Rate> {
    let (conn, _) = store::sqlite::open_migrated(db)?;
    let metrics = Metrics::new();
    let writer = Writer::spawn(conn, &config(Durability::Full), metrics.store.clone())?;
    let next = AtomicU64::new(0);
    let started = Instant::now();
    run_for(window, LOG_THREADS, |_, stop| {
        while !stop.load(Ordering::Relaxed) {
            writer.log(sample_row(next.fetch_add(1, Ordering::Relaxed)));
        }
    });
    // Everything sent is committed before the clock stops.
    writer.close();
    let took = started.elapsed();
    let dropped = metrics.store.log_rows_dropped.get();
    anyhow::ensure!(dropped == 0, "the writer dropped {dropped} rows");
    Ok(Rate {
        rows: count(db, "requests")?,
        transactions: metrics.store.batch_rows.get_sample_count(),
        took,
        busy: 0,
    })
}

fn grouped_acknowledged(db: &Path, window: Duration) -> anyhow::Result<Rate> {
    let (conn, _) = store::sqlite::open_migrated(db)?;
    let metrics = Metrics::new();
    let writer = Writer::spawn(conn, &config(Durability::Full), metrics.store.clone())?;
    let next = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let started = Instant::now();
    run_for(window, ACK_THREADS, |_, stop| {
        while !stop.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let row = sample_row(i);
            let outcome = writer.write(Box::new(move |c: &Connection| {
                crate::store::sqlite::requests::insert(c, std::slice::from_ref(&row))
            }));
            if outcome.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let took = started.elapsed();
    writer.close();
    let failed = failed.into_inner();
    anyhow::ensure!(failed == 0, "{failed} acknowledged writes failed");
    Ok(Rate {
        rows: count(db, "requests")?,
        transactions: metrics.store.batch_rows.get_sample_count(),
        took,
        busy: 0,
    })
}

/// The design the writer replaces: every thread on its own connection, one transaction per
/// row, all fighting for SQLite's one write lock (waiting in its busy handler).
fn per_row(db: &Path, window: Duration, threads: usize, synchronous: &str) -> anyhow::Result<Rate> {
    drop(store::sqlite::open_migrated(db)?);
    let busy = AtomicU64::new(0);
    let next = AtomicU64::new(0);
    let started = Instant::now();
    run_for(window, threads, |_, stop| {
        let Ok(mut conn) = Connection::open(db) else {
            return;
        };
        if conn.busy_timeout(Duration::from_secs(5)).is_err()
            || conn
                .pragma_update(None, "synchronous", synchronous)
                .is_err()
        {
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            let row = sample_row(next.fetch_add(1, Ordering::Relaxed));
            let done = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .and_then(|tx| {
                    crate::store::sqlite::requests::insert(&tx, std::slice::from_ref(&row))?;
                    tx.commit()
                });
            if done.is_err() {
                busy.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let took = started.elapsed();
    let rows = count(db, "requests")?;
    Ok(Rate {
        rows,
        transactions: rows,
        took,
        busy: busy.into_inner(),
    })
}

fn count(db: &Path, table: &str) -> anyhow::Result<u64> {
    let conn = Connection::open(db)?;
    let n: i64 = conn.query_row(&format!("SELECT count(*) FROM {table}"), params![], |r| {
        r.get(0)
    })?;
    Ok(n as u64)
}

/// A directory for the scenario's databases, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        let dir =
            std::env::temp_dir().join(format!("syncgate-bench-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn db(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.db"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
