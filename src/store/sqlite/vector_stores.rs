//! Vector stores and their files in SQLite. Each store row comes with its files' counts from
//! one grouped join; pages follow `seq`, the order rows were stored. Writes that would change
//! a store test its expiry in their own condition.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::Value;

use crate::store::files::{Order, Owner};
use crate::store::vector_stores::{
    Changes, Counted, Counts, FileBatch, FileListing, FileStatus, ReclaimBatch, StoreFile,
    VectorStore,
};

/// A store's columns and its files' counts, grouped by the store.
const COUNTED: &str =
    "SELECT v.id, v.key_id, v.name, v.metadata, v.embedding_model, v.created_at, \
     v.last_active_at, v.expires_after_days, v.version, \
     COALESCE(SUM(f.status = 'in_progress'), 0), COALESCE(SUM(f.status = 'completed'), 0), \
     COALESCE(SUM(f.status = 'failed'), 0), COALESCE(SUM(f.status = 'cancelled'), 0), \
     COALESCE(SUM(f.usage_bytes), 0) \
     FROM vector_stores v LEFT JOIN vector_store_files f ON f.vector_store_id = v.id";
/// Whether the store is the owner's: `?1` every owner's, else `key_id IS ?2` (NULL-safe).
const OWNED: &str = "(?1 OR v.key_id IS ?2)";
const FILE_COLUMNS: &str = "vector_store_id, file_id, batch_id, status, last_error, attributes, \
     chunking_strategy, usage_bytes, created_at";

/// Whether the store `v` has expired at the unix second in the parameter `now` names (`?2`), as
/// `VectorStore::is_expired` says; false, never NULL, for a store that does not expire.
fn expired(now: &str) -> String {
    format!(
        "(v.expires_after_days IS NOT NULL \
         AND v.last_active_at + v.expires_after_days * 86400 <= {now})"
    )
}

pub(crate) fn insert(conn: &Connection, vs: &VectorStore) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO vector_stores (id, key_id, name, metadata, embedding_model, created_at, \
         last_active_at, expires_after_days, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        vs.id,
        vs.key_id,
        vs.name,
        vs.metadata.as_ref().map(Value::to_string),
        vs.embedding_model,
        vs.created_at,
        vs.last_active_at,
        vs.expires_after_days,
        vs.version
    ])
    .map(drop)
}

pub(crate) fn get(conn: &Connection, owner: Owner, id: &str) -> rusqlite::Result<Option<Counted>> {
    let (all, key) = owner.sql_params();
    conn.prepare_cached(&format!(
        "{COUNTED} WHERE {OWNED} AND v.id = ?3 GROUP BY v.seq"
    ))?
    .query_row(params![all, key, id], counted_from_row)
    .optional()
}

pub(crate) fn list(
    conn: &Connection,
    owner: Owner,
    limit: u32,
    after: Option<&str>,
    order: Order,
) -> rusqlite::Result<Option<Vec<Counted>>> {
    let (all, key) = owner.sql_params();
    let (compare, direction, start) = order.sql();
    let cursor = match after {
        None => start,
        Some(id) => match conn
            .prepare_cached(&format!(
                "SELECT v.seq FROM vector_stores v WHERE {OWNED} AND v.id = ?3"
            ))?
            .query_row(params![all, key, id], |r| r.get(0))
            .optional()?
        {
            Some(seq) => seq,
            None => return Ok(None),
        },
    };
    let mut statement = conn.prepare_cached(&format!(
        "{COUNTED} WHERE {OWNED} AND v.seq {compare} ?3 GROUP BY v.seq \
         ORDER BY v.seq {direction} LIMIT ?4"
    ))?;
    let found = statement
        .query_map(
            params![all, key, cursor, i64::from(limit)],
            counted_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(found))
}

pub(crate) fn update(
    conn: &Connection,
    owner: Owner,
    id: &str,
    changes: &Changes,
    now: i64,
) -> rusqlite::Result<bool> {
    let (all, key) = owner.sql_params();
    let (set_expiry, days) = match changes.expires_after_days {
        None => (false, None),
        Some(days) => (true, days),
    };
    conn.prepare_cached(&format!(
        "UPDATE vector_stores AS v SET name = COALESCE(?4, name), \
         metadata = COALESCE(?5, metadata), \
         expires_after_days = CASE WHEN ?6 THEN ?7 ELSE expires_after_days END \
         WHERE {OWNED} AND v.id = ?3 AND NOT {}",
        expired("?8")
    ))?
    .execute(params![
        all,
        key,
        id,
        changes.name,
        changes.metadata.as_ref().map(Value::to_string),
        set_expiry,
        days,
        now
    ])
    .map(|n| n > 0)
}

