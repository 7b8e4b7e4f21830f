//! The processes the bench runs: its own `mock-upstream` and its own `syncgate serve`, both this
//! very binary, each killed and reaped by pid when its guard drops (after a scenario, on an
//! error, on Ctrl-C) and, should the bench itself die, by the kernel (`PR_SET_PDEATHSIG`).
//! [`Fleet`] keeps one of each and restarts them only when a scenario needs other settings.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::client::{request_bytes, IO_TIMEOUT};

/// How long a child may take to print its `listening on` line.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// How the mock upstream is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MockSpec {
    pub(crate) latency_ms: u64,
    pub(crate) stream_chunks: u64,
    pub(crate) stream_interval_ms: u64,
}

impl MockSpec {
    /// An upstream that answers after `latency_ms` (its streams: 16 chunks, no gaps).
    pub(crate) fn latency(latency_ms: u64) -> MockSpec {
        MockSpec {
            latency_ms,
            stream_chunks: 16,
            stream_interval_ms: 0,
        }
    }
}

/// The gateway's `[capacity]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GatewaySpec {
    pub(crate) workers: usize,
    pub(crate) queue: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_queue_wait_ms: u64,
}

/// A child process of the bench, killed and reaped on drop.
pub(crate) struct Proc {
    child: Child,
    /// Kept open so a late line on stdout never meets a closed pipe.
    _stdout: BufReader<ChildStdout>,
    pub(crate) addr: SocketAddr,
    log: PathBuf,
}

