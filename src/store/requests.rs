//! The request log: one row per `/v1` and `/api` call, written by the writer in batches.
//! A row holds what the gateway did (route, model, provider, status, timings, tokens) and,
//! only when `[log] bodies` is on, the bodies, cut to `[log] body_max_bytes`. Never a header.

use rusqlite::{params, Connection};

/// One call, as logged.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestRow {
    pub(crate) request_id: String,
    /// When the request head arrived, unix ms.
    pub(crate) ts_ms: i64,
    pub(crate) method: String,
    /// The route template (`/v1/chat/completions`), or `unmatched`.
    pub(crate) route: String,
    /// The model the client asked for.
    pub(crate) model: Option<String>,
    /// Who answered: the provider and the model name it was sent.
    pub(crate) provider: Option<String>,
    pub(crate) upstream_model: Option<String>,
    /// Provider attempts, retries and fallbacks included.
    pub(crate) attempts: u32,
    pub(crate) status: u16,
    /// The error's `code` when the answer was an error (or a stream that ended in one).
    pub(crate) error_code: Option<String>,
    pub(crate) total_ms: f64,
    pub(crate) queue_ms: f64,
    pub(crate) upstream_ms: f64,
    /// Total minus queue wait minus time blocked on a provider.
    pub(crate) overhead_ms: f64,
    /// Until the first event reached the client (streams).
    pub(crate) ttft_ms: Option<f64>,
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    pub(crate) streamed: bool,
    /// The client went away before the answer was complete.
    pub(crate) client_left: bool,
    pub(crate) request_body: Option<Vec<u8>>,
    pub(crate) response_body: Option<Vec<u8>>,
}

/// Inserts a batch of rows (inside the writer's transaction).
pub(crate) fn insert(conn: &Connection, rows: &[RequestRow]) -> rusqlite::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO requests (request_id, ts_ms, method, route, model, provider, \
         upstream_model, attempts, status, error_code, total_ms, queue_ms, upstream_ms, \
         overhead_ms, ttft_ms, prompt_tokens, completion_tokens, streamed, client_left, \
         request_body, response_body) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
         ?18, ?19, ?20, ?21)",
    )?;
    for r in rows {
        insert.execute(params![
            r.request_id,
            r.ts_ms,
            r.method,
            r.route,
            r.model,
            r.provider,
            r.upstream_model,
            r.attempts,
            r.status,
            r.error_code,
            r.total_ms,
            r.queue_ms,
            r.upstream_ms,
            r.overhead_ms,
            r.ttft_ms,
            r.prompt_tokens.map(|n| n.min(i64::MAX as u64) as i64),
            r.completion_tokens.map(|n| n.min(i64::MAX as u64) as i64),
            r.streamed,
            r.client_left,
            r.request_body,
            r.response_body,
        ])?;
    }
    Ok(())
}
