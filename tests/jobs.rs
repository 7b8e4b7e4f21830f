//! Durable jobs end to end: the real binary in front of `syncgate mock-upstream`. A job is
//! accepted only once stored, runs on the job runner's own threads, survives kill -9 (every
//! accepted job ends succeeded, none stuck running past its lease, and a client repeating its
//! submission with the same key sees one job), can be cancelled, and is retried up to its
//! attempts when the provider fails.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn gateway_toml(upstream: SocketAddr, jobs: &str) -> String {
    format!("{}\n[jobs]\n{jobs}\n", upstream_model_toml(upstream))
}

fn job_body(text: &str) -> String {
    json!({
        "request": {"model": "m", "messages": [{"role": "user", "content": text}]},
        "metadata": {"text": text},
    })
    .to_string()
}

fn submit(addr: SocketAddr, text: &str, key: Option<&str>) -> Resp {
    let mut headers = vec![("Connection", "close")];
    if let Some(k) = key {
        headers.push(("Idempotency-Key", k));
    }
    send(addr, &post_req("/api/jobs", &job_body(text), &headers))
}

fn job(addr: SocketAddr, id: &str) -> Value {
    let r = get(addr, &format!("/api/jobs/{id}"));
    assert_ok(&r, "a job");
    r.json()
}

fn cancel(addr: SocketAddr, id: &str) -> Resp {
    send(
        addr,
        &format!("DELETE /api/jobs/{id} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .into_bytes(),
    )
}

/// Polls a job until `done` says so or `within` passes; returns its last state.
fn wait_for(addr: SocketAddr, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let j = job(addr, id);
        if done(&j) || Instant::now() >= deadline {
            return j;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn upstream_calls(up: &Server) -> u64 {
    get(up.addr, "/stats").json()["requests"]
        .as_u64()
        .expect("a count")
}

#[test]
fn a_job_is_accepted_once_stored_runs_and_a_repeat_returns_the_same_job() {
    let up = Server::start_mock_upstream(&[]);
    let gw = Server::start_with_config(&gateway_toml(up.addr, ""), &[]);
    let r = submit(gw.addr, "hello job", Some("k-1"));
    assert_eq!(r.status, 202, "{}", r.describe());
    let accepted = r.json();
    let id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.header("location"),
        Some(format!("/api/jobs/{id}").as_str())
    );
    assert!(["queued", "running", "succeeded"].contains(&accepted["status"].as_str().unwrap()));

    let done = wait_for(gw.addr, &id, Duration::from_secs(10), |j| {
        j["status"] == "succeeded"
    });
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["metadata"]["text"], "hello job");
    let content = done["result"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(content.contains("hello job"), "{content}");
    assert!(done["wait_ms"].as_i64().is_some() && done["run_ms"].as_i64().is_some());

    // The same key: the same job, and no second call upstream.
    let calls = upstream_calls(&up);
    let again = submit(gw.addr, "hello job", Some("k-1"));
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["id"], id.as_str());
    assert_eq!(again.json()["status"], "succeeded");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(upstream_calls(&up), calls);

    let listed = get(gw.addr, "/api/jobs?status=succeeded").json();
    assert_eq!(listed["data"][0]["id"], id.as_str());
    let metrics = scrape(gw.addr);
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            metric_value(&scrape(gw.addr), "syncgate_jobs", &[("state", "succeeded")]) == Some(1.0)
        }),
        "{metrics}"
    );
}

#[test]
fn bad_submissions_answer_4xx_naming_what_is_wrong() {
    let up = Server::start_mock_upstream(&[]);
    let gw = Server::start_with_config(&gateway_toml(up.addr, ""), &[]);
    for (body, status, param) in [
        (json!({}), 400, Some("request")),
        (json!({"request": "x"}), 400, Some("request")),
        (
            json!({"request": {"model": "m"}}),
            400,
            Some("request.messages"),
        ),
        (
            json!({"request": {"model": "m", "stream": true,
                   "messages": [{"role": "user", "content": "x"}]}}),
            400,
            Some("request.stream"),
        ),
        (
            json!({"request": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
                   "metadata": 5}),
            400,
            Some("metadata"),
        ),
        (
            json!({"request": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}),
            404,
            None,
        ),
    ] {
        let r = post_json(gw.addr, "/api/jobs", &body.to_string());
        let err = assert_error(&r, status, None, None);
        if let Some(param) = param {
            assert_eq!(err["param"], param, "{body}");
        }
    }
    assert_error(
        &get(gw.addr, "/api/jobs/job_missing"),
        404,
        None,
        Some("not_found"),
    );
    assert_error(
        &cancel(gw.addr, "job_missing"),
        404,
        None,
        Some("not_found"),
    );
    assert_error(&get(gw.addr, "/api/jobs?status=done"), 400, None, None);
}

