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
    /// What the calls this request made besides its own model call cost: a batch's calls, a
    /// search's embeddings. Added to the cost of `usage` on `provider`/`upstream_model`.
    pub(crate) other_costs: Option<Cost>,
}

impl Facts {
    /// What the request cost: its model call priced from who served it and the usage noted,
    /// plus its other calls' costs; `None` when no model answered with usage.
    pub(crate) fn cost(&self, prices: &Prices) -> Option<Cost> {
        let own = match (self.usage, &self.provider, &self.upstream_model) {
            (Some(usage), Some(provider), Some(model)) => Some(Cost::of(
                prices,
                provider,
                model,
                usage,
                self.usage_estimated,
            )),
            _ => None,
        };
        match (own, self.other_costs) {
            (Some(a), Some(b)) => Some(a.plus(b)),
            (a, b) => a.or(b),
        }
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

    /// Adds the cost of a call the request made besides its own model call.
    pub(crate) fn add_cost(&self, cost: Cost) {
        self.note(|f| f.other_costs = Some(f.other_costs.map_or(cost, |c| c.plus(cost))));
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
