//! What the bench reads about the processes it runs while they are under load: resident
//! memory and CPU time from /proc, and the gateway's own figures from its `/metrics`.

use std::fs;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::client::{request_bytes, IO_TIMEOUT};
use super::report::Row;

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

    /// The table row comparing how busy each process kept the CPU here and in the direct run.
    pub(crate) fn busy_row(&self, direct: &Self) -> Row {
        Row::info(
            "CPU busy while measured",
            format!(
                "{}; direct: {}",
                self.cores_summary(),
                direct.cores_summary()
            ),
        )
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
}
