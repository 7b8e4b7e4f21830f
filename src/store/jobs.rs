//! Durable jobs at rest. Every change of state is one acknowledged write, so a job's state in
//! the database is always one the API has shown or will show. A job is claimed with a lease; a
//! runner that dies (or stalls past its lease) loses it, and the next claim takes the job again
//! with one more attempt. The SQL is the backend's (`sqlite/jobs.rs`, `postgres/jobs.rs`);
//! callers see only these functions and types.

use serde_json::Value;

use super::postgres::jobs as pg;
use super::sqlite::jobs as sql;
use super::{Backend, Store, StoreError};

/// A job's state. `queued` and `running` are active; the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// Every state, in the order they are listed (and exported as metrics).
pub(crate) const STATUSES: [Status; 5] = [
    Status::Queued,
    Status::Running,
    Status::Succeeded,
    Status::Failed,
    Status::Cancelled,
];

impl Status {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Status> {
        STATUSES.into_iter().find(|s| s.name() == text)
    }

    pub(crate) fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    /// A chat completion (`POST /api/jobs`).
    Chat,
    /// A file's ingestion into a vector store: `{"vector_store_id", "file_id"}`.
    Ingest,
}

impl JobKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            JobKind::Chat => "chat",
            JobKind::Ingest => "ingest",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<JobKind> {
        [JobKind::Chat, JobKind::Ingest]
            .into_iter()
            .find(|k| k.name() == text)
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) status: Status,
    pub(crate) request: Value,
    pub(crate) metadata: Option<Value>,
    pub(crate) model: String,
    pub(crate) attempts: u32,
    pub(crate) max_attempts: u32,
    pub(crate) result: Option<Value>,
    pub(crate) error: Option<Value>,
    pub(crate) cancel_requested: bool,
    pub(crate) key_id: Option<i64>,
    pub(crate) created_ms: i64,
    pub(crate) started_ms: Option<i64>,
    pub(crate) finished_ms: Option<i64>,
}

/// A job to add.
#[derive(Debug, Clone)]
pub(crate) struct NewJob {
    pub(crate) id: String,
    pub(crate) request: Value,
    pub(crate) metadata: Option<Value>,
    pub(crate) model: String,
    pub(crate) max_attempts: u32,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) key_id: Option<i64>,
    pub(crate) created_ms: i64,
    pub(crate) kind: JobKind,
}

/// What a submission did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Submitted {
    Created(String),
    /// The idempotency key was used before: this is that job's id.
    Existing(String),
    /// `max_queued` jobs are active already.
    Full,
}

/// A job a runner has taken: its id, its attempt number (the lease's token) and its request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claimed {
    pub(crate) id: String,
    pub(crate) attempt: u32,
    pub(crate) request: Value,
    pub(crate) created_ms: i64,
    pub(crate) kind: JobKind,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RunEnd {
    Succeeded(Value),
    /// Failed for good (a client error, or the last attempt).
    Failed(Value),
    /// Failed in a way another attempt may fix: queued again (it keeps the error).
    Retry(Value),
}

impl RunEnd {
    /// The job's state after this run, and the result or error it keeps: a job cancelled
    /// while running ends cancelled, whatever its call returned.
    pub(crate) fn outcome(
        &self,
        cancel_requested: bool,
    ) -> (Status, Option<&Value>, Option<&Value>) {
        match self {
            _ if cancel_requested => (Status::Cancelled, None, None),
            RunEnd::Succeeded(result) => (Status::Succeeded, Some(result), None),
            RunEnd::Failed(error) => (Status::Failed, None, Some(error)),
            RunEnd::Retry(error) => (Status::Queued, None, Some(error)),
        }
    }
}

/// What a cancellation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cancelled {
    /// It was queued: cancelled now.
    Now,
    /// It is running: it ends cancelled when its call returns.
    WhenItReturns,
    /// It had ended already (in this state).
    AlreadyFinal(Status),
    NotFound,
}

/// The error a job is failed with when it was started `max_attempts` times without finishing.
pub(crate) fn attempts_exhausted(attempts: u32, max_attempts: u32) -> Value {
    serde_json::json!({
        "message": format!("the job was started {attempts} times without finishing \
                            (max_attempts {max_attempts})"),
        "type": "server_error",
        "code": "attempts_exhausted",
    })
}

