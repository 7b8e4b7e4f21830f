//! Per-key limits shared by every instance on one PostgreSQL database: one round trip admits a
//! request (the key's row locked, its sliding window expired and checked, the admission
//! recorded) and one statement settles it. The store returns plain numbers; `src/limits.rs`
//! turns them into permits, refusals and headers. On SQLite each process keeps its limits in
//! memory (`src/limits.rs`) and never calls these.
//!
//! These calls run on a small pool of their own (`[limits] pool`), not on the read pool: an
//! admission must not wait behind slow reads, and its checkout is short, so that a starved
//! admission is answered as `[limits] on_store_error` says within a second.

use std::fmt;
use std::time::Duration;

use super::postgres::{limits as pg, Pool};
use super::{Backend, Store, StoreError};

/// How long an admission or a settle waits for one of the limiter's connections.
const CHECKOUT_WAIT: Duration = Duration::from_secs(1);

/// The shared limiter's way to the database: the store and its own connections.
#[derive(Clone)]
pub(crate) struct Connections {
    store: Store,
    pool: Pool,
}

impl fmt::Debug for Connections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "limits::Connections({})", self.pool.max_size())
    }
}

/// Opens the limiter's `size` connections to `store`'s database.
pub(crate) fn connections(store: &Store, size: usize) -> Result<Connections, StoreError> {
    match store.backend() {
        Backend::Sqlite(_) => Err(shared_only()),
        Backend::Postgres(db) => Ok(Connections {
            store: store.clone(),
            pool: db.side_pool(size)?,
        }),
    }
}

impl Connections {
    /// Whether every one of the limiter's connections is open (they open in the background
    /// after the first).
    pub(crate) fn all_open(&self) -> bool {
        self.pool.state().connections >= self.pool.max_size()
    }
}

/// What the database decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Admitted,
    /// Refused: requests per minute used up (the longest wait of the limits that refused).
    Requests,
    /// Refused: the tokens per minute cannot hold this estimate.
    Tokens,
    /// Refused: the key has its maximum in flight.
    InFlight,
    Revoked,
    Expired,
    /// No such key.
    Unknown,
    /// The calling instance holds no live lease: it must register again.
    Unregistered,
}

/// One admission's answer. Counts are as of the answer: after this admission when admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    pub(crate) outcome: Outcome,
    /// The recorded admission, to settle; `None` when the key has no limits (nothing recorded)
    /// or the request was refused.
    pub(crate) id: Option<i64>,
    pub(crate) rpm: Option<u64>,
    /// Admissions in the sliding window.
    pub(crate) requests_used: u64,
    /// Until the window's latest admission expires.
    pub(crate) requests_reset_ms: u64,
    pub(crate) tpm: Option<u64>,
    /// Tokens charged in the window.
    pub(crate) tokens_charged: u64,
    /// Until the window's latest charge expires.
    pub(crate) tokens_reset_ms: u64,
    /// For a refusal: until the request would fit.
    pub(crate) wait_ms: u64,
}

fn shared_only() -> StoreError {
    StoreError::Failed("shared limits exist only on PostgreSQL".into())
}

/// Admits one request of `key` estimated at `tokens` for `instance`, in one round trip. The
/// admission carries `ticket` (unique within the instance), so that it can be found by
/// [`release_lost`] when this answer never arrives.
pub(crate) fn admit(
    db: &Connections,
    key: i64,
    instance: &str,
    tokens: u64,
    ticket: i64,
) -> Result<Admission, StoreError> {
    match db.store.backend() {
        Backend::Sqlite(_) => Err(shared_only()),
        Backend::Postgres(pg) => pg.query_on(&db.pool, CHECKOUT_WAIT, |c| {
            pg::admit(c, key, instance, tokens, ticket)
        }),
    }
}

