//! Files and their bytes on PostgreSQL. Pages follow `seq`, the order files were stored.

use postgres::{GenericClient, Row};

use super::{Session, Tx};
use crate::store::files::{File, Listing, Owner};

type Result<T> = std::result::Result<T, postgres::Error>;

const COLUMNS: &str = "id, key_id, filename, purpose, bytes, created_at, expires_at";
/// Whether the row is the owner's: `$1` every owner's, else the key `$2` (NULL-safe).
const OWNED: &str = "($1 OR key_id IS NOT DISTINCT FROM $2)";

pub(crate) fn insert(tx: &mut Tx<'_, '_>, file: &File, content: &[u8]) -> Result<()> {
    tx.execute(
        "INSERT INTO files (id, key_id, filename, purpose, bytes, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &file.id,
            &file.key_id,
            &file.filename,
            &file.purpose,
            &file.bytes,
            &file.created_at,
            &file.expires_at,
        ],
    )?;
    tx.execute(
        "INSERT INTO file_contents (file_id, content) VALUES ($1, $2)",
        &[&file.id, &content],
    )
    .map(drop)
}

pub(crate) fn get(
    c: &mut Session<'_, impl GenericClient>,
    owner: Owner,
    id: &str,
) -> Result<Option<File>> {
    let (all, key) = owner.sql_params();
    Ok(c.query_opt(
        &format!("SELECT {COLUMNS} FROM files WHERE {OWNED} AND id = $3"),
        &[&all, &key, &id],
    )?
    .map(|r| file_from_row(&r)))
}

pub(crate) fn content(
    c: &mut Session<'_, impl GenericClient>,
    owner: Owner,
    id: &str,
) -> Result<Option<Vec<u8>>> {
    let (all, key) = owner.sql_params();
    Ok(c.query_opt(
        &format!(
            "SELECT c.content FROM files JOIN file_contents c ON c.file_id = files.id \
             WHERE {OWNED} AND files.id = $3"
        ),
        &[&all, &key, &id],
    )?
    .map(|r| r.get(0)))
}

/// Up to `limit + 1` files (one more tells whether more follow); `None` when the cursor names
/// no file the owner may see.
pub(crate) fn list(
    c: &mut Session<'_, impl GenericClient>,
    listing: &Listing,
) -> Result<Option<Vec<File>>> {
    let (all, key) = listing.owner.sql_params();
    let (compare, direction, start) = listing.order.sql();
    let cursor: i64 = match &listing.after {
        None => start,
        Some(id) => match c.query_opt(
            &format!("SELECT seq FROM files WHERE {OWNED} AND id = $3"),
            &[&all, &key, id],
        )? {
            Some(row) => row.get(0),
            None => return Ok(None),
        },
    };
    let limit = i64::from(listing.limit) + 1;
    Ok(Some(
        c.query(
            &format!(
                "SELECT {COLUMNS} FROM files WHERE {OWNED} AND seq {compare} $3 \
                 AND ($4::text IS NULL OR purpose = $4) ORDER BY seq {direction} LIMIT $5"
            ),
            &[&all, &key, &cursor, &listing.purpose, &limit],
        )?
        .iter()
        .map(file_from_row)
        .collect(),
    ))
}

/// Deletes the file (its attachments and chunks go by cascade), raising the version of every
/// store it was in.
pub(crate) fn delete(tx: &mut Tx<'_, '_>, owner: Owner, id: &str) -> Result<bool> {
    let (all, key) = owner.sql_params();
    if get(tx, owner, id)?.is_none() {
        return Ok(false);
    }
    tx.execute(
        "UPDATE vector_stores SET version = version + 1 WHERE id IN \
         (SELECT vector_store_id FROM vector_store_files WHERE file_id = $1)",
        &[&id],
    )?;
    tx.execute(
        &format!("DELETE FROM files WHERE {OWNED} AND id = $3"),
        &[&all, &key, &id],
    )
    .map(|n| n > 0)
}

pub(crate) fn delete_expired(tx: &mut Tx<'_, '_>, now: i64) -> Result<u64> {
    tx.execute("DELETE FROM files WHERE expires_at <= $1", &[&now])
}

fn file_from_row(r: &Row) -> File {
    File {
        id: r.get(0),
        key_id: r.get(1),
        filename: r.get(2),
        purpose: r.get(3),
        bytes: r.get(4),
        created_at: r.get(5),
        expires_at: r.get(6),
    }
}
