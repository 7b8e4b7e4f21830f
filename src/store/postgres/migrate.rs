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
