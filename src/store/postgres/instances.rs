//! Instances on PostgreSQL: the `instances` rows, their leases timed by the database clock
//! (`now()`), and the reaper that forgets dead instances and frees their slots.

use postgres::GenericClient;

use super::Session;
use crate::store::instances::{InstanceRow, NewInstance, Reaped};

type Result<T> = std::result::Result<T, postgres::Error>;

pub(crate) fn register(
    c: &mut Session<'_, impl GenericClient>,
    new: &NewInstance,
    lease_ms: i64,
) -> Result<()> {
    c.execute(
        "INSERT INTO instances (id, host, listen, version, started_at, renewed_at, lease_until) \
         VALUES ($1, $2, $3, $4, now(), now(), now() + $5 * interval '1 millisecond')",
        &[
            &new.id,
            &new.host,
            &new.listen,
            &new.version,
            &(lease_ms as f64),
        ],
    )
    .map(drop)
}

pub(crate) fn renew(
    c: &mut Session<'_, impl GenericClient>,
    id: &str,
    lease_ms: i64,
) -> Result<bool> {
    let n = c.execute(
        "UPDATE instances SET renewed_at = now(), \
         lease_until = now() + $2 * interval '1 millisecond' \
         WHERE id = $1 AND lease_until > now()",
        &[&id, &(lease_ms as f64)],
    )?;
    Ok(n == 1)
}

pub(crate) fn deregister(c: &mut Session<'_, impl GenericClient>, id: &str) -> Result<()> {
    c.execute("DELETE FROM instances WHERE id = $1", &[&id])
        .map(drop)
}

pub(crate) fn live(c: &mut Session<'_, impl GenericClient>) -> Result<Vec<InstanceRow>> {
    let ms = |col: &str| format!("(extract(epoch FROM {col}) * 1000)::BIGINT");
    let sql = format!(
        "SELECT id, host, listen, version, {}, {}, {} FROM instances \
         WHERE lease_until > now() ORDER BY started_at, id",
        ms("started_at"),
        ms("renewed_at"),
        ms("lease_until")
    );
    Ok(c.query(&sql, &[])?
        .iter()
        .map(|r| InstanceRow {
            id: r.get(0),
            host: r.get(1),
            listen: r.get(2),
            version: r.get(3),
            started_ms: r.get(4),
            renewed_ms: r.get(5),
            lease_until_ms: r.get(6),
        })
        .collect())
}

pub(crate) fn reap(c: &mut Session<'_, impl GenericClient>) -> Result<Reaped> {
    let row = c.query_one(
        "SELECT instances_gone, slots_released FROM syncgate_reap()",
        &[],
    )?;
    Ok(Reaped {
        instances: row.get::<_, i64>(0) as u64,
        slots: row.get::<_, i64>(1) as u64,
    })
}
