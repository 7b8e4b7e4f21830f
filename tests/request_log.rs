//! The request log end to end: rows written for real calls through a provider (plain, streamed,
//! refused), read back with filters and a cursor, totalled by `/api/usage` and `syncgate usage`
//! alike, expired by retention, never holding a client's key, refused when newer than the
//! binary, served under concurrent load, and absent when logging is off.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

/// How long a row may take to appear: the writer commits every `log_flush_ms` (10 ms), but
/// the machine is small and shared.
const ROW_DEADLINE: Duration = Duration::from_secs(10);
const DAY_MS: i64 = 86_400_000;

/// A gateway whose model `m` goes to `upstream` as `upstream-model`, plus `extra` TOML.
fn gateway(upstream: SocketAddr, extra: &str, args: &[&str]) -> Server {
    let toml = format!(
        r#"
[[providers]]
name = "up"
type = "openai"
base_url = "http://{upstream}/v1"
[providers.timeouts]
connect_ms = 1000
first_byte_ms = 5000
idle_ms = 5000
total_ms = 10000

[[models]]
name = "m"
targets = ["up/upstream-model"]
{extra}
"#
    );
    Server::start_with_config(&toml, args)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A chat call with the given body and request id; returns the response.
fn chat_as(srv: &Server, body: &Value, request_id: &str) -> Resp {
    send(
        srv.addr,
        &post_req(
            "/v1/chat/completions",
            &body.to_string(),
            &[("X-Request-Id", request_id), ("Connection", "close")],
        ),
    )
}

fn chat_body(model: &str, text: &str, stream: bool) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// GET `path`, asserting 200 and a JSON body.
fn get_json(srv: &Server, path: &str) -> Value {
    let r = get(srv.addr, path);
    assert_ok(&r, path);
    r.json()
}

/// The rows of `/api/requests?QUERY` once every id in `ids` is among them (by request id).
fn rows_with_ids(srv: &Server, query: &str, ids: &[&str]) -> HashMap<String, Value> {
    let path = format!("/api/requests?{query}");
    let mut last = Value::Null;
    let found = poll_until(ROW_DEADLINE, Duration::from_millis(20), || {
        last = get_json(srv, &path);
        let data = last["data"].as_array().cloned().unwrap_or_default();
        ids.iter()
            .all(|id| data.iter().any(|row| row["request_id"] == **id))
    });
    assert!(
        found,
        "expected rows for {ids:?} in {path} within {ROW_DEADLINE:?}; last answer:\n{last:#}"
    );
    last["data"]
        .as_array()
        .expect("checked above")
        .iter()
        .map(|row| {
            (
                row["request_id"].as_str().unwrap_or("").to_string(),
                row.clone(),
            )
        })
        .collect()
}

fn ids_of(page: &Value) -> Vec<i64> {
    page["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data array in {page:#}"))
        .iter()
        .map(|row| row["id"].as_i64().expect("integer id"))
        .collect()
}

fn number(row: &Value, field: &str) -> f64 {
    row[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {row:#}"))
}

/// Timings are non-negative and add up: total covers the queue wait and the provider time,
/// and the overhead is what is left.
fn assert_timings_consistent(row: &Value) {
    let (total, queue, upstream, overhead) = (
        number(row, "total_ms"),
        number(row, "queue_ms"),
        number(row, "upstream_ms"),
        number(row, "overhead_ms"),
    );
    for (name, v) in [
        ("total", total),
        ("queue", queue),
        ("upstream", upstream),
        ("overhead", overhead),
    ] {
        assert!(v >= 0.0, "{name}_ms is negative in {row:#}");
    }
    assert!(
        total + 0.01 >= queue + upstream,
        "total_ms must cover queue_ms + upstream_ms in {row:#}"
    );
    assert!(
        (overhead - (total - queue - upstream)).abs() < 0.01,
        "overhead_ms must be total - queue - upstream in {row:#}"
    );
}

/// A `created_at` string: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn assert_rfc3339_ms(row: &Value) {
    let at = row["created_at"].as_str().unwrap_or("");
    let shape_ok = at.len() == 24
        && at.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == '.',
            23 => c == 'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(
        shape_ok,
        "created_at is not RFC 3339 UTC with ms in {row:#}"
    );
}

