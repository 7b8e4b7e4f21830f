//! syncgate to PostgreSQL over TLS (issue 14 point 2): `sslmode` and `sslrootcert` in `--db`
//! mean what they mean to libpq. A cluster of the test's own takes TLS only (`hostssl`, plain
//! connections rejected), so a connection that works there is TLS; its certificate names
//! `localhost` and `127.0.0.1`, is signed by a CA made for it, and is also reachable at
//! 127.0.0.2, a name it does not carry.

mod common;

use common::*;

/// A password the trust-authenticated clusters ignore, to check that no error shows it.
const PASSWORD: &str = "hunter2-tls-secret";

/// `migrate --db URL` with `query` after the URL (and the test password in it), to its end.
fn migrate(url: &str, query: &str) -> Exit {
    let url = url.replacen("syncgate@", &format!("syncgate:{PASSWORD}@"), 1);
    run_to_exit(
        &["migrate", "--db", &format!("{url}{query}")],
        &[],
        EXIT_DEADLINE,
    )
}

fn assert_migrated(exit: &Exit, what: &str) {
    assert!(
        exit.status.is_some_and(|s| s.success()) && exit.stdout.contains("migrated"),
        "{what}: expected the migration to run\nstdout: {}\nstderr: {}",
        exit.stdout,
        exit.stderr
    );
}

/// The run failed, saying each of `says`, and showed no password.
fn assert_refused(exit: &Exit, what: &str, says: &[&str]) {
    assert!(
        exit.status.is_some_and(|s| !s.success()),
        "{what}: expected a failure\nstdout: {}\nstderr: {}",
        exit.stdout,
        exit.stderr
    );
    for said in says {
        assert!(
            exit.stderr.contains(said),
            "{what}: expected the error to say {said:?}\nstderr: {}",
            exit.stderr
        );
    }
    let all = format!("{}{}", exit.stdout, exit.stderr);
    assert!(
        !all.contains(PASSWORD),
        "{what}: the password was shown: {all}"
    );
}

#[test]
fn require_prefer_and_verified_modes_connect_over_tls_and_serve_from_the_store() {
    let Some(cluster) = PgCluster::start_tls() else {
        return;
    };
    let ca = cluster.ca_pem().display().to_string();
    let local = cluster.url();

    // Each run migrates the same database: the first finds schema 0, the rest find it done,
    // and either way the connection was made, over TLS (the cluster takes nothing else).
    let first = migrate(&local, "?sslmode=require");
    assert_migrated(&first, "sslmode=require, no sslrootcert");
    for (url, query, what) in [
        (&local, String::new(), "no sslmode (prefer)"),
        (
            &local,
            format!("?sslmode=require&sslrootcert={ca}"),
            "require with the CA",
        ),
        (
            &local,
            format!("?sslmode=verify-full&sslrootcert={ca}"),
            "verify-full at 127.0.0.1",
        ),
        (
            &cluster.url_at("localhost"),
            format!("?sslmode=verify-full&sslrootcert={ca}"),
            "verify-full at localhost",
        ),
        (
            &cluster.url_at("127.0.0.2"),
            format!("?sslmode=verify-ca&sslrootcert={ca}"),
            "verify-ca at a name the certificate does not carry",
        ),
    ] {
        let again = migrate(url, &query);
        assert!(
            again.status.is_some_and(|s| s.success()) && again.stdout.contains("up to date"),
            "{what}: expected to connect\nstdout: {}\nstderr: {}",
            again.stdout,
            again.stderr
        );
    }

    // libpq's words say the same as the URL's query.
    let words = format!(
        "host=localhost port={} user=syncgate dbname=postgres sslmode=verify-full \
         sslrootcert={ca}",
        cluster.port()
    );
    let again = run_to_exit(&["migrate", "--db", &words], &[], EXIT_DEADLINE);
    assert!(
        again.stdout.contains("up to date"),
        "verify-full in libpq's words: expected to connect\nstdout: {}\nstderr: {}",
        again.stdout,
        again.stderr
    );

    // A server on verify-full answers a store-backed call.
    let url = format!("{local}?sslmode=verify-full&sslrootcert={ca}");
    let gw = Server::start(&["--db", &url]);
    let made = post_json(gw.addr, "/api/conversations", r#"{"title":"over tls"}"#);
    assert_eq!(made.status, 201, "{}\n{}", made.describe(), gw.log());
    assert!(
        gw.log().contains("sslmode=verify-full"),
        "the start-up line names the sslmode:\n{}",
        gw.log()
    );
}

#[test]
fn plain_untrusted_and_misnamed_connections_to_a_tls_server_are_refused() {
    let Some(cluster) = PgCluster::start_tls() else {
        return;
    };
    let ca = cluster.ca_pem().display().to_string();
    let other_ca = cluster.other_ca_pem().display().to_string();
    let local = cluster.url();

    // The server rejects a plain connection; the error names the server, not the password.
    assert_refused(
        &migrate(&local, "?sslmode=disable"),
        "sslmode=disable",
        &[
            "cannot connect to PostgreSQL at 127.0.0.1:",
            "no encryption",
        ],
    );
    assert_refused(
        &migrate(
            &local,
            &format!("?sslmode=verify-full&sslrootcert={other_ca}"),
        ),
        "verify-full with another CA",
        &[
            "cannot connect to PostgreSQL at 127.0.0.1:",
            "TLS handshake",
            &format!("the server's certificate is not trusted by sslrootcert {other_ca}"),
        ],
    );
    // libpq: require with a root certificate checks the chain.
    assert_refused(
        &migrate(&local, &format!("?sslmode=require&sslrootcert={other_ca}")),
        "require with another CA",
        &["TLS handshake", "is not trusted"],
    );
    // Without sslrootcert the roots are webpki-roots, which never signed a test CA.
    assert_refused(
        &migrate(&local, "?sslmode=verify-full"),
        "verify-full with webpki-roots",
        &["is not trusted by webpki-roots"],
    );
    assert_refused(
        &migrate(
            &cluster.url_at("127.0.0.2"),
            &format!("?sslmode=verify-full&sslrootcert={ca}"),
        ),
        "verify-full at a name the certificate does not carry",
        &[
            "cannot connect to PostgreSQL at 127.0.0.2:",
            "TLS handshake",
            "certificate not valid for name \"127.0.0.2\"",
        ],
    );
    assert_refused(
        &migrate(
            &local,
            "?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ),
        "an sslrootcert that is not there",
        &["cannot read sslrootcert /nonexistent/ca.pem"],
    );
    assert_refused(
        &migrate(&local, "?sslmode=verify_full"),
        "an unknown sslmode",
        &["sslmode must be disable, prefer, require, verify-ca or verify-full"],
    );
}

#[test]
fn prefer_connects_in_plain_to_a_server_without_tls_and_require_refuses_it() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    assert_migrated(
        &migrate(&cluster.url(), "?sslmode=prefer"),
        "sslmode=prefer",
    );
    assert_refused(
        &migrate(&cluster.url(), "?sslmode=require"),
        "sslmode=require without TLS on the server",
        &["TLS handshake", "server does not support TLS"],
    );
}
