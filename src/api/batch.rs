//! `POST /api/batch`: independent chat calls side by side. Each item is a chat completion body,
//! checked as `/v1/chat/completions` checks one and called through the same routing, retries
//! and fallbacks, on the batch pool (src/batch.rs) rather than on request workers. The answer
//! is 200 with each item's own status and completion or error, in request order: one failed
//! item never fails the batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::chat::{self, invalid, missing, Reply};
use super::record::{Facts, Record};
use super::ApiError;
use crate::batch::{self, Missed};
use crate::http::{Request, Response};
use crate::providers::{ChatRequest, Usage};
use crate::server::State;
use crate::spend::Cost;

/// Checks every item, runs the valid ones on the batch pool (at most `[batch] parallelism`
/// at once), and answers with every item's result in order.
pub(crate) fn run(state: &State, request: &Request) -> Result<Response, ApiError> {
    let items = parse(&request.body, state.config.batch.max_items)?;
    state.metrics.batch_items.observe(items.len() as f64);
    // An item refused here has its answer already; the others wait for their calls.
    let mut results: Vec<Option<Result<Value, ApiError>>> = Vec::with_capacity(items.len());
    let (mut called, mut calls) = (Vec::new(), Vec::new());
    for (index, item) in items.into_iter().enumerate() {
        match check(state, request, item) {
            Ok(chat) => {
                called.push(index);
                calls.push(call(
                    chat,
                    format!("chatcmpl-{}-{index}", request.request_id),
                ));
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    for (index, result) in called.into_iter().zip(call_all(state, request, calls)) {
        results[index] = Some(result);
    }
    let results: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, result)| {
            let result = result.unwrap_or(Err(ApiError::Internal));
            result_json(&request.request_id, index, result)
        })
        .collect();
    Ok(Response::json(
        200,
        &json!({"object": "batch", "results": results}),
    ))
}

/// Reads the body: `{"requests": [ … ]}`, 1 to `max_items` items, and nothing else. Every
/// error names `requests` (or the unknown key).
fn parse(body: &[u8], max_items: usize) -> Result<Vec<Value>, ApiError> {
    let mut obj = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => obj,
        Ok(_) => {
            return Err(invalid(
                "requests",
                "the body must be a JSON object: {\"requests\": [ … ]}",
            ))
        }
        Err(e) => {
            return Err(invalid(
                "requests",
                &format!("the body is not valid JSON ({e}); expected {{\"requests\": [ … ]}}"),
            ))
        }
    };
    if let Some(other) = obj.keys().find(|k| *k != "requests") {
        return Err(invalid(
            other,
            &format!("unknown parameter '{other}'; a batch has only 'requests'"),
        ));
    }
    match obj.remove("requests") {
        None | Some(Value::Null) => Err(missing("requests")),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(invalid("requests", "'requests' must not be empty"))
        }
        Some(Value::Array(items)) if items.len() > max_items => Err(invalid(
            "requests",
            &format!(
                "'requests' has {} items; a batch holds at most {max_items}",
                items.len()
            ),
        )),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(invalid(
            "requests",
            "'requests' must be an array of chat completion requests",
        )),
    }
}

/// Checks one item before it may take a place in the pool: a chat request as
/// `/v1/chat/completions` takes it, not streamed, for a model that exists and that the
/// caller's key may call (admission saw only the batch, not its items' models).
fn check(state: &State, request: &Request, item: Value) -> Result<ChatRequest, ApiError> {
    let Value::Object(obj) = item else {
        return Err(invalid(
            "requests",
            "each item of 'requests' must be a chat completion request object",
        ));
    };
    let chat = chat::parse_object(obj)?;
    if chat.stream {
        return Err(invalid(
            "stream",
            "'stream' must be false in a batch: each result is a whole completion",
        ));
    }
    if state.providers.route(&chat.model).is_none() {
        return Err(ApiError::ModelNotFound(chat.model));
    }
    super::check_model(request, &chat.model)?;
    Ok(chat)
}

/// Runs the calls on the batch pool and notes what they taught on the batch's record. A call
/// the pool had no room for is 503 `batch_pool_full`; one that panicked, 500.
fn call_all(
    state: &State,
    request: &Request,
    calls: Vec<batch::Call<Done>>,
) -> Vec<Result<Value, ApiError>> {
    let started = Instant::now();
    let wait = state.config.capacity.max_queue_wait;
    let done = batch::run_all(&state.batch, calls, state.config.batch.parallelism, wait);
    let mut facts = Vec::with_capacity(done.len());
    let results = done
        .into_iter()
        .map(|outcome| match outcome {
            Ok(Done { result, facts: f }) => {
                facts.push(f);
                result
            }
            Err(Missed::PoolFull) => Err(ApiError::BatchPoolFull {
                waited_ms: wait.as_millis() as u64,
            }),
            Err(Missed::Lost) => Err(ApiError::Internal),
        })
        .collect();
    let cost = facts
        .iter()
        .filter_map(|f| f.cost(&state.config.prices))
        .reduce(Cost::plus);
    note(&request.record, &facts, started.elapsed());
    if let Some(cost) = cost {
        request.record.add_cost(cost);
    }
    results
}

