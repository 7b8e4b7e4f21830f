//! The PostgreSQL the store's tests run against (issue 14: PostgreSQL as a second store backend
//! beside SQLite): `./scripts/test` starts a throwaway cluster and names it in
//! SYNCGATE_TEST_POSTGRES_URL, and tests/common/postgres.rs gives each test a fresh database.
//! These check that before any store test relies on it: a database is fresh, empty, usable, its
//! own, gone after the test, and the cluster's password shows up nowhere it should not.

mod common;

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How many databases named `name` the cluster has, asked from `other`'s connection.
fn databases_named(other: &PgDatabase, name: &str) -> String {
    other.query_value(&format!(
        "SELECT count(*) FROM pg_database WHERE datname = '{name}'"
    ))
}

#[test]
fn a_fresh_database_is_empty_and_usable() {
    let Some(pg) = fresh_postgres() else {
        return;
    };
    assert_eq!(pg.query_value("SELECT current_database()"), pg.name());
    let user_relations = "SELECT count(*) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg_toast%'";
    assert_eq!(
        pg.query_value(user_relations),
        "0",
        "a fresh database has no tables"
    );

    pg.execute("CREATE TABLE calls (id bigint PRIMARY KEY, model text NOT NULL, tokens int)");
    pg.execute("INSERT INTO calls VALUES (1, 'mock', 12), (2, 'fast', NULL)");
    assert_eq!(pg.query_value("SELECT count(*) FROM calls"), "2");
    assert_eq!(
        pg.query_value("SELECT model FROM calls WHERE id = 2"),
        "fast"
    );
    assert_eq!(
        pg.query_value("SELECT tokens FROM calls WHERE id = 2"),
        "",
        "NULL reads as empty"
    );

    // The URL the code under test gets reaches the same database, password and all.
    assert_eq!(
        psql_at(&pg.url(), "SELECT sum(tokens) FROM calls").as_deref(),
        Ok("12\n")
    );
}

#[test]
fn two_fresh_databases_are_distinct() {
    let Some(a) = fresh_postgres() else {
        return;
    };
    let b = fresh_postgres().expect("a second database from the same cluster");
    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());
    a.execute("CREATE TABLE only_in_a (x int)");
    assert_eq!(
        b.query_value("SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"),
        "0",
        "a table made in {} shows in {}",
        a.name(),
        b.name()
    );
}

#[test]
fn a_database_is_dropped_when_its_test_ends() {
    let Some(pg) = fresh_postgres() else {
        return;
    };
    let other = fresh_postgres().expect("a second database from the same cluster");
    let name = pg.name().to_string();
    assert_eq!(databases_named(&other, &name), "1");
    drop(pg);
    assert_eq!(
        databases_named(&other, &name),
        "0",
        "{name} outlived its PgDatabase"
    );
}

#[test]
fn a_database_still_in_use_is_dropped_too() {
    let Some(pg) = fresh_postgres() else {
        return;
    };
    let other = fresh_postgres().expect("a second database from the same cluster");
    let name = pg.name().to_string();
    // A session the test left open, as a store's pool would be.
    let url = pg.url();
    let session = thread::spawn(move || psql_at(&url, "SELECT pg_sleep(20)"));
    let in_use = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'");
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            other.query_value(&in_use) != "0"
        }),
        "the session on {name} did not show in pg_stat_activity within 10 s"
    );

    let dropping = Instant::now();
    drop(pg);
    assert_eq!(
        databases_named(&other, &name),
        "0",
        "{name} outlived its PgDatabase"
    );
    let ended = session.join().expect("the session's thread");
    assert!(ended.is_err(), "the open session was not ended: {ended:?}");
    assert!(
        dropping.elapsed() < Duration::from_secs(10),
        "dropping a database in use took {:?}",
        dropping.elapsed()
    );
}

