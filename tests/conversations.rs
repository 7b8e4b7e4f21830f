//! Conversations kept server-side (`/api/conversations`), against the real binary and
//! `syncgate mock-upstream`: the CRUD surface and its errors, what a turn sends upstream, the
//! idempotent repeat, streamed and cut turns, and durability: every turn answered 200 is still
//! there after the server is killed with SIGKILL, and concurrent writers never see the store
//! busy.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A gateway whose model `m` goes to `upstream` (as `up/upstream-model`), with `extra` TOML.
fn gateway(upstream: SocketAddr, extra: &str, args: &[&str]) -> Server {
    Server::start_with_config(&gateway_toml(upstream, extra), args)
}

fn gateway_toml(upstream: SocketAddr, extra: &str) -> String {
    format!(
        r#"
{extra}

[[providers]]
name = "up"
type = "openai"
base_url = "http://{upstream}/v1"
[providers.timeouts]
connect_ms = 2000
first_byte_ms = 5000
idle_ms = 2000
total_ms = 10000

[[models]]
name = "m"
targets = ["up/upstream-model"]
"#
    )
}

/// A request with any method; `body` is sent as JSON when given.
fn request(method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if let Some(body) = body {
        s.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s.push_str(body.unwrap_or_default());
    s.into_bytes()
}

fn create(addr: SocketAddr, body: &str, headers: &[(&str, &str)]) -> Resp {
    send(
        addr,
        &request("POST", "/api/conversations", Some(body), headers),
    )
}

/// Creates a conversation and returns its id, asserting the 201.
fn new_conversation(addr: SocketAddr, body: Value) -> String {
    let r = create(addr, &body.to_string(), &[]);
    assert_eq!(r.status, 201, "create: {}", r.describe());
    r.json()["id"].as_str().expect("an id").to_string()
}

fn turn(addr: SocketAddr, conversation: &str, body: Value, headers: &[(&str, &str)]) -> Resp {
    let path = format!("/api/conversations/{conversation}/messages");
    send(
        addr,
        &request("POST", &path, Some(&body.to_string()), headers),
    )
}

fn get_path(addr: SocketAddr, path: &str) -> Resp {
    send(addr, &request("GET", path, None, &[]))
}

fn delete(addr: SocketAddr, path: &str) -> Resp {
    send(addr, &request("DELETE", path, None, &[]))
}

/// Every stored message of a conversation, following the `after` cursor page by page.
fn all_messages(addr: SocketAddr, conversation: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let mut path = format!("/api/conversations/{conversation}/messages?limit=1000");
        if let Some(last) = out.last() {
            path.push_str(&format!("&after={}", last["id"].as_str().unwrap()));
        }
        let r = get_path(addr, &path);
        assert_ok(&r, &path);
        let page = r.json();
        out.extend(page["data"].as_array().expect("data").iter().cloned());
        if page["has_more"] != json!(true) {
            return out;
        }
    }
}

/// The bodies the upstream received for chat, oldest first (its last 100 requests).
fn upstream_bodies(up: &Server) -> Vec<Value> {
    get(up.addr, "/requests")
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .map(|r| r["body"].clone())
        .collect()
}

fn upstream_calls(up: &Server) -> u64 {
    get(up.addr, "/stats").json()["requests"]
        .as_u64()
        .expect("a count")
}

