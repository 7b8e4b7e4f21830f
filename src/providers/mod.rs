//! Providers: what answers a model name. A model maps to ordered targets
//! (`provider/upstream-model`); [`call`] tries them in order with retries, fallbacks,
//! per-provider concurrency caps and a retry budget. The types here are our own, neutral ones.

mod cancel;
pub(crate) mod mock;
pub(crate) mod openai;
mod resolve;
mod retry;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::config::{Config, ProviderKind, Timeouts, BUILTIN_MOCK};
use crate::metrics::Metrics;
pub(crate) use crate::tokens::Usage;
pub(crate) use cancel::Cancel;
use openai::{Events, OpenAi};

/// A chat request after validation. `raw` is the client's whole body: everything syncgate
/// does not interpret (tools, temperature, response_format, …) reaches the provider unchanged.
#[derive(Debug, Clone)]
pub(crate) struct ChatRequest {
    pub(crate) model: String,
    pub(crate) messages: Vec<Message>,
    pub(crate) stream: bool,
    /// With `stream`, whether the client asked for a final usage chunk.
    pub(crate) include_usage: bool,
    /// Upper bound on completion tokens, when the client set one.
    pub(crate) max_tokens: Option<u64>,
    pub(crate) raw: Map<String, Value>,
}

impl ChatRequest {
    /// The prompt's tokens as admission estimates them: its characters ÷ 4, rounded up.
    pub(crate) fn prompt_estimate(&self) -> u64 {
        let chars: usize = self.messages.iter().map(|m| m.text.len()).sum();
        (chars as u64).div_ceil(4)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) role: String,
    /// The message's text (text parts of a multi-part content joined).
    pub(crate) text: String,
}

/// A finished completion.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatReply {
    pub(crate) content: String,
    /// `stop` or `length`.
    pub(crate) finish_reason: &'static str,
    pub(crate) usage: Usage,
}

/// Why a provider call failed. [`ProviderError::is_retryable`] and
/// [`ProviderError::fails_over`] decide what happens next; `ApiError` maps it to a status.
#[derive(Debug)]
pub(crate) enum ProviderError {
    /// The provider cannot be used: its key variable is unset, or its config is unusable.
    Unavailable { provider: String, why: String },
    /// The provider already has `max_concurrency` calls in flight.
    AtCapacity { provider: String },
    /// No connection could be made (refused, DNS, TLS).
    Connect { provider: String, detail: String },
    /// A deadline passed; `phase` is connect, first_byte, idle or total.
    Timeout {
        provider: String,
        phase: &'static str,
    },
    /// The provider answered with a non-2xx status.
    Status {
        provider: String,
        status: u16,
        retry_after: Option<Duration>,
        message: String,
        kind: Option<String>,
        code: Option<String>,
    },
    /// The answer could not be used: not JSON, an error inside a 200, cut short, reset.
    BadReply { provider: String, detail: String },
}

