//! Providers: what answers a model name. Today only the built-in `mock`; the types here are our
//! own, neutral ones (no provider's wire format), so every provider maps onto them.

pub(crate) mod mock;

/// The models syncgate serves, in the order `/v1/models` lists them.
pub(crate) fn model_names() -> &'static [&'static str] {
    &[mock::MODEL]
}

/// A chat request after validation.
#[derive(Debug, Clone)]
pub(crate) struct ChatRequest {
    pub(crate) model: String,
    pub(crate) messages: Vec<Message>,
    pub(crate) stream: bool,
    /// With `stream`, whether the client asked for a final usage chunk.
    pub(crate) include_usage: bool,
    /// Upper bound on completion tokens, when the client set one.
    pub(crate) max_tokens: Option<u64>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
}

impl Usage {
    pub(crate) fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}
