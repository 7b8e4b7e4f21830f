//! Strict request framing (issue 13): every framing of a body, and every Host, that two HTTP
//! parsers could read differently is refused, the connection closes, and a well-formed request
//! sent right after it is never answered; the valid variants keep working, follow-up included.

mod common;

use std::time::Duration;

use common::*;

/// A well-formed request placed right after each case: answered only when the case was valid.
const FOLLOW_UP: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// One raw request and the status it must get.
struct Case {
    name: &'static str,
    raw: Vec<u8>,
    status: u16,
}

fn case(name: &'static str, raw: impl Into<Vec<u8>>, status: u16) -> Case {
    Case {
        name,
        raw: raw.into(),
        status,
    }
}

/// The chat body every case carries, and its length in decimal and hex.
fn body() -> (String, usize, String) {
    let body = chat_body("framing");
    let len = body.len();
    (body, len, format!("{len:x}"))
}

/// A chat request with `fields` (each line ending in CRLF) after Host, then `rest` after the
/// blank line.
fn post(fields: &str, rest: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{fields}\r\n"
    )
    .into_bytes();
    raw.extend_from_slice(rest);
    raw
}

/// A chat request whose body is sent under `Content-Length: {value}`.
fn with_length(value: &str) -> Vec<u8> {
    let (body, _, _) = body();
    post(&format!("Content-Length: {value}\r\n"), body.as_bytes())
}

/// The body as one chunk: `size_line`, CRLF, the data, then `after` (normally the CRLF that
/// ends the data, the last chunk and the end of the trailers).
fn one_chunk(size_line: &str, after: &[u8]) -> Vec<u8> {
    let (body, _, _) = body();
    let mut out = format!("{size_line}\r\n{body}").into_bytes();
    out.extend_from_slice(after);
    out
}

const END: &[u8] = b"\r\n0\r\n\r\n";

/// A chunked chat request whose body is `chunked`.
fn chunked(chunked: &[u8]) -> Vec<u8> {
    post("Transfer-Encoding: chunked\r\n", chunked)
}

fn get_with(fields: &str) -> Vec<u8> {
    format!("GET /healthz HTTP/1.1\r\n{fields}\r\n").into_bytes()
}

