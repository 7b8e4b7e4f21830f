//! The batch pool: `[batch] threads` plain threads that run the calls of `POST /api/batch`
//! side by side, fed by a bounded queue of `[batch] queue` calls.
//!
//! The calls get threads of their own because each blocks on a provider for as long as the
//! provider takes: on rayon's pool that would starve every other user of it, and on the request
//! workers one batch of 64 would take 64 workers from everyone else. Each batch keeps at most
//! `[batch] parallelism` of its calls in the pool (running or queued), so no one batch takes
//! every thread, and a batch that finds the pool full waits for room only so long before its
//! remaining calls are answered 503 `batch_pool_full`.
//!
//! The threads sleep on the same doorbell as the request workers (`server::Doorbell`: a
//! count under a mutex, idle threads parked) and take calls with `try_recv`, so an idle pool
//! costs no CPU and crossbeam's spinning `recv` is never used.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::BatchConfig;
use crate::server::{Doorbell, State};

/// Stack of a pool thread: the same work as a request worker's (a provider call, TLS included,
/// and its JSON), so the same size; only the touched pages become resident.
const THREAD_STACK_BYTES: usize = 512 * 1024;

/// One call of a batch, run on a pool thread.
pub(crate) type Call<T> = Box<dyn FnOnce(&State) -> T + Send>;

/// What a pool thread runs: a call wrapped to deliver its result to its batch.
pub(crate) type Task = Box<dyn FnOnce(&State) + Send>;

/// Why a call of a batch has no result of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missed {
    /// The pool had no room for it within the batch's wait: it was never run.
    PoolFull,
    /// It panicked, or was dropped without running (the pool's threads were gone).
    Lost,
}

/// The pool's sending side, shared by every batch through the server's state.
pub(crate) struct Pool {
    tasks: Sender<Task>,
    /// Wakes a pool thread for each task sent.
    doorbell: Doorbell,
    /// Calls in the pool, running or queued, against `threads + queue`.
    slots: Slots,
}

impl Pool {
    /// The pool and the receiving end its threads take from ([`spawn`]). The channel holds
    /// `threads + queue` tasks and a task is sent only with a slot taken, so it never fills.
    pub(crate) fn new(config: &BatchConfig) -> (Pool, Receiver<Task>) {
        let capacity = config.threads + config.queue;
        let (tasks, receiver) = crossbeam_channel::bounded(capacity);
        let pool = Pool {
            tasks,
            doorbell: Doorbell::new(),
            slots: Slots::new(capacity),
        };
        (pool, receiver)
    }

    /// Calls sent and not yet taken by a thread.
    pub(crate) fn queue_len(&self) -> usize {
        self.tasks.len()
    }

    /// Sends a task whose slot is already taken. Should the threads be gone, the task is
    /// dropped, which answers its call as lost, and the slot is given back.
    fn send(&self, task: Task) {
        match self.tasks.try_send(task) {
            Ok(()) => self.doorbell.ring(),
            Err(_) => self.slots.give(),
        }
    }
}

/// The pool's threads, joined at shutdown.
pub(crate) struct Threads {
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts `[batch] threads` threads on `tasks`.
pub(crate) fn spawn(state: &Arc<State>, tasks: Receiver<Task>) -> io::Result<Threads> {
    let mut threads = Vec::with_capacity(state.config.batch.threads);
    for i in 0..state.config.batch.threads {
        let (state, tasks) = (Arc::clone(state), tasks.clone());
        let thread = thread::Builder::new()
            .name(format!("sg-batch-{i}"))
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || work(&state, &tasks))?;
        threads.push(thread);
    }
    Ok(Threads {
        state: Arc::clone(state),
        threads,
    })
}

impl Threads {
    /// Lets every thread leave once the tasks already sent are run, and waits for them all.
    pub(crate) fn join(self) {
        self.state.batch.doorbell.close();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A pool thread's life: wait on the doorbell, take the one task it announced, run it. A
/// panicking call is answered as lost (its delivery is dropped) and the thread lives on.
fn work(state: &State, tasks: &Receiver<Task>) {
    let pool = &state.batch;
    while pool.doorbell.wait() {
        if let Ok(task) = tasks.try_recv() {
            state.metrics.batch_pool_busy.inc();
            if panic::catch_unwind(AssertUnwindSafe(|| task(state))).is_err() {
                state.metrics.handler_panics.inc();
            }
            state.metrics.batch_pool_busy.dec();
            pool.slots.give();
        }
    }
}

/// Runs `calls` on the pool and returns their results in order; the caller's thread waits
/// for them all. At most `parallelism` of them are in the pool at once. While the pool is
/// full the batch waits for room, `wait` at most over all its calls; after that, a call
/// that finds no room at once is not run and is `Err(Missed::PoolFull)`.
pub(crate) fn run_all<T: Send + 'static>(
    pool: &Pool,
    calls: Vec<Call<T>>,
    parallelism: usize,
    wait: Duration,
) -> Vec<Result<T, Missed>> {
    let progress = Arc::new(Progress::new(calls.len()));
    let mut wait_left = wait;
    for (index, call) in calls.into_iter().enumerate() {
        progress.enter(parallelism);
        let started = Instant::now();
        let taken = pool.slots.take(started + wait_left);
        wait_left = wait_left.saturating_sub(started.elapsed());
        if !taken {
            progress.finish(index, Err(Missed::PoolFull));
            continue;
        }
        let delivery = Delivery {
            progress: Some(Arc::clone(&progress)),
            index,
        };
        pool.send(Box::new(move |state: &State| delivery.give(call(state))));
    }
    progress.wait_all()
}

/// Calls in the pool, running or queued, and the wait for room when every slot is taken.
struct Slots {
    taken: Mutex<usize>,
    room: Condvar,
    capacity: usize,
}

impl Slots {
    fn new(capacity: usize) -> Slots {
        Slots {
            taken: Mutex::new(0),
            room: Condvar::new(),
            capacity,
        }
    }

