//! `POST /v1/chat/completions` for the mock upstream: the built-in mock model's deterministic
//! reply (`providers::mock::reply`) in OpenAI's shapes, as one JSON body or as a stream of
//! server-sent events cut into `--stream-chunks` pieces and shaped by the request's fault.

use std::io;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::chat::{chunk_json, completion_json, unix_now, usage_chunk_json};
use crate::http::presence::{self, Presence};
use crate::http::{BodyStream, Response};
use crate::providers::{mock, ChatReply, ChatRequest};

/// What a streamed answer does beyond the plain stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFault {
    None,
    /// The role chunk and this many content chunks, then silence until the client leaves.
    StallAfter(usize),
    /// The role chunk and this many content chunks, then close: no finish chunk, no `[DONE]`,
    /// no end of the chunked body.
    TruncateAfter(usize),
    /// Every chunk's JSON cut in half; the SSE framing and the final `[DONE]` stay intact.
    Malformed,
    /// The role chunk and one content chunk, then an error event; the body ends cleanly
    /// without `[DONE]`.
    ErrorEvent,
}

/// The payload of the error a stream producer returns when it cut the stream on purpose; any
/// other error from writing a stream means the client left.
#[derive(Debug)]
pub(crate) struct Truncated;

impl std::fmt::Display for Truncated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream truncated on purpose (truncate-after)")
    }
}

impl std::error::Error for Truncated {}

/// Whether a stream's error is the deliberate cut of `truncate-after`.
pub(crate) fn is_truncation(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Truncated>())
}

/// The reply as one `chat.completion` body.
pub(crate) fn completion(id: &str, chat: &ChatRequest, reply: &ChatReply) -> Value {
    completion_json(id, &chat.model, reply)
}

/// Cuts `content` into exactly `n` pieces that concatenate back to it: whole words, spread
/// evenly, when there are at least `n` words; else characters spread evenly, so that short
/// replies still arrive in `n` chunks (empty ones only when there are fewer than `n` characters).
pub(crate) fn pieces(content: &str, n: usize) -> Vec<String> {
    let words = mock::stream_pieces(content);
    if words.len() >= n {
        let len = words.len();
        return (0..n)
            .map(|i| words[i * len / n..(i + 1) * len / n].concat())
            .collect();
    }
    let mut bounds: Vec<usize> = content.char_indices().map(|(i, _)| i).collect();
    let len = bounds.len();
    bounds.push(content.len());
    (0..n)
        .map(|i| content[bounds[i * len / n]..bounds[(i + 1) * len / n]].to_string())
        .collect()
}

/// Everything a streamed answer is made of, decided before the head is sent.
pub(crate) struct ChatStream {
    pub(crate) id: String,
    pub(crate) chat: ChatRequest,
    pub(crate) reply: ChatReply,
    pub(crate) chunks: usize,
    pub(crate) interval: Duration,
    pub(crate) fault: StreamFault,
}

/// How the frames of a stream end.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// End the chunked body normally.
    Complete,
    /// Stay silent until the client leaves.
    Stall,
    /// Close without ending the chunked body.
    Cut,
}

impl ChatStream {
    /// The SSE response: each event is one write, `interval` after the one before it.
    pub(crate) fn into_response(self) -> Response {
        let produce = Box::new(move |out: &mut BodyStream<'_>| {
            let (frames, ending) = self.frames();
            for (i, frame) in frames.iter().enumerate() {
                if i > 0 && presence::wait(out.socket(), self.interval) == Presence::Left {
                    return Err(io::ErrorKind::ConnectionAborted.into());
                }
                out.send(frame)?;
            }
            match ending {
                Ending::Complete => Ok(()),
                Ending::Stall => {
                    presence::hold(out.socket());
                    Err(io::ErrorKind::ConnectionAborted.into())
                }
                Ending::Cut => Err(io::Error::other(Truncated)),
            }
        });
        Response::stream(200, "text/event-stream", produce)
            .with_header("cache-control", "no-cache".to_string())
    }

    /// The events to send, already shaped by the fault, and what follows them.
    fn frames(&self) -> (Vec<Vec<u8>>, Ending) {
        let created = unix_now();
        let model = &self.chat.model;
        let chunk =
            |delta: Value, finish: Value| chunk_json(&self.id, created, model, delta, finish);
        let mut events = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        let content: Vec<Value> = pieces(&self.reply.content, self.chunks)
            .into_iter()
            .map(|piece| chunk(json!({"content": piece}), Value::Null))
            .collect();
        let (kept, ending) = match self.fault {
            StreamFault::StallAfter(k) => (k.min(content.len()), Ending::Stall),
            StreamFault::TruncateAfter(k) => (k.min(content.len()), Ending::Cut),
            StreamFault::ErrorEvent => (1.min(content.len()), Ending::Complete),
            StreamFault::None | StreamFault::Malformed => (content.len(), Ending::Complete),
        };
        let whole = kept == content.len() && ending == Ending::Complete;
        events.extend(content.into_iter().take(kept));
        if self.fault == StreamFault::ErrorEvent {
            let error = json!({"error": {
                "message": "mock fault: error-event in the middle of the stream",
                "type": "server_error",
                "code": "mock_error",
            }});
            let frames = events.iter().chain([&error]).map(event).collect();
            return (frames, Ending::Complete);
        }
        if whole {
            events.push(chunk(json!({}), json!(self.reply.finish_reason)));
            if self.chat.include_usage {
                events.push(usage_chunk_json(&self.id, created, model, &self.reply));
            }
        }
        let mut frames: Vec<Vec<u8>> = if self.fault == StreamFault::Malformed {
            events.iter().map(malformed_event).collect()
        } else {
            events.iter().map(event).collect()
        };
        if whole {
            frames.push(b"data: [DONE]\n\n".to_vec());
        }
        (frames, ending)
    }
}

