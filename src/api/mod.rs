//! The routes syncgate answers, the one error type handlers return, and [`handle`], the main
//! loop of a request once a worker has it.

mod admin;
mod batch;
pub(crate) mod chat;
pub(crate) mod console;
mod conversations;
mod embeddings;
mod files;
mod jobs;
mod models;
pub(crate) mod ops;
pub(crate) mod record;
mod relay;
mod requests;
mod responses;
pub(crate) mod status;
mod usage;
mod vector_stores;

use std::fmt;

use serde_json::json;

use crate::auth::Denied;
use crate::http::{Rejection, Request, Response};
use crate::providers::ProviderError;
use crate::server::State;
use crate::store::requests::TimeRange;

/// Every route: a method on a path template. The fast-lane ones are answered by the
/// connection thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Healthz,
    Readyz,
    Metrics,
    /// `GET /api/status`: the console's numbers and recent history, from memory.
    Status,
    /// `GET /`, `/console` and `/console/…`: the console's static files.
    Console,
    ChatCompletions,
    Embeddings,
    Models,
    Model,
    /// `GET /api/requests`: the request log.
    Requests,
    /// `GET /api/usage`: calls and tokens by model or day.
    Usage,
    /// `POST /api/batch`: independent chat calls side by side.
    Batch,
    ConversationList,
    ConversationCreate,
    ConversationGet,
    ConversationDelete,
    MessageList,
    MessageCreate,
    /// `GET /api/jobs`: jobs, newest first.
    JobList,
    /// `POST /api/jobs`: a job to run in the background.
    JobSubmit,
    /// `GET /api/jobs/{id}`.
    JobGet,
    /// `DELETE /api/jobs/{id}`: cancel.
    JobCancel,
    /// `GET /v1/files`: the caller's files.
    FileList,
    /// `POST /v1/files`: an upload.
    FileUpload,
    /// `GET /v1/files/{id}`.
    FileGet,
    /// `DELETE /v1/files/{id}`.
    FileDelete,
    /// `GET /v1/files/{id}/content`: the bytes as uploaded.
    FileContent,
    VectorStoreList,
    VectorStoreCreate,
    VectorStoreGet,
    /// `POST /v1/vector_stores/{id}`: name, metadata, expiry.
    VectorStoreUpdate,
    VectorStoreDelete,
    VectorStoreFileList,
    /// `POST /v1/vector_stores/{id}/files`: attach a file and queue its ingestion.
    VectorStoreFileAttach,
    VectorStoreFileGet,
    /// `POST /v1/vector_stores/{id}/files/{file_id}`: its attributes.
    VectorStoreFileUpdate,
    /// `DELETE /v1/vector_stores/{id}/files/{file_id}`: detach (the file stays).
    VectorStoreFileDetach,
    /// `GET /v1/vector_stores/{id}/files/{file_id}/content`: its chunks.
    VectorStoreFileContent,
    /// `POST /v1/vector_stores/{id}/search`.
    VectorStoreSearch,
    /// `POST /v1/responses`: answers, with `file_search` over vector stores.
    Responses,
    /// `POST /v1/vector_stores/{id}/file_batches`.
    FileBatchCreate,
    FileBatchGet,
    /// `POST /v1/vector_stores/{id}/file_batches/{batch_id}/cancel`.
    FileBatchCancel,
    FileBatchFiles,
    /// `GET /admin/keys`: every key, never a secret.
    AdminKeyList,
    /// `POST /admin/keys`: a new key, its secret shown once.
    AdminKeyCreate,
    /// `DELETE /admin/keys/{id}`: revoked at once.
    AdminKeyRevoke,
    /// `GET /admin/instances`: the live instances serving the database.
    AdminInstances,
    /// `POST /debug/panic`: panics on purpose, served only with `--enable-debug-routes`.
    DebugPanic,
}

