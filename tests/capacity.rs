//! Capacity: worker concurrency, the bounded queue (queue_full, queue_timeout), many keep-alive connections, max_connections and /readyz under load.

mod common;

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The tests here measure latency; running them one at a time keeps them from starving each other
/// of CPU on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

type Timed = io::Result<(Resp, Duration)>;

/// Writes `raw` on `conn` once `barrier` releases, reads the response, and times it from the write.
fn timed_request(mut conn: Conn, barrier: Arc<Barrier>, raw: Vec<u8>) -> Timed {
    barrier.wait();
    let t = Instant::now();
    conn.write_all(&raw)?;
    let r = conn.read_response()?;
    Ok((r, t.elapsed()))
}

#[test]
fn four_workers_serve_four_slow_requests_concurrently() {
    let _serial = serial();
    let srv = Server::start(&["--workers", "4", "--mock-latency-ms", "500"]);
    let barrier = Arc::new(Barrier::new(5));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let conn = Conn::open(srv.addr);
            let b = barrier.clone();
            let raw = chat_req(&format!("concurrency check {i}"), &[]);
            thread::spawn(move || timed_request(conn, b, raw))
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let results: Vec<Timed> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread panicked"))
        .collect();
    let total = start.elapsed();

    for (i, r) in results.iter().enumerate() {
        let (resp, took) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i}: expected a 200 response, got I/O error {e}"));
        assert_ok(resp, &format!("concurrent chat request {i}"));
        assert!(
            *took >= Duration::from_millis(450),
            "request {i}: expected the mock latency of 500 ms to apply, but it answered in {took:?}"
        );
    }
    assert!(
        total < Duration::from_millis(1000),
        "expected 4 requests on 4 workers (500 ms each) to finish together in < 1000 ms, took {total:?}"
    );
}

#[test]
fn full_queue_answers_503_queue_full_with_retry_after_at_once() {
    let _serial = serial();
    // Service takes 1.5 s, so a 503 within 1 s could not have waited for a worker, with
    // margin for a busy 2-core machine (a 250 ms bound failed once at load average 30).
    let srv = Server::start(&[
        "--workers",
        "2",
        "--queue",
        "2",
        "--mock-latency-ms",
        "1500",
    ]);
    let mut health = Conn::open(srv.addr);
    let barrier = Arc::new(Barrier::new(9));
    let (tx, rx) = mpsc::channel::<(usize, Timed)>();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let conn = Conn::open(srv.addr);
            let b = barrier.clone();
            let tx = tx.clone();
            let raw = chat_req(&format!("queue fill {i}"), &[]);
            thread::spawn(move || {
                let _ = tx.send((i, timed_request(conn, b, raw)));
            })
        })
        .collect();
    drop(tx);
    barrier.wait();

    // As soon as the first answer (a fast 503) is in, the workers are busy: the fast lane must
    // still answer promptly.
    let mut results = vec![rx
        .recv_timeout(Duration::from_secs(10))
        .expect("no response to any of the 8 requests within 10 s")];
    let t = Instant::now();
    let hr = health.request(&get_req("/healthz", &[]));
    let health_took = t.elapsed();
    assert_ok(&hr, "GET /healthz while the workers are busy");
    assert!(
        health_took < Duration::from_millis(100),
        "expected GET /healthz to answer in < 100 ms while workers are busy, took {health_took:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(15);
    while results.len() < 8 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => results.push(r),
            Err(_) => panic!("only {} of 8 requests answered within 15 s", results.len()),
        }
    }
    for h in handles {
        h.join().expect("client thread panicked");
    }
    results.sort_by_key(|(i, _)| *i);

    let mut ok = 0;
    let mut full = 0;
    let mut summary = String::new();
    for (i, r) in &results {
        let (resp, took) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i}: I/O error {e}"));
        summary.push_str(&format!("  request {i}: {} after {took:?}\n", resp.status));
        match resp.status {
            200 => ok += 1,
            503 => {
                full += 1;
                assert_error(resp, 503, Some("overloaded"), Some("queue_full"));
                let ra = resp.header("retry-after").unwrap_or_else(|| {
                    panic!(
                        "request {i}: expected a Retry-After header on 503; got:\n{}",
                        resp.describe()
                    )
                });
                let secs: u64 = ra.trim().parse().unwrap_or_else(|_| {
                    panic!("request {i}: expected Retry-After to be an integer, got {ra:?}")
                });
                assert!(
                    secs >= 1,
                    "request {i}: expected Retry-After >= 1, got {secs}"
                );
                assert!(
                    *took < Duration::from_millis(1000),
                    "request {i}: expected the queue_full 503 in < 1 s (service takes 1.5 s), it took {took:?}"
                );
            }
            _ => panic!(
                "request {i}: expected 200 or 503, got:\n{}",
                resp.describe()
            ),
        }
    }
    assert_eq!(
        (ok, full),
        (4, 4),
        "expected 4 x 200 (2 workers + 2 queue slots) and 4 x 503; got {ok} x 200, {full} x 503:\n{summary}"
    );
    wait_for_metric(
        srv.addr,
        "syncgate_rejected_total",
        &[("reason", "queue_full")],
        |v| v >= 4.0,
        Duration::from_secs(5),
    );
}

