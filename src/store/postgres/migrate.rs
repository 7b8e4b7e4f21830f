//! The PostgreSQL schema, as SQL files in `migrations/postgres/` embedded in the binary and
//! applied in order. The table `syncgate_migrations` records each one applied; the whole run
//! holds an advisory lock, so two instances starting at once migrate exactly once. A database
//! written by a newer syncgate (a migration we do not know) is refused rather than misread.

use postgres::Client;

/// Every migration, numbered from 1 without gaps; the number is the file's `NNNN` prefix.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "0001_initial",
        include_str!("../../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "0002_jobs_finished",
        include_str!("../../../migrations/postgres/0002_jobs_finished.sql"),
    ),
    (
        3,
        "0003_shared_limits",
        include_str!("../../../migrations/postgres/0003_shared_limits.sql"),
    ),
    (
        4,
        "0004_requests_key",
        include_str!("../../../migrations/postgres/0004_requests_key.sql"),
    ),
    (
        5,
        "0005_requests_partial",
        include_str!("../../../migrations/postgres/0005_requests_partial.sql"),
    ),
    (
        6,
        "0006_admission_tickets",
        include_str!("../../../migrations/postgres/0006_admission_tickets.sql"),
    ),
    (
        7,
        "0007_knowledge",
        include_str!("../../../migrations/postgres/0007_knowledge.sql"),
    ),
    (
        8,
        "0008_spend",
        include_str!("../../../migrations/postgres/0008_spend.sql"),
    ),
];

/// The advisory lock's key: the same in every instance, unlikely to be anyone else's.
const LOCK_KEY: i64 = 0x7379_6e63_6761_7465; // "syncgate"

/// The schema version this build writes.
pub(crate) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// What [`migrate`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Migrated {
    pub(crate) from: i32,
    pub(crate) to: i32,
}

/// Brings the schema up to date in one transaction under the advisory lock: a second instance
/// waits for the first, then finds nothing to do.
pub(crate) fn migrate(client: &mut Client) -> anyhow::Result<Migrated> {
    migrate_up_to(client, latest())
}

/// Brings the schema up to version `target` only: the tests make older schemas with it.
#[cfg(test)]
pub(crate) fn migrate_to(client: &mut Client, target: i32) -> anyhow::Result<Migrated> {
    migrate_up_to(client, target)
}

/// Applies the migrations after the database's version, up to `target`, in one transaction.
fn migrate_up_to(client: &mut Client, target: i32) -> anyhow::Result<Migrated> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    let tracked: bool = tx
        .query_one("SELECT to_regclass('syncgate_migrations') IS NOT NULL", &[])?
        .get(0);
    if !tracked {
        tx.batch_execute(
            "CREATE TABLE syncgate_migrations (\
             version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms BIGINT NOT NULL)",
        )?;
    }
    let from: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM syncgate_migrations",
            &[],
        )?
        .get(0);
    check_not_newer(from)?;
    let wanted = MIGRATIONS.iter().filter(|m| m.0 > from && m.0 <= target);
    for (number, name, sql) in wanted {
        tx.batch_execute(sql)
            .map_err(|e| anyhow::anyhow!("migration {name} failed: {e}"))?;
        tx.execute(
            "INSERT INTO syncgate_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
            &[number, name, &crate::store::now_ms()],
        )?;
    }
    tx.commit()?;
    Ok(Migrated {
        from,
        to: from.max(target.min(latest())),
    })
}

/// The version a database holds, without changing it; 0 when it holds no syncgate schema.
pub(crate) fn version(client: &mut Client) -> anyhow::Result<i32> {
    let exists: bool = client
        .query_one("SELECT to_regclass('syncgate_migrations') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM syncgate_migrations",
            &[],
        )?
        .get(0))
}

