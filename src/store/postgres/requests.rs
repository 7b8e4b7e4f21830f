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
     request_body, response_body, key_id, cost_micros, cost_estimated) FROM STDIN";

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
    tab(out);
    plain(out, row.cost_micros);
    tab(out);
    out.push(if row.cost_estimated { b't' } else { b'f' });
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
    let (sql, args) = list_query(filter);
    let args: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref()).collect();
    let mut rows: Vec<Logged> = c.query(&sql, &args)?.iter().map(read_row).collect();
    let has_more = rows.len() > filter.limit;
    rows.truncate(filter.limit);
    Ok(Page { rows, has_more })
}

/// [`list`]'s statement and its arguments. A filter on a status other than 200 also says
/// `status <> 200` in the text: the status index holds only those rows (migration 0005), and a
/// generic plan, which cannot look inside `$n`, may use a partial index only when the query
/// states its condition. A filter on 200 reads `requests_ts`, where nearly every row is a 200.
fn list_query(filter: &Filter) -> (String, Vec<Box<dyn ToSql + Sync>>) {
    let (since, mut until) = filter.range.bounds();
    if let Some(before) = filter.before {
        until = until.min(before.ts_ms.saturating_add(1));
    }
    let mut sql = String::from("SELECT * FROM requests WHERE ts_ms >= $1 AND ts_ms < $2");
    let mut args: Vec<Box<dyn ToSql + Sync>> = vec![Box::new(since), Box::new(until)];
    let mut and = |sql: &mut String, clause: &str, arg: Box<dyn ToSql + Sync>| {
        args.push(arg);
        sql.push_str(&clause.replace("$n", &format!("${}", args.len())));
    };
    if let Some(model) = &filter.model {
        and(&mut sql, " AND model = $n", Box::new(model.clone()));
    }
    if let Some(status) = filter.status {
        let partial = if status == 200 {
            ""
        } else {
            " AND status <> 200"
        };
        and(
            &mut sql,
            &format!(" AND status = $n{partial}"),
            Box::new(i32::from(status)),
        );
    }
    if let Some(key_id) = filter.key_id {
        and(&mut sql, " AND key_id = $n", Box::new(key_id));
    }
    if let Some(before) = filter.before {
        and(&mut sql, " AND (ts_ms, id) < ($n", Box::new(before.ts_ms));
        and(&mut sql, ", $n)", Box::new(before.id));
    }
    and(
        &mut sql,
        " ORDER BY ts_ms DESC, id DESC LIMIT $n",
        Box::new(filter.limit as i64 + 1),
    );
    (sql, args)
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
            cost_micros: r.get("cost_micros"),
            cost_estimated: r.get("cost_estimated"),
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

#[cfg(test)]
mod tests {
    use super::list_query;
    use crate::store::requests::{Filter, TimeRange};
    use crate::store::testing::postgres_db;
    use crate::store::Backend;

    /// The index each filter of the requests page reads, in the plan the server would reuse for
    /// any value (a generic plan), on a log where 200s and keyless rows are the common case.
    #[test]
    fn each_filter_reads_its_index_even_in_a_generic_plan() {
        let Some(db) = postgres_db("requests_plans") else {
            return;
        };
        let store = db.open();
        let Backend::Postgres(pg) = store.backend() else {
            unreachable!("postgres_db opens PostgreSQL");
        };
        let mut conn = pg.pool.get().unwrap();
        let client = &mut conn.client;
        // 200,000 calls over 20 days: every 97th failed with 500, every 1000th asked for
        // `rare`, every 50th was made with one of keys 1-4, the rest were keyless.
        client
            .batch_execute(
                "INSERT INTO requests (request_id, ts_ms, method, route, model, attempts, \
                   status, total_ms, queue_ms, upstream_ms, overhead_ms, key_id) \
                 SELECT 'req-' || x, 1700000000000 + x * 8640, 'POST', '/v1/chat/completions', \
                   CASE WHEN x % 1000 = 0 THEN 'rare' ELSE 'gpt-a' END, 1, \
                   CASE WHEN x % 97 = 0 THEN 500 ELSE 200 END, 10, 0, 9, 1, \
                   CASE WHEN x % 50 = 0 THEN 1 + x % 4 END \
                 FROM generate_series(1, 200000) AS x; \
                 ANALYZE requests; \
                 SET plan_cache_mode = force_generic_plan",
            )
            .unwrap();
        // PREPARE and EXPLAIN EXECUTE, as a session reusing the statement would plan it.
        let mut explain = |sql: &str, args: &str| -> String {
            client
                .batch_execute(&format!("DEALLOCATE ALL; PREPARE q AS {sql}"))
                .unwrap();
            let rows = client
                .query(&format!("EXPLAIN EXECUTE q({args})"), &[])
                .unwrap();
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let filter = |status: Option<u16>, key_id: Option<i64>| Filter {
            model: None,
            status,
            key_id,
            range: TimeRange {
                since_ms: Some(1_700_000_000_000),
                until_ms: Some(1_800_000_000_000),
            },
            before: None,
            limit: 50,
        };
        let range = "1700000000000, 1800000000000";
        let cases = [
            (filter(Some(500), None), "500", "requests_status_ts"),
            (filter(Some(404), None), "404", "requests_status_ts"),
            (filter(None, Some(3)), "3", "requests_key_ts"),
            (filter(Some(200), None), "200", "requests_ts"),
        ];
        for (f, value, index) in cases {
            let plan = explain(&list_query(&f).0, &format!("{range}, {value}, 51"));
            assert!(plan.contains("$3"), "not a generic plan:\n{plan}");
            assert!(
                plan.contains(&format!("using {index} ")),
                "status {:?}, key {:?}: expected {index}:\n{plan}",
                f.status,
                f.key_id
            );
        }
        let plan = explain(&list_query(&filter(None, None)).0, &format!("{range}, 51"));
        assert!(plan.contains("using requests_ts "), "{plan}");
        // Without the stated condition, a generic plan cannot use the partial index.
        let (sql, _) = list_query(&filter(Some(500), None));
        let plan = explain(
            &sql.replace(" AND status <> 200", ""),
            &format!("{range}, 500, 51"),
        );
        assert!(plan.contains("$3"), "not a generic plan:\n{plan}");
        assert!(!plan.contains("requests_status_ts"), "{plan}");
    }
}
