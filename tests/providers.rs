//! Providers against a real HTTP upstream (`syncgate mock-upstream`, misbehaving on cue): the
//! body passed through, retries and fallbacks counted on the mock's `/stats`, every fault plain
//! and streamed ending within its deadline with the documented status or final error event,
//! streams relayed as paced, a departing client seen upstream, and keys kept out of sight.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const KEY_VAR: &str = "SG_TEST_PROVIDER_KEY";
const KEY: &str = "sk-canary-provider-5f1e0c";

/// Timeouts short enough for tests, long enough for a busy 2-core machine.
const FIRST_BYTE_MS: u64 = 1500;
const IDLE_MS: u64 = 700;

/// Provider timeouts and the stream heartbeat of a test gateway, in ms.
#[derive(Clone, Copy)]
struct Timing {
    first_byte: u64,
    idle: u64,
    heartbeat: u64,
}

const FAST: Timing = Timing {
    first_byte: FIRST_BYTE_MS,
    idle: IDLE_MS,
    heartbeat: 200,
};

fn provider_toml(name: &str, upstream: SocketAddr, max_concurrency: usize, t: Timing) -> String {
    format!(
        r#"
[[providers]]
name = "{name}"
type = "openai"
base_url = "http://{upstream}/v1"
api_key_env = "{KEY_VAR}"
max_concurrency = {max_concurrency}
[providers.timeouts]
connect_ms = 1000
first_byte_ms = {}
idle_ms = {}
total_ms = 6000
"#,
        t.first_byte, t.idle
    )
}

/// A gateway whose model `m` goes to the given upstreams in order.
fn gateway(upstreams: &[SocketAddr], max_concurrency: usize) -> Server {
    gateway_timed(upstreams, max_concurrency, FAST)
}

fn gateway_timed(upstreams: &[SocketAddr], max_concurrency: usize, t: Timing) -> Server {
    let mut toml = format!("[stream]\nheartbeat_ms = {}\n", t.heartbeat);
    let mut targets = Vec::new();
    for (i, up) in upstreams.iter().enumerate() {
        toml.push_str(&provider_toml(&format!("up{i}"), *up, max_concurrency, t));
        targets.push(format!("\"up{i}/upstream-model-{i}\""));
    }
    toml.push_str(&format!(
        "\n[[models]]\nname = \"m\"\ntargets = [{}]\n",
        targets.join(", ")
    ));
    Server::start_full(&[], &[(KEY_VAR, KEY)], Some(TempConfig::new(&toml)))
}

fn mock(args: &[&str]) -> Server {
    Server::start_mock_upstream(args)
}

fn stats(upstream: &Server) -> Value {
    get(upstream.addr, "/stats").json()
}

fn upstream_requests(upstream: &Server) -> u64 {
    stats(upstream)["requests"].as_u64().unwrap_or(u64::MAX)
}

fn body(stream: bool) -> String {
    format!(
        r#"{{"model":"m","stream":{stream},"temperature":0.25,"seed":7,
            "tools":[{{"type":"function","function":{{"name":"f","parameters":{{"type":"object"}}}}}}],
            "messages":[{{"role":"user","content":"through the provider"}}]}}"#
    )
}

fn call(gw: &Server, stream: bool) -> (Resp, Duration) {
    let started = Instant::now();
    let r = send(
        gw.addr,
        &post_req("/v1/chat/completions", &body(stream), &[]),
    );
    (r, started.elapsed())
}

/// `syncgate_upstream_retries_total` of the first provider.
fn retries_taken(gw: &Server) -> Option<f64> {
    metric_value(
        &scrape(gw.addr),
        "syncgate_upstream_retries_total",
        &[("provider", "up0")],
    )
}

/// After any fault the worker and the provider slot must be free again.
fn assert_idle_again(gw: &Server) {
    wait_for_metric(
        gw.addr,
        "syncgate_workers_busy",
        &[],
        |v| v == 0.0,
        Duration::from_secs(5),
    );
    wait_for_metric(
        gw.addr,
        "syncgate_upstream_in_flight",
        &[("provider", "up0")],
        |v| v == 0.0,
        Duration::from_secs(5),
    );
}

