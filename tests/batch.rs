//! `POST /api/batch` against real upstreams (`syncgate mock-upstream`): results in request
//! order, each item failing on its own, parallelism real and bounded per batch, the limits on a
//! batch, the pool's own capacity ending in `batch_pool_full` rather than a hang, and plain
//! chat calls unaffected while the pool is saturated.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// An `openai` provider called `name` at a mock upstream, with deadlines for tests.
fn provider(name: &str, upstream: SocketAddr) -> String {
    format!(
        r#"
[[providers]]
name = "{name}"
type = "openai"
base_url = "http://{upstream}/v1"
[providers.timeouts]
connect_ms = 1000
first_byte_ms = 5000
total_ms = 8000
"#
    )
}

/// A model `name` served by `provider` alone.
fn model(name: &str, provider: &str) -> String {
    format!("\n[[models]]\nname = \"{name}\"\ntargets = [\"{provider}/upstream-{name}\"]\n")
}

/// A gateway whose `settings` (TOML tables) come first, then one provider and model per
/// `(model, upstream)`, each model on a provider of its own.
fn gateway(settings: &str, models: &[(&str, SocketAddr)]) -> Server {
    let mut toml = settings.to_string();
    for (name, upstream) in models {
        let provider_name = format!("p-{name}");
        toml.push_str(&provider(&provider_name, *upstream));
        toml.push_str(&model(name, &provider_name));
    }
    Server::start_with_config(&toml, &[])
}

/// A chat completion body for `model` saying `text`.
fn item(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

fn post_batch(addr: SocketAddr, items: &[Value]) -> Resp {
    post_json(addr, "/api/batch", &json!({"requests": items}).to_string())
}

/// Sends a batch that must be answered 200 and returns its results and how long it took.
fn run_batch(gw: &Server, items: &[Value]) -> (Vec<Value>, Duration) {
    let started = Instant::now();
    let resp = post_batch(gw.addr, items);
    let took = started.elapsed();
    assert_ok(&resp, "POST /api/batch");
    let body = resp.json();
    assert_eq!(body["object"], "batch", "{}", resp.describe());
    let results = body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results array:\n{}", resp.describe()))
        .clone();
    assert_eq!(
        results.len(),
        items.len(),
        "one result per item:\n{}",
        resp.describe()
    );
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i, "results in request order: {results:#?}");
    }
    (results, took)
}

/// The text of a successful item's completion.
fn content(result: &Value) -> &str {
    assert_eq!(result["status"], 200, "a successful item: {result:#}");
    result["body"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no completion text in {result:#}"))
}

/// A failed item's error object, checked to be OpenAI's shape with `status` and `code`.
fn item_error(result: &Value, status: u16, code: &str) -> Value {
    assert_eq!(result["status"], status, "item status: {result:#}");
    assert!(
        result.get("body").is_none(),
        "a failed item has no body: {result:#}"
    );
    let error = result["error"].clone();
    for field in ["message", "type", "code"] {
        assert!(error[field].is_string(), "error.{field}: {result:#}");
    }
    assert!(error.get("param").is_some(), "error.param: {result:#}");
    assert_eq!(error["code"], code, "error code: {result:#}");
    error
}

/// Reads the mock upstream's `in_flight` gauge every few milliseconds until `stop`, keeping
/// the highest value seen.
fn watch_in_flight(upstream: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(r) = try_send(upstream, &get_req("/stats", &[("Connection", "close")])) {
                peak = peak.max(r.json()["in_flight"].as_u64().unwrap_or(0));
            }
            thread::sleep(Duration::from_millis(5));
        }
        peak
    })
}

#[test]
fn batch_results_come_back_in_request_order_each_with_its_own_answer() {
    let slow = Server::start_mock_upstream(&["--latency-ms", "300"]);
    let fast = Server::start_mock_upstream(&[]);
    let gw = gateway("", &[("slow", slow.addr), ("fast", fast.addr)]);
    // The slow items finish last, so order by completion would differ from request order.
    let items = [
        item("slow", "first, slowly"),
        item("fast", "second, quickly"),
        item("slow", "third, slowly"),
        item("mock", "fourth, built in"),
        item("fast", "fifth, quickly"),
    ];
    let (results, _) = run_batch(&gw, &items);
    let prompts = [
        "first, slowly",
        "second, quickly",
        "third, slowly",
        "fourth, built in",
        "fifth, quickly",
    ];
    for (result, prompt) in results.iter().zip(prompts) {
        let text = content(result);
        assert!(
            text.ends_with(&format!("You said: {prompt}")),
            "item for {prompt:?} answered {text:?}"
        );
    }
    assert_eq!(results[3]["body"]["object"], "chat.completion");

    // One request-log row for the batch, with its calls' attempts and tokens summed.
    let mut row = Value::Null;
    let logged = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let list = get(gw.addr, "/api/requests?limit=10").json();
        let rows: Vec<Value> = list["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["route"] == "/api/batch")
            .cloned()
            .collect();
        if let [only] = rows.as_slice() {
            row = only.clone();
        }
        rows.len() == 1
    });
    assert!(logged, "one /api/batch row expected in the request log");
    assert_eq!(row["status"], 200, "{row:#}");
    assert_eq!(row["attempts"], 5, "{row:#}");
    assert!(
        row["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{row:#}"
    );
    assert!(row["model"].is_null(), "items of several models: {row:#}");
}

