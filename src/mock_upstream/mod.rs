//! `syncgate mock-upstream`: an OpenAI-compatible fake provider in the same binary, for local
//! development, integration tests (a real HTTP upstream that misbehaves on cue) and load tests.
//! One thread per connection, no queue and no limit of its own: the mock must never be the
//! bottleneck of what it is used to measure. docs/mock-upstream.md describes its behaviour.

mod chat;
mod conn;
mod embeddings;
mod fault;
mod routes;
mod stats;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

pub(crate) use fault::Fault;
use stats::Stats;

/// Stack of a connection thread. It parses a head (httparse's 100-field array is ~3 KiB),
/// parses and builds small JSON documents and logs; only touched pages become resident, so
/// 5,000 waiting connections cost a few KiB of stack each.
const CONNECTION_STACK_BYTES: usize = 128 * 1024;

/// Listen backlog asked for; the kernel caps it at `net.core.somaxconn`. std's 128 would drop
/// the SYNs of a burst of new connections and make them retry a second later.
const BACKLOG: libc::c_int = 65_535;

/// Open files the mock wants at the least; the soft limit is raised to the hard one anyway.
const MIN_OPEN_FILES: u64 = 1024;

/// How the mock behaves, from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Address to listen on; port 0 picks a free one. Default `127.0.0.1:9090`.
    pub(crate) listen: SocketAddr,
    /// Time to every `/v1` response head. Default 0.
    pub(crate) latency: Duration,
    /// Content chunks in a streamed reply (at least 1). Default 16.
    pub(crate) stream_chunks: usize,
    /// Gap between consecutive events of a stream. Default 0.
    pub(crate) stream_interval: Duration,
    /// Fault for every request without an `x-mock-fault` header. Default none.
    pub(crate) fault: Fault,
}

/// What every connection thread shares.
pub(crate) struct Shared {
    options: Options,
    stats: Stats,
}

/// Binds, then accepts and serves on background threads until the process exits (the mock
/// has nothing to finish or flush, so stopping is exiting). Returns the bound address.
pub(crate) fn start(options: Options) -> anyhow::Result<SocketAddr> {
    match crate::server::raise_open_files_limit(MIN_OPEN_FILES) {
        Ok(limit) => log::info!("open-files limit {limit}: about that many connections at once"),
        Err(why) => log::warn!("{why}; serving with the current open-files limit"),
    }
    let listener = TcpListener::bind(options.listen)
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    // SAFETY: the descriptor is our own listening socket, alive for this call; listening
    // again only resizes its backlog.
    unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) };
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    log::info!(
        "mock upstream: latency {} ms, {} stream chunks {} ms apart, fault {:?}",
        options.latency.as_millis(),
        options.stream_chunks,
        options.stream_interval.as_millis(),
        options.fault
    );
    let shared = Arc::new(Shared {
        options,
        stats: Stats::new(),
    });
    thread::Builder::new()
        .name("mock-accept".into())
        .spawn(move || accept_loop(&listener, &shared))
        .context("cannot start the accept thread")?;
    Ok(addr)
}

/// Gives every connection its own thread at once: no queue, no cap.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut last_error_log: Option<Instant> = None;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => spawn_connection(shared, stream, peer),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    log::error!("accept failed: {e}");
                    last_error_log = Some(Instant::now());
                }
                // Out of descriptors or memory: let connections close instead of spinning on
                // an error that will repeat at once.
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("mock-conn".into())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || conn::serve(&shared, stream, peer));
    if let Err(e) = spawned {
        // The stream went down with the closure: the client sees its connection close.
        log::error!("cannot start a thread for a connection from {peer}: {e}");
    }
}
