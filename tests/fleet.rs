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
