//! Vector stores and the files attached to them (issue 16), at rest: what OpenAI's
//! `/v1/vector_stores` routes show, with each store's file counts and bytes counted from its
//! files in the same query. A store's `version` rises whenever its chunks change, so a copy
//! of its vectors loaded for search knows when it is stale. The owner is the store's: its
//! files are reached through it. Nothing changes a store once it has expired, so it stays
//! expired, and [`reclaim_expired`] gives back the space its chunks took.

use std::collections::HashMap;

use serde_json::Value;

use super::files::{Order, Owner};
use super::postgres::vector_stores as pg;
use super::sqlite::vector_stores as sql;
use super::{page, Backend, Page, Store, StoreError};

/// A vector store as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VectorStore {
    pub(crate) id: String,
    pub(crate) key_id: Option<i64>,
    pub(crate) name: Option<String>,
    pub(crate) metadata: Option<Value>,
    pub(crate) embedding_model: String,
    /// Unix seconds.
    pub(crate) created_at: i64,
    pub(crate) last_active_at: i64,
    /// `expires_after: {anchor: "last_active_at", days}`.
    pub(crate) expires_after_days: Option<i64>,
    pub(crate) version: i64,
}

impl VectorStore {
    /// Whether it has expired at `now` (unix seconds): unused for its `expires_after` days.
    pub(crate) fn is_expired(&self, now: i64) -> bool {
        self.expires_after_days
            .is_some_and(|days| self.last_active_at + days * 86_400 <= now)
    }
}

/// A store's files by status, and the bytes their chunks take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) in_progress: i64,
    pub(crate) completed: i64,
    pub(crate) failed: i64,
    pub(crate) cancelled: i64,
    pub(crate) usage_bytes: i64,
}

impl Counts {
    pub(crate) fn total(&self) -> i64 {
        self.in_progress + self.completed + self.failed + self.cancelled
    }
}

/// A store with its counts: what the API shows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Counted {
    pub(crate) store: VectorStore,
    pub(crate) counts: Counts,
}

impl Counted {
    /// OpenAI's status: `expired` once unused for its `expires_after` days, `in_progress`
    /// while a file is being ingested, else `completed`.
    pub(crate) fn status(&self, now: i64) -> &'static str {
        if self.store.is_expired(now) {
            "expired"
        } else if self.counts.in_progress > 0 {
            "in_progress"
        } else {
            "completed"
        }
    }

    /// When it will expire, unix seconds, if it does.
    pub(crate) fn expires_at(&self) -> Option<i64> {
        let s = &self.store;
        s.expires_after_days
            .map(|days| s.last_active_at + days * 86_400)
    }
}

/// A file's ingestion status in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileStatus {
    InProgress,
    Completed,
    Cancelled,
    Failed,
}

impl FileStatus {
    pub(crate) fn name(self) -> &'static str {
        match self {
            FileStatus::InProgress => "in_progress",
            FileStatus::Completed => "completed",
            FileStatus::Cancelled => "cancelled",
            FileStatus::Failed => "failed",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<FileStatus> {
        [
            FileStatus::InProgress,
            FileStatus::Completed,
            FileStatus::Cancelled,
            FileStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.name() == text)
    }
}

/// A file attached to a store.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoreFile {
    pub(crate) vector_store_id: String,
    pub(crate) file_id: String,
    pub(crate) batch_id: Option<String>,
    pub(crate) status: FileStatus,
    /// `{"code", "message"}` once failed.
    pub(crate) last_error: Option<Value>,
    pub(crate) attributes: Option<Value>,
    /// The resolved strategy as OpenAI shows it.
    pub(crate) chunking_strategy: Value,
    pub(crate) usage_bytes: i64,
    pub(crate) created_at: i64,
}

/// A batch of files attached together, with its files' counts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FileBatch {
    pub(crate) id: String,
    pub(crate) vector_store_id: String,
    pub(crate) created_at: i64,
    pub(crate) cancelled: bool,
    /// Its files by status (`usage_bytes` unused).
    pub(crate) counts: Counts,
}

