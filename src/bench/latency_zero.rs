//! The scenarios on an upstream that answers at once, where only syncgate's own cost shows:
//! overhead (1 client), throughput (64 clients) and the 1–256-client sweep that the SVG draws.
//! Each phase also records the CPU every process used and what the gateway measured itself.

use std::time::Duration;

use serde_json::json;

use super::load::{LoadResult, LoadSpec, Work};
use super::observe::{Reported, ReportedWindow};
use super::procs::{Backend, GatewaySpec, MockSpec};
use super::report::{ms, us, Outcome, Row};
use super::scenarios::{chat_request, median, plural, warmup};
use super::svg::Point;
use super::Bench;

/// Concurrency levels of the sweep.
pub(crate) const SWEEP_CLIENTS: [usize; 4] = [1, 8, 64, 256];
/// The gateway for every latency-0 scenario: enough workers and queue for the sweep's 256
/// clients, so nothing is refused and only the gateway's own cost is measured.
const OPEN_GATEWAY: GatewaySpec = GatewaySpec {
    workers: 256,
    queue: 256,
    max_connections: 1024,
    max_queue_wait_ms: 5000,
    log_requests: true,
    backend: Backend::Sqlite,
};
/// Samples the overhead scenario wants on each side at the least.
const OVERHEAD_MIN_SAMPLES: u64 = 5000;

/// Where a phase sends its requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Direct,
    Syncgate,
    /// Through syncgate with its request log switched off.
    Unlogged,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Direct => "direct",
            Side::Syncgate => "through syncgate",
            Side::Unlogged => "through syncgate, request log off",
        }
    }
}

/// One latency-0 phase of `clients` on `side` (through syncgate: its store on `backend`), with
/// the CPU seconds each process used and, through syncgate, what the gateway measured about
/// itself.
fn latency_zero_phase(
    b: &mut Bench,
    name: &str,
    side: Side,
    backend: Backend,
    clients: usize,
    duration: Duration,
    min_samples: u64,
) -> anyhow::Result<Phase> {
    let mock = MockSpec::latency(0);
    let (addr, model, gateway_pid) = match side {
        Side::Direct => (b.fleet.upstream(mock)?, "bench-model", None),
        Side::Syncgate | Side::Unlogged => {
            let spec = GatewaySpec {
                log_requests: side == Side::Syncgate,
                backend,
                ..OPEN_GATEWAY
            };
            let (addr, pid) = b.gateway(mock, spec)?;
            (addr, "bench", Some(pid))
        }
    };
    let mut cpu = b.cpu_meter(gateway_pid);
    let spec = LoadSpec {
        addr,
        clients,
        work: Work::Plain {
            request: chat_request(model),
            think_after_503: Duration::ZERO,
        },
        stagger: Duration::ZERO,
    };
    let on = match (side, backend) {
        (Side::Direct, _) | (_, Backend::Sqlite) => String::new(),
        (_, backend) => format!(", on {}", backend.name()),
    };
    let label = format!("{name}: {} {}{on}", plural(clients, "client"), side.name());
    let warm = warmup(duration, Duration::ZERO);
    let mut window = gateway_pid.map(|_| ReportedWindow::new(addr));
    let result = b.measure(label, &spec, warm, duration, min_samples, |m| {
        cpu.tick(m);
        if let Some(w) = &mut window {
            w.tick(m);
        }
    })?;
    let reported = window.map(|w| w.finish_raw()).transpose()?;
    Ok(Phase {
        result,
        cpu: cpu.used(),
        reported,
    })
}

/// A, B, B, A (half the duration each; A is the baseline, direct unless said otherwise):
/// drift on a shared machine falls on both sides alike. Returns (a, b), each merged over its
/// two rounds.
fn abba(b: &mut Bench, name: &str, clients: usize, min_samples: u64) -> anyhow::Result<[Phase; 2]> {
    let (sides, _) = abba_of(
        b,
        name,
        [Side::Direct, Side::Syncgate],
        Backend::Sqlite,
        1,
        clients,
        min_samples,
    )?;
    Ok(sides)
}

