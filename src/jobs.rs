//! The durable job runner: `[jobs] workers` threads of its own (never the request workers)
//! that take jobs from the database with a lease, run each as a chat completion through the
//! same routing, retries and fallbacks as `/v1`, and record how it ended.
//!
//! At least once: a job is claimed by an acknowledged write that sets its lease, and a lease
//! thread renews the leases of the jobs this process runs. If the process dies, or a run
//! stalls past its lease, the job's lease runs out and the next claim takes it again with one
//! more attempt; after `max_attempts` runs it fails. An idle runner looks for work with a read
//! (no write, no fsync) and sleeps until a submission wakes it or a lease may have run out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::chat::{self, completion_json};
use crate::api::record::Record;
use crate::api::ApiError;
use crate::providers::{self, Answer, Call, ProviderError, UpstreamClock};
use crate::server::State;
use crate::store::jobs::{self as store, Claimed, JobKind, RunEnd, Status};
use crate::store::vector_stores::{self, Reclaimed};
use crate::store::{now_ms, StoreError};

/// Stack of a runner thread: a provider call and JSON, as a request worker's.
const RUNNER_STACK_BYTES: usize = 512 * 1024;
/// How often the lease thread deletes files past their `expires_at` (`/v1/files`) and gives
/// back the chunks of expired vector stores.
const EXPIRE_FILES_EVERY: Duration = Duration::from_secs(60);
/// Chunks of expired vector stores deleted in one round of the lease thread at most (four
/// transactions, about half a second on SQLite), so it is back to renewing leases long before
/// one runs out; the rest waits for the next round.
const RECLAIM_PER_ROUND: u64 = 1_000;
/// How often the lease thread counts files and chunks for `/metrics`.
const COUNT_KNOWLEDGE_EVERY: Duration = Duration::from_secs(10);
/// The longest an idle runner sleeps before looking for work again (a lease of a dead process
/// may have run out meanwhile; submissions in this process wake it at once).
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// How the API reaches the runners: it rings when a job was submitted. Lives in the
/// server's state; the runner threads share it.
pub(crate) struct JobBell {
    shared: Arc<Shared>,
}

impl JobBell {
    pub(crate) fn new() -> JobBell {
        JobBell {
            shared: Arc::new(Shared {
                work: Mutex::new(true),
                arrived: Condvar::new(),
                stopping: AtomicBool::new(false),
                stop_lock: Mutex::new(()),
                stopped: Condvar::new(),
                held: Mutex::new(HashMap::new()),
                ingesting: Slots::default(),
            }),
        }
    }

    /// A job was submitted: wakes one idle runner.
    pub(crate) fn notify(&self) {
        *lock(&self.shared.work) = true;
        self.shared.arrived.notify_one();
    }
}

/// The running job threads.
pub(crate) struct Runner {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// What the runner threads share.
struct Shared {
    /// Set on every submission; runners sleep on it when there is nothing to claim.
    work: Mutex<bool>,
    arrived: Condvar,
    stopping: AtomicBool,
    /// The lease thread sleeps here between rounds; shutdown wakes it.
    stop_lock: Mutex<()>,
    stopped: Condvar,
    /// Jobs this process is running, and their attempt: the leases to renew.
    held: Mutex<HashMap<String, u32>>,
    /// Ingestions running now: at most `[knowledge] max_ingesting` of the runner's threads
    /// ingest at once; the others wait here (their leases renewed meanwhile).
    ingesting: Slots,
}

/// A count of slots taken, and a wait for one to come back.
#[derive(Default)]
struct Slots {
    taken: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    /// Waits until fewer than `max` are taken, then takes one until the guard is dropped.
    fn take(&self, max: usize) -> SlotGuard<'_> {
        let mut taken = lock(&self.taken);
        while *taken >= max.max(1) {
            taken = self
                .freed
                .wait(taken)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *taken += 1;
        SlotGuard(self)
    }
}

/// A taken slot, given back when dropped.
struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.taken) -= 1;
        self.0.freed.notify_one();
    }
}

impl Runner {
    /// Starts `[jobs] workers` runner threads and the lease thread. They hold the server's
    /// state weakly, so they never keep it alive past shutdown.
    pub(crate) fn spawn(state: &Arc<State>) -> std::io::Result<Runner> {
        resume_orphans(state);
        let shared = Arc::clone(&state.jobs.shared);
        let mut threads = Vec::new();
        for i in 0..state.config.jobs.workers {
            let (state, shared) = (Arc::downgrade(state), Arc::clone(&shared));
            threads.push(
                thread::Builder::new()
                    .name(format!("sg-job-{i}"))
                    .stack_size(RUNNER_STACK_BYTES)
                    .spawn(move || run_jobs(&state, &shared))?,
            );
        }
        let (state, lease_shared) = (Arc::downgrade(state), Arc::clone(&shared));
        threads.push(
            thread::Builder::new()
                .name("sg-job-lease".into())
                .spawn(move || keep_leases(&state, &lease_shared))?,
        );
        Ok(Runner { shared, threads })
    }

