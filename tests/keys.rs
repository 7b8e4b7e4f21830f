//! API keys and their limits, end to end: the real binary in front of `syncgate mock-upstream`.
//! Every refusal is answered before any upstream call (the upstream's `/stats` does not move),
//! limits are exact under concurrency, a key never shows up anywhere once made, user keys
//! never reach `/admin`, and a server that would be open to the network refuses to start.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "adm-0f3c2b1e9d8a7f6e5d4c3b2a19080706";

fn gateway_toml(upstream: SocketAddr) -> String {
    format!(
        "{}\n[[models]]\nname = \"other\"\ntargets = [\"up/other-model\"]\n",
        upstream_model_toml(upstream)
    )
}

/// A gateway with the admin key set, in front of `up`.
fn gateway(up: &Server, args: &[&str]) -> Server {
    Server::start_full(
        args,
        &[("SYNCGATE_ADMIN_KEY", ADMIN)],
        Some(TempConfig::new(&gateway_toml(up.addr))),
    )
}

fn upstream_calls(up: &Server) -> u64 {
    get(up.addr, "/stats").json()["requests"]
        .as_u64()
        .expect("a count")
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// `POST /admin/keys` with the admin key; returns the whole answer (the key is in `key`).
fn make_key(gw: &Server, fields: Value) -> Value {
    let admin = bearer(ADMIN);
    let r = send(
        gw.addr,
        &post_req(
            "/admin/keys",
            &fields.to_string(),
            &[("Authorization", &admin), ("Connection", "close")],
        ),
    );
    assert_eq!(r.status, 201, "{}", r.describe());
    r.json()
}

fn chat_as(addr: SocketAddr, key: Option<&str>, body: &Value) -> Resp {
    let auth = key.map(bearer);
    let mut headers = vec![("Connection", "close")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    send(
        addr,
        &post_req("/v1/chat/completions", &body.to_string(), &headers),
    )
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

#[test]
fn every_refusal_is_answered_before_any_upstream_call() {
    let up = Server::start_mock_upstream(&[]);
    let gw = gateway(&up, &[]);
    let only_m = make_key(&gw, json!({"name": "only-m", "models": ["m"]}));
    let only_m = only_m["key"].as_str().unwrap().to_string();
    let revoked = make_key(&gw, json!({"name": "gone"}));
    let revoked_id = revoked["id"].as_i64().unwrap();
    let revoked = revoked["key"].as_str().unwrap().to_string();
    let admin = bearer(ADMIN);
    let r = send(
        gw.addr,
        &format!(
            "DELETE /admin/keys/{revoked_id} HTTP/1.1\r\nHost: x\r\nAuthorization: {admin}\r\n\
             Connection: close\r\n\r\n"
        )
        .into_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.json()["status"], "revoked");
    let expiring = make_key(
        &gw,
        json!({"name": "soon", "expires_at": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 2}),
    );
    let expiring = expiring["key"].as_str().unwrap().to_string();
    let limited = make_key(&gw, json!({"name": "one-a-minute", "rpm": 1}));
    let limited = limited["key"].as_str().unwrap().to_string();

    // The valid, allowed calls reach the upstream: the count is live.
    let before = upstream_calls(&up);
    assert_ok(
        &chat_as(gw.addr, Some(&only_m), &chat_body("m")),
        "an allowed call",
    );
    assert_ok(
        &chat_as(gw.addr, Some(&limited), &chat_body("m")),
        "the first of its minute",
    );
    assert_eq!(upstream_calls(&up), before + 2);

    let before = upstream_calls(&up);
    let cases: Vec<(Option<&str>, Value, u16, &str)> = vec![
        (None, chat_body("m"), 401, "missing_api_key"),
        (
            Some("sk-sg-not-a-key"),
            chat_body("m"),
            401,
            "invalid_api_key",
        ),
        (Some(&revoked), chat_body("m"), 401, "api_key_revoked"),
        (Some(&only_m), chat_body("other"), 403, "model_not_allowed"),
        (Some(&limited), chat_body("m"), 429, "rate_limit_exceeded"),
    ];
    for (key, body, status, code) in &cases {
        let r = chat_as(gw.addr, *key, body);
        assert_error(&r, *status, None, Some(code));
    }
    // Bodies that try to slip another model past the check: a field of an unexpected type,
    // and `model` given twice (admission cannot read it; the handler checks what it would call).
    let auth = bearer(&only_m);
    for body in [
        r#"{"model":"other","content":5,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"m","model":"other","messages":[{"role":"user","content":"hi"}]}"#,
    ] {
        let r = send(
            gw.addr,
            &post_req(
                "/v1/chat/completions",
                body,
                &[("Authorization", &auth), ("Connection", "close")],
            ),
        );
        assert_error(&r, 403, None, Some("model_not_allowed"));
    }
    // The expired key: refused once its time has passed.
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            chat_as(gw.addr, Some(&expiring), &json!({"model": "nope"})).status == 401
        }),
        "the key never expired"
    );
    let r = chat_as(gw.addr, Some(&expiring), &chat_body("m"));
    assert_error(&r, 401, None, Some("api_key_expired"));
    // A wrong bearer scheme and an empty one are missing keys.
    for header in ["Basic abc", "Bearer ", "Bearer"] {
        let r = send(
            gw.addr,
            &post_req(
                "/v1/chat/completions",
                &chat_body("m").to_string(),
                &[("Authorization", header), ("Connection", "close")],
            ),
        );
        assert_error(&r, 401, None, Some("missing_api_key"));
    }
    // The /api surface is guarded the same way.
    let r = get(gw.addr, "/api/requests");
    assert_error(&r, 401, None, Some("missing_api_key"));
    assert_eq!(
        upstream_calls(&up),
        before,
        "a refused request reached the upstream"
    );

    let metrics = scrape(gw.addr);
    for (reason, at_least) in [
        ("missing", 5.0),
        ("unknown", 1.0),
        ("revoked", 1.0),
        ("expired", 1.0),
        ("model_not_allowed", 1.0),
    ] {
        let n = metric_value(
            &metrics,
            "syncgate_auth_failures_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0);
        assert!(n >= at_least, "{reason}: {n}\n{metrics}");
    }
    let limited_n = metric_value(
        &metrics,
        "syncgate_rate_limited_total",
        &[("limit", "requests")],
    );
    assert_eq!(limited_n, Some(1.0), "{metrics}");
}

/// Sends `n` chat calls at once (a barrier releases them together) and returns the statuses.
fn burst(addr: SocketAddr, key: &str, n: usize, body: Value) -> Vec<u16> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, key, body) = (Arc::clone(&barrier), key.to_string(), body.clone());
            thread::spawn(move || {
                let raw = post_req(
                    "/v1/chat/completions",
                    &body.to_string(),
                    &[("Authorization", &bearer(&key)), ("Connection", "close")],
                );
                let mut conn = Conn::open(addr);
                barrier.wait();
                conn.request(&raw).status
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[test]
fn limits_are_exact_under_concurrency() {
    // Each admitted call is held upstream long enough that all 60 arrive before any ends.
    let up = Server::start_mock_upstream(&["--latency-ms", "1500"]);
    let gw = gateway(&up, &[]);

    let rpm = make_key(&gw, json!({"name": "rpm", "rpm": 20}));
    let statuses = burst(gw.addr, rpm["key"].as_str().unwrap(), 60, chat_body("m"));
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (20, 40),
        "{statuses:?}"
    );

    // Each call is estimated at 100 tokens (an empty prompt and max_tokens 100).
    let tpm = make_key(&gw, json!({"name": "tpm", "tpm": 1000}));
    let body = json!({"model": "m", "max_tokens": 100,
                      "messages": [{"role": "user", "content": ""}]});
    let statuses = burst(gw.addr, tpm["key"].as_str().unwrap(), 60, body);
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (10, 50),
        "{statuses:?}"
    );

    let in_flight = make_key(&gw, json!({"name": "in-flight", "max_in_flight": 5}));
    let key = in_flight["key"].as_str().unwrap();
    let statuses = burst(gw.addr, key, 60, chat_body("m"));
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (5, 55),
        "{statuses:?}"
    );
    // The slots came back when those calls ended.
    let statuses = burst(gw.addr, key, 5, chat_body("m"));
    assert_eq!(count(&statuses, 200), 5, "{statuses:?}");
}