/// The `[role, content]` pairs of a chat body's messages.
fn sent_messages(body: &Value) -> Vec<(String, String)> {
    body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn mock_reply(text: &str) -> String {
    format!("This is the mock model. You said: {text}")
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The content deltas of a stream's events, concatenated.
fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// A read-only look at the database the server writes.
fn db_count(db: &TempDb, sql: &str, params: &[&str]) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(&db.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the database");
    conn.query_row(sql, rusqlite::params_from_iter(params), |r| r.get(0))
        .expect("query")
}

// --- create, list, get, delete ---------------------------------------------------------

#[test]
fn conversations_are_created_listed_by_page_fetched_and_deleted_with_their_messages() {
    let db = TempDb::new();
    let gw = Server::start(&["--db", &db.path_str()]);
    let r = create(gw.addr, "", &[]);
    assert_eq!(r.status, 201, "an empty body is fine: {}", r.describe());
    let empty = r.json();
    assert_eq!(empty["object"], "conversation");
    assert!(empty["title"].is_null() && empty["model"].is_null() && empty["system"].is_null());
    assert!(empty["id"].as_str().unwrap().starts_with("conv_"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((empty["created_at"].as_i64().unwrap() - now).abs() < 60);

    let mut ids = vec![empty["id"].as_str().unwrap().to_string()];
    for i in 0..4 {
        ids.push(new_conversation(
            gw.addr,
            json!({"title": format!("t{i}"), "model": "mock", "system": "be brief"}),
        ));
    }
    let page = get_path(gw.addr, "/api/conversations?limit=2").json();
    let listed: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[4].as_str(), ids[3].as_str()], "newest first");
    assert_eq!(page["object"], "list");
    assert_eq!(page["has_more"], true);
    let rest = get_path(
        gw.addr,
        &format!("/api/conversations?limit=2&before={}", ids[1]),
    )
    .json();
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["data"][0]["id"], ids[0].as_str());
    assert_eq!(rest["has_more"], false);
    let all = get_path(gw.addr, "/api/conversations").json();
    assert_eq!(all["data"].as_array().unwrap().len(), 5);

    let one = get_path(gw.addr, &format!("/api/conversations/{}", ids[2])).json();
    assert_eq!(
        (&one["title"], &one["model"], &one["system"]),
        (&json!("t1"), &json!("mock"), &json!("be brief"))
    );

    let r = turn(gw.addr, &ids[2], json!({"content": "hello"}), &[]);
    assert_ok(&r, "a turn with the mock model");
    let count_sql = "SELECT count(*) FROM messages WHERE conversation_id = ?1";
    assert_eq!(db_count(&db, count_sql, &[&ids[2]]), 2);

    let path = format!("/api/conversations/{}", ids[2]);
    let r = delete(gw.addr, &path);
    assert_ok(&r, "delete");
    assert_eq!(
        r.json(),
        json!({"id": ids[2], "object": "conversation.deleted", "deleted": true})
    );
    assert_error(&get_path(gw.addr, &path), 404, None, Some("not_found"));
    assert_error(&delete(gw.addr, &path), 404, None, Some("not_found"));
    let messages = format!("{path}/messages");
    assert_error(&get_path(gw.addr, &messages), 404, None, Some("not_found"));
    assert_eq!(db_count(&db, count_sql, &[&ids[2]]), 0, "messages go too");
    let left = get_path(gw.addr, "/api/conversations").json();
    assert_eq!(left["data"].as_array().unwrap().len(), 4);
}

#[test]
fn bad_requests_answer_4xx_naming_what_is_wrong() {
    let gw = Server::start(&[]);
    let addr = gw.addr;
    for (body, param) in [
        (r#"{"title": 5}"#, "title"),
        (r#"{"model": ""}"#, "model"),
        (r#"{"system": ["x"]}"#, "system"),
        ("[1, 2]", ""),
    ] {
        let err = assert_error(&create(addr, body, &[]), 400, None, Some("invalid_request"));
        assert_eq!(err["param"], param, "{body}");
    }
    assert_error(&create(addr, "{nope", &[]), 400, None, Some("invalid_json"));
    assert_error(
        &create(addr, r#"{"model": "no-such-model"}"#, &[]),
        404,
        None,
        Some("model_not_found"),
    );

    let bare = new_conversation(addr, json!({}));
    for (body, param) in [
        (json!({}), "content"),
        (json!({"content": ""}), "content"),
        (json!({"content": 3}), "content"),
        (json!({"content": "x", "stream": "yes"}), "stream"),
        (json!({"content": "x", "model": 7}), "model"),
        // Neither the turn nor the conversation names a model.
        (json!({"content": "x"}), "model"),
    ] {
        let r = turn(addr, &bare, body.clone(), &[]);
        let err = assert_error(&r, 400, None, Some("invalid_request"));
        assert_eq!(err["param"], param, "{body}");
    }
    let r = turn(addr, &bare, json!({"content": "x", "model": "nope"}), &[]);
    assert_error(&r, 404, None, Some("model_not_found"));
    let r = turn(
        addr,
        "conv_missing",
        json!({"content": "x", "model": "mock"}),
        &[],
    );
    assert_error(&r, 404, None, Some("not_found"));
    assert_error(
        &get_path(addr, "/api/conversations/conv_missing"),
        404,
        None,
        Some("not_found"),
    );

    for (path, param) in [
        ("/api/conversations?limit=0", "limit"),
        ("/api/conversations?limit=101", "limit"),
        ("/api/conversations?before=conv_missing", "before"),
        (
            &format!("/api/conversations/{bare}/messages?limit=1001") as &str,
            "limit",
        ),
        (
            &format!("/api/conversations/{bare}/messages?after=msg_missing"),
            "after",
        ),
        ("/api/conversations?limt=5", "limt"),
        (
            &format!("/api/conversations/{bare}/messages?before=msg_x"),
            "before",
        ),
    ] {
        let err = assert_error(&get_path(addr, path), 400, None, Some("invalid_request"));
        assert_eq!(err["param"], param, "{path}");
    }
    let long_key = "k".repeat(256);
    let r = create(addr, "{}", &[("Idempotency-Key", &long_key)]);
    assert_error(&r, 400, None, Some("invalid_request"));

    for (method, path, allowed) in [
        ("PUT", "/api/conversations".to_string(), "GET, POST"),
        ("POST", format!("/api/conversations/{bare}"), "GET, DELETE"),
        (
            "DELETE",
            format!("/api/conversations/{bare}/messages"),
            "GET, POST",
        ),
    ] {
        let r = send(addr, &request(method, &path, Some("{}"), &[]));
        assert_error(&r, 405, None, Some("method_not_allowed"));
        assert_eq!(r.header("allow"), Some(allowed), "{method} {path}");
    }
    let r = get_path(addr, &format!("/api/conversations/{bare}/other"));
    assert_error(&r, 404, None, Some("unknown_route"));
}

// --- turns ---------------------------------------------------------------------------

#[test]
fn a_turn_sends_the_system_prompt_and_the_newest_history_and_is_logged() {
    let up = Server::start_mock_upstream(&[]);
    let db = TempDb::new();
    let extra = "[conversations]\nmax_history_messages = 3";
    let gw = gateway(up.addr, extra, &["--db", &db.path_str()]);
    let conv = new_conversation(gw.addr, json!({"model": "m", "system": "You are terse."}));

    let mut replies = Vec::new();
    for text in ["one", "two", "three"] {
        let r = turn(gw.addr, &conv, json!({"content": text}), &[]);
        assert_ok(&r, text);
        assert_eq!(r.header("x-syncgate-provider"), Some("up/upstream-model"));
        let reply = r.json();
        assert_eq!(reply["object"], "conversation.message");
        assert_eq!(reply["role"], "assistant");
        assert_eq!(reply["conversation_id"], conv.as_str());
        assert_eq!(reply["model"], "m");
        assert_eq!(reply["incomplete"], false);
        assert_eq!(reply["content"], mock_reply(text));
        let usage = &reply["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            )
        );
        replies.push(reply);
    }

    let bodies = upstream_bodies(&up);
    assert_eq!(bodies.len(), 3, "one upstream call per turn");
    assert_eq!(bodies[0]["model"], "upstream-model");
    let s = |role: &str, text: &str| (role.to_string(), text.to_string());
    assert_eq!(
        sent_messages(&bodies[0]),
        [s("system", "You are terse."), s("user", "one")]
    );
    // Four messages are stored before the third turn; the newest three go along.
    assert_eq!(
        sent_messages(&bodies[2]),
        [
            s("system", "You are terse."),
            s("assistant", &mock_reply("one")),
            s("user", "two"),
            s("assistant", &mock_reply("two")),
            s("user", "three"),
        ]
    );

    let stored = all_messages(gw.addr, &conv);
    let pairs: Vec<(String, String)> = stored
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(pairs.len(), 6, "{stored:?}");
    assert_eq!(pairs[4], s("user", "three"));
    assert_eq!(stored[5]["id"], replies[2]["id"]);
    assert!(stored[4].get("usage").is_none() && stored[4]["model"].is_null());
    let page = get_path(
        gw.addr,
        &format!("/api/conversations/{conv}/messages?limit=4"),
    )
    .json();
    assert_eq!(page["data"].as_array().unwrap().len(), 4);
    assert_eq!(page["has_more"], true);

    // A turn may name another model: the built-in mock answers, the upstream is not called.
    let r = turn(
        gw.addr,
        &conv,
        json!({"content": "four", "model": "mock"}),
        &[],
    );
    assert_ok(&r, "override");
    assert_eq!(r.json()["model"], "mock");
    assert_eq!(upstream_calls(&up), 3);

    // The request log row of a turn names the model, the provider and the tokens.
    let logged = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        db_count(
            &db,
            "SELECT count(*) FROM requests WHERE route = '/api/conversations/{id}/messages' \
             AND method = 'POST' AND model = 'm' AND provider = 'up' \
             AND upstream_model = 'upstream-model' AND prompt_tokens > 0 \
             AND completion_tokens > 0 AND status = 200",
            &[],
        ) == 3
    });
    assert!(logged, "three turns logged with model, provider and usage");
}

#[test]
fn a_failed_model_call_stores_nothing_and_answers_as_v1_would() {
    let up = Server::start_mock_upstream(&["--fault", "status=400"]);
    let gw = gateway(up.addr, "", &[]);
    let conv = new_conversation(gw.addr, json!({"model": "m"}));
    let r = turn(gw.addr, &conv, json!({"content": "x"}), &[]);
    assert_error(&r, 400, None, Some("mock_fault"));
    assert!(all_messages(gw.addr, &conv).is_empty());
}

#[test]
fn a_repeat_with_the_same_key_returns_what_was_stored_without_asking_the_model_again() {
    let up = Server::start_mock_upstream(&[]);
    let gw = gateway(up.addr, "", &[]);

    let key = [("Idempotency-Key", "create-1")];
    let first = create(gw.addr, r#"{"model": "m", "title": "once"}"#, &key);
    let again = create(gw.addr, r#"{"model": "m", "title": "once"}"#, &key);
    assert_eq!(first.status, 201, "{}", first.describe());
    assert_eq!(again.status, 201, "{}", again.describe());
    assert_eq!(first.body, again.body);
    let listed = get_path(gw.addr, "/api/conversations").json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let conv = first.json()["id"].as_str().unwrap().to_string();

    let key = [("Idempotency-Key", "turn-1")];
    let first = turn(gw.addr, &conv, json!({"content": "hi"}), &key);
    assert_ok(&first, "first turn");
    let calls = upstream_calls(&up);
    let again = turn(gw.addr, &conv, json!({"content": "hi"}), &key);
    assert_ok(&again, "repeat");
    assert_eq!(first.body, again.body, "the same reply, byte for byte");
    assert_eq!(upstream_calls(&up), calls, "the model was not asked again");
    assert_eq!(all_messages(gw.addr, &conv).len(), 2);

    // Another key is another turn; the same key in another conversation too.
    let other = turn(
        gw.addr,
        &conv,
        json!({"content": "hi"}),
        &[("Idempotency-Key", "turn-2")],
    );
    assert_ok(&other, "another key");
    assert_ne!(other.json()["id"], first.json()["id"]);
    let conv2 = new_conversation(gw.addr, json!({"model": "m"}));
    assert_ok(
        &turn(gw.addr, &conv2, json!({"content": "hi"}), &key),
        "elsewhere",
    );
    assert_eq!(upstream_calls(&up), calls + 2);
}

#[test]
fn twin_requests_racing_with_one_key_store_one_turn_and_both_get_it() {
    // Slow enough that both twins miss the stored reply and ask the model.
    let up = Server::start_mock_upstream(&["--latency-ms", "300"]);
    let gw = gateway(up.addr, "", &[]);
    let conv = new_conversation(gw.addr, json!({"model": "m"}));
    let addr = gw.addr;
    let twins: Vec<_> = (0..2)
        .map(|_| {
            let conv = conv.clone();
            thread::spawn(move || {
                turn(
                    addr,
                    &conv,
                    json!({"content": "race"}),
                    &[("Idempotency-Key", "twin")],
                )
            })
        })
        .collect();
    let answers: Vec<Resp> = twins.into_iter().map(|t| t.join().unwrap()).collect();
    for a in &answers {
        assert_ok(a, "twin");
    }
    assert_eq!(
        answers[0].body, answers[1].body,
        "both get the stored reply"
    );
    let stored = all_messages(gw.addr, &conv);
    assert_eq!(stored.len(), 2, "one turn stored: {stored:?}");
    assert_eq!(stored[1]["id"], answers[0].json()["id"]);
}

// --- streamed turns --------------------------------------------------------------------

#[test]
fn a_streamed_turn_relays_its_events_and_stores_the_full_text_before_done() {
    let up = Server::start_mock_upstream(&["--stream-chunks", "5"]);
    let gw = gateway(up.addr, "", &[]);
    let conv = new_conversation(gw.addr, json!({"model": "m"}));
    for model in ["m", "mock"] {
        let text = format!("stream via {model}");
        let r = turn(
            gw.addr,
            &conv,
            json!({"content": text, "stream": true, "model": model}),
            &[],
        );
        assert_ok(&r, "stream");
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let events = sse_data(&r.text());
        assert!(events.len() >= 4, "{model}: {events:?}");
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{model}");
        assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e).expect("each event is JSON");
            assert_eq!(v["object"], "chat.completion.chunk", "{e}");
        }
        let whole = streamed_text(&events);
        assert_eq!(whole, mock_reply(&text), "{model}");
        // The body ends only after the turn was committed: it is there at once.
        let stored = all_messages(gw.addr, &conv);
        let reply = stored.last().unwrap();
        assert_eq!(reply["role"], "assistant");
        assert_eq!(reply["content"], whole.as_str());
        assert_eq!(reply["incomplete"], false);
        assert_eq!(reply["model"], model);
        assert_eq!(stored[stored.len() - 2]["content"], text.as_str());
    }
    let sent = upstream_bodies(&up);
    assert_eq!(sent.len(), 1, "only the turn for `m` went upstream");
    assert_eq!(sent[0]["stream"], true);
    assert_eq!(sent[0]["stream_options"]["include_usage"], true);
}

#[test]
fn a_cut_stream_is_stored_with_what_arrived_and_marked_incomplete() {
    let up = Server::start_mock_upstream(&["--fault", "truncate-after=3", "--stream-chunks", "8"]);
    let gw = gateway(up.addr, "", &[]);
    let conv = new_conversation(gw.addr, json!({"model": "m"}));
    let text = "a fairly long message so that eight chunks each carry some words";
    let r = turn(
        gw.addr,
        &conv,
        json!({"content": text, "stream": true}),
        &[],
    );
    assert_ok(&r, "cut stream");
    let events = sse_data(&r.text());
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_truncated");
    let arrived = streamed_text(&events);
    assert!(
        !arrived.is_empty() && mock_reply(text).starts_with(&arrived),
        "{arrived:?}"
    );
    assert_ne!(arrived, mock_reply(text));

    let stored = all_messages(gw.addr, &conv);
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0]["content"], text);
    assert_eq!(stored[1]["content"], arrived.as_str());
    assert_eq!(stored[1]["incomplete"], true);
}

#[test]
fn a_client_leaving_a_streamed_turn_leaves_it_stored_as_incomplete() {
    let up = Server::start_mock_upstream(&["--stream-chunks", "40", "--stream-interval-ms", "50"]);
    let gw = gateway(up.addr, "", &[]);
    let conv = new_conversation(gw.addr, json!({"model": "m"}));
    let path = format!("/api/conversations/{conv}/messages");
    let body = json!({"content": "leaving early", "stream": true}).to_string();
    let mut c = Conn::open(gw.addr);
    c.write_all(&request("POST", &path, Some(&body), &[]))
        .unwrap();
    // Read until a few content events have arrived, then go.
    let got_some = poll_until(Duration::from_secs(5), Duration::ZERO, || {
        c.fill().is_ok_and(|n| n > 0)
            && String::from_utf8_lossy(c.buffered())
                .matches("\"content\"")
                .count()
                >= 4
    });
    assert!(got_some, "no events: {}", preview(c.buffered()));
    drop(c);
    let mut stored = Vec::new();
    let kept = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        stored = all_messages(gw.addr, &conv);
        stored.len() == 2
    });
    assert!(kept, "the turn was not stored: {stored:?}");
    assert_eq!(stored[1]["incomplete"], true);
    let content = stored[1]["content"].as_str().unwrap();
    assert!(
        !content.is_empty() && mock_reply("leaving early").starts_with(content),
        "{content:?}"
    );
}