fn refused_cases() -> Vec<Case> {
    let (body, n, x) = body();
    let b = body.as_bytes();
    let d = n.to_string();
    vec![
        // Content-Length: once, and 1*DIGIT.
        case(
            "Content-Length twice, equal",
            post(
                &format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"),
                b,
            ),
            400,
        ),
        case(
            "Content-Length twice, different",
            post(
                &format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1),
                b,
            ),
            400,
        ),
        case(
            "Content-Length list",
            with_length(&format!("{n}, {n}")),
            400,
        ),
        case(
            "Content-Length list without space",
            with_length(&format!("{n},{n}")),
            400,
        ),
        case("Content-Length with +", with_length(&format!("+{n}")), 400),
        case("Content-Length with -", with_length(&format!("-{n}")), 400),
        case("Content-Length in hex", with_length(&format!("0x{x}")), 400),
        case(
            "Content-Length with an inner space",
            with_length(&format!("{} {}", &d[..1], &d[1..])),
            400,
        ),
        case("Content-Length empty", with_length(""), 400),
        case(
            "Content-Length over u64",
            with_length("18446744073709551616"),
            400,
        ),
        case(
            "Content-Length over max_body_bytes",
            post("Content-Length: 4194305\r\n", b""),
            413,
        ),
        // Transfer-Encoding: never empty, never next to Content-Length, only a final chunked.
        case(
            "Transfer-Encoding chunked and Content-Length",
            post(
                &format!("Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n"),
                &one_chunk(&x, END),
            ),
            400,
        ),
        case(
            "Content-Length and Transfer-Encoding chunked",
            post(
                &format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"),
                &one_chunk(&x, END),
            ),
            400,
        ),
        case(
            "Transfer-Encoding empty and Content-Length",
            post(
                &format!("Transfer-Encoding: \r\nContent-Length: {n}\r\n"),
                b,
            ),
            400,
        ),
        case(
            "Transfer-Encoding empty",
            post("Transfer-Encoding: \r\n", &one_chunk(&x, END)),
            400,
        ),
        case(
            "Transfer-Encoding of commas only",
            post("Transfer-Encoding: ,\r\n", &one_chunk(&x, END)),
            400,
        ),
        case(
            "Transfer-Encoding gzip",
            post("Transfer-Encoding: gzip\r\n", b),
            501,
        ),
        case(
            "Transfer-Encoding gzip, chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", &one_chunk(&x, END)),
            501,
        ),
        case(
            "Transfer-Encoding chunked, gzip",
            post("Transfer-Encoding: chunked, gzip\r\n", &one_chunk(&x, END)),
            400,
        ),
        case(
            "Transfer-Encoding chunked twice",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                &one_chunk(&x, END),
            ),
            400,
        ),
        case(
            "Transfer-Encoding in HTTP/1.0",
            {
                let mut raw = b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                raw.extend(one_chunk(&x, END));
                raw
            },
            400,
        ),
        // Chunk size: 1*HEXDIG, then nothing or `;` extensions.
        case(
            "chunk size with +",
            chunked(&one_chunk(&format!("+{x}"), END)),
            400,
        ),
        case(
            "chunk size with -",
            chunked(&one_chunk(&format!("-{x}"), END)),
            400,
        ),
        case(
            "chunk size with 0x",
            chunked(&one_chunk(&format!("0x{x}"), END)),
            400,
        ),
        case(
            "chunk size with a leading space",
            chunked(&one_chunk(&format!(" {x}"), END)),
            400,
        ),
        case(
            "chunk size with a trailing space",
            chunked(&one_chunk(&format!("{x} "), END)),
            400,
        ),
        case(
            "chunk size over u64 (17 hex digits)",
            chunked(&one_chunk("10000000000000000", END)),
            400,
        ),
        case(
            "chunk size of 18 hex digits",
            chunked(&one_chunk("ffffffffffffffffff", END)),
            400,
        ),
        case(
            "chunk size over max_body_bytes",
            chunked(b"400001\r\n"),
            413,
        ),
        // Chunk extensions: no control characters.
        case(
            "NUL in a chunk extension",
            chunked(&one_chunk(&format!("{x};a\0b"), END)),
            400,
        ),
        case(
            "bare CR in a chunk extension",
            chunked(&one_chunk(&format!("{x};a\rb"), END)),
            400,
        ),
        case(
            "control character in a chunk extension",
            chunked(&one_chunk(&format!("{x};a=\x01"), END)),
            400,
        ),
        // Chunk lines: every one ends in CRLF.
        case(
            "chunk data without CRLF",
            chunked(&one_chunk(&x, b"0\r\n\r\n")),
            400,
        ),
        case(
            "chunk data followed by bare LF",
            chunked(&one_chunk(&x, b"\n0\r\n\r\n")),
            400,
        ),
        case(
            "chunk data followed by other bytes",
            chunked(&one_chunk(&x, b"xx\r\n0\r\n\r\n")),
            400,
        ),
        case(
            "chunk size line ending in bare LF",
            chunked(&format!("{x}\n{body}\r\n0\r\n\r\n").into_bytes()),
            400,
        ),
        case(
            "bare CR inside a chunk size line",
            chunked(&one_chunk(&format!("{x}\r;a"), END)),
            400,
        ),
        case(
            "last chunk ending in bare LF",
            chunked(&one_chunk(&x, b"\r\n0\n\r\n")),
            400,
        ),
        case(
            "trailer section ending in bare LF",
            chunked(&one_chunk(&x, b"\r\n0\r\n\n")),
            400,
        ),
        case(
            "trailer line that is not a field",
            chunked(&one_chunk(&x, b"\r\n0\r\nno colon here\r\n\r\n")),
            400,
        ),
        // Host: exactly one (HTTP/1.1), a host and an optional port.
        case("Host list", get_with("Host: a, b\r\n"), 400),
        case("Host list without space", get_with("Host: a,b\r\n"), 400),
        case("Host twice, equal", get_with("Host: x\r\nHost: x\r\n"), 400),
        case(
            "Host twice, different",
            get_with("Host: a\r\nHost: b\r\n"),
            400,
        ),
        case("Host with a path", get_with("Host: a/b\r\n"), 400),
        case("Host missing", get_with(""), 400),
        case(
            "Expect other than 100-continue",
            post(&format!("Content-Length: {n}\r\nExpect: 200-ok\r\n"), b),
            417,
        ),
    ]
}