impl FileBatch {
    /// OpenAI's status: `cancelled` once cancelled, `in_progress` while a file is, `failed`
    /// when every file failed, else `completed`.
    pub(crate) fn status(&self) -> &'static str {
        let c = &self.counts;
        if self.cancelled {
            "cancelled"
        } else if c.in_progress > 0 {
            "in_progress"
        } else if c.total() > 0 && c.failed == c.total() {
            "failed"
        } else {
            "completed"
        }
    }
}

/// A page of one store's files: `limit` after the file `after`, in `order`, maybe of one
/// status or one batch.
#[derive(Debug, Clone)]
pub(crate) struct FileListing {
    pub(crate) vector_store_id: String,
    pub(crate) status: Option<FileStatus>,
    pub(crate) batch_id: Option<String>,
    pub(crate) limit: u32,
    pub(crate) after: Option<String>,
    pub(crate) order: Order,
}

/// What an update changes; `None` leaves a field as it is. `expires_after_days: Some(None)`
/// removes the expiry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Changes {
    pub(crate) name: Option<String>,
    pub(crate) metadata: Option<Value>,
    pub(crate) expires_after_days: Option<Option<i64>>,
}

pub(crate) fn create(store: &Store, vs: VectorStore) -> Result<(), StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::insert(conn, &vs)),
        Backend::Postgres(db) => db.write(|tx| pg::insert(tx, &vs)),
    }
}

/// The store with this id and its counts, if `owner` may see it.
pub(crate) fn get(store: &Store, owner: Owner, id: &str) -> Result<Option<Counted>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::get(c, owner, id)),
        Backend::Postgres(db) => db.query(|c| pg::get(c, owner, id)),
    }
}

/// A page of `owner`'s stores. `None` when `after` names no store the owner may see.
pub(crate) fn list(
    store: &Store,
    owner: Owner,
    limit: u32,
    after: Option<&str>,
    order: Order,
) -> Result<Option<Page<Counted>>, StoreError> {
    let found = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::list(c, owner, limit + 1, after, order)),
        Backend::Postgres(db) => db.query(|c| pg::list(c, owner, limit + 1, after, order)),
    }?;
    Ok(found.map(|items| page(items, limit)))
}

/// Applies `changes` to the store if `owner` may see it and it has not expired at `now`;
/// false when there is no such store. The expiry is in the write's own condition, so an
/// update racing the expiry cannot revive a store whose chunks are being reclaimed.
pub(crate) fn update(
    store: &Store,
    owner: Owner,
    id: &str,
    changes: Changes,
    now: i64,
) -> Result<bool, StoreError> {
    let id = id.to_string();
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::update(conn, owner, &id, &changes, now)),
        Backend::Postgres(db) => db.write(|tx| pg::update(tx, owner, &id, &changes, now)),
    }
}

/// Marks the store used at `now` (its expiry counts from its last use), unless it has expired
/// by then: an expired store stays expired.
pub(crate) fn touch(store: &Store, id: &str, now: i64) -> Result<(), StoreError> {
    let id = id.to_string();
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::touch(conn, &id, now)),
        Backend::Postgres(db) => db.write(|tx| pg::touch(tx, &id, now)),
    }
}

/// Deletes the store, its attachments, batches and chunks, if `owner` may see it.
pub(crate) fn delete(store: &Store, owner: Owner, id: &str) -> Result<bool, StoreError> {
    let id = id.to_string();
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::delete(conn, owner, &id)),
        Backend::Postgres(db) => db.write(|tx| pg::delete(tx, owner, &id)),
    }
}

/// Attaches a file (status in progress). A file already attached to the store is a unique
/// violation: the caller answers with the attachment there is.
pub(crate) fn attach(store: &Store, file: StoreFile) -> Result<(), StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::attach(conn, &file)),
        Backend::Postgres(db) => db.write(|tx| pg::attach(tx, &file)),
    }
}

/// One attachment, if the store has the file.
pub(crate) fn file(
    store: &Store,
    vector_store_id: &str,
    file_id: &str,
) -> Result<Option<StoreFile>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::file(c, vector_store_id, file_id)),
        Backend::Postgres(db) => db.query(|c| pg::file(c, vector_store_id, file_id)),
    }
}

