//! `/v1/files` (issue 16): uploads as OpenAI's API takes them (multipart/form-data with the
//! parts `file` and `purpose`), their listing, metadata, bytes and deletion. A file belongs to
//! the key that uploaded it; the admin key sees every key's; in development mode there is one
//! owner. A file another key owns is answered 404, as one that does not exist.

use serde_json::{json, Value};

use super::chat::invalid;
use super::{known_params, path_id, query_limit, query_param, ApiError};
use crate::auth::Caller;
use crate::http::multipart::{self, Part};
use crate::http::{Rejection, Request, Response};
use crate::server::State;
use crate::store::files::{self as store, File, Listing, Order, Owner};
use crate::store::{new_id, Page};

/// Where a file's paths start; the id follows.
pub(crate) const FILES_PREFIX: &str = "/v1/files/";

/// The purposes OpenAI's API knows; a file of any of them is kept alike.
const PURPOSES: [&str; 6] = [
    "assistants",
    "batch",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
];
/// `expires_after[seconds]`'s range, as OpenAI's: an hour to 30 days.
const EXPIRY_SECONDS: std::ops::RangeInclusive<i64> = 3600..=2_592_000;
/// Most files in one page, and the default (OpenAI's).
const MAX_PAGE: u32 = 10_000;

/// Whose files the caller sees.
pub(crate) fn owner(request: &Request) -> Owner {
    match &request.caller {
        Some(Caller::Admin) => Owner::All,
        Some(caller) => Owner::Key(caller.key_id()),
        None => Owner::Key(None),
    }
}

/// `POST /v1/files`: stores the upload and answers its file object.
pub(crate) fn upload(state: &State, request: &Request) -> Result<Response, ApiError> {
    let content_type = request.header("content-type").unwrap_or("");
    let boundary =
        multipart::boundary(content_type).map_err(|e| invalid("file", &e.to_string()))?;
    let max_bytes = state.config.files.max_bytes;
    let limits = multipart::Limits::new(usize::try_from(max_bytes).unwrap_or(usize::MAX));
    let parts = multipart::parse(&request.body, &boundary, &limits).map_err(|e| {
        if e.is_too_large() {
            ApiError::Http(Rejection::BodyTooLarge { limit: max_bytes })
        } else {
            invalid("file", &e.to_string())
        }
    })?;
    let file = multipart::field(&parts, "file")
        .ok_or_else(|| invalid("file", "missing required part: 'file'"))?;
    let purpose = text_field(&parts, "purpose")?
        .ok_or_else(|| invalid("purpose", "missing required part: 'purpose'"))?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(invalid(
            "purpose",
            &format!("'purpose' must be one of {}", PURPOSES.join(", ")),
        ));
    }
    let filename = file
        .filename
        .clone()
        .filter(|name| !name.is_empty())
        .ok_or_else(|| invalid("file", "the 'file' part needs a filename"))?;
    let created_at = crate::store::now_ms() / 1000;
    let expires_at = expiry(&parts, created_at)?;
    let stored = File {
        id: new_id("file"),
        key_id: owner(request).key_id(),
        filename,
        purpose,
        bytes: file.data.len() as i64,
        created_at,
        expires_at,
    };
    store::insert(&state.store, stored.clone(), file.data.to_vec())?;
    Ok(Response::json(200, &file_json(&stored)))
}

/// `GET /v1/files`: the caller's files, newest first unless `order=asc`.
pub(crate) fn list(state: &State, request: &Request) -> Result<Response, ApiError> {
    let query = request.query.as_str();
    known_params(query, &["after", "limit", "order", "purpose"])?;
    let listing = Listing {
        owner: owner(request),
        purpose: query_param(query, "purpose")?,
        limit: query_limit(query, "limit", MAX_PAGE, MAX_PAGE)?,
        after: query_param(query, "after")?,
        order: order(query)?,
    };
    let page = store::list(&state.store, &listing)?.ok_or_else(|| {
        invalid(
            "after",
            &format!(
                "no file has id {:?}",
                listing.after.clone().unwrap_or_default()
            ),
        )
    })?;
    Ok(Response::json(
        200,
        &list_json(&page, |f| f.id.as_str(), file_json),
    ))
}

