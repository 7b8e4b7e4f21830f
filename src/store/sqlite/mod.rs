//! The SQLite backend: one file in WAL mode, so readers never wait for the writer; reads go
//! through an r2d2 pool of explicit size; every write goes through the one [`Writer`] thread.
//! Its SQL is one file per table family. Only `store` calls it (and the store bench, which
//! measures SQLite itself): the rest of the code asks `store::jobs` and its siblings.

pub(super) mod chunks;
pub(super) mod conversations;
pub(super) mod files;
pub(super) mod jobs;
pub(super) mod keys;
pub(crate) mod migrate;
pub(crate) mod requests;
pub(super) mod usage;
pub(super) mod vector_stores;
pub(crate) mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use r2d2::PooledConnection;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};

use super::retention::{Expire, Keep, Retention, Rows};
use super::StoreError;
use crate::config::StoreConfig;
use crate::metrics::StoreMetrics;
use writer::Writer;

/// How long a connection waits for a lock before SQLITE_BUSY: only another process (a
/// `syncgate migrate`, a backup) can hold one, since this one writes from one thread.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free read connection.
const READ_WAIT: Duration = Duration::from_secs(5);

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

/// The open file: the read pool, the writer, and the retention thread if rows expire.
pub(crate) struct Sqlite {
    reads: r2d2::Pool<SqliteConnectionManager>,
    writer: Arc<Writer>,
    retention: Option<Retention>,
    metrics: StoreMetrics,
    /// The file, exclusively `flock`ed by this process while it is open, when no other
    /// process holding the store had it first (see [`Sqlite::owns_file`]); let go at close.
    owner: std::sync::Mutex<Option<std::fs::File>>,
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

impl Sqlite {
    /// Opens the file, applies migrations and starts the writer and, when `keep` lets
    /// anything expire, the thread that deletes request-log rows and finished jobs older than
    /// it keeps them.
    pub(crate) fn open(
        path: &Path,
        config: &StoreConfig,
        keep: Keep,
        metrics: StoreMetrics,
    ) -> anyhow::Result<Sqlite> {
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
        let expire: Expire = {
            let writer = Arc::clone(&writer);
            Box::new(move |rows, cutoff_ms, limit| {
                writer.call(move |c| match rows {
                    Rows::Log => requests::expire(c, cutoff_ms, limit),
                    Rows::Jobs => jobs::expire(c, cutoff_ms, limit),
                })
            })
        };
        let retention = Retention::spawn(expire, keep, metrics.clone())
            .context("cannot start the retention thread")?;
        Ok(Sqlite {
            reads,
            writer,
            retention,
            metrics,
            owner: std::sync::Mutex::new(lock_exclusively(path)),
        })
    }

    /// Whether this process is the only one holding the store open on this file (a second
    /// `serve` on the same file, or a store bench, would not be): then nothing else can be
    /// running its jobs. `syncgate keys`, `migrate` and `usage` never take the lock.
    pub(crate) fn owns_file(&self) -> bool {
        self.owner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// A read connection from the pool; waits at most a few seconds for one.
    pub(crate) fn read(&self) -> Result<Reader, StoreError> {
        let conn = self.reads.get().map_err(|_| StoreError::Busy)?;
        self.metrics.reads_in_use.inc();
        Ok(Reader {
            conn,
            metrics: self.metrics.clone(),
            taken: Instant::now(),
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
    pub(crate) fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Stops deleting old rows, commits what is queued and stops the writer.
    pub(crate) fn close(&self) {
        if let Some(retention) = &self.retention {
            retention.stop();
        }
        self.writer.close();
        self.owner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// The file, with an exclusive `flock` taken without waiting; `None` when another process
/// holds it (or the file cannot be opened again). The lock goes with the descriptor: at close,
/// or when the process dies, kill -9 included. flock and SQLite's own fcntl locks do not
/// meet on Linux, so this never blocks a read or a write.
fn lock_exclusively(path: &Path) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: flock on a descriptor we own, for as long as `file` lives.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(file)
}

/// A pooled read connection; counted in `syncgate_store_read_connections_in_use`.
pub(crate) struct Reader {
    conn: PooledConnection<SqliteConnectionManager>,
    metrics: StoreMetrics,
    taken: Instant,
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
