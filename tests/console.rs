//! The console (issue 17): its files' security headers, `GET /api/status` answered on the
//! connection thread while every worker is busy and the queue is full, who may read it, and
//! the status page in a real headless Chromium driven over WebDriver (`chromium-driver`).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const ADMIN: &str = "sk-sg-admin-console-test";

/// Every console path, with the status and content type it must have.
const CONSOLE_PATHS: &[(&str, u16, &str)] = &[
    ("/", 303, "text/plain"),
    ("/console", 303, "text/plain"),
    ("/console/", 200, "text/html"),
    ("/console/index.html", 200, "text/html"),
    ("/console/console.css", 200, "text/css"),
    ("/console/console.js", 200, "text/javascript"),
    ("/console/pages.js", 200, "text/javascript"),
    ("/console/nothing-here.js", 404, "text/plain"),
];

/// A one-shot GET with `headers`; a `Host` among them replaces the default one.
fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut raw = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        raw.push_str("Host: 127.0.0.1\r\n");
    }
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    send(addr, raw.as_bytes())
}

/// A chat call held by the mock for its latency, on a thread of its own.
fn chat_in_background(addr: SocketAddr) -> JoinHandle<u16> {
    thread::spawn(move || {
        try_send(addr, &chat_req("hold a worker", &[("Connection", "close")]))
            .map_or(0, |r| r.status)
    })
}

fn status(addr: SocketAddr) -> Value {
    let r = get(addr, "/api/status");
    assert_ok(&r, "GET /api/status");
    r.json()
}

/// Waits until the status shows every worker busy and the queue full.
/// Takes every worker and queue slot with held calls (one at a time, so they queue in order),
/// waits until the status shows them, then sends `refused` more that must get 503 queue_full.
fn fill(gw: &Server, workers: u64, queue: u64, refused: usize) -> Vec<JoinHandle<u16>> {
    let held = (0..workers + queue)
        .map(|_| {
            let h = chat_in_background(gw.addr);
            thread::sleep(Duration::from_millis(50));
            h
        })
        .collect();
    wait_full(gw, workers, queue);
    for _ in 0..refused {
        assert_error(
            &chat(gw.addr, "one too many"),
            503,
            None,
            Some("queue_full"),
        );
    }
    held
}

fn wait_full(gw: &Server, workers: u64, queue: u64) -> Value {
    let mut last = Value::Null;
    let full = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        last = status(gw.addr);
        last["workers"]["busy"] == workers && last["queue"]["depth"] == queue
    });
    assert!(
        full,
        "expected {workers} workers busy and {queue} queued; last status: {last:#}\n{}",
        gw.log()
    );
    last
}

#[test]
fn every_console_response_carries_the_csp_nosniff_and_no_referrer() {
    let gw = Server::start(&[]);
    for (path, want_status, want_type) in CONSOLE_PATHS {
        let r = get(gw.addr, path);
        assert_eq!(r.status, *want_status, "{path}: {}", r.describe());
        assert_eq!(r.header("content-security-policy"), Some(CSP), "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
        let content_type = r.header("content-type").unwrap_or("");
        assert!(
            content_type.starts_with(want_type),
            "{path}: content type {content_type:?}, expected {want_type}"
        );
        assert_eq!(r.header_all("content-security-policy").len(), 1, "{path}");
        if *want_status == 303 {
            assert_eq!(r.header("location"), Some("/console/"), "{path}");
        }
    }
}

#[test]
fn the_page_has_no_inline_script_style_or_handler() {
    let gw = Server::start(&[]);
    let html = get(gw.addr, "/console/").text().to_lowercase();
    assert!(!html.contains("style="), "a style attribute:\n{html}");
    assert!(!html.contains("<style"), "a style element:\n{html}");
    for (i, _) in html.match_indices("<script") {
        let tag = &html[i..i + html[i..].find('>').unwrap()];
        assert!(tag.contains(" src="), "an inline script: {tag}");
        assert!(html[i..].starts_with(&format!("{tag}></script>")), "{tag}");
    }
    for word in html.split(|c: char| c.is_whitespace() || c == '<') {
        let is_handler = word.starts_with("on")
            && word.contains('=')
            && word[2..word.find('=').unwrap()]
                .chars()
                .all(|c| c.is_ascii_lowercase());
        assert!(!is_handler, "an inline event handler: {word}");
    }
    for file in ["console.js", "pages.js"] {
        let js = get(gw.addr, &format!("/console/{file}")).text();
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!js.contains(banned), "{file} uses {banned}");
        }
    }
}

