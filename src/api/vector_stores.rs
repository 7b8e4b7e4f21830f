//! `/v1/vector_stores` (issue 16): OpenAI's vector stores, their files and search, kept by
//! syncgate in its own database. Attaching a file queues its ingestion as a durable job; the
//! SDK polls the file (`openai-poll-after-ms` says how often) until it is `completed` or
//! `failed`. A store belongs to the key that made it, as files do: another key's store is 404.
//! Search embeds the query with the store's model, scans the store's vectors in memory (loaded
//! once into a bounded cache, scanned across cores), and with `ranking_options.ranker` =
//! `hybrid` fuses that ranking with full-text search. An expired store may be read, listed
//! and deleted, never changed or searched: the job lease thread reclaims its chunks.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::chat::{invalid, missing};
use super::files::{list_json, order, owner};
use super::record::Record;
use super::{json_object, known_params, path_id, query_limit, query_param, ApiError};
use crate::http::{Request, Response};
use crate::ingest;
use crate::knowledge::chunk::Strategy;
use crate::knowledge::filters::{check_attributes, Filter};
use crate::knowledge::vector::{self, Matrix};
use crate::server::State;
use crate::store::chunks;
use crate::store::files::{self, Owner};
use crate::store::jobs::{self, JobKind, NewJob, Submitted};
use crate::store::vector_stores::{
    self as store, Changes, Counted, FileListing, FileStatus, StoreFile, VectorStore,
};
use crate::store::{new_id, now_ms};

/// Where a vector store's paths start; the id follows.
pub(crate) const PREFIX: &str = "/v1/vector_stores/";
/// How soon the SDK should poll a store or file that is still being ingested.
const POLL_AFTER_MS: &str = "500";
/// Most results a search returns, and the default.
const MAX_RESULTS: u64 = 50;
const DEFAULT_RESULTS: u64 = 10;
/// Reciprocal rank fusion's constant.
const RRF_K: f32 = 60.0;
/// Most queries one search runs.
const MAX_QUERIES: usize = 16;
/// A store's `last_active_at` is moved by a search once it is at least this old (seconds).
const TOUCH_EVERY_S: i64 = 60;

/// The vector store id of the request's path.
fn store_id(request: &Request) -> &str {
    path_id(&request.path, PREFIX).map_or("", |(id, _)| id)
}

/// The file id after `/files/` in the request's path.
fn file_id(request: &Request) -> &str {
    let (_, tail) = path_id(&request.path, PREFIX).unwrap_or(("", ""));
    path_id(tail, "/files/").map_or("", |(id, _)| id)
}

fn not_found(kind: &'static str, id: &str) -> ApiError {
    ApiError::NotFound {
        kind,
        id: id.to_string(),
    }
}

/// The store the path names, if the caller may see it.
fn find(state: &State, request: &Request) -> Result<Counted, ApiError> {
    let id = store_id(request);
    store::get(&state.store, owner(request), id)?.ok_or_else(|| not_found("vector_store", id))
}

/// The store the path names, if the caller may see it and it has not expired: nothing changes
/// an expired store, whose chunks are being given back.
fn find_unexpired(state: &State, request: &Request) -> Result<Counted, ApiError> {
    let vs = find(state, request)?;
    refuse_expired(&vs)?;
    Ok(vs)
}

fn refuse_expired(vs: &Counted) -> Result<(), ApiError> {
    if vs.store.is_expired(now_ms() / 1000) {
        return Err(ApiError::VectorStoreExpired {
            id: vs.store.id.clone(),
        });
    }
    Ok(())
}

/// `POST /v1/vector_stores`.
pub(crate) fn create(state: &State, request: &Request) -> Result<Response, ApiError> {
    let body = json_object(&request.body)?;
    only(
        &body,
        &[
            "name",
            "file_ids",
            "chunking_strategy",
            "metadata",
            "expires_after",
            "description",
        ],
    )?;
    let metadata = metadata(body.get("metadata"))?;
    let model = embedding_model(state, metadata.as_ref())?;
    let strategy = strategy(body.get("chunking_strategy"))?;
    let file_ids = string_list(body.get("file_ids"), "file_ids")?;
    let now = now_ms() / 1000;
    let vs = VectorStore {
        id: new_id("vs"),
        key_id: owner(request).key_id(),
        name: optional_string(body.get("name"), "name")?,
        metadata,
        embedding_model: model,
        created_at: now,
        last_active_at: now,
        expires_after_days: expires_after(body.get("expires_after"))?.flatten(),
        version: 0,
    };
    // The files are checked before the store exists, so a bad id leaves nothing behind.
    for id in &file_ids {
        files::get(&state.store, owner(request), id)?.ok_or_else(|| not_found("file", id))?;
    }
    store::create(&state.store, vs.clone())?;
    for id in &file_ids {
        attach(state, request, &vs, id, None, strategy, None)?;
    }
    let created = store::get(&state.store, Owner::All, &vs.id)?.ok_or(ApiError::Internal)?;
    Ok(polled(&created, store_json(&created)))
}

