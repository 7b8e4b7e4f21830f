//! Usage totals on PostgreSQL: one grouped scan of the request log, as on SQLite.

use postgres::GenericClient;

use super::Session;
use crate::store::requests::TimeRange;
use crate::store::usage::{GroupBy, Totals};
use crate::time;

pub(crate) fn summarise(
    c: &mut Session<'_, impl GenericClient>,
    group_by: GroupBy,
    range: TimeRange,
) -> Result<Vec<Totals>, postgres::Error> {
    let (key, order) = match group_by {
        GroupBy::Model => ("model", "calls DESC, key"),
        GroupBy::Day => ("(ts_ms / 86400000)::TEXT", "min(ts_ms)"),
        GroupBy::Key => (
            "CASE WHEN key_id IS NULL THEN '(no key)' ELSE key_id::TEXT || ':' || \
             coalesce((SELECT name FROM api_keys WHERE id = key_id), '?') END",
            "calls DESC, key",
        ),
    };
    let sql = format!(
        "SELECT {key} AS key, count(*) AS calls, count(*) FILTER (WHERE status >= 400), \
         coalesce(sum(prompt_tokens), 0)::BIGINT, coalesce(sum(completion_tokens), 0)::BIGINT, \
         sum(cost_micros)::BIGINT, \
         count(*) FILTER (WHERE cost_micros IS NULL AND prompt_tokens IS NOT NULL) \
         FROM requests WHERE model IS NOT NULL AND ts_ms >= $1 AND ts_ms < $2 \
         GROUP BY 1 ORDER BY {order}"
    );
    let (since, until) = range.bounds();
    let count = |n: i64| n.max(0) as u64;
    Ok(c.query(&sql, &[&since, &until])?
        .iter()
        .map(|r| {
            let key: String = r.get(0);
            let key = match group_by {
                GroupBy::Model | GroupBy::Key => key,
                GroupBy::Day => {
                    time::format_day(key.parse::<i64>().unwrap_or(0) * time::MS_PER_DAY)
                }
            };
            Totals {
                key,
                calls: count(r.get(1)),
                errors: count(r.get(2)),
                prompt_tokens: count(r.get(3)),
                completion_tokens: count(r.get(4)),
                cost_micros: r.get(5),
                unpriced_calls: count(r.get(6)),
            }
        })
        .collect())
}
