//! Everything syncgate remembers, in one SQLite file: the request log, conversations, API
//! keys and background jobs. WAL mode, so readers never wait for the writer; reads go through
//! an r2d2 pool of explicit size; every write goes through the one [`Writer`] thread.

pub(crate) mod conversations;
pub(crate) mod jobs;
pub(crate) mod keys;
pub(crate) mod requests;
pub(crate) mod sqlite;
pub(crate) mod usage;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use r2d2::PooledConnection;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};

use crate::config::StoreConfig;
use crate::metrics::StoreMetrics;
use sqlite::migrate;
use sqlite::retention::Retention;
pub(crate) use sqlite::writer::Writer;

/// How long a connection waits for a lock before SQLITE_BUSY: only another process (a
/// `syncgate migrate`, a backup) can hold one, since this one writes from one thread.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free read connection.
const READ_WAIT: Duration = Duration::from_secs(5);

/// Why a store operation failed. Never carries a row's content.
#[derive(Debug, Clone)]
pub(crate) enum StoreError {
    /// The writer's queue or the read pool stayed full.
    Busy,
    /// The store is shutting down.
    Closed,
    /// The database refused: a constraint, I/O, a full disk.
    Failed(String),
    /// The database refused a row whose unique key another row has (an idempotent repeat
    /// that raced its twin); told apart by the database's error code, not its message.
    Duplicate(String),
}

impl StoreError {
    /// Whether the database refused for a uniqueness constraint (an idempotent repeat's race).
    pub(crate) fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Duplicate(_))
    }

    /// The `kind` label of `syncgate_store_errors_total`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            StoreError::Busy => "busy",
            StoreError::Closed => "closed",
            StoreError::Failed(_) | StoreError::Duplicate(_) => "failed",
        }
    }

    /// The error's `code` in answers: an HTTP error body or a stream's final error event.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            StoreError::Busy => "store_busy",
            StoreError::Closed => "draining",
            StoreError::Failed(_) | StoreError::Duplicate(_) => "store_error",
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Busy => write!(f, "the database is busy"),
            StoreError::Closed => write!(f, "the database is closed"),
            StoreError::Failed(why) | StoreError::Duplicate(why) => {
                write!(f, "database error: {why}")
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        let duplicate = matches!(
            &e,
            rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        );
        if duplicate {
            StoreError::Duplicate(e.to_string())
        } else {
            StoreError::Failed(e.to_string())
        }
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(_: r2d2::Error) -> StoreError {
        StoreError::Busy
    }
}

/// The open database: the read pool, the writer, and the retention thread if rows expire. A
/// cheap handle: clones share them (a stream keeps its turn after its handler returned).
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    reads: r2d2::Pool<SqliteConnectionManager>,
    writer: Arc<Writer>,
    retention: Option<Retention>,
    metrics: StoreMetrics,
}

/// Settings every connection gets. WAL is a property of the file, set once at open.
fn prepare(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// Opens (creating if needed) and migrates the database file for `syncgate migrate`,
/// `usage` and `serve`.
pub(crate) fn open_migrated(path: &Path) -> anyhow::Result<(Connection, migrate::Migrated)> {
    let mut conn = Connection::open(path)
        .with_context(|| format!("cannot open the database {}", path.display()))?;
    prepare(&conn)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .with_context(|| format!("cannot use the database {}", path.display()))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!(
            "the database {} cannot use WAL mode (got {mode}); is it on a network filesystem?",
            path.display()
        );
    }
    let migrated = migrate::migrate(&mut conn)
        .with_context(|| format!("cannot migrate the database {}", path.display()))?;
    Ok((conn, migrated))
}

