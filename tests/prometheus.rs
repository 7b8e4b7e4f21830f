//! The monitoring plan, tested against Debian's Prometheus (issue 18): the shipped alert rules
//! pass `promtool check rules` and their unit tests, a live `/metrics` passes `promtool check
//! metrics`, and a real Prometheus on loopback scraping a real syncgate under a short load
//! evaluates every alert rule without error and gets data for every dashboard query.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use common::*;

const PROMETHEUS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/syncgate-alerts.yml"
);
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/syncgate.json");
/// What a dashboard's `$__rate_interval` becomes here: several 1 s scrapes, and the load.
const RATE_INTERVAL: &str = "1m";

fn promtool() -> Option<PathBuf> {
    require("promtool", "prometheus", find_program("promtool", &[]))
}

fn prometheus_program() -> Option<PathBuf> {
    require("prometheus", "prometheus", find_program("prometheus", &[]))
}

/// Runs `program args…` (stdin from `input`) in `dir`; its exit success and everything it said.
fn run(program: &Path, args: &[&str], dir: &str, input: &[u8]) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn shipped_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let (ok, out) = run(
        &promtool,
        &["check", "rules", "syncgate-alerts.yml"],
        PROMETHEUS_DIR,
        b"",
    );
    assert!(ok, "promtool check rules failed:\n{out}");
    let (ok, out) = run(
        &promtool,
        &["test", "rules", "syncgate-alerts.test.yml"],
        PROMETHEUS_DIR,
        b"",
    );
    assert!(ok, "promtool test rules failed:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every alert has a unit test where it fires and one where it stays silent.
#[test]
fn every_alert_has_a_firing_and_a_silent_unit_test() {
    let rules = fs::read_to_string(RULES).unwrap();
    let tests = fs::read_to_string(format!("{PROMETHEUS_DIR}/syncgate-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 15, "too few alerts found: {alerts:?}");
    // (fires, silent) per alert, read off each `alertname:` and the `exp_alerts` line after it.
    let mut cases: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname: ") else {
            continue;
        };
        let entry = cases.entry(name).or_default();
        match lines.get(i + 1) {
            Some(&"exp_alerts: []") => entry.1 += 1,
            Some(&"exp_alerts:") => entry.0 += 1,
            other => panic!("unexpected line after alertname {name}: {other:?}"),
        }
    }
    for alert in &alerts {
        let (fires, silent) = cases.get(alert).copied().unwrap_or_default();
        assert!(
            fires > 0 && silent > 0,
            "{alert}: {fires} firing and {silent} silent unit tests; each alert needs both"
        );
    }
    for name in cases.keys() {
        assert!(
            alerts.contains(name),
            "the unit tests name an unknown alert {name}"
        );
    }
}

#[test]
fn live_metrics_pass_promtool_check_metrics() {
    let Some(promtool) = promtool() else { return };
    let up = Server::start_mock_upstream(&[]);
    let gw = Server::start_with_config(&upstream_model_toml(up.addr), &[]);
    load(gw.addr);
    let text = scrape(gw.addr);
    let (ok, out) = run(
        &promtool,
        &["check", "metrics"],
        PROMETHEUS_DIR,
        text.as_bytes(),
    );
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
}

/// A Prometheus on loopback scraping one target every second, with the shipped rules; stopped
/// on drop.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    fn start(program: &Path, target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(unique("syncgate-prometheus"));
        fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {RULES}\n\
             scrape_configs:\n  - job_name: syncgate\n    static_configs:\n      - targets: ['{target}']\n"
        );
        fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(program)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let prometheus = Prometheus { addr, child, dir };
        let ready = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            try_send(addr, &get_req("/-/ready", &[("Connection", "close")]))
                .is_ok_and(|r| r.status == 200)
        });
        assert!(ready, "prometheus did not get ready:\n{}", prometheus.log());
        prometheus
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates `expr` now through the HTTP API; the whole answer.
    fn query(&self, expr: &str) -> Value {
        let r = get(
            self.addr,
            &format!("/api/v1/query?query={}", url_encode(expr)),
        );
        let answer = r.json();
        assert!(
            r.status == 200 && answer["status"] == "success",
            "prometheus refused {expr}:\n{}",
            r.describe()
        );
        answer
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How many of a query's answers are numbers (not NaN): its data.
fn numbers(answer: &Value) -> usize {
    answer["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                })
                .count()
        })
        .unwrap_or(0)
}

