//! Vector stores and their files on PostgreSQL. Each store row comes with its files' counts
//! from one grouped join; pages follow `seq`, the order rows were stored. Writes that would
//! change a store test its expiry in their own condition.

use postgres::{GenericClient, Row};
use serde_json::Value;

use super::{Session, Tx};
use crate::store::files::{Order, Owner};
use crate::store::vector_stores::{
    Changes, Counted, Counts, FileBatch, FileListing, FileStatus, ReclaimBatch, StoreFile,
    VectorStore,
};

type Result<T> = std::result::Result<T, postgres::Error>;

/// A store's columns and its files' counts, grouped by the store.
const COUNTED: &str =
    "SELECT v.id, v.key_id, v.name, v.metadata, v.embedding_model, v.created_at, \
     v.last_active_at, v.expires_after_days, v.version, \
     COUNT(f.seq) FILTER (WHERE f.status = 'in_progress'), \
     COUNT(f.seq) FILTER (WHERE f.status = 'completed'), \
     COUNT(f.seq) FILTER (WHERE f.status = 'failed'), \
     COUNT(f.seq) FILTER (WHERE f.status = 'cancelled'), \
     COALESCE(SUM(f.usage_bytes), 0)::BIGINT \
     FROM vector_stores v LEFT JOIN vector_store_files f ON f.vector_store_id = v.id";
/// Whether the store is the owner's: `$1` every owner's, else the key `$2` (NULL-safe).
const OWNED: &str = "($1 OR v.key_id IS NOT DISTINCT FROM $2)";
const FILE_COLUMNS: &str = "vector_store_id, file_id, batch_id, status, last_error, attributes, \
     chunking_strategy, usage_bytes, created_at";

/// Whether the store `v` has expired at the unix second in the parameter `now` names (`$2`), as
/// `VectorStore::is_expired` says; false, never NULL, for a store that does not expire.
fn expired(now: &str) -> String {
    format!(
        "(v.expires_after_days IS NOT NULL \
         AND v.last_active_at + v.expires_after_days::BIGINT * 86400 <= {now}::BIGINT)"
    )
}

pub(crate) fn insert(tx: &mut Tx<'_, '_>, vs: &VectorStore) -> Result<()> {
    tx.execute(
        "INSERT INTO vector_stores (id, key_id, name, metadata, embedding_model, created_at, \
         last_active_at, expires_after_days, version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &vs.id,
            &vs.key_id,
            &vs.name,
            &vs.metadata.as_ref().map(Value::to_string),
            &vs.embedding_model,
            &vs.created_at,
            &vs.last_active_at,
            &vs.expires_after_days.map(|d| d as i32),
            &vs.version,
        ],
    )
    .map(drop)
}

pub(crate) fn get(
    c: &mut Session<'_, impl GenericClient>,
    owner: Owner,
    id: &str,
) -> Result<Option<Counted>> {
    let (all, key) = owner.sql_params();
    Ok(c.query_opt(
        &format!("{COUNTED} WHERE {OWNED} AND v.id = $3 GROUP BY v.seq"),
        &[&all, &key, &id],
    )?
    .map(|r| counted_from_row(&r)))
}

pub(crate) fn list(
    c: &mut Session<'_, impl GenericClient>,
    owner: Owner,
    limit: u32,
    after: Option<&str>,
    order: Order,
) -> Result<Option<Vec<Counted>>> {
    let (all, key) = owner.sql_params();
    let (compare, direction, start) = order.sql();
    let cursor: i64 = match after {
        None => start,
        Some(id) => match c.query_opt(
            &format!("SELECT v.seq FROM vector_stores v WHERE {OWNED} AND v.id = $3"),
            &[&all, &key, &id],
        )? {
            Some(row) => row.get(0),
            None => return Ok(None),
        },
    };
    Ok(Some(
        c.query(
            &format!(
                "{COUNTED} WHERE {OWNED} AND v.seq {compare} $3 GROUP BY v.seq \
                 ORDER BY v.seq {direction} LIMIT $4"
            ),
            &[&all, &key, &cursor, &i64::from(limit)],
        )?
        .iter()
        .map(counted_from_row)
        .collect(),
    ))
}

pub(crate) fn update(
    tx: &mut Tx<'_, '_>,
    owner: Owner,
    id: &str,
    changes: &Changes,
    now: i64,
) -> Result<bool> {
    let (all, key) = owner.sql_params();
    let (set_expiry, days) = match changes.expires_after_days {
        None => (false, None),
        Some(days) => (true, days.map(|d| d as i32)),
    };
    tx.execute(
        &format!(
            "UPDATE vector_stores AS v SET name = COALESCE($4, name), \
             metadata = COALESCE($5, metadata), \
             expires_after_days = CASE WHEN $6 THEN $7 ELSE expires_after_days END \
             WHERE {OWNED} AND v.id = $3 AND NOT {}",
            expired("$8")
        ),
        &[
            &all,
            &key,
            &id,
            &changes.name,
            &changes.metadata.as_ref().map(Value::to_string),
            &set_expiry,
            &days,
            &now,
        ],
    )
    .map(|n| n > 0)
}