impl Route {
    /// The route's template: the metrics label, never the raw path.
    pub(crate) fn template(self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Status => "/api/status",
            Route::Console => "/console",
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Models => "/v1/models",
            Route::Model => "/v1/models/{id}",
            Route::Requests => "/api/requests",
            Route::Usage => "/api/usage",
            Route::Batch => "/api/batch",
            Route::ConversationList | Route::ConversationCreate => "/api/conversations",
            Route::ConversationGet | Route::ConversationDelete => "/api/conversations/{id}",
            Route::MessageList | Route::MessageCreate => "/api/conversations/{id}/messages",
            Route::JobList | Route::JobSubmit => "/api/jobs",
            Route::JobGet | Route::JobCancel => "/api/jobs/{id}",
            Route::FileList | Route::FileUpload => "/v1/files",
            Route::FileGet | Route::FileDelete => "/v1/files/{id}",
            Route::FileContent => "/v1/files/{id}/content",
            Route::VectorStoreList | Route::VectorStoreCreate => "/v1/vector_stores",
            Route::VectorStoreGet | Route::VectorStoreUpdate | Route::VectorStoreDelete => {
                "/v1/vector_stores/{id}"
            }
            Route::VectorStoreFileList | Route::VectorStoreFileAttach => {
                "/v1/vector_stores/{id}/files"
            }
            Route::VectorStoreFileGet
            | Route::VectorStoreFileUpdate
            | Route::VectorStoreFileDetach => "/v1/vector_stores/{id}/files/{file_id}",
            Route::VectorStoreFileContent => "/v1/vector_stores/{id}/files/{file_id}/content",
            Route::VectorStoreSearch => "/v1/vector_stores/{id}/search",
            Route::Responses => "/v1/responses",
            Route::FileBatchCreate => "/v1/vector_stores/{id}/file_batches",
            Route::FileBatchGet => "/v1/vector_stores/{id}/file_batches/{batch_id}",
            Route::FileBatchCancel => "/v1/vector_stores/{id}/file_batches/{batch_id}/cancel",
            Route::FileBatchFiles => "/v1/vector_stores/{id}/file_batches/{batch_id}/files",
            Route::AdminKeyList | Route::AdminKeyCreate => "/admin/keys",
            Route::AdminKeyRevoke => "/admin/keys/{id}",
            Route::AdminInstances => "/admin/instances",
            Route::DebugPanic => "/debug/panic",
        }
    }

    /// The one method the route answers.
    pub(crate) fn method(self) -> &'static str {
        match self {
            Route::Healthz
            | Route::Readyz
            | Route::Metrics
            | Route::Status
            | Route::Console
            | Route::Models
            | Route::Model
            | Route::Requests
            | Route::Usage
            | Route::ConversationList
            | Route::ConversationGet
            | Route::MessageList
            | Route::JobList
            | Route::JobGet
            | Route::FileList
            | Route::FileGet
            | Route::FileContent
            | Route::VectorStoreList
            | Route::VectorStoreGet
            | Route::VectorStoreFileList
            | Route::VectorStoreFileGet
            | Route::VectorStoreFileContent
            | Route::FileBatchGet
            | Route::FileBatchFiles
            | Route::AdminKeyList
            | Route::AdminInstances => "GET",
            Route::ChatCompletions
            | Route::Embeddings
            | Route::Batch
            | Route::ConversationCreate
            | Route::MessageCreate
            | Route::AdminKeyCreate
            | Route::JobSubmit
            | Route::FileUpload
            | Route::VectorStoreCreate
            | Route::VectorStoreUpdate
            | Route::VectorStoreFileAttach
            | Route::VectorStoreFileUpdate
            | Route::VectorStoreSearch
            | Route::FileBatchCreate
            | Route::FileBatchCancel
            | Route::Responses
            | Route::DebugPanic => "POST",
            Route::ConversationDelete
            | Route::AdminKeyRevoke
            | Route::JobCancel
            | Route::FileDelete
            | Route::VectorStoreDelete
            | Route::VectorStoreFileDetach => "DELETE",
        }
    }

    /// Under `/admin`: the admin key's, never a user key's.
    pub(crate) fn is_admin(self) -> bool {
        matches!(
            self,
            Route::AdminKeyList
                | Route::AdminKeyCreate
                | Route::AdminKeyRevoke
                | Route::AdminInstances
        )
    }

    /// The knowledge base's routes, where the admin key is a caller too (it sees every key's
    /// files and stores) besides a key.
    pub(crate) fn admin_may_call(self) -> bool {
        matches!(
            self,
            Route::FileList
                | Route::FileUpload
                | Route::FileGet
                | Route::FileDelete
                | Route::FileContent
                | Route::VectorStoreList
                | Route::VectorStoreCreate
                | Route::VectorStoreGet
                | Route::VectorStoreUpdate
                | Route::VectorStoreDelete
                | Route::VectorStoreFileList
                | Route::VectorStoreFileAttach
                | Route::VectorStoreFileGet
                | Route::VectorStoreFileUpdate
                | Route::VectorStoreFileDetach
                | Route::VectorStoreFileContent
                | Route::VectorStoreSearch
                | Route::FileBatchCreate
                | Route::FileBatchGet
                | Route::FileBatchCancel
                | Route::FileBatchFiles
                | Route::Responses
        )
    }

    /// Answered on the connection thread, never queued: these must work when workers cannot.
    pub(crate) fn is_fast_lane(self) -> bool {
        matches!(
            self,
            Route::Healthz | Route::Readyz | Route::Metrics | Route::Status | Route::Console
        )
    }
}

/// The metrics label for requests that matched no route.
pub(crate) const UNMATCHED: &str = "unmatched";

/// Where a key's path starts; the id follows.
pub(crate) const ADMIN_KEYS_PREFIX: &str = "/admin/keys/";

/// Where a conversation's paths start; the id follows.
pub(crate) const CONVERSATIONS_PREFIX: &str = "/api/conversations/";

