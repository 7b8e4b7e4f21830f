//! `POST /v1/responses` (issue 16): the subset of OpenAI's Responses API that answers from
//! vector stores. With a `file_search` tool the flow is the knowledge base's own: search every
//! listed store side by side for the question, then ask the routed chat model with the
//! retrieved chunks numbered in its prompt, and turn its `[n]` markers into `file_citation`
//! annotations. The output is `[file_search_call, message]`, or `[message]` without the tool.
//! The model never picks a store: only those the request lists are searched. With `stream`,
//! the search runs and the model is asked before the first byte (a failure is still an
//! HTTP error); then the Responses API's server-sent events go out as the model's tokens
//! arrive: the chat stream is relayed through a [`relay::Shape`] that turns each chunk into
//! `response.output_text.delta` events and each citation marker, once whole, into a
//! `response.output_text.annotation.added`.

use std::io;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::chat::{self, invalid, missing};
use super::relay::{self, Relay, Shape};
use super::vector_stores::{self as vs, Hit, Search};
use super::{check_model, json_object, ApiError};
use crate::http::{BodyStream, Request, Response};
use crate::knowledge::cite::{self, Piece, Source};
use crate::providers::{mock, Answer, ChatRequest};
use crate::server::State;
use crate::store::{new_id, now_ms};
use crate::tokens::Usage;

/// Most stores one `file_search` tool may list (OpenAI's limit).
const MAX_STORES: usize = 2;
/// Results `file_search` keeps when the tool does not say.
const DEFAULT_RESULTS: usize = 10;

/// What a request asks.
struct Ask {
    model: String,
    instructions: Option<String>,
    /// The conversation, as chat messages (`role`, `content` text).
    messages: Vec<(String, String)>,
    tool: Option<FileSearch>,
    include_results: bool,
    stream: bool,
    tools_json: Value,
}

/// The `file_search` tool.
struct FileSearch {
    store_ids: Vec<String>,
    search: Search,
}

