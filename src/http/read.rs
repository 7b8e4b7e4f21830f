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
    /// The declared or decoded body is over `max_body_bytes` (413).
    BodyTooLarge { limit: u64 },
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

/// How the body of a request is delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
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
    /// (the peer closed, or stayed silent for `idle`).
    pub(crate) fn read_request(
        &mut self,
        stream: &mut TcpStream,
        limits: &HttpLimits,
        idle: Duration,
        peer: SocketAddr,
    ) -> Result<Option<Request>, ReadError> {
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
        let deadline = Instant::now() + limits.header_timeout;
        let head = loop {
            if let Some(head) = self.parse_head()? {
                break head;
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
        };
        let received = Instant::now();
        let framing = framing(&head.headers, head.version)?;
        let keep_alive = wants_keep_alive(&head.headers, head.version);
        let body = match framing {
            None => Vec::new(),
            Some(Framing::Length(n)) => {
                if n > limits.max_body_bytes {
                    return Err(Rejection::BodyTooLarge {
                        limit: limits.max_body_bytes,
                    }
                    .into());
                }
                self.continue_if_expected(stream, &head, n > 0)?;
                self.read_exact_body(stream, n as usize, limits.body_timeout)?
            }
            Some(Framing::Chunked) => {
                self.continue_if_expected(stream, &head, true)?;
                self.read_chunked_body(stream, limits)?
            }
        };
        let (path, query) = request_path(&head.target);
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
        }))
    }

    /// Tries to parse a complete head from the buffer, enforcing the size limits.
    fn parse_head(&mut self) -> Result<Option<Head>, Rejection> {
        let data = &self.buf[self.start..self.end];
        // RFC 9112 §2.2: a server SHOULD ignore empty lines received before the request line.
        let skipped = data
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let line_len = match data[skipped..].iter().position(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if data.len() - skipped > MAX_REQUEST_LINE + 2 => {
                return Err(Rejection::RequestLineTooLong)
            }
            None => return Ok(None),
        };
        if line_len > MAX_REQUEST_LINE + 2 {
            return Err(Rejection::RequestLineTooLong);
        }
        let head_start = skipped + line_len;
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
            Err(e) => return Err(Rejection::Malformed(format!("malformed request head: {e}"))),
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
            if field
                .value
                .iter()
                .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
            {
                return Err(Rejection::Malformed(format!(
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

    /// Sends `100 Continue` when the client waits for it before sending its body.
    fn continue_if_expected(
        &mut self,
        stream: &mut TcpStream,
        head: &Head,
        has_body: bool,
    ) -> Result<(), ReadError> {
        let Some(expect) = header(&head.headers, "expect") else {
            return Ok(());
        };
        if !expect.eq_ignore_ascii_case("100-continue") {
            return Err(Rejection::ExpectationFailed.into());
        }
        // Only an HTTP/1.1 client understands 1xx; only one that has not started the body needs it.
        if has_body && head.version == Version::Http11 && self.start == self.end {
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

    /// Decodes a chunked body (RFC 9112 §7.1), refusing it once it passes `max_body_bytes`.
    fn read_chunked_body(
        &mut self,
        stream: &mut TcpStream,
        limits: &HttpLimits,
    ) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(stream, MAX_CHUNK_LINE, limits.body_timeout)?;
            let size = parse_chunk_size(&line)?;
            if size == 0 {
                break;
            }
            if body.len() as u64 + size > limits.max_body_bytes {
                return Err(Rejection::BodyTooLarge {
                    limit: limits.max_body_bytes,
                }
                .into());
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
            if !self.read_line(stream, 2, limits.body_timeout)?.is_empty() {
                return Err(Rejection::Malformed("chunk data not followed by CRLF".into()).into());
            }
        }
        // Trailer fields: read and dropped, bounded like a header block.
        let mut trailer_bytes = 0;
        loop {
            let line = self.read_line(stream, MAX_HEADER_BLOCK, limits.body_timeout)?;
            if line.is_empty() {
                return Ok(body);
            }
            trailer_bytes += line.len();
            if trailer_bytes > MAX_HEADER_BLOCK {
                return Err(Rejection::HeaderTooLarge("trailer section over 32 KiB").into());
            }
        }
    }

    /// Reads one line (up to `max` bytes before its LF) and returns it without CRLF.
    fn read_line(
        &mut self,
        stream: &mut TcpStream,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, ReadError> {
        loop {
            let data = &self.buf[self.start..self.end];
            if let Some(i) = data.iter().position(|&b| b == b'\n') {
                if i > max + 1 {
                    return Err(Rejection::Malformed("line too long in chunked body".into()).into());
                }
                let mut line = data[..i].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.start += i + 1;
                return Ok(line);
            }
            if data.len() > max + 1 {
                return Err(Rejection::Malformed("line too long in chunked body".into()).into());
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

/// Decides how the body is delimited (RFC 9112 §6), refusing ambiguous framing.
fn framing(headers: &[(String, String)], version: Version) -> Result<Option<Framing>, Rejection> {
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    let mut hosts = 0;
    for (name, value) in headers {
        match name.as_str() {
            "content-length" => {
                // A list of identical values ("42, 42") is allowed; anything else is not.
                for part in value.split(',') {
                    let n = parse_content_length(part.trim())?;
                    if length.is_some_and(|prev| prev != n) {
                        return Err(Rejection::Malformed(
                            "conflicting Content-Length values".into(),
                        ));
                    }
                    length = Some(n);
                }
            }
            "transfer-encoding" => codings.extend(
                value
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            ),
            "host" => hosts += 1,
            _ => {}
        }
    }
    if version == Version::Http11 && hosts != 1 {
        return Err(Rejection::Malformed(
            "an HTTP/1.1 request needs exactly one Host header".into(),
        ));
    }
    if codings.is_empty() {
        return Ok(length.filter(|&n| n > 0).map(Framing::Length));
    }
    if length.is_some() {
        return Err(Rejection::Malformed(
            "Content-Length together with Transfer-Encoding".into(),
        ));
    }
    if let Some(other) = codings.iter().find(|c| *c != "chunked") {
        return Err(Rejection::UnsupportedTransferCoding(other.clone()));
    }
    if codings.len() > 1 {
        return Err(Rejection::Malformed(
            "chunked applied more than once".into(),
        ));
    }
    Ok(Some(Framing::Chunked))
}

fn parse_content_length(text: &str) -> Result<u64, Rejection> {
    let valid = !text.is_empty() && text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit());
    match valid.then(|| text.parse::<u64>().ok()).flatten() {
        Some(n) => Ok(n),
        None => Err(Rejection::Malformed(format!(
            "invalid Content-Length {text:?}"
        ))),
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, Rejection> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    let bad = || Rejection::Malformed("invalid chunk size".into());
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad());
    }
    let text = std::str::from_utf8(digits).map_err(|_| bad())?;
    u64::from_str_radix(text, 16).map_err(|_| bad())
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
    fn content_length_rules() {
        let host = ("host", "x");
        let f = |cl: &str| framing(&h(&[host, ("content-length", cl)]), Version::Http11);
        assert_eq!(f("5").unwrap(), Some(Framing::Length(5)));
        assert_eq!(f("0").unwrap(), None);
        assert_eq!(f("7, 7").unwrap(), Some(Framing::Length(7)));
        for bad in ["abc", "-1", "+5", "", "1 2", "5, 6", "99999999999999999999"] {
            assert!(f(bad).is_err(), "accepted {bad:?}");
        }
        let two = h(&[host, ("content-length", "5"), ("content-length", "6")]);
        assert!(framing(&two, Version::Http11).is_err());
    }

    #[test]
    fn transfer_encoding_rules() {
        let host = ("host", "x");
        let te = |v: &str| framing(&h(&[host, ("transfer-encoding", v)]), Version::Http11);
        assert_eq!(te("chunked").unwrap(), Some(Framing::Chunked));
        assert_eq!(te("Chunked").unwrap(), Some(Framing::Chunked));
        assert!(matches!(
            te("gzip"),
            Err(Rejection::UnsupportedTransferCoding(_))
        ));
        assert!(matches!(
            te("gzip, chunked"),
            Err(Rejection::UnsupportedTransferCoding(_))
        ));
        assert!(matches!(
            te("chunked, chunked"),
            Err(Rejection::Malformed(_))
        ));
        let both = h(&[
            host,
            ("transfer-encoding", "chunked"),
            ("content-length", "3"),
        ]);
        assert!(matches!(
            framing(&both, Version::Http11),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn host_is_required_in_http11_only() {
        assert!(framing(&[], Version::Http11).is_err());
        assert!(framing(&h(&[("host", "a"), ("host", "b")]), Version::Http11).is_err());
        assert_eq!(framing(&[], Version::Http10).unwrap(), None);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"FF;name=value").unwrap(), 255);
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"xyz").is_err());
        assert!(parse_chunk_size(b"ffffffffffffffffff").is_err());
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
}
