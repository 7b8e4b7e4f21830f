//! The request log on PostgreSQL: rows copied in batches by the log writer, read back newest
//! first through the `(ts_ms, id)` indexes, and expired oldest first in small batches.

use std::io::Write;

use postgres::types::ToSql;
use postgres::{GenericClient, Row};

use super::Session;
use crate::store::requests::{Cursor, Filter, Logged, Page, RequestRow};

type Result<T> = std::result::Result<T, postgres::Error>;

/// The statement the log writer streams rows into, in [`copy_line`]'s column order.
pub(super) const COPY_SQL: &str = "COPY requests (request_id, ts_ms, method, route, model, \
     provider, upstream_model, attempts, status, error_code, total_ms, queue_ms, upstream_ms, \
     overhead_ms, ttft_ms, prompt_tokens, completion_tokens, streamed, client_left, \
     request_body, response_body, key_id) FROM STDIN";

/// One row in COPY's text format: tab-separated, `\N` for NULL, with backslash, tab, newline
/// and carriage return escaped in text and bodies written as `\\x` hex.
pub(super) fn copy_line(out: &mut Vec<u8>, row: &RequestRow) {
    fn text(out: &mut Vec<u8>, value: Option<&str>) {
        let Some(value) = value else {
            out.extend_from_slice(b"\\N");
            return;
        };
        for b in value.bytes() {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => out.push(b),
            }
        }
    }
    fn bytes(out: &mut Vec<u8>, value: Option<&[u8]>) {
        let Some(value) = value else {
            out.extend_from_slice(b"\\N");
            return;
        };
        out.extend_from_slice(b"\\\\x");
        for b in value {
            let _ = write!(out, "{b:02x}");
        }
    }
    fn plain(out: &mut Vec<u8>, value: Option<impl std::fmt::Display>) {
        match value {
            Some(v) => {
                let _ = write!(out, "{v}");
            }
            None => out.extend_from_slice(b"\\N"),
        }
    }
    let tab = |out: &mut Vec<u8>| out.push(b'\t');
    text(out, Some(&row.request_id));
    tab(out);
    plain(out, Some(row.ts_ms));
    tab(out);
    text(out, Some(&row.method));
    tab(out);
    text(out, Some(&row.route));
    tab(out);
    text(out, row.model.as_deref());
    tab(out);
    text(out, row.provider.as_deref());
    tab(out);
    text(out, row.upstream_model.as_deref());
    tab(out);
    plain(out, Some(row.attempts));
    tab(out);
    plain(out, Some(row.status));
    tab(out);
    text(out, row.error_code.as_deref());
    for ms in [row.total_ms, row.queue_ms, row.upstream_ms, row.overhead_ms] {
        tab(out);
        plain(out, Some(finite(ms)));
    }
    tab(out);
    plain(out, row.ttft_ms.map(finite));
    tab(out);
    plain(out, row.prompt_tokens.map(|n| n.min(i64::MAX as u64)));
    tab(out);
    plain(out, row.completion_tokens.map(|n| n.min(i64::MAX as u64)));
    tab(out);
    out.push(if row.streamed { b't' } else { b'f' });
    tab(out);
    out.push(if row.client_left { b't' } else { b'f' });
    tab(out);
    bytes(out, row.request_body.as_deref());
    tab(out);
    bytes(out, row.response_body.as_deref());
    tab(out);
    plain(out, row.key_id);
    out.push(b'\n');
}

/// A duration as COPY can read it: never NaN or infinite.
fn finite(ms: f64) -> f64 {
    if ms.is_finite() {
        ms
    } else {
        0.0
    }
}

pub(crate) fn cursor(c: &mut Session<'_, impl GenericClient>, id: i64) -> Result<Option<Cursor>> {
    Ok(
        c.query_opt("SELECT ts_ms FROM requests WHERE id = $1", &[&id])?
            .map(|r| Cursor {
                ts_ms: r.get(0),
                id,
            }),
    )
}

