//! The server: the state every thread shares, start-up (limits, listener, workers, acceptor)
//! and graceful shutdown.

mod accept;
pub(crate) mod admission;
mod conn;
mod handoff;
mod pool;
mod waits;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use crossbeam_channel::Sender;

use crate::auth::Auth;
use crate::batch;
use crate::cluster::{Instance, Lease};
use crate::config::Config;
use crate::jobs::{JobBell, Runner};
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::store::Store;
pub(crate) use accept::raise_open_files_limit;
use accept::Acceptor;
use admission::{Job, ServiceTime};
pub(crate) use handoff::Doorbell;
pub(crate) use handoff::Handback;
use pool::Pool;

/// What every connection thread and worker shares.
pub(crate) struct State {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) providers: Providers,
    /// The database: request log, conversations, keys.
    pub(crate) store: Store,
    /// Who may call: the keyring, the admin key, the per-key limits.
    pub(crate) auth: Auth,
    /// This process among the instances serving the database.
    pub(crate) instance: Arc<Instance>,
    /// Wakes the job runners when a job is submitted.
    pub(crate) jobs: JobBell,
    /// Where the calls of `POST /api/batch` run.
    pub(crate) batch: batch::Pool,
    /// The last 15 minutes for the console, one sample a second (the `sg-status` thread).
    pub(crate) history: crate::api::status::History,
    /// Vector stores' vectors loaded for search, within `[knowledge] cache_mb`.
    pub(crate) matrices: crate::knowledge::cache::MatrixCache,
    queue: Sender<Job>,
    /// Wakes a worker for each job sent to `queue`.
    doorbell: Doorbell,
    draining: AtomicBool,
    /// Requests admitted (queued or in service) and not yet answered.
    pending: AtomicUsize,
    /// When each request not yet taken by a worker was enqueued (the oldest wait).
    waits: waits::Waits,
    service_time: ServiceTime,
}

impl State {
    /// Requests admitted at most: one per worker plus the queue slots.
    pub(crate) fn capacity(&self) -> usize {
        self.config.capacity.workers + self.config.capacity.queue
    }

    /// Requests waiting because every worker is busy: admitted beyond the workers' number.
    /// (Jobs just sent to idle workers that have not woken yet are not waiting for capacity.)
    pub(crate) fn queue_len(&self) -> usize {
        self.pending
            .load(Ordering::SeqCst)
            .saturating_sub(self.config.capacity.workers)
    }

