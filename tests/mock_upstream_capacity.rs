//! Capacity of `syncgate mock-upstream`: thousands of concurrent delayed requests must all be
//! answered together, each in about the latency, or the mock would be the bottleneck of the load
//! tests it serves. The 5,000-connection run is `#[ignore]`d (it wants a release build and a
//! quiet machine); run it with
//! `cargo test --release --test mock_upstream_capacity -- --ignored --nocapture`.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// One connection of the load: its socket, what it has received, when its request left.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    sent: Instant,
    answer: Option<(u16, Duration)>,
}

/// What a load run measured.
struct Report {
    latencies: Vec<Duration>,
    non_200: usize,
    unanswered: usize,
    wall: Duration,
    peak_rss_kib: u64,
    peak_threads: u64,
    idle_rss_kib: u64,
}

impl Report {
    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }

    fn describe(&self) -> String {
        format!(
            "{} answered ({} not 200, {} unanswered) in {:?}; latency min {:?} p50 {:?} p99 {:?} \
             max {:?}; mock VmRSS idle {} KiB, peak {} KiB; peak threads {}",
            self.latencies.len(),
            self.non_200,
            self.unanswered,
            self.wall,
            self.latencies.first().copied().unwrap_or_default(),
            self.percentile(0.5),
            self.percentile(0.99),
            self.latencies.last().copied().unwrap_or_default(),
            self.idle_rss_kib,
            self.peak_rss_kib,
            self.peak_threads,
        )
    }
}

/// A field of /proc/PID/status as a number (`VmRSS` in KiB, `Threads`).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's soft open-files limit to the hard one: the client needs a descriptor
/// per connection too.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The status and whether the response in `buf` is complete (Content-Length framing).
fn complete_response(buf: &[u8]) -> Option<u16> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut fields);
    let head = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let length: usize = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())?;
    (buf.len() >= head + length).then(|| r.code.unwrap_or(0))
}

/// Opens `n` keep-alive connections, sends one chat request on each as fast as it can, then
/// waits for every answer in one `poll(2)` loop (so the client itself adds no queueing), while
/// a sampler thread records the mock's peak VmRSS and thread count.
fn load(mock: &Server, n: usize, deadline: Duration) -> Report {
    raise_open_files();
    let pid = mock.pid();
    let idle_rss_kib = proc_status(pid, "VmRSS");
    let mut clients: Vec<Client> = (0..n)
        .map(|i| {
            let stream = TcpStream::connect(mock.addr)
                .unwrap_or_else(|e| panic!("connection {i} of {n} to {}: {e}", mock.addr));
            stream.set_nodelay(true).unwrap();
            Client {
                stream,
                buf: Vec::new(),
                sent: Instant::now(),
                answer: None,
            }
        })
        .collect();

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        thread::spawn(move || {
            let (mut rss, mut threads) = (0, 0);
            while sampling.load(Ordering::SeqCst) {
                rss = rss.max(proc_status(pid, "VmRSS"));
                threads = threads.max(proc_status(pid, "Threads"));
                thread::sleep(Duration::from_millis(20));
            }
            (rss, threads)
        })
    };

    let request = chat_req("load", &[]);
    let start = Instant::now();
    for c in &mut clients {
        c.sent = Instant::now();
        c.stream.write_all(&request).unwrap();
        c.stream.set_nonblocking(true).unwrap();
    }
    let mut fds: Vec<libc::pollfd> = clients
        .iter()
        .map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut open = n;
    let end = start + deadline;
    let mut chunk = [0u8; 4096];
    while open > 0 && Instant::now() < end {
        // SAFETY: `fds` holds valid pollfds for sockets `clients` keeps open (or -1, ignored).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready <= 0 {
            continue;
        }
        for (fd, c) in fds.iter_mut().zip(clients.iter_mut()) {
            if fd.fd < 0 || fd.revents == 0 {
                continue;
            }
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    fd.fd = -1;
                    open -= 1;
                }
                Ok(k) => {
                    c.buf.extend_from_slice(&chunk[..k]);
                    if let Some(status) = complete_response(&c.buf) {
                        c.answer = Some((status, c.sent.elapsed()));
                        fd.fd = -1;
                        open -= 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    fd.fd = -1;
                    open -= 1;
                }
            }
        }
    }
    let wall = start.elapsed();
    sampling.store(false, Ordering::SeqCst);
    let (peak_rss_kib, peak_threads) = sampler.join().unwrap();

    let mut latencies: Vec<Duration> = clients
        .iter()
        .filter_map(|c| c.answer.map(|a| a.1))
        .collect();
    latencies.sort();
    Report {
        non_200: clients
            .iter()
            .filter(|c| c.answer.is_some_and(|a| a.0 != 200))
            .count(),
        unanswered: clients.iter().filter(|c| c.answer.is_none()).count(),
        latencies,
        wall,
        peak_rss_kib,
        peak_threads,
        idle_rss_kib,
    }
}

fn assert_answered_together(report: &Report, latency: Duration, slack: Duration) {
    let text = report.describe();
    assert_eq!(report.unanswered, 0, "{text}");
    assert_eq!(report.non_200, 0, "{text}");
    assert!(
        report.latencies[0] >= latency,
        "latency not applied: {text}"
    );
    assert!(
        *report.latencies.last().unwrap() < latency + slack,
        "answers were not concurrent (serialized would take n × latency): {text}"
    );
}

#[test]
fn five_hundred_delayed_requests_are_answered_together() {
    let latency = Duration::from_millis(1000);
    let mock = Server::start_mock_upstream(&["--latency-ms", "1000"]);
    let report = load(&mock, 500, Duration::from_secs(30));
    eprintln!("500 concurrent: {}", report.describe());
    assert_answered_together(&report, latency, Duration::from_secs(4));
}

#[test]
#[ignore = "5,000 connections: run on a quiet machine, in release, with --ignored"]
fn five_thousand_delayed_requests_are_answered_together() {
    let n: usize = std::env::var("MOCK_LOAD_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let latency = Duration::from_millis(2000);
    let mock = Server::start_mock_upstream(&["--latency-ms", "2000"]);
    let report = load(&mock, n, Duration::from_secs(60));
    eprintln!("{n} concurrent: {}", report.describe());
    assert_answered_together(&report, latency, Duration::from_secs(3));
    let s = get(mock.addr, "/stats").json();
    assert_eq!(s["requests"], n as u64, "{s}");
}