/// The rows matching `filter`, newest first (by time, then id): a range scan of one index.
pub(crate) fn list(c: &mut Session<'_, impl GenericClient>, filter: &Filter) -> Result<Page> {
    let (since, mut until) = filter.range.bounds();
    if let Some(before) = filter.before {
        until = until.min(before.ts_ms.saturating_add(1));
    }
    let model = filter.model.clone();
    let status = filter.status.map(i32::from);
    let key_id = filter.key_id;
    let before = filter.before.map(|b| (b.ts_ms, b.id));
    let limit = filter.limit as i64 + 1;
    let mut sql = String::from("SELECT * FROM requests WHERE ts_ms >= $1 AND ts_ms < $2");
    let mut args: Vec<&(dyn ToSql + Sync)> = vec![&since, &until];
    if let Some(model) = &model {
        args.push(model);
        sql.push_str(&format!(" AND model = ${}", args.len()));
    }
    if let Some(status) = &status {
        args.push(status);
        sql.push_str(&format!(" AND status = ${}", args.len()));
    }
    if let Some(key_id) = &key_id {
        args.push(key_id);
        sql.push_str(&format!(" AND key_id = ${}", args.len()));
    }
    if let Some((ts, id)) = &before {
        args.push(ts);
        args.push(id);
        sql.push_str(&format!(
            " AND (ts_ms, id) < (${}, ${})",
            args.len() - 1,
            args.len()
        ));
    }
    args.push(&limit);
    sql.push_str(&format!(
        " ORDER BY ts_ms DESC, id DESC LIMIT ${}",
        args.len()
    ));
    let mut rows: Vec<Logged> = c.query(&sql, &args)?.iter().map(read_row).collect();
    let has_more = rows.len() > filter.limit;
    rows.truncate(filter.limit);
    Ok(Page { rows, has_more })
}

fn read_row(r: &Row) -> Logged {
    let tokens = |name: &str| r.get::<_, Option<i64>>(name).map(|n| n.max(0) as u64);
    Logged {
        id: r.get("id"),
        row: RequestRow {
            request_id: r.get("request_id"),
            ts_ms: r.get("ts_ms"),
            method: r.get("method"),
            route: r.get("route"),
            model: r.get("model"),
            provider: r.get("provider"),
            upstream_model: r.get("upstream_model"),
            attempts: r.get::<_, i32>("attempts").max(0) as u32,
            status: r.get::<_, i32>("status").clamp(0, 999) as u16,
            error_code: r.get("error_code"),
            total_ms: r.get("total_ms"),
            queue_ms: r.get("queue_ms"),
            upstream_ms: r.get("upstream_ms"),
            overhead_ms: r.get("overhead_ms"),
            ttft_ms: r.get("ttft_ms"),
            prompt_tokens: tokens("prompt_tokens"),
            completion_tokens: tokens("completion_tokens"),
            streamed: r.get("streamed"),
            client_left: r.get("client_left"),
            key_id: r.get("key_id"),
            request_body: r.get("request_body"),
            response_body: r.get("response_body"),
        },
    }
}

/// When each key last made a logged call: `max(ts_ms)` through the `(key_id, ts_ms, id)` index.
pub(crate) fn last_used(
    c: &mut Session<'_, impl GenericClient>,
    key_ids: &[i64],
) -> Result<Vec<Option<i64>>> {
    let mut out = Vec::with_capacity(key_ids.len());
    for id in key_ids {
        let row = c.query_one("SELECT max(ts_ms) FROM requests WHERE key_id = $1", &[id])?;
        out.push(row.get(0));
    }
    Ok(out)
}

/// Deletes at most `batch` of the oldest rows logged before `cutoff_ms`; returns how many.
pub(crate) fn expire(
    c: &mut Session<'_, impl GenericClient>,
    cutoff_ms: i64,
    batch: usize,
) -> Result<usize> {
    let n = c.execute(
        "DELETE FROM requests WHERE id IN \
         (SELECT id FROM requests WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2)",
        &[&cutoff_ms, &(batch as i64)],
    )?;
    Ok(n as usize)
}
