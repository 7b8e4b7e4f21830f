//! The built-in `mock` model: answers with no key and no network, deterministically, so a
//! first run, a local development server and the tests need nothing. Its latency is applied
//! where every provider's is, in `providers::call`, blocking the worker as a real call would.

use super::{ChatReply, ChatRequest, Usage};
use crate::knowledge::{cite, words};

/// The longest part of the last user message the reply repeats.
const ECHO_CHARS: usize = 1000;
/// Length of a mock embedding unless the request asks for `dimensions`.
pub(crate) const EMBEDDING_DIMENSIONS: usize = 16;

/// The answer, derived only from the request: the same request always gets the same reply.
pub(crate) fn reply(request: &ChatRequest) -> ChatReply {
    let last_user = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.text.as_str());
    // Asked to answer from sources (file_search): quote the first and cite it.
    let from_sources = request
        .messages
        .iter()
        .filter(|m| m.role == "system")
        .find_map(|m| cite::mock_answer(&m.text));
    let mut content = match last_user {
        _ if from_sources.is_some() => from_sources.unwrap_or_default(),
        Some(text) if !text.trim().is_empty() => {
            let echo: String = text.chars().take(ECHO_CHARS).collect();
            format!("This is the mock model. You said: {echo}")
        }
        _ => "This is the mock model. You said nothing.".to_string(),
    };
    let mut finish_reason = "stop";
    if let Some(max) = request.max_tokens {
        if estimate_tokens(&content) > max {
            // About four characters a token, as estimate_tokens counts them.
            content = content.chars().take((max * 4) as usize).collect();
            finish_reason = "length";
        }
    }
    let prompt_tokens = request
        .messages
        .iter()
        .map(|m| estimate_tokens(&m.text) + 3)
        .sum::<u64>()
        + 3;
    ChatReply {
        usage: Usage {
            prompt_tokens,
            completion_tokens: estimate_tokens(&content),
            cached_tokens: 0,
        },
        content,
        finish_reason,
    }
}

/// The usual rule of thumb for English text: about four characters a token.
pub(crate) fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// A deterministic unit vector for `text` from its words ([`words::embed`]): texts that share
/// words point the same way, as a real model's do, so file search over mock vectors finds what
/// a person would expect; `syncgate mock-upstream` embeds exactly the same.
pub(crate) fn embed(text: &str, dimensions: usize) -> Vec<f32> {
    words::embed(text, dimensions)
}

/// The reply cut into the pieces a stream sends: one word (with its leading space) each.
pub(crate) fn stream_pieces(content: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, c) in content.char_indices() {
        if c == ' ' && i > start {
            pieces.push(&content[start..i]);
            start = i;
        }
    }
    if start < content.len() {
        pieces.push(&content[start..]);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Message;

    fn req(texts: &[(&str, &str)], max_tokens: Option<u64>) -> ChatRequest {
        ChatRequest {
            model: "mock".into(),
            messages: texts
                .iter()
                .map(|(role, text)| Message {
                    role: role.to_string(),
                    text: text.to_string(),
                })
                .collect(),
            stream: false,
            include_usage: false,
            max_tokens,
            raw: serde_json::Map::new(),
        }
    }

    #[test]
    fn replies_are_deterministic_and_follow_the_last_user_message() {
        let a = reply(&req(
            &[
                ("user", "first"),
                ("assistant", "x"),
                ("user", "hello there"),
            ],
            None,
        ));
        assert_eq!(
            a,
            reply(&req(
                &[
                    ("user", "first"),
                    ("assistant", "x"),
                    ("user", "hello there")
                ],
                None
            ))
        );
        assert!(a.content.contains("hello there"), "{}", a.content);
        assert_ne!(a.content, reply(&req(&[("user", "other")], None)).content);
        assert_eq!(a.finish_reason, "stop");
        assert!(a.usage.prompt_tokens > 0 && a.usage.completion_tokens > 0);
    }

    #[test]
    fn max_tokens_cuts_the_reply() {
        let r = reply(&req(&[("user", "a long message that goes on")], Some(2)));
        assert_eq!(r.finish_reason, "length");
        assert!(r.usage.completion_tokens <= 2, "{r:?}");
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed("hello", 16);
        assert_eq!(a, embed("hello", 16));
        assert_ne!(a, embed("hullo", 16));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "{norm}");
        assert_eq!(embed("x", 3).len(), 3);
    }

    #[test]
    fn a_query_is_closer_to_a_document_sharing_its_words_than_to_an_unrelated_one() {
        let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let query = embed("how do otters sleep", 64);
        let document = embed("Otters sleep floating on their backs, holding hands.", 64);
        let unrelated = embed("The invoice is due at the end of the month.", 64);
        assert!(
            cosine(&query, &document) > cosine(&query, &unrelated) + 0.3,
            "{} vs {}",
            cosine(&query, &document),
            cosine(&query, &unrelated)
        );
    }

    #[test]
    fn pieces_rebuild_the_content() {
        let text = "This is the mock model. You said: héllo  wörld";
        assert_eq!(stream_pieces(text).concat(), text);
        assert!(stream_pieces(text).len() > 5);
        assert!(stream_pieces("").is_empty());
    }
}