/// `GET /v1/files/{id}`.
pub(crate) fn get(state: &State, request: &Request) -> Result<Response, ApiError> {
    let id = file_id(request);
    let file = store::get(&state.store, owner(request), id)?.ok_or_else(|| not_found(id))?;
    Ok(Response::json(200, &file_json(&file)))
}

/// `GET /v1/files/{id}/content`: the bytes as uploaded.
pub(crate) fn content(state: &State, request: &Request) -> Result<Response, ApiError> {
    let id = file_id(request);
    let bytes = store::content(&state.store, owner(request), id)?.ok_or_else(|| not_found(id))?;
    Ok(Response::text(200, "application/octet-stream", bytes))
}

/// `DELETE /v1/files/{id}`: the file, and its chunks in every vector store it was in.
pub(crate) fn delete(state: &State, request: &Request) -> Result<Response, ApiError> {
    let id = file_id(request);
    if !store::delete(&state.store, owner(request), id)? {
        return Err(not_found(id));
    }
    Ok(Response::json(
        200,
        &json!({"id": id, "object": "file", "deleted": true}),
    ))
}

/// A file as OpenAI's API shows it. Files are usable once stored, so always `processed`.
pub(crate) fn file_json(f: &File) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "expires_at": f.expires_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

/// A page as OpenAI's lists are: `{object, data, first_id, last_id, has_more}`.
pub(crate) fn list_json<T>(page: &Page<T>, id: fn(&T) -> &str, each: fn(&T) -> Value) -> Value {
    let data: Vec<Value> = page.items.iter().map(each).collect();
    json!({
        "object": "list",
        "data": data,
        "first_id": page.items.first().map(id),
        "last_id": page.items.last().map(id),
        "has_more": page.has_more,
    })
}

/// `order=asc|desc`, newest first by default.
pub(crate) fn order(query: &str) -> Result<Order, ApiError> {
    match query_param(query, "order")?.as_deref() {
        None | Some("desc") => Ok(Order::Desc),
        Some("asc") => Ok(Order::Asc),
        Some(_) => Err(invalid("order", "'order' must be asc or desc")),
    }
}

/// The upload's expiry from `expires_after[anchor]` and `expires_after[seconds]`, in unix
/// seconds; `None` when it gave none.
fn expiry(parts: &[Part<'_>], created_at: i64) -> Result<Option<i64>, ApiError> {
    let anchor = text_field(parts, "expires_after[anchor]")?;
    let seconds = text_field(parts, "expires_after[seconds]")?;
    match (anchor.as_deref(), seconds) {
        (None, None) => Ok(None),
        (Some("created_at"), Some(seconds)) => match seconds.trim().parse::<i64>() {
            Ok(s) if EXPIRY_SECONDS.contains(&s) => Ok(Some(created_at + s)),
            _ => Err(invalid(
                "expires_after[seconds]",
                "'expires_after[seconds]' must be an integer from 3600 to 2592000",
            )),
        },
        (Some("created_at"), None) => Err(invalid(
            "expires_after[seconds]",
            "missing required part: 'expires_after[seconds]'",
        )),
        (None, Some(_)) => Err(invalid(
            "expires_after[anchor]",
            "missing required part: 'expires_after[anchor]'",
        )),
        (Some(_), _) => Err(invalid(
            "expires_after[anchor]",
            "'expires_after[anchor]' must be created_at",
        )),
    }
}

/// A text part's value, when the upload has it.
fn text_field(parts: &[Part<'_>], name: &str) -> Result<Option<String>, ApiError> {
    match multipart::field(parts, name) {
        None => Ok(None),
        Some(part) => part
            .text()
            .map(|text| Some(text.to_string()))
            .map_err(|e| invalid(name, &e.to_string())),
    }
}

fn file_id(request: &Request) -> &str {
    path_id(&request.path, FILES_PREFIX).map_or("", |(id, _)| id)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        kind: "file",
        id: id.to_string(),
    }
}
