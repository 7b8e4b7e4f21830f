//! Admission: what happens to a request once the connection thread has read it. The fast lane
//! is answered here; everything else is admitted if fewer than `workers + queue` requests are
//! in the server, and handed over with one `try_send`; otherwise it is answered with a 503 at
//! once. Also [`respond`], the one function that writes an
//! answer and records it (access log line and metrics).

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;

use super::handoff::{Handback, Returner};
use super::State;
use crate::api::{self, ApiError, Route};
use crate::auth::{Caller, Denied};
use crate::http::{write_response, Body, Rejection, Request, Response, Version, WriteMeta};
use crate::limits::Limit;
use crate::spend::Cost;
use crate::store::requests::RequestRow;

/// A request handed to the worker pool, with the connection it came on. The worker writes the
/// answer and hands the connection back through `handback` (or drops it to close it).
pub(crate) struct Job {
    pub(crate) request: Request,
    pub(crate) route: Route,
    pub(crate) stream: TcpStream,
    pub(crate) handback: Returner,
    pub(crate) enqueued: Instant,
    /// Its stamp among the waiting (`State::oldest_wait`), cleared when a worker takes it.
    pub(crate) waiting: super::waits::Ticket,
}

/// Answers `request` here or queues it for a worker; returns the connection when it stays
/// open for the next request. `handback` is the connection thread's own, where a worker
/// returns the connection.
pub(crate) fn admit(
    state: &State,
    mut request: Request,
    stream: TcpStream,
    handback: &Handback,
) -> Option<TcpStream> {
    let route = match api::route(&request.method, &request.path, state.config.debug_routes) {
        Ok(route) => route,
        Err(e) => {
            let label = match e {
                ApiError::MethodNotAllowed { template, .. } => template,
                _ => api::UNMATCHED,
            };
            return respond(state, &request, label, Err(e), stream, None);
        }
    };
    if route.is_fast_lane() {
        let answer = api::ops::answer(state, route, &request);
        return respond(state, &request, route.template(), answer, stream, None);
    }
    // Who is calling is decided here, before the request takes a queue slot or reaches a
    // provider; a key's limits are charged here too.
    match authorize(state, route, &request) {
        // Development mode on loopback: only this machine may call (a page elsewhere could
        // point its own name at 127.0.0.1 and read the log), so the Host must be a local one.
        // `--allow-open` on another address opened the server to its network on purpose.
        Ok(Caller::Open) if state.auth.is_open() && state.config.listen.ip().is_loopback() => {
            if let Err(e) = api::console::check_host(state, &request) {
                return respond(state, &request, route.template(), Err(e), stream, None);
            }
            request.caller = Some(Caller::Open);
        }
        Ok(caller) => request.caller = Some(caller),
        Err(denied) => {
            match &denied {
                Denied::Limited(refusal) => state
                    .metrics
                    .rate_limited
                    .with_label_values(&[limit_label(refusal.limit)])
                    .inc(),
                other => {
                    if let Some(reason) = other.reason() {
                        state
                            .metrics
                            .auth_failures
                            .with_label_values(&[reason])
                            .inc();
                    }
                }
            }
            let error = ApiError::Denied(denied);
            return respond(state, &request, route.template(), Err(error), stream, None);
        }
    }
    // Admission is by count: `workers` requests in service plus `queue` waiting. Counting
    // (rather than asking whether the channel has room) makes the capacity exact even while
    // idle workers have not yet woken to take what was just sent.
    // The count is raised before the draining flag is read: shutdown sets the flag first and
    // then waits for the count to reach zero, so no admitted request is ever missed.
    let admitted_before = state.pending.fetch_add(1, Ordering::SeqCst);
    let refusal = if state.is_draining() {
        Some(ApiError::Draining)
    } else if admitted_before >= state.capacity() {
        Some(ApiError::QueueFull {
            retry_after_s: state.retry_after_s(),
        })
    } else {
        None
    };
    if let Some(error) = refusal {
        state.pending.fetch_sub(1, Ordering::SeqCst);
        return respond(state, &request, route.template(), Err(error), stream, None);
    }
    // If the job is ever dropped unanswered, its returner goes with it and this thread wakes
    // to close the connection instead of waiting forever.
    let enqueued = Instant::now();
    let job = Job {
        request,
        route,
        stream,
        handback: handback.returner(),
        enqueued,
        waiting: state.waits.enter(enqueued),
    };
    match state.queue.try_send(job) {
        // The worker owns the connection until it hands it back.
        Ok(()) => {
            state.doorbell.ring();
            handback.wait()
        }
        // The channel holds `capacity()` jobs, so this happens only if the workers are gone.
        Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
            state.waits.leave(job.waiting);
            state.pending.fetch_sub(1, Ordering::SeqCst);
            let error = ApiError::QueueFull {
                retry_after_s: state.retry_after_s(),
            };
            respond(
                state,
                &job.request,
                route.template(),
                Err(error),
                job.stream,
                None,
            )
        }
    }
}

