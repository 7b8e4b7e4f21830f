//! Vector stores end to end (issue 16): files uploaded, attached and ingested by the durable
//! job runner with the built-in `mock` model's word-hashing embeddings, then searched; the top
//! hit is the file whose words the query shares, plainly and hybrid, and filters on file
//! attributes narrow it. A file syncgate cannot read fails with `unsupported_file`; another
//! key's store is 404; an ingestion cut by kill -9 completes after the restart. The flow runs
//! on SQLite and on PostgreSQL, and so does expiry: an expired store refuses every change and
//! search, and its chunks are given back.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "adm-0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f50";

const LIGHTHOUSE: &str = "# Lighthouses\n\nA lighthouse keeper trims the lamp wick every evening \
    and winds the clockwork that turns the lens. Keepers logged every passing ship.";
const BREAD: &str = "# Baking bread\n\nSourdough bread rises slowly: the starter feeds on flour \
    and water, and the dough is folded before it is baked in a hot oven.";

fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> Resp {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(key) = key {
        raw.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    raw.push_str("\r\n");
    raw.push_str(&body);
    send(addr, raw.as_bytes())
}

fn ok(r: &Resp) -> Value {
    assert_eq!(r.status, 200, "{}", r.describe());
    r.json()
}

/// Uploads `text` as `name`; the file id.
fn upload(addr: SocketAddr, name: &str, text: &str, key: Option<&str>) -> String {
    let body = multipart(
        "sgtestboundary",
        &[
            ("purpose", None, None, b"assistants"),
            ("file", Some(name), Some("text/markdown"), text.as_bytes()),
        ],
    );
    let r = send(addr, &upload_req("sgtestboundary", &body, key));
    ok(&r)["id"].as_str().unwrap().to_string()
}

/// Polls the store until no file is in progress; the store.
fn settled(addr: SocketAddr, vs: &str, key: Option<&str>, within: Duration) -> Value {
    let mut last = Value::Null;
    let done = poll_until(within, Duration::from_millis(50), || {
        last = ok(&call(
            addr,
            "GET",
            &format!("/v1/vector_stores/{vs}"),
            None,
            key,
        ));
        last["file_counts"]["in_progress"] == 0
    });
    assert!(done, "files still in progress after {within:?}: {last}");
    last
}

fn search(addr: SocketAddr, vs: &str, body: Value) -> Vec<Value> {
    let r = call(
        addr,
        "POST",
        &format!("/v1/vector_stores/{vs}/search"),
        Some(&body),
        None,
    );
    let page = ok(&r);
    assert_eq!(page["object"], "vector_store.search_results.page", "{page}");
    page["data"].as_array().unwrap().clone()
}

fn knowledge_flow(db: &str) {
    let gw = Server::start(&["--db", db]);
    let lighthouse = upload(gw.addr, "lighthouse.md", LIGHTHOUSE, None);
    let bread = upload(gw.addr, "bread.md", BREAD, None);
    let binary = upload(gw.addr, "blob.bin", "\u{1}\u{2}", None);

    let created = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(
            &json!({"name": "handbook", "file_ids": [lighthouse, bread], "metadata": {"team": "docs"}}),
        ),
        None,
    ));
    assert_eq!(created["object"], "vector_store");
    assert_eq!(created["name"], "handbook");
    assert_eq!(created["metadata"], json!({"team": "docs"}));
    let vs = created["id"].as_str().unwrap().to_string();
    let store = settled(gw.addr, &vs, None, Duration::from_secs(30));
    assert_eq!(store["status"], "completed", "{store}");
    assert_eq!(store["file_counts"]["completed"], 2, "{store}");
    assert!(store["usage_bytes"].as_u64() > Some(0), "{store}");

    // A file syncgate cannot read fails with OpenAI's code and a reason.
    let r = call(
        gw.addr,
        "POST",
        &format!("/v1/vector_stores/{vs}/files"),
        Some(&json!({"file_id": binary})),
        None,
    );
    assert_eq!(ok(&r)["status"], "in_progress");
    assert_eq!(r.header("openai-poll-after-ms"), Some("500"));
    settled(gw.addr, &vs, None, Duration::from_secs(30));
    let failed = ok(&call(
        gw.addr,
        "GET",
        &format!("/v1/vector_stores/{vs}/files/{binary}"),
        None,
        None,
    ));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["last_error"]["code"], "unsupported_file", "{failed}");
    let listed = ok(&call(
        gw.addr,
        "GET",
        &format!("/v1/vector_stores/{vs}/files?filter=completed"),
        None,
        None,
    ));
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed}");

    // The file whose words the query shares comes first, plainly and hybrid.
    for ranker in ["auto", "hybrid"] {
        let hits = search(
            gw.addr,
            &vs,
            json!({"query": "who trims the lighthouse lamp?", "ranking_options": {"ranker": ranker}}),
        );
        assert!(!hits.is_empty(), "{ranker}: no hits");
        assert_eq!(
            hits[0]["file_id"],
            lighthouse.as_str(),
            "{ranker}: {hits:?}"
        );
        assert_eq!(hits[0]["filename"], "lighthouse.md");
        let score = hits[0]["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{score}");
        assert!(
            hits[0]["content"][0]["text"]
                .as_str()
                .unwrap()
                .contains("keeper"),
            "{hits:?}"
        );
    }
    let hits = search(
        gw.addr,
        &vs,
        json!({"query": ["sourdough starter", "oven"], "max_num_results": 1}),
    );
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["file_id"], bread.as_str(), "{hits:?}");

    // Attributes narrow a search: only files whose attributes pass.
    let r = call(
        gw.addr,
        "POST",
        &format!("/v1/vector_stores/{vs}/files/{bread}"),
        Some(&json!({"attributes": {"topic": "kitchen", "year": 2024}})),
        None,
    );
    assert_eq!(ok(&r)["attributes"]["topic"], "kitchen");
    let hits = search(
        gw.addr,
        &vs,
        json!({"query": "lighthouse keeper", "filters": {"type": "eq", "key": "topic", "value": "kitchen"}}),
    );
    assert!(
        hits.iter().all(|h| h["file_id"] == bread.as_str()),
        "{hits:?}"
    );
    let hits = search(
        gw.addr,
        &vs,
        json!({"query": "lighthouse keeper", "filters": {"type": "and", "filters": [
        {"type": "ne", "key": "topic", "value": "kitchen"}, {"type": "lt", "key": "year", "value": 3000}]}}),
    );
    assert!(
        hits.is_empty(),
        "no file has a year and another topic: {hits:?}"
    );
    let r = call(
        gw.addr,
        "POST",
        &format!("/v1/vector_stores/{vs}/search"),
        Some(&json!({"query": "x", "filters": {"type": "like"}})),
        None,
    );
    assert_error(&r, 400, Some("invalid_request_error"), None);
    let r = call(
        gw.addr,
        "POST",
        &format!("/v1/vector_stores/{vs}/search"),
        Some(&json!({"query": "x", "max_num_results": 51})),
        None,
    );
    assert_error(&r, 400, Some("invalid_request_error"), None);

    // What /metrics says of it: ingestions by outcome, searches, the cache, the sizes.
    let counted = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let text = scrape(gw.addr);
        metric_value(&text, "syncgate_knowledge_chunks", &[]) >= Some(2.0)
            && metric_value(&text, "syncgate_knowledge_files", &[]) == Some(3.0)
    });
    assert!(
        counted,
        "files and chunks never counted:\n{}",
        scrape(gw.addr)
    );
    let text = scrape(gw.addr);
    let value = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    assert_eq!(
        value(
            "syncgate_knowledge_ingested_total",
            &[("outcome", "completed")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            "syncgate_knowledge_ingested_total",
            &[("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert!(
        value("syncgate_knowledge_search_seconds_count", &[]) >= Some(5.0),
        "{text}"
    );
    assert!(
        value(
            "syncgate_knowledge_cache_lookups_total",
            &[("result", "hit")]
        ) >= Some(1.0),
        "{text}"
    );
    assert!(
        value("syncgate_knowledge_cache_bytes", &[]) > Some(0.0),
        "{text}"
    );

    // The file's chunks; detaching takes them out of search; deleting the store.
    let content = ok(&call(
        gw.addr,
        "GET",
        &format!("/v1/vector_stores/{vs}/files/{lighthouse}/content"),
        None,
        None,
    ));
    assert!(
        content["data"][0]["text"]
            .as_str()
            .unwrap()
            .contains("clockwork"),
        "{content}"
    );
    let r = call(
        gw.addr,
        "DELETE",
        &format!("/v1/vector_stores/{vs}/files/{lighthouse}"),
        None,
        None,
    );
    assert_eq!(ok(&r)["deleted"], true);
    let hits = search(gw.addr, &vs, json!({"query": "lighthouse keeper"}));
    assert!(
        hits.iter().all(|h| h["file_id"] != lighthouse.as_str()),
        "{hits:?}"
    );
    let r = call(
        gw.addr,
        "DELETE",
        &format!("/v1/vector_stores/{vs}"),
        None,
        None,
    );
    assert_eq!(
        ok(&r),
        json!({"id": vs, "object": "vector_store.deleted", "deleted": true})
    );
    let r = call(
        gw.addr,
        "GET",
        &format!("/v1/vector_stores/{vs}"),
        None,
        None,
    );
    assert_error(&r, 404, None, Some("not_found"));
}

#[test]
fn files_are_ingested_and_found_by_search_on_sqlite() {
    let db = TempDb::new();
    knowledge_flow(&db.path_str());
}

#[test]
fn files_are_ingested_and_found_by_search_on_postgres() {
    let Some(pg) = fresh_postgres() else { return };
    knowledge_flow(&pg.url());
}

/// The database a test server runs on, which a test may also write straight into.
enum Db {
    Sqlite(TempDb),
    Postgres(Box<PgDatabase>),
}

impl Db {
    /// What `--db` names.
    fn arg(&self) -> String {
        match self {
            Db::Sqlite(db) => db.path_str(),
            Db::Postgres(pg) => pg.url(),
        }
    }

    /// Runs `sql` beside the server (SQLite waits for the server's writer).
    fn execute(&self, sql: &str) {
        match self {
            Db::Sqlite(db) => {
                let conn = rusqlite::Connection::open(&db.path).expect("open");
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                conn.execute(sql, [])
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Db::Postgres(pg) => pg.execute(sql),
        }
    }

    /// The one number `sql` returns.
    fn count(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite(db) => {
                let conn = rusqlite::Connection::open(&db.path).expect("open");
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                conn.query_row(sql, [], |r| r.get(0))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Db::Postgres(pg) => pg.query_value(sql).parse().unwrap(),
        }
    }
}

/// Issue 16: a store unused for its `expires_after` days (its `last_active_at` set back in the
/// database) refuses every change and search with `vector_store_expired`, is still read,
/// listed and deleted, and the job lease thread's sweep (at start, then once a minute) deletes
/// its chunks while another store's stay.
fn expiry_flow(db: Db) {
    let mut gw = Server::start(&["--db", &db.arg()]);
    let lighthouse = upload(gw.addr, "lighthouse.md", LIGHTHOUSE, None);
    let bread = upload(gw.addr, "bread.md", BREAD, None);
    let expiring = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"name": "old", "file_ids": [lighthouse],
            "expires_after": {"anchor": "last_active_at", "days": 1}})),
        None,
    ));
    let vs = expiring["id"].as_str().unwrap().to_string();
    let kept = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"file_ids": [lighthouse]})),
        None,
    ));
    let kept = kept["id"].as_str().unwrap().to_string();
    for id in [&vs, &kept] {
        let store = settled(gw.addr, id, None, Duration::from_secs(30));
        assert!(store["usage_bytes"].as_u64() > Some(0), "{store}");
    }
    let chunks_of = |id: &str| {
        db.count(&format!(
            "SELECT count(*) FROM chunks WHERE vector_store_id = '{id}'"
        ))
    };
    assert!(chunks_of(&vs) > 0);

    // Unused for two days.
    db.execute(&format!(
        "UPDATE vector_stores SET last_active_at = last_active_at - 2 * 86400 WHERE id = '{vs}'"
    ));
    let store_path = format!("/v1/vector_stores/{vs}");
    let refused = [
        (store_path.clone(), json!({"name": "renamed"})),
        (store_path.clone(), json!({"expires_after": null})),
        (format!("{store_path}/files"), json!({"file_id": bread})),
        (
            format!("{store_path}/file_batches"),
            json!({"file_ids": [bread]}),
        ),
        (
            format!("{store_path}/files/{lighthouse}"),
            json!({"attributes": {"topic": "sea"}}),
        ),
        (
            format!("{store_path}/search"),
            json!({"query": "lighthouse"}),
        ),
    ];
    for (path, body) in &refused {
        let r = call(gw.addr, "POST", path, Some(body), None);
        let error = assert_error(
            &r,
            400,
            Some("invalid_request_error"),
            Some("vector_store_expired"),
        );
        assert!(error["message"].as_str().unwrap().contains(&vs), "{error}");
    }
    let ask = json!({"model": "mock", "input": "Who trims the lamp wick?",
        "tools": [{"type": "file_search", "vector_store_ids": [vs]}]});
    let r = call(gw.addr, "POST", "/v1/responses", Some(&ask), None);
    assert_error(&r, 400, None, Some("vector_store_expired"));
    // Read and listed as it was.
    let store = ok(&call(gw.addr, "GET", &store_path, None, None));
    assert_eq!(
        (
            &store["status"],
            &store["name"],
            &store["expires_after"]["days"]
        ),
        (&json!("expired"), &json!("old"), &json!(1)),
        "{store}"
    );
    let listed = ok(&call(gw.addr, "GET", "/v1/vector_stores", None, None));
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == vs.as_str() && s["status"] == "expired"),
        "{listed}"
    );
    let files = ok(&call(
        gw.addr,
        "GET",
        &format!("{store_path}/files"),
        None,
        None,
    ));
    let data = files["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "nothing was attached: {files}");
    assert_eq!(data[0]["attributes"], json!({}), "{files}");

    // The sweep runs at start, then once a minute: a restart brings it on now.
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_exit(Duration::from_secs(15)).is_some(),
        "{}",
        gw.log()
    );
    let gw = Server::start(&["--db", &db.arg()]);
    let mut store = Value::Null;
    let reclaimed = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        store = ok(&call(gw.addr, "GET", &store_path, None, None));
        store["usage_bytes"] == 0
    });
    assert!(
        reclaimed,
        "the chunks were never reclaimed: {store}\n{}",
        gw.log()
    );
    assert_eq!(chunks_of(&vs), 0);
    assert_eq!(
        (&store["status"], &store["file_counts"]["completed"]),
        (&json!("expired"), &json!(1)),
        "the files are still listed: {store}"
    );
    let content = ok(&call(
        gw.addr,
        "GET",
        &format!("{store_path}/files/{lighthouse}/content"),
        None,
        None,
    ));
    assert_eq!(content["data"], json!([]), "{content}");
    assert!(
        gw.log().contains("reclaimed") && gw.log().contains("from 1 expired vector stores"),
        "{}",
        gw.log()
    );
    // The other store keeps its chunks and is searched as before.
    assert!(chunks_of(&kept) > 0);
    let hits = search(gw.addr, &kept, json!({"query": "lighthouse keeper"}));
    assert_eq!(hits[0]["file_id"], lighthouse.as_str(), "{hits:?}");
    let r = call(gw.addr, "DELETE", &store_path, None, None);
    assert_eq!(ok(&r)["deleted"], true);
}