/// Finds the route for a method and path: first the routes of the path, then the one for the
/// method. Unknown paths are 404; known paths with another method are 405 naming the allowed.
pub(crate) fn route(method: &str, path: &str, debug_routes: bool) -> Result<Route, ApiError> {
    let routes: &[Route] = match path {
        "/healthz" => &[Route::Healthz],
        "/readyz" => &[Route::Readyz],
        "/metrics" => &[Route::Metrics],
        "/api/status" => &[Route::Status],
        "/" | "/console" => &[Route::Console],
        p if p.starts_with(console::HOME) => &[Route::Console],
        "/v1/chat/completions" => &[Route::ChatCompletions],
        "/v1/embeddings" => &[Route::Embeddings],
        "/v1/models" => &[Route::Models],
        "/api/requests" => &[Route::Requests],
        "/api/usage" => &[Route::Usage],
        "/api/batch" => &[Route::Batch],
        "/api/conversations" => &[Route::ConversationList, Route::ConversationCreate],
        "/admin/keys" => &[Route::AdminKeyList, Route::AdminKeyCreate],
        "/admin/instances" => &[Route::AdminInstances],
        "/api/jobs" => &[Route::JobList, Route::JobSubmit],
        "/v1/files" => &[Route::FileList, Route::FileUpload],
        "/v1/vector_stores" => &[Route::VectorStoreList, Route::VectorStoreCreate],
        "/v1/responses" => &[Route::Responses],
        "/debug/panic" if debug_routes => &[Route::DebugPanic],
        p if matches!(path_id(p, "/v1/models/"), Some((_, ""))) => &[Route::Model],
        p if matches!(path_id(p, ADMIN_KEYS_PREFIX), Some((_, ""))) => &[Route::AdminKeyRevoke],
        p if matches!(path_id(p, jobs::JOBS_PREFIX), Some((_, ""))) => {
            &[Route::JobGet, Route::JobCancel]
        }
        p if matches!(path_id(p, files::FILES_PREFIX), Some((_, ""))) => {
            &[Route::FileGet, Route::FileDelete]
        }
        p if matches!(path_id(p, files::FILES_PREFIX), Some((_, "/content"))) => {
            &[Route::FileContent]
        }
        p if path_id(p, vector_stores::PREFIX).is_some() => vector_store_routes(p),
        p => match path_id(p, CONVERSATIONS_PREFIX) {
            Some((_, "")) => &[Route::ConversationGet, Route::ConversationDelete],
            Some((_, "/messages")) => &[Route::MessageList, Route::MessageCreate],
            _ => {
                return Err(ApiError::UnknownRoute {
                    method: method.to_string(),
                    path: path.to_string(),
                })
            }
        },
    };
    if routes.is_empty() {
        return Err(ApiError::UnknownRoute {
            method: method.to_string(),
            path: path.to_string(),
        });
    }
    match routes.iter().find(|r| r.method() == method) {
        Some(route) => Ok(*route),
        None => Err(ApiError::MethodNotAllowed {
            allow: routes
                .iter()
                .map(|r| r.method())
                .collect::<Vec<_>>()
                .join(", "),
            template: routes[0].template(),
        }),
    }
}

/// The routes of a path under `/v1/vector_stores/{id}`; none for an unknown tail.
fn vector_store_routes(path: &str) -> &'static [Route] {
    let Some((_, tail)) = path_id(path, vector_stores::PREFIX) else {
        return &[];
    };
    match tail {
        "" => &[
            Route::VectorStoreGet,
            Route::VectorStoreUpdate,
            Route::VectorStoreDelete,
        ],
        "/files" => &[Route::VectorStoreFileList, Route::VectorStoreFileAttach],
        "/search" => &[Route::VectorStoreSearch],
        "/file_batches" => &[Route::FileBatchCreate],
        t if t.starts_with("/file_batches/") => match path_id(t, "/file_batches/") {
            Some((_, "")) => &[Route::FileBatchGet],
            Some((_, "/cancel")) => &[Route::FileBatchCancel],
            Some((_, "/files")) => &[Route::FileBatchFiles],
            _ => &[],
        },
        t => match path_id(t, "/files/") {
            Some((_, "")) => &[
                Route::VectorStoreFileGet,
                Route::VectorStoreFileUpdate,
                Route::VectorStoreFileDetach,
            ],
            Some((_, "/content")) => &[Route::VectorStoreFileContent],
            _ => &[],
        },
    }
}

/// The `{id}` segment of a path under `prefix`, and what follows it (empty or `/…`).
pub(crate) fn path_id<'p>(path: &'p str, prefix: &str) -> Option<(&'p str, &'p str)> {
    let rest = path.strip_prefix(prefix)?;
    let (id, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    (!id.is_empty()).then_some((id, tail))
}

/// The main loop of one request on a worker: route → handler → response. The worker is its
/// only caller and writes whatever it returns; handlers use `?` and never write themselves.
pub(crate) fn handle(state: &State, route: Route, request: &Request) -> Result<Response, ApiError> {
    match route {
        Route::ChatCompletions => chat::complete(state, request),
        Route::Embeddings => embeddings::embed(state, request),
        Route::Models => Ok(models::list(state)),
        Route::Model => models::get(state, request),
        Route::Requests => requests::list(state, request),
        Route::Usage => usage::summary(state, request),
        Route::Batch => batch::run(state, request),
        Route::ConversationList => conversations::list(state, request),
        Route::ConversationCreate => conversations::create(state, request),
        Route::ConversationGet => conversations::get(state, request),
        Route::ConversationDelete => conversations::delete(state, request),
        Route::MessageList => conversations::list_messages(state, request),
        Route::MessageCreate => conversations::add_message(state, request),
        Route::JobList => jobs::list(state, request),
        Route::JobSubmit => jobs::submit(state, request),
        Route::JobGet => jobs::get(state, request),
        Route::JobCancel => jobs::cancel(state, request),
        Route::FileList => files::list(state, request),
        Route::FileUpload => files::upload(state, request),
        Route::FileGet => files::get(state, request),
        Route::FileDelete => files::delete(state, request),
        Route::FileContent => files::content(state, request),
        Route::VectorStoreList => vector_stores::list(state, request),
        Route::VectorStoreCreate => vector_stores::create(state, request),
        Route::VectorStoreGet => vector_stores::get(state, request),
        Route::VectorStoreUpdate => vector_stores::update(state, request),
        Route::VectorStoreDelete => vector_stores::delete(state, request),
        Route::VectorStoreFileList => vector_stores::list_files(state, request),
        Route::VectorStoreFileAttach => vector_stores::attach_file(state, request),
        Route::VectorStoreFileGet => vector_stores::get_file(state, request),
        Route::VectorStoreFileUpdate => vector_stores::update_file(state, request),
        Route::VectorStoreFileDetach => vector_stores::detach_file(state, request),
        Route::VectorStoreFileContent => vector_stores::file_content(state, request),
        Route::VectorStoreSearch => vector_stores::search(state, request),
        Route::Responses => responses::create(state, request),
        Route::FileBatchCreate => vector_stores::create_batch(state, request),
        Route::FileBatchGet => vector_stores::get_batch(state, request),
        Route::FileBatchCancel => vector_stores::cancel_batch(state, request),
        Route::FileBatchFiles => vector_stores::list_batch_files(state, request),
        Route::AdminKeyList => admin::list_keys(state),
        Route::AdminKeyCreate => admin::create_key(state, request),
        Route::AdminKeyRevoke => admin::revoke_key(state, request),
        Route::AdminInstances => admin::list_instances(state),
        Route::DebugPanic => panic!("deliberate panic from /debug/panic"),
        Route::Healthz | Route::Readyz | Route::Metrics | Route::Status | Route::Console => {
            ops::answer(state, route, request)
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        if let crate::store::StoreError::Failed(why) | crate::store::StoreError::Duplicate(why) = &e
        {
            log::error!("database error: {why}");
        }
        ApiError::Store(e)
    }
}

/// Refuses a query string naming a parameter not in `known`, so a misspelt filter is an error
/// rather than silently ignored.
pub(crate) fn known_params(query: &str, known: &[&str]) -> Result<(), ApiError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        let key = decode(key).unwrap_or_else(|| key.to_string());
        if !known.contains(&key.as_str()) {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "unknown query parameter '{key}'; expected one of: {}",
                    known.join(", ")
                ),
                param: key,
            });
        }
    }
    Ok(())
}

