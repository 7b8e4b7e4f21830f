//! `POST /v1/chat/completions`: OpenAI's chat API. Validates the body into a [`ChatRequest`],
//! asks the model, and answers in OpenAI's shape, as one JSON body or as server-sent events.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::record::Record;
use super::{annotate, relay, ApiError};
use crate::http::{Request, Response};
use crate::providers::{
    self, mock, Answer, Call, ChatReply, ChatRequest, Message, Served, UpstreamClock, Usage,
};
use crate::server::State;

/// The chat main path: validate, route to the model's targets, answer as the provider did
/// (JSON passed through as received) or relay its stream event by event.
pub(crate) fn complete(state: &State, request: &Request) -> Result<Response, ApiError> {
    let chat = parse(&request.body)?;
    super::check_model(request, &chat.model)?;
    let (answer, served, clock) = ask(state, &request.record, &chat)?;
    let label = served.label();
    let id = format!("chatcmpl-{}", request.request_id);
    let response = match reply(state, &request.record, chat, served, id, answer) {
        Reply::Whole { bytes, .. } => Response::text(200, "application/json", bytes),
        Reply::Stream(response) => response,
    };
    Ok(annotate(response, request, label, clock, &state.metrics))
}

/// Sends a chat request to its model's targets (routing, retries, fallbacks), noting on the
/// call's record what was asked and who answered. Also the path of a conversation's turn and
/// of each call of a batch.
pub(crate) fn ask(
    state: &State,
    record: &Record,
    chat: &ChatRequest,
) -> Result<(Answer, Served, UpstreamClock), ApiError> {
    record.model(&chat.model);
    record.note(|f| f.streamed = chat.stream);
    let targets = state
        .providers
        .route(&chat.model)
        .ok_or_else(|| ApiError::ModelNotFound(chat.model.clone()))?;
    let mut clock = UpstreamClock::default();
    // A stream's usage chunk is asked for whether or not the client asked (the call's cost
    // needs it); the relay passes it on only to a client that asked.
    let with_usage = (chat.stream && !chat.include_usage).then(|| {
        let mut body = chat.raw.clone();
        body.insert("stream_options".into(), json!({"include_usage": true}));
        body
    });
    let call = Call {
        path: "/chat/completions",
        body: with_usage.as_ref().unwrap_or(&chat.raw),
        stream: chat.stream,
    };
    let (answer, served) = providers::call(targets, &call, &state.metrics, &mut clock)?;
    record.served(&served, clock);
    Ok((answer, served, clock))
}

/// What the client gets for a model's answer.
pub(crate) enum Reply {
    /// A whole completion: the JSON text to send and its value.
    Whole { bytes: Vec<u8>, value: Value },
    /// Server-sent events, relayed or made from the mock's reply as they are written.
    Stream(Response),
}

/// Turns a model's answer into what the client gets: the provider's JSON as received, the
/// built-in mock's completion (`id` is its id), or a stream. The tokens of a whole answer
/// are counted and noted on `record` here; a stream's as it ends.
pub(crate) fn reply(
    state: &State,
    record: &Arc<Record>,
    chat: ChatRequest,
    served: Served,
    id: String,
    answer: Answer,
) -> Reply {
    match answer {
        Answer::Mock => {
            let reply = mock_reply(state, record, &chat, &served);
            if chat.stream {
                Reply::Stream(stream_reply(id, chat, reply, Arc::clone(record), None))
            } else {
                let value = completion_json(&id, &chat.model, &reply);
                // As `Response::json` writes it.
                let mut bytes = serde_json::to_vec(&value).unwrap_or_default();
                bytes.push(b'\n');
                Reply::Whole { bytes, value }
            }
        }
        Answer::Json { bytes, value } => {
            json_usage(state, record, &served, &chat.model, &value);
            Reply::Whole { bytes, value }
        }
        Answer::Stream {
            events,
            cancel,
            timeouts,
        } => Reply::Stream(relay::response(relay::Relay {
            shape: Box::new(relay::Chat {
                usage: chat.include_usage,
            }),
            prompt_estimate: chat.prompt_estimate(),
            ..relay::Relay::new(
                state,
                chat.model,
                served,
                Arc::clone(record),
                (events, cancel, timeouts),
            )
        })),
    }
}