#[test]
fn an_expired_store_refuses_changes_and_its_chunks_are_reclaimed_on_sqlite() {
    expiry_flow(Db::Sqlite(TempDb::new()));
}

#[test]
fn an_expired_store_refuses_changes_and_its_chunks_are_reclaimed_on_postgres() {
    let Some(pg) = fresh_postgres() else { return };
    expiry_flow(Db::Postgres(Box::new(pg)));
}

#[test]
fn another_keys_store_is_not_found_and_the_admin_key_sees_it() {
    let gw = Server::start_full(&[], &[("SYNCGATE_ADMIN_KEY", ADMIN)], None);
    let make_key = |name: &str| {
        let r = call(
            gw.addr,
            "POST",
            "/admin/keys",
            Some(&json!({"name": name})),
            Some(ADMIN),
        );
        assert_eq!(r.status, 201, "{}", r.describe());
        r.json()["key"].as_str().unwrap().to_string()
    };
    let (alice, bob) = (make_key("alice"), make_key("bob"));
    let file = upload(gw.addr, "a.md", LIGHTHOUSE, Some(&alice));
    // Bob cannot put Alice's file in his store.
    let r = call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"file_ids": [file]})),
        Some(&bob),
    );
    assert_error(&r, 404, None, Some("not_found"));
    let vs = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"file_ids": [file]})),
        Some(&alice),
    ));
    let id = vs["id"].as_str().unwrap();
    for (method, path) in [
        ("GET", format!("/v1/vector_stores/{id}")),
        ("DELETE", format!("/v1/vector_stores/{id}")),
        ("GET", format!("/v1/vector_stores/{id}/files")),
    ] {
        let r = call(gw.addr, method, &path, None, Some(&bob));
        assert_error(&r, 404, None, Some("not_found"));
    }
    let r = call(
        gw.addr,
        "POST",
        &format!("/v1/vector_stores/{id}/search"),
        Some(&json!({"query": "lamp"})),
        Some(&bob),
    );
    assert_error(&r, 404, None, Some("not_found"));
    let theirs = ok(&call(gw.addr, "GET", "/v1/vector_stores", None, Some(&bob)));
    assert_eq!(theirs["data"], json!([]));
    let all = ok(&call(
        gw.addr,
        "GET",
        "/v1/vector_stores",
        None,
        Some(ADMIN),
    ));
    assert_eq!(all["data"][0]["id"], id);
}

