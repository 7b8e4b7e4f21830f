//! Spend (issue 19): what every call costs, from the usage its provider reported and the
//! config's `[[prices]]`, kept in the request log in micro-dollars and shown by
//! `/api/requests`, `/api/usage`, `syncgate usage` and `/metrics`. Every figure is checked
//! against one worked out here from the mock upstream's reported usage. An unpriced model is
//! reported as unpriced, never as free; a stream the client abandons is billed, estimated.
//! The flow runs on SQLite and on PostgreSQL.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Prices of the targets, dollars per million tokens (as the config writes them) and the
/// micro-dollars per million tokens they mean.
const IN_USD: f64 = 2.5;
const OUT_USD: f64 = 10.0;
const IN_MICROS: u64 = 2_500_000;
const OUT_MICROS: u64 = 10_000_000;

fn gateway(fast: SocketAddr, paced: SocketAddr, args: &[&str]) -> Server {
    let toml = format!(
        r#"
[[providers]]
name = "up"
type = "openai"
base_url = "http://{fast}/v1"

[[providers]]
name = "paced"
type = "openai"
base_url = "http://{paced}/v1"

[[models]]
name = "m"
targets = ["up/upstream-model"]

[[models]]
name = "slow"
targets = ["paced/upstream-model"]

[[models]]
name = "free"
targets = ["mock/mock"]

[[prices]]
target = "up/upstream-model"
input_per_mtok_usd = {IN_USD}
output_per_mtok_usd = {OUT_USD}

[[prices]]
target = "paced/upstream-model"
input_per_mtok_usd = {IN_USD}
output_per_mtok_usd = {OUT_USD}
"#
    );
    Server::start_with_config(&toml, args)
}

/// The micro-dollars `prompt` and `completion` tokens cost, rounded as syncgate rounds.
fn micros(prompt: u64, completion: u64) -> i64 {
    ((prompt * IN_MICROS + completion * OUT_MICROS + 500_000) / 1_000_000) as i64
}

fn as_micros(usd: &Value) -> i64 {
    (usd.as_f64().unwrap_or_else(|| panic!("cost_usd {usd}")) * 1e6).round() as i64
}

fn post(addr: SocketAddr, path: &str, body: &Value, id: &str) -> Resp {
    send(
        addr,
        &post_req(
            path,
            &body.to_string(),
            &[("X-Request-Id", id), ("Connection", "close")],
        ),
    )
}