pub(crate) fn touch(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "UPDATE vector_stores AS v SET last_active_at = ?2 WHERE v.id = ?1 AND NOT {}",
        expired("?2")
    ))?
    .execute(params![id, now])
    .map(drop)
}

/// The stores expired at `now` that still hold chunks, or files counting bytes.
pub(crate) fn expired_holding(conn: &Connection, now: i64) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT v.id FROM vector_stores v WHERE {} \
         AND (EXISTS (SELECT 1 FROM chunks c WHERE c.vector_store_id = v.id) \
         OR EXISTS (SELECT 1 FROM vector_store_files f \
         WHERE f.vector_store_id = v.id AND f.usage_bytes <> 0)) \
         ORDER BY v.seq",
        expired("?1")
    ))?;
    let ids = statement
        .query_map([now], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(ids)
}

/// Deletes up to `limit` of the store's chunks if it has expired at `now` (the FTS5 rows go by
/// the schema's trigger); once fewer were left, its files' bytes become 0. Raises the store's
/// version when anything changed.
pub(crate) fn reclaim(
    conn: &Connection,
    vector_store_id: &str,
    now: i64,
    limit: u64,
) -> rusqlite::Result<ReclaimBatch> {
    let still_expired = format!(
        "EXISTS (SELECT 1 FROM vector_stores v WHERE v.id = ?1 AND {})",
        expired("?2")
    );
    let chunks = conn
        .prepare_cached(&format!(
            "DELETE FROM chunks WHERE id IN (SELECT id FROM chunks WHERE vector_store_id = ?1 \
             ORDER BY id LIMIT ?3) AND {still_expired}"
        ))?
        .execute(params![vector_store_id, now, limit as i64])? as u64;
    let mut changed = chunks > 0;
    if chunks < limit {
        let zeroed = conn
            .prepare_cached(&format!(
                "UPDATE vector_store_files SET usage_bytes = 0 \
                 WHERE vector_store_id = ?1 AND usage_bytes <> 0 AND {still_expired}"
            ))?
            .execute(params![vector_store_id, now])?;
        changed |= zeroed > 0;
    }
    if changed {
        conn.prepare_cached("UPDATE vector_stores SET version = version + 1 WHERE id = ?1")?
            .execute([vector_store_id])?;
    }
    Ok(ReclaimBatch { chunks, changed })
}

pub(crate) fn delete(conn: &Connection, owner: Owner, id: &str) -> rusqlite::Result<bool> {
    let (all, key) = owner.sql_params();
    conn.prepare_cached(&format!(
        "DELETE FROM vector_stores AS v WHERE {OWNED} AND v.id = ?3"
    ))?
    .execute(params![all, key, id])
    .map(|n| n > 0)
}

pub(crate) fn attach(conn: &Connection, f: &StoreFile) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO vector_store_files ({FILE_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    ))?
    .execute(params![
        f.vector_store_id,
        f.file_id,
        f.batch_id,
        f.status.name(),
        f.last_error.as_ref().map(Value::to_string),
        f.attributes.as_ref().map(Value::to_string),
        f.chunking_strategy.to_string(),
        f.usage_bytes,
        f.created_at
    ])
    .map(drop)
}

pub(crate) fn file(
    conn: &Connection,
    vector_store_id: &str,
    file_id: &str,
) -> rusqlite::Result<Option<StoreFile>> {
    conn.prepare_cached(&format!(
        "SELECT {FILE_COLUMNS} FROM vector_store_files WHERE vector_store_id = ?1 AND file_id = ?2"
    ))?
    .query_row([vector_store_id, file_id], store_file_from_row)
    .optional()
}

pub(crate) fn files(
    conn: &Connection,
    listing: &FileListing,
) -> rusqlite::Result<Option<Vec<StoreFile>>> {
    let (compare, direction, start) = listing.order.sql();
    let cursor = match &listing.after {
        None => start,
        Some(id) => match conn
            .prepare_cached(
                "SELECT seq FROM vector_store_files WHERE vector_store_id = ?1 AND file_id = ?2",
            )?
            .query_row([&listing.vector_store_id, id], |r| r.get(0))
            .optional()?
        {
            Some(seq) => seq,
            None => return Ok(None),
        },
    };
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {FILE_COLUMNS} FROM vector_store_files WHERE vector_store_id = ?1 \
         AND seq {compare} ?2 AND (?3 IS NULL OR status = ?3) AND (?4 IS NULL OR batch_id = ?4) \
         ORDER BY seq {direction} LIMIT ?5"
    ))?;
    let found = statement
        .query_map(
            params![
                listing.vector_store_id,
                cursor,
                listing.status.map(FileStatus::name),
                listing.batch_id,
                i64::from(listing.limit) + 1
            ],
            store_file_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(found))
}

