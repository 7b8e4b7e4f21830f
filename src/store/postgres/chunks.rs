//! A vector store's chunks on PostgreSQL, with their generated English tsvector.

use postgres::GenericClient;
use serde_json::Value;

use super::{Session, Tx};
use crate::store::chunks::{match_words, Found, NewChunk, Vectors};

type Result<T> = std::result::Result<T, postgres::Error>;

pub(crate) fn complete(
    tx: &mut Tx<'_, '_>,
    vector_store_id: &str,
    file_id: &str,
    chunks: &[NewChunk],
    usage_bytes: i64,
) -> Result<bool> {
    let marked = tx.execute(
        "UPDATE vector_store_files SET status = 'completed', usage_bytes = $3, \
         last_error = NULL WHERE vector_store_id = $1 AND file_id = $2 \
         AND status = 'in_progress'",
        &[&vector_store_id, &file_id, &usage_bytes],
    )?;
    if marked == 0 {
        return Ok(false);
    }
    for c in chunks {
        tx.execute(
            "INSERT INTO chunks (vector_store_id, file_id, position, text, tokens, embedding) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &vector_store_id,
                &file_id,
                &(c.position as i32),
                &c.text,
                &(c.tokens as i32),
                &c.embedding,
            ],
        )?;
    }
    tx.execute(
        "UPDATE vector_stores SET version = version + 1 WHERE id = $1",
        &[&vector_store_id],
    )?;
    Ok(true)
}

pub(crate) fn fail(
    tx: &mut Tx<'_, '_>,
    vector_store_id: &str,
    file_id: &str,
    error: &Value,
) -> Result<bool> {
    tx.execute(
        "UPDATE vector_store_files SET status = 'failed', last_error = $3 \
         WHERE vector_store_id = $1 AND file_id = $2 AND status = 'in_progress'",
        &[&vector_store_id, &file_id, &error.to_string()],
    )
    .map(|n| n > 0)
}

pub(crate) fn count(c: &mut Session<'_, impl GenericClient>, vector_store_id: &str) -> Result<i64> {
    Ok(c.query_one(
        "SELECT count(*) FROM chunks WHERE vector_store_id = $1",
        &[&vector_store_id],
    )?
    .get(0))
}

pub(crate) fn version(
    c: &mut Session<'_, impl GenericClient>,
    vector_store_id: &str,
) -> Result<i64> {
    Ok(c.query_opt(
        "SELECT version FROM vector_stores WHERE id = $1",
        &[&vector_store_id],
    )?
    .map_or(-1, |r| r.get(0)))
}

pub(crate) fn vectors(
    c: &mut Session<'_, impl GenericClient>,
    vector_store_id: &str,
) -> Result<Vectors> {
    let version = version(c, vector_store_id)?;
    let rows = c
        .query(
            "SELECT id, file_id, embedding FROM chunks WHERE vector_store_id = $1 ORDER BY id",
            &[&vector_store_id],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(Vectors { version, rows })
}

pub(crate) fn found(c: &mut Session<'_, impl GenericClient>, ids: &[i64]) -> Result<Vec<Found>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(c.query(
        "SELECT c.id, c.file_id, f.filename, c.position, c.text, a.attributes \
         FROM chunks c JOIN files f ON f.id = c.file_id \
         JOIN vector_store_files a ON a.vector_store_id = c.vector_store_id \
         AND a.file_id = c.file_id WHERE c.id = ANY($1)",
        &[&ids],
    )?
    .iter()
    .map(|r| Found {
        id: r.get(0),
        file_id: r.get(1),
        filename: r.get(2),
        position: i64::from(r.get::<_, i32>(3)),
        text: r.get(4),
        attributes: r
            .get::<_, Option<String>>(5)
            .and_then(|t| serde_json::from_str(&t).ok()),
    })
    .collect())
}

pub(crate) fn text_search(
    c: &mut Session<'_, impl GenericClient>,
    vector_store_id: &str,
    query: &str,
    limit: u32,
) -> Result<Vec<i64>> {
    let words = match_words(query);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    // Each word a quoted lexeme (tsquery syntax in it is text), any of them matching.
    let expression = words
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(" | ");
    Ok(c.query(
        "SELECT id FROM chunks, to_tsquery('english', $1) q \
         WHERE vector_store_id = $2 AND tsv @@ q ORDER BY ts_rank(tsv, q) DESC, id LIMIT $3",
        &[&expression, &vector_store_id, &i64::from(limit)],
    )?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

pub(crate) fn totals(c: &mut Session<'_, impl GenericClient>) -> Result<(i64, i64)> {
    let row = c.query_one(
        "SELECT (SELECT count(*) FROM files), (SELECT count(*) FROM chunks)",
        &[],
    )?;
    Ok((row.get(0), row.get(1)))
}

pub(crate) fn of_file(
    c: &mut Session<'_, impl GenericClient>,
    vector_store_id: &str,
    file_id: &str,
) -> Result<Vec<String>> {
    Ok(c.query(
        "SELECT text FROM chunks WHERE vector_store_id = $1 AND file_id = $2 ORDER BY position",
        &[&vector_store_id, &file_id],
    )?
    .iter()
    .map(|r| r.get(0))
    .collect())
}