#[test]
fn keyed_answers_carry_the_rate_limit_headers_and_refusals_say_when_to_retry() {
    let up = Server::start_mock_upstream(&[]);
    let gw = gateway(&up, &[]);
    let key = make_key(&gw, json!({"name": "h", "rpm": 2, "tpm": 100000}));
    let key = key["key"].as_str().unwrap().to_string();

    let r = chat_as(gw.addr, Some(&key), &chat_body("m"));
    assert_ok(&r, "a keyed call");
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
    assert!(r.header("x-ratelimit-reset-requests").is_some());
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100000"));
    assert!(r.header("x-ratelimit-remaining-tokens").is_some());
    assert!(r.header("x-ratelimit-reset-tokens").is_some());

    // An error answer to a keyed request carries them too.
    let r = chat_as(gw.addr, Some(&key), &json!({"model": "m"}));
    assert_error(&r, 400, None, None);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));

    let r = chat_as(gw.addr, Some(&key), &chat_body("m"));
    assert_error(
        &r,
        429,
        Some("rate_limit_error"),
        Some("rate_limit_exceeded"),
    );
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {}", r.describe()));
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
}

#[test]
fn user_keys_never_reach_admin_and_admin_is_off_without_its_key() {
    let up = Server::start_mock_upstream(&[]);
    let gw = gateway(&up, &[]);
    let user = make_key(&gw, json!({"name": "user"}));
    let user = bearer(user["key"].as_str().unwrap());
    for raw in [
        get_req("/admin/keys", &[("Authorization", &user), ("Connection", "close")]),
        post_req(
            "/admin/keys",
            r#"{"name":"sneaky"}"#,
            &[("Authorization", &user), ("Connection", "close")],
        ),
        format!("DELETE /admin/keys/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {user}\r\nConnection: close\r\n\r\n")
            .into_bytes(),
        get_req("/admin/keys", &[("Connection", "close")]),
    ] {
        let r = send(gw.addr, &raw);
        assert_eq!(r.status, 401, "{}", r.describe());
    }
    // Nothing was made by those attempts.
    let admin = bearer(ADMIN);
    let list = send(
        gw.addr,
        &get_req(
            "/admin/keys",
            &[("Authorization", &admin), ("Connection", "close")],
        ),
    );
    assert_ok(&list, "the admin's list");
    let listed = list.json();
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["user"]);

    // Without SYNCGATE_ADMIN_KEY the admin API is off, even for a key that looks right.
    let plain = Server::start_with_config(&gateway_toml(up.addr), &[]);
    let r = send(
        plain.addr,
        &get_req(
            "/admin/keys",
            &[("Authorization", &admin), ("Connection", "close")],
        ),
    );
    assert_error(&r, 403, None, Some("admin_disabled"));
}

