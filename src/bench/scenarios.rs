//! The request/answer scenarios: overhead, throughput, the concurrency sweep, slow-ai,
//! saturated-health and overload. Each sets up the upstream and gateway it needs, runs its
//! phases through [`Bench::measure`], and returns its figures (JSON) and table rows.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::load::{self, Load, LoadResult, LoadSpec, Work};
use super::procs::{self, CpuMeter, GatewaySpec, MockSpec, Reported, ReportedWindow};
use super::report::{ms, us, Outcome, Row};
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
};
/// Samples the overhead scenario wants on each side at the least.
const OVERHEAD_MIN_SAMPLES: u64 = 5000;

/// A chat completion for `model`, small on the way in and out.
pub(crate) fn chat_request(model: &str) -> Arc<[u8]> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    });
    super::client::request_bytes("POST", "/v1/chat/completions", body.to_string().as_bytes()).into()
}

/// Warm-up before a measured window: a tenth of it, between 0.2 s and 1 s, plus two upstream
/// latencies so that every client has had answers before anything counts.
pub(crate) fn warmup(duration: Duration, latency: Duration) -> Duration {
    (duration / 10).clamp(Duration::from_millis(200), Duration::from_secs(1)) + latency * 2
}

/// Where a phase sends its requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Direct,
    Syncgate,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Direct => "direct",
            Side::Syncgate => "through syncgate",
        }
    }
}

