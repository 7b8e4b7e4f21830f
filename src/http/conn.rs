//! One connection's thread: read a request, let admission answer it or hand it to a worker,
//! wait for the connection to come back, repeat. Requests on one connection are therefore
//! answered strictly in order, pipelined or not.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{ReadError, RequestReader};
use crate::server::{admission, Handback, State};

/// After refusing a request we stop writing, then read and discard what the client still
/// sends for at most this long, so that our answer is not destroyed by a TCP reset.
const LINGER: Duration = Duration::from_millis(1000);
/// ...and at most this much of it.
const LINGER_BYTES: usize = 1024 * 1024;

pub(crate) fn serve(state: &State, mut stream: TcpStream, peer: SocketAddr) {
    let limits = &state.config.http;
    if stream.set_nodelay(true).is_err()
        || stream
            .set_write_timeout(Some(limits.write_timeout))
            .is_err()
    {
        return;
    }
    let mut reader = RequestReader::new();
    let handback = Handback::new();
    // A new connection must start its request within the head deadline; between requests
    // it may idle for the keep-alive timeout.
    let mut idle = limits.header_timeout;
    loop {
        match reader.read_request(&mut stream, limits, idle, peer) {
            Ok(Some(request)) => {
                // While a worker has the request this thread only waits: it holds no read
                // buffer then, unless pipelined bytes are waiting in it.
                reader.release_if_drained();
                match admission::admit(state, request, stream, &handback) {
                    Some(back) => stream = back,
                    None => return,
                }
            }
            Ok(None) | Err(ReadError::Closed) => return,
            Err(ReadError::Reject(rejection)) => {
                admission::refuse(state, rejection, peer, &mut stream);
                linger_close(stream);
                return;
            }
        }
        idle = limits.keepalive_timeout;
    }
}

/// Closes after an error answer the way nginx's lingering close does: half-close, drain the
/// client's remaining bytes for a bounded time, then close.
fn linger_close(mut stream: TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 8192];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}