/// Asserts a 400 `invalid_request_error` whose `param` names `param`.
fn assert_bad_param(srv: &Server, path: &str, param: &str) {
    let r = get(srv.addr, path);
    let err = assert_error(&r, 400, Some("invalid_request_error"), None);
    assert_eq!(
        err["param"],
        param,
        "GET {path} must name the parameter {param:?}; got:\n{}",
        r.describe()
    );
}

fn migrate(db: &TempDb) -> Exit {
    run_to_exit(&["migrate", "--db", &db.path_str()], &[], EXIT_DEADLINE)
}

/// Inserts a request-log row the way the server would have, logged at `ts_ms`.
fn insert_row(conn: &rusqlite::Connection, request_id: &str, ts_ms: i64, model: &str, status: u16) {
    conn.execute(
        "INSERT INTO requests (request_id, ts_ms, method, route, model, status, total_ms, \
         queue_ms, upstream_ms, overhead_ms, prompt_tokens, completion_tokens) \
         VALUES (?1, ?2, 'POST', '/v1/chat/completions', ?3, ?4, 5.0, 1.0, 3.0, 1.0, 7, 11)",
        rusqlite::params![request_id, ts_ms, model, status],
    )
    .expect("insert a row");
}

fn count_rows(db: &TempDb, sql: &str) -> i64 {
    rusqlite::Connection::open(&db.path)
        .expect("open the test database")
        .query_row(sql, [], |r| r.get(0))
        .expect("count rows")
}

/// SIGTERM, then a clean exit within the grace period.
fn stop(mut srv: Server) -> Server {
    srv.signal(libc::SIGTERM);
    let status = srv.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "expected exit 0 after SIGTERM, got {status:?}"
    );
    srv
}

#[test]
fn plain_streamed_unknown_model_and_bad_body_calls_are_logged_with_their_facts() {
    let upstream = Server::start_mock_upstream(&[]);
    let gw = gateway(upstream.addr, "", &[]);
    let plain = unique("plain");
    let streamed = unique("streamed");
    let unknown = unique("unknown");
    let bad = unique("bad");

    assert_ok(
        &chat_as(&gw, &chat_body("m", "hello", false), &plain),
        "plain",
    );
    let r = chat_as(&gw, &chat_body("m", "hello", true), &streamed);
    assert_ok(&r, "streamed");
    assert!(
        r.text().contains("[DONE]"),
        "stream did not finish:\n{}",
        r.describe()
    );
    assert_error(
        &chat_as(&gw, &chat_body("nope", "hello", false), &unknown),
        404,
        None,
        Some("model_not_found"),
    );
    let r = send(
        gw.addr,
        &post_req(
            "/v1/chat/completions",
            "{not json",
            &[("X-Request-Id", &bad), ("Connection", "close")],
        ),
    );
    assert_error(&r, 400, None, Some("invalid_json"));

    let rows = rows_with_ids(&gw, "limit=100", &[&plain, &streamed, &unknown, &bad]);
    for row in rows.values() {
        assert_timings_consistent(row);
        assert_rfc3339_ms(row);
        assert!(row["id"].as_i64().is_some_and(|id| id > 0), "{row:#}");
        assert!(
            row.get("request_body").is_none() && row.get("response_body").is_none(),
            "bodies are not kept unless [log] bodies = true: {row:#}"
        );
    }

    let row = &rows[&plain];
    for (field, want) in [
        ("method", json!("POST")),
        ("route", json!("/v1/chat/completions")),
        ("model", json!("m")),
        ("provider", json!("up")),
        ("upstream_model", json!("upstream-model")),
        ("attempts", json!(1)),
        ("status", json!(200)),
        ("error_code", Value::Null),
        ("streamed", json!(false)),
        ("client_left", json!(false)),
        ("ttft_ms", Value::Null),
    ] {
        assert_eq!(row[field], want, "plain call: {field} in {row:#}");
    }
    assert!(number(row, "prompt_tokens") > 0.0 && number(row, "completion_tokens") > 0.0);
    assert!(number(row, "upstream_ms") > 0.0, "{row:#}");

    let row = &rows[&streamed];
    for (field, want) in [
        ("model", json!("m")),
        ("provider", json!("up")),
        ("upstream_model", json!("upstream-model")),
        ("attempts", json!(1)),
        ("status", json!(200)),
        ("error_code", Value::Null),
        ("streamed", json!(true)),
        ("client_left", json!(false)),
    ] {
        assert_eq!(row[field], want, "streamed call: {field} in {row:#}");
    }
    let ttft = number(row, "ttft_ms");
    assert!(
        ttft > 0.0 && ttft <= number(row, "total_ms"),
        "ttft_ms must fall within the call: {row:#}"
    );
    assert!(number(row, "prompt_tokens") > 0.0 && number(row, "completion_tokens") > 0.0);

    let row = &rows[&unknown];
    for (field, want) in [
        ("model", json!("nope")),
        ("provider", Value::Null),
        ("upstream_model", Value::Null),
        ("attempts", json!(0)),
        ("status", json!(404)),
        ("error_code", json!("model_not_found")),
        ("prompt_tokens", Value::Null),
    ] {
        assert_eq!(row[field], want, "unknown model: {field} in {row:#}");
    }

    let row = &rows[&bad];
    for (field, want) in [
        ("model", Value::Null),
        ("provider", Value::Null),
        ("status", json!(400)),
        ("error_code", json!("invalid_json")),
    ] {
        assert_eq!(row[field], want, "bad body: {field} in {row:#}");
    }
}

