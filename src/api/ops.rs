//! The fast lane: `/healthz`, `/readyz`, `/metrics`, `/api/status` and the console's files,
//! answered on the connection thread in microseconds, so they stay truthful while every worker
//! is busy and the queue is full.

use serde_json::json;

use super::{console, status, ApiError, Route};
use crate::http::{Request, Response};
use crate::server::State;

pub(crate) fn answer(state: &State, route: Route, request: &Request) -> Result<Response, ApiError> {
    Ok(match route {
        Route::Readyz => readyz(state),
        Route::Metrics => metrics(state),
        Route::Status => return status::answer(state, request),
        Route::Console => console::serve(state, request),
        _ => Response::json(200, &json!({"status": "ok"})),
    })
}

/// What `/readyz` says: 503 while draining, while the queue is at or above its high-water
/// mark, while the database cannot be reached, or (on PostgreSQL) while this instance holds no
/// lease and so refuses keyed work, or is still opening the shared limiter's connections, so a
/// load balancer sends new work elsewhere before this instance has to refuse it.
pub(crate) fn readiness(state: &State) -> (u16, &'static str) {
    let depth = state.queue_len();
    let high_water = state.config.capacity.ready_high_water * state.config.capacity.queue as f64;
    if state.is_draining() {
        (503, "draining")
    } else if depth as f64 >= high_water {
        (503, "queue_high_water")
    } else if !state.store.is_available() {
        (503, "store_unavailable")
    } else if matches!(state.config.db, crate::database::Database::Postgres(_))
        && !state.instance.is_registered()
    {
        (503, "lease_lost")
    } else if !state.auth.limiter.is_connected() {
        (503, "limits_connecting")
    } else {
        (200, "ready")
    }
}

fn readyz(state: &State) -> Response {
    let (status, reason) = readiness(state);
    let depth = state.queue_len();
    let capacity = state.config.capacity.queue;
    let body = json!({"status": reason, "queue_depth": depth, "queue_capacity": capacity});
    Response::json(status, &body)
}

fn metrics(state: &State) -> Response {
    state.metrics.queue_depth.set(state.queue_len() as i64);
    state
        .metrics
        .batch_pool_queue_depth
        .set(state.batch.queue_len() as i64);
    let cache = state.matrices.stats();
    let m = &state.metrics;
    m.knowledge_cache_bytes.set(cache.bytes as i64);
    m.knowledge_cache_stores.set(cache.entries as i64);
    for (result, n) in [("hit", cache.hits), ("miss", cache.misses)] {
        let counter = m.knowledge_cache_lookups.with_label_values(&[result]);
        counter.inc_by(n.saturating_sub(counter.get()));
    }
    if let Some(uploads) = &state.config.http.uploads {
        state.metrics.uploads_held.set(uploads.held() as i64);
    }
    state.store.observe();
    Response::text(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        state.metrics.render(),
    )
}