#[test]
fn a_key_never_appears_in_logs_the_database_or_error_bodies() {
    let up = Server::start_mock_upstream(&[]);
    let db = TempDb::new();
    let db_path = db.path_str();
    let mut gw = Server::start_full(
        &["--db", &db_path],
        &[("SYNCGATE_ADMIN_KEY", ADMIN), ("RUST_LOG", "debug")],
        Some(TempConfig::new(&format!(
            "{}\n[log]\nbodies = true\n",
            gateway_toml(up.addr)
        ))),
    );
    let made = make_key(&gw, json!({"name": "canary", "models": ["m"], "rpm": 3}));
    let canary = made["key"].as_str().unwrap().to_string();
    let secret = &canary["sk-sg-".len()..];
    let unknown = format!("sk-sg-unknown-{}", unique("canary"));
    let mut bodies = Vec::new();
    for body in [
        chat_body("m"),
        chat_body("other"),
        json!({"model": "m"}),
        chat_body("m"),
    ] {
        bodies.push(chat_as(gw.addr, Some(&canary), &body).body);
    }
    for _ in 0..2 {
        bodies.push(chat_as(gw.addr, Some(&canary), &chat_body("m")).body);
    }
    bodies.push(chat_as(gw.addr, Some(&unknown), &chat_body("m")).body);
    let requests = send(
        gw.addr,
        &get_req(
            "/api/requests?limit=50",
            &[("Authorization", &bearer(&canary)), ("Connection", "close")],
        ),
    );
    bodies.push(requests.body.clone());
    assert!(
        bodies
            .iter()
            .any(|b| String::from_utf8_lossy(b).contains("rate_limit_exceeded")),
        "the calls were meant to reach the limit"
    );

    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(Duration::from_secs(20)).is_some(), "no exit");
    let stored = db.all_bytes();
    assert!(
        String::from_utf8_lossy(&stored).contains("\"model\":\"other\""),
        "the kept bodies are in the file, so a key in them would be found"
    );
    for (what, text) in [
        ("the server's stderr", gw.log()),
        ("the server's stdout", gw.stdout()),
        (
            "the database file",
            String::from_utf8_lossy(&stored).into_owned(),
        ),
    ] {
        assert!(!text.contains(secret), "the key's secret is in {what}");
        assert!(!text.contains(&unknown), "the unknown key is in {what}");
    }
    for body in bodies {
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains(secret) && !text.contains(&unknown), "{text}");
    }
}