/// `GET /v1/vector_stores`.
pub(crate) fn list(state: &State, request: &Request) -> Result<Response, ApiError> {
    let query = request.query.as_str();
    known_params(query, &["after", "before", "limit", "order"])?;
    if query_param(query, "before")?.is_some() {
        return Err(invalid(
            "before",
            "'before' is not supported; page with 'after'",
        ));
    }
    let limit = query_limit(query, "limit", 20, 100)?;
    let after = query_param(query, "after")?;
    let page = store::list(
        &state.store,
        owner(request),
        limit,
        after.as_deref(),
        order(query)?,
    )?
    .ok_or_else(|| {
        invalid(
            "after",
            &format!("no vector store has id {:?}", after.unwrap_or_default()),
        )
    })?;
    Ok(Response::json(
        200,
        &list_json(&page, |c| c.store.id.as_str(), store_json),
    ))
}

/// `GET /v1/vector_stores/{id}`.
pub(crate) fn get(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    Ok(polled(&vs, store_json(&vs)))
}

/// `POST /v1/vector_stores/{id}`: name, metadata, expires_after.
pub(crate) fn update(state: &State, request: &Request) -> Result<Response, ApiError> {
    let body = json_object(&request.body)?;
    only(&body, &["name", "metadata", "expires_after"])?;
    let changes = Changes {
        name: optional_string(body.get("name"), "name")?,
        metadata: metadata(body.get("metadata"))?,
        expires_after_days: expires_after(body.get("expires_after"))?,
    };
    let vs = find_unexpired(state, request)?;
    if !store::update(
        &state.store,
        owner(request),
        &vs.store.id,
        changes,
        now_ms() / 1000,
    )? {
        // Deleted, or expired, since it was read.
        find_unexpired(state, request)?;
        return Err(ApiError::Internal);
    }
    get(state, request)
}

/// `DELETE /v1/vector_stores/{id}`.
pub(crate) fn delete(state: &State, request: &Request) -> Result<Response, ApiError> {
    let id = store_id(request);
    if !store::delete(&state.store, owner(request), id)? {
        return Err(not_found("vector_store", id));
    }
    state.matrices.remove(id);
    Ok(Response::json(
        200,
        &json!({"id": id, "object": "vector_store.deleted", "deleted": true}),
    ))
}

/// `POST /v1/vector_stores/{id}/files`: attaches a file and queues its ingestion.
pub(crate) fn attach_file(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find_unexpired(state, request)?;
    let body = json_object(&request.body)?;
    only(&body, &["file_id", "attributes", "chunking_strategy"])?;
    let file_id = match body.get("file_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        None | Some(Value::Null) => return Err(missing("file_id")),
        Some(_) => return Err(invalid("file_id", "'file_id' must be a non-empty string")),
    };
    let attributes = attributes(body.get("attributes"))?;
    let strategy = strategy(body.get("chunking_strategy"))?;
    files::get(&state.store, owner(request), &file_id)?
        .ok_or_else(|| not_found("file", &file_id))?;
    if vs.counts.total() as u64 >= state.config.knowledge.max_files_per_store {
        return Err(invalid(
            "file_id",
            &format!(
                "the vector store holds {} files already, its most ([knowledge] max_files_per_store)",
                vs.counts.total()
            ),
        ));
    }
    let attached = attach(
        state, request, &vs.store, &file_id, attributes, strategy, None,
    )?;
    Ok(file_response(&attached))
}

