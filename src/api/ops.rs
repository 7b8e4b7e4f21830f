//! The fast lane: `/healthz`, `/readyz` and `/metrics`, answered on the connection thread in
//! microseconds, so they stay truthful while every worker is busy and the queue is full.

use serde_json::json;

use super::Route;
use crate::http::Response;
use crate::server::State;

pub(crate) fn answer(state: &State, route: Route) -> Response {
    match route {
        Route::Readyz => readyz(state),
        Route::Metrics => metrics(state),
        _ => Response::json(200, &json!({"status": "ok"})),
    }
}

/// 503 while draining, while the queue is at or above its high-water mark, or while the
/// database cannot be reached, so a load balancer sends new work elsewhere before this
/// instance has to refuse it.
fn readyz(state: &State) -> Response {
    let depth = state.queue_len();
    let capacity = state.config.capacity.queue;
    let high_water = state.config.capacity.ready_high_water * capacity as f64;
    let (status, reason) = if state.is_draining() {
        (503, "draining")
    } else if depth as f64 >= high_water {
        (503, "queue_high_water")
    } else if !state.store.is_available() {
        (503, "store_unavailable")
    } else {
        (200, "ready")
    };
    let body = json!({"status": reason, "queue_depth": depth, "queue_capacity": capacity});
    Response::json(status, &body)
}

fn metrics(state: &State) -> Response {
    state.metrics.queue_depth.set(state.queue_len() as i64);
    state
        .metrics
        .batch_pool_queue_depth
        .set(state.batch.queue_len() as i64);
    state.store.observe();
    Response::text(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        state.metrics.render(),
    )
}
