//! The streaming relay: a provider's server-sent events go to the client one by one as they
//! arrive. It fails loudly: a stream the provider stalls, cuts, resets or garbles ends with a
//! final `data: {"error": …}` event and never a clean `[DONE]`; a client that goes away ends
//! the relay, and with it the upstream connection. A relay may carry a [`Transcript`]: the
//! text it relayed is then kept (a conversation turn is stored) before `[DONE]` goes out, so a
//! client that saw `[DONE]` knows it is kept, and kept as incomplete when the stream failed.
//!
//! What the client reads is the relay's [`Shape`]: the provider's chat chunks as they came
//! ([`Chat`]), or each chunk translated as it arrives (`/v1/responses` writes the Responses
//! API's events).
//!
//! Two threads share the client's stream under one lock. A pump thread (scoped to the
//! relay) reads the provider and writes each event to the client as soon as it is read, so
//! an event costs one wake-up. The worker supervises: it sleeps until the stream ends or
//! something is due (a heartbeat, a look at whether the client left, the provider's deadline)
//! and acts on it. Handing events to the worker through a channel instead cost a second
//! wake-up per event and, at 1,000 concurrent streams on two cores, most streams stalled.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use prometheus::{HistogramVec, IntCounterVec};
use serde::de::IgnoredAny;
use serde_json::{json, Value};

use super::record::Record;
use super::ApiError;
use crate::config::Timeouts;
use crate::http::presence;
use crate::http::{BodyStream, Response};
use crate::providers::openai::{Event, Events};
use crate::providers::{Cancel, Served, Usage};
use crate::store::StoreError;

/// Everything one relayed stream needs; it owns the provider's concurrency slot until done.
pub(crate) struct Relay {
    pub(crate) events: Events,
    /// Stops the upstream read when the relay ends, however it ends (set on drop).
    pub(crate) cancel: Cancel,
    pub(crate) timeouts: Timeouts,
    /// Gap after which the client gets an SSE comment, so proxies and clients see life.
    pub(crate) heartbeat: Duration,
    /// The model the client asked for (the metrics label).
    pub(crate) model: String,
    pub(crate) served: Served,
    pub(crate) tokens: IntCounterVec,
    pub(crate) upstream_duration: HistogramVec,
    /// When the provider's head arrived.
    pub(crate) started: Instant,
    /// The call's request-log facts: first token, usage, how the stream ended.
    pub(crate) record: Arc<Record>,
    /// Keeps the relayed text when the stream ends, if the caller wants it kept.
    pub(crate) transcript: Option<Transcript>,
    /// What the client reads for each chunk, at the end and on failure.
    pub(crate) shape: Box<dyn Shape>,
    /// The prompt's tokens as admission estimated them: the usage noted for a stream whose
    /// provider never reported its own (cut short, or silent about it), marked estimated.
    pub(crate) prompt_estimate: u64,
}

/// How a relayed stream is written to the client. Each method writes whole events.
pub(crate) trait Shape: Send {
    /// Before the provider's first chunk.
    fn begin(&mut self, _out: &mut BodyStream<'_>) -> io::Result<()> {
        Ok(())
    }