#[test]
fn an_ingestion_cut_by_kill_9_completes_after_the_restart() {
    let db = TempDb::new();
    // Embeddings from a mock upstream that takes its time, so the kill lands mid-ingestion.
    let up = Server::start_mock_upstream(&["--latency-ms", "1500"]);
    let toml = format!(
        "[[providers]]\nname = \"up\"\ntype = \"openai\"\nbase_url = \"http://{}/v1\"\n\n\
         [[models]]\nname = \"emb\"\ntargets = [\"up/embedding-model\"]\n\n\
         [knowledge]\nembedding_model = \"emb\"\n\n[jobs]\nlease_ms = 1000\n",
        up.addr
    );
    let config = TempConfig::new(&toml);
    let mut gw = Server::start_full(
        &["--db", &db.path_str(), "--config", &config.path_str()],
        &[],
        None,
    );
    let file = upload(gw.addr, "lighthouse.md", LIGHTHOUSE, None);
    let vs = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"file_ids": [file]})),
        None,
    ));
    let id = vs["id"].as_str().unwrap().to_string();
    // The embedding call is under way: its request reached the upstream.
    let calling = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        get(up.addr, "/stats").json()["requests"].as_u64() > Some(0)
    });
    assert!(
        calling,
        "ingestion never called the embedding model:\n{}",
        gw.log()
    );
    gw.signal(libc::SIGKILL);
    gw.wait_exit(Duration::from_secs(5));
    let gw = Server::start_full(
        &["--db", &db.path_str(), "--config", &config.path_str()],
        &[],
        None,
    );
    let store = settled(gw.addr, &id, None, Duration::from_secs(30));
    assert_eq!(
        store["file_counts"]["completed"],
        1,
        "{store}\n{}",
        gw.log()
    );
    let hits = search(gw.addr, &id, json!({"query": "lighthouse keeper"}));
    assert_eq!(hits[0]["file_id"], file.as_str(), "{hits:?}");
}