#[test]
fn filters_and_the_cursor_select_rows_newest_first() {
    let db = TempDb::new();
    assert!(!migrate(&db).failed());
    // Ten calls an hour ago, a minute apart, on whole seconds; rows 4 and 5 share a
    // millisecond, so the order between them is by id.
    let base = (now_ms() - 3_600_000) / 1000 * 1000;
    let at = |i: i64| base + if i == 5 { 4 } else { i } * 60_000;
    {
        let conn = rusqlite::Connection::open(&db.path).expect("open");
        for i in 1..=10 {
            let (model, status) = if i % 3 == 0 { ("b", 500) } else { ("a", 200) };
            insert_row(&conn, &format!("row-{i}"), at(i), model, status);
        }
    }
    let gw = Server::start(&["--db", &db.path_str()]);
    let until_now = format!("until={}", base / 1000 + 3600);
    let page = |query: &str| get_json(&gw, &format!("/api/requests?{until_now}&{query}"));
    // The row ids are 1..=10 in insertion order.
    let everything = page("");
    assert_eq!(ids_of(&everything), [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(everything["object"], "list");
    assert_eq!(everything["has_more"], false);

    assert_eq!(ids_of(&page("model=b")), [9, 6, 3]);
    assert_eq!(ids_of(&page("status=200&model=a")), [10, 8, 7, 5, 4, 2, 1]);
    assert_eq!(ids_of(&page("status=500")), [9, 6, 3]);
    assert_eq!(ids_of(&page("status=404")), Vec::<i64>::new());

    // since is inclusive, until exclusive, in unix seconds or RFC 3339 alike.
    let secs = |i: i64| at(i) / 1000;
    let by_seconds = get_json(
        &gw,
        &format!("/api/requests?since={}&until={}", secs(2), secs(7)),
    );
    assert_eq!(ids_of(&by_seconds), [6, 5, 4, 3, 2]);
    let created = |id: i64| {
        everything["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()["created_at"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_rfc3339_ms(&everything["data"][0]);
    let by_text = get_json(
        &gw,
        &format!("/api/requests?since={}&until={}", created(2), created(7)),
    );
    assert_eq!(ids_of(&by_text), [6, 5, 4, 3, 2]);
    let whole_seconds = created(2).replace(".000Z", "Z");
    assert_eq!(
        ids_of(&page(&format!("since={whole_seconds}&model=a"))),
        [10, 8, 7, 5, 4, 2]
    );

    // Pages of three, each continuing before the last id of the one before.
    let mut seen: Vec<i64> = Vec::new();
    let mut query = "limit=3".to_string();
    let mut pages = 0;
    loop {
        let p = page(&query);
        pages += 1;
        let ids = ids_of(&p);
        seen.extend(&ids);
        if p["has_more"] == false {
            break;
        }
        assert_eq!(ids.len(), 3, "a page with more after it is full: {p:#}");
        query = format!("limit=3&before={}", ids[2]);
        assert!(pages < 10, "paging does not end: {seen:?}");
    }
    assert_eq!(pages, 4);
    assert_eq!(seen, [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(ids_of(&page("model=a&limit=2&before=5")), [4, 2]);
    assert_eq!(page("limit=10")["has_more"], false);
    assert_eq!(page("limit=9")["has_more"], true);

    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("status=abc", "status"),
        ("status=99", "status"),
        ("status=600", "status"),
        ("since=yesterday", "since"),
        ("since=-5", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("until=2026-11-23T10:00:00", "until"),
        ("since=2000&until=1000", "until"),
        ("before=abc", "before"),
        ("before=0", "before"),
        ("before=999999", "before"),
        ("model=", "model"),
        ("modle=a", "modle"),
    ] {
        assert_bad_param(&gw, &format!("/api/requests?{query}"), param);
    }
    for (query, param) in [
        ("group_by=week", "group_by"),
        ("since=soon", "since"),
        ("until=1.5", "until"),
        ("limit=3", "limit"),
    ] {
        assert_bad_param(&gw, &format!("/api/usage?{query}"), param);
    }
    let r = send(
        gw.addr,
        &post_req("/api/requests", "{}", &[("Connection", "close")]),
    );
    assert_error(&r, 405, None, Some("method_not_allowed"));
}

/// `syncgate usage` output as (key → [calls, errors, prompt, completion, total, unpriced]);
/// these calls are unpriced, so the cost column must say `-` (no priced call), never 0.
fn parse_table(text: &str, key: &str) -> BTreeMap<String, Vec<u64>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        [
            key,
            "calls",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_usd",
            "unpriced_calls"
        ],
        "table header in:\n{text}"
    );
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cells.len(), 8, "table line {line:?} in:\n{text}");
            assert_eq!(cells[6], "-", "cost of unpriced calls in:\n{text}");
            let numbers = cells[1..6]
                .iter()
                .chain(&cells[7..])
                .map(|c| c.parse().unwrap_or_else(|_| panic!("{c:?} in:\n{text}")))
                .collect();
            (cells[0].to_string(), numbers)
        })
        .collect()
}

/// The usage JSON as the same map, checking the totals add up.
fn usage_map(usage: &Value, key: &str) -> BTreeMap<String, Vec<u64>> {
    usage["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data in {usage:#}"))
        .iter()
        .map(|g| {
            let n = |f: &str| g[f].as_u64().unwrap_or_else(|| panic!("{f} in {g:#}"));
            assert_eq!(
                n("total_tokens"),
                n("prompt_tokens") + n("completion_tokens"),
                "{g:#}"
            );
            let numbers = [
                "calls",
                "errors",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "unpriced_calls",
            ]
            .map(n)
            .to_vec();
            assert_eq!(g["cost_usd"], Value::Null, "{g:#}");
            (g[key].as_str().unwrap_or("").to_string(), numbers)
        })
        .collect()
}