fn valid_cases() -> Vec<Case> {
    let (body, n, x) = body();
    let b = body.as_bytes();
    let big_x = x.to_uppercase();
    vec![
        case(
            "Content-Length with leading zeros",
            with_length(&format!("000{n}")),
            200,
        ),
        case(
            "tabs around header values",
            post(
                &format!("Content-Length:\t{n}\t\r\nX-Tabbed:\t a \t\r\n"),
                b,
            ),
            200,
        ),
        case("tabs around Host", get_with("Host:\tx\t\r\n"), 200),
        case(
            "Transfer-Encoding Chunked",
            post("Transfer-Encoding: Chunked\r\n", &one_chunk(&x, END)),
            200,
        ),
        case(
            "Transfer-Encoding with tabs",
            post("Transfer-Encoding:\tchunked\t\r\n", &one_chunk(&x, END)),
            200,
        ),
        case(
            "chunk size in upper case with leading zeros",
            chunked(&one_chunk(&format!("00{big_x}"), END)),
            200,
        ),
        case(
            "chunk extension name=value",
            chunked(&one_chunk(&format!("{x};name=value"), END)),
            200,
        ),
        case(
            "chunk extension with a quoted value",
            chunked(&one_chunk(&format!("{x};name=\"quoted value\""), END)),
            200,
        ),
        case(
            "chunk extensions with whitespace",
            chunked(&one_chunk(&format!("{x} ; a = 1 ;\tb"), END)),
            200,
        ),
        case(
            "last chunk with an extension",
            chunked(&one_chunk(&x, b"\r\n0;done\r\n\r\n")),
            200,
        ),
        case(
            "trailers after the last chunk",
            chunked(&one_chunk(
                &x,
                b"\r\n0\r\nX-Checksum: abc\r\nX-Other:\tv \r\n\r\n",
            )),
            200,
        ),
        case(
            "many small chunks",
            chunked(&{
                let mut out = Vec::new();
                for part in b.chunks(7) {
                    out.extend(format!("{:x}\r\n", part.len()).into_bytes());
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                out
            }),
            200,
        ),
        case(
            "empty lines before the request",
            [b"\r\n\r\n".as_slice(), &with_length(&n.to_string())].concat(),
            200,
        ),
        case(
            "Host with a port",
            get_with("Host: 127.0.0.1:8080\r\n"),
            200,
        ),
        case(
            "Host that is an IPv6 literal",
            get_with("Host: [::1]:8080\r\n"),
            200,
        ),
    ]
}

/// Writes `raw` and then [`FOLLOW_UP`]: what the server would read as a second request if it
/// lost track of where the first one ends. A write error is ignored: the server may refuse
/// before reading it all.
fn send_with_follow_up(conn: &mut Conn, raw: &[u8]) {
    let mut bytes = raw.to_vec();
    bytes.extend_from_slice(FOLLOW_UP);
    let _ = conn.write_all(&bytes);
}

fn assert_refused(srv: &Server, case: &Case) {
    let name = case.name;
    let mut conn = Conn::open(srv.addr);
    send_with_follow_up(&mut conn, &case.raw);
    let r = conn.read_response().unwrap_or_else(|e| {
        panic!(
            "{name}: expected {}, reading failed: {e}\nrequest: {}",
            case.status,
            preview(&case.raw)
        )
    });
    assert_eq!(
        r.status,
        case.status,
        "{name}: request {}\ngot:\n{}",
        preview(&case.raw),
        r.describe()
    );
    assert_error(&r, case.status, None, None);
    assert!(
        r.closes(),
        "{name}: the refusal does not say `Connection: close`:\n{}",
        r.describe()
    );
    // Exactly one response, then the end of the connection: the follow-up is never answered.
    match conn.closed_within(Duration::from_secs(5)) {
        Ok(true) => {}
        Ok(false) => panic!("{name}: the connection is still open 5 s after the refusal"),
        Err(e) => panic!("{name}: the request after the refused one was read: {e}"),
    }
}

fn assert_served_with_follow_up(srv: &Server, case: &Case) {
    let name = case.name;
    let mut conn = Conn::open(srv.addr);
    send_with_follow_up(&mut conn, &case.raw);
    for what in ["the request", "the follow-up on the same connection"] {
        let r = conn.read_response().unwrap_or_else(|e| {
            panic!(
                "{name}: {what}: reading failed: {e}\nrequest: {}",
                preview(&case.raw)
            )
        });
        assert_ok(
            &r,
            &format!("{name}: {what} (request {})", preview(&case.raw)),
        );
    }
}

#[test]
fn ambiguous_framing_and_hosts_are_refused_and_the_next_request_is_never_read() {
    let srv = Server::start(&[]);
    for case in refused_cases() {
        assert_refused(&srv, &case);
    }
    assert_ok(
        &get(srv.addr, "/healthz"),
        "GET /healthz after every refusal",
    );
}

#[test]
fn valid_framing_variants_are_served_and_keep_the_connection() {
    let srv = Server::start(&[]);
    for case in valid_cases() {
        assert_served_with_follow_up(&srv, &case);
    }
}
