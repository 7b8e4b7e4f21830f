//! Lifecycle: graceful drain on SIGTERM, configuration validation (unknown keys, invalid values) and flag > env > file precedence.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigterm_drains_in_flight_requests_rejects_new_ones_and_exits_zero() {
    let mut srv = Server::start(&["--mock-latency-ms", "1000"]);
    let addr = srv.addr;

    // Two idle keep-alive connections opened before the signal: one to watch for draining, one to
    // send a new request on afterwards.
    let mut probe = Conn::open(addr);
    let mut idle = Conn::open(addr);
    for (name, c) in [("probe", &mut probe), ("idle", &mut idle)] {
        let r = c.request(&get_req("/healthz", &[]));
        assert_ok(&r, &format!("/healthz on the {name} connection"));
        assert!(
            !r.closes(),
            "{name}: expected a keep-alive connection; got:\n{}",
            r.describe()
        );
    }

    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let mut c = Conn::open(addr);
            c.write_all(&chat_req(&format!("in flight {i}"), &[]))
                .expect("write in-flight request");
            thread::spawn(move || c.read_response())
        })
        .collect();
    wait_for_metric(
        addr,
        "syncgate_workers_busy",
        &[],
        |v| (v - 3.0).abs() < 0.5,
        Duration::from_secs(10),
    );

    let signalled = Instant::now();
    srv.signal(libc::SIGTERM);

    // The signal is asynchronous: wait (on a connection that already exists) until the server
    // reports it is draining. It says so by answering 503, or, when the drain begins between
    // a "ready" body being built and written, by closing the probe after a 200: while draining,
    // every answer carries `Connection: close`.
    let mut last = String::new();
    let draining = poll_until(Duration::from_secs(3), Duration::from_millis(10), || {
        match probe.try_request(&get_req("/readyz", &[])) {
            Ok(r) if r.status == 503 => true,
            Ok(r) if r.status == 200 && r.closes() => true,
            Ok(r) if r.status == 200 => {
                last = r.describe();
                false
            }
            Ok(r) => panic!(
                "expected /readyz on the probe connection to answer 200 (then 503 once draining); got:\n{}",
                r.describe()
            ),
            Err(e) => panic!(
                "the pre-opened probe connection failed after SIGTERM ({e}); last /readyz:\n{last}"
            ),
        }
    });
    assert!(
        draining,
        "expected /readyz to answer 503 within 3 s of SIGTERM; last answer:\n{last}"
    );

    let r = idle
        .try_request(&chat_req("too late", &[]))
        .unwrap_or_else(|e| {
            panic!("expected 503 draining on an already-open connection after SIGTERM, got I/O error {e}")
        });
    assert_error(&r, 503, None, Some("draining"));

    for (i, h) in in_flight.into_iter().enumerate() {
        let r = h
            .join()
            .expect("client thread panicked")
            .unwrap_or_else(|e| {
                panic!("in-flight request {i}: expected 200 despite SIGTERM, got I/O error {e}")
            });
        assert_ok(&r, &format!("in-flight request {i} during drain"));
    }
    drop(probe);
    drop(idle);

    let status = srv.wait_exit(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| {
        panic!(
            "expected the server to exit within 10 s of SIGTERM (in-flight work takes ~1 s); still running after {:?}",
            signalled.elapsed()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "expected exit code 0 after a graceful drain; got {status}"
    );
}

// --- configuration -------------------------------------------------------------------

fn run_with_config(toml: &str, args: &[&str], envs: &[(&str, &str)]) -> (TempConfig, Exit) {
    let cfg = TempConfig::new(toml);
    let path = cfg.path_str();
    let mut full = vec!["--config", path.as_str()];
    full.extend_from_slice(args);
    let exit = run_serve_to_exit(&full, envs);
    (cfg, exit)
}

/// Starting with `toml` must fail, and stderr must name `key` and the config file.
fn assert_refused_naming(toml: &str, key: &str) {
    let (cfg, exit) = run_with_config(toml, &[], &[]);
    assert!(
        exit.failed(),
        "expected a non-zero exit for `{key}` in:\n{toml}\n{}",
        exit.describe()
    );
    assert!(
        exit.stderr.contains(key),
        "expected stderr to name `{key}`:\n{}",
        exit.describe()
    );
    assert!(
        cfg.is_named_in(&exit.stderr),
        "expected stderr to name the config file {}:\n{}",
        cfg.path().display(),
        exit.describe()
    );
}

#[test]
fn unknown_config_key_fails_naming_the_key_and_the_file() {
    let cases = [
        ("[capacity]\nworkers = 4\nturbo_mode = true\n", "turbo_mode"),
        ("flux_capacitor = 1\n", "flux_capacitor"),
        ("[http]\nmax_body_byte = 10\n", "max_body_byte"),
        ("[nonsense_table]\nx = 1\n", "nonsense_table"),
    ];
    for (toml, key) in cases {
        assert_refused_naming(toml, key);
    }
}

#[test]
fn invalid_config_value_fails_naming_the_key_and_the_file() {
    let cases = [
        ("[capacity]\nworkers = 0\n", "workers"),
        ("[capacity]\nworkers = \"many\"\n", "workers"),
        ("[http]\nmax_body_bytes = -5\n", "max_body_bytes"),
    ];
    for (toml, key) in cases {
        assert_refused_naming(toml, key);
    }
}

#[test]
fn invalid_workers_flag_fails_naming_workers() {
    for value in ["0", "abc"] {
        let exit = run_serve_to_exit(&["--workers", value], &[]);
        assert!(
            exit.failed(),
            "expected a non-zero exit for --workers {value}:\n{}",
            exit.describe()
        );
        assert!(
            exit.stderr.contains("workers"),
            "expected stderr to name `workers` for --workers {value}:\n{}",
            exit.describe()
        );
    }
}

const FILE_CONFIG: &str = "[capacity]\nworkers = 3\nqueue = 9\n";

fn gauge(srv: &Server, name: &str) -> Option<f64> {
    metric_value(&scrape(srv.addr), name, &[])
}

#[test]
fn config_file_values_apply_over_defaults() {
    let srv = Server::start_with_config(FILE_CONFIG, &[]);
    assert_eq!(
        gauge(&srv, "syncgate_workers"),
        Some(3.0),
        "workers from the file"
    );
    assert_eq!(
        gauge(&srv, "syncgate_queue_capacity"),
        Some(9.0),
        "queue from the file"
    );
}

#[test]
fn env_overrides_config_file() {
    let envs = [("SYNCGATE_WORKERS", "5"), ("SYNCGATE_QUEUE", "11")];
    let srv = Server::start_full(&[], &envs, Some(TempConfig::new(FILE_CONFIG)));
    assert_eq!(
        gauge(&srv, "syncgate_workers"),
        Some(5.0),
        "file says workers = 3, SYNCGATE_WORKERS=5: expected syncgate_workers 5"
    );
    assert_eq!(
        gauge(&srv, "syncgate_queue_capacity"),
        Some(11.0),
        "file says queue = 9, SYNCGATE_QUEUE=11: expected syncgate_queue_capacity 11"
    );
}

#[test]
fn flag_overrides_env_and_config_file() {
    let envs = [("SYNCGATE_WORKERS", "5"), ("SYNCGATE_QUEUE", "11")];
    let srv = Server::start_full(
        &["--workers", "7", "--queue", "13"],
        &envs,
        Some(TempConfig::new(FILE_CONFIG)),
    );
    assert_eq!(
        gauge(&srv, "syncgate_workers"),
        Some(7.0),
        "file 3, env 5, --workers 7: expected syncgate_workers 7"
    );
    assert_eq!(
        gauge(&srv, "syncgate_queue_capacity"),
        Some(13.0),
        "file 9, env 11, --queue 13: expected syncgate_queue_capacity 13"
    );
}

/// The environment the running server process has now, as `/proc` shows it.
fn environment_of(srv: &Server) -> String {
    let raw = std::fs::read(format!("/proc/{}/environ", srv.pid())).expect("read environ");
    String::from_utf8_lossy(&raw).replace('\0', "\n")
}

#[test]
fn serve_runs_with_glibcs_per_thread_cache_off_unless_the_operator_set_it() {
    // Same pid, serving: the server re-started itself with the tunable (src/malloc.rs).
    let srv = Server::start(&[]);
    assert_eq!(get(srv.addr, "/healthz").status, 200);
    let env = environment_of(&srv);
    assert!(
        env.lines()
            .any(|l| l == "GLIBC_TUNABLES=glibc.malloc.tcache_count=0"),
        "expected the per-thread cache switched off; environment:\n{env}"
    );

    // The operator's own cache setting wins.
    let srv = Server::start_with_env(&[], &[("GLIBC_TUNABLES", "glibc.malloc.tcache_count=3")]);
    assert_eq!(get(srv.addr, "/healthz").status, 200);
    assert!(environment_of(&srv)
        .lines()
        .any(|l| l == "GLIBC_TUNABLES=glibc.malloc.tcache_count=3"));
}