/// One item's answer, and what its call taught, for the batch's request-log row.
struct Done {
    result: Result<Value, ApiError>,
    facts: Facts,
}

/// One item's call, as a pool thread runs it: asked and answered as `/v1/chat/completions`
/// would be, with a record of its own.
fn call(chat: ChatRequest, id: String) -> batch::Call<Done> {
    Box::new(move |state: &State| {
        let record = Arc::new(Record::default());
        let result = match chat::ask(state, &record, &chat) {
            Ok((answer, served, _)) => {
                match chat::reply(state, &record, chat, served, id, answer) {
                    Reply::Whole { value, .. } => Ok(value),
                    // Never: a batch's calls are not streamed, so nothing answers with a stream.
                    Reply::Stream(_) => Err(ApiError::Internal),
                }
            }
            Err(e) => Err(e),
        };
        Done {
            result,
            facts: record.facts(),
        }
    })
}

/// Notes on the batch's record what its calls taught: the model when every call asked for
/// the same one, attempts and tokens summed (so a key's token limit is charged for them all),
/// and the time the batch was blocked on its calls.
fn note(record: &Record, facts: &[Facts], blocked: Duration) {
    if facts.is_empty() {
        return;
    }
    let first = facts[0].model.clone();
    let same_model = facts.iter().all(|f| f.model == first);
    let usage = facts.iter().filter_map(|f| f.usage).reduce(|a, b| Usage {
        prompt_tokens: a.prompt_tokens + b.prompt_tokens,
        completion_tokens: a.completion_tokens + b.completion_tokens,
        cached_tokens: a.cached_tokens + b.cached_tokens,
    });
    record.note(|f| {
        f.model = if same_model { first } else { None };
        f.attempts = facts.iter().map(|f| f.attempts).sum();
        f.usage = usage;
        f.upstream = blocked;
    });
}

/// One item of the answer: its index, its status, and its completion or OpenAI's error
/// object. An error the server should hear about (5xx) is logged here, once.
fn result_json(request_id: &str, index: usize, result: Result<Value, ApiError>) -> Value {
    match result {
        Ok(body) => json!({"index": index, "status": 200, "body": body}),
        Err(e) => {
            let status = e.status();
            if status >= 500 {
                log::warn!("request {request_id}: batch item {index} failed: {e}");
            }
            json!({"index": index, "status": status, "error": e.object()})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str, max_items: usize) -> (String, String) {
        match parse(body.as_bytes(), max_items) {
            Err(ApiError::InvalidRequest { param, message }) => (param, message),
            other => panic!("{body}: expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_body_holds_one_to_max_items_requests() {
        let items = parse(br#"{"requests": [{"model": "m"}, 5]}"#, 2).unwrap();
        assert_eq!(items.len(), 2);
        for (body, param, says) in [
            ("not json", "requests", "not valid JSON"),
            ("[1]", "requests", "JSON object"),
            ("{}", "requests", "missing"),
            (r#"{"requests": null}"#, "requests", "missing"),
            (r#"{"requests": {}}"#, "requests", "array"),
            (r#"{"requests": []}"#, "requests", "empty"),
            (r#"{"requests": [1, 2, 3]}"#, "requests", "at most 2"),
            (r#"{"requests": [1], "parallel": 2}"#, "parallel", "unknown"),
        ] {
            let (p, message) = refused(body, 2);
            assert_eq!(p, param, "{body}");
            assert!(message.contains(says), "{body}: {message}");
        }
    }

    #[test]
    fn the_record_sums_calls_and_names_a_model_only_when_all_agree() {
        let fact = |model: &str, attempts, prompt| Facts {
            model: Some(model.to_string()),
            attempts,
            usage: Some(Usage {
                prompt_tokens: prompt,
                completion_tokens: 1,
                cached_tokens: 0,
            }),
            ..Facts::default()
        };
        let record = Record::default();
        note(
            &record,
            &[fact("a", 1, 10), fact("a", 2, 5)],
            Duration::from_millis(7),
        );
        let f = record.facts();
        assert_eq!(f.model.as_deref(), Some("a"));
        assert_eq!(f.attempts, 3);
        assert_eq!(f.usage.map(|u| u.total_tokens()), Some(17));
        assert_eq!(f.upstream, Duration::from_millis(7));

        let record = Record::default();
        note(&record, &[fact("a", 1, 1), fact("b", 1, 1)], Duration::ZERO);
        assert_eq!(record.facts().model, None);
    }
}