/// `rounds` times A, B, B, A, each phase `duration / (2 × rounds)` long, the gateway's store
/// on `backend`. Returns each side merged over its rounds, and each round's B ÷ A in 200s per
/// second.
fn abba_of(
    b: &mut Bench,
    name: &str,
    [first, second]: [Side; 2],
    backend: Backend,
    rounds: u32,
    clients: usize,
    min_samples: u64,
) -> anyhow::Result<([Phase; 2], Vec<f64>)> {
    let phase_length = b.duration / (2 * rounds);
    let phase_samples = min_samples / (2 * u64::from(rounds));
    let order = [first, second, second, first];
    let mut sides: [Option<Phase>; 2] = [None, None];
    let mut ratios = Vec::new();
    // This round's 200s and measured seconds, by side.
    let mut round = [(0u64, 0f64); 2];
    for (i, side) in order
        .iter()
        .cycle()
        .take(4 * rounds as usize)
        .copied()
        .enumerate()
    {
        let phase =
            latency_zero_phase(b, name, side, backend, clients, phase_length, phase_samples)?;
        let at = usize::from(side == second);
        round[at].0 += phase.result.tally.ok.count();
        round[at].1 += phase.result.measured.as_secs_f64();
        if i % 4 == 3 {
            let per_s = |(ok, secs): (u64, f64)| ok as f64 / secs.max(1e-9);
            ratios.push(per_s(round[1]) / per_s(round[0]).max(1e-9));
            round = [(0, 0.0); 2];
        }
        let slot = &mut sides[at];
        *slot = Some(match slot.take() {
            Some(mut earlier) => {
                for (name, secs) in phase.cpu {
                    match earlier.cpu.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, total)) => *total += secs,
                        None => earlier.cpu.push((name, secs)),
                    }
                }
                Phase {
                    result: earlier.result.combine(phase.result),
                    cpu: earlier.cpu,
                    reported: match (earlier.reported, phase.reported) {
                        (Some(a), Some(b)) => Some(a.add(b)),
                        (a, b) => a.or(b),
                    },
                }
            }
            None => phase,
        });
    }
    match sides {
        [Some(d), Some(s)] => Ok(([d, s], ratios)),
        _ => anyhow::bail!("no rounds ran"),
    }
}

/// One phase (or one side's merged rounds): the load's result, the CPU seconds each
/// process used, and through syncgate what the gateway measured about itself.
struct Phase {
    result: LoadResult,
    cpu: Vec<(&'static str, f64)>,
    reported: Option<Reported>,
}

impl Phase {
    /// "gateway 120 + upstream 40 + load generator 30 µs" of CPU per answered request.
    fn cpu_summary(&self) -> String {
        let n = self.result.tally.ok.count().max(1) as f64;
        let parts: Vec<String> = self
            .cpu
            .iter()
            .map(|(name, secs)| format!("{} {:.0}", name.replace('_', " "), secs * 1e6 / n))
            .collect();
        format!("{} µs", parts.join(" + "))
    }