#[test]
fn queued_and_running_jobs_can_be_cancelled_and_capacity_is_explicit() {
    let up = Server::start_mock_upstream(&["--latency-ms", "1500"]);
    let gw = Server::start_with_config(
        &gateway_toml(up.addr, "workers = 1\nmax_queued = 2\nlease_ms = 5000"),
        &[],
    );
    let first = submit(gw.addr, "first", None).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let running = wait_for(gw.addr, &first, Duration::from_secs(5), |j| {
        j["status"] == "running"
    });
    assert_eq!(running["status"], "running");
    let second = submit(gw.addr, "second", None).json()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Two active jobs: the table is full.
    let full = submit(gw.addr, "third", None);
    assert_error(&full, 503, None, Some("jobs_full"));
    assert!(full.header("retry-after").is_some());

    let r = cancel(gw.addr, &second);
    assert_ok(&r, "cancelling a queued job");
    assert_eq!(r.json()["status"], "cancelled");
    let r = cancel(gw.addr, &first);
    assert_ok(&r, "cancelling a running job");
    assert_eq!(r.json()["cancel_requested"], true);
    let ended = wait_for(gw.addr, &first, Duration::from_secs(10), |j| {
        j["status"] != "running"
    });
    assert_eq!(ended["status"], "cancelled", "{ended:#}");
    assert!(ended["result"].is_null());
    assert_error(&cancel(gw.addr, &first), 409, None, Some("job_finished"));
    // The cancelled queued job never ran.
    assert_eq!(job(gw.addr, &second)["attempts"], 0);
}

#[test]
fn a_failing_provider_is_retried_up_to_max_attempts_then_the_job_fails() {
    let up = Server::start_mock_upstream(&["--fault", "status=500"]);
    let gw = Server::start_with_config(&gateway_toml(up.addr, "max_attempts = 2"), &[]);
    let id = submit(gw.addr, "doomed", None).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ended = wait_for(gw.addr, &id, Duration::from_secs(20), |j| {
        j["status"] == "failed"
    });
    assert_eq!(ended["status"], "failed", "{ended:#}");
    assert_eq!(ended["attempts"], 2);
    assert_eq!(ended["error"]["code"], "upstream_error", "{ended:#}");
}

#[test]
fn a_saturated_job_pool_leaves_v1_latency_alone() {
    let up = Server::start_mock_upstream(&["--latency-ms", "2000"]);
    let gw = Server::start_with_config(&gateway_toml(up.addr, "workers = 2"), &[]);
    for i in 0..10 {
        assert_eq!(submit(gw.addr, &format!("slow {i}"), None).status, 202);
    }
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
            get(gw.addr, "/api/jobs?status=running").json()["data"]
                .as_array()
                .is_some_and(|d| d.len() == 2)
        }),
        "the job runners never filled"
    );
    // Every job runner is busy for seconds; a /v1 call on the built-in mock is not delayed.
    let started = Instant::now();
    assert_ok(
        &chat(gw.addr, "are you there"),
        "a /v1 call beside busy jobs",
    );
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[test]
fn every_accepted_job_survives_kill_9_and_runs_to_success_once_from_the_clients_view() {
    let db = TempDb::new();
    accepted_jobs_survive_kill_9(&db.path_str());
}

/// The same on PostgreSQL (issue 14): claims with SKIP LOCKED and leases survive a kill too.
#[test]
fn every_accepted_job_survives_kill_9_on_postgres() {
    let Some(pg) = fresh_postgres() else { return };
    accepted_jobs_survive_kill_9(&pg.url());
}

fn accepted_jobs_survive_kill_9(db_path: &str) {
    let up = Server::start_mock_upstream(&["--latency-ms", "300"]);
    let config = gateway_toml(up.addr, "workers = 4\nlease_ms = 800");
    let start = || Server::start_full(&["--db", db_path], &[], Some(TempConfig::new(&config)));
    let gw = start();
    let mut accepted = Vec::new();
    for i in 0..12 {
        let key = format!("kill-{i}");
        let r = submit(gw.addr, &format!("job {i}"), Some(&key));
        assert_eq!(r.status, 202, "{}", r.describe());
        accepted.push((key, r.json()["id"].as_str().unwrap().to_string()));
    }
    // Some are running (4 runners) and the rest queued when the process dies.
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
            get(gw.addr, "/api/jobs?status=running").json()["data"]
                .as_array()
                .is_some_and(|d| !d.is_empty())
        }),
        "no job started"
    );
    gw.signal(libc::SIGKILL);
    drop(gw);

    let gw = start();
    // The client did not see its answers: it repeats each submission with its key.
    for (key, id) in &accepted {
        let n = key.trim_start_matches("kill-");
        let r = submit(gw.addr, &format!("job {n}"), Some(key));
        assert_eq!(r.status, 202);
        assert_eq!(r.json()["id"], id.as_str(), "a repeat made a second job");
    }
    let mut rerun = 0;
    for (_, id) in &accepted {
        let ended = wait_for(gw.addr, id, Duration::from_secs(20), |j| {
            j["status"] != "queued" && j["status"] != "running"
        });
        assert_eq!(ended["status"], "succeeded", "{ended:#}");
        if ended["attempts"].as_u64() > Some(1) {
            rerun += 1;
        }
    }
    let all = get(gw.addr, "/api/jobs?limit=100").json();
    assert_eq!(all["data"].as_array().unwrap().len(), accepted.len());
    assert!(
        rerun >= 1,
        "no job was running at the kill, so none had to run again"
    );
    eprintln!(
        "kill -9: {} jobs accepted, all succeeded after restart, {rerun} ran again after losing their lease",
        accepted.len()
    );
}