#[test]
fn status_has_its_shape_and_the_poll_is_not_logged_or_counted_as_a_request() {
    let gw = Server::start(&["--workers", "3", "--queue", "5"]);
    assert_ok(&chat(gw.addr, "one call"), "a chat call");
    // The sampler takes a sample a second; wait for two.
    let mut s = Value::Null;
    assert!(poll_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            s = status(gw.addr);
            s["history"]["t_ms"]
                .as_array()
                .is_some_and(|t| t.len() >= 2)
        }
    ));
    assert_eq!(s["workers"], json!({"busy": 0, "total": 3}), "{s:#}");
    assert_eq!(s["streams_open"], 0, "{s:#}");
    assert_eq!(
        s["queue"],
        json!({"depth": 0, "capacity": 5, "oldest_wait_ms": null}),
        "{s:#}"
    );
    assert_eq!(s["ready"], json!({"ok": true, "status": "ready"}), "{s:#}");
    assert_eq!(s["open_access"], true);
    assert!(s["connections"]["open"].as_u64() >= Some(1), "{s:#}");
    assert!(s["connections"]["max"].as_u64() > Some(0), "{s:#}");
    assert!(s["retry_after_s"].as_u64() >= Some(1), "{s:#}");
    for reason in [
        "queue_full",
        "queue_timeout",
        "too_many_connections",
        "draining",
    ] {
        assert_eq!(s["rejected_total"][reason], 0, "{reason}: {s:#}");
        assert!(s["rates"]["shed_per_s"][reason].is_number(), "{s:#}");
    }
    assert!(s["rates"]["requests_per_s"].is_number(), "{s:#}");
    for kind in ["overhead", "upstream"] {
        for q in ["p50", "p95", "p99"] {
            let v = &s["latency_ms"][kind][q];
            assert!(v.is_number() || v.is_null(), "{kind} {q}: {s:#}");
        }
    }
    // The chat call's overhead was observed within the window.
    assert_eq!(s["latency_ms"]["overhead"]["count"], 1, "{s:#}");
    assert!(s["latency_ms"]["overhead"]["p99"].is_number(), "{s:#}");
    assert_eq!(
        s["providers"],
        json!([{"name": "mock", "in_flight": 0, "max_concurrency": null}])
    );
    assert!(s["request_log"]["queue_depth"].is_u64(), "{s:#}");
    assert_eq!(s["request_log"]["dropped_total"], 0);
    let h = &s["history"];
    let n = h["t_ms"].as_array().unwrap().len();
    for series in [
        "workers_busy",
        "queue_depth",
        "connections",
        "requests_per_s",
        "shed_per_s",
    ] {
        assert_eq!(h[series].as_array().map(Vec::len), Some(n), "{series}");
    }
    assert_eq!(h["capacity"], 900);
    // `since` returns only newer samples.
    let last = h["t_ms"][n - 1].as_i64().unwrap();
    let newer = get(gw.addr, &format!("/api/status?since={last}")).json();
    assert!(newer["history"]["t_ms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_i64() > Some(last)));
    assert_error(
        &get(gw.addr, "/api/status?since=soon"),
        400,
        None,
        Some("invalid_request"),
    );
    assert_error(
        &get(gw.addr, "/api/status?sinse=1"),
        400,
        None,
        Some("invalid_request"),
    );
    // The polls above are neither in the request log nor in requests/s.
    let logged = get(gw.addr, "/api/requests?limit=50").json();
    let routes: Vec<&str> = logged["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{logged:#}"))
        .iter()
        .filter_map(|row| row["route"].as_str())
        .collect();
    assert!(!routes.contains(&"/api/status"), "{routes:?}");
}

#[test]
fn status_answers_at_once_while_every_worker_is_busy_and_the_queue_is_full() {
    let gw = Server::start(&[
        "--workers",
        "1",
        "--queue",
        "1",
        "--mock-latency-ms",
        "6000",
        "--max-queue-wait-ms",
        "30000",
    ]);
    let held = fill(&gw, 1, 1, 3);
    let s = status(gw.addr);
    assert_eq!(s["rejected_total"]["queue_full"], 3, "{s:#}");
    // The queued call has waited since it was sent, and keeps waiting.
    let waited = |s: &Value| s["queue"]["oldest_wait_ms"].as_f64().unwrap_or(-1.0);
    let first = waited(&s);
    assert!(first > 0.0 && first < 10_000.0, "{s:#}");
    assert_eq!(
        s["ready"],
        json!({"ok": false, "status": "queue_high_water"})
    );

    // 200 polls on one kept-alive connection, each timed from request to whole answer.
    let mut conn = Conn::open(gw.addr);
    let mut took: Vec<Duration> = (0..200)
        .map(|_| {
            let start = Instant::now();
            let r = conn.request(&get_req("/api/status", &[]));
            let elapsed = start.elapsed();
            assert_eq!(r.status, 200, "{}", r.describe());
            elapsed
        })
        .collect();
    // Still full: every poll above was answered while no worker could have.
    let after = status(gw.addr);
    assert_eq!(after["workers"]["busy"], 1, "{after:#}");
    assert_eq!(after["queue"]["depth"], 1, "{after:#}");
    assert!(waited(&after) > first, "{after:#}");
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99, max) = (ms(took[99]), ms(took[197]), ms(took[199]));
    println!("/api/status over 200 polls while the queue was full: p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms");
    assert!(p99 < 100.0, "p99 {p99:.1} ms");

    // A second later the sampler has seen the refusals as a rate.
    let mut s = Value::Null;
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            s = status(gw.addr);
            s["rates"]["shed_per_s"]["queue_full"].as_f64() > Some(0.0)
        }),
        "{s:#}"
    );
    let busy = s["history"]["workers_busy"].as_array().unwrap();
    assert!(busy.iter().any(|b| b == 1), "{s:#}");
    // The queued call outlives the client's read timeout; how the held calls end is not
    // what this test is about.
    for h in held {
        let _ = h.join();
    }
}

#[test]
fn status_shows_streams_and_provider_calls_in_flight_and_upstream_latency() {
    // A stream of 6 events 500 ms apart: about 3 s on the wire.
    let up = Server::start_mock_upstream(&["--stream-chunks", "4", "--stream-interval-ms", "500"]);
    let toml = format!(
        "[[providers]]\nname = \"up\"\ntype = \"openai\"\nbase_url = \"http://{}/v1\"\n\
         max_concurrency = 4\n\n[[models]]\nname = \"m\"\ntargets = [\"up/upstream-model\"]\n",
        up.addr
    );
    let gw = Server::start_with_config(&toml, &[]);
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let addr = gw.addr;
    let streaming = thread::spawn(move || {
        let r = send(
            addr,
            &post_req(
                "/v1/chat/completions",
                &body.to_string(),
                &[("Connection", "close")],
            ),
        );
        r.status
    });
    let mut s = Value::Null;
    let seen = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        s = status(gw.addr);
        s["streams_open"] == 1
    });
    assert!(seen, "no stream in flight: {s:#}\n{}", gw.log());
    assert_eq!(s["workers"]["busy"], 1, "{s:#}");
    let up_provider = s["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "up")
        .cloned();
    assert_eq!(
        up_provider,
        Some(json!({"name": "up", "in_flight": 1, "max_concurrency": 4})),
        "{s:#}"
    );
    assert_eq!(streaming.join().unwrap(), 200);
    let done = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        s = status(gw.addr);
        s["streams_open"] == 0 && s["latency_ms"]["upstream"]["count"] == 1
    });
    assert!(done, "{s:#}");
    let p50 = s["latency_ms"]["upstream"]["p50"].as_f64().unwrap();
    assert!(
        (1000.0..=10000.0).contains(&p50),
        "upstream p50 {p50} ms: {s:#}"
    );
}

