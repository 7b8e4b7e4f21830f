//! syncgate behind nginx, for real: Debian's nginx (installed by `scripts/test`) runs in the
//! foreground from a temporary prefix on loopback, with the shipped `deploy/nginx/syncgate.conf`
//! and only its addresses and paths substituted, in front of `syncgate serve` and
//! `syncgate mock-upstream`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn gateway_toml(upstream: SocketAddr, extra: &str) -> String {
    format!("{}\n{extra}", upstream_model_toml(upstream))
}

fn chat_m(text: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]});
    let mut headers = vec![("Connection", "close")];
    headers.extend_from_slice(extra);
    post_req("/v1/chat/completions", &body.to_string(), &headers)
}

fn metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&scrape(addr), name, labels).unwrap_or(0.0)
}

#[test]
fn chat_and_streams_pass_through_paced_with_request_ids_on_reused_connections() {
    let Some(program) = nginx_program() else {
        return;
    };
    let up = Server::start_mock_upstream(&["--stream-chunks", "6", "--stream-interval-ms", "150"]);
    let gw = Server::start_with_config(&gateway_toml(up.addr, ""), &[]);
    let nginx = Nginx::start(&program, &[gw.addr]);

    // A plain call, with the client's request id end to end.
    let r = send(
        nginx.addr,
        &chat_m("through nginx", &[("X-Request-Id", "e2e-abc-123")]),
    );
    assert_ok(&r, "a chat call through nginx");
    assert_eq!(r.header("x-request-id"), Some("e2e-abc-123"));
    assert!(r.text().contains("through nginx"), "{}", r.describe());
    // Without one, nginx's own id reaches syncgate and comes back.
    let r = send(nginx.addr, &chat_m("no id", &[]));
    let id = r.header("x-request-id").expect("an id").to_string();
    assert_eq!(id.len(), 32, "nginx's $request_id: {id}");
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
            gw.log().contains("rid=e2e-abc-123") && gw.log().contains(&format!("rid={id}"))
        }),
        "syncgate did not log the ids:\n{}",
        gw.log()
    );

    // A stream arrives event by event, paced as the upstream sends it, not buffered to the end.
    let body = serde_json::json!({"model": "m", "stream": true,
                                  "messages": [{"role": "user", "content": "stream it"}]});
    let raw = post_req(
        "/v1/chat/completions",
        &body.to_string(),
        &[("Connection", "close")],
    );
    let mut stream = TcpStream::connect(nginx.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&raw).unwrap();
    let started = Instant::now();
    let (mut seen, mut arrivals) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                let events = String::from_utf8_lossy(&seen).matches("data: ").count();
                arrivals.push((started.elapsed(), events));
            }
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("data: [DONE]"), "{text}");
    let first = arrivals.iter().find(|(_, n)| *n >= 1).expect("an event").0;
    let last = arrivals.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(500),
        "events came {:?} apart: buffered, not streamed ({arrivals:?})",
        last - first
    );
    assert!(arrivals.len() >= 4, "few reads: {arrivals:?}");

    // Forty client connections to nginx; nginx reuses its connections to syncgate.
    let accepted = metric(gw.addr, "syncgate_connections_accepted_total", &[]);
    for i in 0..40 {
        assert_ok(&send(nginx.addr, &chat_m(&format!("n{i}"), &[])), "a call");
    }
    let opened = metric(gw.addr, "syncgate_connections_accepted_total", &[]) - accepted;
    // Each scrape is a connection of its own.
    assert!(
        opened <= 6.0,
        "nginx opened {opened} connections for 40 requests"
    );
}

#[test]
fn a_503_with_retry_after_passes_through_untouched() {
    let Some(program) = nginx_program() else {
        return;
    };
    let up = Server::start_mock_upstream(&["--latency-ms", "1500"]);
    let gw = Server::start_with_config(
        &gateway_toml(up.addr, ""),
        &["--workers", "1", "--queue", "1"],
    );
    let nginx = Nginx::start(&program, &[gw.addr]);
    let addr = nginx.addr;
    let calls: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || send(addr, &chat_m(&format!("c{i}"), &[]))))
        .collect();
    let answers: Vec<Resp> = calls.into_iter().map(|c| c.join().unwrap()).collect();
    let refused: Vec<&Resp> = answers.iter().filter(|r| r.status == 503).collect();
    assert!(!refused.is_empty(), "no 503 with 4 calls against 2 slots");
    for r in refused {
        assert_error(r, 503, None, Some("queue_full"));
        assert!(r.header("retry-after").is_some(), "{}", r.describe());
    }
    assert!(answers.iter().any(|r| r.status == 200));
}

#[test]
fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
    let Some(program) = nginx_program() else {
        return;
    };
    let up = Server::start_mock_upstream(&[]);
    // The default trusts loopback, where nginx is; the other trusts only 10.0.0.0/8.
    let trusting = Server::start_with_config(&gateway_toml(up.addr, ""), &[]);
    let wary = Server::start_with_config(
        &gateway_toml(up.addr, "[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n"),
        &[],
    );
    for (gw, believed) in [(&trusting, true), (&wary, false)] {
        let nginx = Nginx::start(&program, &[gw.addr]);
        // nginx appends the address it saw (127.0.0.1) to what the client sent.
        let r = send(
            nginx.addr,
            &chat_m(
                "who",
                &[
                    ("X-Forwarded-For", "198.51.100.77"),
                    ("X-Request-Id", "fwd-1"),
                ],
            ),
        );
        assert_ok(&r, "a forwarded call");
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
                gw.log().contains("rid=fwd-1")
            }),
            "{}",
            gw.log()
        );
        let line = gw
            .log()
            .lines()
            .find(|l| l.contains("rid=fwd-1"))
            .unwrap()
            .to_string();
        // Through a trusted nginx, the nearest untrusted hop is the one nginx saw: 127.0.0.1
        // is trusted too, so the client's own claim is reached; a wary syncgate names nginx.
        if believed {
            assert!(line.contains("198.51.100.77 via=127.0.0.1:"), "{line}");
        } else {
            assert!(
                line.contains("127.0.0.1:") && !line.contains("198.51.100.77"),
                "{line}"
            );
        }
    }
}

#[test]
fn oversized_bodies_and_slow_clients_are_stopped_by_nginx_before_syncgate() {
    let Some(program) = nginx_program() else {
        return;
    };
    let up = Server::start_mock_upstream(&[]);
    let gw = Server::start_with_config(&gateway_toml(up.addr, ""), &[]);
    let nginx = Nginx::start(&program, &[gw.addr]);
    let route = [("route", "/v1/chat/completions"), ("status", "413")];
    let before = metric(gw.addr, "syncgate_connections_accepted_total", &[]);

    // A declared body over client_max_body_size (= syncgate's max_body_bytes): 413 from nginx.
    let mut conn = TcpStream::connect(nginx.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
          Content-Length: 5000000\r\nConnection: close\r\n\r\n{\"model\":",
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A client that never finishes its head is closed by nginx (client_header_timeout 10 s).
    let mut slow = TcpStream::connect(nginx.addr).unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(8) && took < Duration::from_secs(19),
        "closed after {took:?}"
    );

    // syncgate never saw either: no new connection (beyond the scrape) and no 413 of its own.
    let after = metric(gw.addr, "syncgate_connections_accepted_total", &[]);
    assert!(
        after - before <= 1.0,
        "syncgate got {} connections",
        after - before
    );
    assert_eq!(metric(gw.addr, "syncgate_http_requests_total", &route), 0.0);
}
