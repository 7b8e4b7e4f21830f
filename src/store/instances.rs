//! The instances serving one database: each registers at start and renews a lease timed by the
//! database clock; one whose lease ran out is forgotten and its in-flight slots freed by
//! whichever instance reaps next. Only PostgreSQL is shared: on SQLite (one instance per file)
//! these calls are refused and the process keeps no registration.

use std::time::Duration;

use super::postgres::{instances as pg, Own};
use super::{Backend, Store, StoreError};

/// The lease thread's connection of its own, outside the pool: renewing never waits behind
/// requests for a pooled connection. Opened again when it breaks.
pub(crate) struct Connection(Own);

/// A connection for the lease thread, its statements bounded by `statement_timeout`; opened at
/// its first use.
pub(crate) fn connection(
    store: &Store,
    statement_timeout: Duration,
) -> Result<Connection, StoreError> {
    match store.backend() {
        Backend::Sqlite(_) => Err(shared_only()),
        Backend::Postgres(db) => Ok(Connection(db.own(statement_timeout))),
    }
}

/// What an instance says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewInstance {
    /// Fresh at every registration (a re-registration after a lost lease takes a new one).
    pub(crate) id: String,
    pub(crate) host: String,
    /// The address it listens on.
    pub(crate) listen: String,
    pub(crate) version: String,
}

/// A live instance as stored; times are the database clock's, Unix ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InstanceRow {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) listen: String,
    pub(crate) version: String,
    pub(crate) started_ms: i64,
    pub(crate) renewed_ms: i64,
    pub(crate) lease_until_ms: i64,
}

/// What one reaping did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reaped {
    /// Instances forgotten because their lease ran out.
    pub(crate) instances: u64,
    /// In-flight slots freed because the instance holding them has no lease.
    pub(crate) slots: u64,
}

fn shared_only() -> StoreError {
    StoreError::Failed("instances are registered only on PostgreSQL".into())
}

/// Registers an instance with a lease of `lease_ms` from the database's now.
pub(crate) fn register(
    conn: &mut Connection,
    new: &NewInstance,
    lease_ms: i64,
) -> Result<(), StoreError> {
    conn.0.query(|c| pg::register(c, new, lease_ms))
}

/// Extends the lease of `id` to `lease_ms` from the database's now; false when the lease had
/// already run out (or the row was reaped): the instance must register again.
pub(crate) fn renew(conn: &mut Connection, id: &str, lease_ms: i64) -> Result<bool, StoreError> {
    conn.0.query(|c| pg::renew(c, id, lease_ms))
}

/// Removes an instance that stops cleanly.
pub(crate) fn deregister(store: &Store, id: &str) -> Result<(), StoreError> {
    match store.backend() {
        Backend::Sqlite(_) => Err(shared_only()),
        Backend::Postgres(db) => db.query(|c| pg::deregister(c, id)),
    }
}

/// The instances whose lease has not run out, oldest first.
pub(crate) fn live(store: &Store) -> Result<Vec<InstanceRow>, StoreError> {
    match store.backend() {
        Backend::Sqlite(_) => Err(shared_only()),
        Backend::Postgres(db) => db.query(pg::live),
    }
}

/// Forgets instances whose lease ran out and frees the slots of every instance without one.
pub(crate) fn reap(conn: &mut Connection) -> Result<Reaped, StoreError> {
    conn.0.query(pg::reap)
}
