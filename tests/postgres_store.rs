//! syncgate on PostgreSQL, end to end (issue 14): `--db postgres://…` for `migrate`, `keys`,
//! `serve` and `usage` against the throwaway cluster `scripts/test` starts. Keys made and
//! revoked by the CLI reach a running server, calls land in the request log and usage, and the
//! database password appears in no output, log line, error or `--help`. The store's own
//! behaviour tests (src/store/) and the kill -9 tests of conversations and jobs run on
//! PostgreSQL too.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Everything a process printed, for the password check.
fn all_output(exit: &Exit) -> String {
    format!("{}{}", exit.stdout, exit.stderr)
}

#[test]
fn migrate_keys_serve_and_usage_work_on_postgres_and_never_show_the_password() {
    let Some(pg) = fresh_postgres() else { return };
    let url = pg.url();
    let password = PgUrl::parse(&url)
        .expect("the test URL parses")
        .password()
        .expect("the test cluster requires a password");
    let mut seen = String::new();

    let migrated = run_to_exit(&["migrate", "--db", &url], &[], EXIT_DEADLINE);
    assert!(
        migrated.status.is_some_and(|s| s.success()),
        "{}",
        migrated.stderr
    );
    let latest = std::fs::read_dir("migrations/postgres")
        .expect("the migrations")
        .count();
    assert!(
        migrated
            .stdout
            .contains(&format!("migrated schema version 0 -> {latest}"))
            && migrated.stdout.contains(":***@"),
        "{}",
        migrated.stdout
    );
    seen.push_str(&all_output(&migrated));
    let again = run_to_exit(&["migrate", "--db", &url], &[], EXIT_DEADLINE);
    assert!(again.stdout.contains("is up to date"), "{}", again.stdout);

    let made = run_to_exit(
        &["keys", "create", "--db", &url, "--name", "pg-ci"],
        &[],
        EXIT_DEADLINE,
    );
    assert!(made.status.is_some_and(|s| s.success()), "{}", made.stderr);
    let key = made.stdout.trim().to_string();
    assert!(key.starts_with("sk-sg-"), "{}", made.stdout);
    seen.push_str(&made.stderr);

    let gw = Server::start(&["--db", &url]);
    let bearer = format!("Bearer {key}");
    let call = |auth: Option<&str>| {
        let mut headers = vec![("Connection", "close")];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        send(gw.addr, &chat_req("hello postgres", &headers))
    };
    assert_error(&call(None), 401, None, Some("missing_api_key"));
    assert_ok(&call(Some(&bearer)), "a keyed call");

    // The call is in the request log and in usage, read back from PostgreSQL.
    let logged = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let r = send(
            gw.addr,
            &get_req(
                "/api/requests?model=mock",
                &[("Authorization", &bearer), ("Connection", "close")],
            ),
        );
        r.status == 200 && r.json()["data"].as_array().is_some_and(|d| !d.is_empty())
    });
    assert!(
        logged,
        "the call never reached the request log:\n{}",
        gw.log()
    );
    let usage = run_to_exit(&["usage", "--db", &url], &[], EXIT_DEADLINE);
    assert!(
        usage.status.is_some_and(|s| s.success()) && usage.stdout.contains("mock"),
        "{}{}",
        usage.stdout,
        usage.stderr
    );
    seen.push_str(&all_output(&usage));

    // A key revoked by the CLI is refused by the running server once it sees the change.
    let revoked = run_to_exit(&["keys", "revoke", "1", "--db", &url], &[], EXIT_DEADLINE);
    assert!(revoked.stdout.contains("revoked"), "{}", revoked.stdout);
    let refused = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        call(Some(&bearer)).status == 401
    });
    assert!(refused, "the revoked key still works:\n{}", gw.log());

    let help = run_to_exit(
        &["serve", "--help"],
        &[("SYNCGATE_DB", &url)],
        EXIT_DEADLINE,
    );
    seen.push_str(&all_output(&help));
    seen.push_str(&gw.log());
    assert!(
        !seen.contains(&password),
        "the database password was shown:\n{seen}"
    );
    assert!(
        gw.log()
            .contains(&format!(":***@{}", url.rsplit('@').next().unwrap())),
        "the start-up line names the database, masked:\n{}",
        gw.log()
    );
}

