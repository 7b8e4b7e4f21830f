//! The closed-loop load generator: `clients` threads with 64 KiB stacks, each on its own
//! keep-alive connection, sending its next request as soon as the last answer arrived (or after
//! a think time that follows a 503). Each thread records into its own tally; the hot path
//! shares nothing but two relaxed atomic loads. A phase is: start → warm up → begin measuring
//! → finish, which hangs up every connection (so no thread waits out a slow answer), joins the
//! threads and merges their tallies. Answers count when they *arrive* inside the window.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::client::{Conn, StreamAnswer};
use super::hist::Histogram;

/// Stack of a client thread: it parses heads (a 32-field httparse array) and little else.
const CLIENT_STACK_BYTES: usize = 64 * 1024;
/// Pause after a failed connect, so a server that is gone is not hammered in a loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);
/// "Not measuring yet" in `Shared::measure_from`.
const NOT_YET: u64 = u64::MAX;

/// What each client does over and over.
#[derive(Clone)]
pub(crate) enum Work {
    /// A plain request; after a 503 the client waits `think_after_503` before the next one.
    Plain {
        request: Arc<[u8]>,
        think_after_503: Duration,
    },
    /// A streamed chat completion; a gap between events above `stall_gap` is a stall.
    Stream {
        request: Arc<[u8]>,
        stall_gap: Duration,
    },
    /// Plain requests spread over several gateways (and API keys): client `i` connects to
    /// `targets[i % n]` and asks its request, whatever the spec's `addr` says.
    Spread { targets: Arc<[Target]> },
}

/// Where one client of [`Work::Spread`] connects, and what it asks there.
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) request: Arc<[u8]>,
}

pub(crate) struct LoadSpec {
    /// Where the clients connect (unless the work is [`Work::Spread`]).
    pub(crate) addr: SocketAddr,
    pub(crate) clients: usize,
    pub(crate) work: Work,
    /// Client `i` sends its first request `i × stagger ÷ clients` after the start, so answers
    /// that all take the same time do not arrive in lockstep.
    pub(crate) stagger: Duration,
}

/// What the clients saw inside the measured window.
#[derive(Clone)]
pub(crate) struct Tally {
    /// Latency of 200 answers (request written → last byte); for streams, time to first event.
    pub(crate) ok: Histogram,
    /// Latency of 503 answers.
    pub(crate) rejected: Histogram,
    /// 429 answers (a key's limits refused the request).
    pub(crate) limited: u64,
    /// Answers with another status.
    pub(crate) other_status: u64,
    /// Failed connects, reads and writes.
    pub(crate) errors: u64,
    /// Streams that ended with `[DONE]` and no gap above the stall gap.
    pub(crate) streams_clean: u64,
    /// Streams that ended with `[DONE]` but had a gap above the stall gap.
    pub(crate) streams_stalled: u64,
    /// Streams that did not end with `[DONE]` (error event, cut, or a non-200 answer).
    pub(crate) streams_failed: u64,
    /// Longest gap between two events of any stream.
    pub(crate) max_gap: Duration,
    /// Clients all of whose measured streams (at least one) were clean.
    pub(crate) clients_sustained: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ok: Histogram::new(),
            rejected: Histogram::new(),
            limited: 0,
            other_status: 0,
            errors: 0,
            streams_clean: 0,
            streams_stalled: 0,
            streams_failed: 0,
            max_gap: Duration::ZERO,
            clients_sustained: 0,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.ok.merge(&other.ok);
        self.rejected.merge(&other.rejected);
        self.limited += other.limited;
        self.other_status += other.other_status;
        self.errors += other.errors;
        self.streams_clean += other.streams_clean;
        self.streams_stalled += other.streams_stalled;
        self.streams_failed += other.streams_failed;
        self.max_gap = self.max_gap.max(other.max_gap);
        self.clients_sustained += other.clients_sustained;
    }
}

/// A finished phase.
pub(crate) struct LoadResult {
    pub(crate) tally: Tally,
    /// Length of the measured window.
    pub(crate) measured: Duration,
}

impl LoadResult {
    /// Two windows of the same kind of load as one.
    pub(crate) fn combine(mut self, other: LoadResult) -> LoadResult {
        self.tally.merge(&other.tally);
        self.measured += other.measured;
        self
    }

