//! Reading one request off a connection: the head through httparse, then the body by
//! Content-Length or chunked framing, under RFC 9112's rules and our size limits and deadlines.
//!
//! Every refusal here ends the connection: once framing is in doubt, nothing later on the same
//! connection can be trusted to start where we think it does.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::{request_id, Request, Version};
use crate::config::HttpLimits;

/// Longest request line (method, target, version) we read; longer → 414.
pub(crate) const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest header block (everything after the request line); larger → 431.
pub(crate) const MAX_HEADER_BLOCK: usize = 32 * 1024;
/// Most header fields in one request; more → 431.
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size plus extensions) in a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
/// How much we ask the kernel for per read.
const READ_CHUNK: usize = 8 * 1024;

/// Why a request was refused before it reached a handler. Each becomes an error response
/// (status in `ApiError::status`) followed by closing the connection.
#[derive(Debug)]
pub(crate) enum Rejection {
    /// The request line is longer than [`MAX_REQUEST_LINE`] (414).
    RequestLineTooLong,
    /// The header block is over [`MAX_HEADER_BLOCK`] or has over [`MAX_HEADERS`] fields (431).
    HeaderTooLarge(&'static str),
    /// The declared or decoded body is over `max_body_bytes`, or an upload's over its own cap
    /// (413).
    BodyTooLarge { limit: u64 },
    /// An upload while `at_once` others are held (503, before its body is read).
    UploadsBusy { at_once: usize },
    /// The head or the body framing is malformed (400).
    Malformed(String),
    /// A transfer coding other than `chunked` (501).
    UnsupportedTransferCoding(String),
    /// An `Expect` other than `100-continue` (417).
    ExpectationFailed,
    /// The head did not arrive within `header_timeout` (408).
    HeadTimeout,
    /// The body went silent for longer than `body_timeout` (408).
    BodyTimeout,
}

/// What ended the attempt to read a request.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed, reset or failed mid-request: there is no one to answer.
    Closed,
    /// The request is refused: answer, then close.
    Reject(Rejection),
}

impl From<Rejection> for ReadError {
    fn from(r: Rejection) -> ReadError {
        ReadError::Reject(r)
    }
}

/// Refuses a body whose declared length is over `max` (413), before any of it is read.
fn check_declared(framing: Option<&Framing>, max: u64) -> Result<(), Rejection> {
    match framing {
        Some(Framing::Length(n)) if *n > max => Err(Rejection::BodyTooLarge { limit: max }),
        _ => Ok(()),
    }
}

/// How the body of a request is delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// What the next request's head is timed from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HeadClock {
    /// The connection's first request: its whole head is due `header_timeout` after the
    /// connection was accepted, the wait for its first byte included.
    Accepted(Instant),
    /// A later request on a kept-alive connection: it may be `keepalive_timeout` in coming,
    /// and its head is due `header_timeout` after its first byte.
    KeepAlive,
}

/// The parts of a head we keep, copied out of the read buffer.
struct Head {
    method: String,
    target: String,
    version: Version,
    headers: Vec<(String, String)>,
}

/// A connection's read side: a buffer that outlives one request, so pipelined bytes read
/// together with one request are the start of the next.
pub(crate) struct RequestReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The read timeout last set on the socket, to skip a syscall when it is unchanged.
    timeout: Option<Duration>,
}

