//! The request log: one row per `/v1` and `/api` call, written by the writer in batches.
//! A row holds what the gateway did (route, model, provider, status, timings, tokens) and,
//! only when `[log] bodies` is on, the bodies, cut to `[log] body_max_bytes`. Never a header.
//! Read back newest first through the `(ts_ms, id)` indexes, and expired oldest first.

use super::postgres::requests as pg;
use super::sqlite::requests as sql;
use super::{Backend, Store, StoreError};

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
    /// What the call cost, micro-dollars; `None` when unpriced or no model was called.
    pub(crate) cost_micros: Option<i64>,
    /// Part of the usage behind the cost was estimated (a stream cut before its usage came).
    pub(crate) cost_estimated: bool,
    pub(crate) streamed: bool,
    /// The client went away before the answer was complete.
    pub(crate) client_left: bool,
    /// The API key that made the call (`None` in open mode).
    pub(crate) key_id: Option<i64>,
    pub(crate) request_body: Option<Vec<u8>>,
    pub(crate) response_body: Option<Vec<u8>>,
}

/// A half-open span of time, `since <= ts_ms < until`, in unix ms; unbounded where `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TimeRange {
    pub(crate) since_ms: Option<i64>,
    pub(crate) until_ms: Option<i64>,
}

impl TimeRange {
    /// The bounds as SQL parameters: an absent bound is the widest value, so every query has
    /// the same shape and the `ts_ms` index serves it.
    pub(crate) fn bounds(self) -> (i64, i64) {
        (
            self.since_ms.unwrap_or(i64::MIN),
            self.until_ms.unwrap_or(i64::MAX),
        )
    }
}

/// A place in the newest-first order: the row with this id, logged at this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) ts_ms: i64,
    pub(crate) id: i64,
}

/// Which rows [`list`] returns.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    /// Only calls that asked for this model.
    pub(crate) model: Option<String>,
    pub(crate) status: Option<u16>,
    /// Only calls made with this API key (its id).
    pub(crate) key_id: Option<i64>,
    pub(crate) range: TimeRange,
    /// Only rows older than this one (the last row of the previous page).
    pub(crate) before: Option<Cursor>,
    /// Rows per page, at least 1.
    pub(crate) limit: usize,
}

/// A logged call as read back, with its row id.
#[derive(Debug, Clone)]
pub(crate) struct Logged {
    pub(crate) id: i64,
    pub(crate) row: RequestRow,
}

/// One page of [`list`]: the rows, newest first, and whether older ones match too.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) rows: Vec<Logged>,
    pub(crate) has_more: bool,
}

/// Where row `id` stands in the newest-first order; `None` when there is no such row
/// (never logged, or deleted by retention).
pub(crate) fn cursor(store: &Store, id: i64) -> Result<Option<Cursor>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => sql::cursor(&*db.read()?, id),
        Backend::Postgres(db) => db.query(|c| pg::cursor(c, id)),
    }
}

/// The rows matching `filter`, newest first (by time, then id); a page is a range scan of an
/// index, however large the log.
pub(crate) fn list(store: &Store, filter: &Filter) -> Result<Page, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => sql::list(&*db.read()?, filter),
        Backend::Postgres(db) => db.query(|c| pg::list(c, filter)),
    }
}

