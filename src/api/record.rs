//! What a handler learns about a call while serving it (the model asked for, who answered,
//! tokens, when the first token went out), kept for the call's request-log row. The worker's
//! `respond` turns it into the row once the answer is written, stream included.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::providers::{Served, UpstreamClock, Usage};
use crate::spend::{Cost, Prices};

/// Shared by the handler and, for a stream, the relay that outlives it.
#[derive(Debug, Default)]
pub(crate) struct Record {
    facts: Mutex<Facts>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Facts {
    pub(crate) model: Option<String>,
    pub(crate) provider: Option<String>,
    pub(crate) upstream_model: Option<String>,
    pub(crate) attempts: u32,
    /// Time blocked on providers: calls, backoff and, for a stream, its relay.
    pub(crate) upstream: Duration,
    /// When the first event with content reached the client.
    pub(crate) first_token: Option<Instant>,
    pub(crate) usage: Option<Usage>,
    pub(crate) streamed: bool,
    pub(crate) client_left: bool,
    /// A stream that ended in an error event (its status was already 200).
    pub(crate) stream_error: Option<&'static str>,
    /// Part of `usage` was estimated by syncgate (a stream cut before its provider's usage).
    pub(crate) usage_estimated: bool,
    /// What the call cost, when its handler worked it out itself (a batch sums its calls');
    /// otherwise it is priced from `provider`, `upstream_model` and `usage` once answered.
    pub(crate) cost: Option<Cost>,
}

impl Facts {
    /// What the call cost: as its handler worked it out, else priced from who served it and
    /// the usage noted; `None` when no model answered with usage.
    pub(crate) fn cost(&self, prices: &Prices) -> Option<Cost> {
        if self.cost.is_some() {
            return self.cost;
        }
        let usage = self.usage?;
        let provider = self.provider.as_deref()?;
        let model = self.upstream_model.as_deref()?;
        Some(Cost::of(
            prices,
            provider,
            model,
            usage,
            self.usage_estimated,
        ))
    }
}

impl Record {
    pub(crate) fn note(&self, f: impl FnOnce(&mut Facts)) {
        f(&mut self.lock());
    }

    /// Reads what was noted, without copying the rest.
    pub(crate) fn note_read<T>(&self, f: impl FnOnce(&Facts) -> T) -> T {
        f(&self.lock())
    }

    /// The model the client asked for.
    pub(crate) fn model(&self, model: &str) {
        self.note(|f| f.model = Some(model.to_string()));
    }

    /// Who answered, in how many attempts, and the time blocked on them so far.
    pub(crate) fn served(&self, served: &Served, clock: UpstreamClock) {
        self.note(|f| {
            f.provider = Some(served.provider.clone());
            f.upstream_model = Some(served.upstream_model.clone());
            f.attempts = served.attempts;
            f.upstream = clock.blocked;
        });
    }

    pub(crate) fn usage(&self, usage: Usage) {
        self.note(|f| f.usage = Some(usage));
    }

    /// Marks the first token sent, once.
    pub(crate) fn first_token(&self) {
        self.note(|f| {
            f.first_token.get_or_insert_with(Instant::now);
        });
    }

    /// What the call cost ([`Facts::cost`]).
    pub(crate) fn cost(&self, prices: &Prices) -> Option<Cost> {
        self.lock().cost(prices)
    }

    /// The usage noted so far (without copying the rest).
    pub(crate) fn usage_so_far(&self) -> Option<Usage> {
        self.lock().usage
    }

    pub(crate) fn facts(&self) -> Facts {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