/// Adds a job unless its idempotency key names one already or `max_queued` jobs are active
/// (counted in the same transaction, so the capacity is exact); acknowledged once committed.
pub(crate) fn submit(
    store: &Store,
    job: NewJob,
    max_queued: usize,
) -> Result<Submitted, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::submit(conn, &job, max_queued)),
        Backend::Postgres(db) => db.write(|tx| pg::submit(tx, &job, max_queued)),
    }
}

/// Whether a job could be claimed now: a read, so idle runners poll without writing.
pub(crate) fn claimable(store: &Store, now_ms: i64) -> Result<bool, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::claimable(c, now_ms)),
        Backend::Postgres(db) => db.query(pg::claimable),
    }
}

/// Takes the oldest job that is queued or whose lease ran out, with one more attempt and a
/// lease of `lease_ms`; one out of attempts is failed instead. SQLite times leases by `now_ms`
/// (one process a file: its clock is the only one). PostgreSQL times them by the database's
/// clock, never an instance's, so instances whose clocks disagree still agree on when a lease
/// ran out; `now_ms` only stamps when the job started or failed.
pub(crate) fn claim(
    store: &Store,
    now_ms: i64,
    lease_ms: i64,
) -> Result<Option<Claimed>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::claim(conn, now_ms, now_ms.saturating_add(lease_ms))),
        Backend::Postgres(db) => db.write(|tx| pg::claim(tx, now_ms, lease_ms)),
    }
}

/// At start, before any runner: on SQLite, when this process owns the file (one instance a
/// file, so no live process can be running them), the jobs left running by a process that
/// died are made claimable now instead of when their leases run out; returns how many. On
/// PostgreSQL, and on a SQLite file another process holds, nothing: another instance may be
/// running them, and their leases say when it stopped.
pub(crate) fn resume_orphans(store: &Store, now_ms: i64) -> Result<usize, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) if db.owns_file() => db
            .writer()
            .call(move |conn| sql::resume_running(conn, now_ms)),
        Backend::Sqlite(_) | Backend::Postgres(_) => Ok(0),
    }
}

/// Extends the leases of the jobs a runner still holds (same attempt) to `lease_ms` from now:
/// `now_ms` on SQLite, the database's clock on PostgreSQL (see [`claim`]).
pub(crate) fn renew(
    store: &Store,
    held: Vec<(String, u32)>,
    now_ms: i64,
    lease_ms: i64,
) -> Result<(), StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::renew(conn, &held, now_ms.saturating_add(lease_ms))),
        Backend::Postgres(db) => db.write(|tx| pg::renew(tx, &held, lease_ms)),
    }
}

/// Records how an attempt ended if the runner still holds the job: the final status, or `None`
/// when another runner took it.
pub(crate) fn finish(
    store: &Store,
    id: String,
    attempt: u32,
    end: RunEnd,
    now_ms: i64,
) -> Result<Option<Status>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::finish(conn, &id, attempt, &end, now_ms)),
        Backend::Postgres(db) => db.write(|tx| pg::finish(tx, &id, attempt, &end, now_ms)),
    }
}

/// Cancels a queued job now, or a running one when its call returns.
pub(crate) fn cancel(store: &Store, id: String, now_ms: i64) -> Result<Cancelled, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::cancel(conn, &id, now_ms)),
        Backend::Postgres(db) => db.write(|tx| pg::cancel(tx, &id, now_ms)),
    }
}

pub(crate) fn get(store: &Store, id: &str) -> Result<Option<Job>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::get(c, id)),
        Backend::Postgres(db) => db.query(|c| pg::get(c, id)),
    }
}

/// Up to `limit` jobs, newest first, optionally of one status, after the job `before`; `None`
/// when `before` names no job. The flag says whether more follow.
pub(crate) fn list(
    store: &Store,
    status: Option<Status>,
    limit: u32,
    before: Option<&str>,
) -> Result<Option<(Vec<Job>, bool)>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::list(c, status, limit, before)),
        Backend::Postgres(db) => db.query(|c| pg::list(c, status, limit, before)),
    }
}

/// Jobs by state, for the metrics.
pub(crate) fn counts(store: &Store) -> Result<Vec<(Status, i64)>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(sql::counts),
        Backend::Postgres(db) => db.query(pg::counts),
    }
}

