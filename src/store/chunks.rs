//! A vector store's chunks (issue 16): the text of its files cut into pieces, each with its
//! embedding (little-endian f32s) and a full-text row. An ingestion writes a file's chunks and
//! marks the file completed in one transaction, and only while the file is still being
//! ingested, so a file detached or cancelled meanwhile keeps nothing; every change raises the
//! store's version, so a cached copy of its vectors knows it is stale.

use serde_json::Value;

use super::postgres::chunks as pg;
use super::sqlite::chunks as sql;
use super::{Backend, Store, StoreError};

/// A chunk to store.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewChunk {
    pub(crate) position: i64,
    pub(crate) text: String,
    pub(crate) tokens: i64,
    pub(crate) embedding: Vec<u8>,
}

/// A stored chunk as search shows it: with its file's name and attributes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Found {
    pub(crate) id: i64,
    pub(crate) file_id: String,
    pub(crate) filename: String,
    pub(crate) position: i64,
    pub(crate) text: String,
    pub(crate) attributes: Option<Value>,
}

/// A store's vectors: its version when read, and each chunk's id, file and embedding.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Vectors {
    pub(crate) version: i64,
    pub(crate) rows: Vec<(i64, String, Vec<u8>)>,
}

/// Stores a file's chunks and marks it completed with `usage_bytes`, in one transaction, if
/// it is still in progress in the store; false (nothing written) when it is not.
pub(crate) fn complete(
    store: &Store,
    vector_store_id: &str,
    file_id: &str,
    chunks: Vec<NewChunk>,
    usage_bytes: i64,
) -> Result<bool, StoreError> {
    let (vs, file) = (vector_store_id.to_string(), file_id.to_string());
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::complete(conn, &vs, &file, &chunks, usage_bytes)),
        Backend::Postgres(db) => db.write(|tx| pg::complete(tx, &vs, &file, &chunks, usage_bytes)),
    }
}

/// Marks an in-progress file failed with `error` (`{"code", "message"}`); false when it was
/// not in progress.
pub(crate) fn fail(
    store: &Store,
    vector_store_id: &str,
    file_id: &str,
    error: Value,
) -> Result<bool, StoreError> {
    let (vs, file) = (vector_store_id.to_string(), file_id.to_string());
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::fail(conn, &vs, &file, &error)),
        Backend::Postgres(db) => db.write(|tx| pg::fail(tx, &vs, &file, &error)),
    }
}

/// Chunks the store holds.
pub(crate) fn count(store: &Store, vector_store_id: &str) -> Result<i64, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::count(c, vector_store_id)),
        Backend::Postgres(db) => db.query(|c| pg::count(c, vector_store_id)),
    }
}

/// Every vector of the store, with the store's version read first (a change after it raises
/// the version, so the copy is found stale next time).
pub(crate) fn vectors(store: &Store, vector_store_id: &str) -> Result<Vectors, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::vectors(c, vector_store_id)),
        Backend::Postgres(db) => db.query(|c| pg::vectors(c, vector_store_id)),
    }
}

/// The store's current version.
pub(crate) fn version(store: &Store, vector_store_id: &str) -> Result<i64, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::version(c, vector_store_id)),
        Backend::Postgres(db) => db.query(|c| pg::version(c, vector_store_id)),
    }
}

/// The chunks with these ids, in the order given (ids no longer there are left out).
pub(crate) fn found(store: &Store, ids: &[i64]) -> Result<Vec<Found>, StoreError> {
    let mut rows = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::found(c, ids)),
        Backend::Postgres(db) => db.query(|c| pg::found(c, ids)),
    }?;
    let order = |id: i64| ids.iter().position(|i| *i == id).unwrap_or(usize::MAX);
    rows.sort_by_key(|f| order(f.id));
    Ok(rows)
}

/// Up to `limit` chunk ids of the store that match `query` as text, best first (SQLite's FTS5
/// bm25, PostgreSQL's ts_rank over an English tsvector).
pub(crate) fn text_search(
    store: &Store,
    vector_store_id: &str,
    query: &str,
    limit: u32,
) -> Result<Vec<i64>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::text_search(c, vector_store_id, query, limit)),
        Backend::Postgres(db) => db.query(|c| pg::text_search(c, vector_store_id, query, limit)),
    }
}

/// A file's chunks in the store, in order: what `…/files/{id}/content` shows.
pub(crate) fn of_file(
    store: &Store,
    vector_store_id: &str,
    file_id: &str,
) -> Result<Vec<String>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::of_file(c, vector_store_id, file_id)),
        Backend::Postgres(db) => db.query(|c| pg::of_file(c, vector_store_id, file_id)),
    }
}

/// Files stored and chunks held across every vector store: the knowledge base's size, for
/// `/metrics`.
pub(crate) fn totals(store: &Store) -> Result<(i64, i64), StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(sql::totals),
        Backend::Postgres(db) => db.query(pg::totals),
    }
}