/// A page of a store's files. `None` when `after` names no file of the store.
pub(crate) fn files(
    store: &Store,
    listing: &FileListing,
) -> Result<Option<Page<StoreFile>>, StoreError> {
    let found = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::files(c, listing)),
        Backend::Postgres(db) => db.query(|c| pg::files(c, listing)),
    }?;
    Ok(found.map(|items| page(items, listing.limit)))
}

/// Every attached file's attributes, by file id (files without any are left out).
pub(crate) fn attributes(
    store: &Store,
    vector_store_id: &str,
) -> Result<HashMap<String, Value>, StoreError> {
    let rows = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::attributes(c, vector_store_id)),
        Backend::Postgres(db) => db.query(|c| pg::attributes(c, vector_store_id)),
    }?;
    Ok(rows
        .into_iter()
        .filter_map(|(file, text)| Some((file, serde_json::from_str::<Value>(&text?).ok()?)))
        .collect())
}

/// Replaces an attachment's attributes; false when the store has no such file.
pub(crate) fn set_attributes(
    store: &Store,
    vector_store_id: &str,
    file_id: &str,
    attributes: Option<Value>,
) -> Result<bool, StoreError> {
    let (vs, file) = (vector_store_id.to_string(), file_id.to_string());
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::set_attributes(conn, &vs, &file, attributes.as_ref())),
        Backend::Postgres(db) => {
            db.write(|tx| pg::set_attributes(tx, &vs, &file, attributes.as_ref()))
        }
    }
}

/// Detaches a file, its chunks with it; false when the store had no such file.
pub(crate) fn detach(
    store: &Store,
    vector_store_id: &str,
    file_id: &str,
) -> Result<bool, StoreError> {
    let (vs, file) = (vector_store_id.to_string(), file_id.to_string());
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::detach(conn, &vs, &file)),
        Backend::Postgres(db) => db.write(|tx| pg::detach(tx, &vs, &file)),
    }
}

/// Records a new batch of the store (its files are attached with its id).
pub(crate) fn create_batch(
    store: &Store,
    vector_store_id: &str,
    id: &str,
    created_at: i64,
) -> Result<(), StoreError> {
    let (vs, id) = (vector_store_id.to_string(), id.to_string());
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::create_batch(conn, &vs, &id, created_at)),
        Backend::Postgres(db) => db.write(|tx| pg::create_batch(tx, &vs, &id, created_at)),
    }
}

/// The store's batch with this id and its files' counts.
pub(crate) fn batch(
    store: &Store,
    vector_store_id: &str,
    id: &str,
) -> Result<Option<FileBatch>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::batch(c, vector_store_id, id)),
        Backend::Postgres(db) => db.query(|c| pg::batch(c, vector_store_id, id)),
    }
}

/// Cancels a batch: its files still in progress end `cancelled` (their ingestion then writes
/// nothing). False when the store has no such batch.
pub(crate) fn cancel_batch(
    store: &Store,
    vector_store_id: &str,
    id: &str,
) -> Result<bool, StoreError> {
    let (vs, id) = (vector_store_id.to_string(), id.to_string());
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::cancel_batch(conn, &vs, &id)),
        Backend::Postgres(db) => db.write(|tx| pg::cancel_batch(tx, &vs, &id)),
    }
}

/// Chunks deleted per transaction by [`reclaim_expired`], so the SQLite writer's other work
/// never waits long behind one. A chunk of 800 tokens and 1,536 dimensions is about 10 KB with
/// its full-text row; measured on SQLite on the 2-core test machine, 250 of them take 50-120 ms
/// to delete and commit (1,000 took 240-400 ms), on PostgreSQL 1,000 take 20 ms.
const RECLAIM_BATCH: u64 = 250;

/// What [`reclaim_expired`] gave back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reclaimed {
    /// The stores whose chunks or bytes it deleted.
    pub(crate) stores: Vec<String>,
    /// Chunks deleted.
    pub(crate) chunks: u64,
    /// Whether it stopped at its budget with more to reclaim.
    pub(crate) more: bool,
}

