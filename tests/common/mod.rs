//! Shared harness for syncgate integration tests: spawns the binary, speaks raw HTTP/1.x over TcpStream, parses Prometheus text.
// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

mod machine;
// Only the test binaries that need something from the machine use it.
#[allow(unused_imports)]
pub use machine::*;
mod postgres;
// Only the PostgreSQL store's tests use it.
#[allow(unused_imports)]
pub use postgres::*;
mod pg_cluster;
#[allow(unused_imports)]
pub use pg_cluster::*;
mod fleet;
// Only the nginx and multi-instance tests use it.
#[allow(unused_imports)]
pub use fleet::*;
mod upload;
// Only the knowledge base's tests use it.
#[allow(unused_imports)]
pub use upload::*;
mod sse;
// Only the streaming tests use it.
#[allow(unused_imports)]
pub use sse::*;

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_syncgate");
/// How long the server may take to print its `listening on` line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// Default read/write timeout on every client socket, so a broken server fails a test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a run-to-completion invocation (bad config) may take.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(15);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A loopback port free a moment ago, for a program that cannot be told to pick its own.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A string unique within this test run (process id + counter).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Lossy, length-capped rendering of bytes for failure messages.
pub fn preview(bytes: &[u8]) -> String {
    const MAX: usize = 600;
    let s = String::from_utf8_lossy(bytes);
    if s.chars().count() > MAX {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}... ({} bytes total)", bytes.len())
    } else {
        format!("{s:?}")
    }
}

// ---------------------------------------------------------------------------
// Temporary config files
// ---------------------------------------------------------------------------

/// A TOML file under the system temp dir, removed on drop.
pub struct TempConfig {
    path: PathBuf,
}

impl TempConfig {
    pub fn new(toml: &str) -> TempConfig {
        let name = format!("{}.toml", unique("syncgate-test-config"));
        let path = std::env::temp_dir().join(name);
        fs::write(&path, toml)
            .unwrap_or_else(|e| panic!("cannot write config {}: {e}", path.display()));
        TempConfig { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> String {
        self.path
            .to_str()
            .expect("temp dir path is not UTF-8")
            .to_string()
    }

    /// True when `text` names this file (as passed, or canonicalized).
    pub fn is_named_in(&self, text: &str) -> bool {
        if text.contains(&self.path_str()) {
            return true;
        }
        match fs::canonicalize(&self.path) {
            Ok(c) => c.to_str().is_some_and(|c| text.contains(c)),
            Err(_) => false,
        }
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A database path under the system temp dir; the file and its WAL and shared-memory
/// companions are removed on drop.
pub struct TempDb {
    pub path: PathBuf,
}

impl TempDb {
    pub fn new() -> TempDb {
        let name = format!("{}.db", unique("syncgate-test-db"));
        TempDb {
            path: std::env::temp_dir().join(name),
        }
    }

    pub fn path_str(&self) -> String {
        self.path
            .to_str()
            .expect("temp dir path is not UTF-8")
            .to_string()
    }

    /// The database file and its WAL, concatenated: everything written so far.
    pub fn all_bytes(&self) -> Vec<u8> {
        let mut bytes = fs::read(&self.path).unwrap_or_default();
        for suffix in ["-wal", "-journal"] {
            let mut other = self.path.clone().into_os_string();
            other.push(suffix);
            bytes.extend(fs::read(PathBuf::from(other)).unwrap_or_default());
        }
        bytes
    }
}

impl Default for TempDb {
    fn default() -> TempDb {
        TempDb::new()
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut file = self.path.clone().into_os_string();
            file.push(suffix);
            let _ = fs::remove_file(PathBuf::from(file));
        }
    }
}

// ---------------------------------------------------------------------------
// Process management
// ---------------------------------------------------------------------------

fn command(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // Never let the developer's environment leak settings into the server under test.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SYNCGATE_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUST_LOG", "info");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Reads `reader` line by line into `sink`; each line is also sent to `tx` when given.
fn collect_lines<R: Read + Send + 'static>(
    reader: R,
    sink: Arc<Mutex<String>>,
    tx: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw).into_owned();
                    sink.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&line);
                    if let Some(tx) = &tx {
                        let _ = tx.send(line);
                    }
                }
            }
        }
    })
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    const MARK: &str = "listening on http://";
    let rest = &line[line.find(MARK)? + MARK.len()..];
    let token = rest.split_whitespace().next()?.trim_end_matches('/');
    token.parse().ok()
}

