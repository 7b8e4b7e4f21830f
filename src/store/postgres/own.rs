//! A connection one thread keeps for itself, outside the pool: the lease thread's and the
//! probe's. Renewing a lease or asking whether the database answers must not wait behind
//! requests for a pooled connection (the pool's checkout alone may take 5 s, longer than a
//! short lease). Opened on first use and again after it broke; every call is bounded by the
//! connect timeout and by a statement timeout of its own.

use std::time::Duration;

use postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{connection_lost, Conn, Session};
use crate::store::StoreError;

/// One connection, (re)opened when needed.
pub(crate) struct Own {
    config: Box<postgres::Config>,
    tls: MakeRustlsConnect,
    statement_timeout: Duration,
    conn: Option<Conn>,
}

impl Own {
    pub(super) fn new(
        config: Box<postgres::Config>,
        tls: MakeRustlsConnect,
        statement_timeout: Duration,
    ) -> Own {
        Own {
            config,
            tls,
            statement_timeout,
            conn: None,
        }
    }

    /// Runs `read` on the connection, opening it first if there is none; a connection that
    /// breaks is dropped and the next call opens another.
    pub(crate) fn query<T>(
        &mut self,
        read: impl FnOnce(&mut Session<'_, Client>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let conn = match &mut self.conn {
            Some(conn) if !conn.is_closed() => conn,
            _ => self.conn.insert(self.open()?),
        };
        let Conn { client, prepared } = conn;
        read(&mut Session::new(client, prepared)).map_err(|e| {
            if connection_lost(&e) {
                self.conn = None;
                StoreError::Unavailable
            } else {
                StoreError::from(e)
            }
        })
    }

    /// Whether a connection is kept (it may still turn out broken at its next use).
    pub(crate) fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    fn open(&self) -> Result<Conn, StoreError> {
        let unreachable = |e: postgres::Error| {
            log::debug!("database connection: {e}");
            StoreError::Unavailable
        };
        let mut client = self.config.connect(self.tls.clone()).map_err(unreachable)?;
        let ms = self.statement_timeout.as_millis().max(1);
        client
            .batch_execute(&format!("SET statement_timeout = {ms}"))
            .map_err(unreachable)?;
        Ok(Conn::new(client))
    }
}
