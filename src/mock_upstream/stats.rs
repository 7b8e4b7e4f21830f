//! What the mock upstream saw: counters for `GET /stats` and the last requests for
//! `GET /requests`, so a test can check what the gateway forwarded and whether it let go of a
//! connection. `POST /reset` clears both, for tests that share one mock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use crate::http::Request;

/// Requests kept for `GET /requests`.
pub(crate) const LOG_LEN: usize = 100;
/// Model ids kept from requests, for `GET /v1/models`.
const MODELS_SEEN_MAX: usize = 100;

/// Everything counted since start (or the last reset).
pub(crate) struct Stats {
    counts: Mutex<Counts>,
    /// Requests read and not yet finished (a gauge: `/reset` leaves it alone).
    in_flight: AtomicU64,
}

#[derive(Default)]
struct Counts {
    requests: u64,
    client_closed: u64,
    by_path: BTreeMap<&'static str, u64>,
    /// Newest last.
    log: VecDeque<Value>,
    models_seen: BTreeSet<String>,
}

/// A request being answered; counts it as in flight until dropped.
pub(crate) struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Stats {
    pub(crate) fn new() -> Stats {
        Stats {
            counts: Mutex::new(Counts::default()),
            in_flight: AtomicU64::new(0),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts and logs a request on a `/v1` route; `template` is its route (or `other`).
    pub(crate) fn begin(&self, request: &Request, template: &'static str) -> InFlight<'_> {
        let entry = log_entry(request);
        let model = entry["body"]["model"].as_str().map(str::to_string);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let mut counts = self.counts();
        counts.requests += 1;
        *counts.by_path.entry(template).or_default() += 1;
        if counts.log.len() == LOG_LEN {
            counts.log.pop_front();
        }
        counts.log.push_back(entry);
        if let Some(model) = model {
            if counts.models_seen.len() < MODELS_SEEN_MAX {
                counts.models_seen.insert(model);
            }
        }
        InFlight(self)
    }

    /// Counts a request whose client left before its answer ended.
    pub(crate) fn client_closed(&self) {
        self.counts().client_closed += 1;
    }

    /// Zeroes the counters and empties the log.
    pub(crate) fn reset(&self) {
        *self.counts() = Counts::default();
    }

    /// `GET /stats`.
    pub(crate) fn to_json(&self) -> Value {
        let counts = self.counts();
        json!({
            "requests": counts.requests,
            "client_closed": counts.client_closed,
            "in_flight": self.in_flight.load(Ordering::SeqCst),
            "by_path": counts.by_path,
        })
    }

    /// `GET /requests`: the last [`LOG_LEN`] requests, newest last.
    pub(crate) fn log_json(&self) -> Value {
        Value::Array(self.counts().log.iter().cloned().collect())
    }

    /// Model ids requests asked for, sorted.
    pub(crate) fn models_seen(&self) -> Vec<String> {
        self.counts().models_seen.iter().cloned().collect()
    }
}

/// One request as `/requests` shows it. Headers are all there, `authorization` included:
/// checking what the gateway sent upstream is what this log is for.
fn log_entry(request: &Request) -> Value {
    let mut headers = Map::new();
    for (name, value) in &request.headers {
        match headers.get_mut(name) {
            // A repeated field reads as its values joined, as RFC 9110 §5.3 allows.
            Some(Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(value);
            }
            _ => {
                headers.insert(name.clone(), Value::String(value.clone()));
            }
        }
    }
    let body = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    json!({
        "method": request.method,
        "path": request.path,
        "headers": headers,
        "body": body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Version;
    use std::time::Instant;

    fn request(path: &str, headers: &[(&str, &str)], body: &str) -> Request {
        Request {
            method: "POST".into(),
            path: path.into(),
            query: String::new(),
            version: Version::Http11,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
            peer: "127.0.0.1:1".parse().unwrap(),
            received: Instant::now(),
            request_id: "id".into(),
            record: Default::default(),
            caller: None,
            _upload: None,
        }
    }

    #[test]
    fn the_log_keeps_the_newest_requests_with_repeated_headers_joined() {
        let stats = Stats::new();
        let first = request("/v1/x", &[("x-a", "1"), ("x-a", "2")], r#"{"model":"m1"}"#);
        drop(stats.begin(&first, "other"));
        for i in 0..LOG_LEN {
            drop(stats.begin(&request(&format!("/v1/{i}"), &[], "not json"), "other"));
        }
        let log = stats.log_json();
        assert_eq!(log.as_array().unwrap().len(), LOG_LEN);
        assert_eq!(log[LOG_LEN - 1]["path"], format!("/v1/{}", LOG_LEN - 1));
        assert_eq!(log[0]["body"], Value::Null);
        assert_eq!(stats.to_json()["requests"], LOG_LEN as u64 + 1);
        assert_eq!(stats.models_seen(), ["m1"]);

        let again = Stats::new();
        drop(again.begin(&first, "other"));
        assert_eq!(again.log_json()[0]["headers"]["x-a"], "1, 2");
    }

    #[test]
    fn reset_zeroes_the_counts_but_not_the_requests_still_in_flight() {
        let stats = Stats::new();
        let held = stats.begin(&request("/v1/a", &[], ""), "/v1/a");
        stats.client_closed();
        stats.reset();
        let s = stats.to_json();
        assert_eq!(
            (s["requests"].as_u64(), s["in_flight"].as_u64()),
            (Some(0), Some(1))
        );
        assert_eq!(s["client_closed"], 0);
        drop(held);
        assert_eq!(stats.to_json()["in_flight"], 0);
    }
}