fn locked(s: &Arc<Mutex<String>>) -> String {
    s.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A running `syncgate serve`, killed and reaped on drop. On a failing test its stdout and
/// stderr are printed from `Drop`, so every assertion failure comes with the server log.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    exited: Option<ExitStatus>,
    _config: Option<TempConfig>,
    /// The database the harness made for this server when the test named none.
    _db: Option<TempDb>,
}

impl Server {
    /// `syncgate serve --listen 127.0.0.1:0 ARGS...`
    pub fn start(args: &[&str]) -> Server {
        Server::start_full(args, &[], None)
    }

    /// Like `start`, with `--config FILE` pointing at a temp file holding `toml`.
    pub fn start_with_config(toml: &str, args: &[&str]) -> Server {
        Server::start_full(args, &[], Some(TempConfig::new(toml)))
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::start_full(args, envs, None)
    }

    pub fn start_full(args: &[&str], envs: &[(&str, &str)], config: Option<TempConfig>) -> Server {
        let config_path = config.as_ref().map(TempConfig::path_str);
        let mut full: Vec<&str> = vec!["serve", "--listen", "127.0.0.1:0"];
        if let Some(p) = &config_path {
            full.push("--config");
            full.push(p);
        }
        // Each server gets a database of its own unless the test names one.
        let db = (!args.contains(&"--db")).then(TempDb::new);
        let db_path = db.as_ref().map(TempDb::path_str);
        if let Some(p) = &db_path {
            full.push("--db");
            full.push(p);
        }
        full.extend_from_slice(args);
        let mut server = Server::start_command(&full, envs, config);
        server._db = db;
        server
    }

    /// `syncgate mock-upstream --listen 127.0.0.1:0 ARGS...`: the fake provider.
    pub fn start_mock_upstream(args: &[&str]) -> Server {
        let mut full: Vec<&str> = vec!["mock-upstream", "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Server::start_command(&full, &[], None)
    }

    /// Runs the binary with `full` arguments and waits for its `listening on` line.
    pub fn start_command(
        full: &[&str],
        envs: &[(&str, &str)],
        config: Option<TempConfig>,
    ) -> Server {
        let mut child = command(full, envs)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        collect_lines(
            child.stdout.take().expect("stdout is piped"),
            stdout.clone(),
            Some(tx),
        );
        let stderr_thread = collect_lines(
            child.stderr.take().expect("stderr is piped"),
            stderr.clone(),
            None,
        );

        let deadline = Instant::now() + STARTUP_DEADLINE;
        let failure: String;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                failure = format!(
                    "no `listening on http://ADDR` line on stdout within {STARTUP_DEADLINE:?}"
                );
                break;
            }
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    if let Some(addr) = parse_listening(&line) {
                        return Server {
                            addr,
                            child,
                            stdout,
                            stderr,
                            stderr_thread: Some(stderr_thread),
                            exited: None,
                            _config: config,
                            _db: None,
                        };
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        failure = format!("server exited during startup with {status}");
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    failure = "server closed stdout without a `listening on` line".to_string();
                    break;
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = stderr_thread.join();
        panic!(
            "starting `{BIN} {}` failed: {failure}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            full.join(" "),
            locked(&stdout),
            locked(&stderr)
        );
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        locked(&self.stderr)
    }

    /// Everything the server wrote to stdout so far.
    pub fn stdout(&self) -> String {
        locked(&self.stdout)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to this server's process (and nothing else).
    pub fn signal(&self, sig: libc::c_int) {
        assert!(
            self.exited.is_none(),
            "cannot signal a server that already exited"
        );
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) with our own child's pid; the child is not reaped yet, so the pid is ours.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}) failed: {}",
            io::Error::last_os_error()
        );
    }