/// The built-in mock's reply, its tokens counted as a provider's would be.
pub(crate) fn mock_reply(
    state: &State,
    record: &Record,
    chat: &ChatRequest,
    served: &Served,
) -> ChatReply {
    let reply = mock::reply(chat);
    state
        .metrics
        .count_tokens(&served.provider, &chat.model, reply.usage);
    record.usage(reply.usage);
    reply
}

/// The usage a provider's JSON answer reports, counted and noted on the record.
pub(crate) fn json_usage(
    state: &State,
    record: &Record,
    served: &Served,
    model: &str,
    value: &Value,
) -> Option<Usage> {
    let usage = value.get("usage").and_then(Usage::from_json)?;
    state.metrics.count_tokens(&served.provider, model, usage);
    record.usage(usage);
    Some(usage)
}

/// Reads and checks the body; every error names the parameter at fault.
pub(crate) fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    parse_object(super::json_object(body)?)
}

/// Checks a chat request already read as a JSON object (one call of a batch).
pub(crate) fn parse_object(obj: Map<String, Value>) -> Result<ChatRequest, ApiError> {
    let model = match obj.get("model") {
        None | Some(Value::Null) => return Err(missing("model")),
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(invalid("model", "'model' must be a non-empty string")),
    };
    let messages = match obj.get("messages") {
        None | Some(Value::Null) => return Err(missing("messages")),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(invalid("messages", "'messages' must not be empty"))
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_message(i, item))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(invalid("messages", "'messages' must be an array")),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "'stream' must be a boolean")),
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => o
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        Some(_) => {
            return Err(invalid(
                "stream_options",
                "'stream_options' must be an object",
            ))
        }
    };
    let max_tokens = max_tokens(&obj)?;
    Ok(ChatRequest {
        model,
        messages,
        stream,
        include_usage,
        max_tokens,
        raw: obj,
    })
}

fn parse_message(i: usize, item: &Value) -> Result<Message, ApiError> {
    let Value::Object(m) = item else {
        return Err(invalid(
            &format!("messages[{i}]"),
            &format!("'messages[{i}]' must be an object"),
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r))
            if matches!(
                r.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool" | "function"
            ) =>
        {
            r.clone()
        }
        Some(_) => {
            return Err(invalid(
                &format!("messages[{i}].role"),
                &format!(
                    "'messages[{i}].role' must be one of system, developer, user, assistant, tool"
                ),
            ))
        }
        None => return Err(missing(&format!("messages[{i}].role"))),
    };
    let text = match m.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        // Multi-part content: the text parts, in order; other parts (images, audio) carry no text.
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(_) => {
            return Err(invalid(
                &format!("messages[{i}].content"),
                &format!("'messages[{i}].content' must be a string or an array of parts"),
            ))
        }
    };
    Ok(Message { role, text })
}

fn max_tokens(obj: &Map<String, Value>) -> Result<Option<u64>, ApiError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => return Ok(Some(n)),
                _ => return Err(invalid(key, &format!("'{key}' must be a positive integer"))),
            },
        }
    }
    Ok(None)
}

pub(crate) fn missing(param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("missing required parameter: '{param}'"),
        param: param.to_string(),
    }
}

pub(crate) fn invalid(param: &str, message: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.to_string(),
        param: param.to_string(),
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// OpenAI's `usage` object.
pub(crate) fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens(),
    })
}

/// A whole completion in OpenAI's `chat.completion` shape.
pub(crate) fn completion_json(id: &str, model: &str, reply: &ChatReply) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.content},
            "logprobs": null,
            "finish_reason": reply.finish_reason,
        }],
        "usage": usage_json(reply.usage),
    })
}