#[test]
fn job_waiting_longer_than_max_queue_wait_gets_503_queue_timeout() {
    let _serial = serial();
    let srv = Server::start(&[
        "--workers",
        "1",
        "--queue",
        "4",
        "--mock-latency-ms",
        "600",
        "--max-queue-wait-ms",
        "200",
    ]);
    let mut first = Conn::open(srv.addr);
    first
        .write_all(&chat_req("first in line", &[]))
        .expect("write first request");
    wait_for_metric(
        srv.addr,
        "syncgate_workers_busy",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
    let mut second = Conn::open(srv.addr);
    second
        .write_all(&chat_req("stuck behind it", &[]))
        .expect("write second request");

    let r2 = second.read_response().unwrap_or_else(|e| {
        panic!("second request: expected 503 queue_timeout, got I/O error {e}")
    });
    let r1 = first
        .read_response()
        .unwrap_or_else(|e| panic!("first request: expected 200, got I/O error {e}"));
    assert_ok(&r1, "the request that occupied the only worker");
    assert_error(&r2, 503, None, Some("queue_timeout"));
    wait_for_metric(
        srv.addr,
        "syncgate_rejected_total",
        &[("reason", "queue_timeout")],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
}

#[test]
fn two_hundred_keepalive_connections_each_get_a_first_response_within_a_second() {
    let _serial = serial();
    let srv = Server::start(&[]);
    let addr = srv.addr;
    const N: usize = 200;
    let barrier = Arc::new(Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let b = barrier.clone();
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || -> Result<Duration, String> {
                    b.wait();
                    let mut c = Conn::try_open(addr).map_err(|e| format!("connect failed: {e}"))?;
                    let t = Instant::now();
                    c.write_all(&get_req("/healthz", &[]))
                        .map_err(|e| format!("write /healthz: {e}"))?;
                    let r = c
                        .read_response()
                        .map_err(|e| format!("read /healthz: {e}"))?;
                    let first = t.elapsed();
                    if r.status != 200 {
                        return Err(format!("/healthz answered:\n{}", r.describe()));
                    }
                    let r = c
                        .try_request(&chat_req(&format!("connection {i}"), &[]))
                        .map_err(|e| format!("chat on the same connection: {e}"))?;
                    if r.status != 200 {
                        return Err(format!("chat answered:\n{}", r.describe()));
                    }
                    Ok(first)
                })
                .expect("spawn client thread")
        })
        .collect();

    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().expect("client thread panicked") {
            Ok(first) => {
                slowest = slowest.max(first);
                if first >= Duration::from_secs(1) {
                    failures.push(format!(
                        "connection {i}: first response took {first:?} (expected < 1 s)"
                    ));
                }
            }
            Err(e) => failures.push(format!("connection {i}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "expected all {N} connections to get /healthz within 1 s and then a 200 chat; {} failed (slowest ok first response {slowest:?}); first failures:\n{}",
        failures.len(),
        failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn connection_over_max_connections_gets_503_and_is_closed_until_a_slot_frees() {
    let _serial = serial();
    let srv = Server::start(&["--max-connections", "4"]);
    let mut held: Vec<Conn> = (0..4)
        .map(|i| {
            let mut c = Conn::open(srv.addr);
            let r = c.request(&get_req("/healthz", &[]));
            assert_ok(&r, &format!("/healthz on held connection {i}"));
            assert!(
                !r.closes(),
                "held connection {i}: expected keep-alive, got:\n{}",
                r.describe()
            );
            c
        })
        .collect();

    // The fifth connection is told off without sending anything.
    let mut fifth = Conn::open(srv.addr);
    fifth.set_read_timeout(Duration::from_secs(5));
    let r = fifth.read_response().unwrap_or_else(|e| {
        panic!(
            "fifth connection: expected an unsolicited 503 too_many_connections, got I/O error {e}"
        )
    });
    assert_error(&r, 503, None, Some("too_many_connections"));
    assert!(
        r.closes(),
        "expected `Connection: close` on the too_many_connections 503; got:\n{}",
        r.describe()
    );
    fifth.assert_closed();

    // The held connections are unaffected.
    let r = held[0].request(&get_req("/healthz", &[]));
    assert_ok(&r, "/healthz on a held connection after the rejection");

    // Closing one frees a slot.
    drop(held.pop());
    let mut last = String::from("no attempt made");
    let freed = poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || match try_send(srv.addr, &get_req("/healthz", &[("Connection", "close")])) {
            Ok(r) if r.status == 200 => true,
            Ok(r) => {
                last = r.describe();
                false
            }
            Err(e) => {
                last = format!("I/O error: {e}");
                false
            }
        },
    );
    assert!(
        freed,
        "expected a new connection to get 200 on /healthz after one of 4 connections closed; last attempt:\n{last}"
    );
    wait_for_metric(
        srv.addr,
        "syncgate_rejected_total",
        &[("reason", "too_many_connections")],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
}

#[test]
fn readyz_turns_503_when_queue_nearly_full_and_recovers() {
    let _serial = serial();
    let srv = Server::start(&["--workers", "1", "--queue", "5", "--mock-latency-ms", "800"]);
    let r = get(srv.addr, "/readyz");
    assert_ok(&r, "GET /readyz on an idle server");

    let spawn_chat = |i: usize| {
        let mut c = Conn::open(srv.addr);
        c.write_all(&chat_req(&format!("fill {i}"), &[]))
            .expect("write chat request");
        thread::spawn(move || c.read_response())
    };
    let mut handles = vec![spawn_chat(0)];
    wait_for_metric(
        srv.addr,
        "syncgate_workers_busy",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
    handles.extend((1..5).map(spawn_chat));

    // Worker busy + 4 of 5 slots queued = 0.8 of capacity: not ready.
    let mut last = String::new();
    let not_ready = poll_until(Duration::from_secs(3), Duration::from_millis(10), || {
        let r = get(srv.addr, "/readyz");
        last = r.describe();
        r.status == 503
    });
    assert!(
        not_ready,
        "expected /readyz to answer 503 with 4 of 5 queue slots taken; last answer:\n{last}"
    );

    for (i, h) in handles.into_iter().enumerate() {
        let r = h
            .join()
            .expect("client thread panicked")
            .unwrap_or_else(|e| panic!("queued request {i}: expected 200, got I/O error {e}"));
        assert_ok(&r, &format!("queued request {i}"));
    }

    let ready = poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
        let r = get(srv.addr, "/readyz");
        last = r.describe();
        r.status == 200
    });
    assert!(
        ready,
        "expected /readyz to answer 200 again once the queue drained; last answer:\n{last}"
    );
}