/// `POST /v1/responses`.
pub(crate) fn create(state: &State, request: &Request) -> Result<Response, ApiError> {
    let body = json_object(&request.body)?;
    let ask = parse(&body)?;
    request.record.model(&ask.model);
    check_model(request, &ask.model)?;
    let question = ask
        .messages
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .map(|(_, text)| text.clone())
        .ok_or_else(|| invalid("input", "'input' needs a user message"))?;
    let hits = match &ask.tool {
        None => Vec::new(),
        Some(tool) => search(state, request, tool, &question)?,
    };
    let chat_request = chat_request(&ask, &hits)?;
    let (answer, served, _) = chat::ask(state, &request.record, &chat_request)?;
    let search_call = ask
        .tool
        .is_some()
        .then(|| file_search_call(&question, &hits, ask.include_results));
    let mut events = Events::new(&ask, search_call, &hits);
    match answer {
        Answer::Stream {
            events: upstream,
            cancel,
            timeouts,
        } => {
            let record = Arc::clone(&request.record);
            let parts = (upstream, cancel, timeouts);
            let relay = Relay::new(state, ask.model.clone(), served, record, parts);
            Ok(relay::response(Relay {
                shape: Box::new(events),
                prompt_estimate: chat_request.prompt_estimate(),
                ..relay
            }))
        }
        Answer::Mock => {
            let reply = chat::mock_reply(state, &request.record, &chat_request, &served);
            if !ask.stream {
                events.text_whole(&reply.content, reply.usage);
                return Ok(Response::json(200, &events.completed()));
            }
            let record = Arc::clone(&request.record);
            Ok(event_stream(move |out| {
                events.begin(out)?;
                for piece in mock::stream_pieces(&reply.content) {
                    events.text(out, piece)?;
                    record.first_token();
                }
                events.usage = Some(reply.usage);
                events.done(out)
            }))
        }
        Answer::Json { value, .. } => {
            let usage = chat::json_usage(state, &request.record, &served, &ask.model, &value);
            let text = value["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let usage = usage.unwrap_or_default();
            if !ask.stream {
                events.text_whole(&text, usage);
                return Ok(Response::json(200, &events.completed()));
            }
            // A provider that answered a stream request whole: its answer as one delta.
            Ok(event_stream(move |out| {
                events.begin(out)?;
                events.text(out, &text)?;
                events.usage = Some(usage);
                events.done(out)
            }))
        }
    }
}

/// Server-sent events written by `produce`, as a worker sends a stream.
fn event_stream(
    produce: impl FnOnce(&mut BodyStream<'_>) -> io::Result<()> + Send + 'static,
) -> Response {
    Response::stream(200, "text/event-stream", Box::new(produce))
        .with_header("cache-control", "no-cache".to_string())
        .with_header("x-accel-buffering", "no".to_string())
}

/// Searches every listed store side by side for the question; hits merged best first.
fn search(
    state: &State,
    request: &Request,
    tool: &FileSearch,
    question: &str,
) -> Result<Vec<Hit>, ApiError> {
    let owner = super::files::owner(request);
    let stores = tool
        .store_ids
        .iter()
        .map(|id| {
            crate::store::vector_stores::get(&state.store, owner, id)?.ok_or_else(|| {
                ApiError::NotFound {
                    kind: "vector_store",
                    id: id.clone(),
                }
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let search = Search {
        queries: vec![question.to_string()],
        ..tool.search.clone()
    };
    let found: Vec<Result<Vec<Hit>, ApiError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = stores
            .iter()
            .map(|store| {
                let search = &search;
                let record = &request.record;
                scope.spawn(move || vs::run_search(state, store, search, record))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(ApiError::Internal)))
            .collect()
    });
    let mut hits = Vec::new();
    for f in found {
        hits.extend(f?);
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score));
    hits.truncate(tool.search.max_results);
    Ok(hits)
}

/// The chat request that asks the model, the sources in its system prompt. A stream asks
/// the provider for its usage chunk (the response's `usage` needs it).
fn chat_request(ask: &Ask, hits: &[Hit]) -> Result<ChatRequest, ApiError> {
    let mut messages = Vec::new();
    let system = if ask.tool.is_some() {
        let sources: Vec<Source> = hits
            .iter()
            .map(|h| Source {
                filename: h.filename.clone(),
                text: h.text.clone(),
            })
            .collect();
        Some(cite::system_prompt(ask.instructions.as_deref(), &sources))
    } else {
        ask.instructions.clone()
    };
    if let Some(system) = system {
        messages.push(json!({"role": "system", "content": system}));
    }
    for (role, text) in &ask.messages {
        messages.push(json!({"role": role, "content": text}));
    }
    let mut body = Map::new();
    body.insert("model".into(), Value::String(ask.model.clone()));
    body.insert("messages".into(), Value::Array(messages));
    if ask.stream {
        body.insert("stream".into(), Value::Bool(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    chat::parse_object(body)
}

/// The `file_search_call` output item.
fn file_search_call(question: &str, hits: &[Hit], include_results: bool) -> Value {
    let results = include_results.then(|| {
        hits.iter()
            .map(|h| {
                json!({"file_id": h.file_id, "filename": h.filename, "score": h.score,
                       "text": h.text, "attributes": h.attributes.clone().unwrap_or_else(|| json!({}))})
            })
            .collect::<Vec<_>>()
    });
    json!({
        "type": "file_search_call",
        "id": new_id("fs"),
        "status": "completed",
        "queries": [question],
        "results": results,
    })
}

/// The response object, before any output.
fn response_json(ask: &Ask) -> Value {
    json!({
        "id": new_id("resp"),
        "object": "response",
        "created_at": now_ms() / 1000,
        "status": "in_progress",
        "error": null,
        "incomplete_details": null,
        "instructions": ask.instructions,
        "max_output_tokens": null,
        "model": ask.model,
        "output": [],
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "store": false,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": ask.tools_json,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": null,
        "user": null,
        "metadata": {},
    })
}

/// One response as it is made: the answer's text read for citations as it arrives, and (when
/// streamed) the Responses API's server-sent events written as it goes. A whole answer is
/// the same reading done at once, so the two cannot disagree.
struct Events {
    response: Value,
    search_call: Option<Value>,
    message_id: String,
    /// Each hit's file id and filename, in the order the prompt numbers them.
    sources: Vec<(String, String)>,
    citations: cite::Reader,
    text: String,
    annotations: Vec<Value>,
    usage: Option<Usage>,
    sequence: u64,
}

impl Events {
    fn new(ask: &Ask, search_call: Option<Value>, hits: &[Hit]) -> Events {
        Events {
            response: response_json(ask),
            search_call,
            message_id: new_id("msg"),
            sources: hits
                .iter()
                .map(|h| (h.file_id.clone(), h.filename.clone()))
                .collect(),
            citations: cite::Reader::new(hits.len()),
            text: String::new(),
            annotations: Vec::new(),
            usage: None,
            sequence: 0,
        }
    }

    /// Where the message stands in `output`.
    fn message_index(&self) -> usize {
        usize::from(self.search_call.is_some())
    }

    /// A whole answer, read at once.
    fn text_whole(&mut self, answer: &str, usage: Usage) {
        let mut pieces = self.citations.push(answer);
        pieces.extend(self.citations.finish());
        for piece in pieces {
            self.take(&piece);
        }
        self.usage = Some(usage);
    }

    /// Keeps a piece of the answer; the annotation it made, if it was a citation.
    fn take(&mut self, piece: &Piece) -> Option<Value> {
        match piece {
            Piece::Text(t) => {
                self.text.push_str(t);
                None
            }
            Piece::Cite(c) => {
                let (file_id, filename) = &self.sources[c.source];
                let annotation = json!({"type": "file_citation", "file_id": file_id,
                                        "filename": filename, "index": c.index});
                self.annotations.push(annotation.clone());
                Some(annotation)
            }
        }
    }

    fn message(&self, status: &str) -> Value {
        json!({
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [self.part()],
        })
    }

    fn part(&self) -> Value {
        json!({"type": "output_text", "text": self.text, "annotations": self.annotations})
    }

    /// The response as it ends: `completed`, or `failed` with `error`.
    fn finished(&self, error: Option<&Value>) -> Value {
        let mut response = self.response.clone();
        let message_status = if error.is_some() {
            "incomplete"
        } else {
            "completed"
        };
        let mut output: Vec<Value> = self.search_call.iter().cloned().collect();
        output.push(self.message(message_status));
        response["output"] = Value::Array(output);
        response["usage"] = self.usage.map_or(Value::Null, usage_json);
        match error {
            None => response["status"] = json!("completed"),
            Some(error) => {
                response["status"] = json!("failed");
                response["error"] = json!({"code": error["code"], "message": error["message"]});
            }
        }
        response
    }

    fn completed(&self) -> Value {
        self.finished(None)
    }

    /// Writes one event: `event: <type>` and its JSON, numbered.
    fn emit(&mut self, out: &mut BodyStream<'_>, kind: &str, mut data: Value) -> io::Result<()> {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        let mut frame = format!("event: {kind}\ndata: ").into_bytes();
        serde_json::to_writer(&mut frame, &data)?;
        frame.extend_from_slice(b"\n\n");
        out.send(&frame)
    }

    /// The message's ids for its events.
    fn at(&self) -> Value {
        json!({"item_id": self.message_id, "output_index": self.message_index(), "content_index": 0})
    }

    /// Everything before the model's first token: the response created, the search done,
    /// the message begun.
    fn begin(&mut self, out: &mut BodyStream<'_>) -> io::Result<()> {
        let started = self.response.clone();
        self.emit(out, "response.created", json!({"response": started}))?;
        self.emit(out, "response.in_progress", json!({"response": started}))?;
        if let Some(call) = self.search_call.clone() {
            let mut pending = call.clone();
            pending["status"] = json!("in_progress");
            let item = json!({"output_index": 0, "item": pending});
            self.emit(out, "response.output_item.added", item)?;
            for step in ["in_progress", "searching", "completed"] {
                let kind = format!("response.file_search_call.{step}");
                self.emit(
                    out,
                    &kind,
                    json!({"output_index": 0, "item_id": call["id"]}),
                )?;
            }
            let done = json!({"output_index": 0, "item": call});
            self.emit(out, "response.output_item.done", done)?;
        }
        let mut pending = self.message("in_progress");
        pending["content"] = json!([]);
        let item = json!({"output_index": self.message_index(), "item": pending});
        self.emit(out, "response.output_item.added", item)?;
        let mut added = self.at();
        added["part"] = json!({"type": "output_text", "text": "", "annotations": []});
        self.emit(out, "response.content_part.added", added)
    }

    /// A piece of the model's text as it arrives: what of it is settled goes out as deltas
    /// and annotations.
    fn text(&mut self, out: &mut BodyStream<'_>, piece: &str) -> io::Result<()> {
        let pieces = self.citations.push(piece);
        self.send(out, &pieces)
    }

    fn send(&mut self, out: &mut BodyStream<'_>, pieces: &[Piece]) -> io::Result<()> {
        for piece in pieces {
            let mut event = self.at();
            match (piece, self.take(piece)) {
                (Piece::Text(delta), _) => {
                    event["delta"] = json!(delta);
                    self.emit(out, "response.output_text.delta", event)?;
                }
                (Piece::Cite(_), Some(annotation)) => {
                    event["annotation_index"] = json!(self.annotations.len() - 1);
                    event["annotation"] = annotation;
                    self.emit(out, "response.output_text.annotation.added", event)?;
                }
                (Piece::Cite(_), None) => {}
            }
        }
        Ok(())
    }

    /// The answer is whole: what was held, then the message and the response completed.
    fn done(&mut self, out: &mut BodyStream<'_>) -> io::Result<()> {
        let rest = self.citations.finish();
        self.send(out, &rest)?;
        let mut text_done = self.at();
        text_done["text"] = json!(self.text);
        self.emit(out, "response.output_text.done", text_done)?;
        let mut part_done = self.at();
        part_done["part"] = self.part();
        self.emit(out, "response.content_part.done", part_done)?;
        let item = json!({"output_index": self.message_index(), "item": self.message("completed")});
        self.emit(out, "response.output_item.done", item)?;
        let response = self.completed();
        self.emit(out, "response.completed", json!({"response": response}))
    }

    /// The answer broke off: the response failed, with what had arrived.
    fn failed(&mut self, out: &mut BodyStream<'_>, error: &Value) -> io::Result<()> {
        let response = self.finished(Some(error));
        self.emit(out, "response.failed", json!({"response": response}))
    }
}

impl Shape for Events {
    fn begin(&mut self, out: &mut BodyStream<'_>) -> io::Result<()> {
        Events::begin(self, out)
    }

    fn chunk(&mut self, out: &mut BodyStream<'_>, data: &str) -> io::Result<()> {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return Ok(());
        };
        if let Some(usage) = chunk.get("usage").and_then(Usage::from_json) {
            self.usage = Some(usage);
        }
        match chunk
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            Some(piece) if !piece.is_empty() => self.text(out, piece),
            _ => Ok(()),
        }
    }

    fn provider_error(
        &mut self,
        out: &mut BodyStream<'_>,
        _data: &str,
        error: &Value,
    ) -> io::Result<()> {
        let mut error = error.clone();
        if error["code"].is_null() {
            error["code"] = json!("upstream_error_event");
        }
        self.failed(out, &error)
    }

    fn done(&mut self, out: &mut BodyStream<'_>) -> io::Result<()> {
        Events::done(self, out)
    }

    fn fail(&mut self, out: &mut BodyStream<'_>, error: &Value) -> io::Result<()> {
        self.failed(out, &error["error"])
    }
}

/// The Responses API's usage object.
fn usage_json(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens(),
    })
}

fn parse(body: &Map<String, Value>) -> Result<Ask, ApiError> {
    const KNOWN: [&str; 12] = [
        "model",
        "input",
        "instructions",
        "tools",
        "include",
        "stream",
        "tool_choice",
        "metadata",
        "store",
        "temperature",
        "parallel_tool_calls",
        "user",
    ];
    if let Some(k) = body.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(invalid(
            k,
            &format!("'{k}' is not supported by syncgate's /v1/responses (docs/api.md)"),
        ));
    }
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        None | Some(Value::Null) => return Err(missing("model")),
        Some(_) => return Err(invalid("model", "'model' must be a non-empty string")),
    };
    let instructions = match body.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("instructions", "'instructions' must be a string")),
    };
    let messages = input(body.get("input"))?;
    let (tool, tools_json) = tools(body.get("tools"))?;
    let include_results = match body.get("include") {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => {
            let mut results = false;
            for item in items {
                match item.as_str() {
                    Some("file_search_call.results") => results = true,
                    Some(_) => {}
                    None => return Err(invalid("include", "'include' must be a list of strings")),
                }
            }
            results
        }
        Some(_) => return Err(invalid("include", "'include' must be a list of strings")),
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "'stream' must be a boolean")),
    };
    Ok(Ask {
        model,
        instructions,
        messages,
        tool,
        include_results,
        stream,
        tools_json,
    })
}