/// Attaches `file_id` (already checked visible) and queues its ingestion; an attachment
/// already there is answered as it is.
fn attach(
    state: &State,
    request: &Request,
    vs: &VectorStore,
    file_id: &str,
    attributes: Option<Value>,
    strategy: Strategy,
    batch_id: Option<&str>,
) -> Result<StoreFile, ApiError> {
    let attached = StoreFile {
        vector_store_id: vs.id.clone(),
        file_id: file_id.to_string(),
        batch_id: batch_id.map(str::to_string),
        status: FileStatus::InProgress,
        last_error: None,
        attributes,
        chunking_strategy: strategy.to_json(),
        usage_bytes: 0,
        created_at: now_ms() / 1000,
    };
    match store::attach(&state.store, attached.clone()) {
        Ok(()) => {}
        Err(e) if e.is_unique_violation() => {
            return store::file(&state.store, &vs.id, file_id)?.ok_or(ApiError::Internal)
        }
        Err(e) => return Err(e.into()),
    }
    let job = NewJob {
        id: new_id("job"),
        request: json!({"vector_store_id": vs.id, "file_id": file_id}),
        metadata: None,
        model: vs.embedding_model.clone(),
        max_attempts: state.config.jobs.max_attempts,
        idempotency_key: None,
        key_id: owner(request).key_id(),
        created_ms: now_ms(),
        kind: JobKind::Ingest,
    };
    let max_queued = state.config.jobs.max_queued;
    let failed = match jobs::submit(&state.store, job, max_queued) {
        Ok(Submitted::Created(_) | Submitted::Existing(_)) => {
            state.jobs.notify();
            return Ok(attached);
        }
        Ok(Submitted::Full) => ApiError::JobsFull { max_queued },
        Err(e) => e.into(),
    };
    // No job will ingest it: the file fails now rather than staying in progress.
    let error = json!({"code": "server_error", "message": failed.to_string()});
    chunks::fail(&state.store, &vs.id, file_id, error)?;
    Err(failed)
}

/// `GET /v1/vector_stores/{id}/files`.
pub(crate) fn list_files(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    files_page(state, request, &vs.store.id, None)
}

/// A page of the store's files (of one batch, when given), as the query asks.
fn files_page(
    state: &State,
    request: &Request,
    vs_id: &str,
    batch_id: Option<String>,
) -> Result<Response, ApiError> {
    let query = request.query.as_str();
    known_params(query, &["after", "before", "limit", "order", "filter"])?;
    let status = match query_param(query, "filter")? {
        None => None,
        Some(text) => Some(FileStatus::parse(&text).ok_or_else(|| {
            invalid(
                "filter",
                "'filter' must be in_progress, completed, failed or cancelled",
            )
        })?),
    };
    if query_param(query, "before")?.is_some() {
        return Err(invalid(
            "before",
            "'before' is not supported; page with 'after'",
        ));
    }
    let listing = FileListing {
        vector_store_id: vs_id.to_string(),
        status,
        batch_id,
        limit: query_limit(query, "limit", 20, 100)?,
        after: query_param(query, "after")?,
        order: order(query)?,
    };
    let page = store::files(&state.store, &listing)?.ok_or_else(|| {
        invalid(
            "after",
            &format!(
                "the vector store has no file {:?}",
                listing.after.clone().unwrap_or_default()
            ),
        )
    })?;
    Ok(Response::json(
        200,
        &list_json(&page, |f| f.file_id.as_str(), store_file_json),
    ))
}

/// `GET /v1/vector_stores/{id}/files/{file_id}`.
pub(crate) fn get_file(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    let id = file_id(request);
    let attached = store::file(&state.store, &vs.store.id, id)?
        .ok_or_else(|| not_found("vector_store.file", id))?;
    Ok(file_response(&attached))
}

/// `POST /v1/vector_stores/{id}/files/{file_id}`: replaces its attributes.
pub(crate) fn update_file(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find_unexpired(state, request)?;
    let body = json_object(&request.body)?;
    only(&body, &["attributes"])?;
    let attributes = attributes(body.get("attributes"))?;
    let id = file_id(request);
    if !store::set_attributes(&state.store, &vs.store.id, id, attributes)? {
        return Err(not_found("vector_store.file", id));
    }
    get_file(state, request)
}

/// `DELETE /v1/vector_stores/{id}/files/{file_id}`: detaches it (the file itself stays).
pub(crate) fn detach_file(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    let id = file_id(request);
    if !store::detach(&state.store, &vs.store.id, id)? {
        return Err(not_found("vector_store.file", id));
    }
    Ok(Response::json(
        200,
        &json!({"id": id, "object": "vector_store.file.deleted", "deleted": true}),
    ))
}