/// The logged rows by request id, once all of `ids` are logged.
fn rows(addr: SocketAddr, ids: &[&str]) -> HashMap<String, Value> {
    let mut last = Value::Null;
    let found = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        last = get(addr, "/api/requests?limit=100").json();
        let data = last["data"].as_array().cloned().unwrap_or_default();
        ids.iter()
            .all(|id| data.iter().any(|r| r["request_id"] == **id))
    });
    assert!(found, "rows for {ids:?} not logged: {last:#}");
    last["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["request_id"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

fn spend_flow(db: &str) {
    let fast = Server::start_mock_upstream(&[]);
    let paced =
        Server::start_mock_upstream(&["--stream-chunks", "40", "--stream-interval-ms", "100"]);
    let gw = gateway(fast.addr, paced.addr, &["--db", db]);
    let chat = |model: &str, text: &str| json!({"model": model, "messages": [{"role": "user", "content": text}]});

    // A plain answer: its cost from the usage the provider reported.
    let plain = unique("plain");
    let r = post(
        gw.addr,
        "/v1/chat/completions",
        &chat("m", "what does a lamp cost?"),
        &plain,
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    let usage = r.json()["usage"].clone();
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    let plain_cost = micros(p, c);
    assert!(plain_cost > 0, "{usage}");

    // A stream whose client did not ask for usage: syncgate asks the provider for it, prices
    // the call with it, and does not pass it on.
    let quiet = unique("quiet");
    let mut body = chat("m", "stream it quietly please");
    body["stream"] = json!(true);
    let r = post(gw.addr, "/v1/chat/completions", &body, &quiet);
    assert_eq!(r.status, 200, "{}", r.describe());
    let text = r.text();
    assert!(text.contains("[DONE]"), "{text}");
    assert!(
        !text.contains("\"usage\""),
        "a usage chunk reached a client that did not ask:\n{text}"
    );
    // With include_usage the client gets it, and the log agrees with it.
    let told = unique("told");
    body["stream_options"] = json!({"include_usage": true});
    let r = post(gw.addr, "/v1/chat/completions", &body, &told);
    let told_usage: Value = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| !v["usage"].is_null())
        .map(|v| v["usage"].clone())
        .unwrap_or_else(|| panic!("no usage chunk:\n{}", r.text()));

    // Embeddings are priced the same way (input tokens only).
    let embedded = unique("embed");
    let r = post(
        gw.addr,
        "/v1/embeddings",
        &json!({"model": "m", "input": ["a lamp", "a wick"]}),
        &embedded,
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    let embed_prompt = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();

    // The built-in mock: unpriced, not free.
    let free = unique("free");
    let r = post(
        gw.addr,
        "/v1/chat/completions",
        &chat("free", "no price here"),
        &free,
    );
    assert_eq!(r.status, 200, "{}", r.describe());

    // A stream the client abandons after a few events: billed for what the provider produced,
    // estimated (the provider never got to report usage).
    let cut = unique("cut");
    let mut slow = chat("slow", "tell me a long story about lighthouses");
    slow["stream"] = json!(true);
    let s = read_sse(
        gw.addr,
        &post_req(
            "/v1/chat/completions",
            &slow.to_string(),
            &[("X-Request-Id", &cut)],
        ),
        Duration::from_secs(10),
        Some(5),
    );
    assert_eq!(s.status, 200, "{}", s.head);
    drop(s);

    let logged = rows(gw.addr, &[&plain, &quiet, &told, &embedded, &free, &cut]);
    let row = |id: &str| &logged[id];
    assert_eq!(
        as_micros(&row(&plain)["cost_usd"]),
        plain_cost,
        "{:#}",
        row(&plain)
    );
    assert_eq!(row(&plain)["cost_estimated"], false);
    let quiet_row = row(&quiet);
    let quiet_cost = micros(
        quiet_row["prompt_tokens"].as_u64().unwrap(),
        quiet_row["completion_tokens"].as_u64().unwrap(),
    );
    assert!(
        quiet_row["completion_tokens"].as_u64() > Some(0),
        "{quiet_row:#}"
    );
    assert_eq!(
        as_micros(&quiet_row["cost_usd"]),
        quiet_cost,
        "{quiet_row:#}"
    );
    assert_eq!(
        quiet_row["cost_estimated"], false,
        "the provider reported: {quiet_row:#}"
    );
    let told_cost = micros(
        told_usage["prompt_tokens"].as_u64().unwrap(),
        told_usage["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(
        as_micros(&row(&told)["cost_usd"]),
        told_cost,
        "{:#}",
        row(&told)
    );
    let embed_cost = micros(embed_prompt, 0);
    assert_eq!(
        as_micros(&row(&embedded)["cost_usd"]),
        embed_cost,
        "{:#}",
        row(&embedded)
    );
    assert_eq!(row(&free)["cost_usd"], Value::Null, "{:#}", row(&free));
    assert!(row(&free)["prompt_tokens"].as_u64() > Some(0));
    let cut_row = row(&cut);
    assert_eq!(cut_row["cost_estimated"], true, "{cut_row:#}");
    assert_eq!(cut_row["client_left"], true, "{cut_row:#}");
    let cut_completion = cut_row["completion_tokens"].as_u64().unwrap();
    assert!(
        (1..40).contains(&cut_completion),
        "billed {cut_completion} of 40 chunks: {cut_row:#}"
    );
    let cut_cost = micros(cut_row["prompt_tokens"].as_u64().unwrap(), cut_completion);
    assert_eq!(as_micros(&cut_row["cost_usd"]), cut_cost, "{cut_row:#}");

    // Usage by model adds the costs up, and counts the unpriced call as such.
    let usage = get(gw.addr, "/api/usage?group_by=model").json();
    let by_model: HashMap<&str, &Value> = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["model"].as_str().unwrap(), g))
        .collect();
    let m_cost = plain_cost + quiet_cost + told_cost + embed_cost;
    assert_eq!(as_micros(&by_model["m"]["cost_usd"]), m_cost, "{usage:#}");
    assert_eq!(by_model["m"]["unpriced_calls"], 0, "{usage:#}");
    assert_eq!(by_model["free"]["cost_usd"], Value::Null, "{usage:#}");
    assert_eq!(by_model["free"]["unpriced_calls"], 1, "{usage:#}");
    assert_eq!(
        as_micros(&by_model["slow"]["cost_usd"]),
        cut_cost,
        "{usage:#}"
    );

    // /metrics: spend by the model asked for, in dollars.
    let metrics = scrape(gw.addr);
    let spent =
        metric_value(&metrics, "syncgate_spend_usd_total", &[("model", "m")]).unwrap_or(0.0);
    assert_eq!((spent * 1e6).round() as i64, m_cost, "{metrics}");
    assert_eq!(
        metric_value(&metrics, "syncgate_spend_usd_total", &[("model", "free")]),
        None
    );

    // `syncgate usage`: the same costs in its table, to the micro-dollar.
    let out = run_to_exit(
        &["usage", "--db", db, "--group-by", "model"],
        &[],
        Duration::from_secs(30),
    );
    assert!(!out.failed(), "{}", out.describe());
    println!("syncgate usage --group-by model:\n{}", out.stdout);
    let line = |model: &str| -> Vec<String> {
        out.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(model))
            .unwrap_or_else(|| panic!("no {model} line:\n{}", out.stdout))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        line("m")[6],
        format!("{}.{:06}", m_cost / 1_000_000, m_cost % 1_000_000)
    );
    assert_eq!(
        (line("free")[6].as_str(), line("free")[7].as_str()),
        ("-", "1")
    );
}

