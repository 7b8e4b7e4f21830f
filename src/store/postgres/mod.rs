//! The PostgreSQL backend, for several instances sharing one database. Reads and acknowledged
//! writes run on an r2d2 pool of blocking `postgres` clients, a write in its own transaction,
//! answered after its COMMIT (PostgreSQL takes concurrent writers itself). Request-log rows go
//! to one log-writer thread that copies them in batches. Every call is bounded: a connect
//! timeout, keepalives and a statement timeout on each connection (`database.rs`), and the
//! pool's checkout timeout. Its SQL is one file per table family, like SQLite's.
//! Choices and figures: docs/decisions/0003-postgresql-store.md.

pub(super) mod chunks;
pub(super) mod conversations;
pub(super) mod files;
pub(super) mod instances;
pub(super) mod jobs;
pub(super) mod keys;
pub(super) mod limits;
pub(crate) mod migrate;
mod own;
mod probe;
pub(super) mod requests;
mod session;
pub(crate) mod tls;
pub(super) mod usage;
pub(super) mod vector_stores;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use postgres::error::SqlState;
use postgres::Client;

pub(crate) use own::Own;
pub(crate) use session::{Prepared, Session, Tx};

use super::requests::RequestRow;
use super::retention::{Expire, Keep, Retention, Rows};
use super::StoreError;
use crate::config::StoreConfig;
use crate::database::Postgres;
use crate::metrics::StoreMetrics;
use probe::Probe;
use session::Conn;
use tokio_postgres_rustls::MakeRustlsConnect;
use writer::LogWriter;

/// How long a call waits for a free connection before it is answered busy.
const CHECKOUT_WAIT: Duration = Duration::from_secs(5);

/// The probe's statement timeout on its own connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        // The server's message alone: never the statement's parameters.
        let why = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_string());
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            StoreError::Duplicate(why)
        } else {
            StoreError::Failed(why)
        }
    }
}

/// Makes the pool's connections, over TLS as `sslmode` says (`tls.rs`).
#[derive(Clone)]
pub(crate) struct Manager {
    config: Box<postgres::Config>,
    tls: MakeRustlsConnect,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Conn, postgres::Error> {
        self.config.connect(self.tls.clone()).map(Conn::new)
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), postgres::Error> {
        conn.simple_query("").map(drop)
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.is_closed()
    }
}

pub(crate) type Pool = r2d2::Pool<Manager>;

/// Whether `e` says the connection is gone rather than that the statement failed: closed, cut
/// mid-call (an I/O error), or ended by the server (SQLSTATE class 08, connection exception;
/// 57P, the server shutting down or restarting).
fn connection_lost(e: &postgres::Error) -> bool {
    let cut = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let ended = e
        .code()
        .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P"));
    e.is_closed() || cut || ended
}

/// The pool's failures to open a connection: one that finds the database gone marks it
/// unreachable at once, before the next probe. Logged at debug: the probe says it once.
#[derive(Debug)]
struct ConnectErrors {
    up: Arc<AtomicBool>,
}

impl r2d2::HandleError<postgres::Error> for ConnectErrors {
    fn handle_error(&self, error: postgres::Error) {
        // r2d2 also hands over the errors of `is_valid`: an idle connection found dead at
        // checkout (the server restarted since) says nothing about the database now, and is
        // replaced by a fresh one. Only a failed connect does (the driver names it so).
        let connecting = error.to_string().starts_with("error connecting to server");
        if connecting && connection_lost(&error) {
            self.up.store(false, Ordering::SeqCst);
        }
        log::debug!("database connection: {error}");
    }
}

/// The open database: the pool, the log writer, and the retention thread if rows expire.
pub(crate) struct Pg {
    pool: Pool,
    manager: Manager,
    probe: Probe,
    log: LogWriter,
    retention: Option<Retention>,
    metrics: StoreMetrics,
}

/// Connects, for `migrate` and `usage`: an error names the host and port, never the password.
pub(crate) fn connect(db: &Postgres) -> anyhow::Result<Client> {
    db.config
        .connect(tls::connector(db)?)
        .with_context(|| format!("cannot connect to PostgreSQL at {}", db.endpoint()))
}

/// Connects and migrates, for `syncgate migrate` and start-up.
pub(crate) fn open_migrated(db: &Postgres) -> anyhow::Result<migrate::Migrated> {
    let mut client = connect(db)?;
    migrate::migrate(&mut client)
        .with_context(|| format!("cannot migrate the database at {}", db.endpoint()))
}