#[test]
fn a_file_batch_ingests_its_files_together_and_cancelling_it_keeps_nothing_of_the_rest() {
    let up = Server::start_mock_upstream(&["--latency-ms", "1000"]);
    let toml = format!(
        "[[providers]]\nname = \"up\"\ntype = \"openai\"\nbase_url = \"http://{}/v1\"\n\n\
         [[models]]\nname = \"emb\"\ntargets = [\"up/embedding-model\"]\n",
        up.addr
    );
    let gw = Server::start_with_config(&toml, &[]);
    let a = upload(gw.addr, "lighthouse.md", LIGHTHOUSE, None);
    let b = upload(gw.addr, "bread.md", BREAD, None);
    let plain = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"name": "mock"})),
        None,
    ));
    let vs = plain["id"].as_str().unwrap().to_string();
    let batch = ok(&call(
        gw.addr,
        "POST",
        &format!("/v1/vector_stores/{vs}/file_batches"),
        Some(&json!({"file_ids": [a, b], "attributes": {"source": "batch"}})),
        None,
    ));
    assert_eq!(batch["object"], "vector_store.files_batch");
    assert_eq!(batch["file_counts"]["total"], 2, "{batch}");
    let id = batch["id"].as_str().unwrap().to_string();
    let path = format!("/v1/vector_stores/{vs}/file_batches/{id}");
    let done = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        ok(&call(gw.addr, "GET", &path, None, None))["status"] == "completed"
    });
    assert!(done, "the batch never completed:\n{}", gw.log());
    let files = ok(&call(gw.addr, "GET", &format!("{path}/files"), None, None));
    let data = files["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{files}");
    assert!(
        data.iter().all(|f| f["attributes"]["source"] == "batch"),
        "{files}"
    );

    // A second store on the slow embedding model: cancelled while its files ingest.
    let slow = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"metadata": {"embedding_model": "emb"}})),
        None,
    ));
    let slow_id = slow["id"].as_str().unwrap().to_string();
    let batch = ok(&call(
        gw.addr,
        "POST",
        &format!("/v1/vector_stores/{slow_id}/file_batches"),
        Some(&json!({"files": [{"file_id": a}, {"file_id": b, "attributes": {"n": 2}}]})),
        None,
    ));
    let cancel = format!(
        "/v1/vector_stores/{slow_id}/file_batches/{}/cancel",
        batch["id"].as_str().unwrap()
    );
    let cancelled = ok(&call(gw.addr, "POST", &cancel, None, None));
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    // Whatever ingestion was under way ends without writing: once no job is left, nothing
    // has completed.
    let idle = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        ["queued", "running"].iter().all(|status| {
            let jobs = ok(&call(
                gw.addr,
                "GET",
                &format!("/api/jobs?status={status}"),
                None,
                None,
            ));
            jobs["data"].as_array().is_some_and(Vec::is_empty)
        })
    });
    assert!(idle, "ingestion jobs never ended:\n{}", gw.log());
    let store = ok(&call(
        gw.addr,
        "GET",
        &format!("/v1/vector_stores/{slow_id}"),
        None,
        None,
    ));
    assert_eq!(store["file_counts"]["completed"], 0, "{store}");
    assert_eq!(store["file_counts"]["cancelled"], 2, "{store}");
    assert_eq!(store["usage_bytes"], 0, "{store}");
}