#[test]
fn usage_totals_by_model_and_day_agree_with_the_log_and_the_cli() {
    let upstream = Server::start_mock_upstream(&[]);
    let db = TempDb::new();
    let gw = gateway(upstream.addr, "", &["--db", &db.path_str()]);
    let mut ids = Vec::new();
    for (i, (model, stream)) in [
        ("m", false),
        ("m", true),
        ("m", false),
        ("mock", false),
        ("nope", false),
        ("m", false),
    ]
    .into_iter()
    .enumerate()
    {
        let id = unique("usage");
        let r = chat_as(&gw, &chat_body(model, &format!("call {i}"), stream), &id);
        assert_eq!(
            r.status,
            if model == "nope" { 404 } else { 200 },
            "{}",
            r.describe()
        );
        ids.push(id);
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rows = rows_with_ids(&gw, "limit=1000", &id_refs);

    // What the totals must be, from the rows themselves.
    let mut by_model: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut by_day: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for row in rows.values().filter(|r| !r["model"].is_null()) {
        let prompt = row["prompt_tokens"].as_u64().unwrap_or(0);
        let completion = row["completion_tokens"].as_u64().unwrap_or(0);
        let error = u64::from(row["status"].as_u64().unwrap_or(0) >= 400);
        let day = row["created_at"].as_str().unwrap()[..10].to_string();
        for (map, key) in [
            (&mut by_model, row["model"].as_str().unwrap().to_string()),
            (&mut by_day, day),
        ] {
            let t = map.entry(key).or_insert_with(|| vec![0; 6]);
            // Every call here is unpriced (no [[prices]]); one with usage counts as such.
            let unpriced = u64::from(!row["prompt_tokens"].is_null());
            assert_eq!(row["cost_usd"], Value::Null, "{row:#}");
            for (slot, v) in
                t.iter_mut()
                    .zip([1, error, prompt, completion, prompt + completion, unpriced])
            {
                *slot += v;
            }
        }
    }
    assert_eq!(by_model["m"][0], 4);
    assert_eq!(by_model["nope"][..2], [1, 1]);
    assert!(
        by_model["m"][2] > 0 && by_model["mock"][3] > 0,
        "{by_model:?}"
    );

    let usage = get_json(&gw, "/api/usage");
    assert_eq!(usage["object"], "list");
    assert_eq!(usage["group_by"], "model");
    assert_eq!(
        usage["data"][0]["model"], "m",
        "most calls first: {usage:#}"
    );
    assert_eq!(usage_map(&usage, "model"), by_model, "{usage:#}");
    let usage_days = get_json(&gw, "/api/usage?group_by=day");
    assert_eq!(usage_days["group_by"], "day");
    assert_eq!(usage_map(&usage_days, "day"), by_day, "{usage_days:#}");
    let since = (now_ms() / 1000 - 3600).to_string();
    let windowed = get_json(
        &gw,
        &format!("/api/usage?since={since}&until=2999-01-01T00:00:00Z"),
    );
    assert_eq!(usage_map(&windowed, "model"), by_model);
    let future = get_json(&gw, "/api/usage?since=2999-01-01T00:00:00Z");
    assert_eq!(future["data"], json!([]));

    let _gw = stop(gw);
    let path = db.path_str();
    let cli = run_to_exit(&["usage", "--db", &path], &[], EXIT_DEADLINE);
    assert!(
        cli.status.is_some_and(|s| s.success()),
        "{}",
        cli.describe()
    );
    assert_eq!(
        parse_table(&cli.stdout, "model"),
        by_model,
        "{}",
        cli.describe()
    );
    assert!(
        cli.stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("m ")),
        "most calls first:\n{}",
        cli.stdout
    );
    let cli = run_to_exit(
        &[
            "usage",
            "--db",
            &path,
            "--group-by",
            "day",
            "--since",
            &since,
        ],
        &[],
        EXIT_DEADLINE,
    );
    assert!(
        cli.status.is_some_and(|s| s.success()),
        "{}",
        cli.describe()
    );
    assert_eq!(
        parse_table(&cli.stdout, "day"),
        by_day,
        "{}",
        cli.describe()
    );
}

