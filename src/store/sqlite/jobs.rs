//! Durable jobs in SQLite: each change of state is one statement run by the writer; a claim
//! takes the oldest claimable job by `seq`.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::Value;

use crate::store::jobs::{
    attempts_exhausted, Cancelled, Claimed, Job, JobKind, NewJob, RunEnd, Status, Submitted,
    STATUSES,
};

/// Adds a job unless its idempotency key names one already or the table is at capacity
/// (counted in the same transaction, so the capacity is exact).
pub(crate) fn submit(
    conn: &Connection,
    job: &NewJob,
    max_queued: usize,
) -> rusqlite::Result<Submitted> {
    if let Some(key) = &job.idempotency_key {
        let existing: Option<String> = conn
            .prepare_cached("SELECT id FROM jobs WHERE idempotency_key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?;
        if let Some(id) = existing {
            return Ok(Submitted::Existing(id));
        }
    }
    let active: i64 = conn
        .prepare_cached("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")?
        .query_row([], |r| r.get(0))?;
    if active as usize >= max_queued {
        return Ok(Submitted::Full);
    }
    conn.prepare_cached(
        "INSERT INTO jobs (id, status, request, metadata, model, max_attempts, \
         idempotency_key, key_id, created_ms, kind) \
         VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        job.id,
        job.request.to_string(),
        job.metadata.as_ref().map(Value::to_string),
        job.model,
        job.max_attempts,
        job.idempotency_key,
        job.key_id,
        job.created_ms,
        job.kind.name(),
    ])?;
    Ok(Submitted::Created(job.id.clone()))
}

/// Whether a job could be claimed now (a cheap read, so idle runners poll without writing).
pub(crate) fn claimable(conn: &Connection, now_ms: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' \
         OR (status = 'running' AND lease_until_ms < ?1))",
    )?
    .query_row([now_ms], |r| r.get(0))
}

/// Takes the oldest job that is queued or whose lease ran out, with one more attempt and a
/// lease until `lease_until_ms`. A job out of attempts is failed instead, and the next one
/// looked at.
pub(crate) fn claim(
    conn: &Connection,
    now_ms: i64,
    lease_until_ms: i64,
) -> rusqlite::Result<Option<Claimed>> {
    loop {
        let next = conn
            .prepare_cached(
                "SELECT id, attempts, max_attempts, request, created_ms, kind FROM jobs \
                 WHERE status = 'queued' OR (status = 'running' AND lease_until_ms < ?1) \
                 ORDER BY seq LIMIT 1",
            )?
            .query_row([now_ms], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .optional()?;
        let Some((id, attempts, max_attempts, request, created_ms, kind)) = next else {
            return Ok(None);
        };
        if attempts >= max_attempts {
            let error = attempts_exhausted(attempts, max_attempts);
            conn.prepare_cached(
                "UPDATE jobs SET status = 'failed', error = coalesce(error, ?2), \
                 finished_ms = ?3, lease_until_ms = NULL WHERE id = ?1",
            )?
            .execute(params![id, error.to_string(), now_ms])?;
            continue;
        }
        conn.prepare_cached(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, \
             started_ms = coalesce(started_ms, ?2), lease_until_ms = ?3 WHERE id = ?1",
        )?
        .execute(params![id, now_ms, lease_until_ms])?;
        return Ok(Some(Claimed {
            id,
            attempt: attempts + 1,
            request: serde_json::from_str(&request).unwrap_or(Value::Null),
            created_ms,
            kind: JobKind::parse(&kind).unwrap_or(JobKind::Chat),
        }));
    }
}

/// Makes every running job claimable at once, as if its lease had run out at `now_ms`;
/// returns how many. Only for a process that owns the file, at start: the jobs marked running
/// are those a process that died was running.
pub(crate) fn resume_running(conn: &Connection, now_ms: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE jobs SET lease_until_ms = ?1 - 1 \
         WHERE status = 'running' AND lease_until_ms >= ?1",
    )?
    .execute([now_ms])
}

/// Extends the leases of the jobs a runner holds (those it still holds: same attempt).
pub(crate) fn renew(
    conn: &Connection,
    held: &[(String, u32)],
    lease_until_ms: i64,
) -> rusqlite::Result<()> {
    let mut renew = conn.prepare_cached(
        "UPDATE jobs SET lease_until_ms = ?3 \
         WHERE id = ?1 AND attempts = ?2 AND status = 'running'",
    )?;
    for (id, attempt) in held {
        renew.execute(params![id, attempt, lease_until_ms])?;
    }
    Ok(())
}

/// Records how attempt `attempt` of a job ended, if the runner still holds it (a lost lease
/// means another runner took the job: its outcome wins). A job cancelled while running ends
/// cancelled, whatever its call returned. Returns the final status, or `None` if not held.
pub(crate) fn finish(
    conn: &Connection,
    id: &str,
    attempt: u32,
    end: &RunEnd,
    now_ms: i64,
) -> rusqlite::Result<Option<Status>> {
    let held: Option<bool> = conn
        .prepare_cached(
            "SELECT cancel_requested FROM jobs WHERE id = ?1 AND attempts = ?2 \
             AND status = 'running'",
        )?
        .query_row(params![id, attempt], |r| r.get(0))
        .optional()?;
    let Some(cancel_requested) = held else {
        return Ok(None);
    };
    let (status, result, error) = end.outcome(cancel_requested);
    let finished = status.is_final().then_some(now_ms);
    conn.prepare_cached(
        "UPDATE jobs SET status = ?2, result = ?3, error = coalesce(?4, error), \
         finished_ms = ?5, lease_until_ms = NULL WHERE id = ?1",
    )?
    .execute(params![
        id,
        status.name(),
        result.map(Value::to_string),
        error.map(Value::to_string),
        finished,
    ])?;
    Ok(Some(status))
}

