//! `/v1/files` end to end (issue 16): uploads in the multipart shapes curl and the OpenAI SDK
//! send, listed with OpenAI's paging, read back byte for byte, deleted; seen only by the key
//! that uploaded them and by the admin key; the upload cap answered 413 from the head, and
//! uploads past `[files] max_uploads` refused 503 before their body is read. The same flow
//! runs on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "adm-6b1f0e2d3c4a5b6978a9b0c1d2e3f405";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Uploads `data` as `filename` for `purpose`, as `key`; the file object.
fn upload(gw: &Server, key: &str, filename: &str, data: &[u8]) -> Value {
    // The boundary curl uses, and the content carrying a line that looks like one.
    let boundary = "------------------------d74496d66958873e";
    let body = multipart(
        boundary,
        &[
            ("purpose", None, None, b"assistants"),
            (
                "file",
                Some(filename),
                Some("application/octet-stream"),
                data,
            ),
        ],
    );
    let r = send(gw.addr, &upload_req(boundary, &body, Some(key)));
    assert_eq!(r.status, 200, "{}", r.describe());
    r.json()
}

fn call(gw: &Server, method: &str, path: &str, key: &str) -> Resp {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: {}\r\n\r\n",
        bearer(key)
    );
    send(gw.addr, raw.as_bytes())
}

fn make_key(gw: &Server, name: &str) -> String {
    let r = send(
        gw.addr,
        &post_req(
            "/admin/keys",
            &json!({"name": name}).to_string(),
            &[("Authorization", &bearer(ADMIN)), ("Connection", "close")],
        ),
    );
    assert_eq!(r.status, 201, "{}", r.describe());
    r.json()["key"].as_str().unwrap().to_string()
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

fn files_flow(db: &str) {
    let gw = Server::start_full(&["--db", db], &[("SYNCGATE_ADMIN_KEY", ADMIN)], None);
    let (alice, bob) = (make_key(&gw, "alice"), make_key(&gw, "bob"));

    let text = b"Line one.\r\n--------------------------d74496d66958873e not a boundary\r\n\x00\xff binary tail";
    let a1 = upload(&gw, &alice, "notes.md", text);
    assert_eq!(a1["object"], "file");
    assert_eq!(a1["bytes"], text.len());
    assert_eq!(a1["filename"], "notes.md");
    assert_eq!(a1["purpose"], "assistants");
    assert_eq!(a1["status"], "processed");
    assert!(a1["id"].as_str().unwrap().starts_with("file"), "{a1}");
    let a2 = upload(&gw, &alice, "second.txt", b"two");
    let b1 = upload(&gw, &bob, "bob.txt", b"bob's");
    let id = |f: &Value| f["id"].as_str().unwrap().to_string();

    // Bytes back exactly, to the owner only; another key's file is 404, as a missing one.
    let r = call(
        &gw,
        "GET",
        &format!("/v1/files/{}/content", id(&a1)),
        &alice,
    );
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &text[..]),
        "{}",
        r.describe()
    );
    let r = call(&gw, "GET", &format!("/v1/files/{}", id(&a1)), &bob);
    assert_error(&r, 404, None, Some("not_found"));
    let r = call(&gw, "GET", &format!("/v1/files/{}/content", id(&a1)), &bob);
    assert_error(&r, 404, None, Some("not_found"));
    let r = call(&gw, "GET", &format!("/v1/files/{}", id(&b1)), &bob);
    assert_eq!(r.json(), b1);

    // Lists: newest first, OpenAI's paging fields, one key's own; the admin key sees all.
    let r = call(&gw, "GET", "/v1/files?limit=1", &alice);
    let first = r.json();
    assert_eq!(ids(&first), [id(&a2)]);
    assert_eq!(first["object"], "list");
    assert_eq!(
        (first["first_id"].clone(), first["has_more"].clone()),
        (json!(id(&a2)), json!(true))
    );
    let r = call(
        &gw,
        "GET",
        &format!("/v1/files?limit=1&after={}", id(&a2)),
        &alice,
    );
    let next = r.json();
    assert_eq!(
        (ids(&next), next["has_more"].clone()),
        (vec![id(&a1)], json!(false))
    );
    let r = call(&gw, "GET", "/v1/files?order=asc", ADMIN);
    assert_eq!(ids(&r.json()), [id(&a1), id(&a2), id(&b1)]);
    let r = call(&gw, "GET", "/v1/files?order=sideways", &alice);
    assert_error(&r, 400, Some("invalid_request_error"), None);

    // Deleting: not another key's; the owner's, then it is gone.
    let r = call(&gw, "DELETE", &format!("/v1/files/{}", id(&a1)), &bob);
    assert_error(&r, 404, None, Some("not_found"));
    let r = call(&gw, "DELETE", &format!("/v1/files/{}", id(&a1)), &alice);
    assert_eq!(
        r.json(),
        json!({"id": id(&a1), "object": "file", "deleted": true})
    );
    let r = call(
        &gw,
        "GET",
        &format!("/v1/files/{}/content", id(&a1)),
        &alice,
    );
    assert_error(&r, 404, None, Some("not_found"));
    let r = call(&gw, "GET", "/v1/files", &alice);
    assert_eq!(ids(&r.json()), [id(&a2)]);
}