#[test]
fn a_streamed_turn_that_cannot_be_stored_ends_with_an_error_event_not_done() {
    let up = Server::start_mock_upstream(&["--stream-chunks", "20", "--stream-interval-ms", "50"]);
    let gw = gateway(up.addr, "", &[]);
    let conv = new_conversation(gw.addr, json!({"model": "m"}));
    let path = format!("/api/conversations/{conv}/messages");
    let body = json!({"content": "deleted while streaming", "stream": true}).to_string();
    let mut c = Conn::open(gw.addr);
    c.write_all(&request("POST", &path, Some(&body), &[]))
        .unwrap();
    let streaming = poll_until(Duration::from_secs(5), Duration::ZERO, || {
        c.fill().is_ok_and(|n| n > 0)
            && String::from_utf8_lossy(c.buffered())
                .matches("\"content\"")
                .count()
                >= 3
    });
    assert!(streaming, "no events: {}", preview(c.buffered()));
    // Its turn now has nowhere to go: the [DONE] must not come.
    assert_ok(
        &delete(gw.addr, &format!("/api/conversations/{conv}")),
        "delete",
    );
    let r = c.read_response().expect("the rest of the stream");
    let events = sse_data(&r.text());
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "store_error", "{events:?}");
    assert_eq!(
        streamed_text(&events),
        mock_reply("deleted while streaming"),
        "the whole reply was relayed"
    );
}