/// Most words of a text query searched.
const MAX_MATCH_WORDS: usize = 32;

/// A text query's words, lower-cased: runs of letters and digits, so nothing of either
/// engine's query syntax passes through.
pub(crate) fn match_words(query: &str) -> Vec<String> {
    query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .take(MAX_MATCH_WORDS)
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::files::{self, File, Owner};
    use crate::store::testing::stores;
    use crate::store::vector_stores::{self as vs, FileStatus, StoreFile, VectorStore};

    fn setup(store: &Store, files: &[&str]) {
        vs::create(
            store,
            VectorStore {
                id: "vs_1".into(),
                key_id: None,
                name: None,
                metadata: None,
                embedding_model: "mock".into(),
                created_at: 1,
                last_active_at: 1,
                expires_after_days: None,
                version: 0,
            },
        )
        .unwrap();
        for id in files {
            let f = File {
                id: id.to_string(),
                key_id: None,
                filename: format!("{id}.md"),
                purpose: "assistants".into(),
                bytes: 1,
                created_at: 1,
                expires_at: None,
            };
            files::insert(store, f, b"x".to_vec()).unwrap();
            let attached = StoreFile {
                vector_store_id: "vs_1".into(),
                file_id: id.to_string(),
                batch_id: None,
                status: FileStatus::InProgress,
                last_error: None,
                attributes: Some(json!({"file": id})),
                chunking_strategy: json!({"type": "auto"}),
                usage_bytes: 0,
                created_at: 1,
            };
            vs::attach(store, attached).unwrap();
        }
    }

    fn chunk(position: i64, text: &str) -> NewChunk {
        NewChunk {
            position,
            text: text.to_string(),
            tokens: 3,
            embedding: [position as f32, 1.0]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        }
    }

    #[test]
    fn a_files_chunks_land_with_its_completion_and_raise_the_version() {
        for t in stores("chunks_complete") {
            setup(&t.store, &["file-a", "file-b"]);
            let before = version(&t.store, "vs_1").unwrap();
            let chunks = vec![
                chunk(0, "alpha lighthouse keeper"),
                chunk(1, "beta harbour pilot"),
            ];
            assert!(complete(&t.store, "vs_1", "file-a", chunks, 42).unwrap());
            assert!(version(&t.store, "vs_1").unwrap() > before);
            let a = vs::file(&t.store, "vs_1", "file-a").unwrap().unwrap();
            assert_eq!((a.status, a.usage_bytes), (FileStatus::Completed, 42));
            assert_eq!(count(&t.store, "vs_1").unwrap(), 2);
            // Completed once: a second run (a job run again) writes nothing.
            assert!(!complete(&t.store, "vs_1", "file-a", vec![chunk(0, "again")], 1).unwrap());
            assert_eq!(count(&t.store, "vs_1").unwrap(), 2);

            let v = vectors(&t.store, "vs_1").unwrap();
            assert_eq!(v.rows.len(), 2);
            assert_eq!(v.rows[1].1, "file-a");
            let ids: Vec<i64> = v.rows.iter().map(|r| r.0).collect();
            let hits = found(&t.store, &[ids[1], ids[0]]).unwrap();
            assert_eq!(hits[0].text, "beta harbour pilot");
            assert_eq!(hits[0].filename, "file-a.md");
            assert_eq!(hits[0].attributes, Some(json!({"file": "file-a"})));
            assert_eq!(
                text_search(&t.store, "vs_1", "lighthouse", 5).unwrap(),
                [ids[0]]
            );
            assert_eq!(
                text_search(&t.store, "vs_1", "pilots", 5).unwrap(),
                [ids[1]],
                "stemmed"
            );
            assert!(text_search(&t.store, "vs_1", "\"unbalanced OR (", 5).is_ok());
            assert_eq!(
                of_file(&t.store, "vs_1", "file-a").unwrap(),
                ["alpha lighthouse keeper", "beta harbour pilot"]
            );

            // A failed file keeps its error; a detached one its chunks go with it.
            let error = json!({"code": "unsupported_file", "message": "no"});
            assert!(fail(&t.store, "vs_1", "file-b", error.clone()).unwrap());
            assert_eq!(
                vs::file(&t.store, "vs_1", "file-b")
                    .unwrap()
                    .unwrap()
                    .last_error,
                Some(error)
            );
            let before = version(&t.store, "vs_1").unwrap();
            files::delete(&t.store, Owner::All, "file-a").unwrap();
            assert_eq!(count(&t.store, "vs_1").unwrap(), 0);
            assert!(
                version(&t.store, "vs_1").unwrap() > before,
                "a cached copy is stale"
            );
            assert!(text_search(&t.store, "vs_1", "lighthouse", 5)
                .unwrap()
                .is_empty());
        }
    }
}