    /// One chunk from the provider, checked to be JSON and not an error.
    fn chunk(&mut self, out: &mut BodyStream<'_>, data: &str) -> io::Result<()>;

    /// The provider sent an error event (`error` is its `error` member): the stream's last.
    fn provider_error(
        &mut self,
        out: &mut BodyStream<'_>,
        data: &str,
        error: &Value,
    ) -> io::Result<()>;

    /// Every chunk was relayed: the stream's last words.
    fn done(&mut self, out: &mut BodyStream<'_>) -> io::Result<()>;

    /// The stream failed here (the provider stalled, cut or garbled it; what it relayed could
    /// not be kept): the final event. `error` is the failure in OpenAI's error shape.
    fn fail(&mut self, out: &mut BodyStream<'_>, error: &Value) -> io::Result<()>;
}

/// The chat completions shape: chunks as the provider sent them, then `[DONE]`; a failure
/// is a final `data: {"error": …}` event in OpenAI's shape, and no `[DONE]`. syncgate asks
/// every provider for its usage chunk; the client gets it only if it asked (`usage`).
pub(crate) struct Chat {
    pub(crate) usage: bool,
}

impl Shape for Chat {
    fn chunk(&mut self, out: &mut BodyStream<'_>, data: &str) -> io::Result<()> {
        if !self.usage && data.contains("\"usage\"") && is_usage_only(data) {
            return Ok(());
        }
        send_data(out, data)
    }

    fn provider_error(
        &mut self,
        out: &mut BodyStream<'_>,
        data: &str,
        _error: &Value,
    ) -> io::Result<()> {
        send_data(out, data)
    }

    fn done(&mut self, out: &mut BodyStream<'_>) -> io::Result<()> {
        out.send(b"data: [DONE]\n\n")
    }

    fn fail(&mut self, out: &mut BodyStream<'_>, error: &Value) -> io::Result<()> {
        send_data(out, &error.to_string())
    }
}

impl Relay {
    /// A relay of a provider's stream for a call to `model`, with the server's heartbeat and
    /// metrics, keeping nothing (set `transcript` to keep the text).
    pub(crate) fn new(
        state: &crate::server::State,
        model: String,
        served: Served,
        record: Arc<Record>,
        (events, cancel, timeouts): (Events, Cancel, Timeouts),
    ) -> Relay {
        Relay {
            events,
            cancel,
            timeouts,
            heartbeat: state.config.heartbeat,
            model,
            served,
            tokens: state.metrics.tokens.clone(),
            upstream_duration: state.metrics.upstream_duration.clone(),
            started: Instant::now(),
            record,
            transcript: None,
            shape: Box::new(Chat { usage: true }),
            prompt_estimate: 0,
        }
    }
}

/// A stream's text as it went to the client, and what keeps it once the stream ends.
pub(crate) struct Transcript {
    text: String,
    usage: Option<Usage>,
    keep: Keep,
}

/// Keeps what a stream relayed (a conversation stores its turn); called once, when it ends.
pub(crate) type Keep = Box<dyn FnOnce(Relayed) -> Result<(), StoreError> + Send>;

/// What a stream relayed, when it ended.
#[derive(Debug)]
pub(crate) struct Relayed {
    /// The content deltas, concatenated.
    pub(crate) text: String,
    /// Whether the stream arrived whole (its `[DONE]` came); else it was cut short.
    pub(crate) complete: bool,
    /// The usage the stream reported, if it did.
    pub(crate) usage: Option<Usage>,
}

/// While the provider is silent, how often the relay looks whether the client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(250);
/// Stack of a pump thread: reading lines, checking each event is JSON (serde_json stops at
/// 128 levels of nesting), writing. Only touched pages become resident.
const PUMP_STACK_BYTES: usize = 256 * 1024;

/// How a stream ended, for the log and the metrics.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Every event was sent (a relayed stream's `[DONE]` arrived); [`end`] sends `[DONE]`.
    Done,
    /// The stream failed upstream, or its transcript could not be kept; the client got a
    /// final error event with this code instead of `[DONE]`.
    Failed(&'static str),
}

/// What the pump and the supervising worker share, under one lock.
struct Shared<'o, 'b> {
    out: &'o mut BodyStream<'b>,
    /// How the pump ended the stream, for the supervisor to take.
    end: Option<io::Result<End>>,
    /// Set by the supervisor when it returns: the pump writes nothing more.
    closed: bool,
    /// Until when the next event may come, and what that allowance was (for the message).
    deadline: Instant,
    allowed: Duration,
    last_write: Instant,
    /// Whether an event from the provider has reached the client yet.
    sent_any: bool,
    transcript: Option<Transcript>,
    shape: Box<dyn Shape>,
}

pub(crate) fn response(relay: Relay) -> Response {
    let produce = Box::new(move |out: &mut BodyStream<'_>| relay.run(out));
    Response::stream(200, "text/event-stream", produce)
        .with_header("cache-control", "no-cache".to_string())
        .with_header("x-accel-buffering", "no".to_string())
}

impl Relay {
    /// Relays until `[DONE]`, an upstream failure, or a write error (the client left). A write
    /// error returns `Err`; the upstream read is cancelled and its connection closed.
    fn run(self, out: &mut BodyStream<'_>) -> io::Result<()> {
        let Relay {
            events,
            cancel,
            timeouts,
            heartbeat,
            model,
            served,
            tokens,
            upstream_duration,
            started,
            record,
            transcript,
            mut shape,
            prompt_estimate,
        } = self;
        shape.begin(out)?;
        let counter = Counter {
            tokens,
            provider: served.provider.clone(),
            model,
            record: Arc::clone(&record),
            chunks: AtomicU64::new(0),
        };
        let shared = Mutex::new(Shared {
            out,
            end: None,
            closed: false,
            // The first event must come within first_byte of the head; each next within idle.
            deadline: started + timeouts.first_byte,
            allowed: timeouts.first_byte,
            last_write: Instant::now(),
            sent_any: false,
            transcript,
            shape,
        });
        let changed = Condvar::new();
        let result = thread::scope(|scope| {
            let pumping = thread::Builder::new()
                .name("sg-pump".into())
                .stack_size(PUMP_STACK_BYTES)
                .spawn_scoped(scope, || {
                    // The pump's last event always ends the stream and wakes the supervisor.
                    events.pump(|event| on_event(&shared, &changed, &counter, timeouts, event));
                });
            let result = match pumping {
                Ok(_) => supervise(&shared, &changed, heartbeat, &served.provider),
                Err(e) => {
                    let message = format!("cannot start a stream reader: {e}");
                    let s = &mut *lock(&shared);
                    fail(s.out, s.shape.as_mut(), "internal_error", &message)
                }
            };
            // Whatever ended the relay, the upstream read stops now (within a read slice) and
            // its connection closes; the scope then waits for the pump to return.
            cancel.cancel();
            result
        });
        let provider = &served.provider;
        let relayed = started.elapsed();
        upstream_duration
            .with_label_values(&[provider])
            .observe(relayed.as_secs_f64());
        let Shared {
            out,
            transcript,
            mut shape,
            ..
        } = shared.into_inner().unwrap_or_else(PoisonError::into_inner);
        let result = end(out, shape.as_mut(), result, transcript);
        let chunks = counter.chunks.load(Ordering::Relaxed);
        record.note(|f| {
            // A provider that never reported usage (the stream cut, or it does not tell):
            // what it produced is billed as estimated, about a token a chunk.
            if f.usage.is_none() {
                f.usage = Some(Usage {
                    prompt_tokens: prompt_estimate,
                    completion_tokens: chunks,
                    cached_tokens: 0,
                });
                f.usage_estimated = true;
            }
            f.upstream += relayed;
            match &result {
                Ok(End::Done) => {}
                Ok(End::Failed(code)) => f.stream_error = Some(code),
                Err(_) => f.client_left = true,
            }
        });
        match &result {
            Ok(End::Done) => {}
            Ok(End::Failed(code)) => {
                log::warn!("stream from provider {provider} ended without [DONE]: {code}")
            }
            Err(e) => log::info!("client left a stream from provider {provider}: {e}"),
        }
        result.map(|_| ())
    }
}

/// Tokens counted from the usage a stream reports; the first token's time; the chunks that
/// came (the estimate of what the provider produced when it never reports usage).
struct Counter {
    tokens: IntCounterVec,
    provider: String,
    model: String,
    record: Arc<Record>,
    chunks: AtomicU64,
}

/// The pump's handling of one event, writing to the client under the lock. Returns whether
/// to read on.
fn on_event(
    shared: &Mutex<Shared<'_, '_>>,
    changed: &Condvar,
    counter: &Counter,
    timeouts: Timeouts,
    event: Event,
) -> bool {
    let mut guard = lock(shared);
    let s = &mut *guard;
    if s.closed || s.end.is_some() {
        return false;
    }
    let end = match event {
        // Passed on by `end`, once the transcript (if any) is kept.
        Event::Data(data) if data.trim() == "[DONE]" => Some(Ok(End::Done)),
        Event::Data(data) => relay_data(s, counter, timeouts, &data),
        // A close mid-body shows up as EOF or as a read error (a reset, a broken chunk),
        // depending on where it fell: either way the answer was cut short.
        Event::End => Some(fail(
            s.out,
            s.shape.as_mut(),
            "upstream_truncated",
            "provider closed the stream before [DONE]",
        )),
        Event::Failed(detail) => {
            let message = format!("provider's stream broke off before [DONE]: {detail}");
            Some(fail(
                s.out,
                s.shape.as_mut(),
                "upstream_truncated",
                &message,
            ))
        }
    };
    match end {
        Some(end) => {
            s.end = Some(end);
            changed.notify_one();
            false
        }
        None => true,
    }
}

/// Passes one data event on; `Some` when it ended the stream.
fn relay_data(
    s: &mut Shared<'_, '_>,
    counter: &Counter,
    timeouts: Timeouts,
    data: &str,
) -> Option<io::Result<End>> {
    // Every event must be JSON; only one that names an error or usage is parsed into a
    // value (a check without building one is several times cheaper, and runs per event).
    if serde_json::from_str::<IgnoredAny>(data).is_err() {
        return Some(fail(
            s.out,
            s.shape.as_mut(),
            "bad_upstream_reply",
            "provider sent an event that is not JSON",
        ));
    }
    if data.contains("\"error\"") || data.contains("\"usage\"") {
        let event: Value = serde_json::from_str(data).unwrap_or_default();
        if let Some(error) = event.get("error").filter(|e| !e.is_null()) {
            // The provider's own error event: passed on as the final event.
            let sent = s.shape.provider_error(s.out, data, error);
            return Some(sent.map(|()| End::Failed("upstream_error_event")));
        }
        if let Some(usage) = event.get("usage").and_then(Usage::from_json) {
            counter.count(usage);
        }
    }
    counter.chunks.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = s.shape.chunk(s.out, data) {
        return Some(Err(e));
    }
    if let Some(transcript) = &mut s.transcript {
        transcript.add_event(data);
    }
    if !s.sent_any {
        s.sent_any = true;
        counter.record.first_token();
    }
    let now = Instant::now();
    s.allowed = timeouts.idle;
    s.last_write = now;
    s.deadline = now + timeouts.idle;
    None
}

/// The worker's part: sleeps until the pump ends the stream or something is due. A client
/// that left is let go at once (its upstream with it); one that stays hears a comment every
/// heartbeat while the provider is silent, so proxies see the stream alive; a provider that
/// misses its deadline gets the stream ended with an error event.
fn supervise(
    shared: &Mutex<Shared<'_, '_>>,
    changed: &Condvar,
    heartbeat: Duration,
    provider: &str,
) -> io::Result<End> {
    let (mut s, end) = watch(lock(shared), changed, heartbeat, provider);
    s.closed = true;
    end
}

/// The supervisor's loop, holding the lock except while it sleeps.
fn watch<'a, 'o, 'b>(
    mut s: MutexGuard<'a, Shared<'o, 'b>>,
    changed: &Condvar,
    heartbeat: Duration,
    provider: &str,
) -> (MutexGuard<'a, Shared<'o, 'b>>, io::Result<End>) {
    loop {
        if let Some(end) = s.end.take() {
            return (s, end);
        }
        let now = Instant::now();
        if now >= s.deadline {
            let message = format!(
                "provider {provider} sent nothing for {} ms",
                s.allowed.as_millis()
            );
            let end = {
                let s = &mut *s;
                fail(s.out, s.shape.as_mut(), "upstream_timeout", &message)
            };
            return (s, end);
        }
        let next_heartbeat = (s.last_write + heartbeat).saturating_duration_since(now);
        let wait = next_heartbeat.min(CLIENT_CHECK).min(s.deadline - now);
        let (guard, waited) = changed
            .wait_timeout(s, wait)
            .unwrap_or_else(PoisonError::into_inner);
        s = guard;
        if s.end.is_some() || !waited.timed_out() {
            continue;
        }
        if presence::has_left(s.out.socket()) {
            let left = io::Error::new(io::ErrorKind::BrokenPipe, "client left");
            return (s, Err(left));
        }
        let now = Instant::now();
        if now < s.deadline && now >= s.last_write + heartbeat {
            if let Err(e) = s.out.send(b": keep-alive\n\n") {
                return (s, Err(e));
            }
            s.last_write = now;
        }
    }
}

/// The shared state holds nothing a panic could leave half-written that matters more than
/// ending the stream.
fn lock<'a, 'o, 'b>(shared: &'a Mutex<Shared<'o, 'b>>) -> MutexGuard<'a, Shared<'o, 'b>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Counter {
    fn count(&self, usage: Usage) {
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            self.tokens
                .with_label_values(&[&self.provider, &self.model, kind])
                .inc_by(n);
        }
        self.record.usage(usage);
    }
}