#[test]
fn a_response_with_file_search_answers_from_the_right_file_and_cites_it() {
    let gw = Server::start(&[]);
    let lighthouse = upload(gw.addr, "lighthouse.md", LIGHTHOUSE, None);
    let bread = upload(gw.addr, "bread.md", BREAD, None);
    let vs = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"file_ids": [lighthouse, bread]})),
        None,
    ));
    let id = vs["id"].as_str().unwrap().to_string();
    settled(gw.addr, &id, None, Duration::from_secs(30));
    let ask = json!({
        "model": "mock",
        "input": "Who trims the lamp wick of a lighthouse?",
        "instructions": "Answer in one sentence.",
        "tools": [{"type": "file_search", "vector_store_ids": [id], "max_num_results": 2}],
        "include": ["file_search_call.results"],
    });
    let r = ok(&call(gw.addr, "POST", "/v1/responses", Some(&ask), None));
    assert_eq!(
        (r["object"].clone(), r["status"].clone()),
        (json!("response"), json!("completed")),
        "{r}"
    );
    let search = &r["output"][0];
    assert_eq!(search["type"], "file_search_call", "{r}");
    assert_eq!(search["results"][0]["file_id"], lighthouse.as_str(), "{r}");
    let message = &r["output"][1];
    assert_eq!(message["type"], "message", "{r}");
    let text = message["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("keeper trims the lamp wick"), "{r}");
    assert!(!text.contains("[1]"), "the marker is stripped: {text}");
    let citation = &message["content"][0]["annotations"][0];
    assert_eq!(citation["type"], "file_citation", "{r}");
    assert_eq!(citation["file_id"], lighthouse.as_str(), "{r}");
    assert_eq!(citation["filename"], "lighthouse.md", "{r}");
    assert_eq!(citation["index"], text.chars().count(), "{r}");
    assert!(r["usage"]["total_tokens"].as_u64() > Some(0), "{r}");

    // Streamed: the Responses events, in order, telling the same answer.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let s = responses_stream(gw.addr, &streamed);
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(
        s.head.contains("content-type: text/event-stream"),
        "{}",
        s.head
    );
    let told = read_told(&s);
    assert_eq!(told.text, text, "{:?}", told.kinds);
    assert_eq!(told.annotations.len(), 1, "{:?}", told.kinds);
    assert_eq!(&told.annotations[0], citation);
    let order: Vec<&str> = told.kinds.iter().map(String::as_str).collect();
    assert_eq!(
        order[..9],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.file_search_call.in_progress",
            "response.file_search_call.searching",
            "response.file_search_call.completed",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
        ],
        "{order:?}"
    );
    assert_eq!(
        order[order.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ],
        "{order:?}"
    );
    assert_eq!(
        told.last["response"]["output"][0]["type"],
        "file_search_call"
    );
    assert!(told.last["response"]["usage"]["total_tokens"].as_u64() > Some(0));

    // Only listed stores, only the caller's; tools syncgate does not run are refused.
    let mut elsewhere = ask.clone();
    elsewhere["tools"][0]["vector_store_ids"] = json!(["vs_nope"]);
    assert_error(
        &call(gw.addr, "POST", "/v1/responses", Some(&elsewhere), None),
        404,
        None,
        Some("not_found"),
    );
    let mut web = ask.clone();
    web["tools"] = json!([{"type": "web_search"}]);
    let err = assert_error(
        &call(gw.addr, "POST", "/v1/responses", Some(&web), None),
        400,
        Some("invalid_request_error"),
        None,
    );
    assert_eq!(err["param"], "tools");
    // Without the tool: a plain answer, no search.
    let plain = ok(&call(
        gw.addr,
        "POST",
        "/v1/responses",
        Some(&json!({"model": "mock", "input": "hello"})),
        None,
    ));
    assert_eq!(plain["output"].as_array().unwrap().len(), 1, "{plain}");
    assert_eq!(plain["output"][0]["type"], "message");
}

