//! `/api/conversations`: conversations kept server-side. A turn (`POST …/messages`) sends the
//! conversation's system prompt, its newest stored messages and the new message through the
//! same routing as `/v1/chat/completions`, then stores the user's message and the reply in one
//! acknowledged write before answering; a streamed turn is stored before its `[DONE]`. An
//! `Idempotency-Key` makes a repeated create or turn answer with what the first one stored.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::chat::{self, invalid, missing, usage_json};
use super::relay::{self, Relayed, Transcript};
use super::{annotate, json_object, known_params, path_id, query_limit, query_param, ApiError};
use crate::http::{Request, Response};
use crate::providers::{self, Answer, ChatRequest, Served, Usage};
use crate::server::State;
use crate::store::conversations::{self as store, Conversation, Message, Page, Turn};
use crate::store::{new_id, now_ms, Store, StoreError};

/// `GET /api/conversations`: newest first, `limit` (default 20, at most 100) per page, the
/// page after the conversation `before` names.
pub(crate) fn list(state: &State, request: &Request) -> Result<Response, ApiError> {
    known_params(&request.query, &["limit", "before"])?;
    let limit = query_limit(&request.query, "limit", 20, 100)?;
    let before = query_param(&request.query, "before")?;
    let page = store::list(&state.store, limit, before.as_deref())?
        .ok_or_else(|| unknown_cursor("before", "conversation", before.as_deref()))?;
    Ok(Response::json(200, &list_json(page, conversation_json)))
}

/// `POST /api/conversations`: an empty body or `{"title", "model", "system"}`, all optional.
pub(crate) fn create(state: &State, request: &Request) -> Result<Response, ApiError> {
    let fields = parse_conversation(&request.body)?;
    if let Some(model) = &fields.model {
        if state.providers.route(model).is_none() {
            return Err(ApiError::ModelNotFound(model.clone()));
        }
    }
    let key = idempotency_key(request)?;
    let conversation = Conversation {
        id: new_id("conv"),
        created_ms: now_ms(),
        ..fields
    };
    let conversation = store::create(&state.store, conversation, key)?;
    Ok(Response::json(201, &conversation_json(&conversation)))
}

/// `GET /api/conversations/{id}`.
pub(crate) fn get(state: &State, request: &Request) -> Result<Response, ApiError> {
    let conversation = find(state, conversation_id(request))?;
    Ok(Response::json(200, &conversation_json(&conversation)))
}

/// `DELETE /api/conversations/{id}`: its messages go with it.
pub(crate) fn delete(state: &State, request: &Request) -> Result<Response, ApiError> {
    let id = conversation_id(request);
    if !store::delete(&state.store, id)? {
        return Err(not_found(id));
    }
    Ok(Response::json(
        200,
        &json!({"id": id, "object": "conversation.deleted", "deleted": true}),
    ))
}

/// `GET /api/conversations/{id}/messages`: oldest first, `limit` (default 100, at most 1000)
/// per page, the page after the message `after` names.
pub(crate) fn list_messages(state: &State, request: &Request) -> Result<Response, ApiError> {
    let conversation = find(state, conversation_id(request))?;
    known_params(&request.query, &["limit", "after"])?;
    let limit = query_limit(&request.query, "limit", 100, 1000)?;
    let after = query_param(&request.query, "after")?;
    let page = store::messages(&state.store, &conversation.id, limit, after.as_deref())?
        .ok_or_else(|| unknown_cursor("after", "message", after.as_deref()))?;
    Ok(Response::json(200, &list_json(page, message_json)))
}

/// `POST /api/conversations/{id}/messages`, one turn: the main path. A repeat of a stored turn
/// is answered from the store (as JSON, even when it asks for a stream: the turn is over);
/// otherwise the model is asked with the history, and the turn is stored before the answer
/// (a stream's before its `[DONE]`). If the model cannot be reached nothing is stored and the
/// provider's error is the answer, as on `/v1`.
pub(crate) fn add_message(state: &State, request: &Request) -> Result<Response, ApiError> {
    let ask = parse_turn(&request.body)?;
    let key = idempotency_key(request)?;
    let conversation = find(state, conversation_id(request))?;
    if let Some(key) = &key {
        if let Some(reply) = store::reply_for_key(&state.store, &conversation.id, key)? {
            return Ok(Response::json(200, &reply_json(&reply)));
        }
    }
    let model = ask
        .model
        .clone()
        .or_else(|| conversation.model.clone())
        .ok_or_else(|| {
            invalid(
                "model",
                "missing 'model': the conversation has none, so the message must name one",
            )
        })?;
    // The model may be the conversation's, which admission could not know.
    super::check_model(request, &model)?;
    let chat = prompt(state, &conversation, &model, &ask)?;
    let pending = Pending::new(conversation.id, ask.content, model, key);
    let (answer, served, clock) = chat::ask(state, &request.record, &chat)?;
    let label = served.label();
    let response = answer_turn(state, request, pending, chat, answer, served)?;
    Ok(annotate(response, request, label, clock, &state.metrics))
}

