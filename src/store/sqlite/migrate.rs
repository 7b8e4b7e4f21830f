//! The SQLite schema, as SQL files in `migrations/sqlite/` embedded in the binary and applied in order.
//! `PRAGMA user_version` holds the number of the last one applied, so migrating twice is a
//! no-op, and a database written by a newer syncgate (a number we do not know) is refused
//! rather than misread.

use rusqlite::{Connection, TransactionBehavior};

/// Every migration, numbered from 1 without gaps; the number is the file's `NNNN` prefix.
pub(crate) const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "0001_initial",
        include_str!("../../../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "0002_api_keys",
        include_str!("../../../migrations/sqlite/0002_api_keys.sql"),
    ),
    (
        3,
        "0003_jobs",
        include_str!("../../../migrations/sqlite/0003_jobs.sql"),
    ),
    (
        4,
        "0004_jobs_finished",
        include_str!("../../../migrations/sqlite/0004_jobs_finished.sql"),
    ),
    (
        5,
        "0005_requests_key",
        include_str!("../../../migrations/sqlite/0005_requests_key.sql"),
    ),
    (
        6,
        "0006_knowledge",
        include_str!("../../../migrations/sqlite/0006_knowledge.sql"),
    ),
    (
        7,
        "0007_spend",
        include_str!("../../../migrations/sqlite/0007_spend.sql"),
    ),
];

/// The schema version this build writes.
pub(crate) fn latest() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// What [`migrate`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Migrated {
    pub(crate) from: u32,
    pub(crate) to: u32,
}

/// Brings the schema up to date. Each migration commits with its version number, so a
/// crash between two leaves a database that the next start continues from.
pub(crate) fn migrate(conn: &mut Connection) -> anyhow::Result<Migrated> {
    migrate_up_to(conn, latest())
}

/// Brings the schema up to version `target` only: the tests make older schemas with it.
#[cfg(test)]
pub(crate) fn migrate_to(conn: &mut Connection, target: u32) -> anyhow::Result<Migrated> {
    migrate_up_to(conn, target)
}

/// Applies the migrations after the database's version, up to `target`.
fn migrate_up_to(conn: &mut Connection, target: u32) -> anyhow::Result<Migrated> {
    let from = version(conn)?;
    check_not_newer(from)?;
    let wanted = MIGRATIONS.iter().filter(|m| m.0 > from && m.0 <= target);
    for (number, name, sql) in wanted {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the write lock.
        let now: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now >= *number {
            continue;
        }
        tx.execute_batch(sql)
            .map_err(|e| anyhow::anyhow!("migration {name} failed: {e}"))?;
        tx.pragma_update(None, "user_version", number)?;
        tx.commit()?;
        log::info!("database migrated to {name}");
    }
    Ok(Migrated {
        from,
        to: version(conn)?,
    })
}

/// The schema version of an open database (0 for a new, empty file).
pub(crate) fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Refuses a database whose schema is newer than this build knows.
pub(crate) fn check_not_newer(version: u32) -> anyhow::Result<()> {
    let latest = latest();
    if version > latest {
        anyhow::bail!(
            "the database has schema version {version}, written by a newer syncgate; this \
             build knows versions up to {latest}. Run the newer syncgate, or restore a backup \
             taken before it ran"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::database::Database;
    use crate::store::{testing, Backend};

    #[test]
    fn migrations_are_numbered_in_order_and_match_the_files() {
        let numbered: Vec<(i64, &str)> = MIGRATIONS
            .iter()
            .map(|(number, name, _)| (i64::from(*number), *name))
            .collect();
        crate::store::testing::assert_migrations_match_files("sqlite", &numbered);
    }

    #[test]
    fn migrating_from_empty_then_again_is_a_no_op() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(
            migrate(&mut conn).unwrap(),
            Migrated {
                from: 0,
                to: latest()
            }
        );
        conn.execute(
            "INSERT INTO conversations (id, created_ms) VALUES ('c', 1)",
            [],
        )
        .unwrap();
        assert_eq!(
            migrate(&mut conn).unwrap(),
            Migrated {
                from: latest(),
                to: latest()
            }
        );
        let kept: i64 = conn
            .query_row("SELECT count(*) FROM conversations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 1);
    }

    #[test]
    fn a_newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", latest() + 1)
            .unwrap();
        let err = migrate(&mut conn).unwrap_err().to_string();
        assert!(err.contains("newer syncgate"), "{err}");
    }

    /// The rows of [`testing::Seeded`], as schema `version` can hold them.
    fn seed(conn: &Connection, version: u32) {
        conn.execute_batch(
            "INSERT INTO requests (request_id, ts_ms, method, route, model, status, total_ms, \
             queue_ms, upstream_ms, overhead_ms) \
             VALUES ('req-old', 1000, 'POST', '/v1/chat/completions', 'm', 200, 2, 0, 1, 1); \
             INSERT INTO conversations (id, title, created_ms) VALUES ('conv_old', 'old', 1); \
             INSERT INTO messages (id, conversation_id, role, content, created_ms) \
             VALUES ('msg_old', 'conv_old', 'user', 'hello', 1);",
        )
        .unwrap();
        if version >= 2 {
            conn.execute(
                "INSERT INTO api_keys (name, prefix, hash, created_ms) \
                 VALUES ('old-key', 'sk-sg-abcdef', ?1, 1)",
                [[7u8; 32].as_slice()],
            )
            .unwrap();
        }
        if version >= 3 {
            conn.execute_batch(
                "INSERT INTO jobs (id, status, request, model, attempts, max_attempts, result, \
                 created_ms, started_ms, finished_ms) \
                 VALUES ('job_old_done', 'succeeded', '{\"model\":\"m\",\"messages\":[]}', 'm', \
                 1, 3, '{\"id\":\"x\"}', 1, 1, 1); \
                 INSERT INTO jobs (id, status, request, model, max_attempts, created_ms) \
                 VALUES ('job_old_queued', 'queued', '{\"model\":\"m\",\"messages\":[]}', 'm', 3, 2);",
            )
            .unwrap();
        }
    }

    #[test]
    fn every_older_schema_migrates_to_the_latest_keeping_its_rows() {
        for version in 1..latest() {
            let db = testing::sqlite_db("upgrade");
            {
                let Database::Sqlite(path) = db.database() else {
                    unreachable!()
                };
                let mut conn = Connection::open(path).unwrap();
                let made = migrate_to(&mut conn, version).unwrap();
                assert_eq!(
                    made,
                    Migrated {
                        from: 0,
                        to: version
                    }
                );
                assert_eq!(super::version(&conn).unwrap(), version);
                seed(&conn, version);
            }
            let t = db.open();
            let Backend::Sqlite(sqlite) = t.backend() else {
                unreachable!()
            };
            let now = sqlite.query(super::version).unwrap();
            assert_eq!(now, latest(), "from {version}");
            let seeded = testing::Seeded {
                keys: version >= 2,
                jobs: version >= 3,
            };
            testing::assert_seeded_rows_kept(&t, seeded);
        }
    }
}
