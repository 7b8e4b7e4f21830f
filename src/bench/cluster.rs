//! The cluster scenario (issue 15 point 11): `--instances` gateways on one PostgreSQL database,
//! whose keyed requests are admitted by the shared limiter (a `syncgate_admit()` round trip
//! each, and one statement to settle), beside one gateway on SQLite, whose limiter is in the
//! process. Keyless and keyed requests per second (one hot key, many keys) and the latency a
//! key adds, on both in the same run; and, on the side, that the shared limits stayed exact
//! across the instances.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Map, Value};

use super::client::{Conn, IO_TIMEOUT};
use super::load::{LoadResult, LoadSpec, Target, Work};
use super::observe;
use super::procs::{Backend, GatewaySpec, Gateways, MockSpec};
use super::report::{ms, us, Outcome, Row};
use super::scenarios::{chat_request, keyed_chat_request, plural, warmup};
use super::Bench;
use crate::database::Database;
use crate::store::{self, keys};

/// Concurrent callers in the keyless, many-keys and hot-key modes.
const CLIENTS: usize = 64;
/// Keys in the many-keys mode: one for each client.
const MANY_KEYS: usize = CLIENTS;
/// The exactness check's key: requests per minute, and requests sent (three times as many).
const EXACT_RPM: u32 = 50;
const EXACT_SENT: usize = 3 * EXACT_RPM as usize;
/// Threads sending the exactness check's requests, spread over the instances.
const EXACT_THREADS: usize = 6;
/// How long the gateways may take to notice the keys made in their store.
const KEYRING_DEADLINE: Duration = Duration::from_secs(15);

/// What the clients of a phase send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One client, no key (development mode: no key exists yet).
    KeylessOne,
    /// [`CLIENTS`] clients, no key.
    Keyless,
    /// One client, with a key of its own.
    KeyedOne,
    /// [`CLIENTS`] clients, each with a key of its own.
    ManyKeys,
    /// [`CLIENTS`] clients, all with the same key.
    HotKey,
}

/// Measured phases with `--db`: each of the five modes as four halves (SQLite, PostgreSQL,
/// PostgreSQL, SQLite, so drift on a shared machine falls on both), and the exactness check.
pub(crate) const PHASES: u64 = 4 * 5 + 1;

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::KeylessOne => "keyless_1_client",
            Mode::Keyless => "keyless",
            Mode::KeyedOne => "keyed_1_client",
            Mode::ManyKeys => "many_keys",
            Mode::HotKey => "hot_key",
        }
    }

    fn clients(self) -> usize {
        match self {
            Mode::KeylessOne | Mode::KeyedOne => 1,
            Mode::Keyless | Mode::ManyKeys | Mode::HotKey => CLIENTS,
        }
    }

    fn describe(self) -> String {
        let clients = plural(self.clients(), "client");
        match self {
            Mode::KeylessOne | Mode::Keyless => format!("{clients}, no key"),
            Mode::KeyedOne => format!("{clients}, a key"),
            Mode::ManyKeys => format!("{clients}, {MANY_KEYS} keys"),
            Mode::HotKey => format!("{clients}, one hot key"),
        }
    }
}

/// The keys made in one store, all with limits far above what the bench can use (so every
/// admission is checked, recorded and settled, and none is refused), but the exact one's.
struct Keys {
    /// The one-client mode's.
    single: String,
    many: Vec<String>,
    hot: String,
    /// `rpm = EXACT_RPM`.
    exact: String,
}

/// One backend's gateways and, once made, its keys.
struct Side {
    backend: Backend,
    gateways: Gateways,
    keys: Option<Keys>,
}

impl Side {
    fn addrs(&self) -> Vec<SocketAddr> {
        self.gateways.procs.iter().map(|p| p.addr).collect()
    }

    /// Each client's gateway (client `i` on gateway `i mod n`) and request in `mode`.
    fn targets(&self, mode: Mode) -> anyhow::Result<Arc<[Target]>> {
        let addrs = self.addrs();
        let keys = self.keys.as_ref();
        let mut targets = Vec::with_capacity(mode.clients());
        for i in 0..mode.clients() {
            let key = match mode {
                Mode::KeylessOne | Mode::Keyless => None,
                Mode::KeyedOne => Some(&keys.context("no keys made")?.single),
                Mode::ManyKeys => Some(&keys.context("no keys made")?.many[i % MANY_KEYS]),
                Mode::HotKey => Some(&keys.context("no keys made")?.hot),
            };
            targets.push(Target {
                addr: addrs[i % addrs.len()],
                request: match key {
                    Some(key) => keyed_chat_request("bench", key),
                    None => chat_request("bench"),
                },
            });
        }
        Ok(targets.into())
    }
}

