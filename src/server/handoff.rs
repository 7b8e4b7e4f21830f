//! The two waits on the request path, built to sleep at once rather than spin.
//!
//! crossbeam-channel's blocking `recv` spins and then calls `sched_yield` several times before
//! it parks. On two cores shared by the load, the gateway and the upstream, that showed as a
//! quarter of the gateway's CPU under load (perf, 64 clients: `sched_yield` from
//! `Channel::recv`), and each yield hands the core to some other runnable thread. So the
//! bounded crossbeam channel stays the queue (admission's `try_send` never blocks), and the
//! sleeping is done here with a mutex and thread parking or a condition variable, which go to
//! the kernel's futex as soon as there is nothing to do:
//! - [`Doorbell`]: a count of jobs sent and not yet taken. A worker waits on it and then takes
//!   exactly one job with `try_recv`; the worker woken is the one idle the shortest time.
//! - [`Handback`]: where a worker returns a connection to the thread that owns it. One per
//!   connection, reused for every request on it.

use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, Thread};

/// Counts jobs in the queue for the workers that wait on it, and wakes the worker that went
/// idle last: its stack and data are still warm in the caches, where the futex queue behind a
/// condition variable would wake the one idle longest, a different cold thread every time.
pub(crate) struct Doorbell {
    state: Mutex<Bell>,
}

struct Bell {
    /// Jobs sent and not yet claimed by a worker.
    jobs: usize,
    /// Set at shutdown: workers leave once no jobs are left.
    closed: bool,
    /// Workers asleep waiting for a job, the most recent last.
    idle: Vec<Thread>,
}

impl Doorbell {
    pub(crate) fn new() -> Doorbell {
        Doorbell {
            state: Mutex::new(Bell {
                jobs: 0,
                closed: false,
                idle: Vec::new(),
            }),
        }
    }

    /// Announces one job just sent to the queue and wakes the worker that went idle last.
    pub(crate) fn ring(&self) {
        let woken = {
            let mut bell = lock(&self.state);
            bell.jobs += 1;
            bell.idle.pop()
        };
        if let Some(worker) = woken {
            worker.unpark();
        }
    }

    /// Waits for a job to claim; false once the bell is closed and every job was claimed.
    /// Called only by the worker threads themselves.
    pub(crate) fn wait(&self) -> bool {
        let me = thread::current();
        let mut bell = lock(&self.state);
        loop {
            if bell.jobs > 0 {
                bell.jobs -= 1;
                return true;
            }
            if bell.closed {
                return false;
            }
            bell.idle.push(me.clone());
            drop(bell);
            // An unpark between the unlock and here is kept, so park returns at once.
            thread::park();
            bell = lock(&self.state);
            // Woken by ring (already taken off the list), by close, or spuriously.
            if let Some(i) = bell.idle.iter().rposition(|t| t.id() == me.id()) {
                bell.idle.remove(i);
            }
        }
    }

    /// Lets every worker leave once the jobs already announced are claimed.
    pub(crate) fn close(&self) {
        let sleeping = {
            let mut bell = lock(&self.state);
            bell.closed = true;
            std::mem::take(&mut bell.idle)
        };
        for worker in sleeping {
            worker.unpark();
        }
    }
}

/// The place a connection comes back to its thread after a worker answered on it. The
/// connection thread keeps one and hands a [`Returner`] with each job.
pub(crate) struct Handback {
    slot: Arc<Slot>,
}

/// The worker's end: [`Returner::give`] hands the connection back; dropping it without giving
/// (a job dropped unanswered) tells the connection thread to close.
pub(crate) struct Returner {
    /// Taken by `give`, so that dropping the returner afterwards does nothing: by then the
    /// connection thread may already have sent its next job with a new returner.
    slot: Option<Arc<Slot>>,
}

struct Slot {
    state: Mutex<Back>,
    changed: Condvar,
}

enum Back {
    /// A worker has the connection.
    Out,
    /// The worker is done: the connection if it stays open, `None` to close it.
    Returned(Option<TcpStream>),
}

impl Handback {
    pub(crate) fn new() -> Handback {
        Handback {
            slot: Arc::new(Slot {
                state: Mutex::new(Back::Returned(None)),
                changed: Condvar::new(),
            }),
        }
    }

    /// The end to send with the next job. Only one job per connection is ever out.
    pub(crate) fn returner(&self) -> Returner {
        *lock(&self.slot.state) = Back::Out;
        Returner {
            slot: Some(Arc::clone(&self.slot)),
        }
    }

    /// Waits until the worker is done with the connection; `None` means close it.
    pub(crate) fn wait(&self) -> Option<TcpStream> {
        let mut back = lock(&self.slot.state);
        loop {
            if let Back::Returned(stream) = &mut *back {
                return stream.take();
            }
            back = self
                .slot
                .changed
                .wait(back)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Returner {
    /// Hands the connection back (`None`: the connection thread should close).
    pub(crate) fn give(mut self, stream: Option<TcpStream>) {
        self.put(stream);
    }

    fn put(&mut self, stream: Option<TcpStream>) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        *lock(&slot.state) = Back::Returned(stream);
        slot.changed.notify_one();
    }
}

impl Drop for Returner {
    /// A returner dropped without [`Returner::give`] releases the waiting thread to close.
    fn drop(&mut self) {
        self.put(None);
    }
}

/// Both waits hold plain data that a panic cannot leave half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn doorbell_hands_out_each_job_once_and_releases_workers_when_closed() {
        let bell = Arc::new(Doorbell::new());
        let claimed = Arc::new(Mutex::new(0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (bell, claimed) = (Arc::clone(&bell), Arc::clone(&claimed));
                thread::spawn(move || {
                    while bell.wait() {
                        *claimed.lock().unwrap() += 1;
                    }
                })
            })
            .collect();
        for _ in 0..1000 {
            bell.ring();
        }
        bell.close();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(*claimed.lock().unwrap(), 1000);
    }

    #[test]
    fn handback_returns_the_connection_or_none_when_the_job_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let back = Handback::new();

        let returner = back.returner();
        let giver = thread::spawn(move || returner.give(Some(stream)));
        let stream = back.wait().expect("the connection comes back");
        giver.join().unwrap();

        // Many jobs in a row through one worker thread: the connection thread sends its next
        // job while the worker may still be finishing `give` of the last one, and nothing the
        // old returner does may answer for the new job.
        let (jobs, inbox) = crossbeam_channel::unbounded::<(Returner, TcpStream)>();
        let worker = thread::spawn(move || {
            for (returner, stream) in inbox {
                returner.give(Some(stream));
            }
        });
        let mut stream = stream;
        for i in 0..20_000 {
            jobs.send((back.returner(), stream)).unwrap();
            stream = back
                .wait()
                .unwrap_or_else(|| panic!("job {i} was answered with a close"));
        }
        drop(jobs);
        worker.join().unwrap();

        // The same handback serves the next request; this time the job is dropped unanswered.
        let returner = back.returner();
        thread::spawn(move || drop(returner)).join().unwrap();
        assert!(back.wait().is_none());
        drop(stream);
    }
}