/// Refuses a database whose schema is newer than this build knows.
pub(crate) fn check_not_newer(version: i32) -> anyhow::Result<()> {
    if version > latest() {
        anyhow::bail!(
            "the database has schema version {version}, written by a newer syncgate; this \
             build knows versions up to {}. Run the newer syncgate, or restore a backup \
             taken before it ran",
            latest()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::database::Database;
    use crate::store::testing;

    fn connect(db: &Database) -> Client {
        let Database::Postgres(pg) = db else {
            unreachable!()
        };
        pg.config.connect(postgres::NoTls).unwrap()
    }

    /// Versions recorded as applied, in order.
    fn applied(client: &mut Client) -> Vec<i32> {
        client
            .query(
                "SELECT version FROM syncgate_migrations ORDER BY version",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    #[test]
    fn migrations_are_numbered_in_order_and_match_the_files() {
        let numbered: Vec<(i64, &str)> = MIGRATIONS
            .iter()
            .map(|(number, name, _)| (i64::from(*number), *name))
            .collect();
        crate::store::testing::assert_migrations_match_files("postgres", &numbered);
    }

    #[test]
    fn migrating_from_empty_then_again_is_a_no_op() {
        let Some(db) = testing::postgres_db("migrate-twice") else {
            return;
        };
        let mut client = connect(db.database());
        let first = migrate(&mut client).unwrap();
        assert_eq!(
            first,
            Migrated {
                from: 0,
                to: latest()
            }
        );
        let again = migrate(&mut client).unwrap();
        assert_eq!(
            again,
            Migrated {
                from: latest(),
                to: latest()
            }
        );
        assert_eq!(applied(&mut client), (1..=latest()).collect::<Vec<_>>());
    }

    /// The rows of [`testing::Seeded`] in schema 1, which has every table.
    fn seed(client: &mut Client) {
        client
            .batch_execute(
                "INSERT INTO requests (request_id, ts_ms, method, route, model, status, \
                 total_ms, queue_ms, upstream_ms, overhead_ms) \
                 VALUES ('req-old', 1000, 'POST', '/v1/chat/completions', 'm', 200, 2, 0, 1, 1); \
                 INSERT INTO conversations (id, title, created_ms) VALUES ('conv_old', 'old', 1); \
                 INSERT INTO messages (id, conversation_id, role, content, created_ms) \
                 VALUES ('msg_old', 'conv_old', 'user', 'hello', 1); \
                 INSERT INTO jobs (id, status, request, model, attempts, max_attempts, result, \
                 created_ms, started_ms, finished_ms) \
                 VALUES ('job_old_done', 'succeeded', '{\"model\":\"m\",\"messages\":[]}', \
                 'm', 1, 3, '{\"id\":\"x\"}', 1, 1, 1); \
                 INSERT INTO jobs (id, status, request, model, max_attempts, created_ms) \
                 VALUES ('job_old_queued', 'queued', '{\"model\":\"m\",\"messages\":[]}', \
                 'm', 3, 2);",
            )
            .unwrap();
        client
            .execute(
                "INSERT INTO api_keys (name, prefix, hash, created_ms) \
                 VALUES ('old-key', 'sk-sg-abcdef', $1, 1)",
                &[&[7u8; 32].as_slice()],
            )
            .unwrap();
    }

    #[test]
    fn every_older_schema_migrates_to_the_latest_keeping_its_rows() {
        for version in 1..latest() {
            let Some(db) = testing::postgres_db("upgrade") else {
                return;
            };
            {
                let mut client = connect(db.database());
                let made = migrate_to(&mut client, version).unwrap();
                assert_eq!(
                    made,
                    Migrated {
                        from: 0,
                        to: version
                    }
                );
                assert_eq!(applied(&mut client), (1..=version).collect::<Vec<_>>());
                seed(&mut client);
            }
            let t = db.open();
            let seeded = testing::Seeded {
                keys: true,
                jobs: true,
            };
            testing::assert_seeded_rows_kept(&t, seeded);
            let mut client = connect(t.database());
            assert_eq!(applied(&mut client), (1..=latest()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_newer_database_is_refused() {
        let Some(db) = testing::postgres_db("newer") else {
            return;
        };
        let mut client = connect(db.database());
        migrate(&mut client).unwrap();
        client
            .execute(
                "INSERT INTO syncgate_migrations (version, name, applied_ms) \
                 VALUES ($1, '9999_future', 0)",
                &[&(latest() + 1)],
            )
            .unwrap();
        let err = migrate(&mut client).unwrap_err().to_string();
        assert!(err.contains("newer syncgate"), "{err}");
        let Database::Postgres(pg) = db.database() else {
            unreachable!()
        };
        let err = format!(
            "{:#}",
            crate::store::postgres::open_migrated(pg).unwrap_err()
        );
        assert!(
            err.contains(&format!("schema version {}", latest() + 1)),
            "{err}"
        );
        assert_eq!(
            version(&mut client).unwrap(),
            latest() + 1,
            "left as it was"
        );
    }

    #[test]
    fn instances_migrating_a_fresh_database_at_once_apply_each_migration_once() {
        let Some(db) = testing::postgres_db("migrate-race") else {
            return;
        };
        let start = std::sync::Barrier::new(6);
        let results: Vec<Migrated> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        let mut client = connect(db.database());
                        start.wait();
                        migrate(&mut client).unwrap()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let first = results.iter().filter(|m| m.from == 0).count();
        assert_eq!(first, 1, "exactly one migrated: {results:?}");
        assert!(results.iter().all(|m| m.to == latest()), "{results:?}");
        assert_eq!(
            applied(&mut connect(db.database())),
            (1..=latest()).collect::<Vec<_>>()
        );
    }
}