/// The caller of a queued route: the admin key for `/admin` (and, besides keys, on the
/// knowledge base's routes), else a key (or none, in open mode).
fn authorize(state: &State, route: Route, request: &Request) -> Result<Caller, Denied> {
    if route.is_admin() {
        state.auth.admit_admin(request)
    } else if route == Route::DebugPanic {
        Ok(Caller::Open)
    } else if route.admin_may_call() && state.auth.is_admin(request) {
        Ok(Caller::Admin)
    } else {
        state.auth.admit(request, crate::store::now_ms())
    }
}

/// The `limit` label of `syncgate_rate_limited_total`.
fn limit_label(limit: Limit) -> &'static str {
    match limit {
        Limit::Requests => "requests",
        Limit::Tokens => "tokens",
        Limit::InFlight => "in_flight",
    }
}

/// Answers a request the front end refused while reading it. The caller closes afterwards.
pub(crate) fn refuse(
    state: &State,
    rejection: Rejection,
    peer: SocketAddr,
    stream: &mut TcpStream,
) {
    let error = ApiError::Http(rejection);
    let status = error.status();
    if let Some(reason) = error.reject_reason() {
        state.metrics.reject(reason);
    }
    let meta = WriteMeta {
        version: Version::Http11,
        keep_alive: false,
        request_id: None,
    };
    let bytes = write_response(stream, error.to_response(), &meta).map_or(0, |w| w.bytes);
    state.metrics.count_request("none", status);
    log::info!(target: "syncgate::access", "{peer} - - {status} {bytes}B refused: {error}");
}

