//! HTTP front end: size/shape limits (414, 431, 413, 400, 501, 408) and when they are answered, head deadlines, chunked request bodies, pipelining, HTTP/1.0 and connection closing. Framing refusals in detail: tests/http_framing.rs.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Writes `raw` (a write error is noted, not fatal: the server may answer early and close) and reads
/// one response.
fn send_on(conn: &mut Conn, raw: &[u8]) -> Resp {
    let write_err = conn.write_all(raw).err();
    conn.read_response().unwrap_or_else(|e| {
        panic!(
            "expected a response; reading failed: {e}\n(write error: {write_err:?})\nrequest: {}",
            preview(raw)
        )
    })
}

/// The spec says the server closes after this response: it must say so, then close.
fn assert_announced_close(conn: &mut Conn, resp: &Resp) {
    assert!(
        resp.closes(),
        "expected `Connection: close` on a response after which the server closes; got:\n{}",
        resp.describe()
    );
    conn.assert_closed();
}

/// Either the response announced `Connection: close` and the server closes, or the connection is
/// still usable for another request.
fn assert_connection_consistent(conn: &mut Conn, resp: &Resp) {
    if resp.closes() {
        conn.assert_closed();
        return;
    }
    let r = conn.try_request(&get_req("/healthz", &[])).unwrap_or_else(|e| {
        panic!(
            "the response did not carry `Connection: close`, so the connection should still work, but /healthz on it failed: {e}\nprevious response:\n{}",
            resp.describe()
        )
    });
    assert_ok(
        &r,
        "GET /healthz on the same connection after the rejection",
    );
}

fn assert_healthy(srv: &Server) {
    let r = get(srv.addr, "/healthz");
    assert_ok(&r, "GET /healthz on a new connection after the limit test");
    assert_eq!(
        r.json(),
        serde_json::json!({"status": "ok"}),
        "unexpected /healthz body"
    );
}

#[test]
fn request_line_over_8_kib_answers_414() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let path = format!("/healthz?pad={}", "a".repeat(9 * 1024));
    let r = send_on(&mut conn, &get_req(&path, &[]));
    assert_error(&r, 414, None, Some("request_line_too_long"));
    assert_connection_consistent(&mut conn, &r);
    assert_healthy(&srv);
}

#[test]
fn request_line_of_exactly_8_kib_is_answered() {
    let srv = Server::start(&[]);
    let pad = "a".repeat(8 * 1024 - "GET /healthz?pad= HTTP/1.1".len());
    let raw = get_req(&format!("/healthz?pad={pad}"), &[]);
    let line_len = raw
        .iter()
        .position(|&b| b == b'\r')
        .expect("a request line");
    assert_eq!(line_len, 8 * 1024);
    assert_ok(&send(srv.addr, &raw), "a request line of exactly 8 KiB");
}

/// Issue 13: the 414 goes out at the byte that crosses 8 KiB, not when more bytes (or the head
/// deadline) come; the client here sends nothing more and keeps its side open.
#[test]
fn request_line_crossing_8_kib_answers_414_within_100_ms_of_the_crossing_byte() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let line = format!("GET /{}", "a".repeat(8 * 1024 - 5));
    conn.write_all(line.as_bytes())
        .expect("write 8 KiB of request line");
    assert_open_for(
        &mut conn,
        Duration::from_millis(300),
        "a request line of exactly 8 KiB without its end",
    );
    let crossing = Instant::now();
    conn.write_all(b"a").expect("write the byte past 8 KiB");
    let r = conn
        .read_response()
        .unwrap_or_else(|e| panic!("expected 414 after the byte past 8 KiB, got: {e}"));
    let took = crossing.elapsed();
    assert_error(&r, 414, None, Some("request_line_too_long"));
    assert!(
        took < Duration::from_millis(100),
        "expected the 414 within 100 ms of the byte past 8 KiB, it took {took:?}"
    );
    assert_announced_close(&mut conn, &r);
}