// --- durability and concurrency ----------------------------------------------------------

/// A turn answered 200: what must be found after a crash.
struct Acked {
    conversation: String,
    user: String,
    reply_id: String,
    reply: String,
}

/// What the writer threads of one round saw.
#[derive(Default)]
struct Round {
    acked: Vec<Acked>,
    /// Answers that were not a success, before the server was killed.
    failures: Vec<String>,
}

/// One writer: a conversation of its own, then turns in a loop on one connection until
/// `stop` or the server goes away.
fn writer(
    addr: SocketAddr,
    n: usize,
    round: usize,
    stop: &AtomicBool,
    acks: &AtomicUsize,
    seen: &Mutex<Round>,
) {
    let Ok(mut c) = Conn::try_open(addr) else {
        return;
    };
    let create_body = json!({"model": "m", "title": format!("w{n}")}).to_string();
    let Ok(r) = c.try_request(&request(
        "POST",
        "/api/conversations",
        Some(&create_body),
        &[],
    )) else {
        return;
    };
    if r.status != 201 {
        seen.lock().unwrap().failures.push(r.describe());
        return;
    }
    let conv = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/api/conversations/{conv}/messages");
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let user = format!("round {round} writer {n} turn {i}");
        let body = json!({"content": user}).to_string();
        let Ok(r) = c.try_request(&request("POST", &path, Some(&body), &[])) else {
            return; // killed mid-turn: not acknowledged
        };
        if r.status != 200 {
            seen.lock().unwrap().failures.push(r.describe());
            return;
        }
        let v = r.json();
        seen.lock().unwrap().acked.push(Acked {
            conversation: conv.clone(),
            user,
            reply_id: v["id"].as_str().unwrap().to_string(),
            reply: v["content"].as_str().unwrap().to_string(),
        });
        acks.fetch_add(1, Ordering::SeqCst);
        i += 1;
    }
}