impl ProviderError {
    /// Worth another try on the same target: the failure is likely transient.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect { .. } => true,
            ProviderError::Status { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// The next target may do better; false for errors that are the client's (400, 404, 422…).
    pub(crate) fn fails_over(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => {
                !(400..500).contains(status) || matches!(status, 401 | 403 | 408 | 429)
            }
            _ => true,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The `outcome` label of `syncgate_upstream_requests_total`.
    fn outcome(&self) -> &'static str {
        match self {
            ProviderError::Unavailable { .. } => "unavailable",
            ProviderError::AtCapacity { .. } => "at_capacity",
            ProviderError::Connect { .. } => "connect_error",
            ProviderError::Timeout { .. } => "timeout",
            ProviderError::Status { status, .. } if *status < 500 => "client_error",
            ProviderError::Status { .. } => "server_error",
            ProviderError::BadReply { .. } => "bad_reply",
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderError::Unavailable { provider, why } => {
                write!(f, "provider {provider} is unavailable: {why}")
            }
            ProviderError::AtCapacity { provider } => {
                write!(f, "provider {provider} is at its concurrency limit")
            }
            ProviderError::Connect { provider, detail } => {
                write!(f, "cannot connect to provider {provider}: {detail}")
            }
            ProviderError::Timeout { provider, phase } => {
                write!(f, "provider {provider} timed out ({phase})")
            }
            ProviderError::Status {
                provider,
                status,
                message,
                ..
            } => write!(f, "provider {provider} answered {status}: {message}"),
            ProviderError::BadReply { provider, detail } => {
                write!(f, "provider {provider} sent an unusable answer: {detail}")
            }
        }
    }
}

enum Backend {
    OpenAi(OpenAi),
    Mock { latency: Duration },
    Unavailable(String),
}

/// One configured provider and its live state.
pub(crate) struct Provider {
    pub(crate) name: String,
    max_concurrency: usize,
    in_flight: AtomicUsize,
    budget: retry::RetryBudget,
    backend: Backend,
}

impl Provider {
    /// Takes a concurrency slot, held until the returned guard drops (after a stream ends).
    fn acquire(self: &Arc<Provider>, metrics: &Metrics) -> Option<Slot> {
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_concurrency).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| {
            metrics
                .upstream_in_flight
                .with_label_values(&[&self.name])
                .inc();
            Slot {
                provider: Arc::clone(self),
                gauge: metrics.upstream_in_flight.with_label_values(&[&self.name]),
            }
        })
    }
}

/// A held concurrency slot of a provider.
pub(crate) struct Slot {
    provider: Arc<Provider>,
    gauge: prometheus::IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.provider.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// Where a model's call may go: a provider and the model name it knows.
pub(crate) struct Destination {
    provider: Arc<Provider>,
    upstream_model: String,
}

/// Every provider and model, built once at start.
pub(crate) struct Providers {
    all: Vec<Arc<Provider>>,
    /// Each model name with its destinations, in the order they are tried.
    models: Vec<(String, Vec<Destination>)>,
}

impl Providers {
    /// Builds every provider. One whose key variable is unset is reported here and kept as
    /// unavailable: its models answer 503 `provider_unavailable` instead of the server failing.
    pub(crate) fn from_config(config: &Config) -> Providers {
        let builtin = Arc::new(Provider {
            name: BUILTIN_MOCK.to_string(),
            max_concurrency: usize::MAX,
            in_flight: AtomicUsize::new(0),
            budget: retry::RetryBudget::new(),
            backend: Backend::Mock {
                latency: config.mock_latency,
            },
        });
        let mut all = vec![Arc::clone(&builtin)];
        for p in &config.providers {
            let backend = match &p.kind {
                ProviderKind::Mock { latency } => Backend::Mock { latency: *latency },
                ProviderKind::OpenAi {
                    base_url,
                    api_key_env,
                    proxy,
                    timeouts,
                } => match OpenAi::new(
                    &p.name,
                    base_url,
                    api_key_env.as_deref(),
                    proxy.as_deref(),
                    *timeouts,
                    p.max_concurrency,
                ) {
                    Ok(client) => Backend::OpenAi(client),
                    Err(why) => {
                        log::warn!(
                            "provider {} is unavailable: {why}; its models answer 503",
                            p.name
                        );
                        Backend::Unavailable(why)
                    }
                },
            };
            all.push(Arc::new(Provider {
                name: p.name.clone(),
                max_concurrency: p.max_concurrency,
                in_flight: AtomicUsize::new(0),
                budget: retry::RetryBudget::new(),
                backend,
            }));
        }
        let find = |name: &str| all.iter().find(|p| p.name == name).cloned();
        let mut models = vec![(
            BUILTIN_MOCK.to_string(),
            vec![Destination {
                provider: builtin,
                upstream_model: BUILTIN_MOCK.to_string(),
            }],
        )];
        for m in &config.models {
            let targets = m
                .targets
                .iter()
                .filter_map(|t| {
                    find(&t.provider).map(|provider| Destination {
                        provider,
                        upstream_model: t.upstream_model.clone(),
                    })
                })
                .collect();
            models.push((m.name.clone(), targets));
        }
        Providers { all, models }
    }

