//! Usage: totals of the request log by model or by UTC day (calls, errors, tokens), for
//! `GET /api/usage` and `syncgate usage`, which share this query and so always agree.

use std::fmt::Write as _;

use rusqlite::Connection;

use super::requests::TimeRange;
use super::StoreError;
use crate::time;

/// What the totals are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum GroupBy {
    #[default]
    Model,
    Day,
    /// The API key that made the calls: `ID:name`, or `(no key)` in open mode.
    Key,
}

impl GroupBy {
    /// The name in the API and on the command line, also the name of the key field.
    pub(crate) fn name(self) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::Day => "day",
            GroupBy::Key => "key",
        }
    }
}

impl std::str::FromStr for GroupBy {
    type Err = String;

    fn from_str(text: &str) -> Result<GroupBy, String> {
        match text {
            "model" => Ok(GroupBy::Model),
            "day" => Ok(GroupBy::Day),
            "key" => Ok(GroupBy::Key),
            _ => Err(format!(
                "{text:?} is not a grouping; expected model, day or key"
            )),
        }
    }
}

/// The totals of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Totals {
    /// The model asked for, or the UTC day as `YYYY-MM-DD`.
    pub(crate) key: String,
    pub(crate) calls: u64,
    /// Calls answered with a status of 400 or more.
    pub(crate) errors: u64,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
}

impl Totals {
    pub(crate) fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

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
         sum(coalesce(prompt_tokens, 0)), sum(coalesce(completion_tokens, 0)) \
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
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(totals)
}

/// The totals as a text table with aligned columns, for a terminal.
pub(crate) fn table(group_by: GroupBy, totals: &[Totals]) -> String {
    let header = [
        group_by.name(),
        "calls",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    ];
    let rows: Vec<[String; 6]> = totals
        .iter()
        .map(|t| {
            [
                t.key.clone(),
                t.calls.to_string(),
                t.errors.to_string(),
                t.prompt_tokens.to_string(),
                t.completion_tokens.to_string(),
                t.total_tokens().to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        // The key is text, left-aligned; the counts are numbers, right-aligned.
        let _ = write!(out, "{:<w$}", cells[0], w = widths[0]);
        for (cell, width) in cells[1..].iter().zip(&widths[1..]) {
            let _ = write!(out, "  {cell:>width$}");
        }
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::migrate;
    use crate::store::requests::{insert, RequestRow};

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
                row(MONDAY + 1, Some("a"), 200, Some((10, 5))),
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

    fn totals(key: &str, calls: u64, errors: u64, prompt: u64, completion: u64) -> Totals {
        Totals {
            key: key.into(),
            calls,
            errors,
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }

    #[test]
    fn totals_by_model_put_the_most_called_first() {
        let conn = db();
        let got = summarise(&conn, GroupBy::Model, TimeRange::default()).unwrap();
        assert_eq!(
            got,
            [totals("a", 3, 1, 110, 55), totals("b", 3, 1, 4, 6)],
            "ties in calls go by name"
        );
        let monday_only = TimeRange {
            since_ms: Some(MONDAY),
            until_ms: Some(MONDAY + DAY),
        };
        let got = summarise(&conn, GroupBy::Model, monday_only).unwrap();
        assert_eq!(got, [totals("a", 2, 1, 10, 5), totals("b", 1, 0, 1, 2)]);
    }

    #[test]
    fn totals_by_day_follow_utc_days_in_order() {
        let conn = db();
        let got = summarise(&conn, GroupBy::Day, TimeRange::default()).unwrap();
        assert_eq!(
            got,
            [
                totals("2026-11-23", 3, 1, 11, 7),
                totals("2026-11-24", 3, 1, 103, 54)
            ]
        );
        let from_tuesday = TimeRange {
            since_ms: Some(MONDAY + DAY),
            until_ms: None,
        };
        let got = summarise(&conn, GroupBy::Day, from_tuesday).unwrap();
        assert_eq!(got, [totals("2026-11-24", 3, 1, 103, 54)]);
    }

    #[test]
    fn the_table_aligns_its_columns() {
        let text = table(
            GroupBy::Model,
            &[
                totals("gpt-4o-mini", 12, 0, 1234, 5),
                totals("m", 3, 1, 7, 8),
            ],
        );
        let expected = "\
model        calls  errors  prompt_tokens  completion_tokens  total_tokens
gpt-4o-mini     12       0           1234                  5          1239
m                3       1              7                  8            15
";
        assert_eq!(text, expected);
        assert_eq!(
            table(GroupBy::Day, &[]),
            "day  calls  errors  prompt_tokens  completion_tokens  total_tokens\n"
        );
    }

    #[test]
    fn groupings_are_named_model_or_day() {
        assert_eq!("model".parse::<GroupBy>(), Ok(GroupBy::Model));
        assert_eq!("day".parse::<GroupBy>(), Ok(GroupBy::Day));
        assert!("week".parse::<GroupBy>().is_err());
        assert!("Model".parse::<GroupBy>().is_err());
    }
}