/// `POST /v1/responses` with a streamed `body`, read as the events arrive.
fn responses_stream(addr: SocketAddr, body: &Value) -> Sse {
    let raw = post_req(
        "/v1/responses",
        &body.to_string(),
        &[("Connection", "close")],
    );
    read_sse(addr, &raw, Duration::from_secs(20), None)
}

/// What a Responses stream told: the event types in order, the text its deltas make, the
/// annotations it added, when the first delta came, and its last event's data.
struct Told {
    kinds: Vec<String>,
    text: String,
    annotations: Vec<Value>,
    deltas: usize,
    first_delta: Option<std::time::Instant>,
    last_at: Option<std::time::Instant>,
    last: Value,
}

/// Reads a Responses stream, checking what holds for every one: named events numbered from 0
/// with no gap, every delta and annotation on the message's one content part, each annotation
/// standing where the text had reached when it was added.
fn read_told(s: &Sse) -> Told {
    let mut t = Told {
        kinds: Vec::new(),
        text: String::new(),
        annotations: Vec::new(),
        deltas: 0,
        first_delta: None,
        last_at: None,
        last: Value::Null,
    };
    for (n, (at, kind, data)) in s.named().into_iter().enumerate() {
        assert_eq!(data["type"], kind.as_str(), "{data}");
        assert_eq!(data["sequence_number"], n, "{data}");
        match kind.as_str() {
            "response.output_text.delta" => {
                t.text.push_str(data["delta"].as_str().unwrap());
                t.deltas += 1;
                t.first_delta.get_or_insert(at);
            }
            "response.output_text.annotation.added" => {
                assert_eq!(data["annotation_index"], t.annotations.len(), "{data}");
                assert_eq!(
                    data["annotation"]["index"],
                    t.text.chars().count(),
                    "{data}"
                );
                t.annotations.push(data["annotation"].clone());
            }
            "response.output_text.done" => assert_eq!(data["text"], t.text.as_str()),
            _ => {}
        }
        t.kinds.push(kind);
        t.last_at = Some(at);
        t.last = data;
    }
    t
}