/// Writes the answer to one request and records it: the access-log line and the request
/// metrics. Every request that reaches a handler or the fast lane ends here, exactly once.
/// Returns the connection if it may carry another request.
pub(crate) fn respond(
    state: &State,
    request: &Request,
    route: &str,
    result: Result<Response, ApiError>,
    mut stream: TcpStream,
    queue_wait: Option<Duration>,
) -> Option<TcpStream> {
    let error_code = result.as_ref().err().map(|e| e.code().to_string());
    let response = result.unwrap_or_else(|e| {
        if let Some(reason) = e.reject_reason() {
            state.metrics.reject(reason);
        }
        // A key refused because its shared limits cannot be checked is logged by the limiter,
        // once a minute, not once a request.
        let said = matches!(e, ApiError::Denied(Denied::StoreUnavailable));
        if e.status() >= 500 && e.reject_reason().is_none() && !said {
            log::error!("request {} failed: {e}", request.request_id);
        }
        if let ApiError::Store(store_error) = &e {
            state.metrics.store.count_error(store_error.kind());
        }
        e.to_response_for(request)
    });
    let mut response = response;
    // Every answer to a keyed request says where the key stands (OpenAI's headers).
    if let Some(Caller::Key { permit, .. }) = &request.caller {
        for (name, value) in permit.headers() {
            response = response.with_header(name, value);
        }
    }
    let status = response.status;
    // Which provider served it and in how many attempts, as the handler marked the answer
    // (formatted only when the access log is on).
    let logging = log::log_enabled!(target: "syncgate::access", log::Level::Info);
    let served = match (
        logging,
        response_header(&response, "x-syncgate-provider"),
        response_header(&response, "x-syncgate-attempts"),
    ) {
        (true, Some(target), Some(attempts)) => format!(" upstream={target} attempts={attempts}"),
        _ => String::new(),
    };
    let meta = WriteMeta {
        version: request.version,
        keep_alive: request.keep_alive && !state.is_draining(),
        request_id: Some(&request.request_id),
    };
    let log = &state.config.log;
    let logged = log.requests && is_logged_path(&request.path);
    let response_body = match &response.body {
        Body::Bytes(bytes) if logged && log.bodies => Some(capped(bytes, log.body_max_bytes)),
        _ => None,
    };
    // A key's in-flight slot is held while its answer is made: until now for a whole body,
    // until the last event for a stream.
    let streamed = matches!(response.body, Body::Stream(_));
    if !streamed {
        settle(request);
    }
    let written = {
        let _open = streamed.then(|| crate::metrics::Raised::new(&state.metrics.streams_open));
        write_response(&mut stream, response, &meta)
    };
    let (bytes, keep_alive, note) = match written {
        Ok(w) => (w.bytes, w.keep_alive, ""),
        Err(_) => (0, false, " client-gone"),
    };
    let elapsed = request.received.elapsed();
    if streamed {
        settle(request);
    }
    let cost = request.record.cost(&state.config.prices);
    if let Some(micros) = cost.and_then(Cost::micros) {
        let model = request
            .record
            .note_read(|f| f.model.clone())
            .unwrap_or_default();
        state.metrics.count_spend(&model, micros);
    }
    if logged {
        let row = log_row(
            request, route, status, elapsed, queue_wait, note, error_code,
        );
        state.store.log(RequestRow {
            request_body: log
                .bodies
                .then(|| capped(&request.body, log.body_max_bytes)),
            response_body,
            cost_micros: cost.and_then(Cost::micros),
            cost_estimated: cost.is_some_and(Cost::is_estimated),
            ..row
        });
    }
    state
        .metrics
        .observe_request(route, status, elapsed.as_secs_f64());
    let queue_ms = queue_wait.map_or(0.0, |w| w.as_secs_f64() * 1000.0);
    let client = if logging {
        client_of(state, request)
    } else {
        String::new()
    };
    log::info!(
        target: "syncgate::access",
        "{} {} {} {} {}B {:.1}ms queue={:.1}ms rid={}{served}{note}",
        client,
        request.method,
        loggable_path(&request.path),
        status,
        bytes,
        elapsed.as_secs_f64() * 1000.0,
        queue_ms,
        request.request_id,
    );
    log::debug!(
        target: "syncgate::access",
        "rid={} headers: {}",
        request.request_id,
        crate::http::loggable_headers(&request.headers)
    );
    keep_alive.then_some(stream)
}

/// Settles a keyed request with its key's limits: the admission estimate gives way to the
/// tokens the provider reported, and the in-flight slot is given back.
fn settle(request: &Request) {
    if let Some(Caller::Key { permit, .. }) = &request.caller {
        if let Some(usage) = request.record.usage_so_far() {
            permit.reconcile(usage.prompt_tokens + usage.completion_tokens);
        }
        permit.release();
    }
}

/// The calls the request log keeps: the API, not the fast lane (the console's status poll
/// included) or stray paths.
fn is_logged_path(path: &str) -> bool {
    (path.starts_with("/v1/") || path.starts_with("/api/")) && path != "/api/status"
}

fn capped(bytes: &[u8], max: usize) -> Vec<u8> {
    bytes[..bytes.len().min(max)].to_vec()
}

