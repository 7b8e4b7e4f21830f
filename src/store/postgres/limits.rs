//! Shared per-key limits on PostgreSQL: one call of `syncgate_admit` per admitted keyed request
//! (migrations/postgres/0003_shared_limits.sql holds the function and says why it is PL/pgSQL),
//! and one statement when the request is done.

use postgres::GenericClient;

use super::Session;
use crate::store::limits::{Admission, Outcome};

type Result<T> = std::result::Result<T, postgres::Error>;

pub(crate) fn admit(
    c: &mut Session<'_, impl GenericClient>,
    key: i64,
    instance: &str,
    tokens: u64,
    ticket: i64,
) -> Result<Admission> {
    let row = c.query_one(
        "SELECT outcome, admission, rpm, requests_used, requests_reset_ms, tpm, \
         tokens_charged, tokens_reset_ms, wait_ms FROM syncgate_admit($1, $2, $3, $4)",
        &[
            &key,
            &instance,
            &(tokens.min(i64::MAX as u64) as i64),
            &ticket,
        ],
    )?;
    let outcome = match row.get::<_, Option<&str>>(0).unwrap_or_default() {
        "admitted" => Outcome::Admitted,
        "requests" => Outcome::Requests,
        "tokens" => Outcome::Tokens,
        "in_flight" => Outcome::InFlight,
        "revoked" => Outcome::Revoked,
        "expired" => Outcome::Expired,
        "unregistered" => Outcome::Unregistered,
        _ => Outcome::Unknown,
    };
    let count = |i: usize| row.get::<_, Option<i64>>(i).map(|n| n.max(0) as u64);
    Ok(Admission {
        outcome,
        id: row.get(1),
        rpm: count(2),
        requests_used: count(3).unwrap_or(0),
        requests_reset_ms: count(4).unwrap_or(0),
        tpm: count(5),
        tokens_charged: count(6).unwrap_or(0),
        tokens_reset_ms: count(7).unwrap_or(0),
        wait_ms: count(8).unwrap_or(0),
    })
}

pub(crate) fn settle(
    c: &mut Session<'_, impl GenericClient>,
    admission: i64,
    tokens: Option<u64>,
) -> Result<()> {
    c.execute(
        "UPDATE limit_admissions SET in_flight = false, tokens = coalesce($2, tokens) \
         WHERE id = $1",
        &[&admission, &tokens.map(|t| t.min(i64::MAX as u64) as i64)],
    )
    .map(drop)
}

/// Releases the in-flight slots of `instance`'s admissions with these tickets (their answers
/// were lost) among `keys`' in-flight rows: one statement, through the in-flight index. Returns
/// the tickets it released.
pub(crate) fn release_lost(
    c: &mut Session<'_, impl GenericClient>,
    instance: &str,
    keys: &[i64],
    tickets: &[i64],
) -> Result<Vec<i64>> {
    Ok(c.query(
        "UPDATE limit_admissions SET in_flight = false \
             WHERE in_flight AND key_id = ANY($2) AND instance = $1 AND ticket = ANY($3) \
             RETURNING ticket",
        &[&instance, &keys, &tickets],
    )?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

#[cfg(test)]
mod tests {
    use crate::store::keys::NewKey;
    use crate::store::testing::{insert_key, postgres_db, register_instance};
    use crate::store::Backend;

    /// Migration 0006: an admission's commit does not wait for the WAL flush (the key's row
    /// lock is held until it), for its own transaction only.
    #[test]
    fn an_admission_commits_without_waiting_for_the_disk_and_only_it() {
        let Some(db) = postgres_db("admit_async") else {
            return;
        };
        let store = db.open();
        register_instance(&store, "inst", 60_000);
        let limited = NewKey {
            rpm: Some(5),
            ..NewKey::default()
        };
        let key = insert_key(&store, limited);
        let Backend::Postgres(pg) = store.backend() else {
            unreachable!("postgres_db opens PostgreSQL");
        };
        let mut conn = pg.pool.get().unwrap();
        let client = &mut conn.client;
        // The test cluster turns it off for the whole server; a production one has it on.
        client.batch_execute("SET synchronous_commit = on").unwrap();
        let setting = |c: &mut postgres::Transaction<'_>| -> String {
            c.query_one("SHOW synchronous_commit", &[]).unwrap().get(0)
        };
        let mut tx = client.transaction().unwrap();
        assert_eq!(setting(&mut tx), "on");
        let outcome: String = tx
            .query_one(
                "SELECT outcome FROM syncgate_admit($1, 'inst', 0, 1)",
                &[&key],
            )
            .unwrap()
            .get(0);
        assert_eq!(outcome, "admitted");
        assert_eq!(setting(&mut tx), "off", "for the admission's transaction");
        tx.rollback().unwrap();
        let after: String = client
            .query_one("SHOW synchronous_commit", &[])
            .unwrap()
            .get(0);
        assert_eq!(after, "on", "and only for it");
    }
}