    /// CPU microseconds per answered request, by process.
    fn cpu_per_request(&self) -> serde_json::Value {
        let n = self.result.tally.ok.count().max(1) as f64;
        let map: serde_json::Map<String, serde_json::Value> = self
            .cpu
            .iter()
            .map(|(name, secs)| (name.to_string(), json!(secs * 1e6 / n)))
            .collect();
        serde_json::Value::Object(map)
    }
}

fn point(clients: usize, syncgate: bool, r: &LoadResult) -> Point {
    Point {
        clients,
        syncgate,
        p50_ms: ms(r.tally.ok.p50()),
        p99_ms: ms(r.tally.ok.p99()),
        rps: r.ok_per_s(),
    }
}

pub(crate) fn overhead(b: &mut Bench) -> anyhow::Result<Outcome> {
    let [direct_side, through_side] = abba(b, "overhead", 1, OVERHEAD_MIN_SAMPLES)?;
    let cpu = json!({
        "syncgate": through_side.cpu_per_request(),
        "direct": direct_side.cpu_per_request(),
    });
    let reported = through_side.reported.map(Reported::to_json);
    let (direct, through) = (direct_side.result, through_side.result);
    b.points.push(point(1, false, &direct));
    b.points.push(point(1, true, &through));
    let (d, s) = (&direct.tally.ok, &through.tally.ok);
    let added_p50 = us(s.p50()) - us(d.p50());
    let added_p99 = us(s.p99()) - us(d.p99());
    let json = json!({
        "added_p50_us": added_p50,
        "added_p99_us": added_p99,
        "p50_us": us(s.p50()),
        "p99_us": us(s.p99()),
        "direct_p50_us": us(d.p50()),
        "direct_p99_us": us(d.p99()),
        "mean_us": us(s.mean()),
        "direct_mean_us": us(d.mean()),
        "samples": s.count(),
        "direct_samples": d.count(),
        "cpu_us_per_request": cpu,
        "gateway_reported": reported,
        "errors": through.tally.errors + direct.tally.errors,
    });
    let detail = |added: f64, s: Duration, d: Duration| {
        format!("{added:+.0} µs ({:.0} vs {:.0} µs direct)", us(s), us(d))
    };
    let rows = vec![
        Row::info(
            "added latency p50, 1 client",
            detail(added_p50, s.p50(), d.p50()),
        ),
        Row::goal(
            "added latency p99, 1 client",
            detail(added_p99, s.p99(), d.p99()),
            "≤ 150 µs",
            added_p99 <= 150.0,
        ),
    ];
    Ok(Outcome::new("overhead", json, rows))
}

pub(crate) fn throughput(b: &mut Bench) -> anyhow::Result<Outcome> {
    const CLIENTS: usize = 64;
    let [direct_side, through_side] = abba(b, "throughput", CLIENTS, 0)?;
    let cpu = json!({
        "syncgate": through_side.cpu_per_request(),
        "direct": direct_side.cpu_per_request(),
    });
    let reported = through_side.reported.map(Reported::to_json);
    let cpu_row = Row::info(
        "CPU per request, 64 clients",
        format!(
            "{}; direct: {}",
            through_side.cpu_summary(),
            direct_side.cpu_summary()
        ),
    );
    let (direct, through) = (direct_side.result, through_side.result);
    b.points.push(point(CLIENTS, false, &direct));
    b.points.push(point(CLIENTS, true, &through));
    let ratio = through.ok_per_s() / direct.ok_per_s().max(1e-9);
    let json = json!({
        "ratio": ratio,
        "rps": through.ok_per_s(),
        "direct_rps": direct.ok_per_s(),
        "clients": CLIENTS,
        "cpu_us_per_request": cpu,
        "gateway_reported": reported,
        "p50_ms": ms(through.tally.ok.p50()),
        "p99_ms": ms(through.tally.ok.p99()),
        "direct_p50_ms": ms(direct.tally.ok.p50()),
        "direct_p99_ms": ms(direct.tally.ok.p99()),
        "errors": through.tally.errors + direct.tally.errors,
    });
    let rows = vec![
        Row::goal(
            "rps through syncgate ÷ direct, 64 clients",
            format!(
                "{ratio:.2} ({:.0} vs {:.0} rps)",
                through.ok_per_s(),
                direct.ok_per_s()
            ),
            "≥ 0.5",
            ratio >= 0.5,
        ),
        cpu_row,
    ];
    Ok(Outcome::new("throughput", json, rows))
}

pub(crate) fn sweep(b: &mut Bench) -> anyhow::Result<Outcome> {
    let duration = (b.duration / 4).max(Duration::from_secs(1));
    let mut points = Vec::new();
    let mut rows = Vec::new();
    for clients in SWEEP_CLIENTS {
        let direct = latency_zero_phase(
            b,
            "sweep",
            Side::Direct,
            Backend::Sqlite,
            clients,
            duration,
            0,
        )?
        .result;
        let through = latency_zero_phase(
            b,
            "sweep",
            Side::Syncgate,
            Backend::Sqlite,
            clients,
            duration,
            0,
        )?
        .result;
        b.points.push(point(clients, false, &direct));
        b.points.push(point(clients, true, &through));
        points.push(json!({
            "clients": clients,
            "rps": through.ok_per_s(),
            "p50_ms": ms(through.tally.ok.p50()),
            "p99_ms": ms(through.tally.ok.p99()),
            "direct_rps": direct.ok_per_s(),
            "direct_p50_ms": ms(direct.tally.ok.p50()),
            "direct_p99_ms": ms(direct.tally.ok.p99()),
            "errors": through.tally.errors + direct.tally.errors,
        }));
        rows.push(Row::info(
            &format!("{}: rps, p99", plural(clients, "client")),
            format!(
                "{:.0} rps, {:.2} ms (direct {:.0} rps, {:.2} ms)",
                through.ok_per_s(),
                ms(through.tally.ok.p99()),
                direct.ok_per_s(),
                ms(direct.tally.ok.p99())
            ),
        ));
    }
    Ok(Outcome::new("sweep", json!({ "points": points }), rows))
}

/// Rounds of off, on, on, off in the logging scenario: the difference is small beside this
/// machine's drift, so it is measured in more, shorter alternations, and the goal is judged
/// on the median round.
pub(crate) const LOGGING_ROUNDS: u32 = 5;

/// Throughput with the request log on ÷ off (64 clients, latency 0): what logging every call
/// costs. Both sides run through syncgate; the log's side writes one row per request. With
/// `--db postgres://…` the same again with the gateway's store on PostgreSQL, after SQLite's.
pub(crate) fn logging(b: &mut Bench) -> anyhow::Result<Outcome> {
    let sqlite = logging_on(b, Backend::Sqlite)?;
    let mut json = sqlite.json();
    let mut rows = sqlite.rows("");
    if b.postgres.is_some() {
        let postgres = logging_on(b, Backend::Postgres)?;
        json["postgres"] = postgres.json();
        rows.extend(postgres.rows("PostgreSQL: "));
    }
    Ok(Outcome::new("logging", json, rows))
}

/// Clients in the logging scenario.
const LOGGING_CLIENTS: usize = 64;

/// The logging scenario's rounds with the gateway's store on `backend`.
fn logging_on(b: &mut Bench, backend: Backend) -> anyhow::Result<Logging> {
    let ([off, on], rounds) = abba_of(
        b,
        "logging",
        [Side::Unlogged, Side::Syncgate],
        backend,
        LOGGING_ROUNDS,
        LOGGING_CLIENTS,
        0,
    )?;
    Ok(Logging { off, on, rounds })
}

/// One backend's log-off and log-on sides, each merged over its rounds, and each round's
/// on ÷ off.
struct Logging {
    off: Phase,
    on: Phase,
    rounds: Vec<f64>,
}

impl Logging {
    /// The median of the rounds' on ÷ off. A phase that lands in one of this machine's slow
    /// spells (the same configuration ran 6,600 and 8,600 rps in two 10 s runs back to back)
    /// moves the merged ratio by as much as the log costs, and the median of paired rounds
    /// not at all.
    fn ratio(&self) -> f64 {
        median(&self.rounds)
    }