/// The request-log row of an answered call, from the request and what its handler noted.
fn log_row(
    request: &Request,
    route: &str,
    status: u16,
    elapsed: Duration,
    queue_wait: Option<Duration>,
    note: &str,
    error_code: Option<String>,
) -> RequestRow {
    let facts = request.record.facts();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let queue = queue_wait.unwrap_or_default();
    let age = request.received.elapsed();
    RequestRow {
        request_id: request.request_id.clone(),
        ts_ms: crate::store::now_ms() - age.as_millis() as i64,
        method: request.method.clone(),
        route: route.to_string(),
        model: facts.model,
        provider: facts.provider,
        upstream_model: facts.upstream_model,
        attempts: facts.attempts,
        status,
        error_code: error_code.or(facts.stream_error.map(str::to_string)),
        total_ms: ms(elapsed),
        queue_ms: ms(queue),
        upstream_ms: ms(facts.upstream),
        overhead_ms: ms(elapsed.saturating_sub(queue).saturating_sub(facts.upstream)),
        ttft_ms: facts
            .first_token
            .map(|t| ms(t.saturating_duration_since(request.received))),
        prompt_tokens: facts.usage.map(|u| u.prompt_tokens),
        completion_tokens: facts.usage.map(|u| u.completion_tokens),
        cost_micros: None,
        cost_estimated: false,
        streamed: facts.streamed,
        client_left: facts.client_left || !note.is_empty(),
        key_id: request.caller.as_ref().and_then(Caller::key_id),
        request_body: None,
        response_body: None,
    }
}

/// Who the access log names: the peer, or behind a trusted proxy the client it forwarded for
/// (with the proxy as `via`).
fn client_of(state: &State, request: &Request) -> String {
    let forwarded: Vec<&str> = request
        .headers
        .iter()
        .filter(|(name, _)| name == "x-forwarded-for")
        .map(|(_, value)| value.as_str())
        .collect();
    let client = crate::http::forwarded::client(
        request.peer.ip(),
        &forwarded,
        &state.config.trusted_proxies,
    );
    if client == request.peer.ip() {
        request.peer.to_string()
    } else {
        format!("{client} via={}", request.peer)
    }
}

fn response_header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
}

/// The path as logged: bounded in length. httparse admits only visible ASCII in it.
fn loggable_path(path: &str) -> &str {
    match path.char_indices().nth(200) {
        Some((i, _)) => &path[..i],
        None => path,
    }
}

/// A running mean of how long a worker takes per request, for the `Retry-After` estimate.
/// Updates race benignly: a lost sample only slows the mean's movement.
pub(crate) struct ServiceTime {
    micros: AtomicU64,
}

impl ServiceTime {
    pub(crate) fn new() -> ServiceTime {
        ServiceTime {
            micros: AtomicU64::new(0),
        }
    }

    /// Folds in one request's service time (exponential moving average, weight 1/8).
    pub(crate) fn observe(&self, took: Duration) {
        let sample = took.as_micros().min(u64::MAX as u128) as u64;
        let old = self.micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample.max(1)
        } else {
            old - old / 8 + sample / 8
        };
        self.micros.store(new, Ordering::Relaxed);
    }

    pub(crate) fn mean(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }
}

/// Seconds until a slot is likely free: the queue ahead drains at `workers` requests per mean
/// service time. Whole seconds, at least 1.
pub(crate) fn retry_after_secs(depth: usize, mean: Duration, workers: usize) -> u64 {
    let drain = mean.as_secs_f64() * depth as f64 / workers.max(1) as f64;
    (drain.ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_follows_queue_depth_and_service_time() {
        assert_eq!(retry_after_secs(0, Duration::ZERO, 4), 1);
        assert_eq!(retry_after_secs(2, Duration::from_millis(500), 2), 1);
        assert_eq!(retry_after_secs(128, Duration::from_secs(2), 16), 16);
        assert_eq!(retry_after_secs(10, Duration::from_millis(1500), 4), 4);
    }

    #[test]
    fn service_time_moves_toward_new_samples() {
        let s = ServiceTime::new();
        s.observe(Duration::from_millis(800));
        assert_eq!(s.mean(), Duration::from_millis(800));
        for _ in 0..50 {
            s.observe(Duration::from_millis(100));
        }
        let mean = s.mean().as_millis();
        assert!((100..=110).contains(&mean), "{mean}");
    }

    #[test]
    fn long_paths_are_cut_for_the_log() {
        assert_eq!(loggable_path("/v1/models"), "/v1/models");
        assert_eq!(loggable_path(&"a".repeat(500)).len(), 200);
    }
}
