//! API surface: the mock chat completion and model list, request validation errors, routing (404/405), handler panics, /metrics exposition, request ids and the access log.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn chat_json(srv: &Server, body: &Value) -> Resp {
    post_json(srv.addr, "/v1/chat/completions", &body.to_string())
}

fn content_of(resp: &Resp) -> String {
    let v = resp.json();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "expected choices[0].message.content to be a string; got:\n{}",
                resp.describe()
            )
        })
        .to_string()
}

// --- the mock model ---------------------------------------------------------

#[test]
fn chat_completion_has_the_openai_shape() {
    let srv = Server::start(&[]);
    let r = chat(srv.addr, "hello");
    assert_ok(&r, "a mock chat completion");
    let v = r.json();
    let ctx = r.describe();
    assert!(
        v["id"].as_str().is_some_and(|s| !s.is_empty()),
        "expected a non-empty string id; got:\n{ctx}"
    );
    assert_eq!(v["object"], "chat.completion", "object; got:\n{ctx}");
    assert!(
        v["created"].is_number(),
        "expected numeric created; got:\n{ctx}"
    );
    assert_eq!(v["model"], "mock", "model; got:\n{ctx}");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant", "role; got:\n{ctx}");
    assert!(
        choice["message"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("hello")),
        "expected content containing \"hello\"; got:\n{ctx}"
    );
    assert_eq!(
        choice["finish_reason"], "stop",
        "finish_reason; got:\n{ctx}"
    );
    let usage = &v["usage"];
    let p = usage["prompt_tokens"].as_u64();
    let c = usage["completion_tokens"].as_u64();
    let t = usage["total_tokens"].as_u64();
    match (p, c, t) {
        (Some(p), Some(c), Some(t)) => assert_eq!(
            p + c,
            t,
            "expected total_tokens = prompt_tokens + completion_tokens; got:\n{ctx}"
        ),
        _ => panic!(
            "expected integer usage.prompt_tokens/completion_tokens/total_tokens; got:\n{ctx}"
        ),
    }
}

#[test]
fn chat_completion_is_deterministic_and_depends_on_the_text() {
    let srv = Server::start(&[]);
    let a1 = content_of(&chat(srv.addr, "the quick brown fox"));
    let a2 = content_of(&chat(srv.addr, "the quick brown fox"));
    let b = content_of(&chat(srv.addr, "a lazy dog"));
    assert_eq!(a1, a2, "expected the same request to give the same content");
    assert_ne!(a1, b, "expected different text to give different content");
    assert!(
        b.contains("a lazy dog"),
        "expected {b:?} to contain the user text"
    );
}

#[test]
fn chat_completion_echoes_the_last_user_message() {
    let srv = Server::start(&[]);
    let body = json!({
        "model": "mock",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"}
        ]
    });
    let r = chat_json(&srv, &body);
    assert_ok(&r, "a multi-message chat request");
    let content = content_of(&r);
    assert!(
        content.contains("second question"),
        "expected the reply to contain the last user message \"second question\"; got {content:?}"
    );
}

#[test]
fn models_list_contains_mock() {
    let srv = Server::start(&[]);
    let r = get(srv.addr, "/v1/models");
    assert_ok(&r, "GET /v1/models");
    let v = r.json();
    assert_eq!(v["object"], "list", "got:\n{}", r.describe());
    let data = v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("expected data to be an array; got:\n{}", r.describe()));
    assert!(
        data.iter()
            .any(|m| m["id"] == "mock" && m["object"] == "model"),
        "expected an entry {{\"id\":\"mock\",\"object\":\"model\"}}; got:\n{}",
        r.describe()
    );
}

// --- validation ---------------------------------------------------------------

#[test]
fn malformed_json_answers_400_invalid_json_with_line_and_column() {
    let srv = Server::start(&[]);
    let r = post_json(
        srv.addr,
        "/v1/chat/completions",
        "{\"model\": \"mock\",\n \"messages\": [",
    );
    let err = assert_error(&r, 400, Some("invalid_request_error"), Some("invalid_json"));
    let msg = err["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("line") && msg.contains("column"),
        "expected the message to give a line and column; got {msg:?}"
    );
}