#[test]
fn a_streamed_response_sends_the_models_tokens_as_they_arrive_and_a_stall_fails_it() {
    // The provider paces its chunks 40 ms apart and cuts the answer into characters, so the
    // citation marker arrives split across chunks; a second provider stalls after 3 chunks.
    let up = Server::start_mock_upstream(&["--stream-chunks", "60", "--stream-interval-ms", "40"]);
    let stalls = Server::start_mock_upstream(&["--fault", "stall-after=3"]);
    let toml = format!(
        "{}\n[[providers]]\nname = \"stalls\"\ntype = \"openai\"\n\
         base_url = \"http://{}/v1\"\n[providers.timeouts]\nidle_ms = 800\n\n\
         [[models]]\nname = \"stalling\"\ntargets = [\"stalls/upstream-model\"]\n",
        upstream_model_toml(up.addr),
        stalls.addr
    );
    let gw = Server::start_with_config(&toml, &[]);
    let lighthouse = upload(gw.addr, "lighthouse.md", LIGHTHOUSE, None);
    let bread = upload(gw.addr, "bread.md", BREAD, None);
    let vs = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"file_ids": [lighthouse, bread]})),
        None,
    ));
    let id = vs["id"].as_str().unwrap().to_string();
    settled(gw.addr, &id, None, Duration::from_secs(30));
    let ask = json!({
        "model": "m",
        "input": "Who trims the lamp wick of a lighthouse?",
        "tools": [{"type": "file_search", "vector_store_ids": [id], "max_num_results": 2}],
        "stream": true,
    });
    let s = responses_stream(gw.addr, &ask);
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(s.ended_cleanly, "{:?}", s.events);
    let told = read_told(&s);
    assert_eq!(
        told.kinds.last().map(String::as_str),
        Some("response.completed")
    );
    let message = &told.last["response"]["output"][1];
    let text = message["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("keeper trims the lamp wick"), "{text}");
    assert_eq!(told.text, text, "the deltas make the final text");
    assert!(
        !told.text.contains('['),
        "a marker reached a delta: {:?}",
        told.text
    );
    assert_eq!(told.annotations.len(), 1, "{:?}", told.annotations);
    assert_eq!(told.annotations[0]["file_id"], lighthouse.as_str());
    assert_eq!(told.annotations[0]["index"], text.chars().count());
    assert_eq!(message["content"][0]["annotations"][0], told.annotations[0]);
    // Relayed as it came: many deltas, the first well before the answer was whole (the
    // provider took 60 × 40 ms to send it).
    assert!(told.deltas >= 20, "{} deltas", told.deltas);
    let spread = told.last_at.unwrap() - told.first_delta.unwrap();
    assert!(
        spread >= Duration::from_millis(1200),
        "deltas within {spread:?}"
    );
    // The usage is the provider's, from the usage chunk syncgate asked it for.
    let usage = &told.last["response"]["usage"];
    assert!(usage["output_tokens"].as_u64() > Some(0), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap())
    );

    // A provider that stalls mid-answer: the response fails, as a response, with what came.
    let mut stalling = ask.clone();
    stalling["model"] = json!("stalling");
    let s = responses_stream(gw.addr, &stalling);
    assert_eq!(s.status, 200, "{}", s.head);
    let told = read_told(&s);
    assert_eq!(
        told.kinds.last().map(String::as_str),
        Some("response.failed"),
        "{:?}",
        told.kinds
    );
    assert!(
        !told.kinds.iter().any(|k| k == "response.completed"),
        "{:?}",
        told.kinds
    );
    let failed = &told.last["response"];
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "upstream_timeout", "{failed}");
    assert_eq!(failed["output"][1]["status"], "incomplete", "{failed}");
    assert_eq!(
        failed["output"][1]["content"][0]["text"],
        told.text.as_str()
    );
}