/// `GET /v1/vector_stores/{id}/files/{file_id}/content`: the file's chunks, in order.
pub(crate) fn file_content(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    let id = file_id(request);
    store::file(&state.store, &vs.store.id, id)?
        .ok_or_else(|| not_found("vector_store.file", id))?;
    let data: Vec<Value> = chunks::of_file(&state.store, &vs.store.id, id)?
        .into_iter()
        .map(|text| json!({"type": "text", "text": text}))
        .collect();
    Ok(Response::json(
        200,
        &json!({"object": "vector_store.file_content.page", "data": data, "has_more": false, "next_page": null}),
    ))
}

/// The batch id after `/file_batches/` in the request's path.
fn batch_id(request: &Request) -> &str {
    let (_, tail) = path_id(&request.path, PREFIX).unwrap_or(("", ""));
    path_id(tail, "/file_batches/").map_or("", |(id, _)| id)
}

/// `POST /v1/vector_stores/{id}/file_batches`: `file_ids` (with the batch's `attributes` and
/// `chunking_strategy`) or `files` (each with its own), attached together.
pub(crate) fn create_batch(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find_unexpired(state, request)?;
    let body = json_object(&request.body)?;
    only(
        &body,
        &["file_ids", "files", "attributes", "chunking_strategy"],
    )?;
    let shared_attributes = attributes(body.get("attributes"))?;
    let shared_strategy = strategy(body.get("chunking_strategy"))?;
    let mut wanted: Vec<(String, Option<Value>, Strategy)> =
        string_list(body.get("file_ids"), "file_ids")?
            .into_iter()
            .map(|id| (id, shared_attributes.clone(), shared_strategy))
            .collect();
    if let Some(files) = body.get("files").filter(|f| !f.is_null()) {
        let files = files
            .as_array()
            .filter(|f| f.len() <= 500)
            .ok_or_else(|| invalid("files", "'files' must be a list of at most 500 objects"))?;
        for f in files {
            let id = f["file_id"]
                .as_str()
                .filter(|id| !id.is_empty())
                .ok_or_else(|| invalid("files", "each of 'files' needs a 'file_id'"))?;
            let own_attributes = match f.get("attributes") {
                None => shared_attributes.clone(),
                some => attributes(some)?,
            };
            let own_strategy = match f.get("chunking_strategy") {
                None => shared_strategy,
                some => strategy(some)?,
            };
            wanted.push((id.to_string(), own_attributes, own_strategy));
        }
    }
    if wanted.is_empty() {
        return Err(invalid("file_ids", "a batch needs 'file_ids' or 'files'"));
    }
    for (id, _, _) in &wanted {
        files::get(&state.store, owner(request), id)?.ok_or_else(|| not_found("file", id))?;
    }
    let room = state
        .config
        .knowledge
        .max_files_per_store
        .saturating_sub(vs.counts.total() as u64);
    if wanted.len() as u64 > room {
        return Err(invalid(
            "file_ids",
            &format!(
                "the vector store has room for {room} more files ([knowledge] max_files_per_store)"
            ),
        ));
    }
    let id = new_id("vsfb");
    store::create_batch(&state.store, &vs.store.id, &id, now_ms() / 1000)?;
    for (file, attributes, strategy) in wanted {
        attach(
            state,
            request,
            &vs.store,
            &file,
            attributes,
            strategy,
            Some(&id),
        )?;
    }
    batch_response(state, &vs.store.id, &id)
}

/// `GET /v1/vector_stores/{id}/file_batches/{batch_id}`.
pub(crate) fn get_batch(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    batch_response(state, &vs.store.id, batch_id(request))
}

/// `POST /v1/vector_stores/{id}/file_batches/{batch_id}/cancel`.
pub(crate) fn cancel_batch(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    let id = batch_id(request);
    if !store::cancel_batch(&state.store, &vs.store.id, id)? {
        return Err(not_found("vector_store.file_batch", id));
    }
    batch_response(state, &vs.store.id, id)
}

/// `GET /v1/vector_stores/{id}/file_batches/{batch_id}/files`.
pub(crate) fn list_batch_files(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    let id = batch_id(request);
    store::batch(&state.store, &vs.store.id, id)?
        .ok_or_else(|| not_found("vector_store.file_batch", id))?;
    files_page(state, request, &vs.store.id, Some(id.to_string()))
}

