//! The request log in SQLite: rows inserted by the writer in batches, read back newest first
//! through the `(ts_ms, id)` indexes, and expired oldest first in small batches.

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use crate::store::requests::{Cursor, Filter, Logged, Page, RequestRow};
use crate::store::StoreError;

/// Inserts a batch of rows (inside the writer's transaction).
pub(crate) fn insert(conn: &Connection, rows: &[RequestRow]) -> rusqlite::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO requests (request_id, ts_ms, method, route, model, provider, \
         upstream_model, attempts, status, error_code, total_ms, queue_ms, upstream_ms, \
         overhead_ms, ttft_ms, prompt_tokens, completion_tokens, streamed, client_left, \
         request_body, response_body, key_id, cost_micros, cost_estimated) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
         ?18, ?19, ?20, ?21, ?22, ?23, ?24)",
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
            r.key_id,
            r.cost_micros,
            r.cost_estimated,
        ])?;
    }
    Ok(())
}

/// Where row `id` stands in the newest-first order; `None` when there is no such row
/// (never logged, or deleted by retention).
pub(crate) fn cursor(conn: &Connection, id: i64) -> Result<Option<Cursor>, StoreError> {
    let found = conn
        .prepare_cached("SELECT ts_ms FROM requests WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    Ok(found.map(|ts_ms| Cursor { ts_ms, id }))
}

/// The rows matching `filter`, newest first (by time, then id). Ordered like the indexes
/// `(ts_ms, id)`, `(model, ts_ms, id)`, `(status, ts_ms, id)` and `(key_id, ts_ms, id)`, so a page is a range scan of
/// one of them with no sort, however large the table.
pub(crate) fn list(conn: &Connection, filter: &Filter) -> Result<Page, StoreError> {
    let (sql, args) = list_query(filter);
    let mut statement = conn.prepare_cached(&sql)?;
    let mut rows = statement
        .query_map(params_from_iter(args), read_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let has_more = rows.len() > filter.limit;
    rows.truncate(filter.limit);
    Ok(Page { rows, has_more })
}

/// The SQL of [`list`] and its parameters: only the filters given, so each combination is
/// one cached statement.
fn list_query(filter: &Filter) -> (String, Vec<Value>) {
    let (since, mut until) = filter.range.bounds();
    // The cursor's time is the upper end of the index range, so a page deep in the log starts
    // where it is rather than walking down from the newest row; the row-value test below then
    // only sorts out the rows logged in that same millisecond.
    if let Some(before) = filter.before {
        until = until.min(before.ts_ms.saturating_add(1));
    }
    let mut sql = String::from("SELECT * FROM requests WHERE ts_ms >= ?1 AND ts_ms < ?2");
    let mut args = vec![Value::Integer(since), Value::Integer(until)];
    if let Some(model) = &filter.model {
        args.push(Value::Text(model.clone()));
        sql.push_str(&format!(" AND model = ?{}", args.len()));
    }
    if let Some(status) = filter.status {
        args.push(Value::Integer(i64::from(status)));
        sql.push_str(&format!(" AND status = ?{}", args.len()));
    }
    if let Some(key_id) = filter.key_id {
        args.push(Value::Integer(key_id));
        sql.push_str(&format!(" AND key_id = ?{}", args.len()));
    }
    if let Some(before) = filter.before {
        args.push(Value::Integer(before.ts_ms));
        args.push(Value::Integer(before.id));
        sql.push_str(&format!(
            " AND (ts_ms, id) < (?{}, ?{})",
            args.len() - 1,
            args.len()
        ));
    }
    // One row more than the page says whether there is another page.
    args.push(Value::Integer(filter.limit as i64 + 1));
    sql.push_str(&format!(
        " ORDER BY ts_ms DESC, id DESC LIMIT ?{}",
        args.len()
    ));
    (sql, args)
}

fn read_row(r: &Row<'_>) -> rusqlite::Result<Logged> {
    let tokens = |name: &str| -> rusqlite::Result<Option<u64>> {
        Ok(r.get::<_, Option<i64>>(name)?.map(|n| n.max(0) as u64))
    };
    Ok(Logged {
        id: r.get("id")?,
        row: RequestRow {
            request_id: r.get("request_id")?,
            ts_ms: r.get("ts_ms")?,
            method: r.get("method")?,
            route: r.get("route")?,
            model: r.get("model")?,
            provider: r.get("provider")?,
            upstream_model: r.get("upstream_model")?,
            attempts: r.get("attempts")?,
            status: r.get("status")?,
            error_code: r.get("error_code")?,
            total_ms: r.get("total_ms")?,
            queue_ms: r.get("queue_ms")?,
            upstream_ms: r.get("upstream_ms")?,
            overhead_ms: r.get("overhead_ms")?,
            ttft_ms: r.get("ttft_ms")?,
            prompt_tokens: tokens("prompt_tokens")?,
            completion_tokens: tokens("completion_tokens")?,
            cost_micros: r.get("cost_micros")?,
            cost_estimated: r.get("cost_estimated")?,
            streamed: r.get("streamed")?,
            client_left: r.get("client_left")?,
            key_id: r.get("key_id")?,
            request_body: r.get("request_body")?,
            response_body: r.get("response_body")?,
        },
    })
}

/// When each key last made a logged call: `max(ts_ms)` through the `(key_id, ts_ms)` index.
pub(crate) fn last_used(
    conn: &Connection,
    key_ids: &[i64],
) -> Result<Vec<Option<i64>>, StoreError> {
    let mut statement = conn.prepare_cached("SELECT max(ts_ms) FROM requests WHERE key_id = ?1")?;
    let mut out = Vec::with_capacity(key_ids.len());
    for id in key_ids {
        out.push(statement.query_row([id], |r| r.get(0))?);
    }
    Ok(out)
}

/// Deletes at most `batch` of the oldest rows logged before `cutoff_ms`; returns how many.
/// Bounded so one call holds the write lock only briefly (retention calls it in a loop).
pub(crate) fn expire(conn: &Connection, cutoff_ms: i64, batch: usize) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM requests WHERE id IN \
         (SELECT id FROM requests WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2)",
    )?
    .execute(params![cutoff_ms, batch as i64])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::requests::TimeRange;
    use crate::store::sqlite::migrate;

    /// Rows 1..=n, every third one for model "b" with status 500, logged one second apart
    /// except that rows 4 and 5 share a millisecond (ties go by id).
    fn db(n: i64) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate::migrate(&mut conn).unwrap();
        let rows: Vec<RequestRow> = (1..=n)
            .map(|i| RequestRow {
                request_id: format!("r{i}"),
                ts_ms: if i == 5 { 4000 } else { i * 1000 },
                method: "POST".into(),
                route: "/v1/chat/completions".into(),
                model: Some(if i % 3 == 0 { "b" } else { "a" }.into()),
                status: if i % 3 == 0 { 500 } else { 200 },
                key_id: (i % 2 == 0).then_some(7),
                ..RequestRow::default()
            })
            .collect();
        insert(&conn, &rows).unwrap();
        conn
    }

    fn ids(page: &Page) -> Vec<i64> {
        page.rows.iter().map(|l| l.id).collect()
    }

    fn filter(limit: usize) -> Filter {
        Filter {
            limit,
            ..Filter::default()
        }
    }

    #[test]
    fn pages_run_newest_first_and_the_cursor_continues_where_the_last_ended() {
        let conn = db(10);
        let first = list(&conn, &filter(4)).unwrap();
        assert_eq!(ids(&first), [10, 9, 8, 7]);
        assert!(first.has_more);
        let mut all = ids(&first);
        let mut page = first;
        while page.has_more {
            let last = page.rows.last().unwrap().id;
            let next = Filter {
                before: cursor(&conn, last).unwrap(),
                ..filter(4)
            };
            page = list(&conn, &next).unwrap();
            all.extend(ids(&page));
        }
        // Row 5 was logged in the same millisecond as row 4 and has the larger id.
        assert_eq!(all, [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]);
        let exact = list(&conn, &filter(10)).unwrap();
        assert!(!exact.has_more, "10 rows in a page of 10 leave none");
        assert_eq!(cursor(&conn, 99).unwrap(), None);
    }

    #[test]
    fn filters_combine() {
        let conn = db(10);
        let by_model = Filter {
            model: Some("b".into()),
            ..filter(50)
        };
        assert_eq!(ids(&list(&conn, &by_model).unwrap()), [9, 6, 3]);
        let by_status = Filter {
            status: Some(200),
            range: TimeRange {
                since_ms: Some(2000),
                until_ms: Some(8000),
            },
            ..filter(50)
        };
        assert_eq!(ids(&list(&conn, &by_status).unwrap()), [7, 5, 4, 2]);
        let by_key = Filter {
            key_id: Some(7),
            model: Some("a".into()),
            ..filter(50)
        };
        assert_eq!(ids(&list(&conn, &by_key).unwrap()), [10, 8, 4, 2]);
        let read = &list(&conn, &filter(1)).unwrap().rows[0];
        assert_eq!(read.row.request_id, "r10");
        assert_eq!(read.row.model.as_deref(), Some("a"));
        assert_eq!(read.row.ts_ms, 10_000);
    }

    #[test]
    fn every_listing_is_an_index_scan_without_a_sort() {
        let conn = db(3);
        let before = Some(Cursor { ts_ms: 2000, id: 2 });
        let since = TimeRange {
            since_ms: Some(1000),
            until_ms: None,
        };
        for f in [
            filter(5),
            Filter {
                before,
                range: since,
                ..filter(5)
            },
            Filter {
                model: Some("a".into()),
                before,
                ..filter(5)
            },
            Filter {
                status: Some(200),
                range: since,
                ..filter(5)
            },
            Filter {
                key_id: Some(7),
                before,
                ..filter(5)
            },
        ] {
            let (sql, args) = list_query(&f);
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = explain
                .query_map(params_from_iter(args), |r| r.get::<_, String>("detail"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let plan = plan.join("; ");
            assert!(plan.contains("INDEX requests_"), "{f:?}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{f:?} sorts: {plan}");
        }
    }

    #[test]
    fn a_deep_page_starts_at_its_cursor_instead_of_walking_down_from_the_newest_row() {
        let conn = db(5000);
        let deep = Filter {
            before: cursor(&conn, 20).unwrap(),
            ..filter(5)
        };
        let (sql, args) = list_query(&deep);
        let mut statement = conn.prepare(&sql).unwrap();
        let ids: Vec<i64> = statement
            .query_map(params_from_iter(args), |r| r.get("id"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, [19, 18, 17, 16, 15, 14]);
        let steps = statement.get_status(rusqlite::StatementStatus::VmStep);
        assert!(
            steps < 1000,
            "{steps} VM steps for 6 rows: the scan walked the log"
        );
    }

    #[test]
    fn expiry_deletes_the_oldest_rows_in_bounded_batches() {
        let conn = db(10);
        assert_eq!(expire(&conn, 7000, 3).unwrap(), 3);
        assert_eq!(expire(&conn, 7000, 3).unwrap(), 3);
        assert_eq!(expire(&conn, 7000, 3).unwrap(), 0);
        assert_eq!(ids(&list(&conn, &filter(50)).unwrap()), [10, 9, 8, 7]);
    }
}
