//! The streams scenario: `--streams` clients, each streaming one chat completion after another
//! (64 events 20 ms apart from the upstream), first straight from the mock upstream, then
//! through syncgate. A stream whose events ever arrive more than 120 ms apart (100 ms beyond
//! the upstream's pacing) has stalled; a client is *sustained* when none of its measured
//! streams stalled or failed.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::load::{LoadResult, LoadSpec, Work};
use super::observe::ReportedWindow;
use super::procs::{Backend, GatewaySpec, MockSpec};
use super::report::{ms, Outcome, Row};
use super::scenarios::warmup;
use super::Bench;

const CHUNKS: u64 = 64;
const INTERVAL: Duration = Duration::from_millis(20);
/// An inter-event gap above this is a stall: the pacing plus 100 ms.
const STALL_GAP: Duration = Duration::from_millis(120);

/// A streamed chat completion whose reply has a word or more for each of the 64 chunks.
fn stream_request(model: &str) -> Arc<[u8]> {
    let words: Vec<String> = (1..=70).map(|i| format!("word{i}")).collect();
    let body = json!({
        "model": model,
        "stream": true,
        "messages": [{"role": "user", "content": words.join(" ")}],
    });
    super::client::request_bytes("POST", "/v1/chat/completions", body.to_string().as_bytes()).into()
}

pub(crate) fn streams(b: &mut Bench) -> anyhow::Result<Outcome> {
    let n = b.streams;
    let mock = MockSpec {
        latency_ms: 0,
        stream_chunks: CHUNKS,
        stream_interval_ms: INTERVAL.as_millis() as u64,
    };
    // A stream holds its worker to the end: one worker per stream.
    let gateway = GatewaySpec {
        workers: n,
        queue: n,
        max_connections: n + 64,
        max_queue_wait_ms: 5000,
        log_requests: true,
        backend: Backend::Sqlite,
    };
    // Clients start spread over one stream's length, so the upstream's events for different
    // streams do not all fall due at the same instant.
    let one_stream = INTERVAL * (CHUNKS as u32 + 1);
    let spec = |addr, model| LoadSpec {
        addr,
        clients: n,
        work: Work::Stream {
            request: stream_request(model),
            stall_gap: STALL_GAP,
        },
        stagger: one_stream,
    };
    let warm = warmup(b.duration, Duration::ZERO) + one_stream;
    // At least one whole stream per client inside the window.
    let duration = b.duration.max(one_stream * 2);

    let upstream = b.fleet.upstream(mock)?;
    let mut direct_cpu = b.cpu_meter(None);
    let label = format!("streams: {n} concurrent direct");
    let direct = b.measure(
        label,
        &spec(upstream, "bench-model"),
        warm,
        duration,
        0,
        |m| {
            direct_cpu.tick(m);
        },
    )?;
    let (addr, pid) = b.gateway(mock, gateway)?;
    let mut cpu = b.cpu_meter(Some(pid));
    let label = format!("streams: {n} concurrent through syncgate");
    let mut window = ReportedWindow::new(addr);
    let through = b.measure(label, &spec(addr, "bench"), warm, duration, 0, |m| {
        cpu.tick(m);
        window.tick(m);
    })?;
    let reported = window.finish()?;
    let scrape_ms = reported["metrics_scrape_ms"].as_f64().unwrap_or(f64::NAN);

    let added_ttft_p99 = ms(through.tally.ok.p99()) - ms(direct.tally.ok.p99());
    let side = |r: &LoadResult| {
        let t = &r.tally;
        json!({
            "sustained": t.clients_sustained,
            "stalled": t.streams_stalled,
            "failed": t.streams_failed,
            "completed": t.streams_clean + t.streams_stalled,
            "ttft_p50_ms": ms(t.ok.p50()),
            "ttft_p99_ms": ms(t.ok.p99()),
            "max_gap_ms": ms(t.max_gap),
            "errors": t.errors,
        })
    };
    let t = &through.tally;
    let mut json = side(&through);
    json["added_ttft_p99_ms"] = json!(added_ttft_p99);
    json["streams"] = json!(n);
    json["direct"] = side(&direct);
    json["gateway_reported"] = reported;
    json["cores_used"] = json!({"syncgate": cpu.cores(), "direct": direct_cpu.cores()});
    let measured = t.streams_clean + t.streams_stalled + t.streams_failed;
    let rows = vec![
        Row::goal(
            &format!("sustained streams of {n} concurrent"),
            format!(
                "{} (direct {})",
                t.clients_sustained, direct.tally.clients_sustained
            ),
            &format!("{n} (all)"),
            t.clients_sustained == n as u64,
        ),
        Row::goal(
            "stalled streams (a gap > 120 ms)",
            format!(
                "{} of {measured}, {} failed; longest gap {:.0} ms (direct {} stalled, {:.0} ms)",
                t.streams_stalled,
                t.streams_failed,
                ms(t.max_gap),
                direct.tally.streams_stalled,
                ms(direct.tally.max_gap)
            ),
            "0",
            t.streams_stalled == 0 && t.streams_failed == 0 && measured > 0,
        ),
        Row::goal(
            "added time to first event, p99",
            format!(
                "{added_ttft_p99:+.2} ms ({:.2} vs {:.2} ms direct)",
                ms(t.ok.p99()),
                ms(direct.tally.ok.p99())
            ),
            "≤ 2 ms",
            added_ttft_p99 <= 2.0,
        ),
        Row::info(
            "one /metrics scrape (new connection) meanwhile",
            format!("{:.1} ms", scrape_ms),
        ),
        cpu.busy_row(&direct_cpu),
    ];
    Ok(Outcome::new("streams", json, rows))
}