/// Whether a chunk is the final usage chunk: usage, and no choices.
fn is_usage_only(data: &str) -> bool {
    serde_json::from_str::<Value>(data).is_ok_and(|v| {
        v.get("usage").is_some_and(|u| !u.is_null())
            && v["choices"].as_array().is_none_or(Vec::is_empty)
    })
}

/// Writes one `data:` event as it is.
pub(crate) fn send_data(out: &mut BodyStream<'_>, data: &str) -> io::Result<()> {
    let mut frame = Vec::with_capacity(data.len() + 8);
    frame.extend_from_slice(b"data: ");
    frame.extend_from_slice(data.as_bytes());
    frame.extend_from_slice(b"\n\n");
    out.send(&frame)
}

/// Ends a stream, relayed or made here, however it ended. One whose every event was sent gets
/// its shape's last words (`[DONE]` for chat), after its transcript (if any) is kept; if
/// keeping fails it gets a final error event instead. One cut short (an upstream failure,
/// the client gone) has its transcript kept as incomplete.
pub(crate) fn end(
    out: &mut BodyStream<'_>,
    shape: &mut dyn Shape,
    ended: io::Result<End>,
    transcript: Option<Transcript>,
) -> io::Result<End> {
    match (ended, transcript) {
        (Ok(End::Done), None) => shape.done(out).map(|()| End::Done),
        (Ok(End::Done), Some(transcript)) => match transcript.keep(true) {
            Ok(()) => shape.done(out).map(|()| End::Done),
            Err(e) => {
                let code = e.code();
                shape.fail(out, &ApiError::from(e).body())?;
                Ok(End::Failed(code))
            }
        },
        (ended, Some(transcript)) => {
            if let Err(e) = transcript.keep(false) {
                log::error!("cannot keep the text of a stream that was cut short: {e}");
            }
            ended
        }
        (ended, None) => ended,
    }
}

impl Transcript {
    pub(crate) fn new(keep: Keep) -> Transcript {
        Transcript {
            text: String::new(),
            usage: None,
            keep,
        }
    }

    /// Adds text a stream made here sent (the built-in mock's).
    pub(crate) fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    pub(crate) fn set_usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }

    /// Adds one relayed chunk's content (`choices[0].delta.content`) and its usage, if any.
    fn add_event(&mut self, data: &str) {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(text) = event
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            self.text.push_str(text);
        }
        if let Some(usage) = event.get("usage").and_then(Usage::from_json) {
            self.usage = Some(usage);
        }
    }

    fn keep(self, complete: bool) -> Result<(), StoreError> {
        (self.keep)(Relayed {
            text: self.text,
            complete,
            usage: self.usage,
        })
    }
}

/// Ends the client's stream with its shape's error event (and no `[DONE]`).
fn fail(
    out: &mut BodyStream<'_>,
    shape: &mut dyn Shape,
    code: &'static str,
    message: &str,
) -> io::Result<End> {
    let event = json!({"error": {"message": message, "type": "upstream_error", "code": code}});
    shape.fail(out, &event)?;
    Ok(End::Failed(code))
}