fn batch_response(state: &State, vs_id: &str, id: &str) -> Result<Response, ApiError> {
    let b = store::batch(&state.store, vs_id, id)?
        .ok_or_else(|| not_found("vector_store.file_batch", id))?;
    let body = json!({
        "id": b.id,
        "object": "vector_store.files_batch",
        "created_at": b.created_at,
        "vector_store_id": b.vector_store_id,
        "status": b.status(),
        "file_counts": {
            "in_progress": b.counts.in_progress,
            "completed": b.counts.completed,
            "failed": b.counts.failed,
            "cancelled": b.counts.cancelled,
            "total": b.counts.total(),
        },
    });
    let response = Response::json(200, &body);
    Ok(if b.status() == "in_progress" {
        response.with_header("openai-poll-after-ms", POLL_AFTER_MS.to_string())
    } else {
        response
    })
}

/// One search hit, as OpenAI shows it.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) file_id: String,
    pub(crate) filename: String,
    pub(crate) score: f32,
    pub(crate) attributes: Option<Value>,
    pub(crate) text: String,
}

impl Hit {
    pub(crate) fn json(&self) -> Value {
        json!({
            "file_id": self.file_id,
            "filename": self.filename,
            "score": self.score,
            "attributes": self.attributes.clone().unwrap_or_else(|| json!({})),
            "content": [{"type": "text", "text": self.text}],
        })
    }
}

/// What a search asks.
#[derive(Debug, Clone)]
pub(crate) struct Search {
    pub(crate) queries: Vec<String>,
    pub(crate) filter: Option<Filter>,
    pub(crate) max_results: usize,
    pub(crate) threshold: f32,
    pub(crate) hybrid: bool,
}

/// `POST /v1/vector_stores/{id}/search`.
pub(crate) fn search(state: &State, request: &Request) -> Result<Response, ApiError> {
    let vs = find(state, request)?;
    let body = json_object(&request.body)?;
    only(
        &body,
        &[
            "query",
            "filters",
            "max_num_results",
            "ranking_options",
            "rewrite_query",
        ],
    )?;
    let search = parse_search(&body)?;
    // A search is a call to the store's embedding model: logged, counted and priced as one.
    request.record.model(&vs.store.embedding_model);
    let hits = run_search(state, &vs, &search, &request.record)?;
    let data: Vec<Value> = hits.iter().map(Hit::json).collect();
    Ok(Response::json(
        200,
        &json!({
            "object": "vector_store.search_results.page",
            "search_query": search.queries,
            "data": data,
            "has_more": false,
            "next_page": null,
        }),
    ))
}

/// Reads a search's parameters (shared by `file_search` in `/v1/responses`).
pub(crate) fn parse_search(body: &Map<String, Value>) -> Result<Search, ApiError> {
    let queries = match body.get("query") {
        Some(Value::String(q)) if !q.trim().is_empty() => vec![q.clone()],
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_QUERIES => items
            .iter()
            .map(|q| {
                q.as_str()
                    .filter(|q| !q.trim().is_empty())
                    .map(str::to_string)
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                invalid(
                    "query",
                    "'query' must be a string or a list of 1 to 16 non-empty strings",
                )
            })?,
        None | Some(Value::Null) => return Err(missing("query")),
        Some(_) => {
            return Err(invalid(
                "query",
                "'query' must be a string or a list of 1 to 16 non-empty strings",
            ))
        }
    };
    let filter = match body.get("filters") {
        None | Some(Value::Null) => None,
        Some(f) => Some(Filter::parse(f).map_err(|e| invalid("filters", &e))?),
    };
    let max_results = match body.get("max_num_results") {
        None | Some(Value::Null) => DEFAULT_RESULTS,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_RESULTS).contains(n))
            .ok_or_else(|| {
                invalid(
                    "max_num_results",
                    "'max_num_results' must be an integer from 1 to 50",
                )
            })?,
    } as usize;
    let (threshold, hybrid) = ranking(body.get("ranking_options"))?;
    match body.get("rewrite_query") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(_) => {
            return Err(invalid(
                "rewrite_query",
                "'rewrite_query' must be a boolean",
            ))
        }
    }
    Ok(Search {
        queries,
        filter,
        max_results,
        threshold,
        hybrid,
    })
}