    /// Polls for process exit until `timeout` passes. `None` means it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = Some(status);
                    return Some(status);
                }
                Ok(None) => {}
                Err(e) => panic!("try_wait on server failed: {e}"),
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            if let Some(t) = self.stderr_thread.take() {
                let _ = t.join();
            }
            eprintln!(
                "--- syncgate at {} (pid {}) stdout ---\n{}\n--- syncgate stderr ---\n{}\n--- end of syncgate log ---",
                self.addr,
                self.child.id(),
                locked(&self.stdout),
                locked(&self.stderr)
            );
        }
    }
}

/// Result of running the binary to completion.
pub struct Exit {
    /// `None` when the process had to be killed (still running at the deadline, or it started serving).
    pub status: Option<ExitStatus>,
    /// The process printed `listening on` (it accepted the configuration).
    pub started_serving: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Exit {
    pub fn failed(&self) -> bool {
        matches!(self.status, Some(s) if !s.success())
    }

    pub fn describe(&self) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None if self.started_serving => {
                "still running (it started serving; killed by the test)".to_string()
            }
            None => "still running at the deadline (killed by the test)".to_string(),
        };
        format!(
            "status: {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// Runs `syncgate ARGS...` until it exits, or kills it when it starts serving or `deadline` passes.
pub fn run_to_exit(args: &[&str], envs: &[(&str, &str)], deadline: Duration) -> Exit {
    let mut child = command(args, envs)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let t_out = collect_lines(
        child.stdout.take().expect("stdout is piped"),
        stdout.clone(),
        None,
    );
    let t_err = collect_lines(
        child.stderr.take().expect("stderr is piped"),
        stderr.clone(),
        None,
    );
    let end = Instant::now() + deadline;
    let mut started_serving = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => panic!("try_wait failed: {e}"),
        }
        if locked(&stdout).contains("listening on") {
            started_serving = true;
        }
        if started_serving || Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = t_out.join();
    let _ = t_err.join();
    Exit {
        status,
        started_serving,
        stdout: locked(&stdout),
        stderr: locked(&stderr),
    }
}

/// Runs `syncgate serve --listen 127.0.0.1:0 ARGS...` to completion.
pub fn run_serve_to_exit(args: &[&str], envs: &[(&str, &str)]) -> Exit {
    let mut full = vec!["serve", "--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    run_to_exit(&full, envs, EXIT_DEADLINE)
}

// ---------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------

/// One parsed HTTP response.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub reason: String,
    /// Minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    /// First header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header called `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// True when a `Connection` header carries the `close` token.
    pub fn closes(&self) -> bool {
        self.header_all("connection")
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing the response) when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body, parsing failed ({e}); got:\n{}",
                self.describe()
            )
        })
    }

    pub fn describe(&self) -> String {
        let mut s = format!("HTTP/1.{} {} {}\n", self.version, self.status, self.reason);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s.push_str(&format!("body: {}", preview(&self.body)));
        s
    }
}

fn timeout_kind(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn closed_kind(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
    )
}

/// One client connection; reads responses one at a time, keeping any bytes that belong to the next.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub peer: SocketAddr,
}

