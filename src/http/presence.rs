//! Watching whether the client is still there: waits in `poll(2)` on its socket (the mock's
//! latency, hangs, stalls and the gaps between streamed chunks), and an instant check (the
//! gateway's relay while a provider is silent), so a client that leaves is seen at once
//! instead of at the next write, and no wait spins.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Whether the client was still there when a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    Stayed,
    Left,
}

/// What wakes a wait. On Linux only the peer's FIN (`POLLRDHUP`) and errors do: asking for
/// `POLLIN` too would wake at once, again and again, when the client has already sent its next
/// (pipelined) request. Elsewhere `POLLIN` plus a peek is the only way to see the FIN.
#[cfg(any(target_os = "linux", target_os = "android"))]
const EVENTS: libc::c_short = libc::POLLRDHUP;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const EVENTS: libc::c_short = libc::POLLIN;

/// Waits `duration` unless the client leaves first.
pub(crate) fn wait(stream: &TcpStream, duration: Duration) -> Presence {
    if duration.is_zero() {
        return Presence::Stayed;
    }
    watch(stream, Some(Instant::now() + duration))
}

/// Whether the client has already left (closed or reset), without waiting.
pub(crate) fn has_left(stream: &TcpStream) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: EVENTS,
        revents: 0,
    };
    // SAFETY: one valid pollfd, on a descriptor the borrowed stream keeps open.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && shows_departure(&fd, stream)
}

/// Whether a ready pollfd says the peer is gone: a hang-up, an error, or a FIN (on Linux its
/// own event; elsewhere readability with nothing to read).
fn shows_departure(fd: &libc::pollfd, stream: &TcpStream) -> bool {
    let gone = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    if fd.revents & (gone | (EVENTS & !libc::POLLIN)) != 0 {
        return true;
    }
    fd.revents & libc::POLLIN != 0 && matches!(stream.peek(&mut [0u8; 1]), Ok(0) | Err(_))
}

/// Waits until the client leaves: the whole of a `hang` or a stall.
pub(crate) fn hold(stream: &TcpStream) {
    watch(stream, None);
}

fn watch(stream: &TcpStream, deadline: Option<Instant>) -> Presence {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: EVENTS,
        revents: 0,
    };
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Presence::Stayed;
                }
                // Rounded up: a timeout of 0 for the last fraction of a millisecond would spin.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
            }
        };
        fd.revents = 0;
        // SAFETY: one valid pollfd, on a descriptor the borrowed stream keeps open.
        let ready = unsafe { libc::poll(&mut fd, 1, timeout_ms) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // poll itself failed (out of memory): we cannot watch, so stop serving this client.
            return Presence::Left;
        }
        if ready == 0 {
            continue;
        }
        if shows_departure(&fd, stream) {
            return Presence::Left;
        }
        if fd.revents & libc::POLLIN != 0 {
            match deadline {
                // Bytes of a next request wait unread, so readability says nothing more; sleep
                // out the wait (only where POLLRDHUP does not exist).
                Some(deadline) => {
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    return Presence::Stayed;
                }
                None => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn a_wait_runs_its_time_while_the_client_stays_even_with_bytes_pending() {
        let (mut client, server) = pair();
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let start = Instant::now();
        assert_eq!(wait(&server, Duration::from_millis(100)), Presence::Stayed);
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_wait_ends_early_when_the_client_leaves() {
        let (client, server) = pair();
        let start = Instant::now();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(client);
        });
        assert_eq!(wait(&server, Duration::from_secs(30)), Presence::Left);
        assert!(start.elapsed() < Duration::from_secs(10));
        closer.join().unwrap();
    }

    #[test]
    fn has_left_tells_at_once_whether_the_client_closed() {
        let (mut client, server) = pair();
        client
            .write_all(b"pending bytes do not count as leaving")
            .unwrap();
        assert!(!has_left(&server));
        drop(client);
        let start = Instant::now();
        while !has_left(&server) {
            assert!(start.elapsed() < Duration::from_secs(5), "close never seen");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_hold_ends_when_the_client_leaves() {
        let (client, server) = pair();
        drop(client);
        hold(&server);
    }
}
