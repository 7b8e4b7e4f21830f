//! The tokens one call used, as providers report them: a plain value shared by the providers,
//! the handlers, the store and the metrics, so that none of those lower floors has to reach up
//! into `providers` for it.

use serde_json::Value;

/// Prompt and completion tokens of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// Of the prompt tokens, those the provider served from its prompt cache
    /// (`prompt_tokens_details.cached_tokens`), which some price lower.
    pub(crate) cached_tokens: u64,
}

impl Usage {
    pub(crate) fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// OpenAI's `usage` object, when present.
    pub(crate) fn from_json(usage: &Value) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: usage.get("prompt_tokens")?.as_u64()?,
            completion_tokens: usage
                .get("completion_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            cached_tokens: usage
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        })
    }
}
