//! The acceptor: one thread that takes new connections, keeps their number under
//! `max_connections`, and gives each its own small-stack thread. It never dies of an accept
//! error: those are counted, logged (at most once a second) and survived.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{conn, State};
use crate::api::ApiError;

/// Stack of a connection thread. It parses heads (httparse's 100-field array is ~3 KiB),
/// formats small responses and logs; 128 KiB leaves ample room while 1,000 idle connections
/// stay cheap (only touched pages become resident).
const CONNECTION_STACK_BYTES: usize = 128 * 1024;

/// File descriptors the process needs beyond one per connection: the listener, stdio, log
/// and database files, and one upstream socket per worker.
pub(crate) fn fds_needed(max_connections: usize, workers: usize) -> u64 {
    (max_connections + workers + 64) as u64
}

/// Ceiling for the soft limit when the hard limit is "unlimited".
const OPEN_FILES_CEILING: u64 = 1 << 20;

/// Raises the soft open-files limit to the hard one (as Go's runtime does at start), so that
/// upstream sockets and files have headroom beyond `needed`; returns the new soft limit, or why
/// `needed` descriptors cannot be had.
pub(crate) fn raise_open_files_limit(needed: u64) -> Result<u64, String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!(
            "cannot read the open-files limit: {}",
            io::Error::last_os_error()
        ));
    }
    let hard = lim.rlim_max;
    if hard < needed {
        return Err(format!(
            "needs about {needed} open files but the hard limit is {hard}; raise it \
             (`ulimit -Hn`, systemd LimitNOFILE) or lower max_connections / workers"
        ));
    }
    let target = hard.min(OPEN_FILES_CEILING.max(needed));
    if lim.rlim_cur >= target {
        return Ok(lim.rlim_cur);
    }
    lim.rlim_cur = target;
    // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard one is
    // allowed for an unprivileged process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let err = io::Error::last_os_error();
        return Err(format!(
            "cannot raise the open-files limit to {target}: {err}"
        ));
    }
    Ok(target)
}

/// The running acceptor thread.
pub(crate) struct Acceptor {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    wake: SocketAddr,
}

impl Acceptor {
    pub(crate) fn spawn(listener: TcpListener, state: Arc<State>) -> io::Result<Acceptor> {
        let mut wake = listener.local_addr()?;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("sg-accept".into())
            .spawn(move || accept_loop(&listener, &state, &flag))?;
        Ok(Acceptor { thread, stop, wake })
    }

    /// Stops accepting: sets the flag, wakes the blocked `accept` with a connection of our
    /// own, and waits for the thread to end. Open connections are not touched.
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.wake, Duration::from_secs(1));
        let _ = self.thread.join();
    }
}

fn accept_loop(listener: &TcpListener, state: &Arc<State>, stop: &AtomicBool) {
    let mut last_error_log: Option<Instant> = None;
    let mut unlogged_errors = 0u64;
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            take_the_backlog(listener, state, accepted);
            return;
        }
        match accepted {
            Ok((stream, peer)) => admit_connection(state, stream, peer),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                state.metrics.accept_errors.inc();
                unlogged_errors += 1;
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    log::error!("accept failed ({unlogged_errors} since last report): {e}");
                    last_error_log = Some(Instant::now());
                    unlogged_errors = 0;
                }
                // Out of descriptors or memory: give closing connections a moment instead of
                // spinning on an error that will repeat at once.
                if is_resource_exhaustion(&e) {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// At shutdown, before the listener closes: a connection whose handshake the kernel already
/// completed may carry a request (nginx sends at once), and closing the listener would reset
/// it after the request was sent, which a proxy must not retry for a POST. So the one just
/// accepted and every one waiting in the backlog are served like any other: their requests are
/// answered `draining` (421 to a proxy that asks, which it sends to another instance).
fn take_the_backlog(
    listener: &TcpListener,
    state: &Arc<State>,
    last: io::Result<(TcpStream, SocketAddr)>,
) {
    if let Ok((stream, peer)) = last {
        admit_connection(state, stream, peer);
    }
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while let Ok((stream, peer)) = listener.accept() {
        if stream.set_nonblocking(false).is_ok() {
            admit_connection(state, stream, peer);
        }
    }
}

fn admit_connection(state: &Arc<State>, stream: TcpStream, peer: SocketAddr) {
    // The first request's head deadline runs from here, not from when its thread starts.
    let accepted = Instant::now();
    state.metrics.connections_accepted.inc();
    let open = &state.metrics.connections_open;
    if open.get() >= state.config.capacity.max_connections as i64 {
        state.metrics.reject("too_many_connections");
        refuse_connection(stream, &ApiError::TooManyConnections);
        return;
    }
    open.inc();
    let thread_state = Arc::clone(state);
    let spawned = thread::Builder::new()
        .name("sg-conn".into())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || {
            let _guard = OpenConnection(&thread_state);
            conn::serve(&thread_state, stream, peer, accepted);
        });
    if let Err(e) = spawned {
        // The closure (and the stream in it) is dropped: the connection closes.
        open.dec();
        state.metrics.accept_errors.inc();
        log::error!("cannot start a thread for a connection from {peer}: {e}");
    }
}

/// Counts a connection as open for exactly as long as its thread runs, panics included.
struct OpenConnection<'a>(&'a State);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.metrics.connections_open.dec();
    }
}

/// Answers a connection over the limit with a 503 without ever blocking the acceptor.
fn refuse_connection(mut stream: TcpStream, error: &ApiError) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let meta = crate::http::WriteMeta {
        version: crate::http::Version::Http11,
        keep_alive: false,
        request_id: None,
    };
    // A fresh socket's send buffer is empty, so this small write completes at once.
    let _ = crate::http::write_response(&mut stream, error.to_response(), &meta);
    let _ = stream.shutdown(Shutdown::Write);
    // Take whatever request bytes already arrived, so closing does not turn into a reset that
    // could destroy the 503 before the client reads it.
    let mut sink = [0u8; 4096];
    while let Ok(n) = stream.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_we_already_have_is_enough_for_a_small_server() {
        let soft = raise_open_files_limit(fds_needed(8, 4)).unwrap();
        assert!(soft >= fds_needed(8, 4));
    }

    #[test]
    fn an_impossible_limit_is_refused_with_a_reason() {
        let err = raise_open_files_limit(u64::MAX / 2).unwrap_err();
        assert!(err.contains("hard limit"), "{err}");
    }
}