impl Conn {
    pub fn try_open(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            peer: addr,
        })
    }

    pub fn open(addr: SocketAddr) -> Conn {
        Conn::try_open(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
    }

    pub fn set_read_timeout(&self, d: Duration) {
        self.stream
            .set_read_timeout(Some(d))
            .expect("set_read_timeout");
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Bytes received but not yet consumed as part of a response.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// One read(2) into the buffer. `Ok(0)` is end of stream.
    pub fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if timeout_kind(&e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "read timed out; bytes received so far: {}",
                            preview(&self.buf)
                        ),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} of {n} body bytes",
                        self.buf.len()
                    ),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn take_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return Ok(line);
            }
            if self.buf.len() > 64 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk-size line longer than 64 KiB",
                ));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
        }
    }

    fn take_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.take_line()?;
            let line = String::from_utf8_lossy(&line).into_owned();
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size line {line:?}: {e}"),
                )
            })?;
            if size == 0 {
                // Trailers until an empty line.
                while !self.take_line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.take(size)?);
            let crlf = self.take(2)?;
            if crlf != b"\r\n" {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk not followed by CRLF: {}", preview(&crlf)),
                ));
            }
        }
    }

    fn take_to_close(&mut self) -> io::Result<Vec<u8>> {
        loop {
            match self.fill() {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if closed_kind(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }

    /// Reads one complete response (skipping 1xx interim responses).
    pub fn read_response(&mut self) -> io::Result<Resp> {
        loop {
            let head = loop {
                if !self.buf.is_empty() {
                    let mut hdrs = [httparse::EMPTY_HEADER; 128];
                    let mut r = httparse::Response::new(&mut hdrs);
                    match r.parse(&self.buf) {
                        Ok(httparse::Status::Complete(n)) => {
                            let headers: Vec<(String, String)> = r
                                .headers
                                .iter()
                                .map(|h| {
                                    (
                                        h.name.to_string(),
                                        String::from_utf8_lossy(h.value).into_owned(),
                                    )
                                })
                                .collect();
                            let head = (
                                r.code.unwrap_or(0),
                                r.reason.unwrap_or("").to_string(),
                                r.version.unwrap_or(1),
                                headers,
                            );
                            self.buf.drain(..n);
                            break head;
                        }
                        Ok(httparse::Status::Partial) => {}
                        Err(e) => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("unparseable response head ({e}): {}", preview(&self.buf)),
                            ))
                        }
                    }
                }
                if self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed before a complete response head; got {}",
                            preview(&self.buf)
                        ),
                    ));
                }
            };
            let (status, reason, version, headers) = head;
            let mut resp = Resp {
                status,
                reason,
                version,
                headers,
                body: Vec::new(),
            };
            if (100..200).contains(&status) {
                continue;
            }
            if status == 204 || status == 304 {
                return Ok(resp);
            }
            let chunked = resp.header_all("transfer-encoding").iter().any(|v| {
                v.rsplit(',')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
            });
            resp.body = if chunked {
                self.take_chunked()?
            } else if let Some(cl) = resp.header("content-length") {
                let n: usize = cl.trim().parse().map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad Content-Length {cl:?} in response: {e}"),
                    )
                })?;
                self.take(n)?
            } else {
                self.take_to_close()?
            };
            return Ok(resp);
        }
    }

    /// Writes `raw` and reads one response.
    pub fn try_request(&mut self, raw: &[u8]) -> io::Result<Resp> {
        self.write_all(raw)?;
        self.read_response()
    }

    /// Writes `raw` and reads one response; panics with context on I/O failure.
    pub fn request(&mut self, raw: &[u8]) -> Resp {
        let peer = self.peer;
        if let Err(e) = self.write_all(raw) {
            panic!(
                "writing request to {peer} failed: {e}\nrequest: {}",
                preview(raw)
            );
        }
        self.read_response().unwrap_or_else(|e| {
            panic!(
                "reading response from {peer} failed: {e}\nrequest: {}",
                preview(raw)
            )
        })
    }

    /// Whether the server closed the connection: `Ok(true)` on EOF or reset, `Ok(false)` if it is still
    /// open after `within`, `Err` with the bytes if it sent more data.
    pub fn closed_within(&mut self, within: Duration) -> Result<bool, String> {
        if !self.buf.is_empty() {
            return Err(format!(
                "unexpected extra bytes after the response: {}",
                preview(&self.buf)
            ));
        }
        self.set_read_timeout(within);
        let res = self.fill();
        let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
        match res {
            Ok(0) => Ok(true),
            Ok(_) => Err(format!(
                "expected the server to close, but it sent more bytes: {}",
                preview(&self.buf)
            )),
            Err(e) if closed_kind(&e) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(false),
            Err(e) => Err(format!(
                "unexpected read error while waiting for close: {e}"
            )),
        }
    }

    /// Panics unless the server closes this connection within 5 s.
    pub fn assert_closed(&mut self) {
        match self.closed_within(Duration::from_secs(5)) {
            Ok(true) => {}
            Ok(false) => {
                panic!("expected the server to close the connection; it is still open after 5 s")
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Opens a connection, writes `raw`, reads one response.
pub fn try_send(addr: SocketAddr, raw: &[u8]) -> io::Result<Resp> {
    let mut c = Conn::try_open(addr)?;
    c.write_all(raw)?;
    c.read_response()
}

pub fn send(addr: SocketAddr, raw: &[u8]) -> Resp {
    try_send(addr, raw)
        .unwrap_or_else(|e| panic!("request to {addr} failed: {e}\nrequest: {}", preview(raw)))
}

/// `GET path HTTP/1.1` with Host and the extra headers (keep-alive unless a header says otherwise).
pub fn get_req(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// `POST path HTTP/1.1` with a JSON body, Content-Length, Host and the extra headers.
pub fn post_req(path: &str, body: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s.push_str(body);
    s.into_bytes()
}

/// A config with one provider, `up`, at `upstream` (a `syncgate mock-upstream`), and one
/// model on it, `m`; tests append their own tables.
pub fn upstream_model_toml(upstream: SocketAddr) -> String {
    format!(
        "[[providers]]\nname = \"up\"\ntype = \"openai\"\nbase_url = \"http://{upstream}/v1\"\n\n\
         [[models]]\nname = \"m\"\ntargets = [\"up/upstream-model\"]\n"
    )
}

/// A valid mock chat body with one user message.
pub fn chat_body(text: &str) -> String {
    serde_json::json!({
        "model": "mock",
        "messages": [{"role": "user", "content": text}]
    })
    .to_string()
}

/// A keep-alive `POST /v1/chat/completions` for the mock model.
pub fn chat_req(text: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    post_req("/v1/chat/completions", &chat_body(text), headers)
}

/// One-shot GET (sends `Connection: close`).
pub fn get(addr: SocketAddr, path: &str) -> Resp {
    send(addr, &get_req(path, &[("Connection", "close")]))
}

/// One-shot POST of a JSON body (sends `Connection: close`).
pub fn post_json(addr: SocketAddr, path: &str, body: &str) -> Resp {
    send(addr, &post_req(path, body, &[("Connection", "close")]))
}

/// One-shot chat request for the mock model.
pub fn chat(addr: SocketAddr, text: &str) -> Resp {
    post_json(addr, "/v1/chat/completions", &chat_body(text))
}

/// Asserts `resp` is an error with `status` and a well-formed error body; checks `type`/`code`
/// when given. Returns the `error` object.
pub fn assert_error(resp: &Resp, status: u16, ty: Option<&str>, code: Option<&str>) -> Value {
    let want = format!(
        "expected HTTP {status} with an error body (type {}, code {})",
        ty.unwrap_or("any"),
        code.unwrap_or("any")
    );
    assert_eq!(resp.status, status, "{want}; got:\n{}", resp.describe());
    let v: Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("{want}; body is not JSON ({e}):\n{}", resp.describe()));
    let err = v
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or_else(|| panic!("{want}; no `error` object:\n{}", resp.describe()))
        .clone();
    for field in ["message", "type", "code"] {
        assert!(
            err.get(field).is_some_and(Value::is_string),
            "{want}; error.{field} is not a string:\n{}",
            resp.describe()
        );
    }
    if let Some(ty) = ty {
        assert_eq!(err["type"], ty, "{want}; got:\n{}", resp.describe());
    }
    if let Some(code) = code {
        assert_eq!(err["code"], code, "{want}; got:\n{}", resp.describe());
    }
    err
}

/// Asserts a 200 response and returns it, describing it otherwise.
pub fn assert_ok(resp: &Resp, what: &str) {
    assert_eq!(
        resp.status,
        200,
        "expected 200 for {what}; got:\n{}",
        resp.describe()
    );
}

/// Calls `f` until it returns true or `timeout` passes (sleeping `interval` between tries).
pub fn poll_until(timeout: Duration, interval: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(interval);
    }
}

// ---------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            return out;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(o) => val.push(o),
                    None => break,
                },
                '"' => break,
                o => val.push(o),
            }
        }
        out.push((key.trim().to_string(), val));
    }
}

