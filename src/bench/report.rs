//! What the bench reports: the machine it ran on, each scenario's figures as JSON, and the
//! summary table (each figure, its goal, pass or short) printed at the end.

use std::fmt::Write;
use std::fs;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// Milliseconds, as a float.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Microseconds, as a float.
pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One line of the summary table.
pub(crate) struct Row {
    figure: String,
    measured: String,
    /// The goal and whether it was met; none for figures shown for information.
    goal: Option<(String, bool)>,
}

impl Row {
    pub(crate) fn info(figure: &str, measured: String) -> Row {
        Row {
            figure: figure.to_string(),
            measured,
            goal: None,
        }
    }

    pub(crate) fn goal(figure: &str, measured: String, goal: &str, met: bool) -> Row {
        Row {
            figure: figure.to_string(),
            measured,
            goal: Some((goal.to_string(), met)),
        }
    }
}

/// One scenario's results.
pub(crate) struct Outcome {
    key: &'static str,
    json: Value,
    rows: Vec<Row>,
}

impl Outcome {
    pub(crate) fn new(key: &'static str, json: Value, rows: Vec<Row>) -> Outcome {
        Outcome { key, json, rows }
    }
}

/// What the figures were measured on.
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) memory_gb: f64,
    pub(crate) os: String,
    pub(crate) kernel: String,
    pub(crate) cpu: Option<String>,
    pub(crate) version: &'static str,
    pub(crate) profile: &'static str,
    /// The 1-minute load average when the bench started: the machine may be shared.
    pub(crate) load_average: Option<f64>,
    /// The PostgreSQL server measured beside SQLite ("15.18 at 127.0.0.1:5432"), if any.
    pub(crate) postgres: Option<String>,
}

impl Machine {
    /// One line: "2 cores (AMD EPYC …), 23.4 GB, Debian … (Linux 6.1), release build".
    pub(crate) fn summary(&self) -> String {
        let cpu = self
            .cpu
            .as_deref()
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        let load = self
            .load_average
            .map(|l| format!(", load average {l:.2} at start"))
            .unwrap_or_default();
        format!(
            "{} cores{cpu}, {:.1} GB, {} (kernel {}), syncgate {} {} build{load}",
            self.cores, self.memory_gb, self.os, self.kernel, self.version, self.profile
        )
    }
}

/// Reads what it can of the machine from /proc and /etc; what it cannot read stays unknown.
pub(crate) fn machine() -> Machine {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let os_release = read("/etc/os-release");
    let pretty = os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gb: mem_kib / (1024.0 * 1024.0),
        os: pretty.unwrap_or_else(|| std::env::consts::OS.to_string()),
        kernel: if kernel.is_empty() {
            "unknown".into()
        } else {
            kernel
        },
        cpu,
        version: env!("CARGO_PKG_VERSION"),
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        load_average: read("/proc/loadavg")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok()),
        postgres: None,
    }
}

/// `{"machine": {...}, "scenarios": {"overhead": {...}, ...}}`: only scenarios that ran.
pub(crate) fn json(machine: &Machine, outcomes: &[Outcome]) -> Value {
    let mut scenarios = Map::new();
    for outcome in outcomes {
        let mut figures = outcome.json.clone();
        round(&mut figures);
        scenarios.insert(outcome.key.to_string(), figures);
    }
    let mut report = json!({
        "machine": {
            "cores": machine.cores,
            "memory_gb": (machine.memory_gb * 10.0).round() / 10.0,
            "os": machine.os,
            "kernel": machine.kernel,
            "cpu": machine.cpu,
            "syncgate_version": machine.version,
            "build_profile": machine.profile,
            "load_average_at_start": machine.load_average,
        },
        "scenarios": scenarios,
    });
    if let Some(server) = &machine.postgres {
        report["machine"]["postgres"] = json!(server);
    }
    report
}

/// Rounds every non-integer number to three decimals: the measurements are not finer.
fn round(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(v) = n.as_f64().map(|v| (v * 1000.0).round() / 1000.0) {
                *value = json!(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(round),
        Value::Object(map) => map.values_mut().for_each(round),
        _ => {}
    }
}

/// The summary table: one line per figure, with its goal and pass/SHORT.
pub(crate) fn table(
    machine: &Machine,
    outcomes: &[Outcome],
    took: Duration,
    phase: Duration,
) -> String {
    let header = ["scenario", "figure", "measured", "goal", "result"];
    let mut lines: Vec<[String; 5]> = Vec::new();
    let (mut met, mut goals) = (0, 0);
    for outcome in outcomes {
        for (i, row) in outcome.rows.iter().enumerate() {
            let scenario = if i == 0 { outcome.key } else { "" };
            let (goal, result) = match &row.goal {
                Some((goal, ok)) => {
                    goals += 1;
                    met += usize::from(*ok);
                    (goal.clone(), if *ok { "pass" } else { "SHORT" })
                }
                None => ("—".to_string(), ""),
            };
            lines.push([
                scenario.replace('_', "-"),
                row.figure.clone(),
                row.measured.clone(),
                goal,
                result.to_string(),
            ]);
        }
    }
    let width = |col: usize| {
        lines
            .iter()
            .map(|l| l[col].chars().count())
            .chain([header[col].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let mut out = String::new();
    let _ = writeln!(out, "syncgate bench: {}", machine.summary());
    let _ = writeln!(
        out,
        "{} s per measured phase; whole run {:.0} s; ratios are against the same mock \
         upstream hit directly in this run",
        phase.as_secs(),
        took.as_secs_f64()
    );
    if let Some(server) = &machine.postgres {
        let _ = writeln!(
            out,
            "rows named PostgreSQL ran on PostgreSQL {server} (a scratch database each); \
             every other row on SQLite"
        );
    }
    if machine.profile == "debug" {
        let _ = writeln!(
            out,
            "WARNING: debug build: these figures say nothing about a release build"
        );
    }
    let mut push = |cells: &[&str]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < cells.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    };
    push(&header);
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    push(&rule.iter().map(String::as_str).collect::<Vec<_>>());
    for line in &lines {
        push(&line.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let _ = writeln!(out, "goals met: {met} of {goals}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_counts_goals() {
        let outcomes = vec![Outcome::new(
            "saturated_health",
            json!({"p99_ms": 0.4}),
            vec![
                Row::info("p50", "0.2 ms".into()),
                Row::goal("p99", "0.4 ms".into(), "≤ 5 ms", true),
                Row::goal("other", "9 µs".into(), "≤ 1 µs", false),
            ],
        )];
        let m = machine();
        let t = table(
            &m,
            &outcomes,
            Duration::from_secs(3),
            Duration::from_secs(1),
        );
        assert!(t.contains("goals met: 1 of 2"), "{t}");
        assert!(t.contains("saturated-health"), "{t}");
        let rows: Vec<&str> = t
            .lines()
            .filter(|l| l.contains(" ms") || l.contains("µs"))
            .collect();
        // The result column starts at the same character on every line.
        let pass_at = rows[1].chars().count() - "pass".len();
        let short_at = rows[2].chars().count() - "SHORT".len();
        assert_eq!(pass_at, short_at, "{t}");
        let j = json(&m, &outcomes);
        assert_eq!(j["scenarios"]["saturated_health"]["p99_ms"], 0.4);
        assert!(j["machine"]["cores"].as_u64().is_some());
    }
}