/// `ranking_options`: `score_threshold` (0..1) and `ranker` (`auto`, `default-2024-11-15`,
/// `none`: the vector ranking; `hybrid`: fused with full-text search).
fn ranking(value: Option<&Value>) -> Result<(f32, bool), ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok((0.0, false));
    };
    let options = value
        .as_object()
        .ok_or_else(|| invalid("ranking_options", "'ranking_options' must be an object"))?;
    for key in options.keys() {
        if !["ranker", "score_threshold", "hybrid_search"].contains(&key.as_str()) {
            return Err(invalid(
                "ranking_options",
                &format!("unknown parameter: ranking_options.{key}"),
            ));
        }
    }
    let threshold = match options.get("score_threshold") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v
            .as_f64()
            .filter(|t| (0.0..=1.0).contains(t))
            .ok_or_else(|| {
                invalid(
                    "ranking_options",
                    "ranking_options.score_threshold must be a number from 0 to 1",
                )
            })? as f32,
    };
    let hybrid = match options.get("ranker").and_then(Value::as_str) {
        None | Some("auto" | "default-2024-11-15" | "none") => false,
        Some("hybrid") => true,
        Some(other) => {
            return Err(invalid(
                "ranking_options",
                &format!("ranking_options.ranker {other:?} is not one of auto, default-2024-11-15, none, hybrid"),
            ))
        }
    };
    Ok((
        threshold,
        hybrid || options.get("hybrid_search").is_some_and(|h| !h.is_null()),
    ))
}

/// Runs `search` over `vs`: every query side by side, each embedded with the store's model
/// and scanned (fused with full-text search when hybrid); the hits merged by their best score.
pub(crate) fn run_search(
    state: &State,
    vs: &Counted,
    search: &Search,
    record: &Record,
) -> Result<Vec<Hit>, ApiError> {
    refuse_expired(vs)?;
    let started = Instant::now();
    let matrix = matrix(state, &vs.store.id)?;
    let keep = match &search.filter {
        None => None,
        Some(filter) => Some(passing_files(state, &vs.store.id, &matrix, filter)?),
    };
    let embedded = ingest::embed(state, &vs.store.embedding_model, &search.queries)
        .map_err(|e| ApiError::Provider(embed_failure(e)))?;
    record.add_cost(embedded.cost);
    let vectors = embedded.vectors;
    // Several queries: scanned side by side (the scan itself spreads over rayon's threads).
    let ranked: Vec<Result<Vec<(i64, f32)>, ApiError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = search
            .queries
            .iter()
            .zip(&vectors)
            .map(|(query, v)| {
                let (matrix, keep) = (&matrix, keep.as_deref());
                scope.spawn(move || one_query(state, &vs.store.id, matrix, keep, query, v, search))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(ApiError::Internal)))
            .collect()
    });
    let mut best: Vec<(i64, f32)> = Vec::new();
    for found in ranked {
        for (id, score) in found? {
            match best.iter_mut().find(|(i, _)| *i == id) {
                Some((_, s)) => *s = s.max(score),
                None => best.push((id, score)),
            }
        }
    }
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best.truncate(search.max_results);
    let ids: Vec<i64> = best.iter().map(|(id, _)| *id).collect();
    let found = chunks::found(&state.store, &ids)?;
    // Expiry counts in days: marking the store used is a committed write, so a search makes
    // it at most once a minute, not every time.
    let now = now_ms() / 1000;
    if now - vs.store.last_active_at >= TOUCH_EVERY_S {
        store::touch(&state.store, &vs.store.id, now)?;
    }
    state
        .metrics
        .knowledge_search(started.elapsed().as_secs_f64());
    // A chunk gone since the scan (its file detached) is left out of `found`: each hit takes
    // its own chunk's score, never its neighbour's.
    let score_of = |id: i64| best.iter().find(|(i, _)| *i == id).map_or(0.0, |(_, s)| *s);
    Ok(found
        .into_iter()
        .map(|chunk| Hit {
            score: score_of(chunk.id),
            file_id: chunk.file_id,
            filename: chunk.filename,
            attributes: chunk.attributes,
            text: chunk.text,
        })
        .collect())
}