#[test]
fn an_open_server_on_the_network_refuses_to_start_unless_told() {
    let db = TempDb::new();
    let exit = run_to_exit(
        &["serve", "--listen", "0.0.0.0:0", "--db", &db.path_str()],
        &[],
        EXIT_DEADLINE,
    );
    assert!(
        !exit.started_serving && exit.status.is_some_and(|s| !s.success()),
        "{}",
        exit.describe()
    );
    assert!(
        exit.stderr.contains("--allow-open") && exit.stderr.contains("keys create"),
        "{}",
        exit.describe()
    );

    let open = Server::start_command(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--allow-open",
            "--db",
            &db.path_str(),
        ],
        &[],
        None,
    );
    let local = SocketAddr::from(([127, 0, 0, 1], open.addr.port()));
    assert_ok(&chat(local, "hi"), "an open server's call");
    assert!(open.log().contains("--allow-open"), "{}", open.log());
}

#[test]
fn keys_made_and_revoked_offline_reach_a_running_server() {
    let db = TempDb::new();
    let db_path = db.path_str();
    let created = run_to_exit(
        &[
            "keys", "create", "--db", &db_path, "--name", "cli", "--models", "mock",
        ],
        &[],
        EXIT_DEADLINE,
    );
    assert!(
        created.status.is_some_and(|s| s.success()),
        "{}",
        created.describe()
    );
    let key = created.stdout.trim().to_string();
    assert!(key.starts_with("sk-sg-") && key.len() == 70, "{key:?}");

    let gw = Server::start(&["--db", &db_path]);
    let with_key = |key: &str| {
        send(
            gw.addr,
            &chat_req(
                "hi",
                &[("Authorization", &bearer(key)), ("Connection", "close")],
            ),
        )
    };
    assert_ok(&with_key(&key), "the offline key");
    assert_error(&chat(gw.addr, "hi"), 401, None, Some("missing_api_key"));

    let listed = run_to_exit(&["keys", "list", "--db", &db_path], &[], EXIT_DEADLINE);
    assert!(
        listed.stdout.contains("cli") && listed.stdout.contains("active"),
        "{}",
        listed.describe()
    );
    assert!(
        !listed.stdout.contains(&key["sk-sg-".len()..]),
        "the list shows the secret"
    );

    let revoked = run_to_exit(
        &["keys", "revoke", "1", "--db", &db_path],
        &[],
        EXIT_DEADLINE,
    );
    assert!(
        revoked.status.is_some_and(|s| s.success()),
        "{}",
        revoked.describe()
    );
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            with_key(&key).status == 401
        }),
        "the running server never noticed the revocation"
    );
    // Revoking the last key does not reopen the server.
    assert_error(&chat(gw.addr, "hi"), 401, None, Some("missing_api_key"));

    // The log knows which key made each call, and usage groups by key.
    let usage = run_to_exit(
        &["usage", "--db", &db_path, "--group-by", "key"],
        &[],
        EXIT_DEADLINE,
    );
    assert!(usage.stdout.contains("1:cli"), "{}", usage.describe());
}