/// One SSE event carrying `value`.
fn event(value: &Value) -> Vec<u8> {
    let mut frame = b"data: ".to_vec();
    frame.extend_from_slice(value.to_string().as_bytes());
    frame.extend_from_slice(b"\n\n");
    frame
}

/// One SSE event whose data is `value`'s JSON cut in half: well framed, not parseable.
fn malformed_event(value: &Value) -> Vec<u8> {
    let mut frame = b"data: ".to_vec();
    frame.extend_from_slice(half(&value.to_string()).as_bytes());
    frame.extend_from_slice(b"\n\n");
    frame
}

/// The first half of `text`, cut on a character boundary. Half of a JSON object is never
/// valid JSON: its closing brace is gone.
pub(crate) fn half(text: &str) -> &str {
    let mut cut = text.len() / 2;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Message;

    fn stream(fault: StreamFault, include_usage: bool) -> ChatStream {
        let chat = ChatRequest {
            model: "gpt-test".into(),
            messages: vec![Message {
                role: "user".into(),
                text: "hello there".into(),
            }],
            stream: true,
            include_usage,
            max_tokens: None,
            raw: serde_json::Map::new(),
        };
        let reply = mock::reply(&chat);
        ChatStream {
            id: "chatcmpl-x".into(),
            chat,
            reply,
            chunks: 4,
            interval: Duration::ZERO,
            fault,
        }
    }

    fn texts(frames: &[Vec<u8>]) -> Vec<String> {
        frames
            .iter()
            .map(|f| String::from_utf8(f.clone()).unwrap())
            .collect()
    }

    #[test]
    fn pieces_are_exactly_n_and_rebuild_the_content() {
        let text = "This is the mock model. You said: héllo wörld";
        for n in [1, 2, 3, 9, 10, 16, 60] {
            let p = pieces(text, n);
            assert_eq!(p.len(), n);
            assert_eq!(p.concat(), text);
        }
        assert!(pieces(text, 3).iter().all(|p| !p.is_empty()));
        assert!(pieces(text, 16).iter().all(|p| !p.is_empty()));
        assert_eq!(pieces("ab", 3).concat(), "ab");
    }

    #[test]
    fn a_whole_stream_is_role_chunks_finish_usage_done() {
        let (frames, ending) = stream(StreamFault::None, true).frames();
        let t = texts(&frames);
        assert_eq!(ending, Ending::Complete);
        assert_eq!(t.len(), 1 + 4 + 1 + 1 + 1);
        assert!(t[0].contains("\"role\":\"assistant\""));
        assert!(t[5].contains("\"finish_reason\":\"stop\""));
        assert!(t[6].contains("\"usage\""));
        assert_eq!(t[7], "data: [DONE]\n\n");
        assert!(t
            .iter()
            .all(|e| e.contains("gpt-test") || e.contains("[DONE]")));
    }

    #[test]
    fn faults_shape_the_frames() {
        let (f, e) = stream(StreamFault::StallAfter(2), true).frames();
        assert_eq!((f.len(), e), (3, Ending::Stall));
        let (f, e) = stream(StreamFault::TruncateAfter(9), false).frames();
        assert_eq!((f.len(), e), (5, Ending::Cut));
        let t = texts(&stream(StreamFault::ErrorEvent, false).frames().0);
        assert_eq!(t.len(), 3);
        assert!(t[2].contains("mock_error") && !t.concat().contains("[DONE]"));
        let t = texts(&stream(StreamFault::Malformed, false).frames().0);
        assert_eq!(t.last().unwrap(), "data: [DONE]\n\n");
        for e in &t[..t.len() - 1] {
            let data = e.strip_prefix("data: ").unwrap().trim_end();
            assert!(serde_json::from_str::<Value>(data).is_err(), "{e}");
        }
    }
}