#[test]
fn status_needs_a_key_once_keys_exist_and_a_local_host_while_they_do_not() {
    let open = Server::start(&[]);
    for path in ["/api/status", "/console/"] {
        let r = get_with(open.addr, path, &[("Host", "localhost:8080")]);
        assert!(r.status == 200, "{path}: {}", r.describe());
    }
    // A page on another site whose name resolves to 127.0.0.1 (DNS rebinding).
    let r = send(
        open.addr,
        b"GET /api/status HTTP/1.1\r\nHost: rebind.example:8080\r\nConnection: close\r\n\r\n",
    );
    assert_error(&r, 403, Some("permission_error"), Some("host_not_allowed"));
    let r = send(
        open.addr,
        b"GET /console/ HTTP/1.1\r\nHost: rebind.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 403, "{}", r.describe());
    assert_eq!(r.header("content-security-policy"), Some(CSP));
    // So does every queued route while no key is needed: the log, usage, a model call.
    let close = [("Connection", "close")];
    for raw in [
        get_req("/api/requests", &close),
        get_req("/api/usage", &close),
        chat_req("hi", &close),
    ] {
        let foreign =
            String::from_utf8(raw)
                .unwrap()
                .replacen("Host: 127.0.0.1", "Host: rebind.example", 1);
        let r = send(open.addr, foreign.as_bytes());
        assert_error(&r, 403, Some("permission_error"), Some("host_not_allowed"));
    }
    let r = get_with(open.addr, "/api/requests", &[("Host", "127.0.0.1:8080")]);
    assert_eq!(r.status, 200, "{}", r.describe());
    // A name the configuration says is this machine's is served too.
    let named = Server::start_with_config("[server]\nlocal_hosts = [\"myapp.test\"]\n", &[]);
    let r = get_with(named.addr, "/api/requests", &[("Host", "myapp.test:8080")]);
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = get_with(named.addr, "/api/requests", &[("Host", "rebind.example")]);
    assert_eq!(r.status, 403, "{}", r.describe());

    let keyed = Server::start_with_env(&[], &[("SYNCGATE_ADMIN_KEY", ADMIN)]);
    let admin = format!("Bearer {ADMIN}");
    let made = send(
        keyed.addr,
        &post_req(
            "/admin/keys",
            r#"{"name": "console", "rpm": 1}"#,
            &[("Authorization", &admin), ("Connection", "close")],
        ),
    );
    assert_eq!(made.status, 201, "{}", made.describe());
    let key = format!("Bearer {}", made.json()["key"].as_str().unwrap());
    assert_error(
        &get(keyed.addr, "/api/status"),
        401,
        None,
        Some("missing_api_key"),
    );
    let wrong = get_with(
        keyed.addr,
        "/api/status",
        &[("Authorization", "Bearer sk-sg-no")],
    );
    assert_error(&wrong, 401, None, Some("invalid_api_key"));
    // A key's rate limit is not charged by polls: rpm = 1, and five polls pass.
    for _ in 0..5 {
        let r = get_with(keyed.addr, "/api/status", &[("Authorization", &key)]);
        assert_ok(&r, "a poll with a user key");
        assert_eq!(r.json()["open_access"], false);
    }
    assert_ok(
        &get_with(keyed.addr, "/api/status", &[("Authorization", &admin)]),
        "a poll with the admin key",
    );
    // The files hold no data: served without a key, under any Host.
    let r = get_with(keyed.addr, "/console/", &[("Host", "gateway.example")]);
    assert_eq!(r.status, 200, "{}", r.describe());
}

// ---------------------------------------------------------------------------
// A real browser
// ---------------------------------------------------------------------------

/// Chromium driven by chromedriver over the W3C WebDriver HTTP API, with a fresh profile;
/// the session is deleted and chromedriver stopped on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    profile: PathBuf,
}

impl Browser {
    fn start(chromium: &std::path::Path, chromedriver: &std::path::Path) -> Browser {
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(60)))
                .http_status_as_error(false)
                .build(),
        );
        let base = format!("http://127.0.0.1:{port}");
        let profile = std::env::temp_dir().join(unique("syncgate-chromium-profile"));
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
            profile,
        };
        let ready = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            browser
                .call("GET", "/status", None)
                .is_ok_and(|v| v["ready"] == true)
        });
        assert!(ready, "chromedriver did not become ready on port {port}");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": [
                    "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", browser.profile.display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let session = browser
            .call("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("cannot open a WebDriver session: {e}"));
        browser.session = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {session:#}"))
            .to_string();
        browser
    }

    /// One WebDriver command; its `value`, or the error it answered.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self.agent.post(&url).send_json(body.unwrap_or(json!({}))),
        };
        let mut response = response.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status().as_u16();
        let value: Value = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_json()
            .map_err(|e| format!("{method} {path}: {status}, unreadable body: {e}"))?;
        if status == 200 {
            Ok(value["value"].clone())
        } else {
            Err(format!("{method} {path}: {status} {value}"))
        }
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, body)
            .unwrap_or_else(|e| panic!("WebDriver: {e}"))
    }

    fn open(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({"url": url})));
    }

    /// Runs `script` in the page (through the DevTools protocol, so the page's CSP does not
    /// apply to it) and returns what it returned.
    fn eval(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn text_of(&self, selector: &str) -> String {
        let script = format!(
            "const el = document.querySelector({}); return el ? el.textContent : null;",
            json!(selector)
        );
        self.eval(&script).as_str().unwrap_or("").to_string()
    }

    /// The browser's console log since the last call: chromedriver's legacy log endpoint.
    fn console_log(&self) -> Vec<Value> {
        let body = Some(json!({"type": "browser"}));
        let path = format!("/session/{}/se/log", self.session);
        let entries = self
            .call("POST", &path, body.clone())
            .or_else(|_| self.call("POST", &format!("/session/{}/log", self.session), body))
            .unwrap_or_else(|e| panic!("cannot read the browser's console log: {e}"));
        entries.as_array().cloned().unwrap_or_default()
    }

    /// The WebDriver id of the first element matching `selector`.
    fn element(&self, selector: &str) -> String {
        let found = self.session_call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": selector})),
        );
        found["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {selector}: {found}"))
            .to_string()
    }

    fn type_into(&self, selector: &str, text: &str) {
        let id = self.element(selector);
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        );
    }

    fn click(&self, selector: &str) {
        let id = self.element(selector);
        self.session_call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn screenshot(&self, path: &std::path::Path) {
        let png = self.session_call("GET", "/screenshot", None);
        let bytes = decode_base64(png.as_str().expect("base64 text"));
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        terminate(&mut self.driver, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Standard base64 (WebDriver's screenshots), padding allowed.
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c:?}"),
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .map(value)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for group in digits.chunks(4) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | u32::from(*d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..group.len()]);
    }
    out
}