/// How many acknowledged turns are missing (or differ) on the server at `addr`.
fn count_lost(addr: SocketAddr, acked: &[Acked]) -> usize {
    let mut by_conversation: HashMap<&str, Vec<Value>> = HashMap::new();
    let mut lost = 0;
    for a in acked {
        let stored = by_conversation
            .entry(&a.conversation)
            .or_insert_with(|| all_messages(addr, &a.conversation));
        let at = stored.iter().position(|m| m["id"] == a.reply_id.as_str());
        let whole = at.is_some_and(|i| {
            i > 0
                && stored[i]["role"] == "assistant"
                && stored[i]["content"] == a.reply.as_str()
                && stored[i - 1]["role"] == "user"
                && stored[i - 1]["content"] == a.user.as_str()
        });
        if !whole {
            eprintln!(
                "lost: {} turn {:?} (reply {})",
                a.conversation, a.user, a.reply_id
            );
            lost += 1;
        }
    }
    lost
}

#[test]
fn every_acknowledged_turn_survives_kill_9_and_writers_never_see_the_store_busy() {
    let db = TempDb::new();
    acknowledged_turns_survive_kill_9(&db.path_str());
}

/// The same on PostgreSQL (issue 14): an acknowledged turn is committed there too.
#[test]
fn every_acknowledged_turn_survives_kill_9_on_postgres() {
    let Some(pg) = fresh_postgres() else { return };
    acknowledged_turns_survive_kill_9(&pg.url());
}