#[test]
fn batch_items_fail_on_their_own_and_the_good_ones_succeed() {
    let healthy = Server::start_mock_upstream(&[]);
    let failing = Server::start_mock_upstream(&["--fault", "status=500"]);
    let gw = gateway("", &[("good", healthy.addr), ("broken", failing.addr)]);
    let mut streamed = item("good", "a stream");
    streamed["stream"] = json!(true);
    let items = [
        item("good", "one"),
        item("no-such-model", "nobody home"),
        json!({"model": "good"}),
        streamed,
        item("broken", "the provider fails"),
        json!("not an object"),
        item("mock", "two"),
    ];
    let (results, _) = run_batch(&gw, &items);

    assert!(content(&results[0]).ends_with("You said: one"));
    item_error(&results[1], 404, "model_not_found");
    let invalid = item_error(&results[2], 400, "invalid_request");
    assert_eq!(invalid["param"], "messages", "{invalid:#}");
    let stream = item_error(&results[3], 400, "invalid_request");
    assert_eq!(stream["param"], "stream", "{stream:#}");
    let broken = &results[4];
    let status = broken["status"].as_u64().unwrap_or(0);
    assert!(
        (500..600).contains(&status),
        "a failing provider is a 5xx item: {broken:#}"
    );
    assert!(broken["error"]["message"].is_string(), "{broken:#}");
    item_error(&results[5], 400, "invalid_request");
    assert!(content(&results[6]).ends_with("You said: two"));

    // The failing upstream was really called, the unknown model and the refused items never were.
    let calls = get(failing.addr, "/stats").json()["requests"].as_u64();
    assert!(
        calls.is_some_and(|n| n >= 1),
        "failing upstream /stats: {calls:?}"
    );
    let healthy_calls = get(healthy.addr, "/stats").json()["requests"].as_u64();
    assert_eq!(
        healthy_calls,
        Some(1),
        "only the one good item reaches its upstream"
    );
}

#[test]
fn batch_parallelism_is_real_and_bounded_per_batch() {
    let upstream = Server::start_mock_upstream(&["--latency-ms", "300"]);
    let gw = gateway("[batch]\nparallelism = 4\n", &[("m", upstream.addr)]);
    let items: Vec<Value> = (0..8).map(|i| item("m", &format!("call {i}"))).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_in_flight(upstream.addr, Arc::clone(&stop));
    let (results, took) = run_batch(&gw, &items);
    stop.store(true, Ordering::SeqCst);
    let peak = watcher.join().expect("the watcher ends");

    for (i, result) in results.iter().enumerate() {
        assert!(content(result).ends_with(&format!("You said: call {i}")));
    }
    // 8 calls of 300 ms, 4 at a time: two rounds. One at a time would take 2.4 s.
    assert!(
        took >= Duration::from_millis(580),
        "8 calls with parallelism 4 took only {took:?}: more than 4 ran at once"
    );
    assert!(
        took < Duration::from_millis(1800),
        "8 calls with parallelism 4 took {took:?}: they did not run side by side"
    );
    assert!(
        (2..=4).contains(&peak),
        "the upstream saw at most {peak} calls at once; expected 2 to 4"
    );
}

#[test]
fn batch_size_is_limited_and_a_bad_body_names_requests() {
    let gw = Server::start_with_config("[batch]\nmax_items = 3\n", &[]);
    let four: Vec<Value> = (0..4).map(|i| item("mock", &format!("{i}"))).collect();
    for (what, resp) in [
        ("4 items over max_items = 3", post_batch(gw.addr, &four)),
        ("an empty array", post_batch(gw.addr, &[])),
        ("no requests", post_json(gw.addr, "/api/batch", "{}")),
        (
            "a body that is not JSON",
            post_json(gw.addr, "/api/batch", "{\"requests\": ["),
        ),
        (
            "requests not an array",
            post_json(gw.addr, "/api/batch", "{\"requests\": 5}"),
        ),
    ] {
        let error = assert_error(&resp, 400, Some("invalid_request_error"), None);
        assert_eq!(error["param"], "requests", "{what}: {}", resp.describe());
    }
    let (results, _) = run_batch(&gw, &four[..3]);
    assert!(results.iter().all(|r| r["status"] == 200), "{results:#?}");
    let resp = get(gw.addr, "/api/batch");
    assert_error(&resp, 405, None, Some("method_not_allowed"));
}