/// Every running psql this test process started, by its command line.
fn psql_command_lines() -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`: the name may hold spaces, so count from its `)`.
            let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (parent == me && cmdline.contains("psql")).then_some(cmdline)
        })
        .collect()
}

#[test]
fn the_password_is_in_the_url_and_in_no_output() {
    let Some(pg) = fresh_postgres() else {
        return;
    };
    let env_url = std::env::var(POSTGRES_URL_VAR).expect("fresh_postgres found it");
    let password = PgUrl::parse(&env_url)
        .expect("the environment's URL")
        .password()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| panic!("{POSTGRES_URL_VAR} carries no password"));
    assert!(
        pg.url().contains(&password),
        "url() is what the store connects with"
    );

    let err = pg
        .try_query("SELECT * FROM no_such_table")
        .expect_err("a missing table");
    assert!(
        err.contains("no_such_table"),
        "psql's error is passed on: {err}"
    );
    assert!(
        !err.contains(&password),
        "an error shows the password: {err}"
    );

    let panicked = panic::catch_unwind(AssertUnwindSafe(|| pg.query_value("SELECT nope")))
        .expect_err("a failing query_value panics");
    let message = panicked
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("nope"),
        "the panic names what failed: {message}"
    );
    assert!(
        !message.contains(&password),
        "a panic shows the password: {message}"
    );

    let shown = format!("{pg:?}");
    assert!(
        !shown.contains(&password),
        "Debug shows the password: {shown}"
    );
    let bad = PgUrl::parse(&env_url.replace("://", ":/")).expect_err("a mangled URL");
    assert!(
        !bad.contains(&password),
        "a parse error shows the password: {bad}"
    );

    // psql is handed the password in its environment, not on its command line, where any user
    // of the machine could read it.
    let url = pg.url();
    let sleeper = thread::spawn(move || psql_at(&url, "SELECT pg_sleep(1)"));
    let mut seen = Vec::new();
    poll_until(Duration::from_secs(5), Duration::from_millis(5), || {
        seen = psql_command_lines();
        seen.iter().any(|line| line.contains("pg_sleep"))
    });
    assert!(
        seen.iter().any(|line| line.contains("pg_sleep")),
        "psql never showed in /proc: {seen:?}"
    );
    for line in &seen {
        assert!(
            !line.contains(&password),
            "psql's command line shows the password: {line}"
        );
    }
    assert_eq!(sleeper.join().expect("the sleeper"), Ok("\n".to_string()));
}

#[test]
fn the_cluster_refuses_a_wrong_password() {
    let Some(pg) = fresh_postgres() else {
        return;
    };
    let password = PgUrl::parse(&pg.url())
        .expect("url()")
        .password()
        .expect("a password");
    let wrong = format!("wrong{password}");
    let wrong_url = pg
        .url()
        .replace(&format!(":{password}@"), &format!(":{wrong}@"));
    let err = psql_at(&wrong_url, "SELECT 1").expect_err("a wrong password is refused");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(
        !err.contains(&password),
        "the error shows a password: {err}"
    );
}

#[test]
fn a_url_is_taken_apart_without_showing_its_password() {
    let url = PgUrl::parse("postgresql://sg:p%40ss:w@db.example:5433/postgres?sslmode=disable")
        .expect("a URL with a percent-encoded password and options");
    assert_eq!(url.password().as_deref(), Some("p@ss:w"));
    assert_eq!(
        url.redacted(),
        "postgresql://sg@db.example:5433/postgres?sslmode=disable"
    );
    assert_eq!(format!("{url:?}"), format!("PgUrl({})", url.redacted()));
    assert_eq!(
        url.with_database("sg_1_2").url(),
        "postgresql://sg:p%40ss:w@db.example:5433/sg_1_2?sslmode=disable"
    );
    for bad in [
        "mysql://sg:secret@h/db",
        "postgres://sg:secret@h",
        "postgres://h/db",
        "postgres://sg:secret@/db",
    ] {
        let err = PgUrl::parse(bad).expect_err(bad);
        assert!(!err.contains("secret"), "{err}");
    }
}