    /// Takes a slot, waiting for one until `deadline`; false if none came free by then.
    fn take(&self, deadline: Instant) -> bool {
        let mut taken = lock(&self.taken);
        while *taken >= self.capacity {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            taken = self
                .room
                .wait_timeout(taken, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *taken += 1;
        true
    }

    /// Gives a slot back and wakes one waiting batch. A woken batch finds the slot free or
    /// already taken by another, so no wake-up is lost on one that gives up.
    fn give(&self) {
        *lock(&self.taken) -= 1;
        self.room.notify_one();
    }
}

/// One batch's results and its calls in the pool, shared by the batch's own thread (the only
/// one that waits here) and the pool threads that deliver.
struct Progress<T> {
    tally: Mutex<Tally<T>>,
    changed: Condvar,
}

struct Tally<T> {
    results: Vec<Option<Result<T, Missed>>>,
    /// Calls sent to the pool and not yet finished.
    in_pool: usize,
    /// Calls with a result.
    done: usize,
}

impl<T> Progress<T> {
    fn new(calls: usize) -> Progress<T> {
        Progress {
            tally: Mutex::new(Tally {
                results: (0..calls).map(|_| None).collect(),
                in_pool: 0,
                done: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Waits until fewer than `parallelism` of the batch's calls are in the pool, and counts
    /// one more.
    fn enter(&self, parallelism: usize) {
        let mut tally = lock(&self.tally);
        while tally.in_pool >= parallelism {
            tally = self
                .changed
                .wait(tally)
                .unwrap_or_else(PoisonError::into_inner);
        }
        tally.in_pool += 1;
    }

    /// Keeps the first result given for `index` and counts its call out of the pool.
    fn finish(&self, index: usize, result: Result<T, Missed>) {
        let mut tally = lock(&self.tally);
        if tally.results[index].is_some() {
            return;
        }
        tally.results[index] = Some(result);
        tally.in_pool -= 1;
        tally.done += 1;
        drop(tally);
        self.changed.notify_one();
    }

    /// Waits for every call's result and returns them in order.
    fn wait_all(&self) -> Vec<Result<T, Missed>> {
        let mut tally = lock(&self.tally);
        while tally.done < tally.results.len() {
            tally = self
                .changed
                .wait(tally)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let results = std::mem::take(&mut tally.results);
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Missed::Lost)))
            .collect()
    }
}

/// Where one call's result goes. Dropped without [`Delivery::give`] (the call panicked, or
/// the task was never run), it answers the call as lost, so its batch never waits forever.
struct Delivery<T> {
    progress: Option<Arc<Progress<T>>>,
    index: usize,
}

impl<T> Delivery<T> {
    fn give(mut self, value: T) {
        if let Some(progress) = self.progress.take() {
            progress.finish(self.index, Ok(value));
        }
    }
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if let Some(progress) = self.progress.take() {
            progress.finish(self.index, Err(Missed::Lost));
        }
    }
}

/// The counts here are plain numbers that a panic cannot leave half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_refuse_after_the_deadline_and_come_back_when_given() {
        let slots = Arc::new(Slots::new(2));
        let soon = || Instant::now() + Duration::from_millis(20);
        assert!(slots.take(soon()) && slots.take(soon()));
        let started = Instant::now();
        assert!(!slots.take(soon()), "a third slot out of two");
        assert!(started.elapsed() >= Duration::from_millis(15));

        let giver = {
            let slots = Arc::clone(&slots);
            thread::spawn(move || slots.give())
        };
        assert!(slots.take(Instant::now() + Duration::from_secs(10)));
        giver.join().unwrap();
    }

    #[test]
    fn progress_bounds_the_calls_in_the_pool_and_keeps_their_order() {
        let progress = Arc::new(Progress::<usize>::new(6));
        let (done, finished) = crossbeam_channel::unbounded::<usize>();
        let finisher = {
            let progress = Arc::clone(&progress);
            thread::spawn(move || {
                for index in finished {
                    thread::sleep(Duration::from_millis(2));
                    progress.finish(index, Ok(index * 10));
                }
            })
        };
        for index in 0..6 {
            progress.enter(2);
            let in_pool = lock(&progress.tally).in_pool;
            assert!(in_pool <= 2, "{in_pool} calls in the pool");
            if index == 3 {
                progress.finish(index, Err(Missed::PoolFull));
            } else {
                done.send(index).unwrap();
            }
        }
        let results = progress.wait_all();
        drop(done);
        finisher.join().unwrap();
        let want: Vec<_> = (0..6)
            .map(|i| {
                if i == 3 {
                    Err(Missed::PoolFull)
                } else {
                    Ok(i * 10)
                }
            })
            .collect();
        assert_eq!(results, want);
    }

    #[test]
    fn a_delivery_dropped_unused_answers_its_call_as_lost() {
        let progress = Arc::new(Progress::<u8>::new(2));
        for index in 0..2 {
            progress.enter(2);
            let delivery = Delivery {
                progress: Some(Arc::clone(&progress)),
                index,
            };
            if index == 0 {
                delivery.give(7);
            } else {
                // As when the call panics on its pool thread.
                thread::spawn(move || {
                    let _keep = delivery;
                    panic!("a call that panics");
                })
                .join()
                .unwrap_err();
            }
        }
        assert_eq!(progress.wait_all(), vec![Ok(7), Err(Missed::Lost)]);
    }
}