impl Proc {
    /// Runs `exe ARGS` with `RUST_LOG=warn`, stderr to `log`, and waits for its readiness line.
    fn spawn(exe: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                File::create(&log).with_context(|| format!("cannot create {}", log.display()))?,
            );
        // The bench decides every setting: none may leak in from the caller's environment.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SYNCGATE_") {
                cmd.env_remove(&key);
            }
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of ours. It asks the kernel
        // to kill the child when the thread that spawned it ends; the bench spawns only from
        // its main thread, which lives until the bench exits.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} {}", exe.display(), args.join(" ")))?;
        let stdout = child.stdout.take().context("child has no stdout")?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            let read = stdout.read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
            stdout
        });
        let first = rx.recv_timeout(STARTUP_DEADLINE);
        let addr = match &first {
            Ok(Ok(line)) => parse_listening(line),
            _ => None,
        };
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            let said = match first {
                Ok(Ok(line)) if !line.is_empty() => format!("it printed {line:?}"),
                Ok(_) => "it exited".to_string(),
                Err(_) => format!("it said nothing for {STARTUP_DEADLINE:?}"),
            };
            bail!(
                "{} {} did not start: {said}; its log:\n{}",
                exe.display(),
                args.join(" "),
                tail(&log)
            );
        };
        let stdout = reader
            .join()
            .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
        Ok(Proc {
            child,
            _stdout: stdout,
            addr,
            log,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of its log, if the process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "process {} exited ({status}); its log:\n{}",
                self.pid(),
                tail(&self.log)
            ),
            Err(e) => bail!("cannot check process {}: {e}", self.pid()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // By pid (Child::kill sends SIGKILL to this child only), then reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` now, in KiB (VmRSS from /proc/PID/status).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) process `pid` has used so far, in seconds ("self" for the bench).
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: utime and
    // stime are the 14th and 15th fields of the line, the 12th and 13th after the name.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}

/// CPU used by each process of a phase over its measured window.
pub(crate) struct CpuMeter {
    /// (name, pid; `None` for the bench itself)
    procs: Vec<(&'static str, Option<u32>)>,
    start: Option<(Instant, Vec<f64>)>,
    last: (Instant, Vec<f64>),
}

impl CpuMeter {
    pub(crate) fn new(procs: Vec<(&'static str, Option<u32>)>) -> CpuMeter {
        CpuMeter {
            procs,
            start: None,
            last: (Instant::now(), Vec::new()),
        }
    }

    fn read(&self) -> Vec<f64> {
        self.procs
            .iter()
            .map(|(_, pid)| cpu_seconds(*pid).unwrap_or(0.0))
            .collect()
    }

    /// Called about every 100 ms: the first call while measuring opens the window.
    pub(crate) fn tick(&mut self, measuring: bool) {
        if !measuring {
            return;
        }
        let now = (Instant::now(), self.read());
        if self.start.is_none() {
            self.start = Some(now.clone());
        }
        self.last = now;
    }

    /// CPU seconds each process used in the window, by name.
    pub(crate) fn used(&self) -> Vec<(&'static str, f64)> {
        let Some((_, start)) = &self.start else {
            return Vec::new();
        };
        self.procs
            .iter()
            .zip(start.iter().zip(&self.last.1))
            .map(|((name, _), (a, b))| (*name, (b - a).max(0.0)))
            .collect()
    }

    /// "gateway 0.62 + upstream 0.31 + load generator 0.20 cores".
    pub(crate) fn cores_summary(&self) -> String {
        let cores = self.cores();
        let parts: Vec<String> = self
            .procs
            .iter()
            .filter_map(|(name, _)| {
                let v = cores.get(*name)?.as_f64()?;
                Some(format!("{} {v:.2}", name.replace('_', " ")))
            })
            .collect();
        format!("{} cores", parts.join(" + "))
    }

    /// The share of a core each process kept busy over the window, by name.
    pub(crate) fn cores(&self) -> serde_json::Value {
        let Some((since, _)) = &self.start else {
            return serde_json::Value::Null;
        };
        let secs = (self.last.0 - *since).as_secs_f64().max(1e-9);
        let map: serde_json::Map<String, serde_json::Value> = self
            .used()
            .into_iter()
            .map(|(name, used)| (name.to_string(), serde_json::json!(used / secs)))
            .collect();
        serde_json::Value::Object(map)
    }
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = line.trim().strip_prefix("listening on http://")?;
    rest.trim_end_matches('/').parse().ok()
}

/// The last lines of a log file, for an error message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The gateway's configuration: one model, `bench`, on one provider, the mock upstream.
pub(crate) fn gateway_toml(upstream: SocketAddr, spec: &GatewaySpec) -> String {
    format!(
        r#"[capacity]
workers = {workers}
queue = {queue}
max_connections = {max_connections}
max_queue_wait_ms = {max_queue_wait_ms}

[[providers]]
name = "up"
type = "openai"
base_url = "http://{upstream}/v1"
max_concurrency = 100000
[providers.timeouts]
first_byte_ms = 60000
idle_ms = 30000
total_ms = 600000

[[models]]
name = "bench"
targets = ["up/bench-model"]
"#,
        workers = spec.workers,
        queue = spec.queue,
        max_connections = spec.max_connections,
        max_queue_wait_ms = spec.max_queue_wait_ms,
    )
}

/// The bench's mock upstream and gateway, started on demand and restarted when a scenario
/// needs other settings. Dropping the fleet stops both.
pub(crate) struct Fleet {
    exe: PathBuf,
    dir: PathBuf,
    mock: Option<(MockSpec, Proc)>,
    gateway: Option<(GatewaySpec, Proc)>,
    starts: u32,
}

impl Fleet {
    pub(crate) fn new(exe: PathBuf) -> anyhow::Result<Fleet> {
        let dir = std::env::temp_dir().join(format!("syncgate-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Fleet {
            exe,
            dir,
            mock: None,
            gateway: None,
            starts: 0,
        })
    }

    /// The mock upstream with `spec`, started (or restarted) if need be.
    pub(crate) fn upstream(&mut self, spec: MockSpec) -> anyhow::Result<SocketAddr> {
        if let Some((running, proc)) = &mut self.mock {
            if *running == spec {
                proc.check_alive()?;
                return Ok(proc.addr);
            }
        }
        // The gateway points at the old mock's port: it goes too.
        self.gateway = None;
        self.mock = None;
        self.starts += 1;
        let args: Vec<String> = [
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--latency-ms",
            &spec.latency_ms.to_string(),
            "--stream-chunks",
            &spec.stream_chunks.to_string(),
            "--stream-interval-ms",
            &spec.stream_interval_ms.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let log = self.dir.join(format!("mock-{}.log", self.starts));
        let proc = Proc::spawn(&self.exe, &args, log)?;
        let addr = proc.addr;
        self.mock = Some((spec, proc));
        Ok(addr)
    }

    /// The pid of the running mock upstream.
    pub(crate) fn upstream_pid(&self) -> Option<u32> {
        self.mock.as_ref().map(|(_, proc)| proc.pid())
    }

    /// The gateway with `spec` in front of the mock upstream with `upstream`.
    pub(crate) fn gateway(
        &mut self,
        upstream: MockSpec,
        spec: GatewaySpec,
    ) -> anyhow::Result<&mut Proc> {
        let upstream_addr = self.upstream(upstream)?;
        let reuse = matches!(&self.gateway, Some((running, _)) if *running == spec);
        if !reuse {
            self.gateway = None;
            self.starts += 1;
            let config = self.dir.join(format!("gateway-{}.toml", self.starts));
            fs::write(&config, gateway_toml(upstream_addr, &spec))
                .with_context(|| format!("cannot write {}", config.display()))?;
            let args: Vec<String> = vec![
                "serve".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--config".into(),
                config.display().to_string(),
                "--db".into(),
                self.dir.join("syncgate.db").display().to_string(),
            ];
            let log = self.dir.join(format!("gateway-{}.log", self.starts));
            let proc = Proc::spawn(&self.exe, &args, log)?;
            self.gateway = Some((spec, proc));
        }
        let (_, proc) = self.gateway.as_mut().context("gateway not running")?;
        proc.check_alive()?;
        Ok(proc)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.gateway = None;
        self.mock = None;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The gateway's load gauges, read from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Gauges {
    pub(crate) workers_busy: u64,
    pub(crate) queue_depth: u64,
}

/// Reads `/metrics` once on a fresh connection.
pub(crate) fn gauges(addr: SocketAddr) -> anyhow::Result<Gauges> {
    let metrics = Metrics::scrape(addr)?;
    let value = |name: &str| {
        metrics
            .total(name)
            .map(|v| v as u64)
            .with_context(|| format!("no {name} in /metrics"))
    };
    Ok(Gauges {
        workers_busy: value("syncgate_workers_busy")?,
        queue_depth: value("syncgate_queue_depth")?,
    })
}

/// One reading of the gateway's `/metrics`, for the figures it measures about itself.
pub(crate) struct Metrics(String);

impl Metrics {
    pub(crate) fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
        get_text(addr, "/metrics").map(Metrics)
    }

    /// The sum of every series of `name` (all label sets), if it has any.
    pub(crate) fn total(&self, name: &str) -> Option<f64> {
        let values: Vec<f64> = self
            .0
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.rsplit_once('}')?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.trim().parse::<f64>().ok()
            })
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// The sums and counts behind what the gateway measures about its own work.
    pub(crate) fn reported(&self) -> Reported {
        let pair = |name: &str| {
            (
                self.total(&format!("{name}_sum")).unwrap_or(0.0),
                self.total(&format!("{name}_count")).unwrap_or(0.0),
            )
        };
        Reported {
            overhead: pair("syncgate_overhead_seconds"),
            queue_wait: pair("syncgate_queue_wait_seconds"),
            first_byte: pair("syncgate_upstream_first_byte_seconds"),
            retries: self.total("syncgate_upstream_retries_total").unwrap_or(0.0),
        }
    }
}

/// What the gateway measured about its own work, as histogram (sum in seconds, count) pairs:
/// its overhead (time not blocked on the provider), queue wait, the upstream's time to
/// first byte, and the retries it took.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reported {
    overhead: (f64, f64),
    queue_wait: (f64, f64),
    first_byte: (f64, f64),
    retries: f64,
}

impl Reported {
    fn zip(self, other: Reported, f: impl Fn(f64, f64) -> f64) -> Reported {
        let pair = |a: (f64, f64), b: (f64, f64)| (f(a.0, b.0), f(a.1, b.1));
        Reported {
            overhead: pair(self.overhead, other.overhead),
            queue_wait: pair(self.queue_wait, other.queue_wait),
            first_byte: pair(self.first_byte, other.first_byte),
            retries: f(self.retries, other.retries),
        }
    }

    /// What happened between `earlier` and this reading.
    pub(crate) fn since(self, earlier: Reported) -> Reported {
        self.zip(earlier, |a, b| a - b)
    }

    pub(crate) fn add(self, other: Reported) -> Reported {
        self.zip(other, |a, b| a + b)
    }

    /// Means in milliseconds, and the retries.
    pub(crate) fn to_json(self) -> serde_json::Value {
        let mean = |(sum, count): (f64, f64)| (count > 0.0).then(|| sum / count * 1e3);
        serde_json::json!({
            "overhead_mean_ms": mean(self.overhead),
            "queue_wait_mean_ms": mean(self.queue_wait),
            "upstream_first_byte_mean_ms": mean(self.first_byte),
            "upstream_retries": self.retries,
        })
    }
}

/// The gateway's own figures over a measured window: read at its first tick and at the end.
pub(crate) struct ReportedWindow {
    addr: SocketAddr,
    start: Option<Reported>,
    /// How long the first scrape took: a new connection and a fast-lane answer, under load.
    pub(crate) scrape_time: Option<Duration>,
}

impl ReportedWindow {
    pub(crate) fn new(addr: SocketAddr) -> ReportedWindow {
        ReportedWindow {
            addr,
            start: None,
            scrape_time: None,
        }
    }

    pub(crate) fn tick(&mut self, measuring: bool) {
        if measuring && self.scrape_time.is_none() {
            let asked = Instant::now();
            self.start = Metrics::scrape(self.addr).ok().map(|m| m.reported());
            self.scrape_time = Some(asked.elapsed());
        }
    }

    /// The sums and counts over the window.
    pub(crate) fn finish_raw(&self) -> anyhow::Result<Reported> {
        let end = Metrics::scrape(self.addr)?.reported();
        Ok(end.since(self.start.unwrap_or_default()))
    }

    /// The figures over the window, with how long the first scrape took.
    pub(crate) fn finish(&self) -> anyhow::Result<serde_json::Value> {
        let mut json = self.finish_raw()?.to_json();
        json["metrics_scrape_ms"] =
            serde_json::json!(self.scrape_time.map(|t| t.as_secs_f64() * 1e3));
        Ok(json)
    }
}

/// Waits (up to `deadline`) until `ok` holds for the gauges; returns the last ones read.
pub(crate) fn wait_for_gauges(
    addr: SocketAddr,
    deadline: Duration,
    ok: impl Fn(&Gauges) -> bool,
) -> anyhow::Result<(Gauges, bool)> {
    let end = Instant::now() + deadline;
    loop {
        let g = gauges(addr)?;
        if ok(&g) {
            return Ok((g, true));
        }
        if Instant::now() >= end || super::interrupted() {
            return Ok((g, false));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A GET whose body is returned as text (for `/metrics`; not on any measured path).
fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = request_bytes("GET", path, b"");
    // Ask for the close so the body ends with the connection: no framing to decode here.
    request.truncate(request.len() - 2);
    request.extend_from_slice(b"connection: close\r\n\r\n");
    stream.write_all(&request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET {path}: no answer head");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_config_is_valid() {
        let spec = GatewaySpec {
            workers: 8,
            queue: 16,
            max_connections: 100,
            max_queue_wait_ms: 60_000,
        };
        let toml = gateway_toml("127.0.0.1:4000".parse().unwrap(), &spec);
        let path = std::env::temp_dir().join(format!("bench-config-{}.toml", std::process::id()));
        fs::write(&path, &toml).unwrap();
        let config = crate::config::Config::resolve(Some(&path), &Default::default());
        fs::remove_file(&path).unwrap();
        let config = config.unwrap();
        assert_eq!(config.capacity.workers, 8);
        assert_eq!(config.capacity.queue, 16);
        assert_eq!(config.models[0].name, "bench");
    }

    #[test]
    fn metrics_add_up_over_label_sets() {
        let m = Metrics(
            "# HELP x\nsyncgate_workers_busy 7\nsyncgate_t_total{p=\"a\"} 2\n\
             syncgate_t_total{p=\"b\"} 3\nsyncgate_h_seconds_sum 0.5\nsyncgate_h_seconds_count 100\n"
                .to_string(),
        );
        assert_eq!(m.total("syncgate_workers_busy"), Some(7.0));
        assert_eq!(m.total("syncgate_t_total"), Some(5.0));
        assert_eq!(m.total("syncgate_t"), None);
        let r = m.reported();
        assert_eq!(r.retries, 0.0);
        let later = Metrics(
            "syncgate_overhead_seconds_sum 0.5\nsyncgate_overhead_seconds_count 100\n".to_string(),
        );
        let json = later.reported().since(r).to_json();
        assert_eq!(json["overhead_mean_ms"], 5.0);
        assert!(json["queue_wait_mean_ms"].is_null());
    }

    #[test]
    fn the_readiness_line_gives_the_address() {
        assert_eq!(
            parse_listening("listening on http://127.0.0.1:4321\n"),
            Some("127.0.0.1:4321".parse().unwrap())
        );
        assert_eq!(parse_listening("starting"), None);
    }
}