#[test]
fn pdf_html_and_markdown_files_are_read_as_their_text() {
    let gw = Server::start(&[]);
    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    };
    let mut ids = Vec::new();
    for (name, bytes) in [
        ("harbour.pdf", fixture("harbour.pdf")),
        ("tides.html", fixture("tides.html")),
        ("lighthouse.md", LIGHTHOUSE.as_bytes().to_vec()),
    ] {
        let body = multipart(
            "b0undary",
            &[
                ("purpose", None, None, b"assistants"),
                ("file", Some(name), None, &bytes),
            ],
        );
        ids.push(
            ok(&send(gw.addr, &upload_req("b0undary", &body, None)))["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let vs = ok(&call(
        gw.addr,
        "POST",
        "/v1/vector_stores",
        Some(&json!({"file_ids": ids})),
        None,
    ));
    let id = vs["id"].as_str().unwrap().to_string();
    let store = settled(gw.addr, &id, None, Duration::from_secs(30));
    assert_eq!(store["file_counts"]["completed"], 3, "{store}");
    let text_of = |file: &str| {
        let page = ok(&call(
            gw.addr,
            "GET",
            &format!("/v1/vector_stores/{id}/files/{file}/content"),
            None,
            None,
        ));
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["text"].as_str().unwrap().to_string())
            .collect::<String>()
    };
    assert!(
        text_of(&ids[0]).contains("The harbour pilot boards every tanker at dawn."),
        "{}",
        text_of(&ids[0])
    );
    let html = text_of(&ids[1]);
    assert!(
        html.contains("Spring tides follow the new moon & the full moon."),
        "{html}"
    );
    assert!(html.contains("- High water"), "{html}");
    assert!(
        !html.contains('<') && !html.contains("secret") && !html.contains("color"),
        "{html}"
    );
    for (query, want) in [
        ("harbour pilot tanker", &ids[0]),
        ("spring tides moon", &ids[1]),
        ("lighthouse keeper lamp", &ids[2]),
    ] {
        let hits = search(gw.addr, &id, json!({"query": query}));
        assert_eq!(hits[0]["file_id"], want.as_str(), "{query}: {hits:?}");
    }
}
