//! When each queued request was enqueued, kept where the connection thread can read the oldest
//! without a lock: the console's "oldest wait". The queue is a channel, which cannot be peeked,
//! so each admitted request also stamps one atomic slot, and the worker that takes it clears it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The enqueue times of the requests not yet taken by a worker, one slot per admitted request.
pub(crate) struct Waits {
    origin: Instant,
    /// Nanoseconds after `origin`, plus one; 0 is an empty slot.
    slots: Box<[AtomicU64]>,
    next: AtomicUsize,
}

/// A request's slot and stamp, given back when a worker takes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    slot: usize,
    stamp: u64,
}

impl Waits {
    /// Slots for `capacity` requests: as many as admission lets into the server at once.
    pub(crate) fn new(capacity: usize) -> Waits {
        Waits {
            origin: Instant::now(),
            slots: (0..capacity.max(1)).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Stamps a request enqueued at `at`. Slots are taken in turn: the queue is first in, first
    /// out and holds at most `capacity` requests, so a slot is free again by the time its turn
    /// comes round (and a stamp is only ever cleared by its own ticket).
    pub(crate) fn enter(&self, at: Instant) -> Ticket {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let stamp = at.saturating_duration_since(self.origin).as_nanos() as u64 + 1;
        self.slots[slot].store(stamp, Ordering::Relaxed);
        Ticket { slot, stamp }
    }

    /// The request was taken by a worker (or never sent): it waits no longer.
    pub(crate) fn leave(&self, ticket: Ticket) {
        let _ = self.slots[ticket.slot].compare_exchange(
            ticket.stamp,
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// How long the oldest request still waiting has waited, if any waits. A scan of one atomic
    /// per admitted request: a few microseconds, once per console poll.
    pub(crate) fn oldest(&self, now: Instant) -> Option<Duration> {
        let oldest = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&stamp| stamp != 0)
            .min()?;
        let at = self.origin + Duration::from_nanos(oldest - 1);
        Some(now.saturating_duration_since(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_wait_is_the_earliest_stamp_not_yet_taken() {
        let waits = Waits::new(3);
        let t0 = Instant::now();
        assert_eq!(waits.oldest(t0), None);
        let a = waits.enter(t0);
        let b = waits.enter(t0 + Duration::from_millis(10));
        let now = t0 + Duration::from_millis(50);
        assert_eq!(waits.oldest(now), Some(Duration::from_millis(50)));
        waits.leave(a);
        assert_eq!(waits.oldest(now), Some(Duration::from_millis(40)));
        // Round the ring: c takes a's slot again; a stale ticket never clears a newer stamp.
        let c = waits.enter(t0 + Duration::from_millis(20));
        let d = waits.enter(t0 + Duration::from_millis(30));
        waits.leave(a);
        waits.leave(b);
        assert_eq!(waits.oldest(now), Some(Duration::from_millis(30)));
        waits.leave(c);
        waits.leave(d);
        assert_eq!(waits.oldest(now), None);
    }
}