pub(crate) fn cancel(conn: &Connection, id: &str, now_ms: i64) -> rusqlite::Result<Cancelled> {
    let status: Option<String> = conn
        .prepare_cached("SELECT status FROM jobs WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let Some(status) = status.as_deref().and_then(Status::parse) else {
        return Ok(Cancelled::NotFound);
    };
    Ok(match status {
        Status::Queued => {
            conn.prepare_cached(
                "UPDATE jobs SET status = 'cancelled', finished_ms = ?2 WHERE id = ?1",
            )?
            .execute(params![id, now_ms])?;
            Cancelled::Now
        }
        Status::Running => {
            conn.prepare_cached("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1")?
                .execute([id])?;
            Cancelled::WhenItReturns
        }
        done => Cancelled::AlreadyFinal(done),
    })
}

/// Deletes at most `batch` of the jobs that finished (succeeded, failed, cancelled) before
/// `cutoff_ms`, oldest first; returns how many. Queued and running jobs have no finish time and
/// are never touched. Bounded so one call holds the write lock only briefly (retention calls it
/// in a loop).
pub(crate) fn expire(conn: &Connection, cutoff_ms: i64, batch: usize) -> rusqlite::Result<usize> {
    conn.prepare_cached(EXPIRE)?
        .execute(params![cutoff_ms, batch as i64])
}

/// `NOT IN`, not `IN` the final states: SQLite would pick `jobs_status` for an `IN` list and
/// sort, where `jobs_finished` reads the oldest in order.
const EXPIRE: &str = "DELETE FROM jobs WHERE seq IN \
                      (SELECT seq FROM jobs WHERE finished_ms < ?1 \
                       AND status NOT IN ('queued', 'running') ORDER BY finished_ms LIMIT ?2)";

const COLUMNS: &str = "id, status, request, metadata, model, attempts, max_attempts, result, \
                       error, cancel_requested, key_id, created_ms, started_ms, finished_ms";

pub(crate) fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id], job_from_row)
        .optional()
}

/// Up to `limit` jobs, newest first, optionally of one status, after the job `before` (by its
/// id); `None` when `before` names no job. The flag says whether more follow.
pub(crate) fn list(
    conn: &Connection,
    status: Option<Status>,
    limit: u32,
    before: Option<&str>,
) -> rusqlite::Result<Option<(Vec<Job>, bool)>> {
    let below: i64 = match before {
        None => i64::MAX,
        Some(id) => match conn
            .prepare_cached("SELECT seq FROM jobs WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?
        {
            Some(seq) => seq,
            None => return Ok(None),
        },
    };
    let mut jobs = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE seq < ?1 AND (?2 IS NULL OR status = ?2) \
             ORDER BY seq DESC LIMIT ?3"
        ))?
        .query_map(
            params![below, status.map(Status::name), limit + 1],
            job_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let more = jobs.len() > limit as usize;
    jobs.truncate(limit as usize);
    Ok(Some((jobs, more)))
}

/// Jobs by state, for the metrics.
pub(crate) fn counts(conn: &Connection) -> rusqlite::Result<Vec<(Status, i64)>> {
    let mut counts: Vec<(Status, i64)> = STATUSES.iter().map(|s| (*s, 0)).collect();
    let rows = conn
        .prepare_cached("SELECT status, count(*) FROM jobs GROUP BY status")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (name, n) in rows {
        if let Some(slot) = counts.iter_mut().find(|(s, _)| s.name() == name) {
            slot.1 = n;
        }
    }
    Ok(counts)
}

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<Job> {
    let json = |text: Option<String>| text.and_then(|t| serde_json::from_str(&t).ok());
    let status: String = r.get(1)?;
    Ok(Job {
        id: r.get(0)?,
        status: Status::parse(&status).unwrap_or(Status::Failed),
        request: json(r.get(2)?).unwrap_or(Value::Null),
        metadata: json(r.get(3)?),
        model: r.get(4)?,
        attempts: r.get(5)?,
        max_attempts: r.get(6)?,
        result: json(r.get(7)?),
        error: json(r.get(8)?),
        cancel_requested: r.get(9)?,
        key_id: r.get(10)?,
        created_ms: r.get(11)?,
        started_ms: r.get(12)?,
        finished_ms: r.get(13)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::migrate;

    #[test]
    fn expiry_reads_the_oldest_finished_jobs_from_their_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate::migrate(&mut conn).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {EXPIRE}"))
            .unwrap()
            .query_map(params![0, 1], |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("USING INDEX jobs_finished"))
                && !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "{plan:?}"
        );
    }
}