/// `input`: a string (one user message) or a list of messages whose `content` is a string or
/// a list of `input_text` parts.
fn input(value: Option<&Value>) -> Result<Vec<(String, String)>, ApiError> {
    match value {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(vec![("user".into(), s.clone())]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| {
                let role = item["role"]
                    .as_str()
                    .filter(|r| ["user", "assistant", "system", "developer"].contains(r));
                let role = role.ok_or_else(|| {
                    invalid(
                        "input",
                        "each input message needs a role: user, assistant, system or developer",
                    )
                })?;
                let text = match &item["content"] {
                    Value::String(s) => s.clone(),
                    Value::Array(parts) => parts
                        .iter()
                        .filter_map(|p| p["text"].as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    _ => {
                        return Err(invalid(
                            "input",
                            "a message's content must be a string or a list of text parts",
                        ))
                    }
                };
                let role = if role == "developer" { "system" } else { role };
                Ok((role.to_string(), text))
            })
            .collect(),
        None | Some(Value::Null) => Err(missing("input")),
        Some(_) => Err(invalid(
            "input",
            "'input' must be a non-empty string or a list of messages",
        )),
    }
}

/// `tools`: at most one `file_search`; any other tool type is refused.
fn tools(value: Option<&Value>) -> Result<(Option<FileSearch>, Value), ApiError> {
    let Some(Value::Array(items)) = value.filter(|v| !v.is_null()) else {
        return match value {
            None | Some(Value::Null) => Ok((None, json!([]))),
            Some(_) => Err(invalid("tools", "'tools' must be a list")),
        };
    };
    let mut found = None;
    for item in items {
        match item["type"].as_str() {
            Some("file_search") if found.is_none() => {
                let ids: Vec<String> = item["vector_store_ids"]
                    .as_array()
                    .map(|ids| ids.iter().filter_map(|i| i.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                if ids.is_empty() || ids.len() > MAX_STORES {
                    return Err(invalid("tools", "file_search needs 'vector_store_ids': 1 or 2 vector store ids"));
                }
                let mut params = Map::new();
                params.insert("query".into(), json!("-"));
                for key in ["filters", "ranking_options"] {
                    if let Some(v) = item.get(key) {
                        params.insert(key.into(), v.clone());
                    }
                }
                params.insert("max_num_results".into(), item.get("max_num_results").cloned().unwrap_or(json!(DEFAULT_RESULTS)));
                let search = vs::parse_search(&params).map_err(|e| match e {
                    ApiError::InvalidRequest { message, .. } => invalid("tools", &format!("file_search: {message}")),
                    other => other,
                })?;
                found = Some(FileSearch { store_ids: ids, search });
            }
            Some("file_search") => return Err(invalid("tools", "only one file_search tool is supported")),
            Some(other) => {
                return Err(invalid("tools", &format!("tool type {other:?} is not supported by syncgate's /v1/responses; file_search is")))
            }
            None => return Err(invalid("tools", "each tool needs a 'type'")),
        }
    }
    Ok((found, Value::Array(items.clone())))
}
