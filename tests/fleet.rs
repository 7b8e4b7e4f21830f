//! Several instances on one PostgreSQL (issue 15, points 6, 7 and 9), with real processes:
//! three `syncgate serve` on one database, `syncgate mock-upstream` as the provider and, for
//! the rolling restart, the shipped nginx config in front. Jobs submitted to an instance that
//! is killed finish on the others; a conversation goes on from instance to instance; a rolling
//! restart under load costs the clients nothing.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The three instances' config: the upstream model `m`, and `[jobs]` as given.
fn fleet_toml(upstream: SocketAddr, jobs: &str) -> String {
    format!("{}\n[jobs]\n{jobs}\n", upstream_model_toml(upstream))
}

fn job_status(addr: SocketAddr, id: &str) -> Value {
    let r = get(addr, &format!("/api/jobs/{id}"));
    assert_ok(&r, "a job");
    r.json()
}

fn runs_finished(addr: SocketAddr) -> f64 {
    metric_value(&scrape(addr), "syncgate_job_run_seconds_count", &[]).unwrap_or(0.0)
}

/// Issue 15, point 6: any instance's runners take any job, and a job whose instance died is
/// taken by another once its lease runs out.
#[test]
fn jobs_submitted_to_an_instance_killed_with_sigkill_all_finish_on_the_others() {
    let Some(pg) = fresh_postgres() else { return };
    const LEASE_MS: u64 = 1000;
    let up = Server::start_mock_upstream(&["--latency-ms", "1500"]);
    let toml = fleet_toml(up.addr, &format!("workers = 4\nlease_ms = {LEASE_MS}"));
    let mut fleet = Fleet::start(3, &pg.url(), &toml);
    let a = fleet.addr(0);
    let ids: Vec<String> = (0..20)
        .map(|i| {
            let body = json!({"request": {"model": "m",
                                          "messages": [{"role": "user", "content": format!("job {i}")}]}});
            let r = post_json(a, "/api/jobs", &body.to_string());
            assert_eq!(r.status, 202, "{}", r.describe());
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    // Every runner of the three (12) is busy, so A holds four when it dies.
    let busy = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        get(a, "/api/jobs?status=running&limit=100").json()["data"]
            .as_array()
            .is_some_and(|d| d.len() >= 12)
    });
    assert!(busy, "the runners never filled");
    let killed_at = Instant::now();
    let dead = fleet.kill(0);
    let b = fleet.addr(1);

    let mut rerun = 0;
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(30);
        let ended = loop {
            let j = job_status(b, id);
            if (j["status"] != "queued" && j["status"] != "running") || Instant::now() > deadline {
                break j;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            ended["status"],
            "succeeded",
            "{ended:#}\nA's log:\n{}",
            dead.log()
        );
        if ended["attempts"].as_u64() > Some(1) {
            rerun += 1;
        }
    }
    let took = killed_at.elapsed();
    let on_b = runs_finished(fleet.addr(1));
    let on_c = runs_finished(fleet.addr(2));
    assert!(rerun >= 1, "no job A held had to run again");
    assert!(
        on_b + on_c >= 20.0,
        "B and C ran {on_b} + {on_c} attempts for 20 jobs"
    );
    eprintln!(
        "fleet jobs: 20 submitted to A, A killed with 12 running; all 20 succeeded {} ms after \
         the kill (lease {LEASE_MS} ms, 1.5 s a call); {rerun} ran again after A's lease ran out; \
         attempts finished on B {on_b}, on C {on_c}",
        took.as_millis()
    );
}

fn turn(addr: SocketAddr, conversation: &str, text: &str) -> Value {
    let path = format!("/api/conversations/{conversation}/messages");
    let r = post_json(addr, &path, &json!({"content": text}).to_string());
    assert_ok(&r, &format!("a turn on {addr}"));
    r.json()
}