    /// On ÷ off over every round's requests together.
    fn merged_ratio(&self) -> f64 {
        self.on.result.ok_per_s() / self.off.result.ok_per_s().max(1e-9)
    }

    fn json(&self) -> serde_json::Value {
        let (off, on) = (&self.off.result, &self.on.result);
        json!({
            "ratio": self.ratio(),
            "ratio_merged": self.merged_ratio(),
            "round_ratios": self.rounds,
            "rps_on": on.ok_per_s(),
            "rps_off": off.ok_per_s(),
            "clients": LOGGING_CLIENTS,
            "p99_ms_on": ms(on.tally.ok.p99()),
            "p99_ms_off": ms(off.tally.ok.p99()),
            "errors": on.tally.errors + off.tally.errors,
        })
    }

    /// The table's rows, each figure named after `backend` ("" for SQLite, as before there
    /// was a second backend).
    fn rows(&self, backend: &str) -> Vec<Row> {
        let ratio = self.ratio();
        vec![
            Row::goal(
                &format!("{backend}rps with the request log on ÷ off, 64 clients"),
                format!(
                    "{ratio:.2}, median of rounds {} (all rounds: {:.2}, {:.0} vs {:.0} rps)",
                    self.rounds
                        .iter()
                        .map(|r| format!("{r:.2}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.merged_ratio(),
                    self.on.result.ok_per_s(),
                    self.off.result.ok_per_s()
                ),
                "≥ 0.9",
                ratio >= 0.9,
            ),
            Row::info(
                &format!("{backend}CPU per request, log on"),
                format!(
                    "{}; log off: {}",
                    self.on.cpu_summary(),
                    self.off.cpu_summary()
                ),
            ),
        ]
    }
}