/// Issue 15, point 6: on SQLite (one process a file) the jobs a killed server was running are
/// taken again as soon as the next one starts, not when their leases run out.
#[test]
fn a_restarted_sqlite_server_resumes_the_jobs_that_were_running_at_once() {
    const LEASE: Duration = Duration::from_secs(20);
    let up = Server::start_mock_upstream(&["--latency-ms", "1000"]);
    let db = TempDb::new();
    let config = gateway_toml(
        up.addr,
        &format!("workers = 2\nlease_ms = {}", LEASE.as_millis()),
    );
    let start = || {
        Server::start_full(
            &["--db", &db.path_str()],
            &[],
            Some(TempConfig::new(&config)),
        )
    };
    let gw = start();
    let ids: Vec<String> = (0..2)
        .map(|i| {
            let r = submit(gw.addr, &format!("held {i}"), None);
            assert_eq!(r.status, 202, "{}", r.describe());
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
            ids.iter().all(|id| job(gw.addr, id)["status"] == "running")
        }),
        "the jobs never started"
    );
    gw.signal(libc::SIGKILL);
    drop(gw);

    let restarted = Instant::now();
    let gw = start();
    for id in &ids {
        let ended = wait_for(gw.addr, id, LEASE, |j| j["status"] == "succeeded");
        assert_eq!(ended["status"], "succeeded", "{ended:#}");
        assert_eq!(ended["attempts"], 2, "{ended:#}");
    }
    let took = restarted.elapsed();
    // Start, a second attempt of 1 s each, and polling: far below the 20 s lease.
    assert!(
        took < LEASE / 4,
        "resumed after {took:?} with a lease of {LEASE:?}"
    );
    assert!(
        gw.log()
            .contains("2 jobs were running when the last process stopped"),
        "{}",
        gw.log()
    );
    eprintln!(
        "SQLite restart: 2 jobs running at kill -9 finished {} ms after the restart (lease {} ms)",
        took.as_millis(),
        LEASE.as_millis()
    );
}

/// Issue 14, point 4: finished jobs are deleted `[jobs] retention_days` after they finished;
/// a deleted job is unknown (404) and the others stay.
#[test]
fn a_job_finished_longer_ago_than_retention_days_is_deleted_and_answers_404() {
    const DAY_MS: i64 = 86_400_000;
    let up = Server::start_mock_upstream(&[]);
    let db = TempDb::new();
    let toml = gateway_toml(up.addr, "retention_days = 7");
    let args = ["--db", &db.path_str()];
    let gw = Server::start_with_config(&toml, &args);
    let mut ids = Vec::new();
    for text in ["old", "recent"] {
        let r = submit(gw.addr, text, None);
        assert_eq!(r.status, 202, "{}", r.describe());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let j = wait_for(gw.addr, id, Duration::from_secs(10), |j| {
            j["status"] == "succeeded"
        });
        assert_eq!(j["status"], "succeeded", "{j}");
    }
    let mut gw = gw;
    gw.signal(libc::SIGTERM);
    assert!(gw
        .wait_exit(Duration::from_secs(15))
        .is_some_and(|s| s.success()));
    // The first finished eight days ago; the second six.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let conn = rusqlite::Connection::open(&db.path).expect("open");
    for (id, days) in [(&ids[0], 8), (&ids[1], 6)] {
        conn.execute(
            "UPDATE jobs SET finished_ms = ?2 WHERE id = ?1",
            rusqlite::params![id, now - days * DAY_MS],
        )
        .expect("age the job");
    }
    drop(conn);

    let gw = Server::start_with_config(&toml, &args);
    let gone = || get(gw.addr, &format!("/api/jobs/{}", ids[0])).status == 404;
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(25), gone),
        "the old job is still there: {}\n{}",
        get(gw.addr, &format!("/api/jobs/{}", ids[0])).describe(),
        gw.log()
    );
    assert_error(
        &get(gw.addr, &format!("/api/jobs/{}", ids[0])),
        404,
        None,
        None,
    );
    assert_eq!(job(gw.addr, &ids[1])["status"], "succeeded");
    let expired = metric_value(&scrape(gw.addr), "syncgate_store_jobs_expired_total", &[]);
    assert_eq!(expired, Some(1.0));
    let logged = || {
        gw.log()
            .contains("retention: deleted 1 finished jobs older than 7 days")
    };
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(20), logged),
        "expected the deletion to be logged with its count\n{}",
        gw.log()
    );
}