/// When each of these keys last made a logged call (unix ms), in the same order; `None` for a
/// key with no call in the log. One index lookup per key (the `(key_id, ts_ms)` index).
pub(crate) fn last_used(store: &Store, key_ids: &[i64]) -> Result<Vec<Option<i64>>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => sql::last_used(&*db.read()?, key_ids),
        Backend::Postgres(db) => db.query(|c| pg::last_used(c, key_ids)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::store::testing::stores;
    use crate::store::usage::{self, GroupBy};

    fn row(i: i64) -> RequestRow {
        RequestRow {
            request_id: format!("r{i}"),
            ts_ms: i * 1000,
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            model: Some(if i % 2 == 0 { "even" } else { "odd" }.into()),
            status: if i == 3 { 500 } else { 200 },
            prompt_tokens: Some(1),
            completion_tokens: Some(2),
            upstream_model: Some("tab\tnewline\nreturn\rback\\slash".into()),
            request_body: Some(b"tab\tnewline\nback\\slash".to_vec()),
            key_id: (i == 2).then_some(9),
            ..RequestRow::default()
        }
    }

    fn page(store: &Store, before: Option<Cursor>, status: Option<u16>) -> Page {
        let filter = Filter {
            before,
            status,
            limit: 2,
            ..Filter::default()
        };
        list(store, &filter).unwrap()
    }

    #[test]
    fn logged_rows_page_newest_first_filter_and_add_up_in_usage() {
        for t in stores("log") {
            for i in 1..=5 {
                t.log(row(i));
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while list(
                &t,
                &Filter {
                    limit: 10,
                    ..Filter::default()
                },
            )
            .unwrap()
            .rows
            .len()
                < 5
            {
                assert!(Instant::now() < deadline, "the log rows never arrived");
                std::thread::sleep(Duration::from_millis(20));
            }
            let first = page(&t, None, None);
            let ids: Vec<&str> = first
                .rows
                .iter()
                .map(|l| l.row.request_id.as_str())
                .collect();
            assert_eq!((ids, first.has_more), (vec!["r5", "r4"], true));
            let last = first.rows.last().unwrap();
            let at = cursor(&t, last.id).unwrap().unwrap();
            assert_eq!(at.ts_ms, 4000);
            let second = page(&t, Some(at), None);
            let ids: Vec<&str> = second
                .rows
                .iter()
                .map(|l| l.row.request_id.as_str())
                .collect();
            assert_eq!(ids, ["r3", "r2"]);
            let failed = page(&t, None, Some(500));
            assert_eq!(failed.rows.len(), 1);
            assert_eq!(
                failed.rows[0].row.request_body.as_deref(),
                Some(&b"tab\tnewline\nback\\slash"[..])
            );
            // Text and bytes with COPY's special characters come back as they went in.
            assert_eq!(
                failed.rows[0].row.upstream_model.as_deref(),
                Some("tab\tnewline\nreturn\rback\\slash")
            );
            assert!(cursor(&t, 999_999).unwrap().is_none());
            let by_key = Filter {
                key_id: Some(9),
                limit: 5,
                ..Filter::default()
            };
            let keyed = list(&t, &by_key).unwrap();
            assert_eq!(keyed.rows.len(), 1);
            assert_eq!(keyed.rows[0].row.request_id, "r2");
            assert_eq!(last_used(&t, &[9, 10]).unwrap(), [Some(2000), None]);

            let totals = usage::summarise(&t, GroupBy::Model, TimeRange::default()).unwrap();
            let odd = totals.iter().find(|x| x.key == "odd").unwrap();
            assert_eq!(
                (
                    odd.calls,
                    odd.errors,
                    odd.prompt_tokens,
                    odd.completion_tokens
                ),
                (3, 1, 3, 6)
            );
            let days = usage::summarise(&t, GroupBy::Day, TimeRange::default()).unwrap();
            assert_eq!(days.len(), 1);
            assert_eq!(days[0].calls, 5);
        }
    }

    #[test]
    fn retention_deletes_only_rows_older_than_it_keeps() {
        let day = crate::time::MS_PER_DAY;
        let now = crate::store::now_ms();
        for mut t in stores("retention") {
            for (i, age_days) in [(1, 40), (2, 31), (3, 29), (4, 0)] {
                t.log(RequestRow {
                    ts_ms: now - age_days * day,
                    ..row(i)
                });
            }
            // Closing commits what is queued; the sweep at the next start deletes the old.
            t.reopen(crate::store::Keep {
                log_days: 30,
                jobs_days: 0,
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            let left = loop {
                let rows = list(
                    &t,
                    &Filter {
                        limit: 10,
                        ..Filter::default()
                    },
                )
                .unwrap()
                .rows;
                if rows.len() <= 2 || Instant::now() > deadline {
                    break rows;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let ids: Vec<&str> = left.iter().map(|l| l.row.request_id.as_str()).collect();
            assert_eq!(ids, ["r4", "r3"]);
        }
    }
}