/// Opens an existing database read-only, refusing one from a newer syncgate.
pub(crate) fn open_read_only(path: &Path) -> anyhow::Result<Connection> {
    // SQLite would say only "unable to open database file".
    if !path.is_file() {
        anyhow::bail!("no database at {}", path.display());
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open the database {}", path.display()))?;
    prepare(&conn)?;
    let version = migrate::version(&conn)?;
    migrate::check_not_newer(version)?;
    if version == 0 {
        anyhow::bail!(
            "{} holds no syncgate data (run `syncgate migrate --db {}` or start the server)",
            path.display(),
            path.display()
        );
    }
    Ok(conn)
}

impl Store {
    /// Opens the file, applies migrations and starts the writer and, when `retention_days`
    /// is above 0, the thread that deletes request-log rows older than that.
    pub(crate) fn open(
        path: &Path,
        config: &StoreConfig,
        retention_days: u64,
        metrics: StoreMetrics,
    ) -> anyhow::Result<Store> {
        let (conn, migrated) = open_migrated(path)?;
        if migrated.from != migrated.to {
            log::info!(
                "database {} schema {} -> {}",
                path.display(),
                migrated.from,
                migrated.to
            );
        }
        let manager = SqliteConnectionManager::file(path).with_init(|c| {
            prepare(c)?;
            // Reads only: a bug here cannot write behind the writer's back.
            c.pragma_update(None, "query_only", "ON")
        });
        let reads = r2d2::Pool::builder()
            .max_size(config.read_pool as u32)
            .min_idle(Some(1))
            .connection_timeout(READ_WAIT)
            .build(manager)
            .with_context(|| format!("cannot open read connections to {}", path.display()))?;
        let writer = Arc::new(
            Writer::spawn(conn, config, metrics.clone())
                .context("cannot start the database writer")?,
        );
        let retention = (retention_days > 0)
            .then(|| Retention::spawn(Arc::clone(&writer), retention_days, metrics.clone()))
            .transpose()
            .context("cannot start the retention thread")?;
        Ok(Store {
            inner: Arc::new(Inner {
                reads,
                writer,
                retention,
                metrics,
            }),
        })
    }

    /// A read connection from the pool; waits at most a few seconds for one.
    pub(crate) fn read(&self) -> Result<Reader, StoreError> {
        let conn = self.inner.reads.get()?;
        self.inner.metrics.reads_in_use.inc();
        Ok(Reader {
            conn,
            metrics: self.inner.metrics.clone(),
            taken: std::time::Instant::now(),
        })
    }

    /// Runs `read` on a pooled read connection and hands back what it found.
    pub(crate) fn query<T>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let conn = self.read()?;
        Ok(read(&conn)?)
    }

    /// The one writer: every write goes through it.
    fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// Queues a request-log row; it never waits longer than `[store] log_overflow` allows, and
    /// a row that finds no room is dropped and counted.
    pub(crate) fn log(&self, row: requests::RequestRow) {
        self.writer().log(row);
    }

    /// Sets the gauges read at scrape time.
    pub(crate) fn observe(&self) {
        self.inner
            .metrics
            .queue_depth
            .set(self.writer().queue_depth() as i64);
    }

    /// Stops deleting old rows, commits what is queued and stops the writer (at shutdown).
    pub(crate) fn close(&self) {
        if let Some(retention) = &self.inner.retention {
            retention.stop();
        }
        self.writer().close();
    }
}

/// A pooled read connection; counted in `syncgate_store_read_connections_in_use`.
pub(crate) struct Reader {
    conn: PooledConnection<SqliteConnectionManager>,
    metrics: StoreMetrics,
    taken: std::time::Instant,
}

impl std::ops::Deref for Reader {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.metrics.reads_in_use.dec();
        self.metrics
            .read_seconds
            .observe(self.taken.elapsed().as_secs_f64());
    }
}

/// Joins the thread kept in `slot` the first time it is called; later calls do nothing.
fn join_once(slot: &std::sync::Mutex<Option<std::thread::JoinHandle<()>>>) {
    let thread = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(thread) = thread {
        let _ = thread.join();
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A stored object's id with a prefix, `conv_…`, `msg_…`: a random (v4) UUID from the
/// operating system's generator, since ids of stored data must not be guessable.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A store for the store's own behaviour tests: written once against `&Store`, so that they
/// run against every backend the store has.
#[cfg(test)]
pub(crate) mod testing {
    use super::Store;
    use crate::config::Config;
    use crate::metrics::Metrics;

    /// A store on a fresh SQLite file, closed and removed (with its WAL) on drop.
    pub(crate) struct TempStore {
        pub(crate) store: Store,
        path: std::path::PathBuf,
    }

    impl std::ops::Deref for TempStore {
        type Target = Store;
        fn deref(&self) -> &Store {
            &self.store
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            self.store.close();
            for suffix in ["", "-wal", "-shm"] {
                let mut p = self.path.as_os_str().to_owned();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    pub(crate) fn open(name: &str) -> TempStore {
        let path = std::env::temp_dir().join(format!(
            "syncgate-store-{name}-{}-{}.db",
            std::process::id(),
            fastrand::u64(..)
        ));
        let store = Store::open(&path, &Config::default().store, 0, Metrics::new().store)
            .expect("a fresh store");
        TempStore { store, path }
    }
}