/// One query's ranking: the vector scan, fused with full-text search when hybrid.
fn one_query(
    state: &State,
    vs_id: &str,
    matrix: &Matrix,
    keep: Option<&[bool]>,
    query: &str,
    v: &[f32],
    search: &Search,
) -> Result<Vec<(i64, f32)>, ApiError> {
    let depth = if search.hybrid {
        search.max_results * 4
    } else {
        search.max_results
    };
    let pass = |i: usize| keep.is_none_or(|k| k[matrix.group(i)]);
    let hits = matrix
        .search_where(
            v,
            depth,
            if search.hybrid { 0.0 } else { search.threshold },
            pass,
        )
        .map_err(|e| {
            log::error!("vector store {vs_id}: {e}");
            ApiError::InvalidRequest {
                message: format!("the query's embedding does not fit the store's vectors: {e}"),
                param: "query".into(),
            }
        })?;
    let by_vector: Vec<(i64, f32)> = hits.iter().map(|h| (h.id, h.score)).collect();
    if !search.hybrid {
        return Ok(by_vector);
    }
    let allowed: std::collections::HashSet<i64> = match keep {
        None => Default::default(),
        Some(_) => (0..matrix.len())
            .filter(|i| pass(*i))
            .map(|i| matrix.id(i))
            .collect(),
    };
    let by_text: Vec<i64> = chunks::text_search(&state.store, vs_id, query, depth as u32)?
        .into_iter()
        .filter(|id| keep.is_none() || allowed.contains(id))
        .collect();
    let by_vector_ids: Vec<i64> = by_vector.iter().map(|(id, _)| *id).collect();
    Ok(vector::fuse(&[by_vector_ids, by_text], RRF_K)
        .into_iter()
        .filter(|(_, score)| *score >= search.threshold)
        .collect())
}

/// The store's vectors from the cache, loaded when its version moved on.
fn matrix(state: &State, vs_id: &str) -> Result<Arc<Matrix>, ApiError> {
    let version = chunks::version(&state.store, vs_id)?;
    if let Some(m) = state.matrices.get(vs_id, version as u64) {
        return Ok(m);
    }
    let loaded = chunks::vectors(&state.store, vs_id)?;
    let dims = loaded
        .rows
        .first()
        .map_or(0, |(_, _, bytes)| bytes.len() / 4);
    let mut m = Matrix::with_capacity(dims, loaded.rows.len());
    for (id, file_id, bytes) in &loaded.rows {
        let v = vector::from_bytes(bytes).map_err(|e| {
            log::error!("vector store {vs_id}: chunk {id}: {e}");
            ApiError::Internal
        })?;
        m.push_in(*id, file_id, &v).map_err(|e| {
            log::error!("vector store {vs_id}: chunk {id}: {e}");
            ApiError::Internal
        })?;
    }
    Ok(state
        .matrices
        .put(vs_id, loaded.version as u64, Arc::new(m)))
}

/// Per group (file) of `matrix`, whether its attributes pass `filter`: every file's
/// attributes read in one query, then each file decided once.
fn passing_files(
    state: &State,
    vs_id: &str,
    matrix: &Matrix,
    filter: &Filter,
) -> Result<Arc<[bool]>, ApiError> {
    let attributes = store::attributes(&state.store, vs_id)?;
    let none = json!({});
    Ok(matrix
        .group_names()
        .iter()
        .map(|file| filter.matches(attributes.get(file).unwrap_or(&none)))
        .collect())
}

fn embed_failure(e: ingest::EmbedError) -> crate::providers::ProviderError {
    match e {
        ingest::EmbedError::Provider(p) => p,
        other => crate::providers::ProviderError::BadReply {
            provider: "embedding".into(),
            detail: other.to_string(),
        },
    }
}

/// A vector store as OpenAI's API shows it.
pub(crate) fn store_json(c: &Counted) -> Value {
    let s = &c.store;
    json!({
        "id": s.id,
        "object": "vector_store",
        "created_at": s.created_at,
        "name": s.name,
        "usage_bytes": c.counts.usage_bytes,
        "file_counts": {
            "in_progress": c.counts.in_progress,
            "completed": c.counts.completed,
            "failed": c.counts.failed,
            "cancelled": c.counts.cancelled,
            "total": c.counts.total(),
        },
        "status": c.status(now_ms() / 1000),
        "expires_after": s.expires_after_days.map(|days| json!({"anchor": "last_active_at", "days": days})),
        "expires_at": c.expires_at(),
        "last_active_at": s.last_active_at,
        "metadata": s.metadata.clone().unwrap_or_else(|| json!({})),
    })
}