/// Gives back the space of the stores expired at `now` (unix seconds): deletes their chunks
/// (their full-text rows go with them), [`RECLAIM_BATCH`] a transaction, store by store, then
/// sets their files' `usage_bytes` to 0, raising each store's version so a cached copy of its
/// vectors is stale. The files stay attached and counted. Stops once `max_chunks` are deleted,
/// `more` saying so. A store already reclaimed is left alone, unless an ingestion finished
/// into it since.
pub(crate) fn reclaim_expired(
    store: &Store,
    now: i64,
    max_chunks: u64,
) -> Result<Reclaimed, StoreError> {
    let holding = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::expired_holding(c, now)),
        Backend::Postgres(db) => db.query(|c| pg::expired_holding(c, now)),
    }?;
    let mut reclaimed = Reclaimed::default();
    for id in holding {
        loop {
            if reclaimed.chunks >= max_chunks {
                reclaimed.more = true;
                return Ok(reclaimed);
            }
            let limit = RECLAIM_BATCH.min(max_chunks - reclaimed.chunks);
            let batch = match store.backend() {
                Backend::Sqlite(db) => {
                    let id = id.clone();
                    db.writer()
                        .call(move |conn| sql::reclaim(conn, &id, now, limit))
                }
                Backend::Postgres(db) => db.write(|tx| pg::reclaim(tx, &id, now, limit)),
            }?;
            reclaimed.chunks += batch.chunks;
            if batch.changed && reclaimed.stores.last() != Some(&id) {
                reclaimed.stores.push(id.clone());
            }
            if batch.chunks < limit {
                break;
            }
        }
    }
    Ok(reclaimed)
}