#[test]
fn migrate_is_idempotent_and_a_newer_schema_is_refused_everywhere() {
    let db = TempDb::new();
    let first = migrate(&db);
    assert!(
        first.status.is_some_and(|s| s.success()),
        "{}",
        first.describe()
    );
    assert!(
        first.stdout.contains("migrated schema version 0 -> "),
        "{}",
        first.describe()
    );
    let again = migrate(&db);
    assert!(
        again.status.is_some_and(|s| s.success()),
        "{}",
        again.describe()
    );
    assert!(
        again.stdout.contains("is up to date"),
        "{}",
        again.describe()
    );

    let version: u32 = rusqlite::Connection::open(&db.path)
        .expect("open")
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("user_version");
    rusqlite::Connection::open(&db.path)
        .expect("open")
        .pragma_update(None, "user_version", version + 1)
        .expect("set user_version");

    let path = db.path_str();
    for (what, exit) in [
        ("migrate", migrate(&db)),
        (
            "usage",
            run_to_exit(&["usage", "--db", &path], &[], EXIT_DEADLINE),
        ),
        ("serve", run_serve_to_exit(&["--db", &path], &[])),
    ] {
        assert!(
            exit.failed() && !exit.started_serving,
            "{what} must refuse a newer database; {}",
            exit.describe()
        );
        assert!(
            exit.stderr.contains("newer syncgate")
                && exit
                    .stderr
                    .contains(&format!("schema version {}", version + 1)),
            "{what} must say the database is from a newer syncgate; {}",
            exit.describe()
        );
    }

    let missing = TempDb::new();
    let exit = run_to_exit(&["usage", "--db", &missing.path_str()], &[], EXIT_DEADLINE);
    assert!(exit.failed(), "{}", exit.describe());
    assert!(
        exit.stderr.contains("no database at"),
        "{}",
        exit.describe()
    );
    assert!(!missing.path.exists(), "usage must not create a database");
}