pub(crate) fn attributes(
    conn: &Connection,
    vector_store_id: &str,
) -> rusqlite::Result<Vec<(String, Option<String>)>> {
    let mut statement = conn.prepare_cached(
        "SELECT file_id, attributes FROM vector_store_files WHERE vector_store_id = ?1",
    )?;
    let rows = statement
        .query_map([vector_store_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

pub(crate) fn set_attributes(
    conn: &Connection,
    vector_store_id: &str,
    file_id: &str,
    attributes: Option<&Value>,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "UPDATE vector_store_files SET attributes = ?3 WHERE vector_store_id = ?1 AND file_id = ?2",
    )?
    .execute(params![
        vector_store_id,
        file_id,
        attributes.map(Value::to_string)
    ])
    .map(|n| n > 0)
}

/// Detaches the file (its chunks go by cascade) and, when it had chunks, raises the store's
/// version.
pub(crate) fn detach(
    conn: &Connection,
    vector_store_id: &str,
    file_id: &str,
) -> rusqlite::Result<bool> {
    let gone = conn
        .prepare_cached(
            "DELETE FROM vector_store_files WHERE vector_store_id = ?1 AND file_id = ?2",
        )?
        .execute([vector_store_id, file_id])?;
    if gone > 0 {
        conn.prepare_cached("UPDATE vector_stores SET version = version + 1 WHERE id = ?1")?
            .execute([vector_store_id])?;
    }
    Ok(gone > 0)
}

pub(crate) fn create_batch(
    conn: &Connection,
    vector_store_id: &str,
    id: &str,
    created_at: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO file_batches (id, vector_store_id, created_at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![id, vector_store_id, created_at])
    .map(drop)
}

pub(crate) fn batch(
    conn: &Connection,
    vector_store_id: &str,
    id: &str,
) -> rusqlite::Result<Option<FileBatch>> {
    conn.prepare_cached(
        "SELECT b.id, b.vector_store_id, b.created_at, b.cancelled, \
         COALESCE(SUM(f.status = 'in_progress'), 0), COALESCE(SUM(f.status = 'completed'), 0), \
         COALESCE(SUM(f.status = 'failed'), 0), COALESCE(SUM(f.status = 'cancelled'), 0) \
         FROM file_batches b LEFT JOIN vector_store_files f ON f.batch_id = b.id \
         WHERE b.vector_store_id = ?1 AND b.id = ?2 GROUP BY b.seq",
    )?
    .query_row([vector_store_id, id], |r| {
        Ok(FileBatch {
            id: r.get(0)?,
            vector_store_id: r.get(1)?,
            created_at: r.get(2)?,
            cancelled: r.get(3)?,
            counts: Counts {
                in_progress: r.get(4)?,
                completed: r.get(5)?,
                failed: r.get(6)?,
                cancelled: r.get(7)?,
                usage_bytes: 0,
            },
        })
    })
    .optional()
}

pub(crate) fn cancel_batch(
    conn: &Connection,
    vector_store_id: &str,
    id: &str,
) -> rusqlite::Result<bool> {
    let found = conn
        .prepare_cached(
            "UPDATE file_batches SET cancelled = 1 WHERE vector_store_id = ?1 AND id = ?2",
        )?
        .execute([vector_store_id, id])?;
    if found > 0 {
        conn.prepare_cached(
            "UPDATE vector_store_files SET status = 'cancelled' \
             WHERE batch_id = ?1 AND status = 'in_progress'",
        )?
        .execute([id])?;
    }
    Ok(found > 0)
}

fn json_column(text: Option<String>) -> Option<Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

fn counted_from_row(r: &Row<'_>) -> rusqlite::Result<Counted> {
    Ok(Counted {
        store: VectorStore {
            id: r.get(0)?,
            key_id: r.get(1)?,
            name: r.get(2)?,
            metadata: json_column(r.get(3)?),
            embedding_model: r.get(4)?,
            created_at: r.get(5)?,
            last_active_at: r.get(6)?,
            expires_after_days: r.get(7)?,
            version: r.get(8)?,
        },
        counts: Counts {
            in_progress: r.get(9)?,
            completed: r.get(10)?,
            failed: r.get(11)?,
            cancelled: r.get(12)?,
            usage_bytes: r.get(13)?,
        },
    })
}

fn store_file_from_row(r: &Row<'_>) -> rusqlite::Result<StoreFile> {
    let status: String = r.get(3)?;
    Ok(StoreFile {
        vector_store_id: r.get(0)?,
        file_id: r.get(1)?,
        batch_id: r.get(2)?,
        status: FileStatus::parse(&status).unwrap_or(FileStatus::Failed),
        last_error: json_column(r.get(4)?),
        attributes: json_column(r.get(5)?),
        chunking_strategy: json_column(r.get(6)?).unwrap_or(Value::Null),
        usage_bytes: r.get(7)?,
        created_at: r.get(8)?,
    })
}