#[test]
fn a_full_batch_pool_answers_batch_pool_full_instead_of_waiting() {
    let upstream = Server::start_mock_upstream(&["--latency-ms", "1000"]);
    let settings = "[capacity]\nmax_queue_wait_ms = 300\n[batch]\nthreads = 2\nqueue = 1\n";
    let gw = gateway(settings, &[("slow", upstream.addr)]);
    let batches: Vec<_> = (0..2)
        .map(|b| {
            let addr = gw.addr;
            thread::spawn(move || {
                let items: Vec<Value> = (0..4).map(|i| item("slow", &format!("{b}.{i}"))).collect();
                let started = Instant::now();
                let resp = post_batch(addr, &items);
                (resp, started.elapsed())
            })
        })
        .collect();
    // While both batches are in: both threads busy, the one queue slot taken.
    wait_for_metric(
        gw.addr,
        "syncgate_batch_pool_busy",
        &[],
        |v| v == 2.0,
        Duration::from_secs(3),
    );

    let (mut ok, mut full) = (0, 0);
    for batch in batches {
        let (resp, took) = batch.join().expect("the batch thread ends");
        assert_ok(&resp, "a batch on a full pool");
        assert!(
            took < Duration::from_secs(5),
            "a batch on a full pool took {took:?}: calls waited without bound"
        );
        for result in resp.json()["results"].as_array().expect("results") {
            match result["status"].as_u64() {
                Some(200) => ok += 1,
                Some(503) => {
                    item_error(result, 503, "batch_pool_full");
                    full += 1;
                }
                _ => panic!("expected 200 or 503 batch_pool_full, got {result:#}"),
            }
        }
    }
    assert_eq!(ok + full, 8);
    // Three calls fit (two running, one queued); each takes 1 s, longer than a batch waits.
    assert!(ok >= 3, "{ok} calls answered, {full} refused");
    assert!(
        full >= 1,
        "{ok} calls answered, {full} refused: the pool never filled"
    );

    // The slots were given back: the pool is idle and serves the next batch.
    wait_for_metric(
        gw.addr,
        "syncgate_batch_pool_busy",
        &[],
        |v| v == 0.0,
        Duration::from_secs(5),
    );
    let metrics = scrape(gw.addr);
    assert_eq!(
        metric_value(&metrics, "syncgate_batch_pool_queue_depth", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&metrics, "syncgate_batch_items_count", &[]),
        Some(2.0)
    );
    let (results, _) = run_batch(&gw, &[item("slow", "after")]);
    assert!(content(&results[0]).ends_with("You said: after"));
}

#[test]
fn chat_latency_is_unaffected_while_the_batch_pool_is_saturated() {
    let upstream = Server::start_mock_upstream(&["--latency-ms", "800"]);
    // Two request workers: if the batch's calls took workers, the plain call would wait.
    let settings = "[capacity]\nworkers = 2\nmax_queue_wait_ms = 10000\n\
                    [batch]\nthreads = 2\nqueue = 8\n";
    let gw = gateway(settings, &[("slow", upstream.addr)]);
    let addr = gw.addr;
    let batch = thread::spawn(move || {
        let items: Vec<Value> = (0..8).map(|i| item("slow", &format!("slow {i}"))).collect();
        let started = Instant::now();
        let resp = post_batch(addr, &items);
        (resp, started.elapsed())
    });
    wait_for_metric(
        gw.addr,
        "syncgate_batch_pool_busy",
        &[],
        |v| v == 2.0,
        Duration::from_secs(3),
    );
    wait_for_metric(
        gw.addr,
        "syncgate_batch_pool_queue_depth",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(3),
    );

    let started = Instant::now();
    let resp = chat(gw.addr, "not waiting for the batch");
    let plain = started.elapsed();
    assert_ok(&resp, "a plain chat call while the batch pool is saturated");

    let (resp, took) = batch.join().expect("the batch thread ends");
    assert_ok(&resp, "the saturating batch");
    let results = resp.json()["results"].as_array().expect("results").clone();
    assert!(results.iter().all(|r| r["status"] == 200), "{results:#?}");
    // 8 calls of 800 ms on 2 threads: four rounds.
    assert!(
        took >= Duration::from_millis(3000),
        "the batch took only {took:?}"
    );
    assert!(
        plain < Duration::from_millis(750) && plain * 4 < took,
        "a plain chat call took {plain:?} while a {took:?} batch ran"
    );
}