#[test]
fn non_object_body_answers_400_invalid_request() {
    let srv = Server::start(&[]);
    for body in ["[1, 2]", "\"mock\"", "42", "null"] {
        let r = post_json(srv.addr, "/v1/chat/completions", body);
        eprintln!("body {body}:");
        assert_error(&r, 400, Some("invalid_request_error"), None);
    }
}

fn assert_names_field(srv: &Server, body: Value, field: &str) {
    let r = chat_json(srv, &body);
    let err = assert_error(&r, 400, Some("invalid_request_error"), None);
    let msg = err["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(field),
        "expected the message to name `{field}` for body {body}; got {msg:?}"
    );
}

#[test]
fn missing_model_answers_400_naming_model() {
    let srv = Server::start(&[]);
    assert_names_field(
        &srv,
        json!({"messages": [{"role": "user", "content": "hi"}]}),
        "model",
    );
}

#[test]
fn missing_messages_answers_400_naming_messages() {
    let srv = Server::start(&[]);
    assert_names_field(&srv, json!({"model": "mock"}), "messages");
}

#[test]
fn empty_messages_answers_400_naming_messages() {
    let srv = Server::start(&[]);
    assert_names_field(&srv, json!({"model": "mock", "messages": []}), "messages");
}

#[test]
fn unknown_model_answers_404_model_not_found() {
    let srv = Server::start(&[]);
    let r = chat_json(
        &srv,
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_error(&r, 404, None, Some("model_not_found"));
}

// --- routing --------------------------------------------------------------------

#[test]
fn unknown_route_answers_404_unknown_route() {
    let srv = Server::start(&[]);
    let r = get(srv.addr, "/nope");
    assert_error(&r, 404, None, Some("unknown_route"));
    let r = post_json(srv.addr, "/v1/nothing/here", "{}");
    assert_error(&r, 404, None, Some("unknown_route"));
}

#[test]
fn wrong_method_answers_405_with_allow() {
    let srv = Server::start(&[]);
    let cases = [
        (
            get_req("/v1/chat/completions", &[("Connection", "close")]),
            "POST",
        ),
        (
            post_req("/v1/models", "{}", &[("Connection", "close")]),
            "GET",
        ),
        (
            post_req("/healthz", "{}", &[("Connection", "close")]),
            "GET",
        ),
    ];
    for (raw, allowed) in cases {
        let r = send(srv.addr, &raw);
        let line = String::from_utf8_lossy(&raw)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        eprintln!("request {line}:");
        assert_error(&r, 405, None, Some("method_not_allowed"));
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{line}: expected an Allow header; got:\n{}", r.describe()));
        assert!(
            allow
                .split(',')
                .any(|m| m.trim().eq_ignore_ascii_case(allowed)),
            "{line}: expected Allow to contain {allowed}; got {allow:?}"
        );
    }
}

// --- panics -----------------------------------------------------------------------

#[test]
fn handler_panic_answers_500_and_the_server_keeps_serving() {
    // One worker: if a panic killed it, the follow-up chat request would never be served.
    let srv = Server::start(&["--enable-debug-routes", "--workers", "1"]);
    for i in 0..3 {
        let r = post_json(srv.addr, "/debug/panic", "{}");
        eprintln!("panic request {i}:");
        assert_error(&r, 500, Some("server_error"), Some("internal_error"));
    }
    let r = chat(srv.addr, "still alive");
    assert_ok(
        &r,
        "a chat request after three handler panics on the only worker",
    );
    wait_for_metric(
        srv.addr,
        "syncgate_handler_panics_total",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
}

#[test]
fn debug_routes_are_absent_without_the_flag() {
    let srv = Server::start(&[]);
    let r = post_json(srv.addr, "/debug/panic", "{}");
    assert_error(&r, 404, None, Some("unknown_route"));
}

// --- metrics ------------------------------------------------------------------------

const METRIC_NAMES: [&str; 12] = [
    "syncgate_streams_open",
    "syncgate_http_requests_total",
    "syncgate_http_request_duration_seconds",
    "syncgate_queue_wait_seconds",
    "syncgate_queue_depth",
    "syncgate_queue_capacity",
    "syncgate_workers_busy",
    "syncgate_workers",
    "syncgate_connections_open",
    "syncgate_rejected_total",
    "syncgate_handler_panics_total",
    "syncgate_accept_errors_total",
];

#[test]
fn metrics_exposes_every_documented_metric() {
    let srv = Server::start(&["--max-body-bytes", "1024"]);
    // Give labelled families something to show: a queued request, a fast-lane request, a 404
    // and a front-end rejection (body_too_large).
    assert_ok(&chat(srv.addr, "metrics warm-up"), "warm-up chat");
    assert_ok(&get(srv.addr, "/healthz"), "warm-up /healthz");
    assert_eq!(get(srv.addr, "/nope").status, 404);
    let too_big =
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4096\r\n\r\n";
    let mut c = Conn::open(srv.addr);
    c.write_all(too_big.as_bytes()).expect("write request head");
    let r = c
        .read_response()
        .unwrap_or_else(|e| panic!("expected a 413, got I/O error {e}"));
    assert_eq!(r.status, 413, "expected 413; got:\n{}", r.describe());
    drop(c);

    let r = get(srv.addr, "/metrics");
    assert_ok(&r, "GET /metrics");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain"),
        "expected a Prometheus text content type; got {ct:?}"
    );
    // The counters may be bumped just after the response is written: poll briefly.
    wait_for_metric(
        srv.addr,
        "syncgate_rejected_total",
        &[("reason", "body_too_large")],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
    let text = scrape(srv.addr);
    let missing: Vec<&str> = METRIC_NAMES
        .iter()
        .copied()
        .filter(|n| !has_metric_family(&text, n))
        .collect();
    assert!(
        missing.is_empty(),
        "expected every documented metric in /metrics; missing {missing:?}; got:\n{text}"
    );
    for (name, label) in [
        ("syncgate_http_requests_total", "route"),
        ("syncgate_http_requests_total", "status"),
        ("syncgate_http_request_duration_seconds_bucket", "route"),
    ] {
        assert!(
            parse_metrics(&text)
                .iter()
                .any(|s| s.name == name && s.labels.iter().any(|(k, _)| k == label)),
            "expected {name} samples with a `{label}` label; got:\n{text}"
        );
    }
}

#[test]
fn metrics_report_configured_workers_and_queue_capacity() {
    let srv = Server::start(&["--workers", "3", "--queue", "7"]);
    let text = scrape(srv.addr);
    assert_eq!(
        metric_value(&text, "syncgate_workers", &[]),
        Some(3.0),
        "expected syncgate_workers 3; got:\n{text}"
    );
    assert_eq!(
        metric_value(&text, "syncgate_queue_capacity", &[]),
        Some(7.0),
        "expected syncgate_queue_capacity 7; got:\n{text}"
    );
}

#[test]
fn metrics_label_routes_by_template_never_by_raw_path() {
    let srv = Server::start(&[]);
    assert_eq!(get(srv.addr, "/nope/12345").status, 404);
    assert_ok(
        &get(srv.addr, "/healthz?probe=77731"),
        "/healthz with a query",
    );
    wait_for_metric(
        srv.addr,
        "syncgate_http_requests_total",
        &[("status", "404")],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
    let text = scrape(srv.addr);
    assert!(
        !text.contains("/nope/12345"),
        "an unknown raw path leaked into /metrics labels:\n{text}"
    );
    assert!(
        !text.contains("probe="),
        "a query string leaked into /metrics labels:\n{text}"
    );
}

#[test]
fn chat_request_is_counted_under_its_route_template() {
    let srv = Server::start(&[]);
    assert_ok(&chat(srv.addr, "count me"), "a chat request");
    let labels = [("route", "/v1/chat/completions"), ("status", "200")];
    wait_for_metric(
        srv.addr,
        "syncgate_http_requests_total",
        &labels,
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
    wait_for_metric(
        srv.addr,
        "syncgate_http_request_duration_seconds_count",
        &[("route", "/v1/chat/completions")],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
}

// --- request ids and the access log ----------------------------------------------------

#[test]
fn valid_request_id_is_echoed() {
    let srv = Server::start(&[]);
    let long = "r".repeat(128);
    let ids = [
        unique("req"),
        "abc-123_XYZ.~!#$%&'*+^`|:;<>=?@[]{}()/\\\"".to_string(),
        long,
    ];
    for id in &ids {
        for raw in [
            chat_req(
                "echo my id",
                &[("X-Request-Id", id), ("Connection", "close")],
            ),
            get_req("/healthz", &[("X-Request-Id", id), ("Connection", "close")]),
            get_req("/nope", &[("X-Request-Id", id), ("Connection", "close")]),
        ] {
            let r = send(srv.addr, &raw);
            assert_eq!(
                r.header("x-request-id"),
                Some(id.as_str()),
                "expected the request id echoed; request {}\ngot:\n{}",
                preview(&raw),
                r.describe()
            );
        }
    }
}

#[test]
fn invalid_request_id_is_replaced_with_a_generated_one() {
    let srv = Server::start(&[]);
    let too_long = "x".repeat(129);
    for bad in ["", too_long.as_str(), "has a space"] {
        let r = send(
            srv.addr,
            &chat_req("bad id", &[("X-Request-Id", bad), ("Connection", "close")]),
        );
        assert_ok(&r, &format!("chat with invalid X-Request-Id {bad:?}"));
        let got = r.header("x-request-id").unwrap_or_else(|| {
            panic!(
                "expected a generated x-request-id for invalid {bad:?}; got:\n{}",
                r.describe()
            )
        });
        assert!(
            !got.trim().is_empty() && got != bad,
            "expected a fresh non-empty id replacing {bad:?}; got {got:?}"
        );
    }
}

#[test]
fn missing_request_id_is_generated_fresh_each_time() {
    let srv = Server::start(&[]);
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let r = chat(srv.addr, "no id");
            assert_ok(&r, "chat without X-Request-Id");
            r.header("x-request-id")
                .unwrap_or_else(|| {
                    panic!("expected a generated x-request-id; got:\n{}", r.describe())
                })
                .to_string()
        })
        .collect();
    assert!(
        !ids[0].is_empty() && ids[0] != ids[1],
        "expected two different non-empty generated ids; got {ids:?}"
    );
}

/// True when `line` contains `n` not embedded in a longer number.
fn contains_number(line: &str, n: u16) -> bool {
    let needle = n.to_string();
    line.match_indices(&needle).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + needle.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

fn assert_access_logged(srv: &Server, id: &str, method: &str, path: &str, status: u16) {
    let mut line = None;
    let found = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        line = srv
            .log()
            .lines()
            .find(|l| l.contains(id))
            .map(str::to_string);
        line.is_some()
    });
    assert!(
        found,
        "expected a stderr access-log line with request id {id}"
    );
    let line = line.expect("checked above");
    assert!(
        line.contains(method) && line.contains(path) && contains_number(&line, status),
        "expected the access-log line for {id} to contain {method}, {path} and {status}; got:\n{line}"
    );
}

#[test]
fn access_log_line_has_request_id_method_path_and_status() {
    let srv = Server::start(&[]);
    let id = unique("log-chat");
    let r = send(
        srv.addr,
        &chat_req("log me", &[("X-Request-Id", &id), ("Connection", "close")]),
    );
    assert_ok(&r, "chat for the access log");
    assert_access_logged(&srv, &id, "POST", "/v1/chat/completions", 200);

    let id = unique("log-missing");
    let r = send(
        srv.addr,
        &get_req(
            "/nope/abc",
            &[("X-Request-Id", &id), ("Connection", "close")],
        ),
    );
    assert_eq!(r.status, 404, "got:\n{}", r.describe());
    assert_access_logged(&srv, &id, "GET", "/nope/abc", 404);
}