#[test]
fn retention_deletes_only_rows_older_than_the_cutoff() {
    let db = TempDb::new();
    assert!(!migrate(&db).failed());
    let now = now_ms();
    // More old rows than one batch, so the deletion takes several writes.
    const OLD: i64 = 1200;
    {
        let mut conn = rusqlite::Connection::open(&db.path).expect("open");
        let tx = conn.transaction().expect("transaction");
        for i in 0..OLD {
            insert_row(&tx, &format!("old-{i}"), now - 40 * DAY_MS - i, "m", 200);
        }
        for (i, age) in [0, DAY_MS, 29 * DAY_MS].into_iter().enumerate() {
            insert_row(&tx, &format!("new-{i}"), now - age, "m", 200);
        }
        tx.commit().expect("commit");
    }
    let gw = Server::start_with_config("[log]\nretention_days = 30\n", &["--db", &db.path_str()]);
    let old_left = || {
        count_rows(
            &db,
            "SELECT count(*) FROM requests WHERE request_id LIKE 'old-%'",
        )
    };
    assert!(
        poll_until(
            Duration::from_secs(20),
            Duration::from_millis(50),
            || old_left() == 0
        ),
        "old rows left after 20 s: {}",
        old_left()
    );
    let kept = count_rows(
        &db,
        "SELECT count(*) FROM requests WHERE request_id LIKE 'new-%'",
    );
    assert_eq!(kept, 3, "rows younger than 30 days must stay");
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(20), || gw
            .log()
            .contains(&format!(
                "deleted {OLD} request-log rows older than 30 days"
            ))),
        "expected the deletion to be logged with its count"
    );
    let expired = metric_value(
        &scrape(gw.addr),
        "syncgate_store_log_rows_expired_total",
        &[],
    );
    assert_eq!(expired, Some(OLD as f64));
    // The hourly wait ends at once at shutdown.
    let started = Instant::now();
    let _gw = stop(gw);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_client_key_never_reaches_the_database_or_the_log_but_a_kept_body_does() {
    let upstream = Server::start_mock_upstream(&[]);
    let db = TempDb::new();
    let gw = gateway(
        upstream.addr,
        "[log]\nbodies = true\n",
        &["--db", &db.path_str()],
    );
    let canary = unique("sk-canary");
    let marker = unique("body-marker");
    let auth = format!("Bearer {canary}");
    let mut ids = Vec::new();
    for stream in [false, true] {
        let id = unique("canary-call");
        let body = chat_body("m", &format!("remember {marker}"), stream).to_string();
        let r = send(
            gw.addr,
            &post_req(
                "/v1/chat/completions",
                &body,
                &[
                    ("Authorization", &auth),
                    ("X-Request-Id", &id),
                    ("Connection", "close"),
                ],
            ),
        );
        assert_ok(&r, "chat with a client key");
        ids.push(id);
    }
    let r = send(
        gw.addr,
        &get_req(
            "/api/requests",
            &[("Authorization", &auth), ("Connection", "close")],
        ),
    );
    assert_ok(&r, "/api/requests with a client key");
    let rows = rows_with_ids(&gw, "limit=100", &[&ids[0], &ids[1]]);
    let plain = &rows[&ids[0]];
    assert!(
        plain["request_body"]
            .as_str()
            .is_some_and(|b| b.contains(&marker)),
        "the kept request body holds the marker: {plain:#}"
    );
    assert!(
        plain["response_body"]
            .as_str()
            .is_some_and(|b| b.contains("chat.completion")),
        "the kept response body is the answer: {plain:#}"
    );

    let gw = stop(gw);
    let stored = db.all_bytes();
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        contains(&stored, &marker),
        "the body marker must be in the database"
    );
    assert!(
        !contains(&stored, &canary),
        "the client's key was written to the database"
    );
    let output = format!("{}{}", gw.log(), gw.stdout());
    assert!(output.contains(&ids[0]), "the calls were logged");
    assert!(
        !output.contains(&canary),
        "the client's key reached the server's output"
    );
}