    /// The model names clients may ask for, in configuration order (`mock` first).
    pub(crate) fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|(name, _)| name.as_str())
    }

    /// The targets of a model, in the order they are tried.
    pub(crate) fn route(&self, model: &str) -> Option<&[Destination]> {
        self.models
            .iter()
            .find(|(name, _)| name == model)
            .map(|(_, targets)| targets.as_slice())
    }

    /// Every provider's name and its cap on calls in flight (none for the built-in mock), for
    /// metrics that must show each one from the start.
    pub(crate) fn caps(&self) -> impl Iterator<Item = (&str, Option<usize>)> {
        self.all.iter().map(|p| {
            let cap = (p.max_concurrency != usize::MAX).then_some(p.max_concurrency);
            (p.name.as_str(), cap)
        })
    }
}

/// One call to make: which endpoint, with which body, streamed or not.
pub(crate) struct Call<'a> {
    /// The endpoint under the provider's base URL, e.g. `/chat/completions`.
    pub(crate) path: &'static str,
    pub(crate) body: &'a Map<String, Value>,
    pub(crate) stream: bool,
}

/// A provider's answer, ready for the API layer to send on.
pub(crate) enum Answer {
    /// An in-process mock answered (after its latency): the API layer builds the reply.
    Mock,
    /// A whole JSON answer: the bytes as received and their parse.
    Json { bytes: Vec<u8>, value: Value },
    /// A stream whose 200 head has arrived; its events are read by the relay. Dropping
    /// `cancel` stops the upstream read and closes the connection.
    Stream {
        events: Events,
        cancel: Cancel,
        timeouts: Timeouts,
    },
}

/// Which target served a call, holding its concurrency slot while the answer is sent.
pub(crate) struct Served {
    pub(crate) provider: String,
    pub(crate) upstream_model: String,
    pub(crate) attempts: u32,
    _slot: Slot,
}

impl Served {
    /// `provider/upstream-model` and the attempts it took, for the response headers.
    pub(crate) fn label(&self) -> (String, u32) {
        (
            format!("{}/{}", self.provider, self.upstream_model),
            self.attempts,
        )
    }
}

/// Time a request spent blocked on providers (calls, reads and backoff), so that what is
/// left of its total is syncgate's own overhead.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UpstreamClock {
    pub(crate) blocked: Duration,
}