fn acknowledged_turns_survive_kill_9(db: &str) {
    const WRITERS: usize = 16;
    const ROUNDS: usize = 3;
    let started = Instant::now();
    let up = Server::start_mock_upstream(&["--latency-ms", "3"]);
    let toml = gateway_toml(up.addr, "");
    let mut acked: Vec<Acked> = Vec::new();
    let mut lost = 0;
    for round in 0..ROUNDS {
        let mut gw = Server::start_with_config(&toml, &["--db", db]);
        lost += count_lost(gw.addr, &acked);
        let stop = AtomicBool::new(false);
        let acks = AtomicUsize::new(0);
        let seen = Mutex::new(Round::default());
        let addr = gw.addr;
        thread::scope(|s| {
            for n in 0..WRITERS {
                let (stop, acks, seen) = (&stop, &acks, &seen);
                s.spawn(move || writer(addr, n, round, stop, acks, seen));
            }
            // Kill while every writer is mid-flight, once a fair number of turns are in.
            let enough = poll_until(Duration::from_secs(15), Duration::from_millis(5), || {
                acks.load(Ordering::SeqCst) >= WRITERS * 30
            });
            gw.signal(libc::SIGKILL);
            stop.store(true, Ordering::SeqCst);
            assert!(
                enough,
                "round {round}: only {} turns acknowledged",
                acks.load(Ordering::SeqCst)
            );
        });
        assert!(
            gw.wait_exit(Duration::from_secs(5)).is_some(),
            "the server did not die"
        );
        let seen = seen.into_inner().unwrap();
        assert!(
            seen.failures.is_empty(),
            "round {round}: writers got errors (no 5xx store_busy/store_error may reach them):\n{}",
            seen.failures.join("\n")
        );
        eprintln!(
            "round {round}: {} turns acknowledged before SIGKILL",
            seen.acked.len()
        );
        acked.extend(seen.acked);
    }
    let gw = Server::start_with_config(&toml, &["--db", db]);
    lost += count_lost(gw.addr, &acked);
    eprintln!(
        "kill -9 durability: {ROUNDS} rounds, {} turns acknowledged, {lost} lost, {:.1} s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(!acked.is_empty());
    assert_eq!(lost, 0, "acknowledged turns were lost");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn thirty_two_threads_mixing_creates_turns_and_reads_never_see_the_store_busy() {
    const THREADS: usize = 32;
    const ROUNDS: usize = 6;
    let gw = Server::start(&[]);
    let addr = gw.addr;
    let failures = Mutex::new(Vec::new());
    thread::scope(|s| {
        for n in 0..THREADS {
            let failures = &failures;
            s.spawn(move || {
                let mut c = Conn::open(addr);
                let check = |r: Resp, what: &str| {
                    if !(200..300).contains(&r.status) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{what}: {}", r.describe()));
                    }
                    r
                };
                for i in 0..ROUNDS {
                    let body = json!({"model": "mock", "title": format!("{n}-{i}")}).to_string();
                    let r = check(
                        c.request(&request("POST", "/api/conversations", Some(&body), &[])),
                        "create",
                    );
                    let Some(conv) = r.json()["id"].as_str().map(String::from) else {
                        continue;
                    };
                    let path = format!("/api/conversations/{conv}/messages");
                    let body = json!({"content": format!("turn {n}-{i}")}).to_string();
                    check(c.request(&request("POST", &path, Some(&body), &[])), "turn");
                    check(c.request(&request("GET", &path, None, &[])), "messages");
                    check(
                        c.request(&request("GET", "/api/conversations?limit=5", None, &[])),
                        "list",
                    );
                    check(
                        c.request(&request(
                            "GET",
                            &format!("/api/conversations/{conv}"),
                            None,
                            &[],
                        )),
                        "get",
                    );
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let listed = get_path(addr, "/api/conversations?limit=100").json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 100);
    assert_eq!(
        listed["has_more"], true,
        "{THREADS} × {ROUNDS} conversations stored"
    );
}

/// A write the database refuses (another process holds its write lock past the busy timeout)
/// is answered with an error, nothing is acknowledged, and it is counted in
/// `syncgate_store_errors_total{kind="failed"}`, which the SyncgateStoreErrors alert watches
/// (issue 18).
#[test]
fn a_refused_write_is_answered_with_an_error_and_counted_as_a_store_error() {
    let db = TempDb::new();
    let gw = Server::start(&["--db", &db.path_str()]);
    let failed = |gw: &Server| {
        metric_value(
            &scrape(gw.addr),
            "syncgate_store_errors_total",
            &[("kind", "failed")],
        )
    };
    assert_eq!(failed(&gw), Some(0.0), "the series exists from start, at 0");

    let holder = rusqlite::Connection::open(&db.path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let r = create(gw.addr, &json!({"title": "locked out"}).to_string(), &[]);
    holder.execute_batch("ROLLBACK").unwrap();

    assert_error(&r, 500, None, Some("store_error"));
    assert_eq!(failed(&gw), Some(1.0), "{}", gw.log());
    assert_eq!(db_count(&db, "SELECT count(*) FROM conversations", &[]), 0);
    // The database is usable again once the lock is gone.
    new_conversation(gw.addr, json!({"title": "after"}));
}
