//! `/admin/keys`: making, listing and revoking API keys, for the holder of the admin key only;
//! `/admin/instances`: the instances serving the database.
//! A new key's secret is in the 201 that makes it and nowhere else, ever; the keyring is
//! reloaded before the answer, so a revoked key is refused from the next request on.

use serde_json::{json, Map, Value};

use super::chat::invalid;
use super::{json_object, path_id, ApiError, ADMIN_KEYS_PREFIX};
use crate::http::{Request, Response};
use crate::server::State;
use crate::store::keys::{self, NewKey, StoredKey};
use crate::store::now_ms;

/// Longest key name.
const NAME_MAX: usize = 100;

/// `POST /admin/keys`: `{"name", "models"?, "rpm"?, "tpm"?, "max_in_flight"?, "expires_at"?}`.
pub(crate) fn create_key(state: &State, request: &Request) -> Result<Response, ApiError> {
    let new = parse_new_key(state, &request.body)?;
    let made = keys::make(new, now_ms()).map_err(|e| {
        log::error!("cannot draw random bytes for a key: {e}");
        ApiError::Internal
    })?;
    let id = keys::insert(&state.store, made.stored.clone())?;
    reload(state)?;
    let key = StoredKey { id, ..made.stored };
    log::info!(
        "API key {} ({:?}, {}) created",
        key.id,
        key.name,
        key.prefix
    );
    let mut body = key_json(&key);
    body["key"] = Value::String(made.secret);
    Ok(Response::json(201, &body))
}

/// `GET /admin/keys`: every key, revoked ones included, oldest first, with when it was last
/// used (its newest row in the request log); never a secret or hash.
pub(crate) fn list_keys(state: &State) -> Result<Response, ApiError> {
    let all = keys::all(&state.store)?;
    let ids: Vec<i64> = all.iter().map(|k| k.id).collect();
    let last_used = crate::store::requests::last_used(&state.store, &ids)?;
    let data: Vec<Value> = all
        .iter()
        .zip(last_used)
        .map(|(key, used)| {
            let mut json = key_json(key);
            json["last_used_at"] = json!(used.map(|ms| ms.div_euclid(1000)));
            json
        })
        .collect();
    Ok(Response::json(
        200,
        &json!({"object": "list", "data": data, "has_more": false}),
    ))
}

/// `GET /admin/instances`: the instances whose lease has not run out, oldest first (on SQLite,
/// this one). Times are the database clock's.
pub(crate) fn list_instances(state: &State) -> Result<Response, ApiError> {
    let live = crate::cluster::live(&state.store, &state.instance)?;
    let me = state.instance.id();
    let data: Vec<Value> = live
        .iter()
        .map(|i| {
            json!({
                "id": i.id,
                "host": i.host,
                "listen": i.listen,
                "version": i.version,
                "started_at": crate::time::format_ms(i.started_ms),
                "renewed_at": crate::time::format_ms(i.renewed_ms),
                "lease_until": (i.lease_until_ms != i64::MAX)
                    .then(|| crate::time::format_ms(i.lease_until_ms)),
                "this": i.id == me,
            })
        })
        .collect();
    Ok(Response::json(
        200,
        &json!({"object": "list", "data": data, "has_more": false}),
    ))
}

/// `DELETE /admin/keys/{id}`: revoked at once (the keyring is reloaded before the answer).
/// Revoking a revoked key changes nothing and answers the same.
pub(crate) fn revoke_key(state: &State, request: &Request) -> Result<Response, ApiError> {
    let text = path_id(&request.path, ADMIN_KEYS_PREFIX).map_or("", |(id, _)| id);
    let not_found = || ApiError::NotFound {
        kind: "API key",
        id: text.to_string(),
    };
    let id: i64 = text.parse().map_err(|_| not_found())?;
    let revoked = keys::revoke(&state.store, id, now_ms())?;
    reload(state)?;
    let key = keys::get(&state.store, id)?.ok_or_else(not_found)?;
    if revoked {
        log::info!("API key {} ({:?}) revoked", key.id, key.name);
    }
    Ok(Response::json(200, &key_json(&key)))
}

/// The keyring from the file, now, so that what was just written applies to the next request.
fn reload(state: &State) -> Result<(), ApiError> {
    state.auth.refresh(&state.store)?;
    Ok(())
}

/// A key as the admin API shows it: never its secret or hash.
fn key_json(key: &StoredKey) -> Value {
    let seconds = |ms: i64| ms.div_euclid(1000);
    let status = if key.revoked_ms.is_some() {
        "revoked"
    } else if key.expires_ms.is_some_and(|at| at <= now_ms()) {
        "expired"
    } else {
        "active"
    };
    json!({
        "id": key.id,
        "object": "api_key",
        "name": key.name,
        "prefix": key.prefix,
        "status": status,
        "models": key.models,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "max_in_flight": key.max_in_flight,
        "expires_at": key.expires_ms.map(seconds),
        "created_at": seconds(key.created_ms),
        "revoked_at": key.revoked_ms.map(seconds),
    })
}

/// Reads and checks a new key's fields; every error names the field at fault.
fn parse_new_key(state: &State, body: &[u8]) -> Result<NewKey, ApiError> {
    let obj = json_object(body)?;
    let name = match obj.get("name") {
        Some(Value::String(n)) if !n.trim().is_empty() && n.len() <= NAME_MAX => n.clone(),
        None | Some(Value::Null) => return Err(super::chat::missing("name")),
        Some(_) => {
            return Err(invalid(
                "name",
                &format!("'name' must be a non-empty string of at most {NAME_MAX} bytes"),
            ))
        }
    };
    let models = match obj.get("models") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut models = Vec::with_capacity(items.len());
            for item in items {
                match item.as_str() {
                    Some(m) if state.providers.route(m).is_some() => models.push(m.to_string()),
                    Some(m) => return Err(invalid("models", &format!("no model is named {m:?}"))),
                    None => return Err(invalid("models", "'models' must hold model names")),
                }
            }
            Some(models)
        }
        Some(_) => {
            return Err(invalid(
                "models",
                "'models' must be a non-empty array of model names",
            ))
        }
    };
    let expires_ms = match obj.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(v) => Some(expiry(v)?),
    };
    Ok(NewKey {
        name,
        models,
        rpm: positive(&obj, "rpm", u64::from(u32::MAX))?.map(|n| n as u32),
        tpm: positive(&obj, "tpm", i64::MAX as u64)?,
        max_in_flight: positive(&obj, "max_in_flight", u64::from(u32::MAX))?.map(|n| n as u32),
        expires_ms,
    })
}

/// An optional limit: a positive integer up to `max`.
fn positive(obj: &Map<String, Value>, field: &str, max: u64) -> Result<Option<u64>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(invalid(
                field,
                &format!("'{field}' must be an integer from 1 to {max}"),
            )),
        },
    }
}

/// `expires_at`: unix seconds or an RFC 3339 time, in the future.
fn expiry(value: &Value) -> Result<i64, ApiError> {
    let ms = match value {
        Value::Number(n) => n.as_i64().and_then(|s| s.checked_mul(1000)),
        Value::String(text) => crate::time::parse_instant(text),
        _ => None,
    }
    .ok_or_else(|| {
        invalid(
            "expires_at",
            &format!("'expires_at' must be {}", crate::time::INSTANT_FORMS),
        )
    })?;
    if ms <= now_ms() {
        return Err(invalid("expires_at", "'expires_at' must be in the future"));
    }
    Ok(ms)
}
