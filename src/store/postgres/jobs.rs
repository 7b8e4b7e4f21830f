//! Durable jobs on PostgreSQL: each change of state is one statement in the caller's
//! transaction; a claim takes the oldest claimable job with `FOR UPDATE SKIP LOCKED`, so
//! runners on several instances never wait for each other's claim.

use postgres::{GenericClient, Row};
use serde_json::Value;

use super::{Session, Tx};
use crate::store::jobs::{
    attempts_exhausted, Cancelled, Claimed, Job, JobKind, NewJob, RunEnd, Status, Submitted,
    STATUSES,
};

type Result<T> = std::result::Result<T, postgres::Error>;

/// Adds a job unless its idempotency key names one already or the table is at capacity. The
/// count and the insert are serialised by a transaction-scoped advisory lock, so the capacity
/// is exact across instances.
pub(crate) fn submit(tx: &mut Tx<'_, '_>, job: &NewJob, max_queued: usize) -> Result<Submitted> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('syncgate.jobs.submit'))",
        &[],
    )?;
    if let Some(key) = &job.idempotency_key {
        if let Some(row) = tx.query_opt("SELECT id FROM jobs WHERE idempotency_key = $1", &[key])? {
            return Ok(Submitted::Existing(row.get(0)));
        }
    }
    let active: i64 = tx
        .query_one(
            "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')",
            &[],
        )?
        .get(0);
    if active as usize >= max_queued {
        return Ok(Submitted::Full);
    }
    tx.execute(
        "INSERT INTO jobs (id, status, request, metadata, model, max_attempts, \
         idempotency_key, key_id, created_ms, kind) \
         VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &job.id,
            &job.request.to_string(),
            &job.metadata.as_ref().map(Value::to_string),
            &job.model,
            &(job.max_attempts as i32),
            &job.idempotency_key,
            &job.key_id,
            &job.created_ms,
            &job.kind.name(),
        ],
    )?;
    Ok(Submitted::Created(job.id.clone()))
}

/// The database's clock in milliseconds since the epoch: what job leases are timed by, so that
/// instances whose clocks disagree still agree on when a lease ran out.
const DB_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

pub(crate) fn claimable(c: &mut Session<'_, impl GenericClient>) -> Result<bool> {
    Ok(c.query_one(
        &format!(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' \
             OR (status = 'running' AND lease_until_ms < {DB_NOW_MS}))"
        ),
        &[],
    )?
    .get(0))
}

/// Takes the oldest job that is queued or whose lease ran out (by the database's clock),
/// skipping rows another runner is claiming, with a lease of `lease_ms` from the database's
/// now; a job out of attempts is failed instead, and the next one looked at. `now_ms` stamps
/// when the job started or failed.
pub(crate) fn claim(tx: &mut Tx<'_, '_>, now_ms: i64, lease_ms: i64) -> Result<Option<Claimed>> {
    loop {
        let Some(row) = tx.query_opt(
            &format!(
                "SELECT id, attempts, max_attempts, request, created_ms, kind FROM jobs \
                 WHERE status = 'queued' OR (status = 'running' AND lease_until_ms < {DB_NOW_MS}) \
                 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED"
            ),
            &[],
        )?
        else {
            return Ok(None);
        };
        let id: String = row.get(0);
        let attempts = row.get::<_, i32>(1).max(0) as u32;
        let max_attempts = row.get::<_, i32>(2).max(0) as u32;
        if attempts >= max_attempts {
            let error = attempts_exhausted(attempts, max_attempts);
            tx.execute(
                "UPDATE jobs SET status = 'failed', error = coalesce(error, $2), \
                 finished_ms = $3, lease_until_ms = NULL WHERE id = $1",
                &[&id, &error.to_string(), &now_ms],
            )?;
            continue;
        }
        tx.execute(
            &format!(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, \
                 started_ms = coalesce(started_ms, $2), lease_until_ms = {DB_NOW_MS} + $3 \
                 WHERE id = $1"
            ),
            &[&id, &now_ms, &lease_ms],
        )?;
        let request: String = row.get(3);
        return Ok(Some(Claimed {
            id,
            attempt: attempts + 1,
            request: serde_json::from_str(&request).unwrap_or(Value::Null),
            created_ms: row.get(4),
            kind: JobKind::parse(row.get(5)).unwrap_or(JobKind::Chat),
        }));
    }
}

/// Extends the leases of the jobs still held (same attempt) to `lease_ms` from the database's
/// now.
pub(crate) fn renew(tx: &mut Tx<'_, '_>, held: &[(String, u32)], lease_ms: i64) -> Result<()> {
    let renew = format!(
        "UPDATE jobs SET lease_until_ms = {DB_NOW_MS} + $3 \
         WHERE id = $1 AND attempts = $2 AND status = 'running'"
    );
    for (id, attempt) in held {
        tx.execute(&renew, &[id, &(*attempt as i32), &lease_ms])?;
    }
    Ok(())
}