/// A mode's result on each backend, its halves merged, and the admissions in the sliding
/// window of the first client's key at the end (none without a key).
struct Measured {
    sqlite: LoadResult,
    postgres: LoadResult,
    sqlite_window: Option<u64>,
    postgres_window: Option<u64>,
    /// CPU seconds used in the measured windows, by process kind.
    sqlite_cpu: CpuUse,
    postgres_cpu: CpuUse,
}

/// CPU seconds by process kind: `gateways`, `postgres` (the server processes serving the
/// gateways' connections), `upstream`, `load_generator`.
type CpuUse = BTreeMap<&'static str, f64>;

/// Every mode's.
struct Results {
    keyless_one: Measured,
    keyless: Measured,
    keyed_one: Measured,
    many: Measured,
    hot: Measured,
}

pub(crate) fn cluster(b: &mut Bench) -> anyhow::Result<Outcome> {
    if b.postgres.is_none() {
        let why = "not run: it needs --db postgres://… (several gateways on one database)";
        b.phase(format!("cluster: {why}"));
        let rows = vec![Row::info(
            "keyed requests through the shared limiter",
            why.into(),
        )];
        return Ok(Outcome::new("cluster", json!({ "skipped": why }), rows));
    }
    let instances = b.instances;
    let mock = MockSpec::latency(0);
    let spec = |backend| GatewaySpec {
        workers: CLIENTS,
        queue: CLIENTS,
        max_connections: 1024,
        max_queue_wait_ms: 5000,
        log_requests: true,
        backend,
    };
    b.phase(format!(
        "cluster: starting {} on PostgreSQL and one on SQLite",
        plural(instances, "gateway")
    ));
    let mut sides = [
        Side {
            backend: Backend::Sqlite,
            gateways: b
                .fleet
                .gateways(mock, spec(Backend::Sqlite), 1, "cluster_sqlite")?,
            keys: None,
        },
        Side {
            backend: Backend::Postgres,
            gateways: b.fleet.gateways(
                mock,
                spec(Backend::Postgres),
                instances,
                "cluster_postgres",
            )?,
            keys: None,
        },
    ];

    // Keyless first: once a key exists, every request needs one.
    let keyless_one = measure_mode(b, &sides, Mode::KeylessOne)?;
    let keyless = measure_mode(b, &sides, Mode::Keyless)?;
    b.phase("cluster: making API keys".into());
    for side in &mut sides {
        side.keys = Some(make_keys(&side.gateways.store)?);
        wait_for_keyring(&side.addrs())?;
    }
    let results = Results {
        keyless_one,
        keyless,
        keyed_one: measure_mode(b, &sides, Mode::KeyedOne)?,
        many: measure_mode(b, &sides, Mode::ManyKeys)?,
        hot: measure_mode(b, &sides, Mode::HotKey)?,
    };
    b.phase(format!(
        "cluster: exactness, a key of rpm {EXACT_RPM}, {EXACT_SENT} requests over {}",
        plural(instances, "instance")
    ));
    let postgres = &sides[1];
    let exact_key = &postgres.keys.as_ref().context("no keys made")?.exact;
    let exact = send_exact(&postgres.addrs(), exact_key);
    b.bar.inc(1);

    Ok(report(instances, &results, exact))
}

