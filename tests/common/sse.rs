//! Server-sent events read as they arrive: a streamed response's chunked body decoded on the
//! fly, each event stamped with the moment it was whole (chat streams, `/v1/responses`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A streamed response as read.
pub struct Sse {
    pub status: u16,
    pub head: String,
    /// Each SSE event (its lines, or a comment) with when it arrived.
    pub events: Vec<(Instant, String)>,
    /// Whether the chunked body's last chunk came.
    pub ended_cleanly: bool,
}

impl Sse {
    /// Each event's `data: ` text, in order.
    pub fn data(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter_map(|(_, e)| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .collect()
    }

    pub fn has_done(&self) -> bool {
        self.data().contains(&"[DONE]")
    }

    /// The `error.code` of the last data event, if it is an error.
    pub fn last_error_code(&self) -> Option<String> {
        let last = self.data().last()?.to_string();
        let v: Value = serde_json::from_str(&last).ok()?;
        v["error"]["code"].as_str().map(str::to_string)
    }

    /// The named events (`event: KIND`), each with when it came and its data as JSON.
    pub fn named(&self) -> Vec<(Instant, String, Value)> {
        self.events
            .iter()
            .filter_map(|(at, e)| {
                let kind = e.lines().find_map(|l| l.strip_prefix("event: "))?;
                let data = e.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some((
                    *at,
                    kind.to_string(),
                    serde_json::from_str(data).unwrap_or(Value::Null),
                ))
            })
            .collect()
    }
}

/// Sends `request` on a new connection and reads the chunked SSE body as it arrives, for at
/// most `limit`; after `stop_after` data events the client closes (a departing client).
pub fn read_sse(
    addr: SocketAddr,
    request: &[u8],
    limit: Duration,
    stop_after: Option<usize>,
) -> Sse {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s.write_all(request).unwrap();
    let deadline = Instant::now() + limit;
    let mut raw: Vec<u8> = Vec::new();
    let mut head: Option<(u16, String)> = None;
    let mut events = Vec::new();
    let mut pending = String::new();
    let mut consumed = 0;
    let mut ended_cleanly = false;
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        }
        if head.is_none() {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&raw[..i]).to_string();
                let status = text[9..12].parse().unwrap_or(0);
                head = Some((status, text));
                consumed = i + 4;
                if status != 200 {
                    break;
                }
            }
        }
        if head.is_none() {
            continue;
        }
        // Decode the whole chunks received so far.
        while let Some(line_end) = raw[consumed..].windows(2).position(|w| w == b"\r\n") {
            let size_text =
                String::from_utf8_lossy(&raw[consumed..consumed + line_end]).to_string();
            let size = usize::from_str_radix(size_text.trim(), 16).unwrap_or(0);
            let start = consumed + line_end + 2;
            if size == 0 {
                ended_cleanly = true;
                break;
            }
            if raw.len() < start + size + 2 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&raw[start..start + size]));
            consumed = start + size + 2;
            while let Some(i) = pending.find("\n\n") {
                let event = pending[..i].to_string();
                pending.drain(..i + 2);
                events.push((Instant::now(), event));
            }
        }
        let data_events = events.iter().filter(|(_, e)| e.contains("data: ")).count();
        if ended_cleanly || stop_after.is_some_and(|n| data_events >= n) {
            break;
        }
    }
    let (status, head) = head.unwrap_or((0, String::new()));
    Sse {
        status,
        head,
        events,
        ended_cleanly,
    }
}