/// The mock must count a client (the gateway) closing on it within `bound` of `since`.
fn assert_upstream_closed(up: &Server, since: Instant, bound: Duration, what: &str) {
    let seen = poll_until(Duration::from_secs(3), Duration::from_millis(20), || {
        stats(up)["client_closed"].as_u64().unwrap_or(0) >= 1
    });
    assert!(seen, "{what}: {}", stats(up));
    assert!(
        since.elapsed() < bound,
        "{what}: took {:?}",
        since.elapsed()
    );
}

// --- streams, read event by event with arrival times -------------------------------------

/// Sends a streamed chat request and reads the chunked SSE body as it arrives, for at most
/// `limit`; `stop_after` data events, the client closes (a departing client).
fn stream(addr: SocketAddr, limit: Duration, stop_after: Option<usize>) -> Sse {
    read_sse(
        addr,
        &post_req("/v1/chat/completions", &body(true), &[]),
        limit,
        stop_after,
    )
}

// --- the tests ---------------------------------------------------------------------------

#[test]
fn chat_reaches_the_provider_with_the_body_unchanged_but_the_model() {
    let up = mock(&[]);
    let gw = gateway(&[up.addr], 8);
    let (r, _) = call(&gw, false);
    assert_ok(&r, "chat through the provider");
    assert_eq!(
        r.header("x-syncgate-provider"),
        Some("up0/upstream-model-0"),
        "{}",
        r.describe()
    );
    assert_eq!(r.header("x-syncgate-attempts"), Some("1"));
    let overhead: f64 = r
        .header("x-syncgate-overhead-ms")
        .unwrap_or("x")
        .parse()
        .expect("overhead header");
    assert!((0.0..1000.0).contains(&overhead), "{overhead}");
    assert!(
        r.json()["choices"][0]["message"]["content"].is_string(),
        "{}",
        r.describe()
    );

    let seen = get(up.addr, "/requests").json();
    let last = seen
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .expect("the mock saw the request");
    let sent = &last["body"];
    assert_eq!(sent["model"], "upstream-model-0", "{last}");
    assert_eq!(sent["temperature"], 0.25, "{last}");
    assert_eq!(sent["seed"], 7, "{last}");
    assert_eq!(sent["tools"][0]["function"]["name"], "f", "{last}");
    assert_eq!(
        last["headers"]["authorization"],
        format!("Bearer {KEY}"),
        "{last}"
    );
    let rid = r.header("x-request-id").expect("request id").to_string();
    let logged = poll_until(Duration::from_secs(3), Duration::from_millis(20), || {
        gw.log().lines().any(|l| {
            l.contains(&rid)
                && l.contains("upstream=up0/upstream-model-0")
                && l.contains("attempts=1")
        })
    });
    assert!(
        logged,
        "the access line should name the upstream:\n{}",
        gw.log()
    );
}

#[test]
fn embeddings_and_models_go_through_the_same_routing() {
    let up = mock(&[]);
    let gw = gateway(&[up.addr], 8);
    let r = post_json(
        gw.addr,
        "/v1/embeddings",
        r#"{"model":"m","input":["a","b"]}"#,
    );
    assert_ok(&r, "embeddings through the provider");
    assert_eq!(
        r.json()["data"].as_array().map(Vec::len),
        Some(2),
        "{}",
        r.describe()
    );
    let models = get(gw.addr, "/v1/models").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["mock", "m"]);
}

#[test]
fn streamed_events_arrive_spaced_as_the_provider_sent_them() {
    let up = mock(&["--stream-chunks", "8", "--stream-interval-ms", "120"]);
    let gw = gateway(&[up.addr], 8);
    let s = stream(gw.addr, Duration::from_secs(10), None);
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(
        s.head
            .to_ascii_lowercase()
            .contains("x-accel-buffering: no"),
        "{}",
        s.head
    );
    assert!(s.has_done() && s.ended_cleanly, "{:?}", s.data());
    let content: Vec<&Instant> = s
        .events
        .iter()
        .filter(|(_, e)| e.contains("\"content\""))
        .map(|(t, _)| t)
        .collect();
    assert!(content.len() >= 8, "{:?}", s.data());
    // Batched events would arrive together; relayed ones span the provider's pacing.
    let span = content.last().unwrap().duration_since(*content[0]);
    assert!(
        span >= Duration::from_millis(500),
        "events arrived within {span:?}: batched"
    );
    let gaps = content
        .windows(2)
        .filter(|w| w[1].duration_since(*w[0]) >= Duration::from_millis(60))
        .count();
    assert!(
        gaps >= 5,
        "only {gaps} of {} gaps look paced",
        content.len() - 1
    );
}

