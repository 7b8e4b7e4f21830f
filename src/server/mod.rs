//! The server: the state every thread shares, start-up (limits, listener, workers, acceptor)
//! and graceful shutdown.

pub(crate) mod admission;
mod handoff;
mod pool;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use crossbeam_channel::Sender;

use crate::config::Config;
use crate::http::{self, Acceptor};
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::store::Store;
use admission::{Job, ServiceTime};
use handoff::Doorbell;
pub(crate) use handoff::Handback;
use pool::Pool;

/// What every connection thread and worker shares.
pub(crate) struct State {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) providers: Providers,
    /// The database: request log, conversations.
    pub(crate) store: Store,
    queue: Sender<Job>,
    /// Wakes a worker for each job sent to `queue`.
    doorbell: Doorbell,
    draining: AtomicBool,
    /// Requests admitted (queued or in service) and not yet answered.
    pending: AtomicUsize,
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
    addr: SocketAddr,
}

impl Server {
    /// Checks the process can honour the limits, binds, and starts workers and the acceptor.
    pub(crate) fn start(config: Config) -> anyhow::Result<Server> {
        let capacity = &config.capacity;
        let needed = http::fds_needed(capacity.max_connections, capacity.workers);
        let open_files = http::raise_open_files_limit(needed).map_err(|why| {
            anyhow::anyhow!(
                "cannot honour max_connections = {} with {} workers: {why}",
                capacity.max_connections,
                capacity.workers
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
            config.log.retention_days,
            metrics.store.clone(),
        )?;
        log::info!(
            "database {} ({} read connections, one writer)",
            config.db.display(),
            config.store.read_pool
        );
        let providers = Providers::from_config(&config);
        for name in providers.names() {
            metrics.register_provider(name);
        }
        log::info!(
            "capacity: {} workers, {} queue slots, max queue wait {} ms, {} connections (open-files limit {open_files})",
            capacity.workers,
            capacity.queue,
            capacity.max_queue_wait.as_millis(),
            capacity.max_connections,
        );
        let state = Arc::new(State {
            config,
            metrics,
            providers,
            store,
            queue,
            doorbell: Doorbell::new(),
            draining: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            service_time: ServiceTime::new(),
        });
        let pool = Pool::spawn(&state, jobs).context("cannot start the worker threads")?;
        let acceptor = Acceptor::spawn(listener, Arc::clone(&state))
            .context("cannot start the acceptor thread")?;
        Ok(Server {
            state,
            acceptor,
            pool,
            addr,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful shutdown: refuse new work (503 `draining`), stop accepting, let queued and
    /// in-flight requests finish within the grace period, then stop and join the workers.
    /// Returns false if work was still running when the grace period ended.
    pub(crate) fn shutdown(self) -> bool {
        let state = &self.state;
        let deadline = Instant::now() + state.config.shutdown_grace;
        state.draining.store(true, Ordering::SeqCst);
        self.acceptor.stop();
        let in_flight = state.pending.load(Ordering::SeqCst);
        log::info!("draining: {in_flight} requests queued or in flight");
        let drained = if pool::wait_idle(state, deadline) {
            self.pool.join();
            log::info!("drained: every request answered, workers stopped");
            true
        } else {
            log::warn!(
                "shutdown grace period ended with {} requests unfinished; exiting anyway",
                state.pending.load(Ordering::SeqCst)
            );
            false
        };
        // The request log rows still queued are committed before the process exits.
        state.store.close();
        drained
    }
}