#[test]
fn files_are_kept_listed_read_and_deleted_for_their_owner_on_sqlite() {
    let db = TempDb::new();
    files_flow(&db.path_str());
}

#[test]
fn files_are_kept_listed_read_and_deleted_for_their_owner_on_postgres() {
    let Some(pg) = fresh_postgres() else { return };
    files_flow(&pg.url());
}

#[test]
fn a_bad_upload_gets_a_clear_error_and_nothing_is_kept() {
    let gw = Server::start(&[]);
    let b = "XyZ";
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            multipart(b, &[("file", Some("a.txt"), None, b"x")]),
            "purpose",
        ),
        (
            multipart(b, &[("purpose", None, None, b"assistants")]),
            "file",
        ),
        (
            multipart(
                b,
                &[
                    ("purpose", None, None, b"nonsense"),
                    ("file", Some("a.txt"), None, b"x"),
                ],
            ),
            "purpose",
        ),
        (
            multipart(
                b,
                &[
                    ("purpose", None, None, b"assistants"),
                    ("expires_after[anchor]", None, None, b"created_at"),
                    ("expires_after[seconds]", None, None, b"60"),
                    ("file", Some("a.txt"), None, b"x"),
                ],
            ),
            "expires_after[seconds]",
        ),
        // No closing boundary.
        (
            b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants".to_vec(),
            "file",
        ),
    ];
    for (body, param) in cases {
        let r = send(gw.addr, &upload_req(b, &body, None));
        let err = assert_error(&r, 400, Some("invalid_request_error"), None);
        assert_eq!(err["param"], param, "{}", r.describe());
    }
    // Not multipart at all.
    let r = send(
        gw.addr,
        &post_req("/v1/files", "{}", &[("Connection", "close")]),
    );
    assert_error(&r, 400, Some("invalid_request_error"), None);
    let r = get(gw.addr, "/v1/files");
    assert_eq!(ids(&r.json()).len(), 0, "{}", r.describe());
}

#[test]
fn the_upload_cap_is_answered_from_the_head_and_uploads_past_max_uploads_wait_for_none() {
    let toml = "[files]\nmax_bytes = 1000\nmax_uploads = 1\n";
    let gw = Server::start_with_config(toml, &[]);
    // Declared larger than the cap plus multipart framing: 413 before the body is sent.
    let head = "POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 999999\r\n\r\n";
    let r = send(gw.addr, head.as_bytes());
    assert_error(&r, 413, None, Some("body_too_large"));
    // A file part over the cap inside a body under the framing allowance: 413 too.
    let body = multipart(
        "b",
        &[
            ("purpose", None, None, b"assistants"),
            ("file", Some("big.txt"), None, &[b'x'; 2000]),
        ],
    );
    let r = send(gw.addr, &upload_req("b", &body, None));
    assert_error(&r, 413, None, Some("body_too_large"));

    // One upload held (its body still coming): the next is refused at once. The refused
    // uploads above give their slot back as their workers finish: none is held first.
    let uploads_held = || metric_value(&scrape(gw.addr), "syncgate_uploads_held", &[]);
    let free = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        uploads_held() == Some(0.0)
    });
    assert!(free, "a refused upload kept its slot:\n{}", gw.log());
    let mut slow = Conn::open(gw.addr);
    slow.write_all(
        b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 500\r\n\r\n--b\r\n",
    )
    .unwrap();
    // Wait until the server holds its slot (the metric, which takes none; an upload sent to
    // find out would take the slot itself when it came first).
    let held = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        uploads_held() == Some(1.0)
    });
    assert!(
        held,
        "the first upload's slot was never held:\n{}",
        gw.log()
    );
    let r = send(gw.addr, &upload_req("b", &body, None));
    assert_error(&r, 503, None, Some("uploads_busy"));
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(slow);
    let free = poll_until(Duration::from_secs(15), Duration::from_millis(50), || {
        let small = multipart(
            "b",
            &[
                ("purpose", None, None, b"assistants"),
                ("file", Some("s.txt"), None, b"small"),
            ],
        );
        send(gw.addr, &upload_req("b", &small, None)).status == 200
    });
    assert!(free, "the slot never came back:\n{}", gw.log());
}
