//! OpenAI-compatible providers (OpenAI, xAI, Groq, Mistral, Ollama, vLLM, …): one blocking
//! `ureq::Agent` per provider with every timeout set, the wire details (URL, auth, error
//! bodies), and the pump that turns a streamed body into server-sent events.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use ureq::http::Response;
use ureq::unversioned::transport::{Connector, DefaultConnector};
use ureq::{Body, BodyReader};

use super::cancel::{read_cancellably, Cancel, Cancellable};
use super::resolve::CachingResolver;
use super::ProviderError;
use crate::config::Timeouts;

/// Largest non-streamed answer we read from a provider.
const MAX_REPLY_BYTES: u64 = 64 * 1024 * 1024;
/// Per-connection buffers of the agent, held by every pooled connection. ureq's defaults are
/// 128 KiB each way; at 1,000 connections 64 + 16 KiB were still ~80 MB. A response head must
/// fit the input (providers send 1–4 KiB; a larger one fails the call with a clear error) and
/// the output holds our request head; bodies of any size pass through both in pieces.
const INPUT_BUFFER_BYTES: usize = 12 * 1024;
const OUTPUT_BUFFER_BYTES: usize = 4 * 1024;

pub(crate) struct OpenAi {
    provider: String,
    agent: ureq::Agent,
    base_url: String,
    /// `Bearer …`, read from the environment at start. Never logged: see the Debug impl.
    authorization: Option<String>,
    timeouts: Timeouts,
}

impl fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAi")
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl OpenAi {
    /// Builds the client; `Err` says why the provider cannot be used (its key variable unset,
    /// a bad proxy), which makes its models answer 503 `provider_unavailable`.
    pub(crate) fn new(
        provider: &str,
        base_url: &str,
        api_key_env: Option<&str>,
        proxy: Option<&str>,
        timeouts: Timeouts,
        max_concurrency: usize,
    ) -> Result<OpenAi, String> {
        let authorization = match api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(key) if !key.trim().is_empty() => Some(format!("Bearer {}", key.trim())),
                _ => return Err(format!("its key variable {var} is not set")),
            },
        };
        let proxy = match proxy {
            None => None,
            Some(p) => Some(ureq::Proxy::new(p).map_err(|e| format!("invalid proxy: {e}"))?),
        };
        let config = ureq::Agent::config_builder()
            // Error statuses come back as responses, bodies included: we map them ourselves.
            .http_status_as_error(false)
            // Never a proxy from the environment: only the one configured here.
            .proxy(proxy)
            .max_redirects(0)
            .timeout_connect(Some(timeouts.connect))
            .timeout_recv_response(Some(timeouts.first_byte))
            // Every read, head included, is bounded; a stream's idle gap is enforced by the
            // relay itself, this is the backstop.
            .timeout_per_read(Some(timeouts.first_byte.max(timeouts.idle)))
            .timeout_per_write(Some(timeouts.connect.max(Duration::from_secs(10))))
            .max_idle_connections(max_concurrency)
            .max_idle_connections_per_host(max_concurrency)
            .input_buffer_size(INPUT_BUFFER_BYTES)
            .output_buffer_size(OUTPUT_BUFFER_BYTES)
            .user_agent(concat!("syncgate/", env!("CARGO_PKG_VERSION")))
            .build();
        // ureq's own connector (TCP, TLS, proxy), each transport wrapped so that a stream's
        // reads can be cancelled: see cancel.rs.
        let connector = DefaultConnector::new().chain(Cancellable);
        Ok(OpenAi {
            provider: provider.to_string(),
            agent: ureq::Agent::with_parts(config, connector, CachingResolver::default()),
            base_url: base_url.to_string(),
            authorization,
            timeouts,
        })
    }

    pub(crate) fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// POSTs a JSON body to `{base_url}{path}` and returns once the response head arrived
    /// with a 2xx; any other status becomes a [`ProviderError::Status`] with its message.
    pub(crate) fn post(
        &self,
        path: &str,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Response<Body>, ProviderError> {
        let url = format!("{}{path}", self.base_url);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timeout("total"));
        }
        let mut request = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(left))
            .build()
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        if let Some(auth) = &self.authorization {
            request = request.header("authorization", auth);
        }
        let mut response = request.send(body).map_err(|e| self.map_error(e, true))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // The error body is small; a failure to read it leaves a generic message.
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        let (message, kind, code) = error_fields(&text, status);
        Err(ProviderError::Status {
            provider: self.provider.clone(),
            status,
            retry_after,
            message,
            kind,
            code,
        })
    }

    /// Reads a whole non-streamed answer and checks it is a JSON object without an error.
    pub(crate) fn read_json(
        &self,
        response: Response<Body>,
    ) -> Result<(Vec<u8>, Value), ProviderError> {
        let bytes = response
            .into_body()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| self.map_error(e, false))?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad_reply(format!("answer is not JSON: {e}")))?;
        if !value.is_object() || value.get("error").is_some_and(|e| !e.is_null()) {
            return Err(self.bad_reply("answer is an error or not a JSON object".to_string()));
        }
        Ok((bytes, value))
    }

    /// The streamed body as events, to be read by whichever thread relays them. The returned
    /// [`Cancel`] stops those reads (and so closes the upstream) when set or dropped.
    pub(crate) fn events(&self, response: Response<Body>) -> (Events, Cancel) {
        let (cancel, flag) = Cancel::new();
        let events = Events {
            reader: BufReader::new(response.into_body().into_reader()),
            flag,
        };
        (events, cancel)
    }

    fn timeout(&self, phase: &'static str) -> ProviderError {
        ProviderError::Timeout {
            provider: self.provider.clone(),
            phase,
        }
    }

    fn bad_reply(&self, detail: String) -> ProviderError {
        ProviderError::BadReply {
            provider: self.provider.clone(),
            detail,
        }
    }

    /// Maps a ureq error; `before_head` tells whether the request may not have been seen.
    fn map_error(&self, e: ureq::Error, before_head: bool) -> ProviderError {
        use ureq::Error as E;
        match e {
            E::Timeout(t) => self.timeout(match t {
                ureq::Timeout::Connect | ureq::Timeout::Resolve => "connect",
                ureq::Timeout::Global | ureq::Timeout::PerCall => "total",
                ureq::Timeout::RecvBody | ureq::Timeout::PerRead if !before_head => "idle",
                _ => "first_byte",
            }),
            E::HostNotFound | E::ConnectionFailed | E::Tls(_) => ProviderError::Connect {
                provider: self.provider.clone(),
                detail: e.to_string(),
            },
            E::Io(io) if before_head && is_connect_error(&io) => ProviderError::Connect {
                provider: self.provider.clone(),
                detail: io.to_string(),
            },
            other => self.bad_reply(other.to_string()),
        }
    }
}