/// The model's answer to a turn, to the client: stored first when whole, or relayed as it
/// comes with the turn stored at the end of the stream.
fn answer_turn(
    state: &State,
    request: &Request,
    pending: Pending,
    chat: ChatRequest,
    answer: Answer,
    served: Served,
) -> Result<Response, ApiError> {
    let record = &request.record;
    match answer {
        Answer::Mock => {
            let reply = chat::mock_reply(state, record, &chat, &served);
            if chat.stream {
                let id = pending.reply_id.clone();
                let transcript = pending.transcript(state.store.clone());
                Ok(chat::stream_reply(
                    id,
                    chat,
                    reply,
                    Arc::clone(record),
                    Some(transcript),
                ))
            } else {
                store_reply(state, pending, reply.content, Some(reply.usage))
            }
        }
        Answer::Json { value, .. } => {
            let usage = chat::json_usage(state, record, &served, &chat.model, &value);
            let content = value
                .pointer("/choices/0/message/content")
                .and_then(Value::as_str)
                .unwrap_or_default();
            store_reply(state, pending, content.to_string(), usage)
        }
        Answer::Stream {
            events,
            cancel,
            timeouts,
        } => Ok(relay::response(relay::Relay {
            transcript: Some(pending.transcript(state.store.clone())),
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

/// What a turn asks, from its body.
#[derive(Debug)]
struct Ask {
    content: String,
    /// Overrides the conversation's model for this turn.
    model: Option<String>,
    stream: bool,
}

/// A turn whose reply is on its way: what is stored with it once it has come.
struct Pending {
    user: Message,
    /// The reply's id, known before the reply (a stream's chunks carry it).
    reply_id: String,
    model: String,
    idempotency_key: Option<String>,
}

impl Pending {
    /// The user's message, as of now, before the model is asked.
    fn new(
        conversation_id: String,
        content: String,
        model: String,
        idempotency_key: Option<String>,
    ) -> Pending {
        Pending {
            user: Message {
                id: new_id("msg"),
                conversation_id,
                role: "user".to_string(),
                content,
                model: None,
                created_ms: now_ms(),
                incomplete: false,
                usage: None,
            },
            reply_id: new_id("msg"),
            model,
            idempotency_key,
        }
    }

    fn into_turn(self, content: String, complete: bool, usage: Option<Usage>) -> Turn {
        let reply = Message {
            id: self.reply_id,
            conversation_id: self.user.conversation_id.clone(),
            role: "assistant".to_string(),
            content,
            model: Some(self.model),
            created_ms: now_ms(),
            incomplete: !complete,
            usage,
        };
        Turn {
            user: self.user,
            reply,
            idempotency_key: self.idempotency_key,
        }
    }

    /// Stores the turn when its stream ends, with the text that reached the client.
    fn transcript(self, db: Store) -> Transcript {
        Transcript::new(Box::new(move |relayed: Relayed| {
            let turn = self.into_turn(relayed.text, relayed.complete, relayed.usage);
            match store::add_turn(&db, turn) {
                // A twin request with the same key stored its reply first: the key's turn is
                // kept, and a repeat answers with that one.
                Err(e) if e.is_unique_violation() => Ok(()),
                stored => stored,
            }
        }))
    }
}

/// Stores a whole reply's turn and answers with the stored reply.
fn store_reply(
    state: &State,
    pending: Pending,
    content: String,
    usage: Option<Usage>,
) -> Result<Response, ApiError> {
    let key = pending.idempotency_key.clone();
    let turn = pending.into_turn(content, true, usage);
    let reply = turn.reply.clone();
    let id = &reply.conversation_id;
    let reply = match (store::add_turn(&state.store, turn), key) {
        (Ok(()), _) => reply,
        // A twin request with the same key stored its turn first: its reply is the answer.
        (Err(e), Some(key)) if e.is_unique_violation() => {
            store::reply_for_key(&state.store, id, &key)?.ok_or(e)?
        }
        (Err(e), _) => return Err(refused(state, id, e)),
    };
    Ok(Response::json(200, &reply_json(&reply)))
}

/// Why a turn's write failed: 404 when the conversation was deleted while the model answered
/// (a foreign key refused the messages), else the store's error.
fn refused(state: &State, conversation_id: &str, e: StoreError) -> ApiError {
    match store::get(&state.store, conversation_id) {
        Ok(None) => not_found(conversation_id),
        _ => e.into(),
    }
}

/// The chat request a turn sends: the conversation's system prompt, its newest stored
/// messages (at most `max_history_messages`) oldest first, then the new message.
fn prompt(
    state: &State,
    conversation: &Conversation,
    model: &str,
    ask: &Ask,
) -> Result<ChatRequest, ApiError> {
    let history = store::history(
        &state.store,
        &conversation.id,
        state.config.max_history_messages,
    )?;
    let mut messages = Vec::with_capacity(history.len() + 2);
    if let Some(system) = conversation.system.as_deref().filter(|s| !s.is_empty()) {
        messages.push(providers::Message {
            role: "system".to_string(),
            text: system.to_string(),
        });
    }
    messages.extend(history.into_iter().map(|m| providers::Message {
        role: m.role,
        text: m.content,
    }));
    messages.push(providers::Message {
        role: "user".to_string(),
        text: ask.content.clone(),
    });
    let mut raw = Map::new();
    raw.insert("model".into(), json!(model));
    let wire: Vec<Value> = messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.text}))
        .collect();
    raw.insert("messages".into(), Value::Array(wire));
    if ask.stream {
        raw.insert("stream".into(), json!(true));
        // The usage is stored with the turn, so the stream must report it.
        raw.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(ChatRequest {
        model: model.to_string(),
        messages,
        stream: ask.stream,
        include_usage: ask.stream,
        max_tokens: None,
        raw,
    })
}

/// The conversation a path names, or 404.
fn find(state: &State, id: &str) -> Result<Conversation, ApiError> {
    store::get(&state.store, id)?.ok_or_else(|| not_found(id))
}

/// The `{id}` of `/api/conversations/{id}…` (the router has checked there is one).
fn conversation_id(request: &Request) -> &str {
    path_id(&request.path, super::CONVERSATIONS_PREFIX).map_or("", |(id, _)| id)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        kind: "conversation",
        id: id.to_string(),
    }
}

fn unknown_cursor(param: &str, kind: &str, id: Option<&str>) -> ApiError {
    invalid(
        param,
        &format!(
            "'{param}' names no {kind} here: {:?}",
            id.unwrap_or_default()
        ),
    )
}

/// The request's `Idempotency-Key` header, 1–255 bytes, when it has one.
fn idempotency_key(request: &Request) -> Result<Option<String>, ApiError> {
    match request.header("idempotency-key") {
        None => Ok(None),
        Some(key) if (1..=255).contains(&key.len()) => Ok(Some(key.to_string())),
        Some(_) => Err(invalid(
            "Idempotency-Key",
            "the Idempotency-Key header must be 1 to 255 bytes long",
        )),
    }
}

/// A new conversation's fields; an empty body means none.
fn parse_conversation(body: &[u8]) -> Result<Conversation, ApiError> {
    let mut conversation = Conversation {
        id: String::new(),
        title: None,
        model: None,
        system: None,
        created_ms: 0,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(conversation);
    }
    let obj = json_object(body)?;
    conversation.title = optional_string(&obj, "title")?;
    conversation.model = model_param(&obj)?;
    conversation.system = optional_string(&obj, "system")?;
    Ok(conversation)
}

/// A turn's body: `{"content", "model"?, "stream"?}`.
fn parse_turn(body: &[u8]) -> Result<Ask, ApiError> {
    let obj = json_object(body)?;
    let content = match obj.get("content") {
        None | Some(Value::Null) => return Err(missing("content")),
        Some(Value::String(text)) if !text.is_empty() => text.clone(),
        Some(_) => return Err(invalid("content", "'content' must be a non-empty string")),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "'stream' must be a boolean")),
    };
    Ok(Ask {
        content,
        model: model_param(&obj)?,
        stream,
    })
}