/// Deletes at most `limit` jobs that finished before `cutoff_ms`, oldest first, as one batch
/// of the retention thread does; returns how many. Test-only: the thread is started before the
/// store exists and calls the backend's SQL directly.
#[cfg(test)]
pub(crate) fn expire(store: &Store, cutoff_ms: i64, limit: usize) -> Result<usize, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::expire(conn, cutoff_ms, limit)),
        Backend::Postgres(db) => db.write(|tx| pg::expire(tx, cutoff_ms, limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::stores;
    use crate::store::Store;

    #[test]
    fn many_runners_claiming_at_once_never_take_one_job_twice() {
        for t in stores("claims") {
            for i in 0..40 {
                submit(&t, new_job(&format!("j{i}"), None), 100).unwrap();
            }
            let store: &Store = &t;
            let claimed = std::sync::Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        while let Some(job) = claim(store, 10, 1_000_000).unwrap() {
                            claimed.lock().unwrap().push(job.id);
                        }
                    });
                }
            });
            let mut ids = claimed.into_inner().unwrap();
            let taken = ids.len();
            ids.sort();
            ids.dedup();
            assert_eq!(
                (taken, ids.len()),
                (40, 40),
                "a job was claimed twice or not at all"
            );
        }
    }

    fn new_job(id: &str, key: Option<&str>) -> NewJob {
        NewJob {
            id: id.to_string(),
            request: serde_json::json!({"model": "m", "messages": []}),
            metadata: None,
            model: "m".into(),
            max_attempts: 2,
            idempotency_key: key.map(str::to_string),
            key_id: None,
            created_ms: 1,
            kind: JobKind::Chat,
        }
    }

    #[test]
    fn a_jobs_kind_comes_back_with_its_claim() {
        for t in stores("job_kind") {
            let ingest = NewJob {
                request: serde_json::json!({"vector_store_id": "vs_1", "file_id": "file-1"}),
                kind: JobKind::Ingest,
                ..new_job("job_ingest", None)
            };
            submit(&t.store, ingest, 10).unwrap();
            submit(&t.store, new_job("job_chat", None), 10).unwrap();
            let first = claim(&t.store, 10, 60_000).unwrap().unwrap();
            assert_eq!(
                (first.id.as_str(), first.kind),
                ("job_ingest", JobKind::Ingest)
            );
            assert_eq!(first.request["file_id"], "file-1");
            let second = claim(&t.store, 10, 60_000).unwrap().unwrap();
            assert_eq!(second.kind, JobKind::Chat);
        }
    }

    #[test]
    fn capacity_and_idempotency_are_decided_at_submission() {
        for t in stores("jobs") {
            assert_eq!(
                submit(&t, new_job("a", Some("k")), 2).unwrap(),
                Submitted::Created("a".into())
            );
            assert_eq!(
                submit(&t, new_job("b", Some("k")), 2).unwrap(),
                Submitted::Existing("a".into())
            );
            submit(&t, new_job("c", None), 2).unwrap();
            assert_eq!(submit(&t, new_job("d", None), 2).unwrap(), Submitted::Full);
        }
    }

    #[test]
    fn a_lost_lease_lets_another_claim_and_attempts_run_out() {
        for t in stores("jobs") {
            // SQLite times leases by the times given here; PostgreSQL by its own clock, so
            // there the test waits, polling, for the lease to run out.
            let sqlite = matches!(t.backend(), Backend::Sqlite(_));
            let lease = 2_000;
            let after_lease = |at_ms: i64, done: &dyn Fn(Option<Claimed>) -> bool| {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                loop {
                    let claimed = claim(&t, at_ms, lease).unwrap();
                    if done(claimed) || sqlite {
                        return;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the lease never ran out"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            };
            submit(&t, new_job("a", None), 10).unwrap();
            let first = claim(&t, 100, lease).unwrap().unwrap();
            assert_eq!((first.id.as_str(), first.attempt), ("a", 1));
            assert!(
                claim(&t, 150, lease).unwrap().is_none(),
                "the lease still holds"
            );
            after_lease(2_101, &|claimed| {
                claimed.is_some_and(|second| {
                    assert_eq!(second.attempt, 2);
                    true
                })
            });
            // The first runner's late outcome is not recorded: it lost the job.
            let late = RunEnd::Succeeded(serde_json::json!({"x": 1}));
            assert_eq!(
                finish(&t, "a".into(), 1, late.clone(), 2_150).unwrap(),
                None
            );
            // Past the second lease with no attempts left, the job fails instead of running.
            after_lease(4_102, &|claimed| {
                assert!(claimed.is_none(), "no attempts left");
                get(&t, "a").unwrap().unwrap().status == Status::Failed
            });
            assert_eq!(get(&t, "a").unwrap().unwrap().status, Status::Failed);
        }
    }

    /// Issue 15: on PostgreSQL the instances' clocks may disagree; a job's lease runs on the
    /// database's clock, so an instance whose clock is ahead never takes a job another runs.
    #[test]
    fn on_postgresql_a_lease_runs_on_the_database_clock_whatever_an_instance_says() {
        let Some(db) = crate::store::testing::postgres_db("jobs-db-clock") else {
            return;
        };
        let t = db.open();
        let hour = 3_600_000;
        let now = crate::store::now_ms();
        submit(&t, new_job("a", None), 10).unwrap();
        // Instance A, its clock an hour behind, claims the job with a 60 s lease.
        assert_eq!(claim(&t, now - hour, 60_000).unwrap().unwrap().attempt, 1);
        // Instance B, its clock an hour ahead, sees nothing to take.
        assert!(!claimable(&t, now + hour).unwrap());
        assert!(claim(&t, now + hour, 60_000).unwrap().is_none());
        // A renews, its clock still behind: the lease still runs on the database's clock.
        renew(&t, vec![("a".into(), 1)], now - hour, 60_000).unwrap();
        assert!(claim(&t, now + hour, 60_000).unwrap().is_none());
        assert_eq!(get(&t, "a").unwrap().unwrap().status, Status::Running);
    }

    /// Issue 15, point 6: a restarted SQLite server takes its dead predecessor's running jobs
    /// at once; a second process on the same file cannot do that to a live one, and on
    /// PostgreSQL (several instances) the lease decides.
    #[test]
    fn running_jobs_resume_at_start_only_where_one_process_owns_the_file() {
        for mut t in stores("jobs-resume") {
            submit(&t, new_job("a", None), 10).unwrap();
            assert_eq!(claim(&t, 100, 1_000_000).unwrap().unwrap().attempt, 1);
            let sqlite = matches!(t.backend(), Backend::Sqlite(_));
            if let Backend::Sqlite(_) = t.backend() {
                // A second store on the same file while this one is open: not the owner.
                let second = Store::open(
                    t.database(),
                    &crate::config::Config::default().store,
                    crate::store::Keep::default(),
                    crate::metrics::Metrics::new().store,
                )
                .unwrap();
                assert_eq!(resume_orphans(&second, 200).unwrap(), 0);
                second.close();
                drop(second);
                assert!(
                    claim(&t, 200, 100).unwrap().is_none(),
                    "the lease still holds"
                );
            }
            // The process "dies" and a new one opens the file.
            t.reopen(crate::store::Keep::default());
            let resumed = resume_orphans(&t, 200).unwrap();
            assert_eq!(resumed, usize::from(sqlite));
            let again = claim(&t, 200, 100).unwrap();
            if sqlite {
                assert_eq!(again.unwrap().attempt, 2, "taken again at once");
            } else {
                assert!(again.is_none(), "on PostgreSQL the lease decides");
            }
        }
    }

    #[test]
    fn cancelling_a_running_job_ends_it_cancelled_when_it_returns() {
        for t in stores("jobs") {
            submit(&t, new_job("q", None), 10).unwrap();
            submit(&t, new_job("r", None), 10).unwrap();
            let running = claim(&t, 1, 1_000).unwrap().unwrap();
            assert_eq!(running.id, "q");
            assert_eq!(cancel(&t, "r".into(), 2).unwrap(), Cancelled::Now);
            assert_eq!(cancel(&t, "q".into(), 2).unwrap(), Cancelled::WhenItReturns);
            let done = RunEnd::Succeeded(serde_json::json!({}));
            assert_eq!(
                finish(&t, "q".into(), 1, done.clone(), 3).unwrap(),
                Some(Status::Cancelled)
            );
            assert_eq!(
                cancel(&t, "q".into(), 4).unwrap(),
                Cancelled::AlreadyFinal(Status::Cancelled)
            );
            assert_eq!(cancel(&t, "zz".into(), 4).unwrap(), Cancelled::NotFound);
            let counts = counts(&t).unwrap();
            assert!(counts.contains(&(Status::Cancelled, 2)), "{counts:?}");
        }
    }

    /// Claims the next job, which must be `id`, at `at_ms`.
    fn claim_next(store: &Store, id: &str, at_ms: i64) -> u32 {
        let job = claim(store, at_ms, 1_000_000).unwrap().unwrap();
        assert_eq!(job.id, id, "claimed out of order");
        job.attempt
    }

    /// Jobs in every state: three finished long ago (at 100, 200 and 300 ms), one finished
    /// recently (at 10,000 ms), and a queued, a running and a re-queued one, all created at 1 ms.
    fn jobs_in_every_state(store: &Store) {
        for id in [
            "done",
            "failed",
            "cancelled",
            "recent",
            "running",
            "retried",
            "queued",
        ] {
            submit(store, new_job(id, None), 100).unwrap();
        }
        let ok = RunEnd::Succeeded(serde_json::json!({"ok": true}));
        let bad = RunEnd::Failed(serde_json::json!({"code": "bad"}));
        let again = RunEnd::Retry(serde_json::json!({"code": "later"}));
        assert_eq!(
            cancel(store, "cancelled".into(), 300).unwrap(),
            Cancelled::Now
        );
        let a = claim_next(store, "done", 10);
        finish(store, "done".into(), a, ok.clone(), 100).unwrap();
        let a = claim_next(store, "failed", 10);
        finish(store, "failed".into(), a, bad, 200).unwrap();
        let a = claim_next(store, "recent", 10);
        finish(store, "recent".into(), a, ok, 10_000).unwrap();
        claim_next(store, "running", 10);
        let a = claim_next(store, "retried", 10);
        assert_eq!(
            finish(store, "retried".into(), a, again, 20).unwrap(),
            Some(Status::Queued)
        );
    }

    fn left(store: &Store) -> Vec<String> {
        let (jobs, _) = list(store, None, 100, None).unwrap().unwrap();
        let mut ids: Vec<String> = jobs.into_iter().map(|j| j.id).collect();
        ids.sort();
        ids
    }

    #[test]
    fn expiry_deletes_only_jobs_finished_before_the_cutoff_oldest_first_in_bounded_batches() {
        for t in stores("jobs-expire") {
            jobs_in_every_state(&t);
            // Two a batch: the two oldest first, then the last old one, then nothing.
            assert_eq!(expire(&t, 5_000, 2).unwrap(), 2);
            assert!(get(&t, "done").unwrap().is_none() && get(&t, "failed").unwrap().is_none());
            assert!(
                get(&t, "cancelled").unwrap().is_some(),
                "the oldest go first"
            );
            assert_eq!(expire(&t, 5_000, 2).unwrap(), 1);
            assert_eq!(expire(&t, 5_000, 2).unwrap(), 0);
            assert_eq!(left(&t), ["queued", "recent", "retried", "running"]);
            // However late the cutoff, a queued or running job is never deleted.
            assert_eq!(expire(&t, i64::MAX, 500).unwrap(), 1);
            assert_eq!(left(&t), ["queued", "retried", "running"]);
            let counts = counts(&t).unwrap();
            assert!(
                counts.contains(&(Status::Queued, 2)) && counts.contains(&(Status::Running, 1)),
                "{counts:?}"
            );
        }
    }

    #[test]
    fn retention_deletes_jobs_finished_longer_ago_than_it_keeps_and_counts_them() {
        let day = crate::time::MS_PER_DAY;
        let now = crate::store::now_ms();
        for mut t in stores("jobs-retention") {
            for (id, finished_days_ago) in [("a", 30), ("b", 8), ("c", 6), ("d", 0)] {
                submit(&t, new_job(id, None), 100).unwrap();
                cancel(&t, id.into(), now - finished_days_ago * day).unwrap();
            }
            for id in ["running", "queued"] {
                let job = new_job(id, None);
                let long_ago = now - 90 * day;
                submit(
                    &t,
                    NewJob {
                        created_ms: long_ago,
                        ..job
                    },
                    100,
                )
                .unwrap();
            }
            // Its lease ran out 80 days ago, but it is running until a runner takes it again.
            claim_next(&t, "running", now - 80 * day);
            t.reopen(crate::store::Keep {
                log_days: 0,
                jobs_days: 7,
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while t.metrics.jobs_expired.get() < 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert_eq!(left(&t), ["c", "d", "queued", "running"]);
            assert_eq!(t.metrics.jobs_expired.get(), 2);
            assert_eq!(t.metrics.log_rows_expired.get(), 0);
            assert!(get(&t, "a").unwrap().is_none(), "a deleted job is unknown");
        }
    }
}