/// The value of `name` in a query string (`a=1&b=x%20y`), percent-decoded (`+` is a space);
/// the first one when repeated. `None` when absent; an error when not valid UTF-8 once decoded.
pub(crate) fn query_param(query: &str, name: &str) -> Result<Option<String>, ApiError> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(key).as_deref() == Some(name) {
            return decode(value)
                .map(Some)
                .ok_or_else(|| ApiError::InvalidRequest {
                    message: format!("query parameter '{name}' is not valid percent-encoded UTF-8"),
                    param: name.to_string(),
                });
        }
    }
    Ok(None)
}

/// A positive integer query parameter no larger than `max`, else `default` when absent.
pub(crate) fn query_limit(
    query: &str,
    name: &str,
    default: u32,
    max: u32,
) -> Result<u32, ApiError> {
    match query_param(query, name)? {
        None => Ok(default),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::InvalidRequest {
                message: format!("'{name}' must be an integer from 1 to {max}"),
                param: name.to_string(),
            }),
        },
    }
}

/// An instant query parameter, unix seconds or RFC 3339 text, as unix ms; `None` when absent.
pub(crate) fn query_time(query: &str, name: &str) -> Result<Option<i64>, ApiError> {
    match query_param(query, name)? {
        None => Ok(None),
        Some(text) => match crate::time::parse_instant(&text) {
            Some(ms) => Ok(Some(ms)),
            None => Err(ApiError::InvalidRequest {
                message: format!(
                    "'{name}' must be {}; got {text:?}",
                    crate::time::INSTANT_FORMS
                ),
                param: name.to_string(),
            }),
        },
    }
}

/// The `since` and `until` parameters: the calls logged at or after `since` and before `until`.
pub(crate) fn query_time_range(query: &str) -> Result<TimeRange, ApiError> {
    let range = TimeRange {
        since_ms: query_time(query, "since")?,
        until_ms: query_time(query, "until")?,
    };
    if let (Some(since), Some(until)) = (range.since_ms, range.until_ms) {
        if since >= until {
            return Err(ApiError::InvalidRequest {
                message: "'until' must be later than 'since'".to_string(),
                param: "until".to_string(),
            });
        }
    }
    Ok(range)
}

fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Refuses a model the caller's key may not call. Admission checks the body's `model` before
/// the request is queued; handlers check again the model they will actually call, so no body
/// that admission could not read slips past.
pub(crate) fn check_model(request: &Request, model: &str) -> Result<(), ApiError> {
    match &request.caller {
        Some(caller) if !crate::auth::Auth::allows_model(caller, model) => {
            Err(ApiError::Denied(crate::auth::Denied::ModelNotAllowed {
                model: model.to_string(),
            }))
        }
        _ => Ok(()),
    }
}

