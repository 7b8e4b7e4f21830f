//! The mock upstream's routes, the answer each gives before any fault shapes its delivery, and
//! [`MockError`], the one place a refusal becomes a response.

use std::fmt;

use serde_json::{json, Value};

use super::chat::{self, ChatStream, StreamFault};
use super::embeddings;
use super::fault::{Fault, FaultError};
use super::Shared;
use crate::api::{self, ApiError};
use crate::http::{Request, Response};
use crate::providers::mock;

/// Model ids `/v1/models` always lists; ids requests asked for follow them.
const MODELS: &[&str] = &["mock-gpt", "mock-embed"];

/// The API routes the mock imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    ChatCompletions,
    Embeddings,
    Models,
    Model,
}

impl Route {
    /// The route's template: its `/stats` key and its name in errors.
    pub(crate) fn template(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Models => "/v1/models",
            Route::Model => "/v1/models/{id}",
        }
    }
}

/// Whether `path` belongs to the API the mock imitates: requests there are counted, logged,
/// delayed and faulted; the rest (`/stats`, `/requests`, `/reset`) never are.
pub(crate) fn is_api(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// Finds the API route with the gateway's own route table (the mock serves the same `/v1`
/// surface): unknown paths are 404, a known path with another method 405. Only called for
/// `/v1` paths, so the gateway's own routes outside `/v1` never reach here.
pub(crate) fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    match api::route(method, path, false)? {
        api::Route::ChatCompletions => Ok(Route::ChatCompletions),
        api::Route::Embeddings => Ok(Route::Embeddings),
        api::Route::Models => Ok(Route::Models),
        api::Route::Model => Ok(Route::Model),
        // The gateway's own routes outside `/v1`, which never come here.
        api::Route::Healthz
        | api::Route::Readyz
        | api::Route::Metrics
        | api::Route::Status
        | api::Route::Console
        | api::Route::Requests
        | api::Route::Usage
        | api::Route::Batch
        | api::Route::ConversationList
        | api::Route::ConversationCreate
        | api::Route::ConversationGet
        | api::Route::ConversationDelete
        | api::Route::MessageList
        | api::Route::MessageCreate
        | api::Route::JobList
        | api::Route::JobSubmit
        | api::Route::JobGet
        | api::Route::JobCancel
        | api::Route::AdminKeyList
        | api::Route::AdminKeyCreate
        | api::Route::AdminKeyRevoke
        | api::Route::AdminInstances
        | api::Route::DebugPanic
        // The gateway's knowledge base, kept by the gateway itself: no provider is asked.
        | api::Route::FileList
        | api::Route::FileUpload
        | api::Route::FileGet
        | api::Route::FileDelete
        | api::Route::FileContent
        | api::Route::VectorStoreList
        | api::Route::VectorStoreCreate
        | api::Route::VectorStoreGet
        | api::Route::VectorStoreUpdate
        | api::Route::VectorStoreDelete
        | api::Route::VectorStoreFileList
        | api::Route::VectorStoreFileAttach
        | api::Route::VectorStoreFileGet
        | api::Route::VectorStoreFileUpdate
        | api::Route::VectorStoreFileDetach
        | api::Route::VectorStoreFileContent
        | api::Route::VectorStoreSearch
        | api::Route::FileBatchCreate
        | api::Route::FileBatchGet
        | api::Route::FileBatchCancel
        | api::Route::FileBatchFiles
        | api::Route::Responses => Err(ApiError::UnknownRoute {
            method: method.to_string(),
            path: path.to_string(),
        }),
    }
}

/// Why a request got an error instead of its reply.
#[derive(Debug)]
pub(crate) enum MockError {
    /// The request is wrong as the gateway itself would judge it (bad JSON, a missing
    /// parameter, unknown route, wrong method): same status and body as the gateway's.
    Api(ApiError),
    /// The `x-mock-fault` header does not parse (400 `invalid_fault`).
    BadFault(FaultError),
    /// A `status=` fault (or `error-event` on a plain answer) asked for this status.
    Injected {
        status: u16,
        retry_after_s: Option<u64>,
    },
}

impl fmt::Display for MockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MockError::Api(e) => e.fmt(f),
            MockError::BadFault(e) => write!(f, "bad x-mock-fault header: {e}"),
            MockError::Injected { status, .. } => {
                write!(f, "mock fault: status {status} injected on purpose")
            }
        }
    }
}

