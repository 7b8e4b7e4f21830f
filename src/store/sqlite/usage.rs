//! Usage totals in SQLite: one grouped scan of the request log.

use rusqlite::Connection;

use crate::store::requests::TimeRange;
use crate::store::usage::{GroupBy, Totals};
use crate::store::StoreError;
use crate::time;

/// The totals of the calls in `range` that asked for a model (chat, embeddings, conversation
/// turns, failed ones included; a call refused before it named a model and syncgate's own
/// `/api` reads are not usage). By model: most calls first. By day: oldest day first.
pub(crate) fn summarise(
    conn: &Connection,
    group_by: GroupBy,
    range: TimeRange,
) -> Result<Vec<Totals>, StoreError> {
    let (key, order) = match group_by {
        GroupBy::Model => ("model", "calls DESC, key"),
        GroupBy::Day => ("ts_ms / 86400000", "key"),
        GroupBy::Key => (
            "CASE WHEN key_id IS NULL THEN '(no key)' ELSE key_id || ':' || \
             coalesce((SELECT name FROM api_keys WHERE id = key_id), '?') END",
            "calls DESC, key",
        ),
    };
    let sql = format!(
        "SELECT {key} AS key, count(*) AS calls, sum(status >= 400), \
         sum(coalesce(prompt_tokens, 0)), sum(coalesce(completion_tokens, 0)), \
         sum(cost_micros), sum(cost_micros IS NULL AND prompt_tokens IS NOT NULL) \
         FROM requests WHERE model IS NOT NULL AND ts_ms >= ?1 AND ts_ms < ?2 \
         GROUP BY key ORDER BY {order}"
    );
    let (since, until) = range.bounds();
    let count = |n: i64| n.max(0) as u64;
    let mut statement = conn.prepare_cached(&sql)?;
    let totals = statement
        .query_map([since, until], |r| {
            let key = match group_by {
                GroupBy::Model | GroupBy::Key => r.get::<_, String>(0)?,
                GroupBy::Day => time::format_day(r.get::<_, i64>(0)? * time::MS_PER_DAY),
            };
            Ok(Totals {
                key,
                calls: count(r.get(1)?),
                errors: count(r.get(2)?),
                prompt_tokens: count(r.get(3)?),
                completion_tokens: count(r.get(4)?),
                cost_micros: r.get(5)?,
                unpriced_calls: count(r.get(6)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::requests::RequestRow;
    use crate::store::sqlite::migrate;
    use crate::store::sqlite::requests::insert;

    const DAY: i64 = time::MS_PER_DAY;
    /// 2026-11-23T00:00:00Z.
    const MONDAY: i64 = 1_795_392_000_000;

    fn row(ts_ms: i64, model: Option<&str>, status: u16, tokens: Option<(u64, u64)>) -> RequestRow {
        RequestRow {
            request_id: format!("r{ts_ms}"),
            ts_ms,
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            model: model.map(str::to_string),
            status,
            prompt_tokens: tokens.map(|t| t.0),
            completion_tokens: tokens.map(|t| t.1),
            ..RequestRow::default()
        }
    }

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate::migrate(&mut conn).unwrap();
        insert(
            &conn,
            &[
                RequestRow {
                    cost_micros: Some(100),
                    ..row(MONDAY + 1, Some("a"), 200, Some((10, 5)))
                },
                row(MONDAY + 2, Some("a"), 502, None),
                row(MONDAY + DAY - 1, Some("b"), 200, Some((1, 2))),
                row(MONDAY + DAY, Some("a"), 200, Some((100, 50))),
                row(MONDAY + DAY + 1, Some("b"), 404, None),
                row(MONDAY + DAY + 2, Some("b"), 200, Some((3, 4))),
                // Refused before naming a model, and an /api read: not usage.
                row(MONDAY + 5, None, 400, None),
            ],
        )
        .unwrap();
        conn
    }

    #[test]
    fn totals_by_model_put_the_most_called_first() {
        let conn = db();
        let got = summarise(&conn, GroupBy::Model, TimeRange::default()).unwrap();
        // a's first call is priced; every other call with tokens is unpriced.
        let priced = |t: Totals, micros: Option<i64>, unpriced: u64| Totals {
            cost_micros: micros,
            unpriced_calls: unpriced,
            ..t
        };
        assert_eq!(
            got,
            [
                priced(Totals::of("a", 3, 1, 110, 55), Some(100), 1),
                priced(Totals::of("b", 3, 1, 4, 6), None, 2)
            ],
            "ties in calls go by name"
        );
        let monday_only = TimeRange {
            since_ms: Some(MONDAY),
            until_ms: Some(MONDAY + DAY),
        };
        let got = summarise(&conn, GroupBy::Model, monday_only).unwrap();
        assert_eq!(
            got,
            [
                priced(Totals::of("a", 2, 1, 10, 5), Some(100), 0),
                priced(Totals::of("b", 1, 0, 1, 2), None, 1)
            ]
        );
    }

    #[test]
    fn totals_by_day_follow_utc_days_in_order() {
        let conn = db();
        let got = summarise(&conn, GroupBy::Day, TimeRange::default()).unwrap();
        let unpriced = |t: Totals, micros: Option<i64>, n: u64| Totals {
            cost_micros: micros,
            unpriced_calls: n,
            ..t
        };
        assert_eq!(
            got,
            [
                unpriced(Totals::of("2026-11-23", 3, 1, 11, 7), Some(100), 1),
                unpriced(Totals::of("2026-11-24", 3, 1, 103, 54), None, 2)
            ]
        );
        let from_tuesday = TimeRange {
            since_ms: Some(MONDAY + DAY),
            until_ms: None,
        };
        let got = summarise(&conn, GroupBy::Day, from_tuesday).unwrap();
        assert_eq!(
            got,
            [unpriced(Totals::of("2026-11-24", 3, 1, 103, 54), None, 2)]
        );
    }
}