/// Reads a request body that must be a JSON object.
pub(crate) fn json_object(
    body: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(ApiError::InvalidRequest {
            message: "the request body must be a JSON object".to_string(),
            param: String::new(),
        }),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

/// Marks an answer with where it came from and what syncgate added: `x-syncgate-provider`
/// (`provider/upstream-model`), `x-syncgate-attempts`, and `x-syncgate-overhead-ms`, the time
/// so far not spent blocked on a provider, JSON work included (for a stream, until its head).
pub(crate) fn annotate(
    response: Response,
    request: &Request,
    (target, attempts): (String, u32),
    clock: crate::providers::UpstreamClock,
    metrics: &crate::metrics::Metrics,
) -> Response {
    let overhead = request.received.elapsed().saturating_sub(clock.blocked);
    metrics.overhead.observe(overhead.as_secs_f64());
    response
        .with_header("x-syncgate-provider", target)
        .with_header("x-syncgate-attempts", attempts.to_string())
        .with_header(
            "x-syncgate-overhead-ms",
            format!("{:.3}", overhead.as_secs_f64() * 1000.0),
        )
}

/// Every way a request can fail, from the front end to the handlers. [`ApiError::status`] is
/// the one place an error becomes an HTTP status.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// The front end refused the request while reading it (limits, framing, deadlines).
    Http(Rejection),
    /// No route has this path.
    UnknownRoute { method: String, path: String },
    /// The path exists, but not with this method; `allow` lists the methods it takes.
    MethodNotAllowed {
        allow: String,
        template: &'static str,
    },
    /// The body is not JSON; the message carries the parser's position.
    InvalidJson(String),
    /// The JSON is well-formed but a parameter is missing or wrong; `param` names it.
    InvalidRequest { message: String, param: String },
    /// No model by this name.
    ModelNotFound(String),
    /// No stored object of this kind (`conversation`, …) with this id.
    NotFound { kind: &'static str, id: String },
    /// The vector store has expired (unused for its `expires_after` days): it may be read,
    /// listed and deleted, never changed or searched again.
    VectorStoreExpired { id: String },
    /// The database could not take or give the data (busy, closing, failed).
    Store(crate::store::StoreError),
    /// Turned away at admission: no key, a bad key, a model the key may not use, a limit.
    Denied(crate::auth::Denied),
    /// `[jobs] max_queued` jobs are queued or running already.
    JobsFull { max_queued: usize },
    /// The job has ended (in this state) and cannot be cancelled.
    JobFinished { id: String, status: &'static str },
    /// Calling the model's providers failed (after retries and fallbacks).
    Provider(ProviderError),
    /// Every queue slot is taken; the client should retry after this many seconds.
    QueueFull { retry_after_s: u64 },
    /// A call of a batch found every batch thread busy and the batch queue full for as long
    /// as its batch could wait (`waited_ms`); it was not run.
    BatchPoolFull { waited_ms: u64 },
    /// The request waited longer than `max_queue_wait` and would be served too late.
    QueueTimeout { waited_ms: u64 },
    /// The server is shutting down and takes no new work.
    Draining,
    /// `max_connections` connections are already open.
    TooManyConnections,
    /// The console or `/api/status` was asked for under a `Host` that is not this machine's
    /// while no key is needed (DNS rebinding).
    ForeignHost { host: String },
    /// The handler panicked; details are in the server log only.
    Internal,
}

impl ApiError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            ApiError::Http(r) => match r {
                Rejection::RequestLineTooLong => 414,
                Rejection::HeaderTooLarge(_) => 431,
                Rejection::BodyTooLarge { .. } => 413,
                Rejection::UploadsBusy { .. } => 503,
                Rejection::Malformed(_) => 400,
                Rejection::UnsupportedTransferCoding(_) => 501,
                Rejection::ExpectationFailed => 417,
                Rejection::HeadTimeout | Rejection::BodyTimeout => 408,
            },
            ApiError::UnknownRoute { .. }
            | ApiError::ModelNotFound(_)
            | ApiError::NotFound { .. } => 404,
            ApiError::Store(e) => match e {
                crate::store::StoreError::Busy
                | crate::store::StoreError::Closed
                | crate::store::StoreError::Unavailable => 503,
                crate::store::StoreError::Failed(_) | crate::store::StoreError::Duplicate(_) => 500,
            },
            ApiError::JobsFull { .. } => 503,
            ApiError::JobFinished { .. } => 409,
            ApiError::Denied(d) => match d {
                Denied::Missing
                | Denied::Unknown
                | Denied::Revoked
                | Denied::Expired
                | Denied::NotAdmin => 401,
                Denied::ModelNotAllowed { .. } | Denied::AdminDisabled => 403,
                Denied::Limited(_) => 429,
                Denied::StoreUnavailable => 503,
            },
            ApiError::ForeignHost { .. } => 403,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::InvalidJson(_)
            | ApiError::InvalidRequest { .. }
            | ApiError::VectorStoreExpired { .. } => 400,
            ApiError::Provider(e) => match e {
                ProviderError::Unavailable { .. } | ProviderError::AtCapacity { .. } => 503,
                ProviderError::Timeout { .. } => 504,
                ProviderError::Status { status: 429, .. } => 429,
                // The provider refused our credentials: our configuration, not the client.
                // A provider's 421 is ours to fix too, and 421 means "nothing was done, try
                // another instance" to a proxy that asked for it (`to_response_for`).
                ProviderError::Status {
                    status: 401 | 403 | 421,
                    ..
                } => 502,
                // The client's request was wrong: pass the provider's verdict through.
                ProviderError::Status { status, .. } if (400..500).contains(status) => *status,
                ProviderError::Status { .. }
                | ProviderError::Connect { .. }
                | ProviderError::BadReply { .. } => 502,
            },
            ApiError::QueueFull { .. }
            | ApiError::QueueTimeout { .. }
            | ApiError::BatchPoolFull { .. }
            | ApiError::Draining
            | ApiError::TooManyConnections => 503,
            ApiError::Internal => 500,
        }
    }

    /// OpenAI's `error.type`.
    fn kind(&self) -> &str {
        if let ApiError::Provider(ProviderError::Status {
            status,
            kind: Some(kind),
            ..
        }) = self
        {
            if (400..500).contains(status) && *status != 401 && *status != 403 {
                return kind;
            }
        }
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            502 | 504 => "upstream_error",
            500 => "server_error",
            501 => "not_implemented",
            503 => "overloaded",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code`: stable, for programs to match on.
    pub(crate) fn code(&self) -> &str {
        match self {
            ApiError::Provider(e) => match e {
                ProviderError::Unavailable { .. } => "provider_unavailable",
                ProviderError::AtCapacity { .. } => "provider_at_capacity",
                ProviderError::Timeout { .. } => "upstream_timeout",
                ProviderError::Connect { .. } => "upstream_unreachable",
                ProviderError::BadReply { .. } => "bad_upstream_reply",
                ProviderError::Status { status: 429, .. } => "rate_limit_exceeded",
                ProviderError::Status {
                    status: 401 | 403, ..
                } => "upstream_auth",
                ProviderError::Status {
                    status,
                    code: Some(code),
                    ..
                } if (400..500).contains(status) => code,
                ProviderError::Status { status, .. } if (400..500).contains(status) => {
                    "invalid_request"
                }
                ProviderError::Status { .. } => "upstream_error",
            },
            ApiError::Http(r) => match r {
                Rejection::RequestLineTooLong => "request_line_too_long",
                Rejection::HeaderTooLarge(_) => "header_too_large",
                Rejection::BodyTooLarge { .. } => "body_too_large",
                Rejection::UploadsBusy { .. } => "uploads_busy",
                Rejection::Malformed(_) => "bad_request",
                Rejection::UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
                Rejection::ExpectationFailed => "expectation_failed",
                Rejection::HeadTimeout | Rejection::BodyTimeout => "request_timeout",
            },
            ApiError::UnknownRoute { .. } => "unknown_route",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::NotFound { .. } => "not_found",
            ApiError::VectorStoreExpired { .. } => "vector_store_expired",
            ApiError::JobsFull { .. } => "jobs_full",
            ApiError::JobFinished { .. } => "job_finished",
            ApiError::Denied(d) => match d {
                Denied::Missing => "missing_api_key",
                Denied::Unknown => "invalid_api_key",
                Denied::Revoked => "api_key_revoked",
                Denied::Expired => "api_key_expired",
                Denied::ModelNotAllowed { .. } => "model_not_allowed",
                Denied::NotAdmin => "admin_key_required",
                Denied::AdminDisabled => "admin_disabled",
                Denied::Limited(_) => "rate_limit_exceeded",
                Denied::StoreUnavailable => "store_unavailable",
            },
            ApiError::Store(e) => e.code(),
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::QueueTimeout { .. } => "queue_timeout",
            ApiError::BatchPoolFull { .. } => "batch_pool_full",
            ApiError::Draining => "draining",
            ApiError::TooManyConnections => "too_many_connections",
            ApiError::ForeignHost { .. } => "host_not_allowed",
            ApiError::Internal => "internal_error",
        }
    }

    /// The `syncgate_rejected_total` reason this error counts as, if it is a refusal by a limit.
    pub(crate) fn reject_reason(&self) -> Option<&'static str> {
        match self {
            ApiError::Http(r) => Some(match r {
                Rejection::RequestLineTooLong | Rejection::HeaderTooLarge(_) => "header_too_large",
                Rejection::BodyTooLarge { .. } => "body_too_large",
                Rejection::UploadsBusy { .. } => "uploads_busy",
                Rejection::HeadTimeout => "header_timeout",
                Rejection::BodyTimeout => "body_timeout",
                Rejection::Malformed(_)
                | Rejection::UnsupportedTransferCoding(_)
                | Rejection::ExpectationFailed => "bad_request",
            }),
            ApiError::QueueFull { .. } => Some("queue_full"),
            ApiError::QueueTimeout { .. } => Some("queue_timeout"),
            ApiError::Draining => Some("draining"),
            ApiError::TooManyConnections => Some("too_many_connections"),
            _ => None,
        }
    }

    /// The body in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
    fn body(&self) -> serde_json::Value {
        json!({"error": self.object()})
    }

    /// OpenAI's error object, `{"message", "type", "param", "code"}`: the body's `error`, and
    /// a batch item's.
    pub(crate) fn object(&self) -> serde_json::Value {
        let param = match self {
            ApiError::InvalidRequest { param, .. } => json!(param),
            _ => serde_json::Value::Null,
        };
        json!({
            "message": self.to_string(),
            "type": self.kind(),
            "param": param,
            "code": self.code(),
        })
    }

    /// Whether this refusal came before any work on the request: nothing reached a provider
    /// or the store on its behalf, so another instance may take it as if this one had never
    /// seen it. A key whose shared limits could not be checked is one: it is refused at
    /// admission, before the queue, and the most that can have reached the database is the
    /// admission call itself (limiter bookkeeping that a client's own retry after the 503
    /// would repeat). Another instance may well admit it: this one may have lost its lease, or
    /// its limiter connections may all be taken.
    pub(crate) fn is_before_work(&self) -> bool {
        matches!(
            self,
            ApiError::QueueFull { .. }
                | ApiError::QueueTimeout { .. }
                | ApiError::Draining
                | ApiError::TooManyConnections
                | ApiError::Denied(crate::auth::Denied::StoreUnavailable)
        )
    }

    /// The error as the answer to `request`. A refusal before any work is `421 Misdirected
    /// Request` instead of 503 when the request carries [`NEXT_UPSTREAM_HEADER`] (nginx's
    /// config sets it): nginx can tell a retryable refusal only by its status, and syncgate
    /// sends no other 421, so nginx may send exactly these to the next instance, POST
    /// included, while a 503 from anywhere else, possibly after a provider call, reaches the
    /// client untouched (deploy/nginx/syncgate.conf, docs/deploy.md).
    pub(crate) fn to_response_for(&self, request: &crate::http::Request) -> Response {
        let mut response = self.to_response();
        if self.is_before_work() && request.header(NEXT_UPSTREAM_HEADER).is_some() {
            response.status = 421;
        }
        response
    }

    /// The error as an HTTP response, with the headers its status needs.
    pub(crate) fn to_response(&self) -> Response {
        let response = Response::json(self.status(), &self.body());
        match self {
            ApiError::QueueFull { retry_after_s } => {
                response.with_header("retry-after", retry_after_s.to_string())
            }
            ApiError::Draining
            | ApiError::Http(Rejection::UploadsBusy { .. })
            | ApiError::JobsFull { .. }
            | ApiError::TooManyConnections
            | ApiError::Denied(crate::auth::Denied::StoreUnavailable)
            | ApiError::Store(
                crate::store::StoreError::Busy
                | crate::store::StoreError::Closed
                | crate::store::StoreError::Unavailable,
            ) => response.with_header("retry-after", "1".to_string()),
            ApiError::Denied(crate::auth::Denied::Limited(refusal)) => {
                let mut response =
                    response.with_header("retry-after", refusal.retry_after_secs().to_string());
                for (name, value) in refusal.headers() {
                    response = response.with_header(name, value);
                }
                response
            }
            ApiError::Denied(_) => response.with_header("www-authenticate", "Bearer".to_string()),
            ApiError::MethodNotAllowed { allow, .. } => {
                response.with_header("allow", allow.clone())
            }
            // The provider's own wait when it gave one; at least a second either way.
            ApiError::Provider(ProviderError::Status {
                status: 429,
                retry_after,
                ..
            }) => {
                let secs = retry_after.map_or(1, |d| d.as_secs().max(1));
                response.with_header("retry-after", secs.to_string())
            }
            ApiError::Provider(
                ProviderError::Unavailable { .. } | ProviderError::AtCapacity { .. },
            ) => response.with_header("retry-after", "1".to_string()),
            _ => response,
        }
    }
}

