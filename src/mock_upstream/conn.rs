//! One connection of the mock upstream: read a request with the gateway's own reader, answer it
//! the way its fault says, and keep the connection for the next request when the answer ended
//! cleanly. Every wait watches the socket, so a client that leaves is counted at once.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::chat::{half, is_truncation};
use super::fault::Fault;
use super::routes::{self, MockError, Reply};
use super::Shared;
use crate::api::ApiError;
use crate::config::HttpLimits;
use crate::http::presence::{self, Presence};
use crate::http::{
    write_response, HeadClock, ReadError, Request, RequestReader, Response, Version, WriteMeta,
};

/// The request header that sets one request's fault.
const FAULT_HEADER: &str = "x-mock-fault";

/// The front end's limits, as the mock applies them. Generous, because the mock must accept
/// whatever a gateway forwards; the keep-alive timeout is long so that a gateway's pooled
/// connection is never closed by the mock first (a race a real provider would not cause).
const LIMITS: HttpLimits = HttpLimits {
    max_body_bytes: 16 * 1024 * 1024,
    uploads: None,
    header_timeout: Duration::from_secs(10),
    body_timeout: Duration::from_secs(10),
    keepalive_timeout: Duration::from_secs(300),
    write_timeout: Duration::from_secs(30),
};

/// How one exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The whole answer was written; `keep_alive` says whether another request may follow.
    Answered { status: u16, keep_alive: bool },
    /// The client left before the answer ended (counted as `client_closed`).
    ClientLeft,
    /// A fault ended the connection on purpose.
    Cut(&'static str),
}

/// Serves requests on `stream` until the client leaves, the connection idles out, or an
/// answer ends it.
pub(crate) fn serve(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    if stream.set_nodelay(true).is_err()
        || stream
            .set_write_timeout(Some(LIMITS.write_timeout))
            .is_err()
    {
        return;
    }
    let mut reader = RequestReader::new();
    let mut clock = HeadClock::Accepted(Instant::now());
    loop {
        let request = match reader.read_request(&mut stream, &LIMITS, clock, peer) {
            Ok(Some(request)) => request,
            Ok(None) | Err(ReadError::Closed) => return,
            Err(ReadError::Reject(rejection)) => {
                let meta = WriteMeta {
                    version: Version::Http11,
                    keep_alive: false,
                    request_id: None,
                };
                let _ = write_response(&mut stream, ApiError::Http(rejection).to_response(), &meta);
                return;
            }
        };
        // The answer may be seconds away; hold no read buffer meanwhile.
        reader.release_if_drained();
        let outcome = exchange(shared, &request, &mut stream);
        log::info!(
            "{} {} {} {}ms",
            request.method,
            request.path,
            describe(outcome),
            request.received.elapsed().as_millis()
        );
        match outcome {
            Outcome::Answered {
                keep_alive: true, ..
            } => clock = HeadClock::KeepAlive,
            Outcome::Answered { .. } | Outcome::Cut(_) => return,
            Outcome::ClientLeft => {
                shared.stats.client_closed();
                return;
            }
        }
    }
}

fn describe(outcome: Outcome) -> String {
    match outcome {
        Outcome::Answered { status, .. } => status.to_string(),
        Outcome::ClientLeft => "client closed".to_string(),
        Outcome::Cut(how) => format!("cut ({how})"),
    }
}

