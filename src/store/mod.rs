//! Everything syncgate remembers: the request log, conversations, API keys and background
//! jobs, in an embedded SQLite file (the default) or on a PostgreSQL server shared by several
//! instances. The rest of the code asks the family modules (`store::jobs`, …) with a `&Store`
//! and never knows which backend answers: each family function picks the backend's SQL,
//! `sqlite/<family>.rs` or `postgres/<family>.rs`.

pub(crate) mod conversations;
pub(crate) mod jobs;
pub(crate) mod keys;
pub(crate) mod postgres;
pub(crate) mod requests;
mod retention;
pub(crate) mod sqlite;
pub(crate) mod usage;

use std::sync::Arc;

use crate::config::StoreConfig;
use crate::database::Database;
use crate::metrics::StoreMetrics;
pub(crate) use retention::Keep;
pub(crate) use sqlite::writer::Writer;

/// Why a store operation failed. Never carries a row's content.
#[derive(Debug, Clone)]
pub(crate) enum StoreError {
    /// The writer's queue or the read pool stayed full.
    Busy,
    /// The store is shutting down.
    Closed,
    /// The database server cannot be reached (PostgreSQL down or cut off); calls fail at once
    /// until a probe reaches it again.
    Unavailable,
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
            StoreError::Unavailable => "unavailable",
            StoreError::Failed(_) | StoreError::Duplicate(_) => "failed",
        }
    }

    /// The error's `code` in answers: an HTTP error body or a stream's final error event.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            StoreError::Busy => "store_busy",
            StoreError::Closed => "draining",
            StoreError::Unavailable => "store_unavailable",
            StoreError::Failed(_) | StoreError::Duplicate(_) => "store_error",
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Busy => write!(f, "the database is busy"),
            StoreError::Closed => write!(f, "the database is closed"),
            StoreError::Unavailable => write!(f, "the database cannot be reached"),
            StoreError::Failed(why) | StoreError::Duplicate(why) => {
                write!(f, "database error: {why}")
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl From<r2d2::Error> for StoreError {
    fn from(_: r2d2::Error) -> StoreError {
        StoreError::Busy
    }
}

/// The open database, whichever backend it is. A cheap handle: clones share it (a stream
/// keeps its turn after its handler returned).
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    metrics: StoreMetrics,
}

/// The backend behind a store; every family function matches on it.
// One per process, behind the store's Arc: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Pg),
}

impl Store {
    /// Opens the database `db` names, applies migrations and starts its writer and, when
    /// `keep` lets anything expire, the thread that deletes request-log rows and finished jobs
    /// older than it keeps them.
    pub(crate) fn open(
        db: &Database,
        config: &StoreConfig,
        keep: Keep,
        metrics: StoreMetrics,
    ) -> anyhow::Result<Store> {
        let backend = match db {
            Database::Sqlite(path) => {
                Backend::Sqlite(sqlite::Sqlite::open(path, config, keep, metrics.clone())?)
            }
            Database::Postgres(pg) => {
                Backend::Postgres(postgres::Pg::open(pg, config, keep, metrics.clone())?)
            }
        };
        Ok(Store {
            inner: Arc::new(Inner { backend, metrics }),
        })
    }

    /// The backend, for the family functions.
    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// Queues a request-log row; it never waits longer than `[store] log_overflow` allows, and
    /// a row that finds no room is dropped and counted.
    pub(crate) fn log(&self, row: requests::RequestRow) {
        match self.backend() {
            Backend::Sqlite(db) => db.writer().log(row),
            Backend::Postgres(db) => db.log(row),
        }
    }

    /// Whether the database answered its last probe (SQLite, a local file, always does): what
    /// `/readyz` reports, read without touching the database.
    pub(crate) fn is_available(&self) -> bool {
        match self.backend() {
            Backend::Sqlite(_) => true,
            Backend::Postgres(db) => db.is_available(),
        }
    }

    /// Rows and writes waiting for the writer (on PostgreSQL, request-log rows waiting for the
    /// log writer).
    pub(crate) fn queue_depth(&self) -> usize {
        match self.backend() {
            Backend::Sqlite(db) => db.writer().queue_depth(),
            Backend::Postgres(db) => db.queue_depth(),
        }
    }

    /// Sets the gauges read at scrape time.
    pub(crate) fn observe(&self) {
        self.inner
            .metrics
            .queue_depth
            .set(self.queue_depth() as i64);
    }

    /// Stops deleting old rows, writes what is queued and stops the writer (at shutdown).
    pub(crate) fn close(&self) {
        match self.backend() {
            Backend::Sqlite(db) => db.close(),
            Backend::Postgres(db) => db.close(),
        }
    }
}

/// Creates or updates the schema, for `syncgate migrate`: the versions before and after.
pub(crate) fn migrate(db: &Database) -> anyhow::Result<(i64, i64)> {
    match db {
        Database::Sqlite(path) => {
            let (_, m) = sqlite::open_migrated(path)?;
            Ok((i64::from(m.from), i64::from(m.to)))
        }
        Database::Postgres(pg) => {
            let m = postgres::open_migrated(pg)?;
            Ok((i64::from(m.from), i64::from(m.to)))
        }
    }
}