/// Parses the sample lines of a Prometheus text exposition (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match (line.find('{'), line.find(' ')) {
            (Some(b), sp) if sp.is_none_or(|sp| b < sp) => {
                // Find the closing brace outside quotes.
                let bytes = line.as_bytes();
                let mut i = b + 1;
                let mut in_q = false;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' if in_q => i += 1,
                        b'"' => in_q = !in_q,
                        b'}' if !in_q => break,
                        _ => {}
                    }
                    i += 1;
                }
                let end = i.min(line.len());
                (
                    &line[..b],
                    parse_labels(&line[b + 1..end]),
                    line.get(end + 1..).unwrap_or(""),
                )
            }
            (_, Some(sp)) => (&line[..sp], Vec::new(), &line[sp..]),
            _ => continue,
        };
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            out.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
    }
    out
}

fn labels_match(sample: &Sample, want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
}

/// Sum of every sample called `name` whose labels include `labels`; `None` when none match.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = parse_metrics(text)
        .into_iter()
        .filter(|s| s.name == name && labels_match(s, labels))
        .map(|s| s.value)
        .collect();
    if matching.is_empty() {
        None
    } else {
        Some(matching.iter().sum())
    }
}

/// True when the exposition mentions metric family `name` (a `# TYPE` line, a sample, or a
/// histogram/summary sample with `_bucket`/`_sum`/`_count`).
pub fn has_metric_family(text: &str, name: &str) -> bool {
    let typed = text.lines().any(|l| {
        let mut it = l.split_whitespace();
        it.next() == Some("#") && it.next() == Some("TYPE") && it.next() == Some(name)
    });
    typed
        || parse_metrics(text).iter().any(|s| {
            s.name == name
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suf| s.name == format!("{name}{suf}"))
        })
}

/// GET /metrics, asserting 200.
pub fn scrape(addr: SocketAddr) -> String {
    let r = get(addr, "/metrics");
    assert_ok(&r, "GET /metrics");
    r.text()
}

/// Polls /metrics until `pred(value)` holds for `name{labels}` or `timeout` passes; returns the value.
pub fn wait_for_metric(
    addr: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    pred: impl Fn(f64) -> bool,
    timeout: Duration,
) -> f64 {
    let mut last = String::new();
    let mut value = None;
    let ok = poll_until(timeout, Duration::from_millis(10), || {
        // A failed scrape (e.g. at the connection limit) is just another miss.
        match try_send(addr, &get_req("/metrics", &[("Connection", "close")])) {
            Ok(r) if r.status == 200 => {
                last = r.text();
                value = metric_value(&last, name, labels);
            }
            Ok(r) => last = format!("(scrape answered)\n{}", r.describe()),
            Err(e) => last = format!("(scrape failed: {e})"),
        }
        value.is_some_and(&pred)
    });
    assert!(
        ok,
        "metric {name}{labels:?} did not reach the expected value within {timeout:?}; last value {value:?}; last scrape:\n{last}"
    );
    value.expect("checked above")
}