/// One mode on both backends: SQLite, PostgreSQL, PostgreSQL, SQLite, half the duration each.
fn measure_mode(b: &mut Bench, sides: &[Side; 2], mode: Mode) -> anyhow::Result<Measured> {
    let half = (b.duration / 2).max(Duration::from_millis(500));
    let mut halves: [Option<LoadResult>; 2] = [None, None];
    let mut cpu = [CpuUse::new(), CpuUse::new()];
    for i in [0, 1, 1, 0] {
        let side = &sides[i];
        let mut procs: Vec<(&'static str, Option<u32>)> = vec![
            ("upstream", b.fleet.upstream_pid()),
            ("load_generator", None),
        ];
        procs.extend(
            side.gateways
                .procs
                .iter()
                .map(|p| ("gateways", Some(p.pid()))),
        );
        procs.extend(
            server_pids(&side.gateways.store)
                .into_iter()
                .map(|p| ("postgres", Some(p))),
        );
        let mut meter = observe::CpuMeter::new(procs);
        let spec = LoadSpec {
            addr: side.addrs()[0],
            clients: mode.clients(),
            work: Work::Spread {
                targets: side.targets(mode)?,
            },
            stagger: Duration::ZERO,
        };
        let on = match side.backend {
            Backend::Sqlite => "SQLite".to_string(),
            Backend::Postgres => format!(
                "PostgreSQL, {}",
                plural(side.gateways.procs.len(), "instance")
            ),
        };
        let label = format!("cluster: {} on {on}", mode.describe());
        let result = b.measure(
            label,
            &spec,
            warmup(half, Duration::ZERO),
            half,
            0,
            |measuring| meter.tick(measuring),
        )?;
        for (kind, secs) in meter.used() {
            *cpu[i].entry(kind).or_default() += secs;
        }
        halves[i] = Some(match halves[i].take() {
            Some(first) => first.combine(result),
            None => result,
        });
    }
    let [Some(sqlite), Some(postgres)] = halves else {
        anyhow::bail!("a half of {} was not measured", mode.key());
    };
    let window = |side: &Side| -> anyhow::Result<Option<u64>> {
        let targets = side.targets(mode)?;
        Ok(targets.first().and_then(|t| window_of(t.addr, &t.request)))
    };
    let [sqlite_cpu, postgres_cpu] = cpu;
    Ok(Measured {
        sqlite_cpu,
        postgres_cpu,
        sqlite_window: window(&sides[0])?,
        postgres_window: window(&sides[1])?,
        sqlite,
        postgres,
    })
}

/// The PostgreSQL server's processes serving connections to the database `store` names (the
/// gateways' pools, open by now), or none on SQLite.
fn server_pids(store: &Database) -> Vec<u32> {
    let Database::Postgres(pg) = store else {
        return Vec::new();
    };
    let query = "SELECT pid FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()";
    crate::store::postgres::connect(pg)
        .ok()
        .and_then(|mut client| client.query(query, &[]).ok())
        .map(|rows| rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
        .unwrap_or_default()
}

/// Admissions in a key's sliding window, this one included, as the gateway at `addr` reports
/// them in the `x-ratelimit-*` headers of one more `request` with the key. `None` when the
/// answer has no such headers (no key, or no rpm) or did not come.
fn window_of(addr: SocketAddr, request: &[u8]) -> Option<u64> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    stream.write_all(request).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        if response.parse(&buf).ok()?.is_complete() {
            let value = |name: &str| {
                let h = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))?;
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()
            };
            let limit = value("x-ratelimit-limit-requests")?;
            return Some(limit.saturating_sub(value("x-ratelimit-remaining-requests")?));
        }
    }
}

/// Makes the keys in `db` (as `syncgate keys create` does, in this process).
fn make_keys(db: &Database) -> anyhow::Result<Keys> {
    let metrics = crate::metrics::Metrics::new();
    let store = store::Store::open(
        db,
        &crate::config::Config::default().store,
        store::Keep::default(),
        metrics.store,
    )?;
    let make = |new: keys::NewKey| -> anyhow::Result<String> {
        let made = keys::make(new, store::now_ms())
            .map_err(|e| anyhow::anyhow!("cannot draw random bytes: {e}"))?;
        keys::insert(&store, made.stored)?;
        Ok(made.secret)
    };
    // Every limit set, so each admission is counted, summed, recorded and settled.
    let generous = |name: String| keys::NewKey {
        name,
        rpm: Some(1_000_000),
        tpm: Some(1_000_000_000),
        max_in_flight: Some(10_000),
        ..keys::NewKey::default()
    };
    let exact = keys::NewKey {
        name: "bench exact".into(),
        rpm: Some(EXACT_RPM),
        ..keys::NewKey::default()
    };
    let keys = (|| {
        Ok(Keys {
            single: make(generous("bench single".into()))?,
            many: (0..MANY_KEYS)
                .map(|i| make(generous(format!("bench many {i}"))))
                .collect::<anyhow::Result<_>>()?,
            hot: make(generous("bench hot".into()))?,
            exact: make(exact)?,
        })
    })();
    store.close();
    keys
}