#[test]
fn retryable_statuses_are_retried_twice_then_answered_502() {
    let up = mock(&["--fault", "status=500"]);
    let gw = gateway(&[up.addr], 8);
    let (r, took) = call(&gw, false);
    assert_error(&r, 502, None, Some("upstream_error"));
    assert_eq!(upstream_requests(&up), 3, "first try + 2 retries");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(retries_taken(&gw), Some(2.0));
    assert_idle_again(&gw);
}

#[test]
fn upstream_429_honours_retry_after_and_ends_as_429() {
    let up = mock(&["--fault", "status=429,retry-after=1"]);
    let gw = gateway(&[up.addr], 8);
    let (r, took) = call(&gw, false);
    assert_error(&r, 429, None, Some("rate_limit_exceeded"));
    assert!(r.header("retry-after").is_some(), "{}", r.describe());
    assert_eq!(upstream_requests(&up), 3);
    assert!(
        took >= Duration::from_millis(1900),
        "two Retry-After waits of 1 s, took {took:?}"
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
}

#[test]
fn client_errors_pass_through_without_retry() {
    let up = mock(&["--fault", "status=422"]);
    let gw = gateway(&[up.addr], 8);
    let (r, _) = call(&gw, false);
    assert_eq!(r.status, 422, "{}", r.describe());
    assert!(r.json()["error"]["message"].is_string());
    assert_eq!(upstream_requests(&up), 1);
}

#[test]
fn upstream_auth_failure_is_502_upstream_auth_without_retry() {
    let up = mock(&["--fault", "status=401"]);
    let gw = gateway(&[up.addr], 8);
    let (r, _) = call(&gw, false);
    let v = assert_error(&r, 502, None, Some("upstream_auth"));
    assert!(!v.to_string().contains(KEY));
    assert_eq!(upstream_requests(&up), 1);
}

#[test]
fn a_hanging_provider_times_out_with_504_within_first_byte() {
    for (fault, stream) in [("hang", false), ("hang", true), ("slow-head=4000", false)] {
        let up = mock(&["--fault", fault]);
        let gw = gateway(&[up.addr], 8);
        let (r, took) = call(&gw, stream);
        assert_error(&r, 504, None, Some("upstream_timeout"));
        let limit = Duration::from_millis(FIRST_BYTE_MS + 1000);
        assert!(took < limit, "{fault} stream={stream}: took {took:?}");
        assert_eq!(upstream_requests(&up), 1, "timeouts are not retried");
        assert_idle_again(&gw);
    }
}

#[test]
fn an_unreachable_provider_is_502_after_retries() {
    // A port nothing listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = gateway(&[port], 8);
    let (r, took) = call(&gw, false);
    assert_error(&r, 502, None, Some("upstream_unreachable"));
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(retries_taken(&gw), Some(2.0));
}

#[test]
fn broken_plain_answers_are_502_bad_upstream_reply() {
    for fault in ["malformed", "truncate-after=3", "reset"] {
        let up = mock(&["--fault", fault]);
        let gw = gateway(&[up.addr], 8);
        let (r, took) = call(&gw, false);
        assert_eq!(r.status, 502, "{fault}: {}", r.describe());
        assert!(
            took < Duration::from_millis(FIRST_BYTE_MS + 1000),
            "{fault}: {took:?}"
        );
        assert_idle_again(&gw);
    }
}

#[test]
fn a_stalled_stream_ends_with_an_error_event_and_no_done() {
    let up = mock(&["--fault", "stall-after=2", "--stream-interval-ms", "20"]);
    let gw = gateway(&[up.addr], 8);
    let started = Instant::now();
    let s = stream(gw.addr, Duration::from_secs(6), None);
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(!s.has_done(), "{:?}", s.data());
    assert_eq!(
        s.last_error_code().as_deref(),
        Some("upstream_timeout"),
        "{:?}",
        s.data()
    );
    assert!(
        started.elapsed() < Duration::from_millis(IDLE_MS + 1500),
        "{:?}",
        started.elapsed()
    );
    let heartbeats = s
        .events
        .iter()
        .filter(|(_, e)| e.starts_with(": keep-alive"))
        .count();
    assert!(
        heartbeats >= 1,
        "no heartbeat while stalled: {:?}",
        s.events
    );
    assert_idle_again(&gw);
}

#[test]
fn cut_garbled_or_failed_streams_end_with_an_error_event_and_no_done() {
    for (fault, code) in [
        ("truncate-after=3", "upstream_truncated"),
        ("malformed", "bad_upstream_reply"),
        ("error-event", "mock_error"),
    ] {
        let up = mock(&["--fault", fault]);
        let gw = gateway(&[up.addr], 8);
        let s = stream(gw.addr, Duration::from_secs(5), None);
        assert_eq!(s.status, 200, "{fault}: {}", s.head);
        assert!(!s.has_done(), "{fault}: {:?}", s.data());
        assert_eq!(
            s.last_error_code().as_deref(),
            Some(code),
            "{fault}: {:?}",
            s.data()
        );
        assert!(
            s.ended_cleanly,
            "{fault}: the chunked body should still end properly"
        );
        assert_idle_again(&gw);
    }
}

#[test]
fn a_reset_before_the_head_is_a_plain_502_even_when_streaming() {
    let up = mock(&["--fault", "reset"]);
    let gw = gateway(&[up.addr], 8);
    let s = stream(gw.addr, Duration::from_secs(5), None);
    assert_eq!(s.status, 502, "{}", s.head);
}

#[test]
fn a_failing_target_falls_back_to_the_next() {
    let bad = mock(&["--fault", "status=503"]);
    let good = mock(&[]);
    let gw = gateway(&[bad.addr, good.addr], 8);
    let (r, _) = call(&gw, false);
    assert_ok(&r, "fallback");
    assert_eq!(
        r.header("x-syncgate-provider"),
        Some("up1/upstream-model-1"),
        "{}",
        r.describe()
    );
    assert_eq!(
        upstream_requests(&bad),
        3,
        "the first target gets its retries"
    );
    assert_eq!(upstream_requests(&good), 1);
}

/// Starts a call that holds the first provider's only slot (its upstream is slow) and waits
/// until it does; join the handle for that call's answer.
fn hold_the_slot(gw: &Server) -> thread::JoinHandle<Resp> {
    let addr = gw.addr;
    let held =
        thread::spawn(move || send(addr, &post_req("/v1/chat/completions", &body(false), &[])));
    wait_for_metric(
        gw.addr,
        "syncgate_upstream_in_flight",
        &[("provider", "up0")],
        |v| v == 1.0,
        Duration::from_secs(5),
    );
    held
}

#[test]
fn a_provider_at_its_cap_sends_the_next_call_elsewhere_or_answers_503() {
    let slow = mock(&["--latency-ms", "1000"]);
    let gw = gateway(&[slow.addr], 1);
    let held = hold_the_slot(&gw);
    let (second, took) = call(&gw, false);
    assert_error(&second, 503, None, Some("provider_at_capacity"));
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_ok(&held.join().unwrap(), "the call holding the slot");

    // With a second target, the call over the cap goes there instead.
    let other = mock(&[]);
    let gw = gateway(&[slow.addr, other.addr], 1);
    let held = hold_the_slot(&gw);
    let (second, _) = call(&gw, false);
    assert_ok(&second, "over the cap, to the next target");
    assert_eq!(
        second.header("x-syncgate-provider"),
        Some("up1/upstream-model-1")
    );
    assert_ok(&held.join().unwrap(), "the call holding the slot");
}

#[test]
fn a_client_leaving_mid_stream_closes_the_upstream_within_a_second() {
    let up = mock(&["--stream-chunks", "200", "--stream-interval-ms", "50"]);
    let gw = gateway(&[up.addr], 8);
    let s = stream(gw.addr, Duration::from_secs(5), Some(3));
    assert_eq!(s.status, 200, "{}", s.head);
    let left = Instant::now();
    drop(s);
    assert_upstream_closed(
        &up,
        left,
        Duration::from_millis(1500),
        "the mock never saw the gateway close: {}",
    );
    assert_idle_again(&gw);
}

#[test]
fn an_unavailable_provider_answers_503_without_calling_anyone() {
    let up = mock(&[]);
    let toml = format!(
        "{}\n[[models]]\nname = \"m\"\ntargets = [\"up0/x\"]\n",
        provider_toml("up0", up.addr, 8, FAST).replace(KEY_VAR, "SG_TEST_SURELY_UNSET")
    );
    let gw = Server::start_with_config(&toml, &[]);
    let (r, _) = call(&gw, false);
    assert_error(&r, 503, None, Some("provider_unavailable"));
    assert_eq!(upstream_requests(&up), 0);
    assert!(
        gw.log().contains("SG_TEST_SURELY_UNSET"),
        "start-up should say which variable is unset"
    );
}

#[test]
fn keys_never_reach_logs_errors_or_metrics() {
    let client_key = "sk-canary-client-77aa";
    let up = mock(&["--fault", "status=401"]);
    let gw = gateway(&[up.addr], 8);
    let auth = format!("Bearer {client_key}");
    let r = send(
        gw.addr,
        &post_req(
            "/v1/chat/completions",
            &body(false),
            &[("Authorization", &auth)],
        ),
    );
    assert_eq!(r.status, 502);
    let seen = get(up.addr, "/requests").json().to_string();
    assert!(
        !seen.contains(client_key),
        "the client's key was forwarded upstream: {seen}"
    );
    let metrics = scrape(gw.addr);
    for secret in [KEY, client_key] {
        assert!(
            !r.text().contains(secret),
            "error body has a key: {}",
            r.text()
        );
        assert!(!metrics.contains(secret), "metrics have a key");
        assert!(
            !gw.log().contains(secret),
            "the log has a key:\n{}",
            gw.log()
        );
        assert!(!gw.stdout().contains(secret), "stdout has a key");
    }
}

#[test]
fn a_client_leaving_while_the_provider_is_silent_closes_the_upstream_within_a_second() {
    // The provider sends one chunk and then nothing. Heartbeat, idle and first-byte are all 5 s,
    // so neither a heartbeat write, nor the idle deadline, nor a read timeout can end the relay
    // in time: only watching the client can.
    let up = mock(&["--fault", "stall-after=1"]);
    let slow = Timing {
        first_byte: 5000,
        idle: 5000,
        heartbeat: 5000,
    };
    let gw = gateway_timed(&[up.addr], 8, slow);
    let s = stream(gw.addr, Duration::from_secs(5), Some(2));
    assert_eq!(s.status, 200, "{}", s.head);
    let left = Instant::now();
    drop(s);
    assert_upstream_closed(
        &up,
        left,
        Duration::from_secs(1),
        "the mock never saw the gateway close: {}",
    );
    assert_idle_again(&gw);
}

#[test]
fn a_stall_past_idle_closes_the_upstream_as_the_client_gets_its_error_event() {
    // Idle 700 ms ends the relay; the read's own timeout (first-byte, 5 s) is far off, so only
    // cancelling the read closes the upstream within the bound.
    let up = mock(&["--fault", "stall-after=1"]);
    let t = Timing {
        first_byte: 5000,
        ..FAST
    };
    let gw = gateway_timed(&[up.addr], 8, t);
    let s = stream(gw.addr, Duration::from_secs(5), None);
    assert_eq!(
        s.last_error_code().as_deref(),
        Some("upstream_timeout"),
        "{:?}",
        s.data()
    );
    let ended = Instant::now();
    assert_upstream_closed(
        &up,
        ended,
        Duration::from_secs(1),
        "the upstream stayed open after the stall",
    );
}