#[test]
fn concurrent_calls_and_log_reads_all_succeed() {
    let upstream = Server::start_mock_upstream(&[]);
    let gw = gateway(upstream.addr, "", &[]);
    let addr = gw.addr;
    let run_for = Duration::from_secs(3);
    let threads: Vec<_> = (0..32)
        .map(|t| {
            thread::spawn(move || {
                let mut conn = Conn::open(addr);
                let mut statuses = Vec::new();
                let started = Instant::now();
                let mut i = t;
                while started.elapsed() < run_for {
                    let raw = match i % 4 {
                        0 => post_req(
                            "/v1/chat/completions",
                            &chat_body("m", "load", false).to_string(),
                            &[],
                        ),
                        1 => post_req(
                            "/v1/chat/completions",
                            &chat_body("mock", "load", i % 8 == 1).to_string(),
                            &[],
                        ),
                        2 => get_req("/api/requests?limit=200", &[]),
                        _ => get_req(
                            if i % 8 == 3 {
                                "/api/usage"
                            } else {
                                "/api/usage?group_by=day"
                            },
                            &[],
                        ),
                    };
                    let r = conn.request(&raw);
                    statuses.push((i % 4, r.status, r.text()));
                    i += 1;
                }
                statuses
            })
        })
        .collect();
    let mut answered = [0usize; 4];
    for t in threads {
        for (kind, status, body) in t.join().expect("client thread") {
            assert_eq!(status, 200, "request kind {kind} answered {status}: {body}");
            answered[kind as usize] += 1;
        }
    }
    assert!(
        answered.iter().all(|n| *n >= 10),
        "every kind of request ran: {answered:?}"
    );
    let usage = get_json(&gw, "/api/usage");
    assert!(
        usage["data"][0]["calls"].as_u64().unwrap_or(0) > 0,
        "{usage:#}"
    );
}

#[test]
fn no_rows_are_written_when_request_logging_is_off() {
    let db = TempDb::new();
    let gw = Server::start_with_config("[log]\nrequests = false\n", &["--db", &db.path_str()]);
    for i in 0..5 {
        assert_ok(&chat(gw.addr, &format!("unlogged {i}")), "chat");
    }
    assert_error(
        &post_json(gw.addr, "/v1/chat/completions", "{"),
        400,
        None,
        None,
    );
    let page = get_json(&gw, "/api/requests");
    assert_eq!(page["data"], json!([]), "{page:#}");
    // A graceful stop commits whatever was queued: anything logged would be on disk now.
    let _gw = stop(gw);
    assert_eq!(count_rows(&db, "SELECT count(*) FROM requests"), 0);
}