/// A file in a store as OpenAI's API shows it.
pub(crate) fn store_file_json(f: &StoreFile) -> Value {
    json!({
        "id": f.file_id,
        "object": "vector_store.file",
        "usage_bytes": f.usage_bytes,
        "created_at": f.created_at,
        "vector_store_id": f.vector_store_id,
        "status": f.status.name(),
        "last_error": f.last_error,
        "chunking_strategy": if f.chunking_strategy.is_null() {
            crate::knowledge::chunk::unknown_strategy_json()
        } else {
            f.chunking_strategy.clone()
        },
        "attributes": f.attributes.clone().unwrap_or_else(|| json!({})),
    })
}

/// A file's answer, with `openai-poll-after-ms` while it is still being ingested.
fn file_response(f: &StoreFile) -> Response {
    let response = Response::json(200, &store_file_json(f));
    if f.status == FileStatus::InProgress {
        response.with_header("openai-poll-after-ms", POLL_AFTER_MS.to_string())
    } else {
        response
    }
}

/// A store's answer, with `openai-poll-after-ms` while a file is being ingested.
fn polled(c: &Counted, body: Value) -> Response {
    let response = Response::json(200, &body);
    if c.counts.in_progress > 0 {
        response.with_header("openai-poll-after-ms", POLL_AFTER_MS.to_string())
    } else {
        response
    }
}

/// Refuses a body field not in `known`.
fn only(body: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match body.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(invalid(k, &format!("unknown parameter: '{k}'"))),
        None => Ok(()),
    }
}

/// The store's embedding model: `metadata.embedding_model`, else `[knowledge]
/// embedding_model`, else the built-in `mock` when it is configured; it must route.
fn embedding_model(state: &State, metadata: Option<&Value>) -> Result<String, ApiError> {
    let asked = metadata
        .and_then(|m| m.get("embedding_model"))
        .and_then(Value::as_str);
    let model = asked
        .map(str::to_string)
        .or_else(|| state.config.knowledge.embedding_model.clone())
        .or_else(|| {
            state
                .providers
                .route(crate::config::BUILTIN_MOCK)
                .map(|_| crate::config::BUILTIN_MOCK.to_string())
        })
        .ok_or_else(|| {
            invalid(
                "metadata",
                "no embedding model: set [knowledge] embedding_model, or metadata.embedding_model",
            )
        })?;
    if state.providers.route(&model).is_none() {
        return Err(ApiError::ModelNotFound(model));
    }
    Ok(model)
}

fn strategy(value: Option<&Value>) -> Result<Strategy, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(Strategy::Auto),
        Some(v) => Strategy::parse(v).map_err(|e| invalid("chunking_strategy", &e)),
    }
}

fn attributes(value: Option<&Value>) -> Result<Option<Value>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            check_attributes(v).map_err(|e| invalid("attributes", &e))?;
            Ok(Some(v.clone()))
        }
    }
}

/// OpenAI's metadata: up to 16 string values, keys up to 64 characters, values up to 512.
fn metadata(value: Option<&Value>) -> Result<Option<Value>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m))
            if m.len() <= 16
                && m.iter().all(|(k, v)| k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512)) =>
        {
            Ok(Some(Value::Object(m.clone())))
        }
        Some(_) => Err(invalid(
            "metadata",
            "'metadata' must be an object of at most 16 string values (keys up to 64 characters, values up to 512)",
        )),
    }
}

/// `expires_after`: `Some(Some(days))`, `Some(None)` to remove (null), `None` when absent.
fn expires_after(value: Option<&Value>) -> Result<Option<Option<i64>>, ApiError> {
    match value {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => {
            let anchor = v.get("anchor").and_then(Value::as_str);
            let days = v.get("days").and_then(Value::as_i64);
            match (anchor, days) {
                (Some("last_active_at"), Some(d @ 1..=365)) => Ok(Some(Some(d))),
                _ => Err(invalid(
                    "expires_after",
                    "'expires_after' must be {\"anchor\": \"last_active_at\", \"days\": 1 to 365}",
                )),
            }
        }
    }
}

fn optional_string(value: Option<&Value>, name: &str) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(name, &format!("'{name}' must be a string"))),
    }
}

fn string_list(value: Option<&Value>, name: &str) -> Result<Vec<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() <= 500 => items
            .iter()
            .map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid(name, &format!("'{name}' must be a list of file ids"))),
        Some(_) => Err(invalid(
            name,
            &format!("'{name}' must be a list of at most 500 file ids"),
        )),
    }
}