/// Waits until every gateway in `addrs` has loaded its keyring: a request without a key is
/// then refused (401), where in development mode it was served.
fn wait_for_keyring(addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let request = chat_request("bench");
    let end = std::time::Instant::now() + KEYRING_DEADLINE;
    for &addr in addrs {
        loop {
            let status = Conn::connect(addr)
                .and_then(|mut c| c.exchange(&request))
                .map(|a| a.status);
            if matches!(status, Ok(401)) {
                break;
            }
            if std::time::Instant::now() > end || super::interrupted() {
                anyhow::bail!(
                    "the gateway at {addr} did not load the new keys within \
                     {KEYRING_DEADLINE:?} (a request without a key got {status:?}, not 401)"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// What the exactness check saw.
#[derive(Debug, Default, Clone, Copy)]
struct Exact {
    admitted: u64,
    limited: u64,
    other: u64,
}

/// Sends [`EXACT_SENT`] requests with the exact key from [`EXACT_THREADS`] threads at once,
/// spread over the instances, and counts the answers.
fn send_exact(addrs: &[SocketAddr], key: &str) -> Exact {
    let request = keyed_chat_request("bench", key);
    let per_thread = EXACT_SENT / EXACT_THREADS;
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..EXACT_THREADS)
            .map(|t| {
                let (addr, request) = (addrs[t % addrs.len()], &request);
                s.spawn(move || {
                    let mut seen = Exact::default();
                    let mut conn = Conn::connect(addr).ok();
                    for _ in 0..per_thread {
                        let answer = match conn.as_mut() {
                            Some(c) => c.exchange(request).ok(),
                            None => None,
                        };
                        match answer.map(|a| a.status) {
                            Some(200) => seen.admitted += 1,
                            Some(429) => seen.limited += 1,
                            _ => {
                                seen.other += 1;
                                conn = Conn::connect(addr).ok();
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_default())
            .fold(Exact::default(), |sum, seen| Exact {
                admitted: sum.admitted + seen.admitted,
                limited: sum.limited + seen.limited,
                other: sum.other + seen.other,
            })
    })
}

/// CPU microseconds a 200 answer of `r` cost, from `secs` used over its window.
fn cpu_us(secs: f64, r: &LoadResult) -> f64 {
    secs * 1e6 / (r.tally.ok.count().max(1) as f64)
}

/// A phase's figures.
fn figures(r: &LoadResult, window: Option<u64>, cpu: &CpuUse) -> Value {
    let per_request: Map<String, Value> = cpu
        .iter()
        .map(|(kind, secs)| (kind.to_string(), json!(cpu_us(*secs, r))))
        .collect();
    json!({
        "window_at_end": window,
        "cpu_us_per_request": per_request,
        "rps": r.ok_per_s(),
        "p50_ms": ms(r.tally.ok.p50()),
        "p99_ms": ms(r.tally.ok.p99()),
        "limited": r.tally.limited,
        "other_status": r.tally.other_status,
        "errors": r.tally.errors,
    })
}

fn report(instances: usize, results: &Results, exact: Exact) -> Outcome {
    let Results {
        keyless_one,
        keyless,
        keyed_one,
        many,
        hot,
    } = results;
    let mut json = json!({
        "instances": instances,
        "clients": CLIENTS,
        "keys": MANY_KEYS,
        "sqlite": {},
        "postgres": {},
    });
    for (mode, r) in [
        (Mode::KeylessOne, keyless_one),
        (Mode::Keyless, keyless),
        (Mode::KeyedOne, keyed_one),
        (Mode::ManyKeys, many),
        (Mode::HotKey, hot),
    ] {
        json["sqlite"][mode.key()] = figures(&r.sqlite, r.sqlite_window, &r.sqlite_cpu);
        json["postgres"][mode.key()] = figures(&r.postgres, r.postgres_window, &r.postgres_cpu);
    }
    let rps = |r: &LoadResult| r.ok_per_s();
    let ratio = |a: f64, b: f64| a / b.max(1e-9);
    // What a key adds to one caller's request, on each backend: the shared limiter's round
    // trips on PostgreSQL, the in-process limiter on SQLite.
    let added = |keyed: &LoadResult, keyless: &LoadResult| {
        (
            us(keyed.tally.ok.p50()) - us(keyless.tally.ok.p50()),
            us(keyed.tally.ok.p99()) - us(keyless.tally.ok.p99()),
        )
    };
    let (pg_p50, pg_p99) = added(&keyed_one.postgres, &keyless_one.postgres);
    let (sq_p50, sq_p99) = added(&keyed_one.sqlite, &keyless_one.sqlite);
    json["added_p50_us"] = json!({"postgres": pg_p50, "sqlite": sq_p50});
    json["added_p99_us"] = json!({"postgres": pg_p99, "sqlite": sq_p99});
    json["keyed_over_keyless"] = json!({
        "postgres": {
            "many_keys": ratio(rps(&many.postgres), rps(&keyless.postgres)),
            "hot_key": ratio(rps(&hot.postgres), rps(&keyless.postgres)),
        },
        "sqlite": {
            "many_keys": ratio(rps(&many.sqlite), rps(&keyless.sqlite)),
            "hot_key": ratio(rps(&hot.sqlite), rps(&keyless.sqlite)),
        },
    });
    json["exact"] = json!({
        "rpm": EXACT_RPM,
        "sent": EXACT_SENT,
        "admitted": exact.admitted,
        "limited": exact.limited,
        "other": exact.other,
    });
    // Keyed answers that were not 200 although every limit was far away.
    let keyed_refused: u64 = [keyed_one, many, hot]
        .iter()
        .flat_map(|m| [&m.sqlite, &m.postgres])
        .map(|r| r.tally.limited + r.tally.other_status + r.tally.errors)
        .sum();
    json["keyed_not_ok"] = json!(keyed_refused);

    let pg = format!("PostgreSQL ({})", plural(instances, "instance"));
    let count = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
    let keyed_row = |what: &str, m: &Measured| {
        Row::info(
            &format!("keyed requests/s, {CLIENTS} clients, {what}"),
            format!(
                "{pg}: {:.0} = {:.2}× keyless; SQLite: {:.0} = {:.2}× keyless \
                 (a key's window at the end: {} and {})",
                rps(&m.postgres),
                ratio(rps(&m.postgres), rps(&keyless.postgres)),
                rps(&m.sqlite),
                ratio(rps(&m.sqlite), rps(&keyless.sqlite)),
                count(m.postgres_window),
                count(m.sqlite_window),
            ),
        )
    };
    let latency = |backend: &str, pick: fn(&Measured) -> &LoadResult| {
        let at =
            |r: &LoadResult| format!("{:.1} / {:.1}", ms(r.tally.ok.p50()), ms(r.tally.ok.p99()));
        Row::info(
            &format!("{backend}: latency p50 / p99, {CLIENTS} clients"),
            format!(
                "keyless {}, {MANY_KEYS} keys {}, hot key {} ms",
                at(pick(keyless)),
                at(pick(many)),
                at(pick(hot))
            ),
        )
    };
    let cpu_row = |backend: &str, what: &str, pick: fn(&Measured) -> (&LoadResult, &CpuUse)| {
        let at = |m: &Measured| {
            let (r, cpu) = pick(m);
            let of = |kind| cpu_us(cpu.get(kind).copied().unwrap_or(0.0), r);
            if cpu.contains_key("postgres") {
                format!("{:.0} + {:.0}", of("gateways"), of("postgres"))
            } else {
                format!("{:.0}", of("gateways"))
            }
        };
        Row::info(
            &format!("{backend}: CPU µs per request, {CLIENTS} clients"),
            format!(
                "{what}: keyless {}, {MANY_KEYS} keys {}, hot key {}",
                at(keyless),
                at(many),
                at(hot)
            ),
        )
    };
    let rows = vec![
        Row::info(
            &format!("keyless requests/s, {CLIENTS} clients"),
            format!(
                "{pg}: {:.0}; SQLite: {:.0}",
                rps(&keyless.postgres),
                rps(&keyless.sqlite)
            ),
        ),
        keyed_row(&format!("{MANY_KEYS} keys"), many),
        keyed_row("one hot key", hot),
        Row::info(
            "added by a key, 1 client, p50 / p99",
            format!(
                "PostgreSQL: {pg_p50:+.0} / {pg_p99:+.0} µs; SQLite: {sq_p50:+.0} / {sq_p99:+.0} µs"
            ),
        ),
        latency("PostgreSQL", |m| &m.postgres),
        latency("SQLite", |m| &m.sqlite),
        cpu_row("PostgreSQL", "gateways + server", |m| {
            (&m.postgres, &m.postgres_cpu)
        }),
        cpu_row("SQLite", "gateway", |m| (&m.sqlite, &m.sqlite_cpu)),
        Row::goal(
            "keyed answers not 200, limits far away",
            format!("{keyed_refused}"),
            "0",
            keyed_refused == 0,
        ),
        Row::goal(
            &format!("rpm {EXACT_RPM} across {}", plural(instances, "instance")),
            format!(
                "{} × 200, {} × 429, {} other of {EXACT_SENT}",
                exact.admitted, exact.limited, exact.other
            ),
            &format!("exactly {EXACT_RPM} × 200"),
            exact.admitted == u64::from(EXACT_RPM) && exact.other == 0,
        ),
    ];
    Outcome::new("cluster", json, rows)
}
