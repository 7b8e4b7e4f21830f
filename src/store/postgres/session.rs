//! A pooled connection and the statements it has prepared. Every statement of this backend runs
//! through a `Session`, which parses a statement's text once per connection and then only binds
//! and executes it: one round trip instead of two (measured in docs/benchmarks.md).
//!
//! Named statements belong to the server session, not to a transaction: one prepared inside a
//! transaction that rolls back stays usable. A connection that breaks is dropped by the pool with
//! its statements, and the next one prepares its own.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};

use postgres::types::ToSql;
use postgres::{Client, GenericClient, Row, Statement, Transaction};

type Result<T> = std::result::Result<T, postgres::Error>;

/// Statements kept per connection. The texts are the backend's own constants and a bounded set
/// of filter combinations, far fewer than this; past it the cache starts again rather than grow.
const MAX_PREPARED: usize = 256;

/// One connection of the pool with the statements prepared on it.
pub(crate) struct Conn {
    pub(super) client: Client,
    pub(super) prepared: Prepared,
}

impl Conn {
    pub(super) fn new(client: Client) -> Conn {
        Conn {
            client,
            prepared: Prepared::default(),
        }
    }
}

/// The connection itself, for what runs outside a `Session` (COPY, the probe's `SELECT 1`).
impl Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// The statements one connection has prepared, by their text.
#[derive(Default)]
pub(crate) struct Prepared(HashMap<String, Statement>);

/// A connection or a transaction on it, running statements prepared once per connection. Its
/// methods are named and typed as `postgres::GenericClient`'s, so the SQL reads the same.
pub(crate) struct Session<'a, C> {
    client: &'a mut C,
    prepared: &'a mut Prepared,
}

/// What an acknowledged write runs in: a `Session` on its transaction.
pub(crate) type Tx<'a, 't> = Session<'a, Transaction<'t>>;

impl<'a, C: GenericClient> Session<'a, C> {
    pub(crate) fn new(client: &'a mut C, prepared: &'a mut Prepared) -> Session<'a, C> {
        Session { client, prepared }
    }

    /// The statement for `sql`, prepared on this connection the first time it is asked for.
    fn statement(&mut self, sql: &str) -> Result<Statement> {
        if let Some(statement) = self.prepared.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        if self.prepared.0.len() >= MAX_PREPARED {
            self.prepared.0.clear();
        }
        self.prepared.0.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub(crate) fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params)
    }

    pub(crate) fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let statement = self.statement(sql)?;
        self.client.query_one(&statement, params)
    }

    pub(crate) fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let statement = self.statement(sql)?;
        self.client.query_opt(&statement, params)
    }

    pub(crate) fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params)
    }
}

#[cfg(test)]
mod tests {
    use super::{Conn, Session};
    use crate::store::testing::stores;
    use crate::store::Backend;

    /// How many statements with this text the connection's server session holds.
    fn held(client: &mut postgres::Client, sql: &str) -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
                &[&sql],
            )
            .unwrap()
            .get(0)
    }

    #[test]
    fn a_statement_is_prepared_once_per_connection_and_outlives_a_rolled_back_transaction() {
        for store in stores("prepared") {
            let Backend::Postgres(pg) = store.backend() else {
                continue;
            };
            let mut conn = pg.pool.get().unwrap();
            let Conn { client, prepared } = &mut *conn;
            let read = "SELECT count(*) FROM conversations WHERE id <> $1";
            for _ in 0..3 {
                let n: i64 = Session::new(client, prepared)
                    .query_one(read, &[&"none"])
                    .unwrap()
                    .get(0);
                assert_eq!(n, 0);
            }
            assert_eq!(held(client, read), 1, "prepared once, then reused");

            let write = "UPDATE conversations SET title = $2 WHERE id = $1";
            let mut tx = client.transaction().unwrap();
            Session::new(&mut tx, prepared)
                .execute(write, &[&"none", &"t"])
                .unwrap();
            tx.rollback().unwrap();
            let changed = Session::new(client, prepared)
                .execute(write, &[&"none", &"t"])
                .unwrap();
            assert_eq!(changed, 0);
            assert_eq!(held(client, write), 1, "the rollback kept the statement");
        }
    }
}