#[test]
fn base64_decodes_as_webdriver_sends_it() {
    assert_eq!(decode_base64("aGVsbG8="), b"hello");
    assert_eq!(decode_base64("aGVsbG8h"), b"hello!");
    assert_eq!(decode_base64("aGk="), b"hi");
}

/// Debian's Chromium and its WebDriver, when the machine has both (see `require`).
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = require(
        "chromium",
        "chromium",
        find_program("chromium", &["/usr/bin/chromium"]),
    )?;
    let chromedriver = require(
        "chromedriver",
        "chromium-driver",
        find_program("chromedriver", &["/usr/bin/chromedriver"]),
    )?;
    Some((chromium, chromedriver))
}

#[test]
fn the_status_page_loads_clean_in_chromium_and_its_numbers_move_under_load() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let gw = Server::start(&[
        "--workers",
        "2",
        "--queue",
        "1",
        "--mock-latency-ms",
        "8000",
        "--max-queue-wait-ms",
        "30000",
    ]);
    let browser = Browser::start(&chromium, &chromedriver);
    browser.open(&format!("http://{}/", gw.addr));
    let polled = |n: u64| {
        poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            let polls = browser.eval("return document.documentElement.dataset.polls || '0';");
            polls.as_str().and_then(|p| p.parse::<u64>().ok()) >= Some(n)
        })
    };
    assert!(polled(2), "the page never showed a status\n{}", gw.log());
    let url = browser.eval("return location.pathname;");
    assert_eq!(url, "/console/", "/ leads to the console");
    assert_eq!(browser.text_of("[data-field=workers_busy]"), "0");
    assert_eq!(browser.text_of("[data-field=workers_total]"), "2");
    assert_eq!(browser.text_of("[data-field=ready]"), "ready");
    assert!(
        !browser
            .eval("return document.getElementById('open-banner').hidden;")
            .as_bool()
            .unwrap(),
        "development mode is said in a banner"
    );
    let form =
        browser.eval("return getComputedStyle(document.getElementById('key-form')).display;");
    assert_eq!(form, "none", "no key is asked for in development mode");

    // Load: both workers busy, the queue slot taken, then refusals.
    let held = fill(&gw, 2, 1, 2);
    let mut shown = (String::new(), String::new(), String::new());
    let moved = poll_until(Duration::from_secs(6), Duration::from_millis(100), || {
        shown = (
            browser.text_of("[data-field=workers_busy]"),
            browser.text_of("[data-field=queue_depth]"),
            browser.text_of("#rejected-rows"),
        );
        shown.0 == "2" && shown.1 == "1" && shown.2.contains("queue_full2")
    });
    assert!(
        moved,
        "the page did not show the load: workers busy {:?}, queue {:?}, refused {:?}",
        shown.0, shown.1, shown.2
    );
    let oldest = browser.text_of("[data-field=oldest_wait]");
    assert!(
        oldest.ends_with(" s") || oldest.ends_with(" ms"),
        "oldest wait shown: {oldest:?}"
    );
    // The 503s reach the rate once the sampler has seen them.
    let mut rate = String::new();
    assert!(
        poll_until(Duration::from_secs(6), Duration::from_millis(100), || {
            rate = browser.text_of("[data-field=shed_per_s]");
            rate.parse::<f64>().is_ok_and(|r| r > 0.0)
        }),
        "503s/s shown: {rate:?}"
    );
    assert_eq!(browser.text_of("[data-field=ready]"), "queue_high_water");
    // Let the charts draw a few samples of the load before the picture.
    assert!(polled(6));
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/console-screenshots/status.png");
    browser.screenshot(&shot);
    println!("screenshot: {}", shot.display());

    // A marker proves the console log is read at all, so its emptiness of errors means something.
    browser.eval("console.info('syncgate-console-test-marker'); return null;");
    let problems = browser.eval("return document.documentElement.dataset.problems || '0';");
    let page_errors = browser.text_of("#page-errors");
    assert_eq!(
        problems, "0",
        "the page recorded errors or CSP violations:\n{page_errors}"
    );
    let log = browser.console_log();
    let bad: Vec<&Value> = log
        .iter()
        .filter(|e| {
            e["level"] == "SEVERE"
                || e["level"] == "WARNING"
                || e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("Content Security Policy"))
        })
        .collect();
    assert!(bad.is_empty(), "console errors or CSP reports: {bad:#?}");
    assert!(
        log.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("syncgate-console-test-marker"))),
        "the marker is not in the browser's log: {log:#?}"
    );

    // And the page does see a violation: an inline script added now is refused by the CSP,
    // reported to the page and to the log.
    browser.eval(
        "const s = document.createElement('script'); s.textContent = 'window.ran = 1'; \
         document.body.appendChild(s); return null;",
    );
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            browser.eval("return document.documentElement.dataset.problems || '0';") == "1"
        }),
        "no violation recorded: {}",
        browser.text_of("#page-errors")
    );
    assert_eq!(browser.eval("return window.ran === undefined;"), true);
    assert!(browser.text_of("#page-errors").contains("script-src"));
    let log = browser.console_log();
    assert!(
        log.iter().any(|e| e["level"] == "SEVERE"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("Content Security Policy"))),
        "the violation is not in the browser's log: {log:#?}"
    );
    // The queued call outlives the client's read timeout; how the held calls end is not
    // what this test is about.
    for h in held {
        let _ = h.join();
    }
}