#[test]
fn an_unreachable_database_stops_start_up_naming_host_and_port_but_not_the_password() {
    let exit = run_serve_to_exit(
        &["--db", "postgres://sg:hunter2-secret@127.0.0.1:9/gateway"],
        &[],
    );
    assert!(!exit.started_serving, "it served without its database");
    assert!(exit.status.is_some_and(|s| !s.success()), "{}", exit.stderr);
    assert!(
        exit.stderr
            .contains("cannot connect to PostgreSQL at 127.0.0.1:9/gateway"),
        "{}",
        exit.stderr
    );
    assert!(!all_output(&exit).contains("hunter2"), "{}", exit.stderr);
}

/// The database stops under a running server and comes back (issue 14): calls that need it
/// are answered `503 store_unavailable` at once instead of hanging, `/readyz` says so, `/v1`
/// calls that need no acknowledged write go on, and the server recovers by itself when the
/// database is back, with no restart.
/// What the callers of the database-down test saw.
#[derive(Default)]
struct Seen {
    /// Conversations answered 201: acknowledged, so they must survive.
    created: Vec<String>,
    /// Request ids of /v1 calls answered 200: their log rows must land or be counted dropped.
    chats: Vec<String>,
    /// Store calls refused with 503 store_unavailable and a Retry-After.
    refused: usize,
    /// Anything else: a wrong status, a missing header, a broken connection.
    unexpected: Vec<String>,
    /// The longest any one call took.
    slowest: Duration,
}

