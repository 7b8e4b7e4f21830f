//! Writing responses: a fixed-length body in one write, or a stream whose every chunk goes to
//! the socket at once (the SSE relay depends on nothing being held back).

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::SystemTime;

use super::Version;

/// A response as handlers build it; the worker (or the front end) writes it.
pub(crate) struct Response {
    pub(crate) status: u16,
    /// Extra headers. Framing, `Date`, `Connection` and `x-request-id` are added when written.
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Body,
}

/// A stream body: called once with the open stream after the head is sent.
pub(crate) type StreamFn = Box<dyn FnOnce(&mut BodyStream<'_>) -> io::Result<()> + Send>;

pub(crate) enum Body {
    Bytes(Vec<u8>),
    /// Sent chunked (HTTP/1.1) or raw until close (HTTP/1.0), each piece as it is produced.
    Stream(StreamFn),
}

impl Response {
    /// A JSON body with `Content-Type: application/json`.
    pub(crate) fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            headers: vec![("content-type", "application/json".to_string())],
            body: Body::Bytes(body),
        }
    }

    /// A plain body with the given content type.
    pub(crate) fn text(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: Body::Bytes(body),
        }
    }

    /// A body produced piece by piece by `produce`, e.g. server-sent events.
    pub(crate) fn stream(status: u16, content_type: &str, produce: StreamFn) -> Response {
        Response {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: Body::Stream(produce),
        }
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: String) -> Response {
        self.headers.push((name, value));
        self
    }
}

/// What the writer must know about the request being answered.
pub(crate) struct WriteMeta<'a> {
    pub(crate) version: Version,
    /// Keep the connection open afterwards; when false the response says `Connection: close`.
    pub(crate) keep_alive: bool,
    pub(crate) request_id: Option<&'a str>,
}

/// The open body of a streamed response. Each `send` is one write to the socket.
pub(crate) struct BodyStream<'a> {
    stream: &'a mut TcpStream,
    chunked: bool,
    bytes: u64,
}

impl BodyStream<'_> {
    /// Sends `data` to the client now. An error means the client is gone (or too slow).
    pub(crate) fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.chunked {
            // One write per chunk: size line, data and CRLF leave together.
            let mut frame = Vec::with_capacity(data.len() + 12);
            write!(frame, "{:x}\r\n", data.len())?;
            frame.extend_from_slice(data);
            frame.extend_from_slice(b"\r\n");
            self.stream.write_all(&frame)?;
        } else {
            self.stream.write_all(data)?;
        }
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// The client's socket, for a producer that waits between pieces and must notice a
    /// client that left meanwhile (the mock upstream polls it).
    pub(crate) fn socket(&self) -> &TcpStream {
        self.stream
    }

    fn finish(self) -> io::Result<u64> {
        if self.chunked {
            self.stream.write_all(b"0\r\n\r\n")?;
        }
        Ok(self.bytes)
    }
}

/// What writing a response did.
pub(crate) struct Written {
    /// Body bytes sent (not counting framing).
    pub(crate) bytes: u64,
    /// Whether the connection may carry another request.
    pub(crate) keep_alive: bool,
}

/// Writes `response`. A stream is chunked over HTTP/1.1; over HTTP/1.0 its end is the
/// connection's close, so the connection is not kept.
pub(crate) fn write_response(
    stream: &mut TcpStream,
    response: Response,
    meta: &WriteMeta<'_>,
) -> io::Result<Written> {
    let keep_alive = keeps_connection(&response, meta);
    let mut head = Vec::with_capacity(256);
    let version = match meta.version {
        Version::Http10 => "HTTP/1.0",
        Version::Http11 => "HTTP/1.1",
    };
    write!(
        head,
        "{version} {} {}\r\ndate: {}\r\n",
        response.status,
        reason(response.status),
        httpdate::fmt_http_date(SystemTime::now())
    )?;
    if let Some(id) = meta.request_id {
        write!(head, "x-request-id: {id}\r\n")?;
    }
    for (name, value) in &response.headers {
        write!(head, "{name}: {value}\r\n")?;
    }
    match (keep_alive, meta.version) {
        (false, _) => head.extend_from_slice(b"connection: close\r\n"),
        (true, Version::Http10) => head.extend_from_slice(b"connection: keep-alive\r\n"),
        (true, Version::Http11) => {}
    }
    match response.body {
        Body::Bytes(body) => {
            write!(head, "content-length: {}\r\n\r\n", body.len())?;
            head.extend_from_slice(&body);
            stream.write_all(&head)?;
            Ok(Written {
                bytes: body.len() as u64,
                keep_alive,
            })
        }
        Body::Stream(produce) => {
            let chunked = meta.version == Version::Http11;
            if chunked {
                head.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
            head.extend_from_slice(b"\r\n");
            stream.write_all(&head)?;
            let mut body = BodyStream {
                stream,
                chunked,
                bytes: 0,
            };
            produce(&mut body)?;
            Ok(Written {
                bytes: body.finish()?,
                keep_alive,
            })
        }
    }
}

/// Whether the connection stays open after `response`: the client asked for it, and the
/// body's end does not depend on closing (a stream over HTTP/1.0 does).
fn keeps_connection(response: &Response, meta: &WriteMeta<'_>) -> bool {
    let stream_over_10 =
        matches!(response.body, Body::Stream(_)) && meta.version == Version::Http10;
    meta.keep_alive && !stream_over_10
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}