#[test]
fn header_block_over_32_kib_answers_431() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let big = "b".repeat(1000);
    let names: Vec<String> = (0..40).map(|i| format!("X-Big-{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), big.as_str())).collect();
    let r = send_on(&mut conn, &get_req("/healthz", &headers));
    assert_error(&r, 431, None, Some("header_too_large"));
    assert_connection_consistent(&mut conn, &r);
    assert_healthy(&srv);
}

#[test]
fn more_than_100_headers_answers_431() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let names: Vec<String> = (0..120).map(|i| format!("X-Many-{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let r = send_on(&mut conn, &get_req("/healthz", &headers));
    assert_error(&r, 431, None, Some("header_too_large"));
    assert_connection_consistent(&mut conn, &r);
    assert_healthy(&srv);
}

/// Sends only the head of a POST with `content_length` and expects a 413 without sending the body.
fn assert_413_without_body(srv: &Server, content_length: u64) {
    let mut conn = Conn::open(srv.addr);
    conn.set_read_timeout(Duration::from_secs(3));
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).expect("write request head");
    let r = conn.read_response().unwrap_or_else(|e| {
        panic!(
            "expected 413 right after the head (Content-Length {content_length}, body not sent), got: {e}"
        )
    });
    assert_error(&r, 413, None, Some("body_too_large"));
    assert_announced_close(&mut conn, &r);
    assert_healthy(srv);
}

#[test]
fn content_length_over_default_max_body_answers_413_before_the_body_is_sent() {
    let srv = Server::start(&[]);
    assert_413_without_body(&srv, 4_194_305);
}

#[test]
fn content_length_over_configured_max_body_answers_413_before_the_body_is_sent() {
    let srv = Server::start(&["--max-body-bytes", "1024"]);
    assert_413_without_body(&srv, 1025);
}

#[test]
fn body_of_exactly_max_body_bytes_is_accepted() {
    let srv = Server::start(&["--max-body-bytes", "1024"]);
    let mut body = chat_body("exactly at the limit");
    body.push_str(&" ".repeat(1024 - body.len()));
    assert_eq!(body.len(), 1024);
    let r = post_json(srv.addr, "/v1/chat/completions", &body);
    assert_ok(&r, "a 1024-byte body with --max-body-bytes 1024");
}

#[test]
fn content_length_with_transfer_encoding_answers_400_and_closes() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let body = chat_body("smuggle");
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}",
        chunked.len()
    );
    let r = send_on(&mut conn, raw.as_bytes());
    assert_error(&r, 400, None, None);
    assert_announced_close(&mut conn, &r);
    assert_healthy(&srv);
}

fn assert_bad_content_length(content_length_lines: &[&str]) {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let mut raw = String::from(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n",
    );
    for v in content_length_lines {
        raw.push_str(&format!("Content-Length: {v}\r\n"));
    }
    raw.push_str("\r\n{}");
    let r = send_on(&mut conn, raw.as_bytes());
    assert_error(&r, 400, None, None);
    assert_announced_close(&mut conn, &r);
    assert_healthy(&srv);
}

#[test]
fn non_numeric_content_length_answers_400_and_closes() {
    assert_bad_content_length(&["abc"]);
}

#[test]
fn negative_content_length_answers_400_and_closes() {
    assert_bad_content_length(&["-1"]);
}

#[test]
fn two_different_content_lengths_answer_400_and_close() {
    assert_bad_content_length(&["2", "3"]);
}

#[test]
fn transfer_encoding_gzip_answers_501() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let raw = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\n\r\n";
    let r = send_on(&mut conn, raw.as_bytes());
    assert_error(&r, 501, None, None);
    assert_connection_consistent(&mut conn, &r);
    assert_healthy(&srv);
}

fn assert_bad_header_value(value: &[u8]) {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let mut raw = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Odd: ".to_vec();
    raw.extend_from_slice(value);
    raw.extend_from_slice(b"\r\n\r\n");
    let r = send_on(&mut conn, &raw);
    assert_error(&r, 400, None, None);
    assert_connection_consistent(&mut conn, &r);
    assert_healthy(&srv);
}

#[test]
fn nul_in_header_value_answers_400() {
    assert_bad_header_value(b"before\0after");
}

#[test]
fn bare_cr_in_header_value_answers_400() {
    assert_bad_header_value(b"before\rafter");
}

/// A head too long to trickle within any header timeout the tests use.
const TRICKLED_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: syncgate-trickle-test\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";

/// Sends `head` one byte at a time, waiting up to `gap` after each byte for the server to answer
/// or close; returns how many bytes went out and how long that took.
fn trickle(conn: &mut Conn, head: &[u8], gap: Duration) -> (usize, Duration) {
    conn.set_read_timeout(gap);
    let start = Instant::now();
    let mut sent = 0;
    for b in head {
        if conn.write_all(&[*b]).is_err() {
            break; // The server gave up on us; read what it said.
        }
        sent += 1;
        match conn.fill() {
            Ok(_) => break, // Response bytes arrived, or the server closed.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => break,
        }
    }
    let waited = start.elapsed();
    conn.set_read_timeout(Duration::from_secs(5));
    (sent, waited)
}