    /// 200 answers per second.
    pub(crate) fn ok_per_s(&self) -> f64 {
        self.tally.ok.count() as f64 / self.measured.as_secs_f64().max(1e-9)
    }

    /// 503 answers per second.
    pub(crate) fn rejected_per_s(&self) -> f64 {
        self.tally.rejected.count() as f64 / self.measured.as_secs_f64().max(1e-9)
    }
}

/// What the client threads share.
struct Shared {
    base: Instant,
    /// Nanoseconds after `base` from which answers count, or [`NOT_YET`].
    measure_from: AtomicU64,
    stop: AtomicBool,
    /// Answers recorded so far (200s and 503s), for a caller that wants a minimum.
    samples: AtomicU64,
    /// A clone of each client's current connection, to hang up on when the phase ends.
    conns: Mutex<Vec<Option<TcpStream>>>,
}

impl Shared {
    /// Whether an answer that arrived at `at` belongs to the measured window.
    fn counts(&self, at: Instant) -> bool {
        let from = self.measure_from.load(Ordering::Relaxed);
        from != NOT_YET
            && at.duration_since(self.base).as_nanos() as u64 >= from
            && !self.stop.load(Ordering::Relaxed)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d`, or less if the phase ends first.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// Connects client `slot` and registers the connection for the hang-up.
    fn connect(&self, slot: usize, addr: SocketAddr) -> std::io::Result<Conn> {
        let conn = Conn::connect(addr)?;
        let clone = conn.socket().try_clone()?;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if self.stopping() {
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        conns[slot] = Some(clone);
        Ok(conn)
    }
}

/// A running phase. Dropping it (on an error path) stops and joins its threads.
pub(crate) struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Tally>>,
    measuring_since: Option<Instant>,
}

impl Load {
    /// Starts the client threads; they warm up until [`Load::begin_measuring`].
    pub(crate) fn start(spec: &LoadSpec) -> anyhow::Result<Load> {
        let shared = Arc::new(Shared {
            base: Instant::now(),
            measure_from: AtomicU64::new(NOT_YET),
            stop: AtomicBool::new(false),
            samples: AtomicU64::new(0),
            conns: Mutex::new((0..spec.clients).map(|_| None).collect()),
        });
        let mut load = Load {
            shared,
            threads: Vec::with_capacity(spec.clients),
            measuring_since: None,
        };
        for slot in 0..spec.clients {
            let shared = Arc::clone(&load.shared);
            let (addr, work) = match &spec.work {
                Work::Spread { targets } => {
                    let target = targets
                        .get(slot % targets.len().max(1))
                        .context("spread work without targets")?;
                    let work = Work::Plain {
                        request: Arc::clone(&target.request),
                        think_after_503: Duration::ZERO,
                    };
                    (target.addr, work)
                }
                work => (spec.addr, work.clone()),
            };
            let delay = spec.stagger.mul_f64(slot as f64 / spec.clients as f64);
            let thread = thread::Builder::new()
                .name("bench-client".into())
                .stack_size(CLIENT_STACK_BYTES)
                .spawn(move || client(&shared, slot, addr, &work, delay))
                .with_context(|| format!("cannot start client thread {slot}"))?;
            load.threads.push(thread);
        }
        Ok(load)
    }

    /// Answers that arrive from now on are measured.
    pub(crate) fn begin_measuring(&mut self) {
        let now = Instant::now();
        let from = now.duration_since(self.shared.base).as_nanos() as u64;
        self.shared.measure_from.store(from, Ordering::Relaxed);
        self.measuring_since = Some(now);
    }

    /// Answers recorded in the window so far.
    pub(crate) fn samples(&self) -> u64 {
        self.shared.samples.load(Ordering::Relaxed)
    }

    /// Ends the phase: stops the clients, hangs up on them, joins them and merges their tallies.
    pub(crate) fn finish(mut self) -> LoadResult {
        let stopped = Instant::now();
        let tally = self.stop_and_join();
        LoadResult {
            tally,
            measured: self
                .measuring_since
                .map_or(Duration::ZERO, |since| stopped - since),
        }
    }

    fn stop_and_join(&mut self) -> Tally {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let mut conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            for conn in conns.iter_mut().filter_map(Option::take) {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        }
        let mut total = Tally::new();
        for thread in self.threads.drain(..) {
            // A client thread that panicked has nothing to add; the others still count.
            if let Ok(tally) = thread.join() {
                total.merge(&tally);
            }
        }
        total
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_and_join();
        }
    }
}

/// One client's loop: bounded by the stop flag, which `finish` (or `Drop`) always sets.
fn client(shared: &Shared, slot: usize, addr: SocketAddr, work: &Work, delay: Duration) -> Tally {
    let mut tally = Tally::new();
    let mut conn: Option<Conn> = None;
    let mut measured_streams = 0u64;
    let mut all_clean = true;
    shared.pause(delay);
    while !shared.stopping() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match shared.connect(slot, addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    if shared.counts(Instant::now()) {
                        tally.errors += 1;
                    }
                    shared.pause(RECONNECT_PAUSE);
                    continue;
                }
            },
        };
        match work {
            Work::Plain {
                request,
                think_after_503,
            } => {
                let sent = Instant::now();
                let answer = c.exchange(request);
                let at = Instant::now();
                let counted = shared.counts(at);
                match answer {
                    Ok(answer) => {
                        if counted {
                            match answer.status {
                                200 => tally.ok.record(at - sent),
                                503 => tally.rejected.record(at - sent),
                                429 => tally.limited += 1,
                                _ => tally.other_status += 1,
                            }
                            shared.samples.fetch_add(1, Ordering::Relaxed);
                        }
                        if !answer.keep_alive {
                            conn = None;
                        }
                        if answer.status == 503 && !think_after_503.is_zero() {
                            shared.pause(*think_after_503);
                        }
                    }
                    Err(_) => {
                        tally.errors += u64::from(counted);
                        conn = None;
                    }
                }
            }
            // Load::start hands each client of a spread its own plain work.
            Work::Spread { .. } => break,
            Work::Stream { request, stall_gap } => {
                let answer = c.exchange_stream(request);
                let counted = shared.counts(Instant::now());
                let keep = answer.as_ref().is_ok_and(|a| a.keep_alive);
                if counted {
                    measured_streams += 1;
                    all_clean &= record_stream(&mut tally, answer, *stall_gap);
                    shared.samples.fetch_add(1, Ordering::Relaxed);
                }
                if !keep {
                    conn = None;
                }
            }
        }
    }
    if matches!(work, Work::Stream { .. }) && measured_streams > 0 && all_clean {
        tally.clients_sustained = 1;
    }
    tally
}

/// Records one measured stream; true when it was clean.
fn record_stream(
    tally: &mut Tally,
    answer: std::io::Result<StreamAnswer>,
    stall_gap: Duration,
) -> bool {
    let Ok(answer) = answer else {
        tally.errors += 1;
        tally.streams_failed += 1;
        return false;
    };
    if let Some(first) = answer.first_event {
        tally.ok.record(first);
    }
    tally.max_gap = tally.max_gap.max(answer.max_gap);
    if answer.status != 200 || !answer.done {
        if answer.status != 200 {
            tally.other_status += 1;
        }
        tally.streams_failed += 1;
        false
    } else if answer.max_gap > stall_gap {
        tally.streams_stalled += 1;
        false
    } else {
        tally.streams_clean += 1;
        true
    }
}

/// One client asking `request` again and again for `duration`, each as soon as the last was
/// answered: the latency a single caller sees (the `/healthz` probe under saturation).
/// Returns the 200 latencies and the number of failures.
pub(crate) fn sequential(
    addr: SocketAddr,
    request: &[u8],
    duration: Duration,
    interrupted: &AtomicBool,
) -> (Histogram, u64) {
    let mut latencies = Histogram::new();
    let mut failures = 0u64;
    let end = Instant::now() + duration;
    let mut conn: Option<Conn> = None;
    while Instant::now() < end && !interrupted.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    failures += 1;
                    thread::sleep(RECONNECT_PAUSE);
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match c.exchange(request) {
            Ok(answer) if answer.status == 200 => {
                latencies.record(sent.elapsed());
                if !answer.keep_alive {
                    conn = None;
                }
            }
            Ok(answer) => {
                failures += 1;
                if !answer.keep_alive {
                    conn = None;
                }
            }
            Err(_) => {
                failures += 1;
                conn = None;
            }
        }
    }
    (latencies, failures)
}
