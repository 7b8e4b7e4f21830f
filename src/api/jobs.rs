//! `/api/jobs`: chat completions to run in the background. A submission is answered `202`
//! only once the job is committed; the job runner (src/jobs.rs) runs it at least once, on
//! threads of its own; the client polls `GET /api/jobs/{id}` for the result.

use serde_json::{json, Value};

use super::chat::{self, invalid, missing};
use super::{json_object, known_params, path_id, query_limit, query_param, ApiError};
use crate::auth::Caller;
use crate::http::{Request, Response};
use crate::server::State;
use crate::store::jobs::{self as store, Cancelled, Job, JobKind, NewJob, Status, Submitted};
use crate::store::{new_id, now_ms};

/// Where a job's path starts; the id follows.
pub(crate) const JOBS_PREFIX: &str = "/api/jobs/";

/// `POST /api/jobs`: `{"request": {…a chat completions body…}, "metadata": {…}}`.
pub(crate) fn submit(state: &State, request: &Request) -> Result<Response, ApiError> {
    let new = parse_submission(state, request)?;
    let max_queued = state.config.jobs.max_queued;
    let submitted = store::submit(&state.store, new.clone(), max_queued)?;
    let id = match submitted {
        Submitted::Created(id) => {
            state.jobs.notify();
            log::info!("job {id} queued (model {})", new.model);
            id
        }
        Submitted::Existing(id) => id,
        Submitted::Full => return Err(ApiError::JobsFull { max_queued }),
    };
    let job = find(state, &id)?;
    Ok(Response::json(202, &job_json(&job)).with_header("location", format!("{JOBS_PREFIX}{id}")))
}

/// `GET /api/jobs/{id}`.
pub(crate) fn get(state: &State, request: &Request) -> Result<Response, ApiError> {
    let job = find(state, job_id(request))?;
    Ok(Response::json(200, &job_json(&job)))
}

/// `GET /api/jobs?status=&limit=&before=`: newest first.
pub(crate) fn list(state: &State, request: &Request) -> Result<Response, ApiError> {
    let query = request.query.as_str();
    known_params(query, &["status", "limit", "before"])?;
    let status = match query_param(query, "status")? {
        None => None,
        Some(text) => Some(Status::parse(&text).ok_or_else(|| {
            invalid(
                "status",
                "'status' must be queued, running, succeeded, failed or cancelled",
            )
        })?),
    };
    let limit = query_limit(query, "limit", 20, 100)?;
    let before = query_param(query, "before")?;
    let page = store::list(&state.store, status, limit, before.as_deref())?;
    let (jobs, has_more) = page.ok_or_else(|| {
        invalid(
            "before",
            &format!("no job has id {:?}", before.unwrap_or_default()),
        )
    })?;
    let data: Vec<Value> = jobs.iter().map(job_json).collect();
    Ok(Response::json(
        200,
        &json!({"object": "list", "data": data, "has_more": has_more}),
    ))
}

/// `DELETE /api/jobs/{id}`: a queued job is cancelled at once; a running one ends cancelled
/// when its call returns; a finished one cannot be cancelled (409).
pub(crate) fn cancel(state: &State, request: &Request) -> Result<Response, ApiError> {
    let id = job_id(request).to_string();
    let cancelled = store::cancel(&state.store, id.clone(), now_ms())?;
    match cancelled {
        Cancelled::Now | Cancelled::WhenItReturns => {
            Ok(Response::json(200, &job_json(&find(state, &id)?)))
        }
        Cancelled::AlreadyFinal(status) => Err(ApiError::JobFinished {
            id,
            status: status.name(),
        }),
        Cancelled::NotFound => Err(not_found(&id)),
    }
}

/// Reads and checks a submission; the request is validated as `/v1/chat/completions` would.
fn parse_submission(state: &State, request: &Request) -> Result<NewJob, ApiError> {
    let body = json_object(&request.body)?;
    let chat_body = match body.get("request") {
        Some(Value::Object(object)) => Value::Object(object.clone()),
        None | Some(Value::Null) => return Err(missing("request")),
        Some(_) => {
            return Err(invalid(
                "request",
                "'request' must be a chat completions body (an object)",
            ))
        }
    };
    let chat =
        chat::parse(&serde_json::to_vec(&chat_body).unwrap_or_default()).map_err(|e| match e {
            ApiError::InvalidRequest { message, param } => ApiError::InvalidRequest {
                message,
                param: format!("request.{param}"),
            },
            other => other,
        })?;
    if chat.stream {
        return Err(invalid(
            "request.stream",
            "a job's result is stored, not streamed: 'stream' must be false",
        ));
    }
    if state.providers.route(&chat.model).is_none() {
        return Err(ApiError::ModelNotFound(chat.model));
    }
    super::check_model(request, &chat.model)?;
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => None,
        Some(m @ Value::Object(_)) => Some(m.clone()),
        Some(_) => return Err(invalid("metadata", "'metadata' must be an object")),
    };
    let key = match request.header("idempotency-key") {
        None => None,
        Some(k) if (1..=255).contains(&k.len()) => Some(k.to_string()),
        Some(_) => {
            return Err(invalid(
                "Idempotency-Key",
                "the Idempotency-Key header must be 1 to 255 bytes long",
            ))
        }
    };
    let new = NewJob {
        id: new_id("job"),
        request: chat_body,
        metadata,
        model: chat.model,
        max_attempts: state.config.jobs.max_attempts,
        idempotency_key: key,
        key_id: request.caller.as_ref().and_then(Caller::key_id),
        created_ms: now_ms(),
        kind: JobKind::Chat,
    };
    Ok(new)
}

fn job_id(request: &Request) -> &str {
    path_id(&request.path, JOBS_PREFIX).map_or("", |(id, _)| id)
}

fn find(state: &State, id: &str) -> Result<Job, ApiError> {
    store::get(&state.store, id)?.ok_or_else(|| not_found(id))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        kind: "job",
        id: id.to_string(),
    }
}

/// A job as the API shows it.
fn job_json(job: &Job) -> Value {
    let seconds = |ms: i64| ms.div_euclid(1000);
    let wait_ms = job.started_ms.map(|s| s - job.created_ms);
    let run_ms = match (job.started_ms, job.finished_ms) {
        (Some(s), Some(f)) => Some(f - s),
        _ => None,
    };
    json!({
        "id": job.id,
        "object": "job",
        "status": job.status.name(),
        "model": job.model,
        "metadata": job.metadata,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "result": job.result,
        "error": job.error,
        "created_at": seconds(job.created_ms),
        "started_at": job.started_ms.map(seconds),
        "finished_at": job.finished_ms.map(seconds),
        "wait_ms": wait_ms,
        "run_ms": run_ms,
    })
}