#[test]
fn the_status_page_asks_for_a_key_once_keys_exist_and_shows_the_status_with_it() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let gw = Server::start_with_env(&["--workers", "3"], &[("SYNCGATE_ADMIN_KEY", ADMIN)]);
    let made = send(
        gw.addr,
        &post_req(
            "/admin/keys",
            r#"{"name": "console"}"#,
            &[
                ("Authorization", &format!("Bearer {ADMIN}")),
                ("Connection", "close"),
            ],
        ),
    );
    assert_eq!(made.status, 201, "{}", made.describe());
    let key = made.json()["key"].as_str().unwrap().to_string();

    let browser = Browser::start(&chromium, &chromedriver);
    browser.open(&format!("http://{}/console/", gw.addr));
    let form_shown = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        browser.eval("return getComputedStyle(document.getElementById('key-form')).display;")
            != "none"
    });
    assert!(form_shown, "the page did not ask for a key");
    // Long enough for two more polls, were the page still polling without a key.
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(browser.text_of("[data-field=workers_total]"), "–");
    browser.type_into("#key-input", &key);
    browser.click("#key-form button");
    let shown = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        browser.text_of("[data-field=workers_total]") == "3"
    });
    assert!(
        shown,
        "the status did not appear with the key\n{}",
        gw.log()
    );
    assert_eq!(
        browser.eval("return sessionStorage.getItem('syncgate.key');"),
        json!(key),
        "the key is kept in this tab's sessionStorage"
    );
    assert_eq!(
        browser.eval("return document.getElementById('open-banner').hidden;"),
        true,
        "no development-mode banner once keys exist"
    );
    assert_eq!(
        browser.eval("return getComputedStyle(document.getElementById('key-form')).display;"),
        "none"
    );
    // The 401 before the key was given is the only thing the browser may have logged.
    let log = browser.console_log();
    let bad: Vec<&Value> = log
        .iter()
        .filter(|e| {
            (e["level"] == "SEVERE" || e["level"] == "WARNING")
                && !e["message"].as_str().is_some_and(|m| m.contains("401"))
        })
        .collect();
    assert!(bad.is_empty(), "console errors: {bad:#?}");
    // While it waited for the key the page stopped polling: one refused poll, not one a second.
    let refused = log
        .iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.contains("401")))
        .count();
    assert_eq!(refused, 1, "{log:#?}");
    let problems = browser.eval("return document.documentElement.dataset.problems || '0';");
    assert_eq!(problems, "0", "{}", browser.text_of("#page-errors"));
}

// ---------------------------------------------------------------------------
// The requests page at a million rows
// ---------------------------------------------------------------------------

/// Rows in the generated log.
const MILLION: i64 = 1_000_000;

/// The columns a generated request-log row fills, and their values for row `x` (1..=MILLION)
/// in SQL both SQLite and PostgreSQL take: over the last 30 days, every 1000th call asked for
/// model `rare`, every 97th failed with 500, calls come from keys 1–10.
const MILLION_COLUMNS: &str = "request_id, ts_ms, method, route, model, provider, \
    upstream_model, attempts, status, error_code, total_ms, queue_ms, upstream_ms, \
    overhead_ms, prompt_tokens, completion_tokens, key_id";

fn million_values(start_ms: i64, step_ms: i64) -> String {
    format!(
        "'req-' || x, {start_ms} + x * {step_ms}, 'POST', '/v1/chat/completions', \
         CASE WHEN x % 1000 = 0 THEN 'rare' WHEN x % 2 = 0 THEN 'gpt-a' ELSE 'gpt-b' END, \
         'openai', 'gpt-4o-mini', 1, CASE WHEN x % 97 = 0 THEN 500 ELSE 200 END, \
         CASE WHEN x % 97 = 0 THEN 'upstream_error' END, 812.5, 0.2, 810.0, 2.3, \
         40 + x % 50, 120 + x % 300, 1 + x % 10"
    )
}

/// Migrates `db` (a path or a URL) with the binary, as a server would find it.
fn migrate(db: &str) {
    let exit = run_to_exit(&["migrate", "--db", db], &[], Duration::from_secs(30));
    assert!(!exit.failed(), "migrate: {}", exit.describe());
}

/// A million-row request log written straight into a migrated SQLite file, in one transaction.
fn million_row_log(db: &TempDb, now_ms: i64) {
    migrate(&db.path_str());
    let mut conn = rusqlite::Connection::open(&db.path).unwrap();
    let tx = conn.transaction().unwrap();
    let step_ms = 30 * 86_400_000 / MILLION;
    tx.execute(
        &format!(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {MILLION}) \
             INSERT INTO requests ({MILLION_COLUMNS}) SELECT {} FROM n",
            million_values(now_ms - 30 * 86_400_000, step_ms)
        ),
        [],
    )
    .unwrap();
    tx.commit().unwrap();
}

