//! The load generator's HTTP/1.1 client: one keep-alive connection, a request prepared once as
//! bytes and sent with one write, the answer read into a buffer that lives as long as the
//! connection and parsed with httparse. Fixed-length and chunked bodies; a streamed (SSE)
//! answer is timed event by event. Only what the bench needs: it talks to our own servers.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Longest wait for any one read or write; a server that stops answering fails the request
/// instead of hanging the bench (the bench also hangs up on every client when a phase ends).
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The read buffer: a chat answer is well under 1 KiB, a stream is read through it piecewise.
const BUF_BYTES: usize = 16 * 1024;
/// A longer head or fixed-length body is a broken server, not something to buffer.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A request with `Content-Length`, ready to be written as it is, again and again.
pub(crate) fn request_bytes(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    request_bytes_with(method, path, &[], body)
}

/// [`request_bytes`] with more header lines (`name`, `value`).
pub(crate) fn request_bytes_with(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !body.is_empty() || method == "POST" {
        out.extend_from_slice(
            format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// How an answer ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// Whether the connection may carry the next request.
    pub(crate) keep_alive: bool,
}

/// What one streamed answer looked like, timed from when its request was written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamAnswer {
    pub(crate) status: u16,
    pub(crate) keep_alive: bool,
    /// Request written → first `data:` event read.
    pub(crate) first_event: Option<Duration>,
    /// Longest time between two consecutive `data:` events.
    pub(crate) max_gap: Duration,
    pub(crate) events: u32,
    /// The stream ended with `data: [DONE]` and no error event.
    pub(crate) done: bool,
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

struct Head {
    status: u16,
    len: usize,
    framing: Framing,
    keep_alive: bool,
}

/// One keep-alive connection and the buffers it reuses for every answer.
pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` holding what was read and not yet consumed.
    filled: usize,
    /// The SSE event being assembled.
    event: Vec<u8>,
}

impl Conn {
    pub(crate) fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn {
            stream,
            buf: vec![0; BUF_BYTES],
            filled: 0,
            event: Vec::new(),
        })
    }

    pub(crate) fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends `request` and reads the whole answer (its body is checked for framing only).
    pub(crate) fn exchange(&mut self, request: &[u8]) -> io::Result<Answer> {
        self.stream.write_all(request)?;
        let head = self.read_head()?;
        self.skip_body(&head)?;
        Ok(Answer {
            status: head.status,
            keep_alive: head.keep_alive && !matches!(head.framing, Framing::UntilClose),
        })
    }

    /// Sends a streaming `request` and reads its server-sent events to the end, timing them.
    pub(crate) fn exchange_stream(&mut self, request: &[u8]) -> io::Result<StreamAnswer> {
        self.stream.write_all(request)?;
        let sent = Instant::now();
        let head = self.read_head()?;
        let mut answer = StreamAnswer {
            status: head.status,
            keep_alive: head.keep_alive,
            first_event: None,
            max_gap: Duration::ZERO,
            events: 0,
            done: false,
        };
        if head.status != 200 || !matches!(head.framing, Framing::Chunked) {
            self.skip_body(&head)?;
            answer.keep_alive &= !matches!(head.framing, Framing::UntilClose);
            return Ok(answer);
        }
        let mut sse = Sse {
            event: std::mem::take(&mut self.event),
            sent,
            last: None,
            errored: false,
        };
        let mut chunked = Chunked::new();
        let mut start = head.len;
        let mut now = Instant::now();
        loop {
            let finished = chunked.feed(&self.buf[start..self.filled], |data| {
                sse.feed(data, now, &mut answer);
            })?;
            if finished {
                break;
            }
            start = 0;
            self.filled = self.read_more(0)?;
            now = Instant::now();
        }
        answer.done &= !sse.errored;
        self.event = sse.event;
        self.filled = 0;
        Ok(answer)
    }

    /// Reads until a whole response head is in the buffer and parses it.
    fn read_head(&mut self) -> io::Result<Head> {
        self.filled = 0;
        loop {
            self.filled = self.read_more(self.filled)?;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            let len = match response.parse(&self.buf[..self.filled]) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => continue,
                Err(e) => return Err(invalid(format!("bad response head: {e}"))),
            };
            let mut framing = Framing::UntilClose;
            let mut keep_alive = response.version == Some(1);
            for h in response.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    let n = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or_else(|| invalid("bad content-length".into()))?;
                    framing = Framing::Length(n);
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    framing = Framing::Chunked;
                } else if h.name.eq_ignore_ascii_case("connection") {
                    keep_alive = !h.value.eq_ignore_ascii_case(b"close");
                }
            }
            return Ok(Head {
                status: response.code.unwrap_or(0),
                len,
                framing,
                keep_alive,
            });
        }
    }

    /// Reads and discards the body that follows `head`.
    fn skip_body(&mut self, head: &Head) -> io::Result<()> {
        match head.framing {
            Framing::Length(n) => {
                let end = head.len + n;
                if end > MAX_MESSAGE_BYTES {
                    return Err(invalid(format!("body of {n} bytes is too large")));
                }
                if end > self.buf.len() {
                    self.buf.resize(end, 0);
                }
                while self.filled < end {
                    self.filled = self.read_more(self.filled)?;
                }
            }
            Framing::Chunked => {
                let mut chunked = Chunked::new();
                let mut start = head.len;
                while !chunked.feed(&self.buf[start..self.filled], |_| {})? {
                    start = 0;
                    self.filled = self.read_more(0)?;
                }
            }
            Framing::UntilClose => loop {
                match self.stream.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            },
        }
        self.filled = 0;
        Ok(())
    }

    /// One read appended at `at`; returns the new fill. The end of the stream is an error: the
    /// message is not complete yet.
    fn read_more(&mut self, at: usize) -> io::Result<usize> {
        if at == self.buf.len() {
            if at >= MAX_MESSAGE_BYTES {
                return Err(invalid("response head too large".into()));
            }
            self.buf.resize(at * 2, 0);
        }
        loop {
            match self.stream.read(&mut self.buf[at..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => return Ok(at + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Assembles server-sent events from body bytes and times the `data:` ones.
struct Sse {
    event: Vec<u8>,
    sent: Instant,
    last: Option<Instant>,
    errored: bool,
}

impl Sse {
    fn feed(&mut self, data: &[u8], now: Instant, answer: &mut StreamAnswer) {
        for &b in data {
            if b == b'\r' {
                continue;
            }
            self.event.push(b);
            if b == b'\n' && self.event.ends_with(b"\n\n") {
                self.complete(now, answer);
                self.event.clear();
            }
        }
    }

    fn complete(&mut self, now: Instant, answer: &mut StreamAnswer) {
        let Some(payload) = self.event.strip_prefix(b"data:") else {
            return; // a comment (`: keep-alive`) or a field we do not use
        };
        let payload = payload.trim_ascii();
        answer.events += 1;
        match self.last {
            None => answer.first_event = Some(now - self.sent),
            Some(last) => answer.max_gap = answer.max_gap.max(now - last),
        }
        self.last = Some(now);
        if payload == b"[DONE]" {
            answer.done = true;
        } else if payload.starts_with(b"{\"error\"") {
            self.errored = true;
        }
    }
}

/// A decoder for `Transfer-Encoding: chunked`, fed whatever arrived.
struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    /// Reading the hex size (so far).
    Size(usize),
    /// Skipping a chunk extension up to the line's end.
    Extension(usize),
    /// Inside a chunk's data; bytes left.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section; whether we are at the start of a line.
    Trailer(bool),
    Done,
}

impl Chunked {
    fn new() -> Chunked {
        Chunked {
            state: ChunkState::Size(0),
        }
    }

    /// Consumes `input`, handing each piece of data to `on_data`; true once the body ended.
    fn feed(&mut self, mut input: &[u8], mut on_data: impl FnMut(&[u8])) -> io::Result<bool> {
        use ChunkState::*;
        while let Some((&b, rest)) = input.split_first() {
            self.state = match self.state {
                Done => return Ok(true),
                Data(left) => {
                    let n = left.min(input.len());
                    on_data(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left { DataEnd } else { Data(left - n) };
                    continue;
                }
                Size(n) => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).unwrap_or(0) as usize;
                        let n = n
                            .checked_mul(16)
                            .filter(|&n| n <= MAX_MESSAGE_BYTES)
                            .ok_or_else(|| invalid("chunk too large".into()))?;
                        Size(n + digit)
                    }
                    b';' | b' ' | b'\t' => Extension(n),
                    b'\r' => Size(n),
                    b'\n' if n == 0 => Trailer(true),
                    b'\n' => Data(n),
                    _ => return Err(invalid("bad chunk size".into())),
                },
                Extension(n) => match b {
                    b'\n' if n == 0 => Trailer(true),
                    b'\n' => Data(n),
                    _ => Extension(n),
                },
                DataEnd => match b {
                    b'\r' => DataEnd,
                    b'\n' => Size(0),
                    _ => return Err(invalid("chunk data overran its size".into())),
                },
                Trailer(at_start) => match b {
                    b'\r' => Trailer(at_start),
                    b'\n' if at_start => Done,
                    b'\n' => Trailer(true),
                    _ => Trailer(false),
                },
            };
            input = rest;
        }
        Ok(matches!(self.state, Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(pieces: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut chunked = Chunked::new();
        let mut out = Vec::new();
        let mut done = false;
        for piece in pieces {
            done = chunked.feed(piece, |d| out.extend_from_slice(d)).unwrap();
        }
        (out, done)
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(decode(&[body]), (b"hello, world".to_vec(), true));
        let split: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode(&split), (b"hello, world".to_vec(), true));
        assert_eq!(decode(&[b"5\r\nhel"]), (b"hel".to_vec(), false));
        assert!(Chunked::new().feed(b"zz\r\n", |_| {}).is_err());
    }

    #[test]
    fn sse_events_are_counted_and_done_is_seen() {
        let mut answer = StreamAnswer {
            status: 200,
            keep_alive: true,
            first_event: None,
            max_gap: Duration::ZERO,
            events: 0,
            done: false,
        };
        let t0 = Instant::now();
        let mut sse = Sse {
            event: Vec::new(),
            sent: t0,
            last: None,
            errored: false,
        };
        sse.feed(b": keep-alive\n\ndata: {\"a\":1}\n", t0, &mut answer);
        assert_eq!(answer.events, 0);
        sse.feed(
            b"\ndata: {\"b\":2}\r\n\r\n",
            t0 + Duration::from_millis(5),
            &mut answer,
        );
        sse.feed(
            b"data: [DONE]\n\n",
            t0 + Duration::from_millis(50),
            &mut answer,
        );
        assert_eq!(answer.events, 3);
        assert_eq!(answer.first_event, Some(Duration::from_millis(5)));
        assert_eq!(answer.max_gap, Duration::from_millis(45));
        assert!(answer.done && !sse.errored);
        sse.feed(b"data: {\"error\":{}}\n\n", t0, &mut answer);
        assert!(sse.errored);
    }

    #[test]
    fn requests_carry_their_length() {
        let r = request_bytes("POST", "/v1/chat/completions", b"{}");
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"));
        assert!(text.contains("content-length: 2\r\n") && text.ends_with("\r\n\r\n{}"));
        let g = String::from_utf8(request_bytes("GET", "/healthz", b"")).unwrap();
        assert_eq!(g, "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    }
}
