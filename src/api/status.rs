//! `GET /api/status`: the console's one poll, answered on the connection thread from memory
//! (gauges, counters, and [`History`], a ring of the last 15 minutes kept by a sampler thread),
//! so it stays truthful while every worker is busy and the queue is full.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::{console, ops, ApiError, Route};
use crate::http::{Request, Response};
use crate::metrics::{counter_sum, cumulative_buckets};
use crate::server::State;

/// Samples kept: one a second for 15 minutes.
pub(crate) const HISTORY_SAMPLES: usize = 900;
/// Requests/s and 503s/s are averaged over this many seconds.
const RATE_WINDOW_S: usize = 10;
/// Latency quantiles are over the observations of this many seconds.
const LATENCY_WINDOW_S: usize = 60;
/// The `syncgate_rejected_total` reasons answered with a 503.
pub(crate) const SHED_REASONS: [&str; 4] = [
    "queue_full",
    "queue_timeout",
    "too_many_connections",
    "draining",
];

/// One second of the chart: 32 bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    t_ms: i64,
    workers_busy: u32,
    queue_depth: u32,
    connections: u32,
    requests_per_s: f32,
    shed_per_s: f32,
}

/// The counters as read at one instant, for rates and quantiles over a window.
struct Reading {
    at: Instant,
    /// Requests answered, the fast lane and the console not counted.
    requests: u64,
    /// `syncgate_rejected_total` by [`SHED_REASONS`].
    shed: [u64; 4],
    /// Cumulative bucket counts of `syncgate_overhead_seconds`, `+Inf` last.
    overhead: Vec<u64>,
    /// Cumulative bucket counts of `syncgate_upstream_duration_seconds`, every provider summed.
    upstream: Vec<u64>,
}

struct Ring {
    /// Zero counts at start: the baseline of every window until the ring holds a full one.
    origin: Reading,
    samples: VecDeque<Sample>,
    /// The last `LATENCY_WINDOW_S + 1` readings, oldest first.
    readings: VecDeque<Reading>,
    overhead_bounds: Vec<f64>,
    upstream_bounds: Vec<f64>,
}

/// The last 15 minutes, one sample a second, in bounded memory (docs/capacity.md).
pub(crate) struct History {
    ring: Mutex<Ring>,
}

impl Default for History {
    fn default() -> History {
        let origin = Reading {
            at: Instant::now(),
            requests: 0,
            shed: [0; 4],
            overhead: Vec::new(),
            upstream: Vec::new(),
        };
        History {
            ring: Mutex::new(Ring {
                origin,
                samples: VecDeque::with_capacity(HISTORY_SAMPLES),
                readings: VecDeque::with_capacity(LATENCY_WINDOW_S + 1),
                overhead_bounds: Vec::new(),
                upstream_bounds: Vec::new(),
            }),
        }
    }
}

impl Ring {
    /// The reading `seconds` samples before the newest, or the zero at start while the ring
    /// is younger than that.
    fn before(&self, seconds: usize) -> &Reading {
        match self.readings.len().checked_sub(seconds + 1) {
            Some(i) => &self.readings[i],
            None => &self.origin,
        }
    }
}