/// The same million rows in a migrated PostgreSQL database, analysed as autovacuum would.
fn million_row_log_postgres(pg: &PgDatabase, now_ms: i64) {
    migrate(&pg.url());
    let step_ms = 30 * 86_400_000 / MILLION;
    pg.execute(&format!(
        "INSERT INTO requests ({MILLION_COLUMNS}) SELECT {} \
         FROM generate_series(1::bigint, {MILLION}) AS x",
        million_values(now_ms - 30 * 86_400_000, step_ms)
    ));
    pg.execute("ANALYZE requests");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn the_requests_pages_queries_stay_fast_at_a_million_rows() {
    let db = TempDb::new();
    let now_ms = now_ms();
    let made = Instant::now();
    million_row_log(&db, now_ms);
    let size = std::fs::metadata(&db.path).map_or(0, |m| m.len());
    println!(
        "SQLite: generated {MILLION} rows in {:.1} s ({} MB)",
        made.elapsed().as_secs_f64(),
        size / 1_000_000
    );
    requests_pages_at_a_million_rows(&db.path_str(), now_ms);
}

#[test]
fn the_requests_pages_queries_stay_fast_at_a_million_rows_on_postgres() {
    let Some(pg) = fresh_postgres() else { return };
    let now_ms = now_ms();
    let made = Instant::now();
    million_row_log_postgres(&pg, now_ms);
    println!(
        "PostgreSQL: generated {MILLION} rows in {:.1} s ({} MB)",
        made.elapsed().as_secs_f64(),
        pg.query_value("SELECT pg_total_relation_size('requests') / 1000000")
    );
    requests_pages_at_a_million_rows(&pg.url(), now_ms);
}

/// The requests and usage pages' queries against a log of a million rows made at `now_ms`.
fn requests_pages_at_a_million_rows(db: &str, now_ms: i64) {
    let gw = Server::start(&["--db", db]);
    let mut conn = Conn::open(gw.addr);
    // The queries the requests page makes: always a time range and a limit.
    let (day_ago, month_ago) = (
        (now_ms - 86_400_000) / 1000,
        (now_ms - 30 * 86_400_000) / 1000,
    );
    let until = now_ms / 1000 + 60;
    let mut time = |what: &str, path: &str| -> Value {
        let mut took = Vec::new();
        let mut body = Value::Null;
        for _ in 0..5 {
            let start = Instant::now();
            let r = conn.request(&get_req(path, &[]));
            took.push(start.elapsed());
            assert_eq!(r.status, 200, "{what}: {}", r.describe());
            body = r.json();
        }
        took.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let rows = body["data"].as_array().map_or(0, Vec::len);
        println!(
            "{what}: {rows} rows, median {:.1} ms, max {:.1} ms  ({path})",
            ms(took[2]),
            ms(took[4])
        );
        // Coarse: a debug build on a busy 2-core machine. A full scan of a million rows
        // (the page going wrong) takes seconds, not this.
        assert!(took[2] < Duration::from_millis(1500), "{what}: {took:?}");
        body
    };
    let first = time(
        "first page, last 24 h",
        &format!("/api/requests?since={day_ago}&until={until}&limit=50"),
    );
    assert_eq!(first["data"].as_array().unwrap().len(), 50);
    assert_eq!(first["has_more"], true);
    let rare = time(
        "model=rare, 30 days",
        &format!("/api/requests?model=rare&since={month_ago}&until={until}&limit=50"),
    );
    assert!(rare["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["model"] == "rare"));
    time(
        "status=500, 30 days",
        &format!("/api/requests?status=500&since={month_ago}&until={until}&limit=50"),
    );
    let keyed = time(
        "key=3 and model=gpt-a, 30 days",
        &format!("/api/requests?key=3&model=gpt-a&since={month_ago}&until={until}&limit=50"),
    );
    assert!(keyed["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["key_id"] == 3 && r["model"] == "gpt-a"));
    // A deep page: the cursor is a row near the oldest end of the log.
    let deep = time(
        "deep cursor page (before id 1000), 30 days",
        &format!("/api/requests?before=1000&since={month_ago}&until={until}&limit=50"),
    );
    assert_eq!(deep["data"][0]["id"], 999);
    // The usage page's totals read every row in their range: printed, for the record.
    let week_ago = (now_ms - 7 * 86_400_000) / 1000;
    for group in ["day", "model", "key"] {
        let start = Instant::now();
        let r = conn.request(&get_req(
            &format!("/api/usage?group_by={group}&since={week_ago}&until={until}"),
            &[],
        ));
        assert_eq!(r.status, 200, "{}", r.describe());
        println!(
            "usage by {group}, last 7 days (about 233,000 rows): {:.1} ms",
            start.elapsed().as_secs_f64() * 1000.0
        );
    }
}

// ---------------------------------------------------------------------------
// Every page in a real browser
// ---------------------------------------------------------------------------

const XSS_SCRIPT: &str = "<script>window.__pwned=1</script>";
const XSS_IMG: &str = r#"<img src=x onerror="window.__pwned=1">"#;

/// Clicks the nav link of `page` and waits until its view has `ready` (a selector) filled.
fn show_page(browser: &Browser, page: &str, ready: &str) {
    browser.click(&format!("nav a[data-page={page}]"));
    let script = format!(
        "const el = document.querySelector({}); \
         return document.documentElement.dataset.page === {} && !!el && el.children.length > 0;",
        json!(ready),
        json!(page)
    );
    let shown = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        browser.eval(&script) == true
    });
    assert!(
        shown,
        "the {page} page did not fill {ready}; page errors: {}",
        browser.text_of("#page-errors")
    );
}

fn screenshot(browser: &Browser, name: &str) {
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/console-screenshots/{name}.png"));
    browser.screenshot(&shot);
    println!("screenshot: {}", shot.display());
}

/// The page's own record of errors and CSP violations, and the browser's console log, hold
/// nothing (`allowed` excepted).
fn assert_clean(browser: &Browser, allowed: &[&str]) {
    let problems = browser.eval("return document.documentElement.dataset.problems || '0';");
    assert_eq!(problems, "0", "{}", browser.text_of("#page-errors"));
    let bad: Vec<Value> = browser
        .console_log()
        .into_iter()
        .filter(|e| {
            let message = e["message"].as_str().unwrap_or("");
            (e["level"] == "SEVERE"
                || e["level"] == "WARNING"
                || message.contains("Content Security Policy"))
                && !allowed.iter().any(|a| message.contains(a))
        })
        .collect();
    assert!(bad.is_empty(), "console errors or CSP reports: {bad:#?}");
}

/// The small text file the vector stores page lists.
const KEEPER: &str = "Lighthouse keepers trim the wick every evening and log each passing ship.";

/// A vector store named `name` holding `KEEPER` as a file with `attributes`, its ingestion
/// done (by the built-in `mock` model's embeddings); the store's id and the file's.
fn store_with_a_file(gw: &Server, name: &str, attributes: Value) -> (String, String) {
    let body = multipart(
        "sgconsoleboundary",
        &[
            ("purpose", None, None, b"assistants"),
            (
                "file",
                Some("keeper.txt"),
                Some("text/plain"),
                KEEPER.as_bytes(),
            ),
        ],
    );
    let r = send(gw.addr, &upload_req("sgconsoleboundary", &body, None));
    assert_ok(&r, "POST /v1/files");
    let file = r.json()["id"].as_str().unwrap().to_string();
    let r = post_json(
        gw.addr,
        "/v1/vector_stores",
        &json!({ "name": name }).to_string(),
    );
    assert_ok(&r, "POST /v1/vector_stores");
    let store = r.json()["id"].as_str().unwrap().to_string();
    let r = post_json(
        gw.addr,
        &format!("/v1/vector_stores/{store}/files"),
        &json!({"file_id": file, "attributes": attributes}).to_string(),
    );
    assert_ok(&r, "POST /v1/vector_stores/{id}/files");
    let mut last = Value::Null;
    let ingested = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        last = get(gw.addr, &format!("/v1/vector_stores/{store}")).json();
        last["file_counts"]["completed"] == 1
    });
    assert!(
        ingested,
        "the file was not ingested: {last:#}\n{}",
        gw.log()
    );
    (store, file)
}

/// The cells' text of every row of `tbody`.
fn rows_of(browser: &Browser, tbody: &str) -> Vec<Vec<String>> {
    let script = format!(
        "return Array.from(document.querySelectorAll({})).\
         map(tr => Array.from(tr.cells).map(td => td.textContent));",
        json!(format!("{tbody} tr"))
    );
    serde_json::from_value(browser.eval(&script)).unwrap()
}

#[test]
fn every_page_loads_clean_a_key_is_made_and_revoked_and_a_hostile_prompt_stays_text() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let gw = Server::start_full(
        &["--workers", "2"],
        &[("SYNCGATE_ADMIN_KEY", ADMIN)],
        Some(TempConfig::new("[log]\nbodies = true\n")),
    );
    let prompt = format!("hello {XSS_SCRIPT} and {XSS_IMG}");
    assert_ok(&chat(gw.addr, &prompt), "the hostile prompt");
    assert_ok(&chat(gw.addr, "a plain one"), "a plain prompt");
    let logged = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        get(gw.addr, "/api/requests?limit=5").json()["data"]
            .as_array()
            .is_some_and(|d| d.len() >= 2)
    });
    assert!(logged, "the calls were never logged\n{}", gw.log());

    let browser = Browser::start(&chromium, &chromedriver);
    browser.open(&format!("http://{}/console/#requests", gw.addr));
    let started = Instant::now();
    // The two chat calls (the test's own reads of /api/requests are logged too, without a model).
    let mocks = "return Array.from(document.querySelectorAll('#rq-rows tr.clickable'))\
                 .filter(tr => tr.textContent.includes('mock'));";
    let rows = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        browser.eval(&format!(
            "{{ const f = () => {{ {mocks} }}; return f().length; }}"
        )) == 2
    });
    assert!(
        rows,
        "the requests page shows the two calls: {} {}",
        browser.text_of("#rq-rows"),
        browser.text_of("#page-errors")
    );
    screenshot(&browser, "requests");
    // The hostile call's row (newest first it is the second, but the test does not lean on
    // the order): its details show its body.
    let mut body = String::new();
    for row in 0..2 {
        browser.eval(&format!(
            "const f = () => {{ {mocks} }}; f()[{row}].id = 'row-{row}'; return null;"
        ));
        browser.click(&format!("#row-{row}"));
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            body = browser.text_of("#rq-request-body");
            body.contains("hello") || (body.contains("a plain one") && row == 0)
        });
        if body.contains("hello") {
            break;
        }
    }
    assert!(body.contains(XSS_SCRIPT), "shown literally: {body}");
    assert!(
        body.contains("<img src=x onerror="),
        "shown literally: {body}"
    );
    assert_eq!(browser.eval("return window.__pwned === undefined;"), true);
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#rq-detail img, #rq-detail script').length;"),
        0,
        "no element was made from the prompt"
    );
    assert!(browser.text_of("#rq-detail-fields").contains("mock"));
    screenshot(&browser, "requests-detail");

    // A filter that matches nothing, then back.
    browser.type_into("#rq-status", "500");
    browser.click("#rq-filter button");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            browser
                .text_of("#rq-rows")
                .contains("no logged request matches")
        }
    ));

    show_page(&browser, "usage", "#us-days");
    assert!(browser.text_of("#us-groups").contains("mock"));
    let bars = browser.eval("return document.querySelectorAll('#us-chart rect.bar-calls').length;");
    assert_eq!(bars, 7, "one bar a day over the 7 days shown");
    screenshot(&browser, "usage");
    show_page(&browser, "jobs", "#jobs-rows");
    screenshot(&browser, "jobs");
    show_page(&browser, "conversations", "#conversations-rows");
    screenshot(&browser, "conversations");

    // A vector store with a hostile name and a file with hostile attributes, then a page of
    // newer stores, so that it is on the second page. (Made now: their calls would push the
    // chat calls off the requests page's first page.)
    let hostile_attributes = json!({"team": "<b>docs</b>"});
    let (store, file) = store_with_a_file(&gw, XSS_IMG, hostile_attributes.clone());
    for n in 0..50 {
        let r = post_json(
            gw.addr,
            "/v1/vector_stores",
            &json!({ "name": format!("filler {n}") }).to_string(),
        );
        assert_ok(&r, "POST /v1/vector_stores");
    }
    // Vector stores, newest first: the first page holds the 50 newer ones, "more" brings the
    // hostile one, whose name stays text; a click lists its file.
    show_page(&browser, "vector-stores", "#vs-rows");
    let first = rows_of(&browser, "#vs-rows");
    assert_eq!(first.len(), 50, "{first:?}");
    assert_eq!(first[0][1], "filler 49", "newest first: {first:?}");
    assert!(!first.iter().any(|r| r[0] == store), "{first:?}");
    screenshot(&browser, "vector-stores");
    browser.click("#vs-more");
    let row = format!("#vs-rows tr[data-id={}]", json!(store));
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            browser.eval(&format!("return !!document.querySelector({});", json!(row))) == true
        }),
        "\"more\" did not show the store {store}: {:?} {}",
        rows_of(&browser, "#vs-rows").last(),
        browser.text_of("#page-errors")
    );
    assert_eq!(rows_of(&browser, "#vs-rows").len(), 51);
    assert_eq!(
        browser.eval("return document.getElementById('vs-more').disabled;"),
        true
    );
    let shown = rows_of(&browser, "#vs-rows").pop().unwrap();
    assert_eq!(shown[1], XSS_IMG, "the name shown literally: {shown:?}");
    assert_eq!(shown[2], "completed", "{shown:?}");
    assert_eq!(shown[3], "1 / 0 / 0 / 0 / 1", "file counts: {shown:?}");
    browser.click(&row);
    let mut files = Vec::new();
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            files = rows_of(&browser, "#vs-files");
            files.first().is_some_and(|f| f[0] == file)
        }),
        "the store's file is not listed: {files:?} {}",
        browser.text_of("#page-errors")
    );
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0][1], "completed", "{files:?}");
    assert_ne!(files[0][2], "0", "usage bytes: {files:?}");
    assert_eq!(files[0][5], hostile_attributes.to_string(), "{files:?}");
    assert_eq!(browser.text_of("#vs-detail-name"), XSS_IMG);
    assert_eq!(
        browser.eval("return document.querySelectorAll('#page-vector-stores img, #page-vector-stores b').length;"),
        0,
        "no element was made from the name or the attributes"
    );
    assert_eq!(browser.eval("return window.__pwned === undefined;"), true);
    screenshot(&browser, "vector-store-files");
    show_page(&browser, "status", "#provider-rows");
    assert_clean(&browser, &[]);

    // Instances need the admin key: the page asks for it, and a wrong one is refused.
    browser.click("nav a[data-page=instances]");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || browser.eval("return document.getElementById('inst-admin-form').hidden;") == false
    ));
    browser.type_into("#inst-admin-input", "sk-sg-not-the-admin-key");
    browser.click("#inst-admin-form button");
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            browser.text_of("#problem").contains("refused")
        }),
        "the wrong admin key was not refused: {:?}",
        browser.text_of("#problem")
    );
    assert!(rows_of(&browser, "#inst-rows").is_empty());
    assert_eq!(
        browser.eval("return sessionStorage.getItem('syncgate.admin');"),
        Value::Null,
        "a refused admin key is forgotten"
    );

    // Keys: the admin key is asked for, a key is made (its secret shown once) and revoked.
    browser.click("nav a[data-page=keys]");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || { browser.eval("return document.getElementById('admin-form').hidden;") == false }
    ));
    browser.type_into("#admin-input", ADMIN);
    browser.click("#admin-form button");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || { browser.text_of("#keys-rows").contains("no key yet") }
    ));
    let name = "<b>ops</b> team";
    browser.type_into("#kc-name", name);
    browser.type_into("#kc-rpm", "60");
    browser.click("#kc-form button");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || { browser.text_of("#keys-rows").contains(name) }
    ));
    let secret = browser.text_of("#kc-secret-value");
    assert!(
        secret.starts_with("sk-sg-"),
        "the secret is shown: {secret:?}"
    );
    assert_eq!(
        browser.eval("return document.querySelectorAll('#keys-rows b').length;"),
        0,
        "the key's name stays text"
    );
    assert!(browser.text_of("#keys-rows tr").contains("active"));
    screenshot(&browser, "keys");
    // The new key works, until it is revoked.
    let as_key = |k: &str| {
        send(
            gw.addr,
            &chat_req(
                "with the key",
                &[
                    ("Authorization", &format!("Bearer {k}")),
                    ("Connection", "close"),
                ],
            ),
        )
        .status
    };
    assert_eq!(as_key(&secret), 200);
    browser.click("#keys-rows button.revoke");
    assert_eq!(
        browser.text_of("#keys-rows button.revoke"),
        "really revoke?"
    );
    browser.click("#keys-rows button.revoke");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || { browser.text_of("#keys-rows tr").contains("revoked") }
    ));
    assert_eq!(as_key(&secret), 401, "revoked through the page");
    // Opening the page again does not show the secret again. A key was made, so the server
    // left development mode: the jobs page is refused without a key, and asks for one.
    show_page(&browser, "jobs", "#jobs-rows");
    assert_eq!(
        browser.eval("return document.getElementById('key-form').hidden;"),
        false
    );
    show_page(&browser, "keys", "#keys-rows");
    assert_eq!(browser.text_of("#kc-secret-value"), "");

    // With the admin key held, the instances page lists this instance: SQLite, so only it,
    // answering, at the server's listen address, with no lease.
    show_page(&browser, "instances", "#inst-rows");
    let instances = rows_of(&browser, "#inst-rows");
    assert_eq!(instances.len(), 1, "{instances:?}");
    let me = &instances[0];
    assert!(me[0].starts_with("inst"), "the instance's id: {me:?}");
    assert_eq!(me[1], "this one", "{me:?}");
    assert_eq!(me[3], gw.addr.to_string(), "the listen address: {me:?}");
    assert_eq!(me[4], env!("CARGO_PKG_VERSION"), "{me:?}");
    assert_eq!(me[7], "–", "no lease on SQLite: {me:?}");
    assert!(
        browser.text_of("#inst-info").contains("SQLite"),
        "{}",
        browser.text_of("#inst-info")
    );
    assert_eq!(
        browser.eval("return document.getElementById('inst-admin-form').hidden;"),
        true
    );
    screenshot(&browser, "instances");
    // The vector stores page now reads with the admin key: every key's stores, so still the
    // one made without a key, though keys exist now.
    browser.click("nav a[data-page=vector-stores]");
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            browser.text_of("#vs-info").contains("the admin key")
        }),
        "{}",
        browser.text_of("#vs-info")
    );
    assert_eq!(rows_of(&browser, "#vs-rows").len(), 50);
    assert_clean(
        &browser,
        &[
            "/api/jobs?limit=100 - Failed to load resource: the server responded with a status of 401",
            "/admin/instances - Failed to load resource: the server responded with a status of 401",
        ],
    );
    println!("every page in {:.1} s", started.elapsed().as_secs_f64());
}