/// Panics unless the server leaves the connection open, silent, for `wait`.
fn assert_open_for(conn: &mut Conn, wait: Duration, why: &str) {
    match conn.closed_within(wait) {
        Ok(false) => {}
        Ok(true) => panic!("{why}: the server closed the connection within {wait:?}"),
        Err(e) => panic!("{why}: {e}"),
    }
}

#[test]
fn head_trickled_slower_than_header_timeout_answers_408_and_closes() {
    let srv = Server::start(&["--header-timeout-ms", "1000"]);
    let mut conn = Conn::open(srv.addr);
    let head = TRICKLED_HEAD;
    // Each read waits up to 200 ms, which paces the trickle at one byte per 200 ms.
    let (sent, waited) = trickle(&mut conn, head, Duration::from_millis(200));
    let r = conn.read_response().unwrap_or_else(|e| {
        panic!("expected 408 after trickling {sent} bytes over {waited:?}, got: {e}")
    });
    assert!(
        sent < head.len(),
        "expected the server to give up before the {}-byte head was complete (~{} s at 200 ms/byte); it waited for all of it and answered:\n{}",
        head.len(),
        head.len() / 5,
        r.describe()
    );
    assert_error(&r, 408, None, None);
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "expected the 408 about 1 s after the first byte (--header-timeout-ms 1000), it came after {waited:?}"
    );
    assert_announced_close(&mut conn, &r);
    assert_healthy(&srv);
}

/// Issue 13: the first head is due `header_timeout` after accept. A wait for the first byte
/// used to start a second, fresh header timeout, so a slow head held its connection ~twice as long.
#[test]
fn first_head_is_due_header_timeout_after_connect_however_late_its_first_byte() {
    let srv = Server::start(&["--header-timeout-ms", "2000"]);
    let mut conn = Conn::open(srv.addr);
    let connected = Instant::now();
    // Silence first, then one byte a second: the deadline is already running.
    assert_open_for(
        &mut conn,
        Duration::from_secs(1),
        "a new connection silent for 1 s of its 2 s",
    );
    let (sent, _) = trickle(&mut conn, TRICKLED_HEAD, Duration::from_secs(1));
    let waited = connected.elapsed();
    let r = conn.read_response().unwrap_or_else(|e| {
        panic!(
            "expected 408 after trickling {sent} bytes over {waited:?} since connecting, got: {e}"
        )
    });
    assert_error(&r, 408, None, Some("request_timeout"));
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(3),
        "expected the 408 2 s after connecting (--header-timeout-ms 2000, within 1 s), it came after {waited:?}"
    );
    assert_announced_close(&mut conn, &r);
}

/// Issue 13: on a kept-alive connection the wait for the next request is the keep-alive
/// timeout's, and its head gets `header_timeout` from its own first byte.
#[test]
fn keep_alive_request_head_is_due_header_timeout_after_its_first_byte() {
    let srv = Server::start(&[
        "--header-timeout-ms",
        "1000",
        "--keepalive-timeout-ms",
        "30000",
    ]);
    let mut conn = Conn::open(srv.addr);
    assert_ok(
        &conn.request(&get_req("/healthz", &[])),
        "the first request",
    );
    assert_open_for(
        &mut conn,
        Duration::from_millis(1500),
        "idle between requests, longer than the header timeout",
    );
    // A head that takes most of the header timeout is still in time.
    let second = get_req("/healthz", &[]);
    conn.write_all(&second[..5])
        .expect("write the start of the second head");
    assert_open_for(
        &mut conn,
        Duration::from_millis(600),
        "half-way through the second head",
    );
    let r = conn.request(&second[5..]);
    assert_ok(&r, "a second head completed 600 ms after its first byte");
    // One that takes longer than the header timeout from its first byte is refused.
    let (sent, waited) = trickle(&mut conn, TRICKLED_HEAD, Duration::from_millis(200));
    let r = conn.read_response().unwrap_or_else(|e| {
        panic!("expected 408 after trickling {sent} bytes over {waited:?}, got: {e}")
    });
    assert_error(&r, 408, None, Some("request_timeout"));
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(2),
        "expected the 408 about 1 s after the third head's first byte, it came after {waited:?}"
    );
    assert_announced_close(&mut conn, &r);
}

/// A chunked encoding of `body` in pieces of `piece` bytes.
fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn chunked_chat_head() -> Vec<u8> {
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
}