impl Pg {
    /// Connects, migrates, fills the pool and starts the log writer and, when `keep` lets
    /// anything expire, the thread that deletes request-log rows and finished jobs older than
    /// it keeps them.
    pub(crate) fn open(
        db: &Postgres,
        config: &StoreConfig,
        keep: Keep,
        metrics: StoreMetrics,
    ) -> anyhow::Result<Pg> {
        let migrated = open_migrated(db)?;
        if migrated.from != migrated.to {
            log::info!(
                "database {} schema {} -> {}",
                db.endpoint(),
                migrated.from,
                migrated.to
            );
        }
        let up = Arc::new(AtomicBool::new(true));
        let manager = Manager {
            config: db.config.clone(),
            tls: tls::connector(db)?,
        };
        let pool = r2d2::Pool::builder()
            .max_size(config.read_pool as u32)
            .min_idle(Some(1))
            .connection_timeout(CHECKOUT_WAIT)
            .error_handler(Box::new(ConnectErrors {
                up: Arc::clone(&up),
            }))
            .build(manager.clone())
            .with_context(|| format!("cannot open connections to {}", db.endpoint()))?;
        // The probe asks on a connection of its own: a pool whose connections are all taken
        // by slow reads is busy, not unreachable.
        let probe = Probe::spawn(
            Own::new(manager.config.clone(), manager.tls.clone(), PROBE_TIMEOUT),
            up,
            db.endpoint(),
        )
        .context("cannot start the database probe")?;
        let log = LogWriter::spawn(pool.clone(), probe.flag(), config, metrics.clone())
            .context("cannot start the database log writer")?;
        let expire: Expire = {
            let pool = pool.clone();
            Box::new(move |rows, cutoff_ms, limit| {
                let mut conn = pool.get().map_err(|_| StoreError::Busy)?;
                let Conn { client, prepared } = &mut *conn;
                let mut session = Session::new(client, prepared);
                Ok(match rows {
                    Rows::Log => requests::expire(&mut session, cutoff_ms, limit)?,
                    Rows::Jobs => jobs::expire(&mut session, cutoff_ms, limit)?,
                })
            })
        };
        let retention = Retention::spawn(expire, keep, metrics.clone())
            .context("cannot start the retention thread")?;
        Ok(Pg {
            pool,
            manager,
            probe,
            log,
            retention,
            metrics,
        })
    }

    /// Whether the database answered its last probe.
    pub(crate) fn is_available(&self) -> bool {
        self.probe.is_up()
    }

    /// A connection of its own for one thread, outside the pool, its statements bounded by
    /// `statement_timeout` (the lease thread's).
    pub(crate) fn own(&self, statement_timeout: Duration) -> Own {
        Own::new(
            self.manager.config.clone(),
            self.manager.tls.clone(),
            statement_timeout,
        )
    }

    /// A small pool of its own for calls that must not queue behind the reads (the shared
    /// limiter's): `size` connections, the first opened now (within the usual checkout wait),
    /// the others in the background. Start-up does not wait for all of them: opening many
    /// connections (SCRAM hashing each) on a loaded machine took longer than that wait.
    pub(crate) fn side_pool(&self, size: usize) -> Result<Pool, StoreError> {
        let pool = r2d2::Pool::builder()
            .max_size(size as u32)
            .connection_timeout(CHECKOUT_WAIT)
            .error_handler(Box::new(ConnectErrors {
                up: self.probe.flag(),
            }))
            .build_unchecked(self.manager.clone());
        drop(pool.get().map_err(|e| StoreError::Failed(e.to_string()))?);
        Ok(pool)
    }

    /// Runs `read` on a connection of `pool` (a side pool) taken within `checkout`, unmetered:
    /// the read metrics are the read pool's.
    pub(crate) fn query_on<T>(
        &self,
        pool: &Pool,
        checkout: Duration,
        read: impl FnOnce(&mut Session<'_, Client>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = self.connection_from(pool, checkout)?;
        let Conn { client, prepared } = &mut *conn;
        read(&mut Session::new(client, prepared)).map_err(|e| self.failed(e))
    }

    /// A pooled connection, or at once `Unavailable` while the database cannot be reached.
    fn connection(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        self.connection_from(&self.pool, CHECKOUT_WAIT)
    }

    fn connection_from(
        &self,
        pool: &Pool,
        checkout: Duration,
    ) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        if !self.probe.is_up() {
            return Err(StoreError::Unavailable);
        }
        pool.get_timeout(checkout).map_err(|_| {
            if self.probe.is_up() {
                StoreError::Busy
            } else {
                StoreError::Unavailable
            }
        })
    }

    /// A failed call's error; a connection that died with it means the database is gone.
    fn failed(&self, e: postgres::Error) -> StoreError {
        if connection_lost(&e) {
            self.probe.lost();
            StoreError::Unavailable
        } else {
            StoreError::from(e)
        }
    }

    /// Runs `read` on a pooled connection and hands back what it found.
    pub(crate) fn query<T>(
        &self,
        read: impl FnOnce(&mut Session<'_, Client>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        let Conn { client, prepared } = &mut *conn;
        self.metrics.reads_in_use.inc();
        let taken = Instant::now();
        let found = read(&mut Session::new(client, prepared));
        self.metrics.reads_in_use.dec();
        self.metrics
            .read_seconds
            .observe(taken.elapsed().as_secs_f64());
        found.map_err(|e| self.failed(e))
    }

    /// Runs `write` in a transaction of its own and returns what it returned once committed.
    pub(crate) fn write<T>(
        &self,
        write: impl FnOnce(&mut Tx<'_, '_>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut conn = self.connection()?;
        let Conn { client, prepared } = &mut *conn;
        let value = (|| {
            let mut tx = client.transaction()?;
            let value = write(&mut Session::new(&mut tx, prepared))?;
            tx.commit()?;
            Ok(value)
        })()
        .map_err(|e| self.failed(e))?;
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(value)
    }

    /// Queues a request-log row for the log writer.
    pub(crate) fn log(&self, row: RequestRow) {
        self.log.log(row);
    }

    /// Rows waiting for the log writer.
    pub(crate) fn queue_depth(&self) -> usize {
        self.log.queue_depth()
    }

    /// Stops deleting old rows and copies what is queued before the log writer stops.
    pub(crate) fn close(&self) {
        if let Some(retention) = &self.retention {
            retention.stop();
        }
        self.log.close();
        self.probe.stop();
    }
}
