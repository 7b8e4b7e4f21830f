//! The streaming relay: a provider's server-sent events go to the client one by one as they
//! arrive. It fails loudly: a stream the provider stalls, cuts, resets or garbles ends with a
//! final `data: {"error": …}` event and never a clean `[DONE]`; a client that goes away ends
//! the relay, and with it the upstream connection.

use std::io;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use prometheus::{HistogramVec, IntCounterVec};
use serde_json::{json, Value};

use crate::config::Timeouts;
use crate::http::presence;
use crate::http::{BodyStream, Response};
use crate::providers::openai::Event;
use crate::providers::{Cancel, Served, Usage};

/// Everything one relayed stream needs; it owns the provider's concurrency slot until done.
pub(crate) struct Relay {
    pub(crate) events: Receiver<Event>,
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
}

/// While the provider is silent, how often the relay looks whether the client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(250);

/// How a relayed stream ended, for the log and the metrics.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// `[DONE]` arrived and was passed on.
    Done,
    /// The stream failed upstream; the client got a final error event with this code.
    Failed(&'static str),
}

pub(crate) fn response(relay: Relay) -> Response {
    let produce = Box::new(move |out: &mut BodyStream<'_>| relay.run(out));
    Response::stream(200, "text/event-stream", produce)
        .with_header("cache-control", "no-cache".to_string())
        .with_header("x-accel-buffering", "no".to_string())
}

impl Relay {
    /// Relays until `[DONE]`, an upstream failure, or a write error (the client left). A write
    /// error returns `Err`; dropping `self.events` then makes the pump stop and close upstream.
    fn run(self, out: &mut BodyStream<'_>) -> io::Result<()> {
        let provider = self.served.provider.clone();
        let result = self.relay(out);
        // Whatever ended the relay, the upstream read stops now and its connection closes.
        self.cancel.cancel();
        self.upstream_duration
            .with_label_values(&[&provider])
            .observe(self.started.elapsed().as_secs_f64());
        match &result {
            Ok(End::Done) => {}
            Ok(End::Failed(code)) => {
                log::warn!("stream from provider {provider} ended early: {code}")
            }
            Err(e) => log::info!("client left a stream from provider {provider}: {e}"),
        }
        result.map(|_| ())
    }

    fn relay(&self, out: &mut BodyStream<'_>) -> io::Result<End> {
        // The first event must come within first_byte of the head; each next within idle.
        let mut deadline = self.started + self.timeouts.first_byte;
        let mut allowed = self.timeouts.first_byte;
        let mut last_write = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                let message = format!(
                    "provider {} sent nothing for {} ms",
                    self.served.provider,
                    allowed.as_millis()
                );
                return fail(out, "upstream_timeout", &message);
            }
            let next_heartbeat = (last_write + self.heartbeat).saturating_duration_since(now);
            let wait = next_heartbeat.min(CLIENT_CHECK).min(deadline - now);
            match self.events.recv_timeout(wait) {
                Ok(Event::Data(data)) if data.trim() == "[DONE]" => {
                    out.send(b"data: [DONE]\n\n")?;
                    return Ok(End::Done);
                }
                Ok(Event::Data(data)) => {
                    let Ok(event) = serde_json::from_str::<Value>(&data) else {
                        return fail(
                            out,
                            "bad_upstream_reply",
                            "provider sent an event that is not JSON",
                        );
                    };
                    if event.get("error").is_some_and(|e| !e.is_null()) {
                        // The provider's own error event: pass it on as the final event.
                        send_data(out, &data)?;
                        return Ok(End::Failed("upstream_error_event"));
                    }
                    if let Some(usage) = event.get("usage").and_then(Usage::from_json) {
                        self.count(usage);
                    }
                    send_data(out, &data)?;
                    allowed = self.timeouts.idle;
                    last_write = Instant::now();
                    deadline = Instant::now() + allowed;
                }
                // A close mid-body shows up as EOF or as a read error (a reset, a broken chunk),
                // depending on where it fell: either way the answer was cut short.
                Ok(Event::End) | Err(RecvTimeoutError::Disconnected) => {
                    return fail(
                        out,
                        "upstream_truncated",
                        "provider closed the stream before [DONE]",
                    );
                }
                Ok(Event::Failed(detail)) => {
                    let message = format!("provider's stream broke off before [DONE]: {detail}");
                    return fail(out, "upstream_truncated", &message);
                }
                // Nothing yet. A client that left is let go at once (its upstream with it); one
                // that stays hears a comment every heartbeat, so proxies see the stream alive.
                Err(RecvTimeoutError::Timeout) => {
                    if presence::has_left(out.socket()) {
                        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "client left"));
                    }
                    let now = Instant::now();
                    if now < deadline && now >= last_write + self.heartbeat {
                        out.send(b": keep-alive\n\n")?;
                        last_write = now;
                    }
                }
            }
        }
    }

    fn count(&self, usage: Usage) {
        let provider = self.served.provider.as_str();
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            self.tokens
                .with_label_values(&[provider, &self.model, kind])
                .inc_by(n);
        }
    }
}

fn send_data(out: &mut BodyStream<'_>, data: &str) -> io::Result<()> {
    let mut frame = Vec::with_capacity(data.len() + 8);
    frame.extend_from_slice(b"data: ");
    frame.extend_from_slice(data.as_bytes());
    frame.extend_from_slice(b"\n\n");
    out.send(&frame)
}

/// Ends the client's stream with an error event in OpenAI's shape (and no `[DONE]`).
fn fail(out: &mut BodyStream<'_>, code: &'static str, message: &str) -> io::Result<End> {
    let event = json!({"error": {"message": message, "type": "upstream_error", "code": code}});
    send_data(out, &event.to_string())?;
    Ok(End::Failed(code))
}