fn optional_string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(name, &format!("'{name}' must be a string"))),
    }
}

fn model_param(obj: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match optional_string(obj, "model") {
        Ok(Some(model)) if model.is_empty() => {
            Err(invalid("model", "'model' must be a non-empty string"))
        }
        Err(_) => Err(invalid("model", "'model' must be a non-empty string")),
        parsed => parsed,
    }
}

fn unix_seconds(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

fn list_json<T>(page: Page<T>, each: fn(&T) -> Value) -> Value {
    let data: Vec<Value> = page.items.iter().map(each).collect();
    json!({"object": "list", "data": data, "has_more": page.has_more})
}

fn conversation_json(c: &Conversation) -> Value {
    json!({
        "id": c.id,
        "object": "conversation",
        "title": c.title,
        "model": c.model,
        "system": c.system,
        "created_at": unix_seconds(c.created_ms),
    })
}

fn message_json(m: &Message) -> Value {
    json!({
        "id": m.id,
        "object": "conversation.message",
        "conversation_id": m.conversation_id,
        "role": m.role,
        "content": m.content,
        "model": m.model,
        "created_at": unix_seconds(m.created_ms),
        "incomplete": m.incomplete,
    })
}

/// A turn's answer: the stored reply with the usage of its turn.
fn reply_json(m: &Message) -> Value {
    let mut value = message_json(m);
    value["usage"] = m.usage.map_or(Value::Null, usage_json);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(e: ApiError) -> String {
        match e {
            ApiError::InvalidRequest { param, .. } => param,
            other => panic!("not an invalid request: {other:?}"),
        }
    }

    #[test]
    fn a_conversation_body_may_be_empty_or_name_its_fields() {
        assert_eq!(parse_conversation(b"").unwrap().title, None);
        assert_eq!(parse_conversation(b" \n").unwrap().model, None);
        let c = parse_conversation(br#"{"title":"t","model":"m","system":"s"}"#).unwrap();
        assert_eq!(
            (c.title.as_deref(), c.model.as_deref(), c.system.as_deref()),
            (Some("t"), Some("m"), Some("s"))
        );
        for (body, bad) in [
            (r#"{"title":5}"#, "title"),
            (r#"{"model":""}"#, "model"),
            (r#"{"model":["m"]}"#, "model"),
            (r#"{"system":{}}"#, "system"),
        ] {
            assert_eq!(param(parse_conversation(body.as_bytes()).unwrap_err()), bad);
        }
        assert!(matches!(
            parse_conversation(b"[]"),
            Err(ApiError::InvalidRequest { .. })
        ));
        assert!(matches!(
            parse_conversation(b"{"),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn a_turn_needs_content_and_checks_the_rest() {
        let ask = parse_turn(br#"{"content":"hi","model":"m","stream":true}"#).unwrap();
        assert_eq!(
            (ask.content.as_str(), ask.model.as_deref(), ask.stream),
            ("hi", Some("m"), true)
        );
        for (body, bad) in [
            (r#"{}"#, "content"),
            (r#"{"content":""}"#, "content"),
            (r#"{"content":7}"#, "content"),
            (r#"{"content":"x","model":""}"#, "model"),
            (r#"{"content":"x","stream":"yes"}"#, "stream"),
        ] {
            assert_eq!(
                param(parse_turn(body.as_bytes()).unwrap_err()),
                bad,
                "{body}"
            );
        }
    }

    #[test]
    fn a_reply_carries_its_usage_or_null() {
        let mut m = Message {
            id: "msg_1".into(),
            conversation_id: "conv_1".into(),
            role: "assistant".into(),
            content: "hello".into(),
            model: Some("m".into()),
            created_ms: 1_700_000_000_999,
            incomplete: false,
            usage: None,
        };
        assert_eq!(reply_json(&m)["usage"], Value::Null);
        assert_eq!(reply_json(&m)["created_at"], 1_700_000_000);
        m.usage = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 0,
        });
        assert_eq!(reply_json(&m)["usage"]["total_tokens"], 7);
        assert!(message_json(&m).get("usage").is_none());
    }
}