/// The request header by which a proxy asks for refusals before any work as `421` (its value
/// is not read): see [`ApiError::to_response_for`].
pub(crate) const NEXT_UPSTREAM_HEADER: &str = "x-syncgate-next-upstream";

impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> ApiError {
        ApiError::Provider(e)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Http(r) => match r {
                Rejection::RequestLineTooLong => f.write_str("request line longer than 8 KiB"),
                Rejection::HeaderTooLarge(why) => write!(f, "request headers too large: {why}"),
                Rejection::BodyTooLarge { limit } => {
                    write!(f, "request body larger than the limit of {limit} bytes")
                }
                Rejection::UploadsBusy { at_once } => write!(
                    f,
                    "{at_once} uploads are being received already, the most held at once \
                     ([files] max_uploads); retry in a moment"
                ),
                Rejection::Malformed(why) => f.write_str(why),
                Rejection::UnsupportedTransferCoding(c) => {
                    write!(f, "transfer coding {c:?} is not supported; only chunked is")
                }
                Rejection::ExpectationFailed => f.write_str("only `Expect: 100-continue` is supported"),
                Rejection::HeadTimeout => f.write_str("request head not received in time"),
                Rejection::BodyTimeout => f.write_str("request body stalled"),
            },
            ApiError::UnknownRoute { method, path } => write!(f, "no route for {method} {path}"),
            ApiError::MethodNotAllowed { allow, template } => {
                write!(f, "{template} only accepts {allow}")
            }
            ApiError::InvalidJson(why) => write!(f, "request body is not valid JSON: {why}"),
            ApiError::InvalidRequest { message, .. } => f.write_str(message),
            ApiError::ModelNotFound(model) => write!(f, "the model {model:?} does not exist"),
            ApiError::NotFound { kind, id } => write!(f, "no {kind} with id {id:?}"),
            ApiError::VectorStoreExpired { id } => write!(
                f,
                "vector store {id:?} has expired: it may be read or deleted, not changed or searched"
            ),
            ApiError::JobsFull { max_queued } => write!(
                f,
                "{max_queued} jobs are queued or running, the most this server holds; retry later"
            ),
            ApiError::JobFinished { id, status } => {
                write!(f, "job {id:?} has already ended ({status}); nothing to cancel")
            }
            // Never the presented key: only what is wrong with it.
            ApiError::Denied(d) => match d {
                Denied::Missing => f.write_str(
                    "no API key: send it as `Authorization: Bearer <key>`",
                ),
                Denied::Unknown => f.write_str("the API key is not valid"),
                Denied::Revoked => f.write_str("the API key was revoked"),
                Denied::Expired => f.write_str("the API key has expired"),
                Denied::ModelNotAllowed { model } => {
                    write!(f, "this API key may not call the model {model:?}")
                }
                Denied::NotAdmin => f.write_str("this endpoint needs the admin key"),
                Denied::AdminDisabled => f.write_str(
                    "the admin API is disabled: start syncgate with SYNCGATE_ADMIN_KEY set",
                ),
                Denied::Limited(refusal) => write!(
                    f,
                    "rate limit reached for this key ({}); retry after {} s",
                    refusal.limit,
                    refusal.retry_after_secs()
                ),
                Denied::StoreUnavailable => f.write_str(
                    "this key's limits are shared through the database, which cannot be \
                     reached; retry later",
                ),
            },
            // The detail (SQLite's words) goes to the server log, not to the client.
            ApiError::Store(
                crate::store::StoreError::Failed(_) | crate::store::StoreError::Duplicate(_),
            ) => {
                f.write_str("the database failed to store or read the data")
            }
            ApiError::Store(e) => write!(f, "{e}; retry shortly"),
            // A client error's message is the provider's own; anything else says which
            // provider failed and how (never a key: errors carry no request headers).
            ApiError::Provider(ProviderError::Status {
                status, message, ..
            }) if (400..500).contains(status) && !matches!(status, 401 | 403 | 429) => {
                f.write_str(message)
            }
            ApiError::Provider(e) => write!(f, "{e}"),
            ApiError::QueueFull { retry_after_s } => write!(
                f,
                "server at capacity: every worker is busy and the queue is full; retry after {retry_after_s} s"
            ),
            ApiError::QueueTimeout { waited_ms } => write!(
                f,
                "request waited {waited_ms} ms for a worker, longer than the server's max_queue_wait"
            ),
            ApiError::BatchPoolFull { waited_ms } => write!(
                f,
                "the batch pool is full: every batch thread is busy and the batch queue stayed full past the batch's wait of {waited_ms} ms; retry shortly"
            ),
            ApiError::Draining => f.write_str("server is shutting down and accepts no new requests"),
            ApiError::TooManyConnections => {
                f.write_str("server has too many open connections; retry shortly")
            }
            ApiError::ForeignHost { host } => write!(
                f,
                "Host {host:?} is not this machine's; while no API key is needed the console and \
                 /api/status answer only a loopback name or address, or the listen address"
            ),
            ApiError::Internal => f.write_str("internal error while handling the request"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        let q = "model=gpt%2D4o+mini&limit=5&empty=&flag&model=second";
        assert_eq!(
            query_param(q, "model").unwrap().as_deref(),
            Some("gpt-4o mini")
        );
        assert_eq!(query_param(q, "empty").unwrap().as_deref(), Some(""));
        assert_eq!(query_param(q, "flag").unwrap().as_deref(), Some(""));
        assert_eq!(query_param(q, "absent").unwrap(), None);
        assert!(query_param("x=%ff", "x").is_err());
        assert!(query_param("x=%4", "x").is_err());
        assert_eq!(query_limit(q, "limit", 20, 100).unwrap(), 5);
        assert_eq!(query_limit("", "limit", 20, 100).unwrap(), 20);
        for bad in ["limit=0", "limit=101", "limit=-1", "limit=x"] {
            assert!(query_limit(bad, "limit", 20, 100).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_resolve_by_path_then_method() {
        assert_eq!(route("GET", "/healthz", false).unwrap(), Route::Healthz);
        assert_eq!(
            route("POST", "/v1/chat/completions", false).unwrap(),
            Route::ChatCompletions
        );
        assert_eq!(
            route("GET", "/v1/models/mock", false).unwrap(),
            Route::Model
        );
        let e = route("GET", "/v1/chat/completions", false).unwrap_err();
        assert!(matches!(e, ApiError::MethodNotAllowed { allow, .. } if allow == "POST"));
        assert_eq!(
            route("GET", "/api/conversations", false).unwrap(),
            Route::ConversationList
        );
        assert_eq!(route("POST", "/api/batch", false).unwrap(), Route::Batch);
        assert_eq!(route("GET", "/api/status", false).unwrap(), Route::Status);
        for console in ["/", "/console", "/console/", "/console/console.js"] {
            assert_eq!(route("GET", console, false).unwrap(), Route::Console);
            assert!(route(console, "GET", false).is_err());
        }
        assert!(Route::Status.is_fast_lane() && Route::Console.is_fast_lane());
        let e = route("GET", "/api/batch", false).unwrap_err();
        assert!(matches!(e, ApiError::MethodNotAllowed { allow, .. } if allow == "POST"));
        assert_eq!(
            route("DELETE", "/api/conversations/conv_1", false).unwrap(),
            Route::ConversationDelete
        );
        assert_eq!(
            route("POST", "/api/conversations/conv_1/messages", false).unwrap(),
            Route::MessageCreate
        );
        let e = route("PUT", "/api/conversations/conv_1", false).unwrap_err();
        assert!(matches!(
            e,
            ApiError::MethodNotAllowed { allow, template: "/api/conversations/{id}" }
                if allow == "GET, DELETE"
        ));
        for unknown in [
            "/api/conversations/",
            "/api/conversations/c/other",
            "/api/conversations/c/messages/m",
        ] {
            assert!(
                matches!(
                    route("GET", unknown, false),
                    Err(ApiError::UnknownRoute { .. })
                ),
                "{unknown}"
            );
        }
        assert!(matches!(
            route("GET", "/nope", false),
            Err(ApiError::UnknownRoute { .. })
        ));
        assert!(matches!(
            route("GET", "/v1/models/a/b", false),
            Err(ApiError::UnknownRoute { .. })
        ));
        assert!(route("POST", "/debug/panic", false).is_err());
        assert_eq!(
            route("POST", "/debug/panic", true).unwrap(),
            Route::DebugPanic
        );
    }

    /// Issue 15, point 9: 421 means "refused before any work" and nothing else, so nginx may
    /// send it to another instance.
    #[test]
    fn only_refusals_before_work_may_become_421_and_a_providers_421_is_a_502() {
        assert!(ApiError::Draining.is_before_work());
        assert!(ApiError::QueueFull { retry_after_s: 1 }.is_before_work());
        assert!(ApiError::QueueTimeout { waited_ms: 1 }.is_before_work());
        assert!(ApiError::Denied(crate::auth::Denied::StoreUnavailable).is_before_work());
        assert!(
            !ApiError::Store(crate::store::StoreError::Unavailable).is_before_work(),
            "a handler's store call may have written"
        );
        let at_cap = ApiError::Provider(ProviderError::AtCapacity {
            provider: "p".into(),
        });
        assert!(
            !at_cap.is_before_work(),
            "it may follow a call to another target"
        );
        let misdirected = ApiError::Provider(ProviderError::Status {
            provider: "p".into(),
            status: 421,
            retry_after: None,
            message: "misdirected".into(),
            kind: None,
            code: None,
        });
        assert_eq!(misdirected.status(), 502);
    }

    #[test]
    fn errors_have_openai_shape_and_the_right_headers() {
        let e = ApiError::QueueFull { retry_after_s: 3 };
        let r = e.to_response();
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "3".to_string())));
        let v = e.body();
        assert_eq!(v["error"]["code"], "queue_full");
        assert_eq!(v["error"]["type"], "overloaded");
        assert!(v["error"]["message"].is_string());
        let r = ApiError::MethodNotAllowed {
            allow: "POST".to_string(),
            template: "/v1/chat/completions",
        }
        .to_response();
        assert!(r.headers.contains(&("allow", "POST".to_string())));
    }
}
