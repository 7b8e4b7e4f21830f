//! The HTTP/1.1 front end: our own, on std `TcpListener` + `httparse`, so that every limit the
//! capacity contract needs (connections, head size, body size, deadlines) is ours to enforce.
//! See docs/decisions/0001-http-front-end.md for why this is not tiny_http.

pub(crate) mod forwarded;
pub(crate) mod multipart;
pub(crate) mod presence;
mod read;
mod response;
mod uploads;

use std::net::SocketAddr;
use std::time::Instant;

pub(crate) use read::{HeadClock, ReadError, Rejection, RequestReader};
pub(crate) use response::{write_response, Body, BodyStream, Response, WriteMeta};
pub(crate) use uploads::{UploadSlot, Uploads};

/// The protocol version of a request; the answer uses the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    Http10,
    Http11,
}

/// One parsed request, body included: the connection thread reads it whole (under the limits)
/// before a worker ever sees it, so a slow client never holds a worker.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    /// The path without the query string (absolute-form targets are reduced to it).
    pub(crate) path: String,
    /// The query string without its `?`, undecoded; empty when there is none.
    pub(crate) query: String,
    pub(crate) version: Version,
    /// Header names lower-cased, in the order received.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    /// Whether the client asked to keep the connection open after this request.
    pub(crate) keep_alive: bool,
    pub(crate) peer: SocketAddr,
    /// When the whole head had arrived: the start of this request's clock.
    pub(crate) received: Instant,
    /// The client's `X-Request-Id` when valid, else one we made.
    pub(crate) request_id: String,
    /// What serving it taught us, for its request-log row.
    pub(crate) record: std::sync::Arc<crate::api::record::Record>,
    /// Who is calling, once admission has decided (its key's permit is freed with it).
    pub(crate) caller: Option<crate::auth::Caller>,
    /// An upload's slot among those held at once, given back when the request is dropped.
    pub(crate) _upload: Option<UploadSlot>,
}

impl Request {
    /// The first value of a header, by its lower-case name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Accepts a client's request id when it is 1–128 visible ASCII characters; else makes one: a
/// version-4 UUID from the thread's fast generator. An id must be unique, not unguessable,
/// and asking the kernel for random bytes was a system call on every request.
pub(crate) fn request_id(given: Option<&str>) -> String {
    match given {
        Some(id) if is_valid_request_id(id) => id.to_string(),
        _ => uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
            .into_uuid()
            .simple()
            .to_string(),
    }
}

fn is_valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Allow-listed request headers that may appear in debug logs; everything else (Authorization
/// above all) is shown only by name.
const LOGGABLE_HEADERS: &[&str] = &[
    "accept",
    "connection",
    "content-length",
    "content-type",
    "expect",
    "host",
    "transfer-encoding",
    "user-agent",
    "x-request-id",
];

/// The headers as one log-safe string: values only for allow-listed names.
pub(crate) fn loggable_headers(headers: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in headers {
        if !out.is_empty() {
            out.push_str(", ");
        }
        if LOGGABLE_HEADERS.contains(&name.as_str()) {
            out.push_str(&format!("{name}: {value:?}"));
        } else {
            out.push_str(&format!("{name}: <redacted>"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_valid() {
        assert_eq!(request_id(Some("abc-123")), "abc-123");
        let long = "x".repeat(128);
        assert_eq!(request_id(Some(&long)), long);
        for bad in ["", "has space", "tab\there", "é", &"y".repeat(129)] {
            let made = request_id(Some(bad));
            assert_ne!(made, bad);
            assert_eq!(made.len(), 32, "generated id {made:?}");
        }
        assert_ne!(request_id(None), request_id(None));
    }

    #[test]
    fn secrets_are_not_loggable() {
        let headers = vec![
            ("authorization".to_string(), "Bearer sk-canary".to_string()),
            ("user-agent".to_string(), "curl/8".to_string()),
        ];
        let line = loggable_headers(&headers);
        assert!(!line.contains("sk-canary"), "{line}");
        assert!(line.contains("curl/8"), "{line}");
    }
}