fn is_connect_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionRefused | K::AddrNotAvailable | K::HostUnreachable | K::NetworkUnreachable
    )
}

/// The provider's `{"error": {"message", "type", "code"}}`, or a generic message.
fn error_fields(text: &str, status: u16) -> (String, Option<String>, Option<String>) {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let err = &v["error"];
    let field = |k: &str| match &err[k] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let message = field("message")
        .or_else(|| err.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("provider answered {status}"));
    (message, field("type"), field("code"))
}

/// A streamed body not yet read: read it with [`Events::pump`].
pub(crate) struct Events {
    reader: BufReader<BodyReader<'static>>,
    /// Set by the matching [`Cancel`]: the reads then fail within a slice.
    flag: Arc<AtomicBool>,
}

impl Events {
    /// Reads events on this thread, cancellably, handing each to `each` until it returns
    /// false or the body ends (the last event is then `End` or `Failed`).
    pub(crate) fn pump(self, each: impl FnMut(Event) -> bool) {
        read_cancellably(self.flag);
        pump(self.reader, each);
    }
}

/// One thing read from a streamed body.
#[derive(Debug)]
pub(crate) enum Event {
    /// One event's `data` (multi-line data joined with `\n`), e.g. a chunk's JSON or `[DONE]`.
    Data(String),
    /// The body ended (EOF) — whether after `[DONE]` is for the relay to judge.
    End,
    /// Reading failed: a reset, a timeout, a broken chunked encoding.
    Failed(String),
}

/// Reads SSE from the body until it ends or `each` says stop. Dropping the reader on return
/// closes the upstream connection (an unfinished body is never pooled).
fn pump(mut reader: impl BufRead, mut each: impl FnMut(Event) -> bool) {
    let mut data = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        let event = match reader.read_line(&mut line) {
            Ok(0) => Event::End,
            Err(e) => Event::Failed(e.to_string()),
            Ok(_) => {
                let text = line.trim_end_matches(['\r', '\n']);
                if text.is_empty() {
                    if data.is_empty() {
                        continue;
                    }
                    Event::Data(std::mem::take(&mut data))
                } else {
                    if let Some(value) = text.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    }
                    // Comments (":") and other fields (event, id, retry) carry nothing we relay.
                    continue;
                }
            }
        };
        let last = !matches!(event, Event::Data(_));
        if !each(event) || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pumped(input: &str) -> Vec<String> {
        let mut got = Vec::new();
        pump(input.as_bytes(), |e| {
            got.push(match e {
                Event::Data(d) => d,
                Event::End => "<end>".into(),
                Event::Failed(f) => format!("<failed {f}>"),
            });
            true
        });
        got
    }

    #[test]
    fn the_pump_splits_events_and_skips_comments() {
        let got = pumped(": keep-alive\n\ndata: {\"a\":1}\n\ndata:{\"b\":2}\r\n\r\nevent: x\ndata: l1\ndata: l2\n\ndata: [DONE]\n\n");
        assert_eq!(got, ["{\"a\":1}", "{\"b\":2}", "l1\nl2", "[DONE]", "<end>"]);
    }

    #[test]
    fn a_cut_stream_ends_without_done() {
        assert_eq!(
            pumped("data: {\"a\":1}\n\ndata: {\"b\""),
            ["{\"a\":1}", "<end>"]
        );
    }

    #[test]
    fn provider_error_bodies_keep_their_fields() {
        let (m, t, c) = error_fields(
            r#"{"error":{"message":"bad temperature","type":"invalid_request_error","code":"invalid_value"}}"#,
            400,
        );
        assert_eq!(m, "bad temperature");
        assert_eq!(t.as_deref(), Some("invalid_request_error"));
        assert_eq!(c.as_deref(), Some("invalid_value"));
        assert_eq!(error_fields("<html>", 502).0, "provider answered 502");
    }

    #[test]
    fn an_unset_key_variable_makes_the_provider_unavailable_and_keys_stay_out_of_debug() {
        let t = Timeouts {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            total: Duration::from_secs(1),
        };
        let err = OpenAi::new(
            "p",
            "http://x",
            Some("SYNCGATE_TEST_SURELY_UNSET_VAR"),
            None,
            t,
            4,
        )
        .unwrap_err();
        assert!(err.contains("SYNCGATE_TEST_SURELY_UNSET_VAR"), "{err}");
        std::env::set_var("SYNCGATE_TEST_CANARY_KEY", "sk-canary-123");
        let client = OpenAi::new(
            "p",
            "http://x",
            Some("SYNCGATE_TEST_CANARY_KEY"),
            None,
            t,
            4,
        )
        .unwrap();
        assert!(!format!("{client:?}").contains("sk-canary-123"));
    }
}
