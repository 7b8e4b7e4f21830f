//! Everything syncgate remembers: the request log, conversations, API keys and background
//! jobs, in an embedded SQLite file (the default) or on a PostgreSQL server shared by several
//! instances. The rest of the code asks the family modules (`store::jobs`, …) with a `&Store`
//! and never knows which backend answers: each family function picks the backend's SQL,
//! `sqlite/<family>.rs` or `postgres/<family>.rs`.

pub(crate) mod chunks;
pub(crate) mod conversations;
pub(crate) mod files;
pub(crate) mod instances;
pub(crate) mod jobs;
pub(crate) mod keys;
pub(crate) mod limits;
pub(crate) mod postgres;
pub(crate) mod requests;
mod retention;
pub(crate) mod sqlite;
pub(crate) mod usage;
pub(crate) mod vector_stores;

use std::sync::Arc;

use crate::config::StoreConfig;
use crate::database::Database;
use crate::metrics::StoreMetrics;
pub(crate) use retention::Keep;
pub(crate) use sqlite::writer::Writer;

/// A page of a list, and whether more follow it.
#[derive(Debug)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    pub(crate) has_more: bool,
}

/// Keeps the first `limit` items; one more was fetched to tell whether more follow.
pub(crate) fn page<T>(mut items: Vec<T>, limit: u32) -> Page<T> {
    let has_more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Page { items, has_more }
}

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

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.backend() {
            Backend::Sqlite(_) => "Store(sqlite)",
            Backend::Postgres(_) => "Store(postgres)",
        })
    }
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
    use crate::metrics::{Metrics, StoreMetrics};
    use crate::store::postgres::tls;

    /// A fresh database, not opened yet (for tests of what opening does: migrations), removed
    /// on drop. [`TempDb::open`] opens a store on it.
    pub(crate) struct TempDb {
        db: Database,
        place: Place,
    }

    enum Place {
        File(std::path::PathBuf),
        Server { admin: Postgres, name: String },
    }

    impl TempDb {
        /// What `--db` would name.
        pub(crate) fn database(&self) -> &Database {
            &self.db
        }

        /// Opens a store on it, migrating it, with nothing expiring.
        pub(crate) fn open(self) -> TempStore {
            let metrics = Metrics::new().store;
            let store = Store::open(
                &self.db,
                &Config::default().store,
                Keep::default(),
                metrics.clone(),
            )
            .expect("a store on the test database");
            TempStore {
                store,
                metrics,
                db: self,
            }
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            match &self.place {
                Place::File(path) => {
                    for suffix in ["", "-wal", "-shm"] {
                        let mut p = path.as_os_str().to_owned();
                        p.push(suffix);
                        let _ = std::fs::remove_file(p);
                    }
                }
                Place::Server { admin, name } => {
                    let tls = tls::connector(admin).expect("a TLS connector");
                    if let Ok(mut c) = admin.config.connect(tls) {
                        let _ = c.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"));
                    }
                }
            }
        }
    }

    /// A store on a fresh database, closed and removed on drop.
    pub(crate) struct TempStore {
        pub(crate) store: Store,
        /// The store's metrics (shared handles: what the store counts shows here).
        pub(crate) metrics: StoreMetrics,
        // Dropped after the store is closed.
        db: TempDb,
    }

    impl TempStore {
        /// What `--db` would name.
        pub(crate) fn database(&self) -> &Database {
            self.db.database()
        }

        /// Closes the store and opens the same database again, deleting from the start what
        /// `keep` says is old.
        pub(crate) fn reopen(&mut self, keep: Keep) {
            self.store.close();
            self.metrics = Metrics::new().store;
            self.store = Store::open(
                &self.db.db,
                &Config::default().store,
                keep,
                self.metrics.clone(),
            )
            .expect("the store again");
        }
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
        }
    }

    /// Asserts one backend's migrations are numbered 1, 2, … without gaps, each named
    /// `NNNN_…` after its number, and are exactly the `.sql` files of `migrations/<dir>/`.
    pub(crate) fn assert_migrations_match_files(dir: &str, migrations: &[(i64, &str)]) {
        for (i, (number, name)) in migrations.iter().enumerate() {
            assert_eq!(*number, i as i64 + 1, "{name}");
            assert!(name.starts_with(&format!("{number:04}_")), "{name}");
        }
        let path = format!("{}/migrations/{dir}", env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<String> = migrations.iter().map(|m| format!("{}.sql", m.1)).collect();
        assert_eq!(
            files, embedded,
            "every file in migrations/{dir}/ is embedded, in order"
        );
    }

    /// A fresh SQLite file (none yet: SQLite makes it when it is first opened).
    pub(crate) fn sqlite_db(name: &str) -> TempDb {
        let path = std::env::temp_dir().join(format!(
            "syncgate-store-{name}-{}-{}.db",
            std::process::id(),
            fastrand::u64(..)
        ));
        TempDb {
            db: Database::Sqlite(path.clone()),
            place: Place::File(path),
        }
    }

    /// A store on a fresh SQLite file.
    pub(crate) fn open(name: &str) -> TempStore {
        sqlite_db(name).open()
    }

    /// A fresh store on every backend this run can reach.
    pub(crate) fn stores(name: &str) -> Vec<TempStore> {
        let mut all = vec![open(name)];
        all.extend(postgres_db(name).map(TempDb::open));
        all
    }

    /// Registers instance `id` with a lease of `lease_ms` (PostgreSQL), for tests of what
    /// instances do; returns the id.
    pub(crate) fn register_instance(store: &Store, id: &str, lease_ms: i64) -> String {
        use crate::store::instances::{self, NewInstance};
        let new = NewInstance {
            id: id.into(),
            host: "h".into(),
            listen: "127.0.0.1:1".into(),
            version: "t".into(),
        };
        let mut own = instances::connection(store, std::time::Duration::from_secs(5)).unwrap();
        instances::register(&mut own, &new, lease_ms).unwrap();
        id.to_string()
    }

    /// Inserts a key made from `new`; returns its id.
    pub(crate) fn insert_key(store: &Store, new: crate::store::keys::NewKey) -> i64 {
        use crate::store::keys;
        keys::insert(store, keys::make(new, 1).unwrap().stored).unwrap()
    }

    /// A fresh, empty PostgreSQL database when `SYNCGATE_TEST_POSTGRES_URL` names a server;
    /// `None` (with one line on stderr) when it does not and the run need not test everything.
    pub(crate) fn postgres_db(name: &str) -> Option<TempDb> {
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
        let tls = tls::connector(&server).expect("a TLS connector");
        let mut admin = server.config.connect(tls).expect("the test server");
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .expect("a fresh database");
        let mut fresh = server.clone();
        fresh.config.dbname(&db_name);
        Some(TempDb {
            db: Database::Postgres(fresh),
            place: Place::Server {
                admin: server,
                name: db_name,
            },
        })
    }

    /// The rows each backend's migration tests write into an older schema, in its own SQL:
    /// a logged call `req-old` (model `m`, status 200, at 1,000 ms), conversation `conv_old`
    /// (title `old`) with the user message `msg_old` (`hello`), and, from the version that has
    /// their tables, the key `old-key` (hash of 32 sevens) and the jobs `job_old_done`
    /// (succeeded at 1 ms with result `{"id":"x"}`) and `job_old_queued`.
    pub(crate) struct Seeded {
        pub(crate) keys: bool,
        pub(crate) jobs: bool,
    }

    /// Checks, through the family functions, that a database seeded as [`Seeded`] and then
    /// migrated to the latest schema kept every row, and that the latest schema works:
    /// finished jobs expire, old and new alike, and queued ones stay.
    pub(crate) fn assert_seeded_rows_kept(store: &Store, seeded: Seeded) {
        use super::{conversations, jobs, keys, requests};
        let filter = requests::Filter {
            limit: 10,
            ..requests::Filter::default()
        };
        let logged = requests::list(store, &filter).unwrap().rows;
        let calls: Vec<_> = logged
            .iter()
            .map(|l| {
                (
                    l.row.request_id.as_str(),
                    l.row.model.as_deref(),
                    l.row.status,
                )
            })
            .collect();
        assert_eq!(calls, [("req-old", Some("m"), 200)]);
        let conv = conversations::get(store, "conv_old").unwrap();
        assert_eq!(conv.and_then(|c| c.title).as_deref(), Some("old"));
        let messages = conversations::messages(store, "conv_old", 10, None)
            .unwrap()
            .unwrap()
            .items;
        let texts: Vec<_> = messages
            .iter()
            .map(|m| (m.id.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(texts, [("msg_old", "hello")]);
        let names: Vec<_> = keys::all(store)
            .unwrap()
            .into_iter()
            .map(|k| (k.name, k.hash))
            .collect();
        let want_keys = if seeded.keys {
            vec![("old-key".to_string(), [7u8; 32])]
        } else {
            Vec::new()
        };
        assert_eq!(names, want_keys);
        if seeded.jobs {
            let done = jobs::get(store, "job_old_done").unwrap().unwrap();
            assert_eq!(
                (done.status, done.result, done.finished_ms),
                (
                    jobs::Status::Succeeded,
                    Some(serde_json::json!({"id": "x"})),
                    Some(1)
                )
            );
            let queued = jobs::get(store, "job_old_queued").unwrap().unwrap();
            assert_eq!(queued.status, jobs::Status::Queued);
        }
        let new = jobs::NewJob {
            id: "job_new".into(),
            request: serde_json::json!({"model": "m", "messages": []}),
            metadata: None,
            model: "m".into(),
            max_attempts: 1,
            idempotency_key: None,
            key_id: None,
            created_ms: 1,
            kind: jobs::JobKind::Chat,
        };
        jobs::submit(store, new, 100).unwrap();
        assert_eq!(
            jobs::cancel(store, "job_new".into(), 1).unwrap(),
            jobs::Cancelled::Now
        );
        let finished = 1 + usize::from(seeded.jobs);
        assert_eq!(jobs::expire(store, 2, 10).unwrap(), finished);
        assert!(jobs::get(store, "job_new").unwrap().is_none());
        if seeded.jobs {
            assert!(jobs::get(store, "job_old_queued").unwrap().is_some());
        }
    }
}