/// One latency-0 phase of `clients` on `side`, with the CPU seconds each process used and,
/// through syncgate, what the gateway measured about itself.
fn latency_zero_phase(
    b: &mut Bench,
    name: &str,
    side: Side,
    clients: usize,
    duration: Duration,
    min_samples: u64,
) -> anyhow::Result<Phase> {
    let mock = MockSpec::latency(0);
    let (addr, model, gateway_pid) = match side {
        Side::Direct => (b.fleet.upstream(mock)?, "bench-model", None),
        Side::Syncgate => {
            let (addr, pid) = b.gateway(mock, OPEN_GATEWAY)?;
            (addr, "bench", Some(pid))
        }
    };
    let mut procs = vec![
        ("upstream", b.fleet.upstream_pid()),
        ("load_generator", None),
    ];
    if let Some(pid) = gateway_pid {
        procs.insert(0, ("gateway", Some(pid)));
    }
    let mut cpu = CpuMeter::new(procs);
    let spec = LoadSpec {
        addr,
        clients,
        work: Work::Plain {
            request: chat_request(model),
            think_after_503: Duration::ZERO,
        },
        stagger: Duration::ZERO,
    };
    let label = format!("{name}: {} {}", plural(clients, "client"), side.name());
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

/// Direct, syncgate, syncgate, direct (half the duration each): drift on a shared machine
/// falls on both sides alike. Returns (direct, syncgate), each merged over its two rounds.
fn abba(b: &mut Bench, name: &str, clients: usize, min_samples: u64) -> anyhow::Result<[Phase; 2]> {
    let half = b.duration / 2;
    let mut sides: [Option<Phase>; 2] = [None, None];
    for side in [Side::Direct, Side::Syncgate, Side::Syncgate, Side::Direct] {
        let phase = latency_zero_phase(b, name, side, clients, half, min_samples / 2)?;
        let slot = &mut sides[usize::from(side == Side::Syncgate)];
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
        [Some(d), Some(s)] => Ok([d, s]),
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

/// "1 client", "8 clients".
pub(crate) fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
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
        let direct = latency_zero_phase(b, "sweep", Side::Direct, clients, duration, 0)?.result;
        let through = latency_zero_phase(b, "sweep", Side::Syncgate, clients, duration, 0)?.result;
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

pub(crate) fn slow_ai(b: &mut Bench) -> anyhow::Result<Outcome> {
    let clients = b.clients;
    let latency = Duration::from_millis(500);
    let mock = MockSpec::latency(500);
    let gateway = GatewaySpec {
        workers: clients,
        queue: clients,
        max_connections: clients + 64,
        max_queue_wait_ms: 5000,
    };
    let ideal_rps = clients as f64 / latency.as_secs_f64();
    let spec = |addr, model| LoadSpec {
        addr,
        clients,
        work: Work::Plain {
            request: chat_request(model),
            think_after_503: Duration::ZERO,
        },
        stagger: latency,
    };
    let warm = warmup(b.duration, latency);

    let upstream = b.fleet.upstream(mock)?;
    let mut direct_cpu = CpuMeter::new(vec![
        ("upstream", b.fleet.upstream_pid()),
        ("load_generator", None),
    ]);
    let label = format!("slow-ai: {} direct", plural(clients, "client"));
    let direct = b.measure(
        label,
        &spec(upstream, "bench-model"),
        warm,
        b.duration,
        0,
        |m| direct_cpu.tick(m),
    )?;

    let (addr, pid) = b.gateway(mock, gateway)?;
    let mut cpu = CpuMeter::new(vec![
        ("gateway", Some(pid)),
        ("upstream", b.fleet.upstream_pid()),
        ("load_generator", None),
    ]);
    let idle_kib = procs::rss_kib(pid).unwrap_or(0);
    let mut peak_kib = idle_kib;
    let mut ticks = 0u32;
    let mut busy_max = 0u64;
    let mut window = ReportedWindow::new(addr);
    let label = format!("slow-ai: {} through syncgate", plural(clients, "client"));
    let through = b.measure(
        label,
        &spec(addr, "bench"),
        warm,
        b.duration,
        0,
        |measuring| {
            cpu.tick(measuring);
            window.tick(measuring);
            if measuring {
                peak_kib = peak_kib.max(procs::rss_kib(pid).unwrap_or(0));
                ticks += 1;
                if ticks % 10 == 5 {
                    if let Ok(g) = procs::gauges(addr) {
                        busy_max = busy_max.max(g.workers_busy);
                    }
                }
            }
        },
    )?;

    let reported = window.finish()?;
    let efficiency = through.ok_per_s() / ideal_rps;
    let direct_efficiency = direct.ok_per_s() / ideal_rps;
    let rss_mb = peak_kib as f64 / 1024.0;
    let per_inflight_kb = peak_kib.saturating_sub(idle_kib) as f64 / clients as f64;
    let json = json!({
        "efficiency": efficiency,
        "direct_efficiency": direct_efficiency,
        "rps": through.ok_per_s(),
        "direct_rps": direct.ok_per_s(),
        "ideal_rps": ideal_rps,
        "clients": clients,
        "p50_ms": ms(through.tally.ok.p50()),
        "p99_ms": ms(through.tally.ok.p99()),
        "direct_p50_ms": ms(direct.tally.ok.p50()),
        "direct_p99_ms": ms(direct.tally.ok.p99()),
        "rss_mb": rss_mb,
        "rss_idle_mb": idle_kib as f64 / 1024.0,
        "rss_per_inflight_kb": per_inflight_kb,
        "workers_busy_max": busy_max,
        "gateway_reported": reported,
        "cores_used": {"syncgate": cpu.cores(), "direct": direct_cpu.cores()},
        "errors": through.tally.errors + direct.tally.errors,
        "rejected": through.tally.rejected.count(),
    });
    let relative = efficiency / direct_efficiency.max(1e-9);
    let rows = vec![
        Row::goal(
            &format!("Little's-law efficiency, {}", plural(clients, "client")),
            format!("{efficiency:.3} vs {direct_efficiency:.3} direct = {relative:.3}×"),
            "≥ 0.95 × direct",
            relative >= 0.95,
        ),
        Row::info(
            "latency p50 / p99 (upstream 500 ms)",
            format!(
                "{:.1} / {:.1} ms (direct {:.1} / {:.1} ms)",
                ms(through.tally.ok.p50()),
                ms(through.tally.ok.p99()),
                ms(direct.tally.ok.p50()),
                ms(direct.tally.ok.p99())
            ),
        ),
        Row::goal(
            "resident memory under load (peak)",
            format!("{rss_mb:.1} MB (idle {:.1} MB)", idle_kib as f64 / 1024.0),
            "≤ 100 MB",
            rss_mb <= 100.0,
        ),
        Row::info(
            "memory per in-flight request",
            format!("{per_inflight_kb:.1} KB"),
        ),
        Row::info(
            "CPU busy while measured",
            format!(
                "{}; direct: {}",
                cpu.cores_summary(),
                direct_cpu.cores_summary()
            ),
        ),
    ];
    Ok(Outcome::new("slow_ai", json, rows))
}

pub(crate) fn saturated_health(b: &mut Bench) -> anyhow::Result<Outcome> {
    let gateway = GatewaySpec {
        workers: 8,
        queue: 16,
        max_connections: 1024,
        max_queue_wait_ms: 60_000,
    };
    // Twice what the gateway holds: the surplus keeps the queue full and is refused.
    let clients = 2 * (gateway.workers + gateway.queue);
    let think = Duration::from_millis(20);
    let (addr, _) = b.gateway(MockSpec::latency(2000), gateway)?;
    b.phase(format!(
        "saturated-health: {clients} clients on 8 workers + 16 queued, probing /healthz"
    ));
    let mut load = Load::start(&LoadSpec {
        addr,
        clients,
        work: Work::Plain {
            request: chat_request("bench"),
            think_after_503: think,
        },
        stagger: Duration::ZERO,
    })?;
    let full = |g: &procs::Gauges| {
        g.workers_busy >= gateway.workers as u64 && g.queue_depth >= gateway.queue as u64
    };
    let (before, saturated_before) = procs::wait_for_gauges(addr, Duration::from_secs(10), full)?;
    load.begin_measuring();
    let probe = super::client::request_bytes("GET", "/healthz", b"");
    let (health, failures) = load::sequential(addr, &probe, b.duration, &super::INTERRUPTED);
    let after = procs::gauges(addr)?;
    let overflow = load.finish();
    b.bar.inc(1);
    if super::interrupted() {
        anyhow::bail!("interrupted");
    }
    let saturated = saturated_before && full(&after);
    let json = json!({
        "p50_ms": ms(health.p50()),
        "p99_ms": ms(health.p99()),
        "max_ms": ms(health.max()),
        "samples": health.count(),
        "failures": failures,
        "saturated": saturated,
        "workers_busy": [before.workers_busy, after.workers_busy],
        "queue_depth": [before.queue_depth, after.queue_depth],
        "refused_per_s": overflow.rejected_per_s(),
        "clients": clients,
    });
    let note = if saturated { "" } else { " (NOT saturated)" };
    let rows = vec![
        Row::info(
            "/healthz p50, workers and queue full",
            format!("{:.3} ms{note}", ms(health.p50())),
        ),
        Row::goal(
            "/healthz p99, workers and queue full",
            format!(
                "{:.3} ms ({} probes, {:.0} 503s/s beside){note}",
                ms(health.p99()),
                health.count(),
                overflow.rejected_per_s()
            ),
            "≤ 5 ms",
            ms(health.p99()) <= 5.0 && health.count() > 0,
        ),
    ];
    Ok(Outcome::new("saturated_health", json, rows))
}

pub(crate) fn overload(b: &mut Bench) -> anyhow::Result<Outcome> {
    let gateway = GatewaySpec {
        workers: 16,
        queue: 16,
        max_connections: 1024,
        max_queue_wait_ms: 5000,
    };
    let latency = Duration::from_millis(100);
    let capacity_rps = gateway.workers as f64 / latency.as_secs_f64();
    // Ten clients per worker, each waiting one upstream latency after a 503: a client offers
    // about one request per 100 ms whether it is served or refused, so together they offer
    // 10 × capacity.
    let clients = 10 * gateway.workers;
    let think = latency;
    let (addr, _) = b.gateway(MockSpec::latency(100), gateway)?;
    let spec = LoadSpec {
        addr,
        clients,
        work: Work::Plain {
            request: chat_request("bench"),
            think_after_503: think,
        },
        stagger: latency,
    };
    let label = format!("overload: {clients} clients on {capacity_rps:.0} rps of capacity");
    let r = b.measure(
        label,
        &spec,
        warmup(b.duration, latency),
        b.duration,
        0,
        |_| {},
    )?;
    let t = &r.tally;
    let goodput = r.ok_per_s();
    let ratio = goodput / capacity_rps;
    let offered = (t.ok.count() + t.rejected.count() + t.other_status) as f64
        / r.measured.as_secs_f64().max(1e-9);
    let json = json!({
        "goodput_ratio": ratio,
        "reject_p99_ms": ms(t.rejected.p99()),
        "reject_p50_ms": ms(t.rejected.p50()),
        "goodput_rps": goodput,
        "capacity_rps": capacity_rps,
        "attempts_per_s": offered,
        "rejected_per_s": r.rejected_per_s(),
        "ok_p50_ms": ms(t.ok.p50()),
        "ok_p99_ms": ms(t.ok.p99()),
        "clients": clients,
        "think_after_503_ms": think.as_millis() as u64,
        "other_status": t.other_status,
        "errors": t.errors,
    });
    let rows = vec![
        Row::goal(
            "goodput ÷ capacity at 10× offered",
            format!("{ratio:.3} ({goodput:.0} of {capacity_rps:.0} rps)"),
            "≥ 0.95",
            ratio >= 0.95,
        ),
        Row::goal(
            "time to a 503, p99",
            format!(
                "{:.3} ms ({:.0} refusals/s)",
                ms(t.rejected.p99()),
                r.rejected_per_s()
            ),
            "≤ 5 ms",
            t.rejected.count() > 0 && ms(t.rejected.p99()) <= 5.0,
        ),
    ];
    Ok(Outcome::new("overload", json, rows))
}
