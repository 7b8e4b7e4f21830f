//! `GET /api/usage`: calls, errors and tokens by model or by UTC day, the same totals
//! `syncgate usage` prints (both use `store::usage`).

use serde_json::{json, Value};

use super::{known_params, query_param, query_time_range, ApiError};
use crate::http::{Request, Response};
use crate::server::State;
use crate::store::usage::{self, GroupBy};

pub(crate) fn summary(state: &State, request: &Request) -> Result<Response, ApiError> {
    let query = request.query.as_str();
    known_params(query, &["group_by", "since", "until"])?;
    let group_by = match query_param(query, "group_by")? {
        None => GroupBy::default(),
        Some(text) => text.parse().map_err(|_| ApiError::InvalidRequest {
            message: format!("'group_by' must be model, day or key; got {text:?}"),
            param: "group_by".to_string(),
        })?,
    };
    let range = query_time_range(query)?;
    let totals = usage::summarise(&state.store, group_by, range)?;
    let data: Vec<Value> = totals
        .iter()
        .map(|t| {
            json!({
                group_by.name(): t.key,
                "calls": t.calls,
                "errors": t.errors,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "total_tokens": t.total_tokens(),
                "cost_usd": t.cost_micros.map(crate::spend::usd),
                "unpriced_calls": t.unpriced_calls,
            })
        })
        .collect();
    Ok(Response::json(
        200,
        &json!({"object": "list", "group_by": group_by.name(), "data": data}),
    ))
}