impl History {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether a `route` label counts in requests/s: the fast lane and the console do not.
fn counts_as_request(route: &str) -> bool {
    ![
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::Status,
        Route::Console,
    ]
    .iter()
    .any(|r| r.template() == route)
}

/// Takes one sample (the sampler thread calls it once a second).
pub(crate) fn record(state: &State) {
    let m = &state.metrics;
    let (mut overhead_bounds, mut upstream_bounds) = (Vec::new(), Vec::new());
    let reading = Reading {
        at: Instant::now(),
        requests: counter_sum(&m.http_requests, "route", counts_as_request),
        shed: SHED_REASONS.map(|r| m.rejected.with_label_values(&[r]).get()),
        overhead: cumulative_buckets(&m.overhead, &mut overhead_bounds),
        upstream: cumulative_buckets(&m.upstream_duration, &mut upstream_bounds),
    };
    let mut ring = state.history.ring();
    let last = ring.readings.back().unwrap_or(&ring.origin);
    let (requests_per_s, shed) = rates(last, &reading);
    let shed_per_s: f64 = shed.iter().sum();
    let sample = Sample {
        t_ms: crate::store::now_ms(),
        workers_busy: clamp(m.workers_busy.get()),
        queue_depth: clamp(state.queue_len() as i64),
        connections: clamp(m.connections_open.get()),
        requests_per_s: requests_per_s as f32,
        shed_per_s: shed_per_s as f32,
    };
    if ring.samples.len() == HISTORY_SAMPLES {
        ring.samples.pop_front();
    }
    ring.samples.push_back(sample);
    if ring.readings.len() > LATENCY_WINDOW_S {
        ring.readings.pop_front();
    }
    ring.readings.push_back(reading);
    ring.overhead_bounds = overhead_bounds;
    ring.upstream_bounds = upstream_bounds;
}

fn clamp(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Requests/s and 503s/s by reason between two readings.
fn rates(old: &Reading, new: &Reading) -> (f64, [f64; 4]) {
    let secs = new.at.duration_since(old.at).as_secs_f64().max(0.001);
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let mut shed = [0.0; 4];
    for (i, rate) in shed.iter_mut().enumerate() {
        *rate = per_s(old.shed[i], new.shed[i]);
    }
    (per_s(old.requests, new.requests), shed)
}

/// The `q` quantile of the observations between two cumulative readings of one histogram,
/// interpolated within its bucket as Prometheus's `histogram_quantile` does (one in the `+Inf`
/// bucket reads as the largest finite bound). `None` when nothing was observed.
fn quantile(bounds: &[f64], old: &[u64], new: &[u64], q: f64) -> Option<f64> {
    let delta: Vec<u64> = new
        .iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(old.get(i).copied().unwrap_or(0)))
        .collect();
    let total = *delta.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let i = delta.iter().position(|&c| c as f64 >= rank)?;
    let Some(&upper) = bounds.get(i) else {
        return bounds.last().copied();
    };
    let (lower, below) = match i {
        0 => (0.0, 0),
        _ => (bounds[i - 1], delta[i - 1]),
    };
    let in_bucket = (delta[i] - below) as f64;
    Some(lower + (upper - lower) * (rank - below as f64) / in_bucket)
}

/// p50, p95 and p99 in milliseconds over a window, and how many observations it held.
fn quantiles_ms(bounds: &[f64], old: &[u64], new: &[u64]) -> Value {
    let ms = |q| quantile(bounds, old, new, q).map(|s| (s * 1e6).round() / 1e3);
    let count = new
        .last()
        .copied()
        .unwrap_or(0)
        .saturating_sub(old.last().copied().unwrap_or(0));
    json!({"p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99), "count": count})
}

/// The answer to `GET /api/status[?since=MS]`: the numbers now, and the samples taken after
/// `since` (all 15 minutes without it), so the console polls once per refresh.
pub(crate) fn answer(state: &State, request: &Request) -> Result<Response, ApiError> {
    authorize(state, request)?;
    super::known_params(&request.query, &["since"])?;
    let since = match super::query_param(&request.query, "since")? {
        None => i64::MIN,
        Some(text) => text.parse().map_err(|_| ApiError::InvalidRequest {
            message: format!("'since' must be unix milliseconds; got {text:?}"),
            param: "since".to_string(),
        })?,
    };
    Ok(Response::json(200, &status(state, since)).with_header("cache-control", "no-store".into()))
}

/// Who may read the status: anyone in development mode (from a loopback Host only), else a
/// valid key or the admin key. Decided from memory: the connection thread never waits on the
/// store.
fn authorize(state: &State, request: &Request) -> Result<(), ApiError> {
    if state.auth.is_open() {
        return console::check_host(state, request);
    }
    state
        .auth
        .verify(request, crate::store::now_ms())
        .map_err(ApiError::Denied)
}

fn status(state: &State, since: i64) -> Value {
    let m = &state.metrics;
    let capacity = &state.config.capacity;
    let (ready_status, readiness) = ops::readiness(state);
    let providers: Vec<Value> = state
        .providers
        .caps()
        .map(|(name, cap)| {
            json!({
                "name": name,
                "in_flight": m.upstream_in_flight.with_label_values(&[name]).get(),
                "max_concurrency": cap,
            })
        })
        .collect();
    let rejected: Map<String, Value> = SHED_REASONS
        .iter()
        .map(|r| {
            (
                r.to_string(),
                json!(m.rejected.with_label_values(&[r]).get()),
            )
        })
        .collect();
    let ring = state.history.ring();
    let mut body = json!({
        "time_ms": crate::store::now_ms(),
        "open_access": state.auth.is_open(),
        "ready": {"ok": ready_status == 200, "status": readiness},
        "draining": state.is_draining(),
        "workers": {"busy": m.workers_busy.get(), "total": capacity.workers},
        "streams_open": m.streams_open.get(),
        "queue": {
            "depth": state.queue_len(),
            "capacity": capacity.queue,
            "oldest_wait_ms": state.oldest_wait().map(|w| (w.as_secs_f64() * 1e6).round() / 1e3),
        },
        "connections": {"open": m.connections_open.get(), "max": capacity.max_connections},
        "retry_after_s": state.retry_after_s(),
        "rejected_total": rejected,
        "providers": providers,
        "request_log": {
            "queue_depth": state.store.queue_depth(),
            "dropped_total": m.store.log_rows_dropped.get(),
        },
        "rates": Value::Null,
        "latency_ms": Value::Null,
        "history": history_json(&ring, since),
    });
    if let Some(newest) = ring.readings.back() {
        let from = ring.before(RATE_WINDOW_S);
        let oldest = ring.before(LATENCY_WINDOW_S);
        let (requests, shed) = rates(from, newest);
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let by_reason: Map<String, Value> = SHED_REASONS
            .iter()
            .zip(shed)
            .map(|(r, rate)| (r.to_string(), json!(round(rate))))
            .collect();
        body["rates"] = json!({
            "window_s": round(newest.at.duration_since(from.at).as_secs_f64()),
            "requests_per_s": round(requests),
            "shed_per_s": by_reason,
        });
        body["latency_ms"] = json!({
            "window_s": round(newest.at.duration_since(oldest.at).as_secs_f64()),
            "overhead": quantiles_ms(&ring.overhead_bounds, &oldest.overhead, &newest.overhead),
            "upstream": quantiles_ms(&ring.upstream_bounds, &oldest.upstream, &newest.upstream),
        });
    }
    body
}

/// The samples after `since`, one array per series (compact, and ready to draw).
fn history_json(ring: &Ring, since: i64) -> Value {
    let newer: Vec<&Sample> = ring.samples.iter().filter(|s| s.t_ms > since).collect();
    let column = |f: fn(&Sample) -> Value| newer.iter().map(|s| f(s)).collect::<Vec<_>>();
    json!({
        "interval_s": 1,
        "capacity": HISTORY_SAMPLES,
        "t_ms": column(|s| json!(s.t_ms)),
        "workers_busy": column(|s| json!(s.workers_busy)),
        "queue_depth": column(|s| json!(s.queue_depth)),
        "connections": column(|s| json!(s.connections)),
        "requests_per_s": column(|s| json!((s.requests_per_s * 100.0).round() / 100.0)),
        "shed_per_s": column(|s| json!((s.shed_per_s * 100.0).round() / 100.0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_of_the_window() {
        let bounds = [0.001, 0.01, 0.1];
        // Before the window: 100 fast observations, which must not count.
        let old = [100, 100, 100, 100];
        // In the window: 10 under 1 ms, 80 in (1, 10] ms, 10 in (10, 100] ms.
        let new = [110, 190, 200, 200];
        let p50 = quantile(&bounds, &old, &new, 0.5).unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        let p99 = quantile(&bounds, &old, &new, 0.99).unwrap();
        assert!((p99 - 0.091).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&bounds, &new, &new, 0.5), None);
        // Past the last finite bound: that bound.
        assert_eq!(quantile(&bounds, &[0; 4], &[0, 0, 0, 5], 0.5), Some(0.1));
        // A first reading with no earlier one: everything counts.
        assert!(quantile(&bounds, &[], &new, 0.5).is_some());
    }

    #[test]
    fn the_ring_keeps_fifteen_minutes_and_a_sample_stays_small() {
        assert_eq!(std::mem::size_of::<Sample>(), 32);
        assert_eq!(HISTORY_SAMPLES, 15 * 60);
    }

    #[test]
    fn a_full_ring_and_its_answer_stay_small() {
        let history = History::default();
        let mut ring = history.ring();
        for i in 0..HISTORY_SAMPLES as i64 {
            ring.samples.push_back(Sample {
                t_ms: 1_796_290_430_159 + i * 1000,
                workers_busy: 512,
                queue_depth: 1024,
                connections: 2048,
                requests_per_s: 1234.56,
                shed_per_s: 12.34,
            });
        }
        let reading = std::mem::size_of::<Reading>() + (18 + 19) * 8;
        let held =
            HISTORY_SAMPLES * std::mem::size_of::<Sample>() + (LATENCY_WINDOW_S + 1) * reading;
        let answer = history_json(&ring, i64::MIN).to_string().len();
        println!(
            "ring: {held} bytes ({reading} a reading); a whole history answered: {answer} bytes"
        );
        assert!(held < 64 * 1024, "{held}");
        assert!(answer < 64 * 1024, "{answer}");
        assert_eq!(history_json(&ring, i64::MAX)["t_ms"], json!([]));
    }

    #[test]
    fn the_fast_lane_and_the_console_are_not_requests() {
        assert!(!counts_as_request("/healthz"));
        assert!(!counts_as_request("/api/status"));
        assert!(!counts_as_request("/console"));
        assert!(counts_as_request("/v1/chat/completions"));
        assert!(counts_as_request("unmatched"));
    }
}