pub(crate) fn touch(tx: &mut Tx<'_, '_>, id: &str, now: i64) -> Result<()> {
    tx.execute(
        &format!(
            "UPDATE vector_stores AS v SET last_active_at = $2 WHERE v.id = $1 AND NOT {}",
            expired("$2")
        ),
        &[&id, &now],
    )
    .map(drop)
}

/// The stores expired at `now` that still hold chunks, or files counting bytes.
pub(crate) fn expired_holding(
    c: &mut Session<'_, impl GenericClient>,
    now: i64,
) -> Result<Vec<String>> {
    Ok(c.query(
        &format!(
            "SELECT v.id FROM vector_stores v WHERE {} \
             AND (EXISTS (SELECT 1 FROM chunks c WHERE c.vector_store_id = v.id) \
             OR EXISTS (SELECT 1 FROM vector_store_files f \
             WHERE f.vector_store_id = v.id AND f.usage_bytes <> 0)) \
             ORDER BY v.seq",
            expired("$1")
        ),
        &[&now],
    )?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Deletes up to `limit` of the store's chunks if it has expired at `now` (their tsvector is
/// a column of theirs); once fewer were left, its files' bytes become 0. Raises the store's
/// version when anything changed.
pub(crate) fn reclaim(
    tx: &mut Tx<'_, '_>,
    vector_store_id: &str,
    now: i64,
    limit: u64,
) -> Result<ReclaimBatch> {
    let still_expired = format!(
        "EXISTS (SELECT 1 FROM vector_stores v WHERE v.id = $1 AND {})",
        expired("$2")
    );
    let chunks = tx.execute(
        &format!(
            "DELETE FROM chunks WHERE id IN (SELECT id FROM chunks WHERE vector_store_id = $1 \
             ORDER BY id LIMIT $3) AND {still_expired}"
        ),
        &[&vector_store_id, &now, &(limit as i64)],
    )?;
    let mut changed = chunks > 0;
    if chunks < limit {
        let zeroed = tx.execute(
            &format!(
                "UPDATE vector_store_files SET usage_bytes = 0 \
                 WHERE vector_store_id = $1 AND usage_bytes <> 0 AND {still_expired}"
            ),
            &[&vector_store_id, &now],
        )?;
        changed |= zeroed > 0;
    }
    if changed {
        tx.execute(
            "UPDATE vector_stores SET version = version + 1 WHERE id = $1",
            &[&vector_store_id],
        )?;
    }
    Ok(ReclaimBatch { chunks, changed })
}

pub(crate) fn delete(tx: &mut Tx<'_, '_>, owner: Owner, id: &str) -> Result<bool> {
    let (all, key) = owner.sql_params();
    tx.execute(
        &format!("DELETE FROM vector_stores AS v WHERE {OWNED} AND v.id = $3"),
        &[&all, &key, &id],
    )
    .map(|n| n > 0)
}

pub(crate) fn attach(tx: &mut Tx<'_, '_>, f: &StoreFile) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO vector_store_files ({FILE_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ),
        &[
            &f.vector_store_id,
            &f.file_id,
            &f.batch_id,
            &f.status.name(),
            &f.last_error.as_ref().map(Value::to_string),
            &f.attributes.as_ref().map(Value::to_string),
            &f.chunking_strategy.to_string(),
            &f.usage_bytes,
            &f.created_at,
        ],
    )
    .map(drop)
}

pub(crate) fn file(
    c: &mut Session<'_, impl GenericClient>,
    vector_store_id: &str,
    file_id: &str,
) -> Result<Option<StoreFile>> {
    Ok(c.query_opt(
        &format!(
            "SELECT {FILE_COLUMNS} FROM vector_store_files \
             WHERE vector_store_id = $1 AND file_id = $2"
        ),
        &[&vector_store_id, &file_id],
    )?
    .map(|r| store_file_from_row(&r)))
}

pub(crate) fn files(
    c: &mut Session<'_, impl GenericClient>,
    listing: &FileListing,
) -> Result<Option<Vec<StoreFile>>> {
    let (compare, direction, start) = listing.order.sql();
    let cursor: i64 = match &listing.after {
        None => start,
        Some(id) => match c.query_opt(
            "SELECT seq FROM vector_store_files WHERE vector_store_id = $1 AND file_id = $2",
            &[&listing.vector_store_id, id],
        )? {
            Some(row) => row.get(0),
            None => return Ok(None),
        },
    };
    let status = listing.status.map(FileStatus::name);
    Ok(Some(
        c.query(
            &format!(
                "SELECT {FILE_COLUMNS} FROM vector_store_files WHERE vector_store_id = $1 \
                 AND seq {compare} $2 AND ($3::text IS NULL OR status = $3) \
                 AND ($4::text IS NULL OR batch_id = $4) ORDER BY seq {direction} LIMIT $5"
            ),
            &[
                &listing.vector_store_id,
                &cursor,
                &status,
                &listing.batch_id,
                &(i64::from(listing.limit) + 1),
            ],
        )?
        .iter()
        .map(store_file_from_row)
        .collect(),
    ))
}

pub(crate) fn attributes(
    c: &mut Session<'_, impl GenericClient>,
    vector_store_id: &str,
) -> Result<Vec<(String, Option<String>)>> {
    Ok(c.query(
        "SELECT file_id, attributes FROM vector_store_files WHERE vector_store_id = $1",
        &[&vector_store_id],
    )?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

pub(crate) fn set_attributes(
    tx: &mut Tx<'_, '_>,
    vector_store_id: &str,
    file_id: &str,
    attributes: Option<&Value>,
) -> Result<bool> {
    tx.execute(
        "UPDATE vector_store_files SET attributes = $3 WHERE vector_store_id = $1 AND file_id = $2",
        &[
            &vector_store_id,
            &file_id,
            &attributes.map(Value::to_string),
        ],
    )
    .map(|n| n > 0)
}

/// Detaches the file (its chunks go by cascade) and raises the store's version.
pub(crate) fn detach(tx: &mut Tx<'_, '_>, vector_store_id: &str, file_id: &str) -> Result<bool> {
    let gone = tx.execute(
        "DELETE FROM vector_store_files WHERE vector_store_id = $1 AND file_id = $2",
        &[&vector_store_id, &file_id],
    )?;
    if gone > 0 {
        tx.execute(
            "UPDATE vector_stores SET version = version + 1 WHERE id = $1",
            &[&vector_store_id],
        )?;
    }
    Ok(gone > 0)
}

pub(crate) fn create_batch(
    tx: &mut Tx<'_, '_>,
    vector_store_id: &str,
    id: &str,
    created_at: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO file_batches (id, vector_store_id, created_at) VALUES ($1, $2, $3)",
        &[&id, &vector_store_id, &created_at],
    )
    .map(drop)
}

pub(crate) fn batch(
    c: &mut Session<'_, impl GenericClient>,
    vector_store_id: &str,
    id: &str,
) -> Result<Option<FileBatch>> {
    Ok(c.query_opt(
        "SELECT b.id, b.vector_store_id, b.created_at, b.cancelled, \
         COUNT(f.seq) FILTER (WHERE f.status = 'in_progress'), \
         COUNT(f.seq) FILTER (WHERE f.status = 'completed'), \
         COUNT(f.seq) FILTER (WHERE f.status = 'failed'), \
         COUNT(f.seq) FILTER (WHERE f.status = 'cancelled') \
         FROM file_batches b LEFT JOIN vector_store_files f ON f.batch_id = b.id \
         WHERE b.vector_store_id = $1 AND b.id = $2 GROUP BY b.seq",
        &[&vector_store_id, &id],
    )?
    .map(|r| FileBatch {
        id: r.get(0),
        vector_store_id: r.get(1),
        created_at: r.get(2),
        cancelled: r.get(3),
        counts: Counts {
            in_progress: r.get(4),
            completed: r.get(5),
            failed: r.get(6),
            cancelled: r.get(7),
            usage_bytes: 0,
        },
    }))
}

pub(crate) fn cancel_batch(tx: &mut Tx<'_, '_>, vector_store_id: &str, id: &str) -> Result<bool> {
    let found = tx.execute(
        "UPDATE file_batches SET cancelled = true WHERE vector_store_id = $1 AND id = $2",
        &[&vector_store_id, &id],
    )?;
    if found > 0 {
        tx.execute(
            "UPDATE vector_store_files SET status = 'cancelled' \
             WHERE batch_id = $1 AND status = 'in_progress'",
            &[&id],
        )?;
    }
    Ok(found > 0)
}

fn json_column(text: Option<String>) -> Option<Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

fn counted_from_row(r: &Row) -> Counted {
    Counted {
        store: VectorStore {
            id: r.get(0),
            key_id: r.get(1),
            name: r.get(2),
            metadata: json_column(r.get(3)),
            embedding_model: r.get(4),
            created_at: r.get(5),
            last_active_at: r.get(6),
            expires_after_days: r.get::<_, Option<i32>>(7).map(i64::from),
            version: r.get(8),
        },
        counts: Counts {
            in_progress: r.get(9),
            completed: r.get(10),
            failed: r.get(11),
            cancelled: r.get(12),
            usage_bytes: r.get(13),
        },
    }
}

fn store_file_from_row(r: &Row) -> StoreFile {
    let status: String = r.get(3);
    StoreFile {
        vector_store_id: r.get(0),
        file_id: r.get(1),
        batch_id: r.get(2),
        status: FileStatus::parse(&status).unwrap_or(FileStatus::Failed),
        last_error: json_column(r.get(4)),
        attributes: json_column(r.get(5)),
        chunking_strategy: json_column(r.get(6)).unwrap_or(Value::Null),
        usage_bytes: r.get(7),
        created_at: r.get(8),
    }
}