/// Tries `targets` in order: each gets its first attempt and up to two retries (connect
/// errors, 429, 500, 502, 503, 504; backoff with full jitter or the provider's
/// `Retry-After`, never past the target's total deadline, within the retry budget). A target
/// at its concurrency cap, unavailable, or failing in a way the next might not, passes to the
/// next; a client error (400, 404, 422) ends the call at once.
pub(crate) fn call(
    targets: &[Destination],
    call: &Call<'_>,
    metrics: &Metrics,
    clock: &mut UpstreamClock,
) -> Result<(Answer, Served), ProviderError> {
    let mut last: Option<ProviderError> = None;
    for Destination {
        provider,
        upstream_model,
    } in targets
    {
        let name = provider.name.as_str();
        if let Backend::Unavailable(why) = &provider.backend {
            metrics.upstream_outcome(name, "unavailable");
            last = Some(ProviderError::Unavailable {
                provider: provider.name.clone(),
                why: why.clone(),
            });
            continue;
        }
        let Some(slot) = provider.acquire(metrics) else {
            metrics.upstream_outcome(name, "at_capacity");
            last = Some(ProviderError::AtCapacity {
                provider: provider.name.clone(),
            });
            continue;
        };
        let served = |attempts, slot| Served {
            provider: provider.name.clone(),
            upstream_model: upstream_model.clone(),
            attempts,
            _slot: slot,
        };
        let client = match &provider.backend {
            Backend::Mock { latency } => {
                if !latency.is_zero() {
                    std::thread::sleep(*latency);
                }
                clock.blocked += *latency;
                metrics.upstream_outcome(name, "ok");
                return Ok((Answer::Mock, served(1, slot)));
            }
            Backend::OpenAi(client) => client,
            Backend::Unavailable(_) => continue,
        };
        let mut body = call.body.clone();
        body.insert("model".into(), Value::String(upstream_model.clone()));
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let deadline = Instant::now() + client.timeouts().total;
        let mut attempts = 0;
        let error = loop {
            attempts += 1;
            let started = Instant::now();
            provider.budget.record_call(started);
            let result = client
                .post(call.path, &body, deadline)
                .and_then(|response| {
                    metrics.upstream_first_byte(name, started.elapsed());
                    if call.stream {
                        let (events, cancel) = client.events(response);
                        Ok(Answer::Stream {
                            events,
                            cancel,
                            timeouts: client.timeouts(),
                        })
                    } else {
                        let (bytes, value) = client.read_json(response)?;
                        Ok(Answer::Json { bytes, value })
                    }
                });
            let took = started.elapsed();
            clock.blocked += took;
            match result {
                Ok(answer) => {
                    metrics.upstream_outcome(name, "ok");
                    if !call.stream {
                        metrics.upstream_duration(name, took);
                    }
                    return Ok((answer, served(attempts, slot)));
                }
                Err(e) => {
                    metrics.upstream_outcome(name, e.outcome());
                    metrics.upstream_duration(name, took);
                    let now = Instant::now();
                    let wait = (e.is_retryable() && attempts <= retry::MAX_RETRIES_PER_TARGET)
                        .then(|| {
                            retry::wait_before_retry(attempts - 1, e.retry_after(), now, deadline)
                        })
                        .flatten();
                    match wait {
                        Some(wait) if provider.budget.try_retry(now) => {
                            log::info!(
                                "retrying provider {name} in {} ms after: {e}",
                                wait.as_millis()
                            );
                            metrics.upstream_retries.with_label_values(&[name]).inc();
                            std::thread::sleep(wait);
                            clock.blocked += wait;
                        }
                        _ => break e,
                    }
                }
            }
        };
        if !error.fails_over() {
            return Err(error);
        }
        log::info!("provider {name} failed ({error}); trying the next target if any");
        last = Some(error);
    }
    Err(last.unwrap_or_else(|| ProviderError::Unavailable {
        provider: "none".to_string(),
        why: "the model has no usable target".to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> ProviderError {
        ProviderError::Status {
            provider: "p".into(),
            status: code,
            retry_after: None,
            message: String::new(),
            kind: None,
            code: None,
        }
    }

    #[test]
    fn retry_and_failover_follow_the_status() {
        for code in [429, 500, 502, 503, 504] {
            assert!(status(code).is_retryable(), "{code}");
            assert!(status(code).fails_over(), "{code}");
        }
        for code in [400, 404, 422] {
            assert!(
                !status(code).is_retryable() && !status(code).fails_over(),
                "{code}"
            );
        }
        for code in [401, 403, 501, 529] {
            assert!(
                !status(code).is_retryable() && status(code).fails_over(),
                "{code}"
            );
        }
        let timeout = ProviderError::Timeout {
            provider: "p".into(),
            phase: "first_byte",
        };
        assert!(!timeout.is_retryable() && timeout.fails_over());
    }

    #[test]
    fn usage_reads_openai_shape() {
        let u = Usage::from_json(&serde_json::json!({"prompt_tokens": 3, "completion_tokens": 4}));
        assert_eq!(u.map(|u| u.total_tokens()), Some(7));
        assert_eq!(Usage::from_json(&Value::Null), None);
    }
}
