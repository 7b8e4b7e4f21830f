//! A vector store's chunks in SQLite, with their FTS5 rows (kept by the schema's triggers).

use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde_json::Value;

use crate::store::chunks::{match_words, Found, NewChunk, Vectors};

pub(crate) fn complete(
    conn: &Connection,
    vector_store_id: &str,
    file_id: &str,
    chunks: &[NewChunk],
    usage_bytes: i64,
) -> rusqlite::Result<bool> {
    let marked = conn
        .prepare_cached(
            "UPDATE vector_store_files SET status = 'completed', usage_bytes = ?3, \
             last_error = NULL WHERE vector_store_id = ?1 AND file_id = ?2 \
             AND status = 'in_progress'",
        )?
        .execute(params![vector_store_id, file_id, usage_bytes])?;
    if marked == 0 {
        return Ok(false);
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO chunks (vector_store_id, file_id, position, text, tokens, embedding) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for c in chunks {
        insert.execute(params![
            vector_store_id,
            file_id,
            c.position,
            c.text,
            c.tokens,
            c.embedding
        ])?;
    }
    bump(conn, vector_store_id)?;
    Ok(true)
}

pub(crate) fn fail(
    conn: &Connection,
    vector_store_id: &str,
    file_id: &str,
    error: &Value,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "UPDATE vector_store_files SET status = 'failed', last_error = ?3 \
         WHERE vector_store_id = ?1 AND file_id = ?2 AND status = 'in_progress'",
    )?
    .execute(params![vector_store_id, file_id, error.to_string()])
    .map(|n| n > 0)
}

pub(crate) fn count(conn: &Connection, vector_store_id: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT count(*) FROM chunks WHERE vector_store_id = ?1")?
        .query_row([vector_store_id], |r| r.get(0))
}

pub(crate) fn version(conn: &Connection, vector_store_id: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT version FROM vector_stores WHERE id = ?1")?
        .query_row([vector_store_id], |r| r.get(0))
        .optional()
        .map(|v| v.unwrap_or(-1))
}

pub(crate) fn vectors(conn: &Connection, vector_store_id: &str) -> rusqlite::Result<Vectors> {
    let version = version(conn, vector_store_id)?;
    let mut statement = conn.prepare_cached(
        "SELECT id, file_id, embedding FROM chunks WHERE vector_store_id = ?1 ORDER BY id",
    )?;
    let rows = statement
        .query_map([vector_store_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Vectors { version, rows })
}

pub(crate) fn found(conn: &Connection, ids: &[i64]) -> rusqlite::Result<Vec<Found>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let marks = vec!["?"; ids.len()].join(", ");
    let mut statement = conn.prepare(&format!(
        "SELECT c.id, c.file_id, f.filename, c.position, c.text, a.attributes \
         FROM chunks c JOIN files f ON f.id = c.file_id \
         JOIN vector_store_files a ON a.vector_store_id = c.vector_store_id \
         AND a.file_id = c.file_id WHERE c.id IN ({marks})"
    ))?;
    let rows = statement
        .query_map(params_from_iter(ids), |r| {
            Ok(Found {
                id: r.get(0)?,
                file_id: r.get(1)?,
                filename: r.get(2)?,
                position: r.get(3)?,
                text: r.get(4)?,
                attributes: r
                    .get::<_, Option<String>>(5)?
                    .and_then(|t| serde_json::from_str(&t).ok()),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

pub(crate) fn text_search(
    conn: &Connection,
    vector_store_id: &str,
    query: &str,
    limit: u32,
) -> rusqlite::Result<Vec<i64>> {
    let words = match_words(query);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    // Each word quoted (FTS5 syntax in it is text), any of them matching.
    let expression = words
        .iter()
        .map(|w| format!("\"{w}\""))
        .collect::<Vec<_>>()
        .join(" OR ");
    let mut statement = conn.prepare_cached(
        "SELECT c.id FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid \
         WHERE chunks_fts MATCH ?1 AND c.vector_store_id = ?2 \
         ORDER BY bm25(chunks_fts) LIMIT ?3",
    )?;
    let ids = statement
        .query_map(
            params![expression, vector_store_id, i64::from(limit)],
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(ids)
}

pub(crate) fn of_file(
    conn: &Connection,
    vector_store_id: &str,
    file_id: &str,
) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare_cached(
        "SELECT text FROM chunks WHERE vector_store_id = ?1 AND file_id = ?2 ORDER BY position",
    )?;
    let texts = statement
        .query_map([vector_store_id, file_id], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(texts)
}

pub(crate) fn totals(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.prepare_cached("SELECT (SELECT count(*) FROM files), (SELECT count(*) FROM chunks)")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
}

fn bump(conn: &Connection, vector_store_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE vector_stores SET version = version + 1 WHERE id = ?1")?
        .execute([vector_store_id])
        .map(drop)
}
