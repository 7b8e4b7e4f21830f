//! The worker pool: a fixed number of threads, each taking one request at a time off the
//! bounded queue and seeing it through, stream included. A panicking handler becomes a 500
//! and the worker lives on.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::admission::{respond, Job};
use super::State;
use crate::api::{self, ApiError};

/// Stack of a worker thread: JSON parsing is bounded by serde_json's recursion limit, and the
/// provider calls to come (ureq) keep their buffers on the heap.
const WORKER_STACK_BYTES: usize = 512 * 1024;

pub(crate) struct Pool {
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub(crate) fn spawn(state: &Arc<State>, jobs: Receiver<Job>) -> io::Result<Pool> {
        let mut threads = Vec::with_capacity(state.config.capacity.workers);
        for i in 0..state.config.capacity.workers {
            let (state, jobs) = (Arc::clone(state), jobs.clone());
            let thread = thread::Builder::new()
                .name(format!("sg-worker-{i}"))
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || work(&state, &jobs))?;
            threads.push(thread);
        }
        state.metrics.workers.set(threads.len() as i64);
        Ok(Pool {
            state: Arc::clone(state),
            threads,
        })
    }

    /// Tells every worker to exit once idle and waits for them all.
    pub(crate) fn join(self) {
        self.state.doorbell.close();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A worker's life: wait on the doorbell, take the one job it announced, serve it. Every ring
/// follows a completed send, so the job is there to take.
fn work(state: &State, jobs: &Receiver<Job>) {
    while state.doorbell.wait() {
        if let Ok(job) = jobs.try_recv() {
            serve(state, job);
        }
    }
}

/// Serves one queued request: refuse it if it waited too long, else run the handler (a panic
/// becomes a 500), write the answer, and hand the connection back.
fn serve(state: &State, job: Job) {
    let started = Instant::now();
    state.waits.leave(job.waiting);
    let waited = started.duration_since(job.enqueued);
    state.metrics.queue_wait.observe(waited.as_secs_f64());
    let Job {
        request,
        route,
        stream,
        handback,
        ..
    } = job;
    state.metrics.workers_busy.inc();
    let stale = waited > state.config.capacity.max_queue_wait;
    let result = if stale {
        Err(ApiError::QueueTimeout {
            waited_ms: waited.as_millis() as u64,
        })
    } else {
        panic::catch_unwind(AssertUnwindSafe(|| api::handle(state, route, &request)))
            .unwrap_or_else(|_| {
                state.metrics.handler_panics.inc();
                Err(ApiError::Internal)
            })
    };
    // A stream body runs while it is written, so writing can panic too; the head may already
    // be out, so the only safe answer then is to close.
    let back = panic::catch_unwind(AssertUnwindSafe(|| {
        respond(
            state,
            &request,
            route.template(),
            result,
            stream,
            Some(waited),
        )
    }))
    .unwrap_or_else(|_| {
        state.metrics.handler_panics.inc();
        None
    });
    state.metrics.workers_busy.dec();
    // Only real service counts toward the Retry-After estimate, not instant refusals.
    if !stale {
        state.service_time.observe(started.elapsed());
    }
    handback.give(back);
    state.pending.fetch_sub(1, Ordering::SeqCst);
}

/// Waits until every admitted request has been answered, or `deadline`; true if all were.
pub(crate) fn wait_idle(state: &State, deadline: Instant) -> bool {
    while state.pending.load(Ordering::SeqCst) > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        // Shutdown only: a short poll is simpler than another wake-up channel on the hot path.
        thread::sleep(Duration::from_millis(5));
    }
    true
}