    /// Stops taking jobs and waits until `deadline` for running ones to end. A job still
    /// running then keeps its lease in the file and runs again after it runs out.
    pub(crate) fn stop(self, deadline: Instant) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.arrived.notify_all();
        {
            let _guard = lock(&self.shared.stop_lock);
            self.shared.stopped.notify_all();
        }
        for thread in self.threads {
            while !thread.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// Before the first claim: jobs a dead process left running are taken again now where no
/// other process can be running them (a SQLite file this process owns), not after their
/// leases (`[jobs] lease_ms`) run out.
fn resume_orphans(state: &State) {
    match store::resume_orphans(&state.store, now_ms()) {
        Ok(0) => {}
        Ok(n) => log::info!(
            "{n} jobs were running when the last process stopped: they are taken again now"
        ),
        Err(e) => {
            state.metrics.store.count_error(e.kind());
            log::warn!("cannot take back the jobs left running: {e}; their leases will");
        }
    }
}

/// A runner thread's life: claim, run, record; sleep when there is nothing to claim.
fn run_jobs(state: &Weak<State>, shared: &Shared) {
    while !shared.stopping.load(Ordering::SeqCst) {
        let Some(state) = state.upgrade() else { return };
        match claim(&state) {
            Ok(Some(job)) => {
                lock(&shared.held).insert(job.id.clone(), job.attempt);
                run_one(&state, shared, &job);
                lock(&shared.held).remove(&job.id);
            }
            Ok(None) => {
                drop(state);
                wait_for_work(shared);
            }
            Err(e) => {
                state.metrics.store.count_error(e.kind());
                log::warn!("job runner cannot claim a job: {e}");
                drop(state);
                wait_for_work(shared);
            }
        }
    }
}

fn wait_for_work(shared: &Shared) {
    let mut work = lock(&shared.work);
    if !*work && !shared.stopping.load(Ordering::SeqCst) {
        work = shared
            .arrived
            .wait_timeout(work, IDLE_LOOK)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    *work = false;
}

/// Takes a job if there is one: a read first, so idle runners never write.
fn claim(state: &State) -> Result<Option<Claimed>, StoreError> {
    let now = now_ms();
    if !store::claimable(&state.store, now)? {
        return Ok(None);
    }
    let lease_ms = state.config.jobs.lease.as_millis() as i64;
    let job = store::claim(&state.store, now, lease_ms)?;
    if let Some(job) = &job {
        if job.attempt == 1 {
            let waited = (now - job.created_ms).max(0) as f64 / 1000.0;
            state.metrics.jobs.wait_seconds.observe(waited);
        }
    }
    Ok(job)
}

/// Runs one attempt of a job and records how it ended.
fn run_one(state: &State, shared: &Shared, job: &Claimed) {
    let started = Instant::now();
    let end = match job.kind {
        JobKind::Chat => execute(state, job),
        JobKind::Ingest => {
            let _slot = shared.ingesting.take(state.config.knowledge.max_ingesting);
            crate::ingest::run(state, job)
        }
    };
    state
        .metrics
        .jobs
        .run_seconds
        .observe(started.elapsed().as_secs_f64());
    let recorded = store::finish(&state.store, job.id.clone(), job.attempt, end, now_ms());
    match recorded {
        Ok(Some(status)) => log::info!(
            "job {} attempt {} ended {}",
            job.id,
            job.attempt,
            status.name()
        ),
        // Another runner took the job when this one's lease ran out: its outcome counts.
        Ok(None) => log::warn!(
            "job {} attempt {} ended after losing its lease; not recorded",
            job.id,
            job.attempt
        ),
        // The lease runs out and the job runs again.
        Err(e) => {
            state.metrics.store.count_error(e.kind());
            log::error!("cannot record the end of job {}: {e}", job.id);
        }
    }
}

/// The job's chat completion: the same routing, retries and fallbacks as `/v1`.
fn execute(state: &State, job: &Claimed) -> RunEnd {
    let body = serde_json::to_vec(&job.request).unwrap_or_default();
    let chat = match chat::parse(&body) {
        Ok(chat) => chat,
        Err(e) => return RunEnd::Failed(error_json(&e)),
    };
    let Some(targets) = state.providers.route(&chat.model) else {
        return RunEnd::Failed(error_json(&ApiError::ModelNotFound(chat.model)));
    };
    let call = Call {
        path: "/chat/completions",
        body: &chat.raw,
        stream: false,
    };
    let mut clock = UpstreamClock::default();
    match providers::call(targets, &call, &state.metrics, &mut clock) {
        Ok((Answer::Mock, served)) => {
            let reply = chat::mock_reply(state, &Record::default(), &chat, &served);
            let id = format!("chatcmpl-{}", job.id);
            RunEnd::Succeeded(completion_json(&id, &chat.model, &reply))
        }
        Ok((Answer::Json { value, .. }, served)) => {
            chat::json_usage(state, &Record::default(), &served, &chat.model, &value);
            RunEnd::Succeeded(value)
        }
        Ok((Answer::Stream { .. }, _)) => RunEnd::Failed(error_json(&ApiError::Internal)),
        Err(e) => {
            let retry = is_transient(&e);
            let error = error_json(&ApiError::Provider(e));
            if retry {
                RunEnd::Retry(error)
            } else {
                RunEnd::Failed(error)
            }
        }
    }
}

/// Whether another attempt may succeed: the provider was down, slow, busy or failing, not
/// refusing the request itself.
pub(crate) fn is_transient(e: &ProviderError) -> bool {
    match e {
        ProviderError::Status { status, .. } => *status == 429 || *status >= 500,
        ProviderError::Unavailable { .. } => false,
        _ => true,
    }
}

fn error_json(e: &ApiError) -> Value {
    e.object()
}

/// The lease thread: renews the leases of the jobs this process runs, and refreshes the jobs
/// gauges, every third of a lease (at most every second). Once a minute it also deletes
/// expired files and reclaims expired vector stores, the latter over as many rounds as it
/// takes.
fn keep_leases(state: &Weak<State>, shared: &Shared) {
    let mut expired_at = Instant::now() - EXPIRE_FILES_EVERY;
    let mut counted_at = Instant::now() - COUNT_KNOWLEDGE_EVERY;
    // A sweep of expired vector stores under way, and what it gave back so far.
    let mut reclaiming: Option<Reclaimed> = None;
    loop {
        let Some(state) = state.upgrade() else { return };
        let every = (state.config.jobs.lease / 3).min(Duration::from_secs(1));
        let held: Vec<(String, u32)> = lock(&shared.held)
            .iter()
            .map(|(id, attempt)| (id.clone(), *attempt))
            .collect();
        if !held.is_empty() {
            let lease_ms = state.config.jobs.lease.as_millis() as i64;
            let renewed = store::renew(&state.store, held, now_ms(), lease_ms);
            if let Err(e) = renewed {
                state.metrics.store.count_error(e.kind());
                log::warn!("cannot renew job leases: {e}");
            }
        }
        if expired_at.elapsed() >= EXPIRE_FILES_EVERY {
            expired_at = Instant::now();
            match crate::store::files::delete_expired(&state.store, now_ms() / 1000) {
                Ok(0) => {}
                Ok(n) => log::info!("deleted {n} files past their expires_at"),
                Err(e) => log::warn!("cannot delete expired files: {e}"),
            }
            reclaiming.get_or_insert_with(Reclaimed::default);
        }
        if let Some(so_far) = &mut reclaiming {
            if !reclaim_expired_stores(&state, so_far) {
                reclaiming = None;
            }
        }
        if counted_at.elapsed() >= COUNT_KNOWLEDGE_EVERY {
            counted_at = Instant::now();
            match crate::store::chunks::totals(&state.store) {
                Ok((files, chunks)) => {
                    state.metrics.knowledge_files.set(files);
                    state.metrics.knowledge_chunks.set(chunks);
                }
                Err(e) => log::warn!("cannot count the knowledge base: {e}"),
            }
        }
        if let Err(e) = refresh_gauges(&state) {
            state.metrics.store.count_error(e.kind());
            log::warn!("cannot count jobs: {e}");
        }
        drop(state);
        let guard = lock(&shared.stop_lock);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let _ = shared.stopped.wait_timeout(guard, every);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// One round of a sweep of expired vector stores: gives back at most `RECLAIM_PER_ROUND`
/// chunks, drops those stores' vectors from this process's cache and adds them to `so_far`.
/// True when more is left for the next round; the sweep's totals are logged at its end.
fn reclaim_expired_stores(state: &State, so_far: &mut Reclaimed) -> bool {
    let now = now_ms() / 1000;
    match vector_stores::reclaim_expired(&state.store, now, RECLAIM_PER_ROUND) {
        Ok(round) => {
            for id in round.stores {
                state.matrices.remove(&id);
                if !so_far.stores.contains(&id) {
                    so_far.stores.push(id);
                }
            }
            so_far.chunks += round.chunks;
            if round.more {
                return true;
            }
        }
        Err(e) => {
            state.metrics.store.count_error(e.kind());
            log::warn!("cannot reclaim expired vector stores: {e}");
        }
    }
    if so_far.chunks > 0 {
        log::info!(
            "reclaimed {} chunks from {} expired vector stores",
            so_far.chunks,
            so_far.stores.len()
        );
    }
    false
}

fn refresh_gauges(state: &State) -> Result<(), StoreError> {
    for (status, n) in store::counts(&state.store)? {
        state
            .metrics
            .jobs
            .by_state
            .with_label_values(&[status.name()])
            .set(n);
    }
    Ok(())
}

/// The job states, for the metrics' labels.
pub(crate) fn state_names() -> impl Iterator<Item = &'static str> {
    store::STATUSES.iter().map(|s: &Status| s.name())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