/// Callers that create conversations and call /v1 until `stop`, each call on its own
/// connection, recording what came back.
fn load(
    addr: std::net::SocketAddr,
    seen: &Arc<Mutex<Seen>>,
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<()>> {
    (0..6)
        .map(|n| {
            let (seen, stop) = (Arc::clone(seen), Arc::clone(stop));
            thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let started = Instant::now();
                    let chat_id = format!("down-{n}-{i}");
                    let raw = if n < 4 {
                        post_req(
                            "/api/conversations",
                            &format!(r#"{{"title":"load {n} {i}"}}"#),
                            &[("Connection", "close")],
                        )
                    } else {
                        chat_req(
                            "under load",
                            &[("X-Request-Id", &chat_id), ("Connection", "close")],
                        )
                    };
                    let answer = try_send(addr, &raw);
                    let took = started.elapsed();
                    let mut seen = seen.lock().unwrap();
                    seen.slowest = seen.slowest.max(took);
                    match answer {
                        Ok(r) if r.status == 201 && n < 4 => seen
                            .created
                            .push(r.json()["id"].as_str().unwrap().to_string()),
                        Ok(r) if r.status == 200 && n >= 4 => seen.chats.push(chat_id),
                        Ok(r)
                            if r.status == 503
                                && n < 4
                                && r.json()["error"]["code"] == "store_unavailable"
                                && r.header("retry-after").is_some() =>
                        {
                            seen.refused += 1
                        }
                        Ok(r) => seen.unexpected.push(r.describe()),
                        Err(e) => seen.unexpected.push(format!("call {n}/{i}: {e}")),
                    }
                    drop(seen);
                    // Paced, so the rows to check at the end stay a few thousand.
                    thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect()
}

/// Every request id in the request log, page by page.
fn logged_request_ids(addr: std::net::SocketAddr) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut before = String::new();
    loop {
        let page = get(addr, &format!("/api/requests?limit=1000{before}")).json();
        let rows = page["data"].as_array().cloned().unwrap_or_default();
        ids.extend(
            rows.iter()
                .filter_map(|r| r["request_id"].as_str().map(str::to_string)),
        );
        match rows.last() {
            Some(last) if page["has_more"] == true => before = format!("&before={}", last["id"]),
            _ => return ids,
        }
    }
}

#[test]
fn the_database_stopped_under_load_loses_no_acknowledged_write_and_recovers_without_a_restart() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let gw = Server::start(&["--db", &cluster.url()]);
    assert_eq!(get(gw.addr, "/readyz").status, 200);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let callers = load(gw.addr, &seen, &stop);
    let counts = || {
        let s = seen.lock().unwrap();
        (s.created.len(), s.chats.len(), s.refused)
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        assert!(
            poll_until(Duration::from_secs(15), Duration::from_millis(20), done),
            "{what} never happened; seen so far {:?}:\n{}",
            counts(),
            gw.log()
        );
    };
    wait("20 conversations before the stop", &|| counts().0 >= 20);

    let stopped = Instant::now();
    cluster.stop();
    wait("/readyz 503", &|| get(gw.addr, "/readyz").status == 503);
    let readyz_after = stopped.elapsed();
    assert_eq!(
        get(gw.addr, "/readyz").json()["status"],
        "store_unavailable"
    );
    let asked = Instant::now();
    let refused = post_json(gw.addr, "/api/conversations", r#"{"title":"t"}"#);
    let refused_in = asked.elapsed();
    assert_error(&refused, 503, None, Some("store_unavailable"));
    assert!(refused_in < Duration::from_secs(1), "took {refused_in:?}");
    let (_, chats_before, refused_before) = counts();
    wait("20 refusals and 5 /v1 answers while down", &|| {
        let (_, chats, refused) = counts();
        refused >= refused_before + 20 && chats >= chats_before + 5
    });

    let restarted = Instant::now();
    cluster.start_again();
    wait("/readyz 200 again", &|| {
        get(gw.addr, "/readyz").status == 200
    });
    let recovered_in = restarted.elapsed();
    let created_back = counts().0;
    wait("20 conversations after the restart", &|| {
        counts().0 >= created_back + 20
    });
    stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    for caller in callers {
        while !caller.is_finished() {
            assert!(
                Instant::now() < deadline,
                "a caller is stuck:\n{}",
                gw.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        caller.join().unwrap();
    }

    let seen = seen.lock().unwrap();
    assert!(
        seen.unexpected.is_empty(),
        "unexpected answers: {:#?}\n{}",
        seen.unexpected,
        gw.log()
    );
    assert!(
        seen.slowest < Duration::from_secs(10),
        "a call took {:?}",
        seen.slowest
    );
    for id in &seen.created {
        let found = get(gw.addr, &format!("/api/conversations/{id}"));
        assert_eq!(found.status, 200, "acknowledged conversation {id} is gone");
    }
    // The /v1 calls made while the database was down wait in the log queue; each lands in
    // the request log once it is back, or is counted dropped.
    let mut logged = 0;
    let mut dropped = 0.0;
    let settled = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        dropped = metric_value(
            &scrape(gw.addr),
            "syncgate_store_log_rows_dropped_total",
            &[],
        )
        .unwrap_or(0.0);
        let found = logged_request_ids(gw.addr);
        logged = seen.chats.iter().filter(|id| found.contains(*id)).count();
        logged as f64 + dropped >= seen.chats.len() as f64
    });
    assert!(
        settled,
        "{} /v1 calls answered, {logged} logged, {dropped} rows counted dropped",
        seen.chats.len()
    );
    let busy = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        metric_value(&scrape(gw.addr), "syncgate_workers_busy", &[]) == Some(0.0)
    });
    assert!(busy, "a worker is still busy:\n{}", scrape(gw.addr));
    eprintln!(
        "database down under load: /readyz 503 after {:.2} s, a store call refused in {:.0} ms, \
         ready again {:.2} s after the database restarted; {} conversations acknowledged (all \
         found), {} refused with 503, {} /v1 answers ({logged} logged, {dropped} dropped), the \
         slowest call {:.0} ms",
        readyz_after.as_secs_f64(),
        refused_in.as_secs_f64() * 1000.0,
        recovered_in.as_secs_f64(),
        seen.created.len(),
        seen.refused,
        seen.chats.len(),
        seen.slowest.as_secs_f64() * 1000.0
    );
}