/// Releases the in-flight slots of `instance`'s admissions of `keys` with these `tickets`,
/// whose answers were lost: one statement. Returns the tickets it found still in flight; the
/// others were never admitted, or not yet committed.
pub(crate) fn release_lost(
    db: &Connections,
    instance: &str,
    keys: &[i64],
    tickets: &[i64],
) -> Result<Vec<i64>, StoreError> {
    match db.store.backend() {
        Backend::Sqlite(_) => Err(shared_only()),
        Backend::Postgres(pg) => pg.query_on(&db.pool, CHECKOUT_WAIT, |c| {
            pg::release_lost(c, instance, keys, tickets)
        }),
    }
}

/// Releases an admission's in-flight slot and replaces its token estimate with `tokens` when
/// the provider reported them: one statement.
pub(crate) fn settle(
    db: &Connections,
    admission: i64,
    tokens: Option<u64>,
) -> Result<(), StoreError> {
    match db.store.backend() {
        Backend::Sqlite(_) => Err(shared_only()),
        Backend::Postgres(pg) => pg.query_on(&db.pool, CHECKOUT_WAIT, |c| {
            pg::settle(c, admission, tokens)
        }),
    }
}

/// The shared limiter's behaviour, on PostgreSQL only: SQLite keeps its limits in the process
/// (`src/limits.rs`, tested there) and has no shared limiter to test.
#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::store::instances;
    use crate::store::keys::{self, NewKey};
    use crate::store::testing::{
        insert_key as key, postgres_db, register_instance as instance, TempStore,
    };

    const LEASE_MS: i64 = 60_000;

    fn shared_store(name: &str) -> Option<TempStore> {
        postgres_db(name).map(|db| db.open())
    }

    /// The limiter's connections, as many as the tests' threads, once all are open (they open
    /// in the background, and a checkout waits only 1 s).
    fn limiter(store: &Store) -> Connections {
        let c = connections(store, 8).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.all_open() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        c
    }

    /// `n` admissions of `key` at once from `n` threads (each on its own pooled connection).
    fn admit_all_at_once(
        store: &Connections,
        key: i64,
        inst: &str,
        tokens: u64,
        n: usize,
    ) -> Vec<Admission> {
        let barrier = Barrier::new(n);
        thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        admit(store, key, inst, tokens, 0).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn outcomes(all: &[Admission], outcome: Outcome) -> usize {
        all.iter().filter(|a| a.outcome == outcome).count()
    }

    #[test]
    fn concurrent_admissions_never_exceed_rpm_tpm_or_in_flight() {
        let Some(t) = shared_store("shared_exact") else {
            return;
        };
        let inst = instance(&t, "inst_a", LEASE_MS);
        let c = limiter(&t);
        let rpm = key(
            &t,
            NewKey {
                rpm: Some(5),
                ..NewKey::default()
            },
        );
        let all = admit_all_at_once(&c, rpm, &inst, 1, 8);
        assert_eq!(outcomes(&all, Outcome::Admitted), 5, "{all:?}");
        assert_eq!(outcomes(&all, Outcome::Requests), 3, "{all:?}");
        let refused = all.iter().find(|a| a.outcome == Outcome::Requests).unwrap();
        assert!((59_000..=60_000).contains(&refused.wait_ms), "{refused:?}");
        assert_eq!((refused.requests_used, refused.rpm), (5, Some(5)));

        let tpm = key(
            &t,
            NewKey {
                tpm: Some(1000),
                ..NewKey::default()
            },
        );
        let all = admit_all_at_once(&c, tpm, &inst, 300, 8);
        assert_eq!(outcomes(&all, Outcome::Admitted), 3, "{all:?}");
        assert_eq!(outcomes(&all, Outcome::Tokens), 5, "{all:?}");

        let flying = key(
            &t,
            NewKey {
                max_in_flight: Some(2),
                ..NewKey::default()
            },
        );
        let all = admit_all_at_once(&c, flying, &inst, 0, 8);
        assert_eq!(outcomes(&all, Outcome::Admitted), 2, "{all:?}");
        let refused = all.iter().find(|a| a.outcome == Outcome::InFlight).unwrap();
        assert_eq!(refused.wait_ms, 1000);
        for a in all.iter().filter(|a| a.outcome == Outcome::Admitted) {
            settle(&c, a.id.unwrap(), None).unwrap();
        }
        assert_eq!(
            admit(&c, flying, &inst, 0, 0).unwrap().outcome,
            Outcome::Admitted
        );
    }

    #[test]
    fn settling_reconciles_tokens_and_the_headers_follow() {
        let Some(t) = shared_store("shared_settle") else {
            return;
        };
        let inst = instance(&t, "inst_a", LEASE_MS);
        let c = limiter(&t);
        let k = key(
            &t,
            NewKey {
                rpm: Some(10),
                tpm: Some(1000),
                ..NewKey::default()
            },
        );
        let first = admit(&c, k, &inst, 600, 0).unwrap();
        assert_eq!(first.outcome, Outcome::Admitted);
        assert_eq!((first.requests_used, first.tokens_charged), (1, 600));
        assert_eq!(
            (first.requests_reset_ms, first.tokens_reset_ms),
            (60_000, 60_000)
        );
        assert_eq!(
            admit(&c, k, &inst, 500, 0).unwrap().outcome,
            Outcome::Tokens
        );
        settle(&c, first.id.unwrap(), Some(100)).unwrap();
        let second = admit(&c, k, &inst, 500, 0).unwrap();
        assert_eq!(second.outcome, Outcome::Admitted, "{second:?}");
        assert_eq!((second.requests_used, second.tokens_charged), (2, 600));
        assert_eq!(admit(&c, k, &inst, 1001, 0).unwrap().wait_ms, 60_000);
    }

    #[test]
    fn the_admission_call_refuses_revoked_keys_and_unregistered_instances() {
        let Some(t) = shared_store("shared_refuse") else {
            return;
        };
        let inst = instance(&t, "inst_a", LEASE_MS);
        let c = limiter(&t);
        let k = key(&t, NewKey::default());
        let free = admit(&c, k, &inst, 0, 0).unwrap();
        assert_eq!(
            (free.outcome, free.id),
            (Outcome::Admitted, None),
            "no limits: nothing kept"
        );
        assert_eq!(
            admit(&c, k, "inst_none", 0, 0).unwrap().outcome,
            Outcome::Unregistered
        );
        keys::revoke(&t, k, 2).unwrap();
        assert_eq!(admit(&c, k, &inst, 0, 0).unwrap().outcome, Outcome::Revoked);
        assert_eq!(
            admit(&c, k + 100, &inst, 0, 0).unwrap().outcome,
            Outcome::Unknown
        );
    }

    #[test]
    fn the_slots_of_an_instance_whose_lease_ran_out_are_freed_by_the_reaper() {
        let Some(t) = shared_store("shared_reap") else {
            return;
        };
        let alive = instance(&t, "inst_alive", LEASE_MS);
        let c = limiter(&t);
        let dying = instance(&t, "inst_dying", 300);
        let k = key(
            &t,
            NewKey {
                max_in_flight: Some(1),
                ..NewKey::default()
            },
        );
        assert_eq!(
            admit(&c, k, &dying, 0, 0).unwrap().outcome,
            Outcome::Admitted
        );
        assert_eq!(
            admit(&c, k, &alive, 0, 0).unwrap().outcome,
            Outcome::InFlight
        );
        let live: Vec<_> = instances::live(&t)
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(live, [alive.clone(), dying.clone()]);
        let mut own = instances::connection(&t, Duration::from_secs(5)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let reaped = loop {
            let reaped = instances::reap(&mut own).unwrap();
            if reaped.instances > 0 || Instant::now() > deadline {
                break reaped;
            }
            thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            reaped,
            instances::Reaped {
                instances: 1,
                slots: 1
            }
        );
        assert!(
            !instances::renew(&mut own, &dying, LEASE_MS).unwrap(),
            "its lease is gone"
        );
        assert!(instances::renew(&mut own, &alive, LEASE_MS).unwrap());
        assert_eq!(
            admit(&c, k, &alive, 0, 0).unwrap().outcome,
            Outcome::Admitted
        );
    }

    #[test]
    fn an_admission_whose_answer_was_lost_is_released_by_its_ticket() {
        let Some(t) = shared_store("shared_lost") else {
            return;
        };
        let a = instance(&t, "inst_a", LEASE_MS);
        let b = instance(&t, "inst_b", LEASE_MS);
        let c = limiter(&t);
        let k = key(
            &t,
            NewKey {
                rpm: Some(10),
                max_in_flight: Some(2),
                ..NewKey::default()
            },
        );
        // Two admissions whose answers instance A "never saw" (tickets 7 and 8), and one of
        // B's with the same ticket number as one of A's.
        for ticket in [7, 8] {
            assert_eq!(
                admit(&c, k, &a, 0, ticket).unwrap().outcome,
                Outcome::Admitted
            );
        }
        assert_eq!(admit(&c, k, &b, 0, 7).unwrap().outcome, Outcome::InFlight);
        // Released by ticket, only A's, and a ticket never admitted (9) is not found.
        let mut released = release_lost(&c, &a, &[k], &[7, 8, 9]).unwrap();
        released.sort();
        assert_eq!(released, [7, 8]);
        assert!(
            release_lost(&c, &a, &[k], &[7, 8]).unwrap().is_empty(),
            "once"
        );
        let third = admit(&c, k, &b, 0, 7).unwrap();
        assert_eq!(third.outcome, Outcome::Admitted);
        // The slot is free again; the window still counts the lost admissions.
        assert_eq!(third.requests_used, 3);
        assert!(
            release_lost(&c, &a, &[k], &[7]).unwrap().is_empty(),
            "B's is not A's"
        );
        assert_eq!(release_lost(&c, &b, &[k], &[7]).unwrap(), [7]);
    }

    /// Admissions a second through the shared limiter on one hot key and on many keys, 8
    /// threads. Run by hand: `cargo test --bin syncgate admissions_per_second -- --ignored
    /// --nocapture` (docs/decisions/0004-shared-limits.md has the figures).
    #[test]
    #[ignore]
    fn admissions_per_second() {
        let Some(t) = shared_store("shared_bench") else {
            return;
        };
        let inst = instance(&t, "inst_bench", LEASE_MS);
        let c = limiter(&t);
        let many: Vec<i64> = (0..64)
            .map(|_| {
                key(
                    &t,
                    NewKey {
                        rpm: Some(1_000_000),
                        tpm: Some(1 << 40),
                        max_in_flight: Some(1000),
                        ..NewKey::default()
                    },
                )
            })
            .collect();
        let cases = [("one hot key", &many[..1]), ("64 keys", &many[..])];
        for (threads, (name, keys)) in [1, 8].into_iter().flat_map(|n| cases.map(|c| (n, c))) {
            let done = std::sync::atomic::AtomicU64::new(0);
            let started = Instant::now();
            let run = Duration::from_secs(5);
            thread::scope(|scope| {
                for n in 0..threads {
                    let (c, inst, done) = (&c, &inst, &done);
                    scope.spawn(move || {
                        let mut i = n;
                        while started.elapsed() < run {
                            let k = keys[i % keys.len()];
                            i += 1;
                            let a = admit(c, k, inst, 10, 0).unwrap();
                            assert_eq!(a.outcome, Outcome::Admitted);
                            settle(c, a.id.unwrap(), Some(12)).unwrap();
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    });
                }
            });
            let n = done.into_inner();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{name}, {threads} threads: {n} admissions + settles in {secs:.1} s = {:.0}/s",
                n as f64 / secs
            );
        }
    }
}