/// A short load that touches what the dashboard shows: chat calls through a provider (plain
/// and streamed), the built-in mock, a request-log read, a background job, a batch, a 404.
fn load(addr: SocketAddr) {
    let chat_m = |stream: bool| {
        json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
    };
    for i in 0..12 {
        assert_ok(
            &post_json(addr, "/v1/chat/completions", &chat_m(i % 3 == 0)),
            "a chat call",
        );
    }
    assert_ok(&chat(addr, "the built-in mock"), "a mock call");
    assert_ok(&get(addr, "/api/requests?limit=5"), "the request log");
    let batch = json!({"requests": [
        {"model": "m", "messages": [{"role": "user", "content": "one"}]},
        {"model": "mock", "messages": [{"role": "user", "content": "two"}]},
    ]});
    assert_ok(
        &post_json(addr, "/api/batch", &batch.to_string()),
        "a batch",
    );
    let job = json!({"request": {"model": "m", "messages": [{"role": "user", "content": "job"}]}});
    let submitted = post_json(addr, "/api/jobs", &job.to_string());
    assert_eq!(submitted.status, 202, "{}", submitted.describe());
    let id = submitted.json()["id"].as_str().unwrap().to_string();
    let done = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        get(addr, &format!("/api/jobs/{id}")).json()["status"] == "succeeded"
    });
    assert!(done, "the job did not succeed in 20 s");
    assert_eq!(get(addr, "/no/such/route").status, 404);
}

/// Every query of the shipped dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    // The data source is a template variable, never `__inputs` (which breaks provisioning).
    assert!(
        dashboard.get("__inputs").is_none(),
        "the dashboard has __inputs"
    );
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "the dashboard has no datasource variable"
    );
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} does not use the datasource variable",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "a variable left in {expr}");
            queries.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    queries
}

#[test]
fn prometheus_evaluates_every_alert_and_gets_data_for_every_dashboard_panel() {
    let Some(program) = prometheus_program() else {
        return;
    };
    let up = Server::start_mock_upstream(&[]);
    let gw = Server::start_with_config(&upstream_model_toml(up.addr), &[]);
    // Series that appear with their first use (tokens by model, attempts by outcome) exist
    // before the first scrape, so no rate() misses the load's first increments.
    load(gw.addr);
    let prometheus = Prometheus::start(&program, gw.addr);
    // Scraped before the load, so that every rate sees it arrive.
    let scraped = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        numbers(&prometheus.query("up{job=\"syncgate\"} == 1")) == 1
    });
    assert!(
        scraped,
        "prometheus never scraped syncgate:\n{}",
        prometheus.log()
    );
    load(gw.addr);

    // Every panel's every query returns numbers, once the load has been scraped.
    let queries = dashboard_queries();
    assert!(
        queries.len() >= 30,
        "only {} dashboard queries",
        queries.len()
    );
    let mut empty: Vec<String> = Vec::new();
    let all_answered = poll_until(Duration::from_secs(30), Duration::from_millis(500), || {
        empty = queries
            .iter()
            .filter(|(_, expr)| numbers(&prometheus.query(expr)) == 0)
            .map(|(title, expr)| format!("{title}: {expr}"))
            .collect();
        empty.is_empty()
    });
    assert!(
        all_answered,
        "dashboard queries with no data after the load:\n{}",
        empty.join("\n")
    );

    // Every alert rule is loaded, evaluated by Prometheus without error, and valid on its own.
    let mut rules: Vec<Value> = Vec::new();
    let evaluated = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let answer = get(prometheus.addr, "/api/v1/rules?type=alert").json();
        rules = answer["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        !rules.is_empty()
            && rules.iter().all(|r| {
                !r["lastEvaluation"]
                    .as_str()
                    .unwrap_or("0001")
                    .starts_with("0001")
            })
    });
    assert!(evaluated, "the rules were not all evaluated: {rules:#?}");
    let shipped = fs::read_to_string(RULES).unwrap();
    assert_eq!(
        rules.len(),
        shipped.matches("- alert: ").count(),
        "prometheus loaded another number of alerts than the file has"
    );
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "rule {rule:#}");
        prometheus.query(rule["query"].as_str().unwrap());
    }
    // Nothing is wrong with this syncgate: no alert fires (a pending one would be a bug too).
    let firing: Vec<&Value> = rules.iter().filter(|r| r["state"] != "inactive").collect();
    assert!(
        firing.is_empty(),
        "alerts on a healthy syncgate: {firing:#?}"
    );
}
