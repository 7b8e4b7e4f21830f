//! The request/answer scenarios with a slow upstream: slow-ai, saturated-health and overload,
//! and what every scenario shares (the request, the warm-up). Each sets up the upstream and
//! gateway it needs, runs its phases through [`Bench::measure`], and returns its figures
//! (JSON) and table rows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::load::{self, Load, LoadResult, LoadSpec, Work};
use super::observe::{self, ReportedWindow};
use super::procs::{Backend, GatewaySpec, MockSpec};
use super::report::{ms, Outcome, Row};
use super::Bench;

/// A chat completion for `model`, small on the way in and out.
pub(crate) fn chat_request(model: &str) -> Arc<[u8]> {
    super::client::request_bytes("POST", "/v1/chat/completions", &chat_body(model)).into()
}

/// [`chat_request`] with the API key `key`.
pub(crate) fn keyed_chat_request(model: &str, key: &str) -> Arc<[u8]> {
    let bearer = format!("Bearer {key}");
    let headers = [("authorization", bearer.as_str())];
    super::client::request_bytes_with("POST", "/v1/chat/completions", &headers, &chat_body(model))
        .into()
}

fn chat_body(model: &str) -> Vec<u8> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    });
    body.to_string().into_bytes()
}

/// Warm-up before a measured window: a tenth of it, between 0.2 s and 1 s, plus two upstream
/// latencies so that every client has had answers before anything counts.
pub(crate) fn warmup(duration: Duration, latency: Duration) -> Duration {
    (duration / 10).clamp(Duration::from_millis(200), Duration::from_secs(1)) + latency * 2
}

/// The middle value of `xs` (the mean of the two middle ones when their number is even); 0
/// when there are none.
pub(crate) fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
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

/// Little's-law efficiency and the gateway's memory with `--clients` callers on a 500 ms
/// upstream, against the same callers on the upstream directly. With `--db postgres://…` the
/// gateway runs a second time with its store on PostgreSQL, measured against the same direct
/// run (the direct side has no store, so running it twice would measure only drift).
pub(crate) fn slow_ai(b: &mut Bench) -> anyhow::Result<Outcome> {
    let clients = b.clients;
    let latency = Duration::from_millis(500);
    let mock = MockSpec::latency(500);
    let ideal_rps = clients as f64 / latency.as_secs_f64();

    let upstream = b.fleet.upstream(mock)?;
    let mut direct_cpu = b.cpu_meter(None);
    let label = format!("slow-ai: {} direct", plural(clients, "client"));
    let direct = b.measure(
        label,
        &slow_ai_load(upstream, "bench-model", clients, latency),
        warmup(b.duration, latency),
        b.duration,
        0,
        |m| direct_cpu.tick(m),
    )?;
    let direct_efficiency = direct.ok_per_s() / ideal_rps;

    let through = slow_ai_through(b, Backend::Sqlite)?;
    let efficiency = through.result.ok_per_s() / ideal_rps;
    let mut json = through.json(ideal_rps);
    json["direct_efficiency"] = json!(direct_efficiency);
    json["direct_rps"] = json!(direct.ok_per_s());
    json["direct_p50_ms"] = json!(ms(direct.tally.ok.p50()));
    json["direct_p99_ms"] = json!(ms(direct.tally.ok.p99()));
    json["ideal_rps"] = json!(ideal_rps);
    json["cores_used"]["direct"] = direct_cpu.cores();
    json["errors"] = json!(through.result.tally.errors + direct.tally.errors);
    let relative = efficiency / direct_efficiency.max(1e-9);
    let (rss_mb, idle_mb) = through.rss_mb();
    let mut rows = vec![
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
                ms(through.result.tally.ok.p50()),
                ms(through.result.tally.ok.p99()),
                ms(direct.tally.ok.p50()),
                ms(direct.tally.ok.p99())
            ),
        ),
        Row::goal(
            "resident memory under load (peak)",
            format!("{rss_mb:.1} MB (idle {idle_mb:.1} MB)"),
            "≤ 100 MB",
            rss_mb <= 100.0,
        ),
        Row::info(
            "memory per in-flight request",
            format!("{:.1} KB", through.per_inflight_kb()),
        ),
        through.cpu.busy_row(&direct_cpu),
    ];

    if b.postgres.is_some() {
        let pg = slow_ai_through(b, Backend::Postgres)?;
        let efficiency = pg.result.ok_per_s() / ideal_rps;
        let relative = efficiency / direct_efficiency.max(1e-9);
        let (rss_mb, idle_mb) = pg.rss_mb();
        let mut pg_json = pg.json(ideal_rps);
        pg_json["errors"] = json!(pg.result.tally.errors);
        json["postgres"] = pg_json;
        rows.extend([
            Row::goal(
                &format!(
                    "PostgreSQL: Little's-law efficiency, {}",
                    plural(clients, "client")
                ),
                format!("{efficiency:.3} vs {direct_efficiency:.3} direct = {relative:.3}×"),
                "≥ 0.95 × direct",
                relative >= 0.95,
            ),
            Row::info(
                "PostgreSQL: latency p50 / p99 (upstream 500 ms)",
                format!(
                    "{:.1} / {:.1} ms",
                    ms(pg.result.tally.ok.p50()),
                    ms(pg.result.tally.ok.p99())
                ),
            ),
            Row::goal(
                "PostgreSQL: resident memory under load (peak)",
                format!("{rss_mb:.1} MB (idle {idle_mb:.1} MB)"),
                "≤ 100 MB",
                rss_mb <= 100.0,
            ),
            Row::info(
                "PostgreSQL: memory per in-flight request",
                format!("{:.1} KB", pg.per_inflight_kb()),
            ),
            Row::info(
                "PostgreSQL: CPU busy while measured",
                pg.cpu.cores_summary(),
            ),
        ]);
    }
    Ok(Outcome::new("slow_ai", json, rows))
}