impl RequestReader {
    pub(crate) fn new() -> RequestReader {
        RequestReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            timeout: None,
        }
    }

    /// Reads the next request. `Ok(None)` means the connection ended cleanly between requests
    /// (the peer closed, or stayed silent until `clock` says it may no longer).
    pub(crate) fn read_request(
        &mut self,
        stream: &mut TcpStream,
        limits: &HttpLimits,
        clock: HeadClock,
        peer: SocketAddr,
    ) -> Result<Option<Request>, ReadError> {
        let Some(deadline) = self.await_request(stream, limits, clock)? else {
            return Ok(None);
        };
        let head = self.read_head(stream, deadline)?;
        let received = Instant::now();
        check_host(&head.headers, head.version)?;
        let framing = framing(&head.headers, head.version)?;
        let keep_alive = wants_keep_alive(&head.headers, head.version);
        let (path, query) = request_path(&head.target);
        let (max_body, upload) = match &limits.uploads {
            Some(uploads) if uploads.is_upload(&head.method, &path) => {
                check_declared(framing.as_ref(), uploads.max_bytes())?;
                let slot = uploads.take().ok_or(Rejection::UploadsBusy {
                    at_once: uploads.at_once(),
                })?;
                (uploads.max_bytes(), Some(slot))
            }
            _ => (limits.max_body_bytes, None),
        };
        let body = self.read_body(stream, &head, framing, limits, max_body)?;
        let request_id = request_id(header(&head.headers, "x-request-id"));
        Ok(Some(Request {
            method: head.method,
            path,
            query,
            version: head.version,
            headers: head.headers,
            body,
            keep_alive,
            peer,
            received,
            request_id,
            record: Default::default(),
            caller: None,
            _upload: upload,
        }))
    }

    /// Waits for the next request to begin and returns when its head is due, or `None` when the
    /// connection ended first.
    fn await_request(
        &mut self,
        stream: &mut TcpStream,
        limits: &HttpLimits,
        clock: HeadClock,
    ) -> Result<Option<Instant>, ReadError> {
        let (idle, due) = match clock {
            HeadClock::Accepted(at) => {
                let due = at + limits.header_timeout;
                (due.saturating_duration_since(Instant::now()), Some(due))
            }
            HeadClock::KeepAlive => (limits.keepalive_timeout, None),
        };
        self.skip_empty_lines();
        if self.start == self.end {
            // Between requests the connection holds no buffer: wait for the first byte with a
            // peek, so a thousand idle keep-alive connections cost no read buffers at all.
            self.release();
            self.set_timeout(stream, idle);
            match stream.peek(&mut [0u8; 1]) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(_) => return Err(ReadError::Closed),
            }
        }
        // Pipelined bytes already buffered start their clock now: the time spent serving the
        // requests before them was not the client's.
        Ok(Some(
            due.unwrap_or_else(|| Instant::now() + limits.header_timeout),
        ))
    }

    /// Reads until a whole head is buffered and parsed, or `deadline` passes (408).
    fn read_head(&mut self, stream: &mut TcpStream, deadline: Instant) -> Result<Head, ReadError> {
        loop {
            if let Some(head) = self.parse_head()? {
                return Ok(head);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Rejection::HeadTimeout.into());
            }
            match self.fill(stream, left) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(Rejection::HeadTimeout.into()),
                Err(_) => return Err(ReadError::Closed),
            }
        }
    }

    /// Reads the body `framing` announces, refusing one over `max_body` (a declared length
    /// before reading any of it).
    fn read_body(
        &mut self,
        stream: &mut TcpStream,
        head: &Head,
        framing: Option<Framing>,
        limits: &HttpLimits,
        max_body: u64,
    ) -> Result<Vec<u8>, ReadError> {
        check_declared(framing.as_ref(), max_body)?;
        match framing {
            None => Ok(Vec::new()),
            Some(Framing::Length(n)) => {
                self.continue_if_expected(stream, head)?;
                self.read_exact_body(stream, n as usize, limits.body_timeout)
            }
            Some(Framing::Chunked) => {
                self.continue_if_expected(stream, head)?;
                self.read_chunked_body(stream, limits, max_body)
            }
        }
    }

    /// Tries to parse a complete head from the buffer, enforcing the size limits as soon as the
    /// buffered bytes cross them, complete head or not.
    fn parse_head(&mut self) -> Result<Option<Head>, Rejection> {
        self.skip_empty_lines();
        let data = &self.buf[self.start..self.end];
        let line_end = data.iter().position(|&b| b == b'\n');
        let line = &data[..line_end.unwrap_or(data.len())];
        // A CR may be the first half of the line's CRLF: it is not counted.
        if line.strip_suffix(b"\r").unwrap_or(line).len() > MAX_REQUEST_LINE {
            return Err(Rejection::RequestLineTooLong);
        }
        let Some(line_end) = line_end else {
            return Ok(None);
        };
        let head_start = line_end + 1;
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let parsed = match req.parse(data) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if data.len() - head_start > MAX_HEADER_BLOCK {
                    return Err(Rejection::HeaderTooLarge("header block over 32 KiB"));
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Rejection::HeaderTooLarge("more than 100 header fields"))
            }
            Err(e) => return Err(malformed(format!("malformed request head: {e}"))),
        };
        if parsed - head_start > MAX_HEADER_BLOCK {
            return Err(Rejection::HeaderTooLarge("header block over 32 KiB"));
        }
        let version = match req.version {
            Some(0) => Version::Http10,
            _ => Version::Http11,
        };
        let mut headers = Vec::with_capacity(req.headers.len());
        for field in req.headers.iter() {
            let name = field.name.to_ascii_lowercase();
            // httparse already refuses most of these; the check makes the rule ours.
            if field.value.iter().any(|&b| is_ctl(b)) {
                return Err(malformed(format!(
                    "invalid character in the value of header `{name}`"
                )));
            }
            headers.push((name, String::from_utf8_lossy(field.value).into_owned()));
        }
        let head = Head {
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            version,
            headers,
        };
        self.start += parsed;
        Ok(Some(head))
    }

    /// Sends `100 Continue` when the client waits for it before sending the body it announced.
    fn continue_if_expected(
        &mut self,
        stream: &mut TcpStream,
        head: &Head,
    ) -> Result<(), ReadError> {
        let Some(expect) = header(&head.headers, "expect") else {
            return Ok(());
        };
        if !expect.eq_ignore_ascii_case("100-continue") {
            return Err(Rejection::ExpectationFailed.into());
        }
        // Only an HTTP/1.1 client understands 1xx; only one that has not started the body needs it.
        if head.version == Version::Http11 && self.start == self.end {
            stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|_| ReadError::Closed)?;
        }
        Ok(())
    }

    fn read_exact_body(
        &mut self,
        stream: &mut TcpStream,
        len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, ReadError> {
        let mut body = vec![0u8; len];
        let buffered = (self.end - self.start).min(len);
        body[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        let mut filled = buffered;
        while filled < len {
            self.set_timeout(stream, timeout);
            match stream.read(&mut body[filled..]) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(Rejection::BodyTimeout.into()),
                Err(_) => return Err(ReadError::Closed),
            }
        }
        Ok(body)
    }

    /// Decodes a chunked body (RFC 9112 §7.1), refusing it once it passes `max_body`.
    fn read_chunked_body(
        &mut self,
        stream: &mut TcpStream,
        limits: &HttpLimits,
        max_body: u64,
    ) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(stream, MAX_CHUNK_LINE, limits.body_timeout)?;
            let size = parse_chunk_size(&line)?;
            if size == 0 {
                break;
            }
            if body.len() as u64 + size > max_body {
                return Err(Rejection::BodyTooLarge { limit: max_body }.into());
            }
            let mut left = size as usize;
            while left > 0 {
                if self.start == self.end {
                    self.fill_body(stream, limits.body_timeout)?;
                }
                let take = left.min(self.end - self.start);
                body.extend_from_slice(&self.buf[self.start..self.start + take]);
                self.start += take;
                left -= take;
            }
            self.expect_crlf(stream, limits.body_timeout)?;
        }
        self.read_trailers(stream, limits.body_timeout)?;
        Ok(body)
    }

    /// Reads the CRLF that must end a chunk's data.
    fn expect_crlf(&mut self, stream: &mut TcpStream, timeout: Duration) -> Result<(), ReadError> {
        while self.end - self.start < 2 {
            self.fill_body(stream, timeout)?;
        }
        if self.buf[self.start..self.start + 2] != *b"\r\n" {
            return Err(malformed("chunk data not followed by CRLF").into());
        }
        self.start += 2;
        Ok(())
    }

    /// Reads the trailer section after the last chunk: fields checked, bounded like a header
    /// block, and dropped.
    fn read_trailers(
        &mut self,
        stream: &mut TcpStream,
        timeout: Duration,
    ) -> Result<(), ReadError> {
        let mut trailer_bytes = 0;
        loop {
            let line = self.read_line(stream, MAX_HEADER_BLOCK, timeout)?;
            if line.is_empty() {
                return Ok(());
            }
            trailer_bytes += line.len();
            if trailer_bytes > MAX_HEADER_BLOCK {
                return Err(Rejection::HeaderTooLarge("trailer section over 32 KiB").into());
            }
            if !is_field_line(&line) {
                return Err(malformed("malformed trailer field").into());
            }
        }
    }

    /// Reads one line of a chunked body (up to `max` bytes before its CRLF) and returns it
    /// without the CRLF. Every such line ends in CRLF: a bare LF or a bare CR is refused.
    fn read_line(
        &mut self,
        stream: &mut TcpStream,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, ReadError> {
        let too_long = || malformed("line too long in chunked body");
        loop {
            let data = &self.buf[self.start..self.end];
            if let Some(i) = data.iter().position(|&b| b == b'\n') {
                let Some(line) = data[..i].strip_suffix(b"\r") else {
                    return Err(malformed("bare LF in chunked body").into());
                };
                if line.len() > max {
                    return Err(too_long().into());
                }
                if line.contains(&b'\r') {
                    return Err(malformed("bare CR in chunked body").into());
                }
                let line = line.to_vec();
                self.start += i + 1;
                return Ok(line);
            }
            if data.len() > max + 1 {
                return Err(too_long().into());
            }
            self.fill_body(stream, timeout)?;
        }
    }

    /// Reads more body bytes into the buffer, mapping silence to 408 and EOF to a closed peer.
    fn fill_body(&mut self, stream: &mut TcpStream, timeout: Duration) -> Result<(), ReadError> {
        match self.fill(stream, timeout) {
            Ok(0) => Err(ReadError::Closed),
            Ok(_) => Ok(()),
            Err(e) if is_timeout(&e) => Err(Rejection::BodyTimeout.into()),
            Err(_) => Err(ReadError::Closed),
        }
    }

    /// One read from the socket into the buffer's free space, waiting at most `timeout`.
    fn fill(&mut self, stream: &mut TcpStream, timeout: Duration) -> io::Result<usize> {
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < READ_CHUNK {
                self.buf.resize(self.end + READ_CHUNK, 0);
            }
        }
        // Usually the bytes are already there (the idle peek saw them arrive): take them
        // without waiting, so the common case changes no socket timeout.
        match read_ready(stream, &mut self.buf[self.end..]) {
            Ok(Some(n)) => {
                self.end += n;
                return Ok(n);
            }
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        self.set_timeout(stream, timeout);
        loop {
            match stream.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops the empty lines a client may send before a request (RFC 9112 §2.2), so they count
    /// against no limit and hold no memory while the head deadline runs.
    fn skip_empty_lines(&mut self) {
        loop {
            let data = &self.buf[self.start..self.end];
            let n = if data.starts_with(b"\r\n") {
                2
            } else if data.starts_with(b"\n") {
                1
            } else {
                return;
            };
            self.start += n;
        }
    }

    fn set_timeout(&mut self, stream: &TcpStream, timeout: Duration) {
        // A zero duration means "no timeout" to the socket API; never ask for that.
        let timeout = Some(timeout.max(Duration::from_millis(1)));
        if self.timeout != timeout && stream.set_read_timeout(timeout).is_ok() {
            self.timeout = timeout;
        }
    }

    /// Gives back the read buffer when no pipelined bytes wait in it, so a connection that
    /// will wait a long time before answering (the mock upstream's latency) holds none.
    pub(crate) fn release_if_drained(&mut self) {
        if self.start == self.end {
            self.release();
        }
    }

    /// Gives back the buffer between requests, so an idle connection holds no memory for it.
    fn release(&mut self) {
        self.start = 0;
        self.end = 0;
        self.buf = Vec::new();
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn malformed(why: impl Into<String>) -> Rejection {
    Rejection::Malformed(why.into())
}

/// A control character other than tab: never part of a header value or a chunk extension.
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// Every value of the header `name`, in order.
fn values<'a>(headers: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Decides how the body is delimited (RFC 9112 §6.1–6.3), on the strict side: framing that two
/// parsers could read differently is refused, so no request can hide another behind its body.
fn framing(headers: &[(String, String)], version: Version) -> Result<Option<Framing>, Rejection> {
    let lengths: Vec<&str> = values(headers, "content-length").collect();
    let codings: Vec<&str> = values(headers, "transfer-encoding").collect();
    if !codings.is_empty() {
        if !lengths.is_empty() {
            return Err(malformed("Content-Length together with Transfer-Encoding"));
        }
        if version == Version::Http10 {
            return Err(malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        return transfer_framing(&codings).map(Some);
    }
    match lengths[..] {
        [] => Ok(None),
        [value] => match parse_content_length(value) {
            Some(0) => Ok(None),
            Some(n) => Ok(Some(Framing::Length(n))),
            None => Err(malformed(format!("invalid Content-Length {value:?}"))),
        },
        _ => Err(malformed("Content-Length sent more than once")),
    }
}

/// The framing Transfer-Encoding values ask for: we decode `chunked` applied once, last, and
/// no other coding.
fn transfer_framing(values: &[&str]) -> Result<Framing, Rejection> {
    let codings: Vec<String> = values
        .iter()
        .flat_map(|v| v.split(','))
        .map(|c| c.trim_matches([' ', '\t']).to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    let chunked = codings.iter().filter(|c| *c == "chunked").count();
    if codings.is_empty() {
        return Err(malformed("empty Transfer-Encoding"));
    }
    if chunked > 1 {
        return Err(malformed("chunked applied more than once"));
    }
    if chunked == 1 && codings.last().is_some_and(|c| c != "chunked") {
        return Err(malformed("chunked is not the last transfer coding"));
    }
    match codings.into_iter().find(|c| c != "chunked") {
        Some(other) => Err(Rejection::UnsupportedTransferCoding(other)),
        None => Ok(Framing::Chunked),
    }
}

/// RFC 9112 §3.2: at most one Host, required in HTTP/1.1, holding a host and an optional port.
fn check_host(headers: &[(String, String)], version: Version) -> Result<(), Rejection> {
    let hosts: Vec<&str> = values(headers, "host").collect();
    match hosts[..] {
        [] if version == Version::Http10 => Ok(()),
        [] => Err(malformed("an HTTP/1.1 request needs a Host header")),
        [host] if is_valid_host(host) => Ok(()),
        [host] => Err(malformed(format!("invalid Host {host:?}"))),
        _ => Err(malformed("Host sent more than once")),
    }
}

/// Whether `value` is `uri-host [":" port]` (RFC 3986 §3.2.2–3.2.3), or empty. Stricter than the
/// grammar in one point: a comma, which a reg-name may hold, is refused, because `a, b` is how
/// two Host lines folded into one look.
fn is_valid_host(value: &str) -> bool {
    let after_host = match value.strip_prefix('[') {
        Some(rest) => rest.find(']').map_or(value.len(), |i| i + 2),
        None => 0,
    };
    let (host, port) = match value[after_host..].find(':') {
        Some(i) => value.split_at(after_host + i),
        None => (value, ""),
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(ip) => {
            !ip.is_empty()
                && ip
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+;=".contains(&b)),
    };
    host_ok && port.bytes().skip(1).all(|b| b.is_ascii_digit())
}

/// A Content-Length value: `1*DIGIT` and nothing else (RFC 9110 §8.6), leading zeros allowed;
/// `None` when it is not that, or does not fit in a u64.
fn parse_content_length(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.bytes().try_fold(0u64, |n, b| {
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// A chunk-size line (RFC 9112 §7.1): `1*HEXDIG`, then nothing or extensions (skipped).
fn parse_chunk_size(line: &[u8]) -> Result<u64, Rejection> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (size, ext) = line.split_at(digits);
    let size = size
        .iter()
        .try_fold(0u64, |n, &b| {
            let digit = char::from(b).to_digit(16)?;
            n.checked_mul(16)?.checked_add(u64::from(digit))
        })
        .filter(|_| digits > 0);
    match size {
        Some(size) if is_chunk_ext(ext) => Ok(size),
        Some(_) if ext.iter().any(|&b| is_ctl(b)) => {
            Err(malformed("control character in a chunk extension"))
        }
        _ => Err(malformed("invalid chunk size")),
    }
}

/// Whether `ext`, what follows a chunk size, is empty or `BWS ";"` and then extensions with no
/// control character (tab aside).
fn is_chunk_ext(ext: &[u8]) -> bool {
    let after_ws = ext.iter().position(|&b| b != b' ' && b != b'\t');
    match after_ws {
        None => ext.is_empty(),
        Some(i) => ext[i] == b';' && !ext.iter().any(|&b| is_ctl(b)),
    }
}

/// Whether a trailer line is `field-name ":" field-value`, with a token name and a value free
/// of control characters (tab aside).
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = line.split_at(colon);
    let is_tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    !name.is_empty() && name.iter().all(is_tchar) && !value.iter().any(|&b| is_ctl(b))
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 closes unless told `keep-alive`.
fn wants_keep_alive(headers: &[(String, String)], version: Version) -> bool {
    let has_token = |token: &str| {
        headers
            .iter()
            .filter(|(n, _)| n == "connection")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        Version::Http11 => !has_token("close"),
        Version::Http10 => has_token("keep-alive"),
    }
}

/// The path of a request target, without its query; an absolute-form target is reduced to it.
/// The path and the query string (without its `?`) of a request target.
fn request_path(target: &str) -> (String, String) {
    let origin = match target.find("://") {
        Some(i) if target.starts_with("http") => match target[i + 3..].find('/') {
            Some(j) => &target[i + 3 + j..],
            None => "/",
        },
        _ => target,
    };
    match origin.split_once('?') {
        Some((path, query)) => (path.to_string(), query.to_string()),
        None => (origin.to_string(), String::new()),
    }
}

/// Reads what the socket already holds without waiting: `Ok(None)` if nothing is there yet.
fn read_ready(stream: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: the descriptor is `stream`'s, open for this call; `buf` is valid for
        // `buf.len()` bytes of writing.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => {}
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_content_length("5"), Some(5));
        assert_eq!(parse_content_length("007"), Some(7));
        assert_eq!(parse_content_length("00000000000000000000042"), Some(42));
        assert_eq!(parse_content_length("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "abc",
            "-1",
            "+5",
            "1 2",
            "5, 5",
            "5,5",
            "0x10",
            "1e3",
            "18446744073709551616",
        ] {
            assert_eq!(parse_content_length(bad), None, "accepted {bad:?}");
        }
    }

    #[test]
    fn content_length_must_occur_once() {
        let host = ("host", "x");
        let f = |fields: &[(&str, &str)]| framing(&h(fields), Version::Http11);
        assert_eq!(
            f(&[host, ("content-length", "5")]).unwrap(),
            Some(Framing::Length(5))
        );
        assert_eq!(f(&[host, ("content-length", "0")]).unwrap(), None);
        for bad in [
            &[("content-length", "5"), ("content-length", "5")][..],
            &[("content-length", "5"), ("content-length", "6")],
            &[("content-length", "7, 7")],
        ] {
            assert!(
                matches!(f(bad), Err(Rejection::Malformed(_))),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn transfer_encoding_rules() {
        let te = |v: &str| framing(&h(&[("transfer-encoding", v)]), Version::Http11);
        assert_eq!(te("chunked").unwrap(), Some(Framing::Chunked));
        assert_eq!(te("Chunked").unwrap(), Some(Framing::Chunked));
        assert_eq!(te(" , chunked").unwrap(), Some(Framing::Chunked));
        for unsupported in ["gzip", "gzip, chunked", "x-custom"] {
            assert!(
                matches!(
                    te(unsupported),
                    Err(Rejection::UnsupportedTransferCoding(_))
                ),
                "{unsupported:?} should be 501"
            );
        }
        for bad in ["", " ", ",", "chunked, chunked", "chunked, gzip"] {
            assert!(
                matches!(te(bad), Err(Rejection::Malformed(_))),
                "{bad:?} should be 400"
            );
        }
        let two_lines = h(&[
            ("transfer-encoding", "gzip"),
            ("transfer-encoding", "chunked"),
        ]);
        assert!(matches!(
            framing(&two_lines, Version::Http11),
            Err(Rejection::UnsupportedTransferCoding(_))
        ));
    }

    #[test]
    fn transfer_encoding_is_refused_next_to_content_length_or_in_http10() {
        for te in ["chunked", ""] {
            let both = h(&[("transfer-encoding", te), ("content-length", "3")]);
            assert!(
                matches!(
                    framing(&both, Version::Http11),
                    Err(Rejection::Malformed(_))
                ),
                "Transfer-Encoding {te:?} with Content-Length"
            );
        }
        let old = h(&[("transfer-encoding", "chunked")]);
        assert!(matches!(
            framing(&old, Version::Http10),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn host_is_one_host_and_port() {
        let check = |fields: &[(&str, &str)], v| check_host(&h(fields), v);
        assert!(check(&[], Version::Http11).is_err());
        assert!(check(&[], Version::Http10).is_ok());
        assert!(check(&[("host", "a"), ("host", "a")], Version::Http11).is_err());
        assert!(check(&[("host", "a"), ("host", "b")], Version::Http10).is_err());
        for good in [
            "x",
            "127.0.0.1",
            "api.example.com:8080",
            "[::1]",
            "[::1]:80",
            "my_host",
            "",
        ] {
            assert!(is_valid_host(good), "refused {good:?}");
        }
        for bad in [
            "a, b", "a,b", "a b", "a/b", "a:b", "a:1:2", "[::1", "[::1]x", "[]", "a@b",
        ] {
            assert!(!is_valid_host(bad), "accepted {bad:?}");
        }
    }

    #[test]
    fn chunk_sizes_are_hex_digits_only() {
        assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"001A").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"0").unwrap(), 0);
        assert_eq!(parse_chunk_size(b"ffffffffffffffff").unwrap(), u64::MAX);
        for bad in [
            &b""[..],
            b"xyz",
            b"+1a",
            b"-1a",
            b"0x1a",
            b" 1a",
            b"1a ",
            b"1 a",
            b"10000000000000000",
            b"ffffffffffffffffff",
        ] {
            assert!(
                parse_chunk_size(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_extensions_hold_no_control_characters() {
        for good in [
            &b"1a;name=value"[..],
            b"1a;name",
            b"1a ; name = value",
            b"1a\t;name=\"quoted value\"",
            b"1a;a=1;b=2",
            b"1a;name=\"tab\tinside\"",
        ] {
            assert_eq!(
                parse_chunk_size(good).unwrap(),
                26,
                "{:?}",
                String::from_utf8_lossy(good)
            );
        }
        for bad in [
            &b"1a;a\0b"[..],
            b"1a;a\rb",
            b"1a;a\x01",
            b"1a;a\x7f",
            b"1a x",
            b"1a=1",
        ] {
            assert!(
                parse_chunk_size(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn trailer_lines_are_fields() {
        assert!(is_field_line(b"X-Checksum: abc"));
        assert!(is_field_line(b"x-empty:"));
        for bad in [
            &b"no colon"[..],
            b": no name",
            b"bad name: v",
            b" folded: v",
            b"x: a\0b",
        ] {
            assert!(
                !is_field_line(bad),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A reader holding `bytes` as if they had just been read off the socket.
    fn buffered(bytes: &[u8]) -> RequestReader {
        let mut reader = RequestReader::new();
        reader.buf = bytes.to_vec();
        reader.end = bytes.len();
        reader
    }

    #[test]
    fn request_line_is_refused_at_the_byte_past_8_kib() {
        let line = format!("GET /{} HTTP/1.1", "a".repeat(MAX_REQUEST_LINE - 14));
        assert_eq!(line.len(), MAX_REQUEST_LINE);
        let head = format!("{line}\r\nHost: x\r\n\r\n");
        assert!(buffered(head.as_bytes()).parse_head().unwrap().is_some());
        // Not yet a line end, and not yet over: wait for more.
        assert!(buffered(line.as_bytes()).parse_head().unwrap().is_none());
        assert!(buffered(format!("{line}\r").as_bytes())
            .parse_head()
            .unwrap()
            .is_none());
        let over = format!("{line}H");
        assert!(matches!(
            buffered(over.as_bytes()).parse_head(),
            Err(Rejection::RequestLineTooLong)
        ));
    }

    #[test]
    fn empty_lines_before_a_request_are_dropped() {
        let mut reader = buffered(b"\r\n\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let head = reader.parse_head().unwrap().expect("a complete head");
        assert_eq!(head.target, "/");
        assert_eq!(reader.start, reader.end);
        let mut crlf_only = buffered(&b"\r\n".repeat(MAX_REQUEST_LINE));
        assert!(crlf_only.parse_head().unwrap().is_none());
        assert_eq!(
            crlf_only.start, crlf_only.end,
            "empty lines kept in the buffer"
        );
    }

    #[test]
    fn keep_alive_defaults_follow_the_version() {
        assert!(wants_keep_alive(&[], Version::Http11));
        assert!(!wants_keep_alive(
            &h(&[("connection", "Close")]),
            Version::Http11
        ));
        assert!(!wants_keep_alive(&[], Version::Http10));
        assert!(wants_keep_alive(
            &h(&[("connection", "keep-alive")]),
            Version::Http10
        ));
    }

    #[test]
    fn targets_reduce_to_their_path() {
        let pair = |p: &str, q: &str| (p.to_string(), q.to_string());
        assert_eq!(request_path("/v1/models?x=1"), pair("/v1/models", "x=1"));
        assert_eq!(request_path("http://h:1/a/b?q"), pair("/a/b", "q"));
        assert_eq!(request_path("http://h:1"), pair("/", ""));
        assert_eq!(request_path("*"), pair("*", ""));
    }

    /// Reads one request sent as `raw` over a real loopback connection with `limits`.
    fn read_sent(raw: Vec<u8>, limits: &HttpLimits) -> Result<Option<Request>, ReadError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            use std::io::Write;
            let mut c = TcpStream::connect(addr).unwrap();
            // The reader may refuse before reading it all: a reset then is expected.
            let _ = c.write_all(&raw);
            c
        });
        let (mut stream, peer) = listener.accept().unwrap();
        let read = RequestReader::new().read_request(
            &mut stream,
            limits,
            HeadClock::Accepted(Instant::now()),
            peer,
        );
        drop(client.join().unwrap());
        read
    }

    fn post(path: &str, body_len: usize) -> Vec<u8> {
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {body_len}\r\n\r\n"
        )
        .into_bytes();
        raw.resize(raw.len() + body_len, b'x');
        raw
    }

    #[test]
    fn uploads_have_their_own_size_cap_and_a_cap_on_how_many_are_held() {
        let uploads = crate::http::Uploads::new("/v1/files", 4096, 1);
        let limits = HttpLimits {
            max_body_bytes: 1024,
            uploads: Some(uploads.clone()),
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
        };
        let too_large = |r: Result<Option<Request>, ReadError>| matches!(r, Err(ReadError::Reject(Rejection::BodyTooLarge { limit })) if limit == 1024);
        assert!(too_large(read_sent(
            post("/v1/chat/completions", 3000),
            &limits
        )));
        let upload = read_sent(post("/v1/files", 3000), &limits)
            .unwrap()
            .unwrap();
        assert_eq!(upload.body.len(), 3000);
        assert_eq!(uploads.held(), 1, "the request holds its slot");
        // One slot, held: the next upload is refused from its head.
        let busy = read_sent(post("/v1/files", 10), &limits);
        assert!(
            matches!(
                busy,
                Err(ReadError::Reject(Rejection::UploadsBusy { at_once: 1 }))
            ),
            "{busy:?}"
        );
        drop(upload);
        assert_eq!(uploads.held(), 0);
        let over = read_sent(post("/v1/files", 5000), &limits);
        assert!(
            matches!(
                over,
                Err(ReadError::Reject(Rejection::BodyTooLarge { limit: 4096 }))
            ),
            "{over:?}"
        );
        assert_eq!(uploads.held(), 0, "a refused upload holds no slot");
    }
}
