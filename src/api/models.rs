//! `GET /v1/models` and `GET /v1/models/{id}`: the models this gateway serves, in OpenAI's shape.

use serde_json::{json, Value};

use super::ApiError;
use crate::http::{Request, Response};
use crate::server::State;

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "syncgate"})
}

pub(crate) fn list(state: &State) -> Response {
    let data: Vec<Value> = state.providers.model_names().map(model_json).collect();
    Response::json(200, &json!({"object": "list", "data": data}))
}

pub(crate) fn get(state: &State, request: &Request) -> Result<Response, ApiError> {
    let id = request.path.trim_start_matches("/v1/models/");
    match state.providers.model_names().find(|m| *m == id) {
        Some(m) => Ok(Response::json(200, &model_json(m))),
        None => Err(ApiError::ModelNotFound(id.to_string())),
    }
}
