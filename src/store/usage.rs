//! Usage: totals of the request log by model or by UTC day (calls, errors, tokens), for
//! `GET /api/usage` and `syncgate usage`, which share this query and so always agree.

use std::fmt::Write as _;

use super::postgres::usage as pg;
use super::requests::TimeRange;
use super::sqlite::usage as sql;
use super::{Backend, Store, StoreError};
use crate::database::Database;

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
    /// What the priced calls cost, micro-dollars; `None` when no call was priced.
    pub(crate) cost_micros: Option<i64>,
    /// Calls that reported usage on a target with no price: their cost is unknown, not zero.
    pub(crate) unpriced_calls: u64,
}

impl Totals {
    pub(crate) fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// One group's totals, written out (for tests).
    #[cfg(test)]
    pub(crate) fn of(key: &str, calls: u64, errors: u64, prompt: u64, completion: u64) -> Totals {
        Totals {
            key: key.into(),
            calls,
            errors,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_micros: None,
            unpriced_calls: 0,
        }
    }
}

/// The totals of the calls in `range` that asked for a model (chat, embeddings, conversation
/// turns, failed ones included; a call refused before it named a model and syncgate's own
/// `/api` reads are not usage). By model or key: most calls first. By day: oldest day first.
pub(crate) fn summarise(
    store: &Store,
    group_by: GroupBy,
    range: TimeRange,
) -> Result<Vec<Totals>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => sql::summarise(&*db.read()?, group_by, range),
        Backend::Postgres(db) => db.query(|c| pg::summarise(c, group_by, range)),
    }
}

/// The same totals for `syncgate usage`, read without migrating anything: a SQLite file is
/// opened read-only; a database from a newer syncgate, or one that holds no syncgate data,
/// is refused.
pub(crate) fn summarise_at(
    db: &Database,
    group_by: GroupBy,
    range: TimeRange,
) -> anyhow::Result<Vec<Totals>> {
    match db {
        Database::Sqlite(path) => {
            let conn = super::sqlite::open_read_only(path)?;
            Ok(sql::summarise(&conn, group_by, range)?)
        }
        Database::Postgres(target) => {
            let mut client = super::postgres::connect(target)?;
            let version = super::postgres::migrate::version(&mut client)?;
            super::postgres::migrate::check_not_newer(version)?;
            if version == 0 {
                anyhow::bail!(
                    "{db} holds no syncgate data (run `syncgate migrate` or start the server)"
                );
            }
            let mut prepared = super::postgres::Prepared::default();
            let mut session = super::postgres::Session::new(&mut client, &mut prepared);
            Ok(pg::summarise(&mut session, group_by, range)?)
        }
    }
}

/// Micro-dollars as dollars to the micro-dollar: `0.001150`.
pub(crate) fn usd_text(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// The totals as a text table with aligned columns, for a terminal. `cost_usd` is what the
/// priced calls cost (`-` when none was priced); `unpriced_calls` counts calls whose cost is
/// unknown, so a group is never shown cheaper than it is without saying so.
pub(crate) fn table(group_by: GroupBy, totals: &[Totals]) -> String {
    let header = [
        group_by.name(),
        "calls",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_usd",
        "unpriced_calls",
    ];
    let rows: Vec<[String; 8]> = totals
        .iter()
        .map(|t| {
            [
                t.key.clone(),
                t.calls.to_string(),
                t.errors.to_string(),
                t.prompt_tokens.to_string(),
                t.completion_tokens.to_string(),
                t.total_tokens().to_string(),
                t.cost_micros.map_or_else(|| "-".to_string(), usd_text),
                t.unpriced_calls.to_string(),
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

    #[test]
    fn the_table_aligns_its_columns() {
        let text = table(
            GroupBy::Model,
            &[
                Totals {
                    cost_micros: Some(1_234_567),
                    ..Totals::of("gpt-4o-mini", 12, 0, 1234, 5)
                },
                Totals {
                    unpriced_calls: 2,
                    ..Totals::of("m", 3, 1, 7, 8)
                },
            ],
        );
        let expected = "\
model        calls  errors  prompt_tokens  completion_tokens  total_tokens  cost_usd  unpriced_calls
gpt-4o-mini     12       0           1234                  5          1239  1.234567               0
m                3       1              7                  8            15         -               2
";
        assert_eq!(text, expected);
        assert_eq!(
            table(GroupBy::Day, &[]),
            "day  calls  errors  prompt_tokens  completion_tokens  total_tokens  cost_usd  \
             unpriced_calls\n"
        );
        assert_eq!(usd_text(450), "0.000450");
        assert_eq!(usd_text(-12_000_001), "-12.000001");
    }

    #[test]
    fn groupings_are_named_model_or_day() {
        assert_eq!("model".parse::<GroupBy>(), Ok(GroupBy::Model));
        assert_eq!("day".parse::<GroupBy>(), Ok(GroupBy::Day));
        assert!("week".parse::<GroupBy>().is_err());
        assert!("Model".parse::<GroupBy>().is_err());
    }
}
