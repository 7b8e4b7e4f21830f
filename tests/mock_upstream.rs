//! `syncgate mock-upstream`, the fake provider: its OpenAI shapes, every fault (from the flag and
//! from the header), and what `/stats` and `/requests` report, including clients that leave.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

/// How long a test waits to conclude that the mock stays silent.
const SILENCE: Duration = Duration::from_millis(800);
/// How soon `/stats` must see a client that left.
const NOTICE: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// A raw client that reads a response piece by piece, timing each piece
// ---------------------------------------------------------------------------

/// What came next on a connection.
#[derive(Debug, PartialEq)]
enum Next {
    /// One chunk of a chunked body (one SSE event), and when its last byte arrived.
    Chunk(String, Instant),
    /// The chunked body's terminating zero-size chunk.
    End,
    /// The mock closed the connection.
    Eof,
    /// The mock reset the connection.
    Reset,
    /// Nothing arrived within the wait.
    Silent,
}

struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    last_read: Instant,
}

impl Raw {
    fn open(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
            last_read: Instant::now(),
        }
    }

    /// Opens a connection and writes `raw` on it.
    fn send(addr: SocketAddr, raw: &[u8]) -> Raw {
        let mut c = Raw::open(addr);
        c.stream.write_all(raw).unwrap();
        c
    }

    /// One read, waiting until `deadline`; `Err` says why nothing was appended.
    fn fill(&mut self, deadline: Instant) -> Result<(), Next> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Next::Silent);
        }
        self.stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(Next::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.last_read = Instant::now();
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(Next::Silent)
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(Next::Reset),
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// Reads a response head: status and headers (names lower-cased).
    fn head(&mut self) -> (u16, Vec<(String, String)>) {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut fields);
            if let Ok(httparse::Status::Complete(n)) = r.parse(&self.buf) {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value).into_owned();
                        (h.name.to_ascii_lowercase(), value)
                    })
                    .collect();
                let status = r.code.unwrap_or(0);
                self.buf.drain(..n);
                return (status, headers);
            }
            if let Err(next) = self.fill(deadline) {
                panic!("no response head ({next:?}); got {}", preview(&self.buf));
            }
        }
    }

    /// The next chunk of a chunked body, waiting at most `wait` for it.
    fn next_chunk(&mut self, wait: Duration) -> Next {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let size_line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                let size = usize::from_str_radix(size_line.trim(), 16)
                    .unwrap_or_else(|e| panic!("bad chunk size {size_line:?}: {e}"));
                let needed = i + 2 + size + 2;
                if self.buf.len() >= needed {
                    let data = String::from_utf8_lossy(&self.buf[i + 2..i + 2 + size]).into_owned();
                    self.buf.drain(..needed);
                    return if size == 0 {
                        Next::End
                    } else {
                        Next::Chunk(data, self.last_read)
                    };
                }
            }
            if let Err(next) = self.fill(deadline) {
                return next;
            }
        }
    }

    /// Every chunk until the stream stops (end, close, reset or `wait` of silence).
    fn chunks(&mut self, wait: Duration) -> (Vec<(String, Instant)>, Next) {
        let mut chunks = Vec::new();
        loop {
            match self.next_chunk(wait) {
                Next::Chunk(data, at) => chunks.push((data, at)),
                end => return (chunks, end),
            }
        }
    }

    /// The body bytes that arrive until the mock goes quiet for `wait`, closes or resets.
    fn bytes_until_quiet(&mut self, wait: Duration) -> (Vec<u8>, Next) {
        loop {
            if let Err(next) = self.fill(Instant::now() + wait) {
                return (std::mem::take(&mut self.buf), next);
            }
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The JSON of an SSE event `data: {...}\n\n`.
fn event_json(event: &str) -> Value {
    let data = event
        .strip_prefix("data: ")
        .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"))
        .trim_end();
    serde_json::from_str(data).unwrap_or_else(|e| panic!("event is not JSON ({e}): {event:?}"))
}

fn is_done(event: &str) -> bool {
    event == "data: [DONE]\n\n"
}

fn chat_json(model: &str, text: &str, stream: bool, include_usage: bool) -> String {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    if stream {
        body["stream"] = json!(true);
    }
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body.to_string()
}

fn chat_post(body: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    post_req("/v1/chat/completions", body, headers)
}

fn stream_req(text: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    chat_post(&chat_json("gpt-test", text, true, false), headers)
}

fn stats(addr: SocketAddr) -> Value {
    let r = get(addr, "/stats");
    assert_ok(&r, "GET /stats");
    r.json()
}

/// Polls `/stats` until `field` reaches `want`, for at most `within`; returns how long it took.
fn wait_for_stat(addr: SocketAddr, field: &str, want: u64, within: Duration) -> Duration {
    let start = Instant::now();
    let mut last = Value::Null;
    let seen = poll_until(within, Duration::from_millis(10), || {
        last = stats(addr);
        last[field] == want
    });
    assert!(
        seen,
        "expected /stats {field} = {want} within {within:?}; last /stats: {last}"
    );
    start.elapsed()
}

/// The content pieces of a stream's chunks, and the JSON of the others.
fn contents(events: &[(String, Instant)]) -> Vec<String> {
    events
        .iter()
        .filter(|(e, _)| !is_done(e))
        .map(|(e, _)| event_json(e))
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .filter(|c| !c.is_empty())
        .collect()
}

// ---------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------

#[test]
fn chat_answers_a_completion_for_the_requested_model_with_usage() {
    let mock = Server::start_mock_upstream(&[]);
    let mut conn = Conn::open(mock.addr);
    for text in ["hello mock", "again, on the same connection"] {
        let r = conn.request(&chat_post(
            &chat_json("gpt-4o-mini", text, false, false),
            &[],
        ));
        assert_ok(&r, "chat");
        let v = r.json();
        assert_eq!(v["object"], "chat.completion", "{v}");
        assert_eq!(v["model"], "gpt-4o-mini", "{v}");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(content.contains(text), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let usage = &v["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap(),
            "{v}"
        );
    }
}

#[test]
fn chat_with_bad_json_or_missing_fields_is_a_400_in_openai_shape() {
    let mock = Server::start_mock_upstream(&[]);
    let r = post_json(mock.addr, "/v1/chat/completions", "{\"model\": ");
    assert_error(&r, 400, Some("invalid_request_error"), Some("invalid_json"));
    let r = post_json(mock.addr, "/v1/chat/completions", r#"{"model":"m"}"#);
    let e = assert_error(&r, 400, None, Some("invalid_request"));
    assert!(e["message"].as_str().unwrap().contains("messages"), "{e}");
    let r = post_json(mock.addr, "/v1/embeddings", r#"{"model":"m"}"#);
    assert_error(&r, 400, None, Some("invalid_request"));
}

#[test]
fn streamed_chat_sends_each_event_on_its_own_spaced_by_the_interval() {
    let interval = Duration::from_millis(150);
    let mock =
        Server::start_mock_upstream(&["--stream-chunks", "5", "--stream-interval-ms", "150"]);
    let text = "one two three four five six seven eight";
    let plain = chat(mock.addr, text).json();
    let mut c = Raw::send(mock.addr, &stream_req(text, &[]));
    let (status, headers) = c.head();
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&headers, "transfer-encoding"), Some("chunked"));
    let (events, end) = c.chunks(IO_TIMEOUT);
    assert_eq!(end, Next::End, "the stream must end cleanly");
    // role, 5 content chunks, finish, [DONE]
    assert_eq!(events.len(), 8, "{events:#?}");
    assert!(is_done(&events[7].0), "[DONE] must come last: {events:#?}");
    let role = event_json(&events[0].0);
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(role["model"], "gpt-test");
    let pieces = contents(&events);
    assert_eq!(pieces.len(), 5, "{pieces:?}");
    assert_eq!(
        pieces.concat(),
        plain["choices"][0]["message"]["content"].as_str().unwrap(),
        "the streamed pieces must rebuild the plain reply"
    );
    let finish = event_json(&events[6].0);
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");

    // Sent one by one, an interval apart: most gaps are near the interval (a busy machine may
    // merge a few reads), and the whole stream takes about 7 intervals.
    let gaps: Vec<Duration> = events.windows(2).map(|w| w[1].1 - w[0].1).collect();
    let spaced = gaps.iter().filter(|g| **g >= interval / 2).count();
    assert!(spaced >= 5, "events arrived batched, gaps {gaps:?}");
    let span = events[7].1 - events[0].1;
    assert!(span >= interval * 7 * 8 / 10, "stream took only {span:?}");
}

#[test]
fn streamed_chat_with_include_usage_sends_a_usage_chunk_before_done() {
    let mock = Server::start_mock_upstream(&["--stream-chunks", "3"]);
    let mut c = Raw::send(
        mock.addr,
        &chat_post(&chat_json("m", "hi", true, true), &[]),
    );
    assert_eq!(c.head().0, 200);
    let (events, end) = c.chunks(IO_TIMEOUT);
    assert_eq!(end, Next::End);
    assert_eq!(events.len(), 1 + 3 + 1 + 1 + 1, "{events:#?}");
    assert!(is_done(&events[6].0));
    let usage = event_json(&events[5].0);
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert!(
        usage["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{usage}"
    );

    let mut c = Raw::send(
        mock.addr,
        &chat_post(&chat_json("m", "hi", true, false), &[]),
    );
    c.head();
    let (events, _) = c.chunks(IO_TIMEOUT);
    assert!(
        events.iter().all(|(e, _)| !e.contains("\"usage\"")),
        "no usage chunk unless asked: {events:#?}"
    );
}

#[test]
fn embeddings_are_deterministic_unit_vectors_sized_by_dimensions() {
    let mock = Server::start_mock_upstream(&[]);
    let embed = |body: Value| {
        let r = post_json(mock.addr, "/v1/embeddings", &body.to_string());
        assert_ok(&r, "embeddings");
        r.json()
    };
    let a = embed(json!({"model": "text-embedding-3-small", "input": "hello"}));
    assert_eq!(a["object"], "list");
    assert_eq!(a["model"], "text-embedding-3-small");
    assert_eq!(a["data"][0]["object"], "embedding");
    assert_eq!(a["data"][0]["index"], 0);
    let v: Vec<f64> = serde_json::from_value(a["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v.len(), 16);
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(a["usage"]["prompt_tokens"], a["usage"]["total_tokens"]);

    let again = embed(json!({"model": "e", "input": ["hello", "world"], "dimensions": 8}));
    let data = again["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    let same = embed(json!({"model": "e", "input": ["hello"], "dimensions": 8}));
    assert_eq!(
        same["data"][0]["embedding"], data[0]["embedding"],
        "deterministic"
    );

    let b64 = embed(json!({"model": "e", "input": "hello", "encoding_format": "base64"}));
    // 16 f32s are 64 bytes: 88 base64 characters.
    assert_eq!(
        b64["data"][0]["embedding"].as_str().unwrap().len(),
        88,
        "{b64}"
    );
}

#[test]
fn models_lists_fixed_ids_and_the_models_requests_asked_for() {
    let mock = Server::start_mock_upstream(&[]);
    assert_ok(&chat(mock.addr, "hi"), "chat");
    let r = get(mock.addr, "/v1/models");
    assert_ok(&r, "models");
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mock-gpt", "mock-embed", "mock"], "{v}");
    assert_eq!(v["data"][0]["object"], "model");
}

#[test]
fn unknown_routes_are_404_and_wrong_methods_405_in_openai_shape() {
    let mock = Server::start_mock_upstream(&[]);
    assert_error(
        &get(mock.addr, "/v1/nope"),
        404,
        None,
        Some("unknown_route"),
    );
    assert_error(
        &get(mock.addr, "/elsewhere"),
        404,
        None,
        Some("unknown_route"),
    );
    let r = get(mock.addr, "/v1/chat/completions");
    assert_error(&r, 405, None, Some("method_not_allowed"));
    assert_eq!(r.header("allow"), Some("POST"));
    assert_error(
        &post_json(mock.addr, "/stats", "{}"),
        405,
        None,
        Some("method_not_allowed"),
    );
    assert_error(
        &get(mock.addr, "/reset"),
        405,
        None,
        Some("method_not_allowed"),
    );
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

#[test]
fn status_fault_answers_that_status_with_an_openai_error() {
    let mock = Server::start_mock_upstream(&["--fault", "status=503"]);
    let r = chat(mock.addr, "hi");
    let e = assert_error(&r, 503, Some("server_error"), Some("mock_fault"));
    assert!(e["message"].as_str().unwrap().contains("503"), "{e}");
    assert_eq!(r.header("retry-after"), None);

    let req = chat_req(
        "hi",
        &[
            ("x-mock-fault", "status=429,retry-after=7"),
            ("Connection", "close"),
        ],
    );
    let r = send(mock.addr, &req);
    assert_error(&r, 429, Some("rate_limit_error"), Some("mock_fault"));
    assert_eq!(r.header("retry-after"), Some("7"));
}

#[test]
fn status_fault_comes_instead_of_a_stream() {
    let mock = Server::start_mock_upstream(&[]);
    let r = send(
        mock.addr,
        &stream_req("hi", &[("x-mock-fault", "status=500")]),
    );
    assert_error(&r, 500, Some("server_error"), Some("mock_fault"));
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[test]
fn hang_fault_reads_the_request_and_never_answers() {
    let mock = Server::start_mock_upstream(&["--fault", "hang"]);
    let mut c = Raw::send(mock.addr, &chat_req("hi", &[]));
    let (bytes, next) = c.bytes_until_quiet(SILENCE);
    assert_eq!(next, Next::Silent, "got {}", preview(&bytes));
    assert!(bytes.is_empty(), "got {}", preview(&bytes));
    let s = stats(mock.addr);
    assert_eq!(
        (s["requests"].as_u64(), s["in_flight"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
}

#[test]
fn latency_and_slow_head_delay_the_head() {
    let mock = Server::start_mock_upstream(&["--latency-ms", "300"]);
    let start = Instant::now();
    assert_ok(&chat(mock.addr, "hi"), "delayed chat");
    let plain = start.elapsed();
    assert!(
        plain >= Duration::from_millis(300),
        "latency not applied: {plain:?}"
    );

    let start = Instant::now();
    let r = send(
        mock.addr,
        &chat_req(
            "hi",
            &[("x-mock-fault", "slow-head=600"), ("Connection", "close")],
        ),
    );
    assert_ok(&r, "slow-head chat");
    let slow = start.elapsed();
    assert!(
        slow >= Duration::from_millis(900),
        "slow-head adds to the latency: {slow:?}"
    );
    assert!(slow < Duration::from_secs(8), "{slow:?}");
}

#[test]
fn stall_after_sends_k_content_chunks_then_silence() {
    let mock = Server::start_mock_upstream(&["--stream-chunks", "8"]);
    let mut c = Raw::send(
        mock.addr,
        &stream_req("a b c d e f g h i j", &[("x-mock-fault", "stall-after=3")]),
    );
    assert_eq!(c.head().0, 200);
    let (events, next) = c.chunks(SILENCE);
    assert_eq!(next, Next::Silent, "{events:#?}");
    assert_eq!(
        events.len(),
        4,
        "role chunk and 3 content chunks: {events:#?}"
    );
    assert_eq!(contents(&events).len(), 3);
}

#[test]
fn stall_after_on_a_plain_reply_sends_k_body_bytes_then_silence() {
    let mock = Server::start_mock_upstream(&["--fault", "stall-after=10"]);
    let mut c = Raw::send(mock.addr, &chat_req("hi", &[]));
    let (status, headers) = c.head();
    assert_eq!(status, 200);
    let length: usize = header(&headers, "content-length").unwrap().parse().unwrap();
    assert!(length > 10);
    let (bytes, next) = c.bytes_until_quiet(SILENCE);
    assert_eq!(next, Next::Silent);
    assert_eq!(bytes.len(), 10, "got {}", preview(&bytes));
}

#[test]
fn truncate_after_ends_a_stream_after_k_chunks_without_done() {
    let mock = Server::start_mock_upstream(&[]);
    let mut c = Raw::send(
        mock.addr,
        &stream_req("hi", &[("x-mock-fault", "truncate-after=2")]),
    );
    assert_eq!(c.head().0, 200);
    let (events, next) = c.chunks(IO_TIMEOUT);
    assert_eq!(
        next,
        Next::Eof,
        "closed without ending the chunked body: {events:#?}"
    );
    assert_eq!(
        events.len(),
        3,
        "role chunk and 2 content chunks: {events:#?}"
    );
    assert!(events
        .iter()
        .all(|(e, _)| !is_done(e) && !e.contains("finish_reason\":\"stop")));
}

#[test]
fn truncate_after_on_a_plain_reply_closes_after_half_the_body() {
    let mock = Server::start_mock_upstream(&["--fault", "truncate-after=1"]);
    let mut c = Raw::send(mock.addr, &chat_req("hi", &[]));
    let (status, headers) = c.head();
    assert_eq!(status, 200);
    let length: usize = header(&headers, "content-length").unwrap().parse().unwrap();
    let (bytes, next) = c.bytes_until_quiet(IO_TIMEOUT);
    assert_eq!(next, Next::Eof);
    assert_eq!(bytes.len(), length / 2, "got {}", preview(&bytes));
}

#[test]
fn malformed_plain_reply_is_a_200_with_invalid_json() {
    let mock = Server::start_mock_upstream(&["--fault", "malformed"]);
    let r = chat(mock.addr, "hi");
    assert_ok(&r, "malformed chat");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(
        serde_json::from_slice::<Value>(&r.body).is_err(),
        "{}",
        r.describe()
    );
    assert!(!r.body.is_empty());
}

#[test]
fn malformed_stream_carries_invalid_json_in_its_events() {
    let mock = Server::start_mock_upstream(&["--stream-chunks", "3"]);
    let mut c = Raw::send(
        mock.addr,
        &stream_req("hi", &[("x-mock-fault", "malformed")]),
    );
    assert_eq!(c.head().0, 200);
    let (events, end) = c.chunks(IO_TIMEOUT);
    assert_eq!(end, Next::End);
    assert!(events.len() >= 5, "{events:#?}");
    for (e, _) in &events[..events.len() - 1] {
        let data = e
            .strip_prefix("data: ")
            .expect("SSE framing stays valid")
            .trim_end();
        assert!(
            serde_json::from_str::<Value>(data).is_err(),
            "valid JSON in {e:?}"
        );
    }
}

#[test]
fn reset_fault_resets_the_connection_without_sending_a_byte() {
    let mock = Server::start_mock_upstream(&[]);
    let mut c = Raw::send(mock.addr, &chat_req("hi", &[("x-mock-fault", "reset")]));
    let (bytes, next) = c.bytes_until_quiet(IO_TIMEOUT);
    assert!(bytes.is_empty(), "got {}", preview(&bytes));
    assert!(matches!(next, Next::Reset | Next::Eof), "{next:?}");
    assert_eq!(stats(mock.addr)["requests"], 1);
}

#[test]
fn error_event_ends_a_stream_with_an_error_event_and_no_done() {
    let mock = Server::start_mock_upstream(&["--fault", "error-event"]);
    let mut c = Raw::send(mock.addr, &stream_req("hi", &[]));
    assert_eq!(c.head().0, 200);
    let (events, end) = c.chunks(IO_TIMEOUT);
    assert_eq!(end, Next::End);
    assert_eq!(
        events.len(),
        3,
        "role, one content chunk, the error: {events:#?}"
    );
    let error = event_json(&events[2].0);
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    assert_eq!(error["error"]["code"], "mock_error", "{error}");
    assert!(error["error"]["message"].is_string());
}

#[test]
fn error_event_on_a_plain_reply_is_a_500() {
    let mock = Server::start_mock_upstream(&["--fault", "error-event"]);
    assert_error(
        &chat(mock.addr, "hi"),
        500,
        Some("server_error"),
        Some("mock_fault"),
    );
}

#[test]
fn the_header_fault_overrides_the_flag_fault() {
    let mock = Server::start_mock_upstream(&["--fault", "status=503"]);
    let mut conn = Conn::open(mock.addr);
    assert_ok(
        &conn.request(&chat_req("hi", &[("x-mock-fault", "none")])),
        "fault lifted",
    );
    let r = conn.request(&chat_req("hi", &[("X-Mock-Fault", "status=418")]));
    assert_error(&r, 418, None, Some("mock_fault"));
    assert_error(
        &conn.request(&chat_req("hi", &[])),
        503,
        None,
        Some("mock_fault"),
    );
}

#[test]
fn an_invalid_fault_flag_refuses_to_start_with_a_message() {
    for (spec, says) in [("explode", "expected one of"), ("status=200", "400 to 599")] {
        let exit = run_to_exit(
            &["mock-upstream", "--listen", "127.0.0.1:0", "--fault", spec],
            &[],
            EXIT_DEADLINE,
        );
        assert!(
            exit.failed() && !exit.started_serving,
            "{}",
            exit.describe()
        );
        assert!(
            exit.stderr.contains(spec) && exit.stderr.contains(says),
            "expected a message naming {spec:?} and saying {says:?}; {}",
            exit.describe()
        );
    }
}

#[test]
fn an_invalid_fault_header_is_a_400_naming_the_spec() {
    let mock = Server::start_mock_upstream(&[]);
    let r = send(
        mock.addr,
        &chat_req(
            "hi",
            &[
                ("x-mock-fault", "stall-after=soon"),
                ("Connection", "close"),
            ],
        ),
    );
    let e = assert_error(
        &r,
        400,
        Some("invalid_request_error"),
        Some("invalid_fault"),
    );
    assert!(
        e["message"].as_str().unwrap().contains("stall-after=soon"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// /stats, /requests, /reset
// ---------------------------------------------------------------------------

#[test]
fn stats_counts_every_api_request_by_path() {
    let mock = Server::start_mock_upstream(&[]);
    let mut conn = Conn::open(mock.addr);
    conn.request(&chat_req("hi", &[]));
    conn.request(&chat_req("hi", &[("x-mock-fault", "status=500")]));
    conn.request(&post_req(
        "/v1/embeddings",
        r#"{"model":"e","input":"x"}"#,
        &[],
    ));
    conn.request(&get_req("/v1/models", &[]));
    conn.request(&get_req("/v1/unknown", &[]));
    conn.request(&get_req("/stats", &[]));
    let s = stats(mock.addr);
    assert_eq!(s["requests"], 5, "{s}");
    assert_eq!(s["client_closed"], 0, "{s}");
    assert_eq!(s["in_flight"], 0, "{s}");
    assert_eq!(
        s["by_path"],
        json!({"/v1/chat/completions": 2, "/v1/embeddings": 1, "/v1/models": 1, "other": 1}),
        "{s}"
    );
}

#[test]
fn stats_sees_a_client_leave_mid_hang_within_a_second() {
    let mock = Server::start_mock_upstream(&["--fault", "hang"]);
    let c = Raw::send(mock.addr, &chat_req("hi", &[]));
    wait_for_stat(mock.addr, "in_flight", 1, IO_TIMEOUT);
    drop(c);
    wait_for_stat(mock.addr, "client_closed", 1, NOTICE);
    assert_eq!(stats(mock.addr)["in_flight"], 0);
}

#[test]
fn stats_sees_a_client_leave_mid_stream_within_a_second() {
    let mock =
        Server::start_mock_upstream(&["--stream-chunks", "100", "--stream-interval-ms", "200"]);
    let mut c = Raw::send(mock.addr, &stream_req("hi", &[]));
    assert_eq!(c.head().0, 200);
    assert!(matches!(c.next_chunk(IO_TIMEOUT), Next::Chunk(..)));
    assert!(matches!(c.next_chunk(IO_TIMEOUT), Next::Chunk(..)));
    drop(c);
    wait_for_stat(mock.addr, "client_closed", 1, NOTICE);
}

#[test]
fn stats_sees_a_client_leave_during_the_latency_wait_and_mid_stall() {
    let mock = Server::start_mock_upstream(&["--latency-ms", "60000"]);
    let c = Raw::send(mock.addr, &chat_req("hi", &[]));
    wait_for_stat(mock.addr, "in_flight", 1, IO_TIMEOUT);
    drop(c);
    wait_for_stat(mock.addr, "client_closed", 1, NOTICE);

    let mock = Server::start_mock_upstream(&["--fault", "stall-after=1"]);
    let mut c = Raw::send(mock.addr, &stream_req("hi", &[]));
    c.head();
    assert!(matches!(c.next_chunk(IO_TIMEOUT), Next::Chunk(..)));
    drop(c);
    wait_for_stat(mock.addr, "client_closed", 1, NOTICE);
}

#[test]
fn requests_shows_the_forwarded_body_and_headers_newest_last() {
    let mock = Server::start_mock_upstream(&[]);
    let body = json!({
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.25, "vendor_extension": {"nested": [1, 2, 3]},
    });
    let mut conn = Conn::open(mock.addr);
    conn.request(&get_req("/v1/models", &[]));
    let r = conn.request(&chat_post(
        &body.to_string(),
        &[
            ("Authorization", "Bearer sk-test-123"),
            ("X-Trace-Id", "abc"),
        ],
    ));
    assert_ok(&r, "chat");
    let log = get(mock.addr, "/requests").json();
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 2, "{log:#?}");
    assert_eq!(log[0]["path"], "/v1/models");
    assert_eq!(log[0]["body"], Value::Null);
    let last = &log[1];
    assert_eq!(last["method"], "POST");
    assert_eq!(last["path"], "/v1/chat/completions");
    assert_eq!(last["body"], body, "the body as received");
    assert_eq!(
        last["headers"]["authorization"], "Bearer sk-test-123",
        "{last}"
    );
    assert_eq!(last["headers"]["x-trace-id"], "abc", "{last}");

    for i in 0..105 {
        conn.request(&get_req(&format!("/v1/models/m{i}"), &[]));
    }
    let log = get(mock.addr, "/requests").json();
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 100);
    assert_eq!(log[99]["path"], "/v1/models/m104");
}

#[test]
fn reset_zeroes_the_stats_and_empties_the_log() {
    let mock = Server::start_mock_upstream(&[]);
    assert_ok(&chat(mock.addr, "hi"), "chat");
    assert_eq!(stats(mock.addr)["requests"], 1);
    let r = post_json(mock.addr, "/reset", "");
    assert_ok(&r, "reset");
    let s = stats(mock.addr);
    assert_eq!(
        (s["requests"].as_u64(), s["client_closed"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert_eq!(s["by_path"], json!({}));
    assert_eq!(get(mock.addr, "/requests").json(), json!([]));
}

#[test]
fn sigterm_stops_the_mock_at_once_even_while_it_holds_a_connection() {
    let mut mock = Server::start_mock_upstream(&["--fault", "hang"]);
    let mut c = Raw::send(mock.addr, &chat_req("hi", &[]));
    wait_for_stat(mock.addr, "in_flight", 1, IO_TIMEOUT);
    mock.signal(libc::SIGTERM);
    let status = mock.wait_exit(Duration::from_secs(3));
    assert!(
        status.is_some_and(|s| s.success()),
        "expected exit 0 within 3 s, got {status:?}\n{}",
        mock.log()
    );
    let (bytes, next) = c.bytes_until_quiet(IO_TIMEOUT);
    assert!(
        bytes.is_empty() && matches!(next, Next::Eof | Next::Reset),
        "{next:?}"
    );
}