/// One transaction of [`reclaim_expired`]: chunks deleted, and whether anything changed (the
/// chunks, or the files' bytes once none were left).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReclaimBatch {
    pub(crate) chunks: u64,
    pub(crate) changed: bool,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::chunks::{self, NewChunk};
    use crate::store::files::{self, File};
    use crate::store::testing::stores;

    fn vector_store(id: &str, key: Option<i64>) -> VectorStore {
        VectorStore {
            id: id.to_string(),
            key_id: key,
            name: Some(format!("{id} name")),
            metadata: Some(json!({"team": "docs"})),
            embedding_model: "mock".into(),
            created_at: 1_000,
            last_active_at: 1_000,
            expires_after_days: None,
            version: 0,
        }
    }

    fn attachment(vs: &str, file: &str, status: FileStatus, bytes: i64) -> StoreFile {
        StoreFile {
            vector_store_id: vs.to_string(),
            file_id: file.to_string(),
            batch_id: None,
            status,
            last_error: None,
            attributes: Some(json!({"lang": "en"})),
            chunking_strategy: json!({"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}),
            usage_bytes: bytes,
            created_at: 1_001,
        }
    }

    fn upload(store: &Store, id: &str) {
        let f = File {
            id: id.to_string(),
            key_id: Some(1),
            filename: format!("{id}.txt"),
            purpose: "assistants".into(),
            bytes: 1,
            created_at: 1_000,
            expires_at: None,
        };
        files::insert(store, f, b"x".to_vec()).unwrap();
    }

    #[test]
    fn stores_are_counted_from_their_files_and_seen_only_by_their_owner() {
        for t in stores("vs_owner") {
            let owner = Owner::Key(Some(1));
            create(&t.store, vector_store("vs_a", Some(1))).unwrap();
            create(&t.store, vector_store("vs_b", Some(2))).unwrap();
            for f in ["file-1", "file-2", "file-3"] {
                upload(&t.store, f);
            }
            attach(
                &t.store,
                attachment("vs_a", "file-1", FileStatus::Completed, 100),
            )
            .unwrap();
            attach(
                &t.store,
                attachment("vs_a", "file-2", FileStatus::InProgress, 0),
            )
            .unwrap();
            attach(
                &t.store,
                attachment("vs_a", "file-3", FileStatus::Failed, 0),
            )
            .unwrap();
            let twice = attach(
                &t.store,
                attachment("vs_a", "file-1", FileStatus::InProgress, 0),
            );
            assert!(twice.unwrap_err().is_unique_violation());

            let a = get(&t.store, owner, "vs_a").unwrap().unwrap();
            assert_eq!(
                a.counts,
                Counts {
                    in_progress: 1,
                    completed: 1,
                    failed: 1,
                    cancelled: 0,
                    usage_bytes: 100
                }
            );
            assert_eq!(a.status(2_000), "in_progress");
            assert_eq!(a.store.metadata, Some(json!({"team": "docs"})));
            assert_eq!(get(&t.store, owner, "vs_b").unwrap(), None);
            assert!(get(&t.store, Owner::All, "vs_b").unwrap().is_some());

            let mine = list(&t.store, owner, 10, None, Order::Desc)
                .unwrap()
                .unwrap();
            assert_eq!(mine.items.len(), 1);
            assert_eq!(mine.items[0].counts.total(), 3);
            let all = list(&t.store, Owner::All, 1, None, Order::Asc)
                .unwrap()
                .unwrap();
            assert_eq!(
                (all.items[0].store.id.as_str(), all.has_more),
                ("vs_a", true)
            );
            assert!(list(&t.store, owner, 10, Some("vs_b"), Order::Desc)
                .unwrap()
                .is_none());

            assert!(!delete(&t.store, owner, "vs_b").unwrap());
            assert!(delete(&t.store, owner, "vs_a").unwrap());
            assert_eq!(
                file(&t.store, "vs_a", "file-1").unwrap(),
                None,
                "attachments went with it"
            );
        }
    }

    #[test]
    fn updates_change_only_what_they_name_and_expiry_follows_last_use() {
        for t in stores("vs_update") {
            let owner = Owner::Key(Some(1));
            create(&t.store, vector_store("vs_a", Some(1))).unwrap();
            let changes = Changes {
                name: Some("renamed".into()),
                expires_after_days: Some(Some(2)),
                ..Changes::default()
            };
            assert!(update(&t.store, owner, "vs_a", changes, 2_000).unwrap());
            let theirs = update(
                &t.store,
                Owner::Key(Some(2)),
                "vs_a",
                Changes::default(),
                2_000,
            );
            assert!(!theirs.unwrap());
            let a = get(&t.store, owner, "vs_a").unwrap().unwrap();
            assert_eq!(a.store.name.as_deref(), Some("renamed"));
            assert_eq!(a.store.metadata, Some(json!({"team": "docs"})));
            assert_eq!(a.expires_at(), Some(1_000 + 2 * 86_400));
            assert_eq!(a.status(1_000 + 2 * 86_400), "expired");
            touch(&t.store, "vs_a", 5_000).unwrap();
            let a = get(&t.store, owner, "vs_a").unwrap().unwrap();
            assert_eq!(a.status(1_000 + 2 * 86_400), "completed");
            let clear = Changes {
                expires_after_days: Some(None),
                ..Changes::default()
            };
            update(&t.store, owner, "vs_a", clear, 2_000).unwrap();
            assert_eq!(
                get(&t.store, owner, "vs_a").unwrap().unwrap().expires_at(),
                None
            );
        }
    }

    #[test]
    fn a_batch_counts_its_files_and_cancelling_it_cancels_those_in_progress() {
        for t in stores("vs_batches") {
            create(&t.store, vector_store("vs_a", None)).unwrap();
            create_batch(&t.store, "vs_a", "vsfb_1", 5).unwrap();
            for (i, status) in [FileStatus::Completed, FileStatus::InProgress]
                .into_iter()
                .enumerate()
            {
                let id = format!("file-{i}");
                upload(&t.store, &id);
                let mut f = attachment("vs_a", &id, status, 1);
                f.batch_id = Some("vsfb_1".into());
                attach(&t.store, f).unwrap();
            }
            let b = batch(&t.store, "vs_a", "vsfb_1").unwrap().unwrap();
            assert_eq!(
                (b.counts.completed, b.counts.in_progress, b.status()),
                (1, 1, "in_progress")
            );
            assert_eq!(batch(&t.store, "vs_other", "vsfb_1").unwrap(), None);
            assert!(cancel_batch(&t.store, "vs_a", "vsfb_1").unwrap());
            let b = batch(&t.store, "vs_a", "vsfb_1").unwrap().unwrap();
            assert_eq!(
                (b.counts.completed, b.counts.cancelled, b.status()),
                (1, 1, "cancelled")
            );
            assert_eq!(
                file(&t.store, "vs_a", "file-1").unwrap().unwrap().status,
                FileStatus::Cancelled
            );
            assert!(!cancel_batch(&t.store, "vs_a", "vsfb_none").unwrap());
        }
    }

    #[test]
    fn a_stores_files_page_filter_by_status_take_attributes_and_detach() {
        for t in stores("vs_files") {
            create(&t.store, vector_store("vs_a", None)).unwrap();
            for (i, status) in [
                FileStatus::Completed,
                FileStatus::InProgress,
                FileStatus::Completed,
            ]
            .into_iter()
            .enumerate()
            {
                let id = format!("file-{i}");
                upload(&t.store, &id);
                attach(&t.store, attachment("vs_a", &id, status, 10)).unwrap();
            }
            let listing = FileListing {
                vector_store_id: "vs_a".into(),
                status: None,
                batch_id: None,
                limit: 2,
                after: None,
                order: Order::Desc,
            };
            let first = files(&t.store, &listing).unwrap().unwrap();
            let ids: Vec<_> = first.items.iter().map(|f| f.file_id.as_str()).collect();
            assert_eq!((ids, first.has_more), (vec!["file-2", "file-1"], true));
            let rest = FileListing {
                after: Some("file-1".into()),
                ..listing.clone()
            };
            let rest = files(&t.store, &rest).unwrap().unwrap();
            assert_eq!(rest.items.len(), 1);
            let done = FileListing {
                status: Some(FileStatus::Completed),
                limit: 10,
                ..listing.clone()
            };
            assert_eq!(files(&t.store, &done).unwrap().unwrap().items.len(), 2);

            assert!(
                set_attributes(&t.store, "vs_a", "file-0", Some(json!({"year": 2024}))).unwrap()
            );
            let f = file(&t.store, "vs_a", "file-0").unwrap().unwrap();
            assert_eq!(f.attributes, Some(json!({"year": 2024})));
            let all = attributes(&t.store, "vs_a").unwrap();
            assert_eq!(all.get("file-0"), Some(&json!({"year": 2024})));
            assert_eq!(all.get("file-1"), Some(&json!({"lang": "en"})));
            assert!(detach(&t.store, "vs_a", "file-0").unwrap());
            assert!(!detach(&t.store, "vs_a", "file-0").unwrap());
            // Deleting the file itself detaches it too.
            files::delete(&t.store, Owner::All, "file-1").unwrap();
            let left = files(
                &t.store,
                &FileListing {
                    limit: 10,
                    ..listing
                },
            )
            .unwrap()
            .unwrap();
            let ids: Vec<_> = left.items.iter().map(|f| f.file_id.as_str()).collect();
            assert_eq!(ids, ["file-2"]);
        }
    }

    /// Attaches `file` to `vs` and ingests it as `n` chunks taking `100 * n` bytes.
    fn ingest(store: &Store, vs: &str, file: &str, n: i64) {
        attach(store, attachment(vs, file, FileStatus::InProgress, 0)).unwrap();
        let pieces = (0..n)
            .map(|i| NewChunk {
                position: i,
                text: format!("lighthouse keeper {vs} {i}"),
                tokens: 3,
                embedding: [1.0f32, i as f32]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            })
            .collect();
        assert!(chunks::complete(store, vs, file, pieces, 100 * n).unwrap());
    }

    /// Full-text rows left in SQLite's FTS5 index (PostgreSQL's tsvector is a column of the
    /// chunk itself, so it cannot outlive it).
    fn fts_rows(store: &Store) -> Option<i64> {
        match store.backend() {
            Backend::Sqlite(db) => Some(
                db.query(|c| {
                    c.query_row("SELECT count(*) FROM chunks_fts_docsize", [], |r| r.get(0))
                })
                .unwrap(),
            ),
            Backend::Postgres(_) => None,
        }
    }

    #[test]
    fn reclaiming_deletes_only_expired_stores_chunks_and_nothing_revives_them() {
        for t in stores("vs_reclaim") {
            const DAY: i64 = 86_400;
            // Unused since 1_000: two days' expiry has run out by `now`, seven days' has not.
            let now = 1_000 + 3 * DAY;
            let mut old = vector_store("vs_old", None);
            old.expires_after_days = Some(2);
            let mut fresh = vector_store("vs_fresh", None);
            fresh.expires_after_days = Some(7);
            for vs in [old, fresh, vector_store("vs_keep", None)] {
                create(&t.store, vs).unwrap();
            }
            for f in ["file-1", "file-2", "file-3"] {
                upload(&t.store, f);
            }
            ingest(&t.store, "vs_old", "file-1", 3);
            ingest(&t.store, "vs_old", "file-2", 2);
            ingest(&t.store, "vs_fresh", "file-1", 2);
            ingest(&t.store, "vs_keep", "file-1", 2);
            let seen = |id: &str| get(&t.store, Owner::All, id).unwrap().unwrap();
            assert_eq!(seen("vs_old").status(now), "expired");

            // Neither an update nor a search's touch revives it.
            let revive = Changes {
                expires_after_days: Some(None),
                ..Changes::default()
            };
            assert!(!update(&t.store, Owner::All, "vs_old", revive, now).unwrap());
            touch(&t.store, "vs_old", now).unwrap();
            let old = seen("vs_old");
            assert_eq!(
                (old.store.expires_after_days, old.store.last_active_at),
                (Some(2), 1_000)
            );
            assert!(update(&t.store, Owner::All, "vs_fresh", Changes::default(), now).unwrap());

            // Four chunks a call: the first stops at its budget, the second finishes.
            let (old_version, fresh_version) = (old.store.version, seen("vs_fresh").store.version);
            let first = reclaim_expired(&t.store, now, 4).unwrap();
            assert_eq!(
                (first.stores, first.chunks, first.more),
                (vec!["vs_old".to_string()], 4, true)
            );
            assert_eq!(chunks::count(&t.store, "vs_old").unwrap(), 1);
            let rest = reclaim_expired(&t.store, now, 4).unwrap();
            assert_eq!(
                (rest.stores, rest.chunks, rest.more),
                (vec!["vs_old".to_string()], 1, false)
            );
            let old = seen("vs_old");
            assert_eq!(chunks::count(&t.store, "vs_old").unwrap(), 0);
            assert_eq!((old.counts.completed, old.counts.usage_bytes), (2, 0));
            assert_eq!(
                file(&t.store, "vs_old", "file-1")
                    .unwrap()
                    .unwrap()
                    .usage_bytes,
                0
            );
            assert!(old.store.version > old_version, "a cached copy is stale");
            assert!(chunks::text_search(&t.store, "vs_old", "lighthouse", 5)
                .unwrap()
                .is_empty());
            if let Some(rows) = fts_rows(&t.store) {
                assert_eq!(rows, 4, "the full-text rows went with the chunks");
            }
            // The others keep theirs.
            assert_eq!(chunks::count(&t.store, "vs_fresh").unwrap(), 2);
            assert_eq!(chunks::count(&t.store, "vs_keep").unwrap(), 2);
            let fresh = seen("vs_fresh");
            assert_eq!(
                (fresh.store.version, fresh.counts.usage_bytes),
                (fresh_version, 200)
            );

            // Done: a second sweep changes nothing.
            assert_eq!(
                reclaim_expired(&t.store, now, 100).unwrap(),
                Reclaimed::default()
            );
            assert_eq!(seen("vs_old").store.version, old.store.version);

            // An ingestion that finishes into it afterwards is reclaimed by the next sweep.
            ingest(&t.store, "vs_old", "file-3", 1);
            let late = reclaim_expired(&t.store, now, 100).unwrap();
            assert_eq!((late.chunks, late.more), (1, false));
            assert_eq!(seen("vs_old").counts.usage_bytes, 0);
        }
    }
}