impl MockError {
    pub(crate) fn to_response(&self) -> Response {
        let (status, kind, code) = match self {
            MockError::Api(e) => return e.to_response(),
            MockError::BadFault(_) => (400, "invalid_request_error", "invalid_fault"),
            MockError::Injected { status, .. } => (*status, injected_kind(*status), "mock_fault"),
        };
        let body = json!({"error": {
            "message": self.to_string(), "type": kind, "param": null, "code": code,
        }});
        let response = Response::json(status, &body);
        match self {
            MockError::Injected {
                retry_after_s: Some(s),
                ..
            } => response.with_header("retry-after", s.to_string()),
            _ => response,
        }
    }
}

/// OpenAI's `error.type` for an injected status, as OpenAI itself would say it.
fn injected_kind(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// A successful answer, before the fault decides how it is delivered.
pub(crate) enum Reply {
    /// A 200 JSON body.
    Json(Value),
    /// A streamed chat completion (already shaped by its fault).
    Stream(ChatStream),
}

/// The answer to a request on an API route. `status=` faults never get here; every other
/// fault shapes only streams here, and the connection shapes JSON delivery.
pub(crate) fn answer(
    shared: &Shared,
    route: Route,
    request: &Request,
    fault: Fault,
) -> Result<Reply, MockError> {
    match route {
        Route::ChatCompletions => {
            let chat = api::chat::parse(&request.body).map_err(MockError::Api)?;
            let reply = mock::reply(&chat);
            let id = format!("chatcmpl-{}", request.request_id);
            if !chat.stream {
                return Ok(Reply::Json(chat::completion(&id, &chat, &reply)));
            }
            let fault = match fault {
                Fault::StallAfter(k) => StreamFault::StallAfter(k),
                Fault::TruncateAfter(k) => StreamFault::TruncateAfter(k),
                Fault::Malformed => StreamFault::Malformed,
                Fault::ErrorEvent => StreamFault::ErrorEvent,
                _ => StreamFault::None,
            };
            Ok(Reply::Stream(ChatStream {
                id,
                chat,
                reply,
                chunks: shared.options.stream_chunks,
                interval: shared.options.stream_interval,
                fault,
            }))
        }
        Route::Embeddings => {
            let request = embeddings::parse(&request.body).map_err(MockError::Api)?;
            Ok(Reply::Json(embeddings::reply_json(&request)))
        }
        Route::Models => {
            let mut ids: Vec<String> = MODELS.iter().map(|m| m.to_string()).collect();
            for seen in shared.stats.models_seen() {
                if !ids.contains(&seen) {
                    ids.push(seen);
                }
            }
            let data: Vec<Value> = ids.iter().map(|id| model_json(id)).collect();
            Ok(Reply::Json(json!({"object": "list", "data": data})))
        }
        // The mock has every model a client names.
        Route::Model => Ok(Reply::Json(model_json(
            request.path.trim_start_matches("/v1/models/"),
        ))),
    }
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "syncgate-mock"})
}

/// `/stats`, `/requests`, `/reset`, and errors for paths outside the API.
pub(crate) fn control(shared: &Shared, request: &Request) -> Response {
    let (template, allow) = match request.path.as_str() {
        "/stats" => ("/stats", "GET"),
        "/requests" => ("/requests", "GET"),
        "/reset" => ("/reset", "POST"),
        _ => {
            let unknown = ApiError::UnknownRoute {
                method: request.method.clone(),
                path: request.path.clone(),
            };
            return unknown.to_response();
        }
    };
    if request.method != allow {
        let allow = allow.to_string();
        return ApiError::MethodNotAllowed { allow, template }.to_response();
    }
    match template {
        "/stats" => Response::json(200, &shared.stats.to_json()),
        "/requests" => Response::json(200, &shared.stats.log_json()),
        _ => {
            shared.stats.reset();
            Response::json(200, &json!({"reset": true}))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve_by_path_then_method() {
        assert_eq!(
            route("POST", "/v1/chat/completions").unwrap(),
            Route::ChatCompletions
        );
        assert_eq!(route("GET", "/v1/models/x").unwrap(), Route::Model);
        assert!(matches!(
            route("GET", "/v1/embeddings"),
            Err(ApiError::MethodNotAllowed { allow, .. }) if allow == "POST"
        ));
        assert!(matches!(
            route("GET", "/v1/nope"),
            Err(ApiError::UnknownRoute { .. })
        ));
        assert!(is_api("/v1/anything") && !is_api("/stats") && !is_api("/v1x"));
    }

    #[test]
    fn injected_errors_have_openai_shape_and_retry_after() {
        let r = MockError::Injected {
            status: 429,
            retry_after_s: Some(3),
        }
        .to_response();
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after", "3".to_string())));
        let r = MockError::Injected {
            status: 503,
            retry_after_s: None,
        }
        .to_response();
        assert!(!r.headers.iter().any(|(n, _)| *n == "retry-after"));
    }
}