#[test]
fn every_call_is_priced_from_its_reported_usage_on_sqlite() {
    let db = TempDb::new();
    spend_flow(&db.path_str());
}

#[test]
fn every_call_is_priced_from_its_reported_usage_on_postgres() {
    let Some(pg) = fresh_postgres() else { return };
    spend_flow(&pg.url());
}

#[test]
fn a_bad_price_stops_start_up_naming_it() {
    for (table, named) in [
        (
            "[[prices]]\ntarget = \"gpt-4o\"\ninput_per_mtok_usd = 1\noutput_per_mtok_usd = 1\n",
            "provider/upstream-model",
        ),
        (
            "[[prices]]\ntarget = \"mock/mock\"\ninput_per_mtok_usd = 1\noutput_per_mtok_usd = 1\n",
            "never priced",
        ),
        (
            "[[prices]]\ntarget = \"a/b\"\ninput_per_mtok_usd = -1\noutput_per_mtok_usd = 1\n",
            "input_per_mtok_usd",
        ),
        (
            "[[prices]]\ntarget = \"a/b\"\ninput_per_mtok_usd = 1\noutput_per_mtok_usd = 1\n\
             [[prices]]\ntarget = \"a/b\"\ninput_per_mtok_usd = 2\noutput_per_mtok_usd = 2\n",
            "priced twice",
        ),
    ] {
        let config = TempConfig::new(table);
        let exit = run_serve_to_exit(&["--config", &config.path_str()], &[]);
        assert!(exit.failed(), "{table}");
        assert!(
            exit.stderr.contains(named),
            "{named} not in: {}",
            exit.describe()
        );
    }
}
