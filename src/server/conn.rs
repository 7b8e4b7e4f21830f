//! One connection's thread: read a request, let admission answer it or hand it to a worker,
//! wait for the connection to come back, repeat. Requests on one connection are therefore
//! answered strictly in order, pipelined or not. A refused request ends the connection.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{admission, Handback, State};
use crate::http::{HeadClock, ReadError, RequestReader};

/// After refusing a request we stop writing, then read and discard what the client still
/// sends for at most this long, so that our answer is not destroyed by a TCP reset.
const LINGER: Duration = Duration::from_millis(1000);
/// ...and at most this much of it.
const LINGER_BYTES: usize = 1024 * 1024;

/// Serves the connection accepted at `accepted` until it closes. Every refusal, whatever its
/// kind, is answered and then ends the connection here, in one place: once a request's framing
/// is in doubt, nothing after it on the connection is ever read as a request.
pub(crate) fn serve(state: &State, mut stream: TcpStream, peer: SocketAddr, accepted: Instant) {
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
    // The first head is due a header timeout after accept; later ones a header timeout after
    // their first byte, which may be a keep-alive timeout in coming.
    let mut clock = HeadClock::Accepted(accepted);
    loop {
        match reader.read_request(&mut stream, limits, clock, peer) {
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
        clock = HeadClock::KeepAlive;
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