/// Issue 15, point 7: conversations, the request log and usage live in the shared database,
/// so any instance answers for all and a conversation goes on where its last turn was not.
#[test]
fn a_conversation_started_on_one_instance_continues_on_another_and_reads_on_a_third() {
    let Some(pg) = fresh_postgres() else { return };
    let up = Server::start_mock_upstream(&[]);
    let fleet = Fleet::start(3, &pg.url(), &fleet_toml(up.addr, ""));
    let (a, b, c) = (fleet.addr(0), fleet.addr(1), fleet.addr(2));

    let r = post_json(
        a,
        "/api/conversations",
        &json!({"model": "m", "system": "Be brief."}).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.describe());
    let conv = r.json()["id"].as_str().unwrap().to_string();
    turn(a, &conv, "first, on A");
    turn(b, &conv, "second, on B");

    // B sent A's turn along: the provider saw the whole history.
    let bodies: Vec<Value> = get(up.addr, "/requests").json().as_array().unwrap().clone();
    let last = &bodies.last().expect("an upstream call")["body"];
    let said: Vec<&str> = last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(said.len(), 4, "{said:?}");
    assert_eq!(said[0], "Be brief.");
    assert_eq!(said[1], "first, on A");
    assert_eq!(said[3], "second, on B");

    // C reads the conversation, the request log and usage of all three.
    let page = get(c, &format!("/api/conversations/{conv}/messages")).json();
    let contents: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents.len(), 4, "{page:#}");
    assert_eq!(contents[0], "first, on A");
    assert_eq!(contents[2], "second, on B");
    // The request log is written in batches: both turns show on C within moments.
    let logged = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let log = get(c, "/api/requests?model=m&limit=100").json();
        log["data"].as_array().is_some_and(|rows| {
            rows.iter()
                .filter(|r| {
                    r["route"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("/messages"))
                })
                .count()
                >= 2
        })
    });
    assert!(
        logged,
        "C's request log lacks the turns: {:#}",
        get(c, "/api/requests?model=m&limit=100").json()
    );
    let usage = get(c, "/api/usage").json();
    assert!(
        usage.to_string().contains("\"m\""),
        "C's usage has no calls of m: {usage:#}"
    );
}

fn chat_m(text: &str) -> Vec<u8> {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": text}]});
    post_req(
        "/v1/chat/completions",
        &body.to_string(),
        &[("Connection", "close")],
    )
}

fn served(addr: SocketAddr, status: &str) -> f64 {
    let labels = [("route", "/v1/chat/completions"), ("status", status)];
    metric_value(&scrape(addr), "syncgate_http_requests_total", &labels).unwrap_or(0.0)
}

/// Issue 15, point 9: a refusal before any work (here `queue_full`) goes to the next instance
/// through nginx, POST body and all; a call that reached a provider is never sent again, even
/// when its instance dies under it.
#[test]
fn nginx_sends_a_refusal_before_work_to_the_next_instance_and_never_a_call_that_started() {
    let Some(program) = nginx_program() else {
        return;
    };
    let Some(pg) = fresh_postgres() else { return };
    let up = Server::start_mock_upstream(&["--latency-ms", "1500"]);
    let toml = format!(
        "{}\n[capacity]\nworkers = 1\nqueue = 1\n",
        upstream_model_toml(up.addr)
    );
    let mut fleet = Fleet::start(2, &pg.url(), &toml);
    let nginx = Nginx::start(&program, &fleet.addrs());
    let full = fleet.addr(0);
    // A's worker and its one queue slot are taken for seconds: A refuses anything else
    // before any work.
    let held: Vec<_> = (0..2)
        .map(|i| std::thread::spawn(move || send(full, &chat_m(&format!("holds A {i}")))))
        .collect();
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
            get(up.addr, "/stats").json()["requests"].as_u64() == Some(1)
                && metric_value(&scrape(full), "syncgate_queue_depth", &[]) == Some(1.0)
        }),
        "A never filled"
    );
    // B's worker takes one call at a time: send them one after another, each through nginx.
    for i in 0..4 {
        let text = format!("retried elsewhere {i}");
        let r = send(nginx.addr, &chat_m(&text));
        assert_ok(&r, "a call nginx may send to either instance");
        assert!(r.text().contains(&text), "{}", r.describe());
    }
    for call in held {
        assert_ok(&call.join().unwrap(), "A's own call");
    }
    let refused_by_a = served(full, "421");
    assert!(
        refused_by_a >= 1.0,
        "least_conn never tried the full instance first"
    );
    eprintln!("nginx: {refused_by_a} calls refused by the full A before any work, all served by B");

    // A call in flight at the provider when its instance is killed: 502, and never sent again.
    let calls_before = get(up.addr, "/stats").json()["requests"].as_u64().unwrap();
    let to = nginx.addr;
    let client = std::thread::spawn(move || try_send(to, &chat_m("dies with its instance")));
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
            get(up.addr, "/stats").json()["requests"].as_u64() == Some(calls_before + 1)
        }),
        "the call never reached the provider"
    );
    // Whichever instance has the call: kill both, so neither finishes it.
    let _a = fleet.kill(0);
    let _b = fleet.kill(1);
    let answer = client.join().unwrap();
    match &answer {
        Ok(r) => assert_eq!(r.status, 502, "{}", r.describe()),
        Err(e) => panic!("nginx did not answer: {e}"),
    }
    std::thread::sleep(Duration::from_millis(300));
    let calls_after = get(up.addr, "/stats").json()["requests"].as_u64().unwrap();
    assert_eq!(
        calls_after,
        calls_before + 1,
        "nginx sent a started call again"
    );
}