/// A background thread of the store (retention, the PostgreSQL probe and log writer) that runs
/// until told to stop: [`Background::stop`] drops the sender of the receiver the thread waits
/// on, which ends its waits at once, then joins it.
pub(crate) struct Background {
    stop: std::sync::Mutex<Option<crossbeam_channel::Sender<()>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Background {
    /// Starts `run` on a thread named `name`; it receives the stop signal's receiver.
    pub(crate) fn spawn(
        name: &str,
        run: impl FnOnce(crossbeam_channel::Receiver<()>) + Send + 'static,
    ) -> std::io::Result<Background> {
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(stopped))?;
        Ok(Background {
            stop: std::sync::Mutex::new(Some(stop)),
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Tells the thread to stop and waits for it. Idempotent.
    pub(crate) fn stop(&self) {
        drop(
            self.stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        join_once(&self.thread);
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

/// Sends a request-log row to a backend's log queue; never waits longer than the overflow
/// policy allows. A row that finds no room (or a writer that has stopped) is dropped and
/// counted.
fn queue_log_row(
    logs: &crossbeam_channel::Sender<requests::RequestRow>,
    overflow: crate::config::LogOverflow,
    metrics: &StoreMetrics,
    row: requests::RequestRow,
) {
    use crossbeam_channel::TrySendError;
    let sent = match overflow {
        crate::config::LogOverflow::Drop => logs.try_send(row).map_err(drop),
        crate::config::LogOverflow::Block(bound) => match logs.try_send(row) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(row)) => logs.send_timeout(row, bound).map_err(drop),
            Err(TrySendError::Disconnected(_)) => Err(()),
        },
    };
    if sent.is_err() {
        metrics.log_rows_dropped.inc();
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

/// Stores for the store's own behaviour tests, written once against `&Store` and run against
/// every backend: a fresh SQLite file, and a fresh PostgreSQL database when
/// `SYNCGATE_TEST_POSTGRES_URL` names a server (`scripts/test` starts one). Without it a run
/// that must test everything (`CI`, `SYNCGATE_REQUIRE_ALL=1`) fails; any other skips
/// PostgreSQL with one line.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::Write;

    use super::{Keep, Store};
    use crate::config::Config;
    use crate::database::{Database, Postgres};
    use crate::metrics::Metrics;

    /// A store on a fresh database, closed and removed on drop.
    pub(crate) struct TempStore {
        pub(crate) store: Store,
        db: Database,
        place: Place,
    }

    impl TempStore {
        /// Closes the store and opens the same database again, deleting from the start what
        /// `keep` says is old.
        pub(crate) fn reopen(&mut self, keep: Keep) {
            self.store.close();
            self.store = Store::open(
                &self.db,
                &Config::default().store,
                keep,
                Metrics::new().store,
            )
            .expect("the store again");
        }
    }

    enum Place {
        File(std::path::PathBuf),
        Server {
            admin: Box<postgres::Config>,
            name: String,
        },
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
            match &self.place {
                Place::File(path) => {
                    for suffix in ["", "-wal", "-shm"] {
                        let mut p = path.as_os_str().to_owned();
                        p.push(suffix);
                        let _ = std::fs::remove_file(p);
                    }
                }
                Place::Server { admin, name } => {
                    if let Ok(mut c) = admin.connect(postgres::NoTls) {
                        let _ = c.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"));
                    }
                }
            }
        }
    }

    fn open_at(db: &Database) -> Store {
        Store::open(
            db,
            &Config::default().store,
            Keep::default(),
            Metrics::new().store,
        )
        .expect("a fresh store")
    }

    /// A store on a fresh SQLite file.
    pub(crate) fn open(name: &str) -> TempStore {
        let path = std::env::temp_dir().join(format!(
            "syncgate-store-{name}-{}-{}.db",
            std::process::id(),
            fastrand::u64(..)
        ));
        let db = Database::Sqlite(path.clone());
        TempStore {
            store: open_at(&db),
            db,
            place: Place::File(path),
        }
    }

    /// A fresh store on every backend this run can reach.
    pub(crate) fn stores(name: &str) -> Vec<TempStore> {
        let mut all = vec![open(name)];
        all.extend(postgres_store(name));
        all
    }

    fn postgres_store(name: &str) -> Option<TempStore> {
        let Some(url) = std::env::var("SYNCGATE_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            let must = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
                || std::env::var("SYNCGATE_REQUIRE_ALL").is_ok_and(|v| v == "1");
            assert!(
                !must,
                "PostgreSQL is missing: SYNCGATE_TEST_POSTGRES_URL is not set (./scripts/test \
                 starts a cluster and sets it)"
            );
            let _ = writeln!(
                std::io::stderr(),
                "skipped the PostgreSQL half of store test {name}: SYNCGATE_TEST_POSTGRES_URL \
                 is not set; ./scripts/test sets up everything the tests need"
            );
            return None;
        };
        let Ok(Database::Postgres(server)) = Database::parse(&url) else {
            panic!("SYNCGATE_TEST_POSTGRES_URL is not a PostgreSQL URL");
        };
        let db_name = format!("sg_unit_{}_{}", std::process::id(), fastrand::u64(..));
        let mut admin = server
            .config
            .connect(postgres::NoTls)
            .expect("the test server");
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .expect("a fresh database");
        let mut config = server.config.clone();
        config.dbname(&db_name);
        let db = Database::Postgres(Postgres { config });
        Some(TempStore {
            store: open_at(&db),
            db,
            place: Place::Server {
                admin: server.config,
                name: db_name,
            },
        })
    }
}
