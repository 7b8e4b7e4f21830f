//! `GET /api/requests`: the request log, newest first, filtered by model, status, key and time,
//! paged with a cursor (`before`, the id of the last row seen) rather than an offset, so a
//! page costs the same however deep it is and rows logged meanwhile do not shift it.

use serde_json::{json, Map, Value};

use super::{known_params, query_limit, query_param, query_time_range, ApiError};
use crate::http::{Request, Response};
use crate::server::State;
use crate::store::requests::{self, Filter, Logged};
use crate::time;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1000;

pub(crate) fn list(state: &State, request: &Request) -> Result<Response, ApiError> {
    let query = request.query.as_str();
    known_params(
        query,
        &[
            "model", "status", "key", "since", "until", "before", "limit",
        ],
    )?;
    let before = before_param(query)?;
    let mut filter = Filter {
        model: model_param(query)?,
        status: status_param(query)?,
        key_id: key_param(query)?,
        range: query_time_range(query)?,
        before: None,
        limit: query_limit(query, "limit", DEFAULT_LIMIT, MAX_LIMIT)? as usize,
    };
    if let Some(id) = before {
        let cursor = requests::cursor(&state.store, id)?.ok_or_else(|| {
            invalid(
                "before",
                format!("no logged request has id {id} (it may have expired)"),
            )
        })?;
        filter.before = Some(cursor);
    }
    let page = requests::list(&state.store, &filter)?;
    let data: Vec<Value> = page.rows.iter().map(row_json).collect();
    Ok(Response::json(
        200,
        &json!({"object": "list", "data": data, "has_more": page.has_more}),
    ))
}

fn model_param(query: &str) -> Result<Option<String>, ApiError> {
    match query_param(query, "model")? {
        Some(model) if model.is_empty() => Err(invalid("model", "'model' must not be empty")),
        model => Ok(model),
    }
}

fn status_param(query: &str) -> Result<Option<u16>, ApiError> {
    query_param(query, "status")?
        .map(|text| {
            text.parse::<u16>()
                .ok()
                .filter(|status| (100..=599).contains(status))
                .ok_or_else(|| invalid("status", "'status' must be an HTTP status from 100 to 599"))
        })
        .transpose()
}

/// `key`: the id of the API key that made the calls (as `/admin/keys` and the rows show it).
fn key_param(query: &str) -> Result<Option<i64>, ApiError> {
    query_param(query, "key")?
        .map(|text| {
            text.parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| invalid("key", "'key' must be the id of an API key"))
        })
        .transpose()
}

/// The cursor: the id of the last row of the previous page.
fn before_param(query: &str) -> Result<Option<i64>, ApiError> {
    query_param(query, "before")?
        .map(|text| {
            text.parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    invalid(
                        "before",
                        "'before' must be the id of a logged request (a positive integer)",
                    )
                })
        })
        .transpose()
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: param.to_string(),
    }
}

/// A row as the API shows it; the bodies only when they were kept.
fn row_json(logged: &Logged) -> Value {
    let r = &logged.row;
    let ms = |v: f64| (v * 1000.0).round() / 1000.0;
    let mut json = json!({
        "id": logged.id,
        "request_id": r.request_id,
        "created_at": time::format_ms(r.ts_ms),
        "method": r.method,
        "route": r.route,
        "model": r.model,
        "provider": r.provider,
        "upstream_model": r.upstream_model,
        "attempts": r.attempts,
        "status": r.status,
        "error_code": r.error_code,
        "total_ms": ms(r.total_ms),
        "queue_ms": ms(r.queue_ms),
        "upstream_ms": ms(r.upstream_ms),
        "overhead_ms": ms(r.overhead_ms),
        "ttft_ms": r.ttft_ms.map(ms),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cost_usd": r.cost_micros.map(crate::spend::usd),
        "cost_estimated": r.cost_estimated,
        "streamed": r.streamed,
        "client_left": r.client_left,
        "key_id": r.key_id,
    });
    if let Value::Object(object) = &mut json {
        add_body(object, "request_body", r.request_body.as_deref());
        add_body(object, "response_body", r.response_body.as_deref());
    }
    json
}

fn add_body(object: &mut Map<String, Value>, name: &str, body: Option<&[u8]>) {
    if let Some(body) = body {
        object.insert(
            name.to_string(),
            Value::String(String::from_utf8_lossy(body).into_owned()),
        );
    }
}
