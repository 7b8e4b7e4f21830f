//! Files and their bytes in SQLite. Pages follow `seq`, the order files were stored.

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::store::files::{File, Listing, Owner};

const COLUMNS: &str = "id, key_id, filename, purpose, bytes, created_at, expires_at";
/// Whether the row is the owner's: `?1` every owner's, else `key_id IS ?2` (NULL-safe).
const OWNED: &str = "(?1 OR key_id IS ?2)";

pub(crate) fn insert(conn: &Connection, file: &File, content: &[u8]) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO files (id, key_id, filename, purpose, bytes, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        file.id,
        file.key_id,
        file.filename,
        file.purpose,
        file.bytes,
        file.created_at,
        file.expires_at
    ])?;
    conn.prepare_cached("INSERT INTO file_contents (file_id, content) VALUES (?1, ?2)")?
        .execute(params![file.id, content])
        .map(drop)
}

pub(crate) fn get(conn: &Connection, owner: Owner, id: &str) -> rusqlite::Result<Option<File>> {
    let (all, key) = owner.sql_params();
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files WHERE {OWNED} AND id = ?3"
    ))?
    .query_row(params![all, key, id], file_from_row)
    .optional()
}

pub(crate) fn content(
    conn: &Connection,
    owner: Owner,
    id: &str,
) -> rusqlite::Result<Option<Vec<u8>>> {
    let (all, key) = owner.sql_params();
    conn.prepare_cached(&format!(
        "SELECT c.content FROM files JOIN file_contents c ON c.file_id = files.id \
         WHERE {OWNED} AND files.id = ?3"
    ))?
    .query_row(params![all, key, id], |r| r.get(0))
    .optional()
}

/// Up to `limit + 1` files (one more tells whether more follow); `None` when the cursor names
/// no file the owner may see.
pub(crate) fn list(conn: &Connection, listing: &Listing) -> rusqlite::Result<Option<Vec<File>>> {
    let (all, key) = listing.owner.sql_params();
    let (compare, direction, start) = listing.order.sql();
    let cursor = match &listing.after {
        None => start,
        Some(id) => match conn
            .prepare_cached(&format!("SELECT seq FROM files WHERE {OWNED} AND id = ?3"))?
            .query_row(params![all, key, id], |r| r.get(0))
            .optional()?
        {
            Some(seq) => seq,
            None => return Ok(None),
        },
    };
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files WHERE {OWNED} AND seq {compare} ?3 \
         AND (?4 IS NULL OR purpose = ?4) ORDER BY seq {direction} LIMIT ?5"
    ))?;
    let files = statement
        .query_map(
            params![
                all,
                key,
                cursor,
                listing.purpose,
                i64::from(listing.limit) + 1
            ],
            file_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(files))
}

/// Deletes the file (its attachments and chunks go by cascade), raising the version of every
/// store it was in.
pub(crate) fn delete(conn: &Connection, owner: Owner, id: &str) -> rusqlite::Result<bool> {
    let (all, key) = owner.sql_params();
    if get(conn, owner, id)?.is_none() {
        return Ok(false);
    }
    conn.prepare_cached(
        "UPDATE vector_stores SET version = version + 1 WHERE id IN \
         (SELECT vector_store_id FROM vector_store_files WHERE file_id = ?1)",
    )?
    .execute([id])?;
    conn.prepare_cached(&format!("DELETE FROM files WHERE {OWNED} AND id = ?3"))?
        .execute(params![all, key, id])
        .map(|n| n > 0)
}

pub(crate) fn delete_expired(conn: &Connection, now: i64) -> rusqlite::Result<u64> {
    conn.prepare_cached("DELETE FROM files WHERE expires_at <= ?1")?
        .execute([now])
        .map(|n| n as u64)
}

fn file_from_row(r: &Row<'_>) -> rusqlite::Result<File> {
    Ok(File {
        id: r.get(0)?,
        key_id: r.get(1)?,
        filename: r.get(2)?,
        purpose: r.get(3)?,
        bytes: r.get(4)?,
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
    })
}