/// The main loop of one request: count it, take its fault, wait the latency while watching
/// the client, answer, and deliver the answer as the fault says. The only place that writes.
fn exchange(shared: &Shared, request: &Request, stream: &mut TcpStream) -> Outcome {
    if !routes::is_api(&request.path) {
        return send(stream, request, routes::control(shared, request));
    }
    let route = routes::route(&request.method, &request.path);
    let template = route.as_ref().map_or("other", |r| r.template());
    let _in_flight = shared.stats.begin(request, template);
    let fault = match fault_of(request, shared.options.fault) {
        Ok(fault) => fault,
        Err(e) => return send(stream, request, e.to_response()),
    };
    let slow_head = match fault {
        Fault::Reset => return reset(stream),
        Fault::Hang => {
            presence::hold(stream);
            return Outcome::ClientLeft;
        }
        Fault::SlowHead(extra) => extra,
        _ => Duration::ZERO,
    };
    if presence::wait(stream, shared.options.latency + slow_head) == Presence::Left {
        return Outcome::ClientLeft;
    }
    if let Fault::Status {
        code,
        retry_after_s,
    } = fault
    {
        let injected = MockError::Injected {
            status: code,
            retry_after_s,
        };
        return send(stream, request, injected.to_response());
    }
    let reply = route
        .map_err(MockError::Api)
        .and_then(|route| routes::answer(shared, route, request, fault));
    match reply {
        Err(e) => send(stream, request, e.to_response()),
        Ok(Reply::Stream(chat)) => send(stream, request, chat.into_response()),
        Ok(Reply::Json(_)) if fault == Fault::ErrorEvent => {
            let injected = MockError::Injected {
                status: 500,
                retry_after_s: None,
            };
            send(stream, request, injected.to_response())
        }
        Ok(Reply::Json(value)) => deliver_json(stream, request, &value, fault),
    }
}

/// The request's fault: its header's when it has one, else the flag's.
fn fault_of(request: &Request, flag: Fault) -> Result<Fault, MockError> {
    match request
        .headers
        .iter()
        .find(|(name, _)| name == FAULT_HEADER)
    {
        Some((_, spec)) => spec.parse().map_err(MockError::BadFault),
        None => Ok(flag),
    }
}

/// Writes a whole response.
fn send(stream: &mut TcpStream, request: &Request, response: Response) -> Outcome {
    let status = response.status;
    let meta = WriteMeta {
        version: request.version,
        keep_alive: request.keep_alive,
        request_id: Some(&request.request_id),
    };
    match write_response(stream, response, &meta) {
        Ok(written) => Outcome::Answered {
            status,
            keep_alive: written.keep_alive,
        },
        Err(e) if is_truncation(&e) => Outcome::Cut("truncate-after"),
        Err(_) => Outcome::ClientLeft,
    }
}

/// A 200 JSON reply, broken the way the fault says.
fn deliver_json(stream: &mut TcpStream, request: &Request, value: &Value, fault: Fault) -> Outcome {
    let mut body = value.to_string();
    body.push('\n');
    match fault {
        Fault::Malformed => send(
            stream,
            request,
            Response::text(200, "application/json", half(&body).as_bytes().to_vec()),
        ),
        Fault::StallAfter(k) => {
            // Never the whole body: a stall that completed would not be a stall.
            if write_partial(stream, request, body.as_bytes(), k.min(body.len() - 1)).is_err() {
                return Outcome::ClientLeft;
            }
            presence::hold(stream);
            Outcome::ClientLeft
        }
        Fault::TruncateAfter(_) => {
            match write_partial(stream, request, body.as_bytes(), body.len() / 2) {
                Ok(()) => Outcome::Cut("truncate-after"),
                Err(_) => Outcome::ClientLeft,
            }
        }
        _ => send(
            stream,
            request,
            Response::text(200, "application/json", body.into_bytes()),
        ),
    }
}

/// A head announcing all of `body`, then only its first `sent` bytes.
fn write_partial(
    stream: &mut TcpStream,
    request: &Request,
    body: &[u8],
    sent: usize,
) -> io::Result<()> {
    let version = match request.version {
        Version::Http10 => "HTTP/1.0",
        Version::Http11 => "HTTP/1.1",
    };
    let mut out = format!(
        "{version} 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body[..sent]);
    stream.write_all(&out)
}

/// Makes closing the connection send a TCP reset (SO_LINGER on, zero seconds); the connection
/// loop then returns and the socket closes without a byte sent.
fn reset(stream: &TcpStream) -> Outcome {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger` (of the size we pass) on a socket the stream keeps open.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    Outcome::Cut("reset")
}