/// Issue 15, point 9: SIGTERM each instance in turn, wait for it to exit, start it again on
/// its port, wait until it is ready and nginx uses it again; a steady client load through
/// nginx sees no failed request.
#[test]
fn a_rolling_restart_under_load_through_nginx_fails_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let Some(program) = nginx_program() else {
        return;
    };
    let Some(pg) = fresh_postgres() else { return };
    let up = Server::start_mock_upstream(&["--latency-ms", "50"]);
    let mut fleet = Fleet::start(3, &pg.url(), &upstream_model_toml(up.addr));
    // The shipped config, with a shorter passive-health window so the test runs in seconds:
    // the procedure waits that window after each instance.
    const FAIL_TIMEOUT: Duration = Duration::from_secs(2);
    let nginx = Nginx::start_with(
        &program,
        &fleet.addrs(),
        &[("fail_timeout=10s", "fail_timeout=2s")],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, ok, failed, failures) =
                (stop.clone(), ok.clone(), failed.clone(), failures.clone());
            let to = nginx.addr;
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let text = format!("client {c} call {n}");
                    match try_send(to, &chat_m(&text)) {
                        Ok(r) if r.status == 200 && r.text().contains(&text) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            let what = match other {
                                Ok(r) => r.describe(),
                                Err(e) => e.to_string(),
                            };
                            failures.lock().unwrap().push(what);
                        }
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut steps = Vec::new();
    for i in 0..3 {
        let before = ok.load(Ordering::SeqCst);
        let step = Instant::now();
        let old = fleet.stop(i, Duration::from_secs(20));
        let drained = step.elapsed();
        assert!(old.log().contains("drained"), "{}", old.log());
        fleet.start_instance(i);
        // nginx may have left it alone after failed connects: wait that window out, then
        // until it serves again.
        std::thread::sleep(FAIL_TIMEOUT);
        let addr = fleet.addr(i);
        let back = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
            served(addr, "200") >= 1.0
        });
        assert!(back, "nginx never sent instance {i} work again");
        steps.push(format!(
            "instance {i}: drained and exited in {} ms, back in {} ms, {} calls served meanwhile",
            drained.as_millis(),
            step.elapsed().as_millis(),
            ok.load(Ordering::SeqCst) - before
        ));
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!(
        "rolling restart of 3 instances under 4 clients through nginx: {ok} calls succeeded, \
         {failed} failed, in {} ms\n  {}",
        started.elapsed().as_millis(),
        steps.join("\n  ")
    );
    let failures = failures.lock().unwrap();
    assert_eq!(
        failed,
        0,
        "failed calls: {:#?}",
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "too little load to mean anything: {ok}");
}