/// The built-in mock's reply as server-sent events: a role chunk, one chunk per word, a
/// finish chunk, the usage chunk when asked for, then `[DONE]`. Each event is written and
/// sent on its own. A `transcript` keeps what was sent, as a relayed stream's does.
pub(crate) fn stream_reply(
    id: String,
    chat: ChatRequest,
    reply: ChatReply,
    record: Arc<Record>,
    mut transcript: Option<relay::Transcript>,
) -> Response {
    let produce = Box::new(move |out: &mut crate::http::BodyStream<'_>| {
        if let Some(transcript) = &mut transcript {
            transcript.set_usage(reply.usage);
        }
        let sent = send_reply_events(out, &id, &chat, &reply, &record, transcript.as_mut());
        let ended = relay::end(
            out,
            &mut relay::Chat { usage: true },
            sent.map(|()| relay::End::Done),
            transcript,
        )?;
        // Only a transcript that could not be kept fails a stream made here.
        if let relay::End::Failed(code) = ended {
            record.note(|f| f.stream_error = Some(code));
        }
        Ok(())
    });
    Response::stream(200, "text/event-stream", produce)
        .with_header("cache-control", "no-cache".to_string())
        .with_header("x-accel-buffering", "no".to_string())
}

/// Every event of a mock stream but the final `[DONE]`; the content sent goes to `transcript`.
fn send_reply_events(
    out: &mut crate::http::BodyStream<'_>,
    id: &str,
    chat: &ChatRequest,
    reply: &ChatReply,
    record: &Record,
    mut transcript: Option<&mut relay::Transcript>,
) -> std::io::Result<()> {
    let created = unix_now();
    let chunk = |delta: Value, finish: Value| chunk_json(id, created, &chat.model, delta, finish);
    send_event(
        out,
        &chunk(json!({"role": "assistant", "content": ""}), Value::Null),
    )?;
    for piece in mock::stream_pieces(&reply.content) {
        send_event(out, &chunk(json!({"content": piece}), Value::Null))?;
        record.first_token();
        if let Some(transcript) = transcript.as_deref_mut() {
            transcript.push(piece);
        }
    }
    send_event(out, &chunk(json!({}), json!(reply.finish_reason)))?;
    if chat.include_usage {
        send_event(out, &usage_chunk_json(id, created, &chat.model, reply))?;
    }
    Ok(())
}

/// One `chat.completion.chunk` with a single choice carrying `delta` and `finish_reason`.
pub(crate) fn chunk_json(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish: Value,
) -> Value {
    json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    })
}

/// The final chunk a client asked for with `stream_options.include_usage`: no choices, usage.
pub(crate) fn usage_chunk_json(id: &str, created: u64, model: &str, reply: &ChatReply) -> Value {
    json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [], "usage": usage_json(reply.usage),
    })
}

/// Writes one SSE event, `data: <json>` and a blank line, as one piece of the stream.
pub(crate) fn send_event(
    out: &mut crate::http::BodyStream<'_>,
    event: &Value,
) -> std::io::Result<()> {
    let mut frame = b"data: ".to_vec();
    serde_json::to_writer(&mut frame, event)?;
    frame.extend_from_slice(b"\n\n");
    out.send(&frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_valid_body_parses() {
        let c = parse(
            br#"{"model":"mock","messages":[{"role":"user","content":"hi"}],"stream":true,
            "stream_options":{"include_usage":true},"max_tokens":5,"temperature":0.2}"#,
        )
        .unwrap();
        assert_eq!(c.model, "mock");
        assert_eq!(c.messages[0].text, "hi");
        assert!(c.stream && c.include_usage);
        assert_eq!(c.max_tokens, Some(5));
    }

    #[test]
    fn multi_part_content_keeps_its_text() {
        let c = parse(br#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]}]}"#)
        .unwrap();
        assert_eq!(c.messages[0].text, "a\nb");
    }

    #[test]
    fn errors_name_the_parameter() {
        let position = err("{\"model\": ").to_string();
        assert!(position.contains("line 1 column"), "{position}");
        assert!(matches!(err("[1]"), ApiError::InvalidRequest { .. }));
        for (body, param) in [
            (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (r#"{"model":"mock"}"#, "messages"),
            (r#"{"model":"mock","messages":[]}"#, "messages"),
            (r#"{"model":"mock","messages":"hi"}"#, "messages"),
            (
                r#"{"model":"mock","messages":[{"content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model":"mock","messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model":"mock","messages":[{"role":"user"}],"stream":"yes"}"#,
                "stream",
            ),
            (
                r#"{"model":"mock","messages":[{"role":"user"}],"max_tokens":-1}"#,
                "max_tokens",
            ),
        ] {
            match err(body) {
                ApiError::InvalidRequest { param: p, message } => {
                    assert_eq!(p, param, "{body}");
                    assert!(message.contains(param), "{message}");
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
