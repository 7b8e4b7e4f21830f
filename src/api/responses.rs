//! `POST /v1/responses` (issue 16): the subset of OpenAI's Responses API that answers from
//! vector stores. With a `file_search` tool the flow is the knowledge base's own: search every
//! listed store side by side for the question, then ask the routed chat model with the
//! retrieved chunks numbered in its prompt, and turn its `[n]` markers into `file_citation`
//! annotations. The output is `[file_search_call, message]`, or `[message]` without the tool.
//! The model never picks a store: only those the request lists are searched. With `stream`,
//! the answer is sent as the Responses API's server-sent events once it is whole (the search
//! comes first, so the deltas follow the answer rather than the model's tokens).

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::chat::{self, invalid, missing};
use super::vector_stores::{self as vs, Hit, Search};
use super::{check_model, json_object, ApiError};
use crate::http::{Request, Response};
use crate::knowledge::cite::{self, Source};
use crate::providers::Answer;
use crate::server::State;
use crate::store::{new_id, now_ms};

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
    let (text, usage) = generate(state, request, &ask, &hits)?;
    let (text, citations) = cite::read_citations(&text, hits.len());
    let annotations: Vec<Value> = citations
        .iter()
        .map(|c| {
            json!({"type": "file_citation", "file_id": hits[c.source].file_id,
                   "filename": hits[c.source].filename, "index": c.index})
        })
        .collect();
    let mut output = Vec::new();
    if ask.tool.is_some() {
        output.push(file_search_call(&question, &hits, ask.include_results));
    }
    let message_id = new_id("msg");
    output.push(json!({
        "type": "message",
        "id": message_id,
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": annotations}],
    }));
    let response = response_json(&ask, output, "completed", Some(usage));
    if ask.stream {
        Ok(Response::text(
            200,
            "text/event-stream",
            events(&response).into_bytes(),
        ))
    } else {
        Ok(Response::json(200, &response))
    }
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
                scope.spawn(move || vs::run_search(state, store, search))
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

/// Asks the model, the sources in its system prompt; its text and usage.
fn generate(
    state: &State,
    request: &Request,
    ask: &Ask,
    hits: &[Hit],
) -> Result<(String, Value), ApiError> {
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
    let chat_request = chat::parse_object(body)?;
    let (answer, served, _) = chat::ask(state, &request.record, &chat_request)?;
    let (text, prompt, completion) = match answer {
        Answer::Mock => {
            let reply = chat::mock_reply(state, &request.record, &chat_request, &served);
            (
                reply.content,
                reply.usage.prompt_tokens,
                reply.usage.completion_tokens,
            )
        }
        Answer::Json { value, .. } => {
            let usage = chat::json_usage(state, &request.record, &served, &ask.model, &value);
            let text = value["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let (p, c) = usage.map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
            (text, p, c)
        }
        Answer::Stream { .. } => return Err(ApiError::Internal),
    };
    let usage = json!({
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    });
    Ok((text, usage))
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

/// The response object.
fn response_json(ask: &Ask, output: Vec<Value>, status: &str, usage: Option<Value>) -> Value {
    json!({
        "id": new_id("resp"),
        "object": "response",
        "created_at": now_ms() / 1000,
        "status": status,
        "error": null,
        "incomplete_details": null,
        "instructions": ask.instructions,
        "max_output_tokens": null,
        "model": ask.model,
        "output": output,
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
        "usage": usage,
        "user": null,
        "metadata": {},
    })
}

/// The whole answer as the Responses API's server-sent events.
fn events(response: &Value) -> String {
    let mut out = String::new();
    let mut sequence = 0u64;
    let mut emit = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(sequence);
        sequence += 1;
        let _ = write!(out, "event: {kind}\ndata: {data}\n\n");
    };
    let mut started = response.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    emit("response.created", json!({"response": started}));
    emit("response.in_progress", json!({"response": started}));
    let output = response["output"].as_array().cloned().unwrap_or_default();
    for (i, item) in output.iter().enumerate() {
        let id = item["id"].clone();
        match item["type"].as_str() {
            Some("file_search_call") => {
                let mut pending = item.clone();
                pending["status"] = json!("in_progress");
                emit(
                    "response.output_item.added",
                    json!({"output_index": i, "item": pending}),
                );
                for step in ["in_progress", "searching", "completed"] {
                    emit(
                        &format!("response.file_search_call.{step}"),
                        json!({"output_index": i, "item_id": id}),
                    );
                }
                emit(
                    "response.output_item.done",
                    json!({"output_index": i, "item": item}),
                );
            }
            _ => {
                let part = &item["content"][0];
                let text = part["text"].as_str().unwrap_or_default();
                let mut pending = item.clone();
                pending["status"] = json!("in_progress");
                pending["content"] = json!([]);
                emit(
                    "response.output_item.added",
                    json!({"output_index": i, "item": pending}),
                );
                let empty = json!({"type": "output_text", "text": "", "annotations": []});
                emit(
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": i, "content_index": 0, "part": empty}),
                );
                for delta in text.split_inclusive(' ') {
                    emit(
                        "response.output_text.delta",
                        json!({"item_id": id, "output_index": i, "content_index": 0, "delta": delta}),
                    );
                }
                for (n, annotation) in part["annotations"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    emit(
                        "response.output_text.annotation.added",
                        json!({"item_id": id, "output_index": i,
                        "content_index": 0, "annotation_index": n, "annotation": annotation}),
                    );
                }
                emit(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0, "text": text}),
                );
                emit(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0, "part": part}),
                );
                emit(
                    "response.output_item.done",
                    json!({"output_index": i, "item": item}),
                );
            }
        }
    }
    emit("response.completed", json!({"response": response}));
    out
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
