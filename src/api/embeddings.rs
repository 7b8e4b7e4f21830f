//! `POST /v1/embeddings`: OpenAI's embeddings API, routed like chat (targets, retries,
//! fallbacks); the built-in mock answers with deterministic vectors.

use serde_json::{json, Value};

use super::chat::{invalid, missing};
use super::{annotate, json_object, ApiError};
use crate::http::{Request, Response};
use crate::providers::{self, mock, Answer, Call, UpstreamClock, Usage};
use crate::server::State;

pub(crate) fn embed(state: &State, request: &Request) -> Result<Response, ApiError> {
    let body = json_object(&request.body)?;
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        None | Some(Value::Null) => return Err(missing("model")),
        Some(_) => return Err(invalid("model", "'model' must be a non-empty string")),
    };
    request.record.model(&model);
    super::check_model(request, &model)?;
    let inputs = inputs(body.get("input"))?;
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => mock::EMBEDDING_DIMENSIONS,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=4096) => n as usize,
            _ => {
                return Err(invalid(
                    "dimensions",
                    "'dimensions' must be an integer from 1 to 4096",
                ))
            }
        },
    };
    let targets = state
        .providers
        .route(&model)
        .ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
    let mut clock = UpstreamClock::default();
    let call = Call {
        path: "/embeddings",
        body: &body,
        stream: false,
    };
    let (answer, served) = providers::call(targets, &call, &state.metrics, &mut clock)?;
    let label = served.label();
    request.record.served(&served, clock);
    let response = match answer {
        Answer::Mock => {
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    json!({"object": "embedding", "index": i, "embedding": mock::embed(text, dimensions)})
                })
                .collect();
            let tokens: u64 = inputs.iter().map(|t| mock::estimate_tokens(t)).sum();
            let usage = Usage {
                prompt_tokens: tokens,
                completion_tokens: 0,
                cached_tokens: 0,
            };
            state.metrics.count_tokens(&served.provider, &model, usage);
            request.record.usage(usage);
            Response::json(
                200,
                &json!({"object": "list", "data": data, "model": model,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
            )
        }
        Answer::Json { bytes, value } => {
            super::chat::json_usage(state, &request.record, &served, &model, &value);
            Response::text(200, "application/json", bytes)
        }
        // Embeddings are never streamed (Call::stream is false).
        Answer::Stream { .. } => {
            return Err(ApiError::Internal);
        }
    };
    Ok(annotate(response, request, label, clock, &state.metrics))
}

/// `input` as texts: a string, an array of strings, or token arrays (kept as their JSON text,
/// which is what the mock embeds; real providers get the body unchanged).
fn inputs(input: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let texts = match input {
        None | Some(Value::Null) => return Err(missing("input")),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Some(_) => {
            return Err(invalid(
                "input",
                "'input' must be a string or a non-empty array",
            ))
        }
    };
    Ok(texts)
}
