//! syncgate on PostgreSQL, end to end (issue 14): `--db postgres://…` for `migrate`, `keys`,
//! `serve` and `usage` against the throwaway cluster `scripts/test` starts. Keys made and
//! revoked by the CLI reach a running server, calls land in the request log and usage, and the
//! database password appears in no output, log line, error or `--help`. The store's own
//! behaviour tests (src/store/) and the kill -9 tests of conversations and jobs run on
//! PostgreSQL too.

mod common;

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
    assert!(
        migrated.stdout.contains("migrated schema version 0 -> 2")
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
#[test]
fn the_database_going_away_answers_503_keeps_v1_working_and_recovers_without_a_restart() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let gw = Server::start(&["--db", &cluster.url()]);
    let create = || post_json(gw.addr, "/api/conversations", r#"{"title":"t"}"#);
    assert_eq!(get(gw.addr, "/readyz").status, 200);
    assert_eq!(create().status, 201, "{}", gw.log());

    let stopped = Instant::now();
    cluster.stop();
    let noticed = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        get(gw.addr, "/readyz").status == 503
    });
    let readyz_after = stopped.elapsed();
    assert!(
        noticed,
        "/readyz never said the database was gone:\n{}",
        gw.log()
    );
    assert_eq!(
        get(gw.addr, "/readyz").json()["status"],
        "store_unavailable"
    );
    let asked = Instant::now();
    let refused = create();
    let refused_in = asked.elapsed();
    assert_error(&refused, 503, None, Some("store_unavailable"));
    assert!(
        refused.header("retry-after").is_some(),
        "{}",
        refused.describe()
    );
    assert!(refused_in < Duration::from_secs(1), "took {refused_in:?}");
    assert_ok(
        &chat(gw.addr, "still here"),
        "a /v1 call while the database is down",
    );

    let restarted = Instant::now();
    cluster.start_again();
    let back = poll_until(Duration::from_secs(15), Duration::from_millis(50), || {
        get(gw.addr, "/readyz").status == 200
    });
    let recovered_in = restarted.elapsed();
    assert!(back, "/readyz never recovered:\n{}", gw.log());
    assert_eq!(create().status, 201, "{}", gw.log());
    eprintln!(
        "database down: /readyz 503 after {:.2} s, a store call refused in {:.0} ms, \
         ready again {:.2} s after the database restarted",
        readyz_after.as_secs_f64(),
        refused_in.as_secs_f64() * 1000.0,
        recovered_in.as_secs_f64()
    );
}