#[test]
fn chunked_chat_request_body_is_decoded() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let text = "chunked hello";
    // 26-byte pieces: the chunk size is "1a", so hex parsing is exercised.
    let mut raw = chunked_chat_head();
    raw.extend(chunked(chat_body(text).as_bytes(), 26));
    let r = send_on(&mut conn, &raw);
    assert_ok(&r, "a chunked chat request");
    let v = r.json();
    let content = v["choices"][0]["message"]["content"].as_str();
    assert!(
        content.is_some_and(|c| c.contains(text)),
        "expected the reply to contain {text:?}; got:\n{}",
        r.describe()
    );
    assert_connection_consistent(&mut conn, &r);
}

#[test]
fn chunked_body_over_max_body_bytes_answers_413() {
    let srv = Server::start(&["--max-body-bytes", "1024"]);
    let mut conn = Conn::open(srv.addr);
    let mut body = chat_body("too big when chunked");
    body.push_str(&" ".repeat(2048 - body.len()));
    let mut raw = chunked_chat_head();
    raw.extend(chunked(body.as_bytes(), 512));
    let r = send_on(&mut conn, &raw);
    assert_error(&r, 413, None, Some("body_too_large"));
    assert_connection_consistent(&mut conn, &r);
    assert_healthy(&srv);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    // The chat request is slow and the health checks are fast-lane: order must still hold.
    let srv = Server::start(&["--mock-latency-ms", "300"]);
    let ids = [unique("pipe-a"), unique("pipe-b"), unique("pipe-c")];
    let mut raw = get_req("/healthz", &[("X-Request-Id", &ids[0])]);
    raw.extend(chat_req("pipelined", &[("X-Request-Id", &ids[1])]));
    raw.extend(get_req("/healthz", &[("X-Request-Id", &ids[2])]));
    let mut conn = Conn::open(srv.addr);
    conn.write_all(&raw).expect("write pipelined requests");
    for (i, id) in ids.iter().enumerate() {
        let r = conn.read_response().unwrap_or_else(|e| {
            panic!("pipelined response {i} (x-request-id {id}): I/O error {e}")
        });
        assert_ok(&r, &format!("pipelined request {i}"));
        assert_eq!(
            r.header("x-request-id"),
            Some(id.as_str()),
            "pipelined response {i} is out of order; got:\n{}",
            r.describe()
        );
    }
}

#[test]
fn pipelined_chat_requests_with_bodies_are_answered_in_order() {
    let srv = Server::start(&[]);
    let texts = ["first pipelined body", "second pipelined body"];
    let mut raw = chat_req(texts[0], &[]);
    raw.extend(chat_req(texts[1], &[]));
    let mut conn = Conn::open(srv.addr);
    conn.write_all(&raw).expect("write pipelined requests");
    for (i, text) in texts.iter().enumerate() {
        let r = conn
            .read_response()
            .unwrap_or_else(|e| panic!("pipelined response {i}: I/O error {e}"));
        assert_ok(&r, &format!("pipelined chat request {i}"));
        let v = r.json();
        let content = v["choices"][0]["message"]["content"].as_str();
        assert!(
            content.is_some_and(|c| c.contains(text)),
            "pipelined response {i}: expected content containing {text:?}; got:\n{}",
            r.describe()
        );
    }
}

#[test]
fn http10_request_is_answered_then_closed() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let r = send_on(&mut conn, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_ok(&r, "GET /healthz HTTP/1.0");
    assert_announced_close(&mut conn, &r);
}

#[test]
fn http10_chat_request_works_then_closes() {
    let srv = Server::start(&[]);
    let body = chat_body("from an old client");
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = Conn::open(srv.addr);
    let r = send_on(&mut conn, raw.as_bytes());
    assert_ok(&r, "POST /v1/chat/completions HTTP/1.0");
    assert_announced_close(&mut conn, &r);
}

#[test]
fn http10_keep_alive_request_keeps_connection_open() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let req = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let r = send_on(&mut conn, req);
    assert_ok(&r, "first HTTP/1.0 keep-alive request");
    assert!(
        !r.closes(),
        "expected the connection kept open for HTTP/1.0 with `Connection: keep-alive`; got:\n{}",
        r.describe()
    );
    let r = send_on(&mut conn, req);
    assert_ok(
        &r,
        "second HTTP/1.0 keep-alive request on the same connection",
    );
}

#[test]
fn connection_close_request_is_answered_with_connection_close_then_closed() {
    let srv = Server::start(&[]);
    let mut conn = Conn::open(srv.addr);
    let r = send_on(&mut conn, &get_req("/healthz", &[("Connection", "close")]));
    assert_ok(&r, "GET /healthz with Connection: close");
    assert_announced_close(&mut conn, &r);
}