    /// How long the oldest request not yet taken by a worker has waited; `None` when none
    /// waits. Lock-free, for the fast lane.
    pub(crate) fn oldest_wait(&self) -> Option<std::time::Duration> {
        self.waits.oldest(Instant::now())
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Seconds a client refused for a full queue should wait before retrying.
    pub(crate) fn retry_after_s(&self) -> u64 {
        admission::retry_after_secs(
            self.queue_len(),
            self.service_time.mean(),
            self.config.capacity.workers,
        )
    }
}

/// A running server.
pub(crate) struct Server {
    state: Arc<State>,
    acceptor: Acceptor,
    pool: Pool,
    batch_threads: batch::Threads,
    key_watch: Periodic,
    sampler: Periodic,
    job_runner: Runner,
    /// The lease thread, on PostgreSQL.
    lease: Option<Lease>,
    addr: SocketAddr,
}

impl Server {
    /// Checks the process can honour the limits, binds, and starts workers and the acceptor.
    pub(crate) fn start(config: Config, admin_key: Option<&str>) -> anyhow::Result<Server> {
        let capacity = &config.capacity;
        // Batch threads hold upstream connections as workers do.
        let threads = capacity.workers + config.batch.threads;
        let needed = accept::fds_needed(capacity.max_connections, threads);
        let open_files = raise_open_files_limit(needed).map_err(|why| {
            anyhow::anyhow!(
                "cannot honour max_connections = {} with {} workers and {} batch threads: {why}",
                capacity.max_connections,
                capacity.workers,
                config.batch.threads
            )
        })?;
        let listener = TcpListener::bind(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        // std listens with a backlog of 128; a burst of new connections larger than that would
        // see SYNs dropped and retried a second later. Listening again resizes the backlog
        // (the kernel caps it at net.core.somaxconn).
        let backlog = capacity.max_connections.clamp(128, 65_535) as libc::c_int;
        // SAFETY: the descriptor is our own listening socket, alive for this call.
        unsafe { libc::listen(listener.as_raw_fd(), backlog) };
        let addr = listener
            .local_addr()
            .context("cannot read the listening address")?;

        // Admission counts requests against workers + queue, so the channel never fills.
        let (queue, jobs) = crossbeam_channel::bounded(capacity.workers + capacity.queue);
        let metrics = Metrics::new();
        metrics.queue_capacity.set(capacity.queue as i64);
        metrics.connections_max.set(capacity.max_connections as i64);
        let store = Store::open(
            &config.db,
            &config.store,
            crate::store::Keep {
                log_days: config.log.retention_days,
                jobs_days: config.jobs.retention_days,
            },
            metrics.store.clone(),
        )?;
        let shape = match &config.db {
            crate::database::Database::Sqlite(_) => "read connections, one writer",
            crate::database::Database::Postgres(_) => "connections, one log writer",
        };
        log::info!(
            "database {} ({} {shape})",
            config.db,
            config.store.read_pool
        );
        // On PostgreSQL this instance registers and the keys' limits are kept in the database,
        // so that they hold across every instance; on SQLite they stay in this process.
        let instance = Arc::new(Instance::new(addr.to_string()));
        let (limiter, lease) = match &config.db {
            crate::database::Database::Sqlite(_) => (Limiter::new(), None),
            crate::database::Database::Postgres(_) => {
                let lease = Lease::start(Arc::clone(&instance), &store, config.limits.lease)?;
                let db = crate::store::limits::connections(&store, config.limits.pool)
                    .map_err(|e| anyhow::anyhow!("cannot open the limiter's connections: {e}"))?;
                let shared = crate::limits::Shared::new(
                    db,
                    Arc::clone(&instance),
                    config.limits.on_store_error,
                    metrics.limit_store_errors.clone(),
                );
                (Limiter::shared(shared), Some(lease))
            }
        };
        let auth = authorization(&config, &store, admin_key, limiter)?;
        let providers = Providers::from_config(&config);
        for (name, cap) in providers.caps() {
            metrics.register_provider(name, cap);
        }
        log::info!(
            "capacity: {} workers, {} queue slots, max queue wait {} ms, {} connections (open-files limit {open_files})",
            capacity.workers,
            capacity.queue,
            capacity.max_queue_wait.as_millis(),
            capacity.max_connections,
        );
        let b = &config.batch;
        log::info!(
            "batch pool: {} threads, {} queue slots; a batch has at most {} calls, {} at once",
            b.threads,
            b.queue,
            b.max_items,
            b.parallelism
        );
        let (batch, batch_tasks) = batch::Pool::new(b);
        let waits = waits::Waits::new(capacity.workers + capacity.queue);
        let knowledge_cache_bytes = config.knowledge.cache_bytes;
        let state = Arc::new(State {
            config,
            metrics,
            providers,
            store,
            auth,
            instance,
            jobs: JobBell::new(),
            batch,
            history: Default::default(),
            matrices: crate::knowledge::cache::MatrixCache::new(
                usize::try_from(knowledge_cache_bytes).unwrap_or(usize::MAX),
            ),
            queue,
            doorbell: Doorbell::new(),
            draining: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            waits,
            service_time: ServiceTime::new(),
        });
        let batch_threads =
            batch::spawn(&state, batch_tasks).context("cannot start the batch threads")?;
        let pool = Pool::spawn(&state, jobs).context("cannot start the worker threads")?;
        let key_watch = {
            let state = Arc::clone(&state);
            Periodic::spawn("sg-keys", KEY_WATCH_EVERY, move || watch_keys(&state))
                .context("cannot start the key watcher")?
        };
        let sampler = {
            let state = Arc::clone(&state);
            Periodic::spawn("sg-status", SAMPLE_EVERY, move || {
                crate::api::status::record(&state)
            })
            .context("cannot start the status sampler")?
        };
        let job_runner = Runner::spawn(&state).context("cannot start the job runner")?;
        let acceptor = Acceptor::spawn(listener, Arc::clone(&state))
            .context("cannot start the acceptor thread")?;
        Ok(Server {
            state,
            acceptor,
            pool,
            batch_threads,
            key_watch,
            sampler,
            job_runner,
            lease,
            addr,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful shutdown: refuse new work (503 `draining`), stop accepting, let queued and
    /// in-flight requests finish within the grace period, then stop and join the workers and,
    /// once no batch is left to send them calls, the batch threads.
    /// Returns false if work was still running when the grace period ended.
    pub(crate) fn shutdown(mut self) -> bool {
        let state = &self.state;
        let deadline = Instant::now() + state.config.shutdown_grace;
        state.draining.store(true, Ordering::SeqCst);
        self.acceptor.stop();
        let in_flight = state.pending.load(Ordering::SeqCst);
        log::info!("draining: {in_flight} requests queued or in flight");
        let drained = if pool::wait_idle(state, deadline) {
            self.pool.join();
            self.batch_threads.join();
            log::info!("drained: every request answered, workers and batch threads stopped");
            true
        } else {
            log::warn!(
                "shutdown grace period ended with {} requests unfinished; exiting anyway",
                state.pending.load(Ordering::SeqCst)
            );
            false
        };
        self.key_watch.stop();
        self.sampler.stop();
        // Jobs still running at the deadline keep their leases and run again after restart.
        self.job_runner.stop(deadline);
        // Nothing is in flight any more: the other instances may forget this one now.
        if let Some(lease) = &self.lease {
            lease.stop();
        }
        // The request log rows still queued are committed before the process exits.
        self.state.store.close();
        drained
    }
}

/// The keyring at start, and the policy for requests without a key: with no key in the file, a
/// loopback listener serves everyone (development mode, said once); any other address refuses
/// to start unless `--allow-open`.
fn authorization(
    config: &Config,
    store: &Store,
    admin_key: Option<&str>,
    limiter: Limiter,
) -> anyhow::Result<Auth> {
    let loopback = config.listen.ip().is_loopback();
    let auth = Auth::new(admin_key, loopback || config.allow_open, limiter);
    auth.refresh(store)
        .map_err(|e| anyhow::anyhow!("cannot read the API keys: {e}"))?;
    let keys = auth.active_keys();
    if keys > 0 {
        log::info!("{keys} API keys: every /v1 and /api request needs one");
    } else if loopback {
        log::warn!(
            "development mode: no API keys exist and {} is a loopback address, so requests \
             need no key; `syncgate keys create` makes one and ends this mode",
            config.listen
        );
    } else if config.allow_open {
        log::warn!(
            "--allow-open: no API keys exist, so anyone who reaches {} may call it",
            config.listen
        );
    } else {
        anyhow::bail!(
            "refusing to serve {} with no API keys: anyone who reaches it could call your \
             providers. Create a key first (`syncgate keys create --db {} --name NAME`), \
             listen on a loopback address, or pass --allow-open",
            config.listen,
            config.db
        );
    }
    if admin_key.is_none() {
        log::info!("admin API off (SYNCGATE_ADMIN_KEY is not set)");
    }
    Ok(auth)
}

/// How often the keyring looks for changes made by another process (`syncgate keys`).
const KEY_WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the console's history takes a sample.
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads the keyring when the keys' generation in the file moved.
fn watch_keys(state: &State) {
    match state.auth.refresh(&state.store) {
        Ok(true) => log::info!(
            "API keys changed in the database: {} active",
            state.auth.active_keys()
        ),
        Ok(false) => {}
        Err(e) => {
            state.metrics.store.count_error(e.kind());
            log::warn!("cannot look for API key changes: {e}");
        }
    }
}

/// A thread that does one small thing every period until stopped: the key watcher and the
/// console's sampler.
struct Periodic {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Periodic {
    fn spawn(
        name: &str,
        every: std::time::Duration,
        mut tick: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Periodic> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    tick();
                }
            })?;
        Ok(Periodic {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