/// Slow-ai's callers on `addr`, asking for `model`, started spread over one upstream latency.
fn slow_ai_load(addr: SocketAddr, model: &str, clients: usize, latency: Duration) -> LoadSpec {
    LoadSpec {
        addr,
        clients,
        work: Work::Plain {
            request: chat_request(model),
            think_after_503: Duration::ZERO,
        },
        stagger: latency,
    }
}

/// Slow-ai's phase through syncgate, the gateway's store on `backend`: the load's result and
/// what the gateway's process used meanwhile.
fn slow_ai_through(b: &mut Bench, backend: Backend) -> anyhow::Result<SlowAiThrough> {
    let clients = b.clients;
    let latency = Duration::from_millis(500);
    let gateway = GatewaySpec {
        workers: clients,
        queue: clients,
        max_connections: clients + 64,
        max_queue_wait_ms: 5000,
        log_requests: true,
        backend,
    };
    let (addr, pid) = b.gateway(MockSpec::latency(500), gateway)?;
    let mut cpu = b.cpu_meter(Some(pid));
    let idle_kib = observe::rss_kib(pid).unwrap_or(0);
    let mut peak_kib = idle_kib;
    let mut ticks = 0u32;
    let mut busy_max = 0u64;
    let mut window = ReportedWindow::new(addr);
    let on = match backend {
        Backend::Sqlite => String::new(),
        Backend::Postgres => format!(", on {}", backend.name()),
    };
    let label = format!(
        "slow-ai: {} through syncgate{on}",
        plural(clients, "client")
    );
    let result = b.measure(
        label,
        &slow_ai_load(addr, "bench", clients, latency),
        warmup(b.duration, latency),
        b.duration,
        0,
        |measuring| {
            cpu.tick(measuring);
            window.tick(measuring);
            if measuring {
                peak_kib = peak_kib.max(observe::rss_kib(pid).unwrap_or(0));
                ticks += 1;
                if ticks % 10 == 5 {
                    if let Ok(g) = observe::gauges(addr) {
                        busy_max = busy_max.max(g.workers_busy);
                    }
                }
            }
        },
    )?;
    Ok(SlowAiThrough {
        reported: window.finish()?,
        result,
        cpu,
        idle_kib,
        peak_kib,
        busy_max,
        clients,
    })
}

/// One slow-ai phase through syncgate.
struct SlowAiThrough {
    result: LoadResult,
    cpu: observe::CpuMeter,
    /// The gateway's VmRSS after start, and its peak while measured.
    idle_kib: u64,
    peak_kib: u64,
    busy_max: u64,
    reported: serde_json::Value,
    clients: usize,
}

impl SlowAiThrough {
    /// Peak and idle resident memory, in MB.
    fn rss_mb(&self) -> (f64, f64) {
        (self.peak_kib as f64 / 1024.0, self.idle_kib as f64 / 1024.0)
    }

    fn per_inflight_kb(&self) -> f64 {
        self.peak_kib.saturating_sub(self.idle_kib) as f64 / self.clients as f64
    }

    /// The figures of this side alone; the caller adds the direct side's.
    fn json(&self, ideal_rps: f64) -> serde_json::Value {
        let (rss_mb, idle_mb) = self.rss_mb();
        json!({
            "efficiency": self.result.ok_per_s() / ideal_rps,
            "rps": self.result.ok_per_s(),
            "clients": self.clients,
            "p50_ms": ms(self.result.tally.ok.p50()),
            "p99_ms": ms(self.result.tally.ok.p99()),
            "rss_mb": rss_mb,
            "rss_idle_mb": idle_mb,
            "rss_per_inflight_kb": self.per_inflight_kb(),
            "workers_busy_max": self.busy_max,
            "gateway_reported": self.reported,
            "cores_used": {"syncgate": self.cpu.cores()},
            "rejected": self.result.tally.rejected.count(),
        })
    }
}

pub(crate) fn saturated_health(b: &mut Bench) -> anyhow::Result<Outcome> {
    let gateway = GatewaySpec {
        workers: 8,
        queue: 16,
        max_connections: 1024,
        max_queue_wait_ms: 60_000,
        log_requests: true,
        backend: Backend::Sqlite,
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
    let full = |g: &observe::Gauges| {
        g.workers_busy >= gateway.workers as u64 && g.queue_depth >= gateway.queue as u64
    };
    let (before, saturated_before) = observe::wait_for_gauges(addr, Duration::from_secs(10), full)?;
    load.begin_measuring();
    let probe = super::client::request_bytes("GET", "/healthz", b"");
    let (health, failures) = load::sequential(addr, &probe, b.duration, &super::INTERRUPTED);
    let after = observe::gauges(addr)?;
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
        log_requests: true,
        backend: Backend::Sqlite,
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

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_ignores_one_outlying_round() {
        assert_eq!(median(&[0.95, 0.62, 0.93, 0.91, 0.97]), 0.93);
        assert!((median(&[0.9, 0.8]) - 0.85).abs() < 1e-12);
        assert_eq!(median(&[]), 0.0);
    }
}