pub(crate) fn finish(
    tx: &mut Tx<'_, '_>,
    id: &str,
    attempt: u32,
    end: &RunEnd,
    now_ms: i64,
) -> Result<Option<Status>> {
    let held = tx.query_opt(
        "SELECT cancel_requested FROM jobs WHERE id = $1 AND attempts = $2 \
         AND status = 'running' FOR UPDATE",
        &[&id, &(attempt as i32)],
    )?;
    let Some(held) = held else {
        return Ok(None);
    };
    let cancel_requested: bool = held.get(0);
    let (status, result, error) = end.outcome(cancel_requested);
    let finished = status.is_final().then_some(now_ms);
    tx.execute(
        "UPDATE jobs SET status = $2, result = $3, error = coalesce($4, error), \
         finished_ms = $5, lease_until_ms = NULL WHERE id = $1",
        &[
            &id,
            &status.name(),
            &result.map(Value::to_string),
            &error.map(Value::to_string),
            &finished,
        ],
    )?;
    Ok(Some(status))
}

pub(crate) fn cancel(tx: &mut Tx<'_, '_>, id: &str, now_ms: i64) -> Result<Cancelled> {
    let status = tx.query_opt("SELECT status FROM jobs WHERE id = $1 FOR UPDATE", &[&id])?;
    let Some(status) = status.and_then(|r| Status::parse(r.get::<_, &str>(0))) else {
        return Ok(Cancelled::NotFound);
    };
    Ok(match status {
        Status::Queued => {
            tx.execute(
                "UPDATE jobs SET status = 'cancelled', finished_ms = $2 WHERE id = $1",
                &[&id, &now_ms],
            )?;
            Cancelled::Now
        }
        Status::Running => {
            tx.execute(
                "UPDATE jobs SET cancel_requested = true WHERE id = $1",
                &[&id],
            )?;
            Cancelled::WhenItReturns
        }
        done => Cancelled::AlreadyFinal(done),
    })
}

/// Deletes at most `batch` of the jobs that finished (succeeded, failed, cancelled) before
/// `cutoff_ms`, oldest first; returns how many. Queued and running jobs have no finish time and
/// are never touched.
pub(crate) fn expire(
    c: &mut Session<'_, impl GenericClient>,
    cutoff_ms: i64,
    batch: usize,
) -> Result<usize> {
    let n = c.execute(
        "DELETE FROM jobs WHERE seq IN \
         (SELECT seq FROM jobs WHERE finished_ms < $1 \
          AND status NOT IN ('queued', 'running') ORDER BY finished_ms LIMIT $2)",
        &[&cutoff_ms, &(batch as i64)],
    )?;
    Ok(n as usize)
}

const COLUMNS: &str = "id, status, request, metadata, model, attempts, max_attempts, result, \
                       error, cancel_requested, key_id, created_ms, started_ms, finished_ms";

pub(crate) fn get(c: &mut Session<'_, impl GenericClient>, id: &str) -> Result<Option<Job>> {
    Ok(
        c.query_opt(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"), &[&id])?
            .map(|r| job_from_row(&r)),
    )
}

pub(crate) fn list(
    c: &mut Session<'_, impl GenericClient>,
    status: Option<Status>,
    limit: u32,
    before: Option<&str>,
) -> Result<Option<(Vec<Job>, bool)>> {
    let below: i64 = match before {
        None => i64::MAX,
        Some(id) => match c.query_opt("SELECT seq FROM jobs WHERE id = $1", &[&id])? {
            Some(row) => row.get(0),
            None => return Ok(None),
        },
    };
    let mut jobs: Vec<Job> = c
        .query(
            &format!(
                "SELECT {COLUMNS} FROM jobs WHERE seq < $1 AND ($2::TEXT IS NULL OR status = $2) \
                 ORDER BY seq DESC LIMIT $3"
            ),
            &[&below, &status.map(Status::name), &(i64::from(limit) + 1)],
        )?
        .iter()
        .map(job_from_row)
        .collect();
    let more = jobs.len() > limit as usize;
    jobs.truncate(limit as usize);
    Ok(Some((jobs, more)))
}

pub(crate) fn counts(c: &mut Session<'_, impl GenericClient>) -> Result<Vec<(Status, i64)>> {
    let mut counts: Vec<(Status, i64)> = STATUSES.iter().map(|s| (*s, 0)).collect();
    for row in c.query("SELECT status, count(*) FROM jobs GROUP BY status", &[])? {
        let name: &str = row.get(0);
        if let Some(slot) = counts.iter_mut().find(|(s, _)| s.name() == name) {
            slot.1 = row.get(1);
        }
    }
    Ok(counts)
}

fn job_from_row(r: &Row) -> Job {
    let json = |text: Option<String>| text.and_then(|t| serde_json::from_str(&t).ok());
    let status: &str = r.get(1);
    Job {
        id: r.get(0),
        status: Status::parse(status).unwrap_or(Status::Failed),
        request: json(r.get(2)).unwrap_or(Value::Null),
        metadata: json(r.get(3)),
        model: r.get(4),
        attempts: r.get::<_, i32>(5).max(0) as u32,
        max_attempts: r.get::<_, i32>(6).max(0) as u32,
        result: json(r.get(7)),
        error: json(r.get(8)),
        cancel_requested: r.get(9),
        key_id: r.get(10),
        created_ms: r.get(11),
        started_ms: r.get(12),
        finished_ms: r.get(13),
    }
}
