//! Files uploaded through `/v1/files` (issue 16): what a file is, its bytes, and who may see
//! it. An upload is one acknowledged write of the file and its bytes together; lists and
//! lookups never read the bytes. Deleting a file detaches it from every vector store, its
//! chunks with it (the schema's cascades).

use super::postgres::files as pg;
use super::sqlite::files as sql;
use super::{page, Backend, Page, Store, StoreError};

/// Whose files and vector stores a call may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The admin key: every owner's.
    All,
    /// One key's (`None`: what was made without a key, in development mode, where there is
    /// one owner).
    Key(Option<i64>),
}

impl Owner {
    /// Whether every owner's rows are visible, and else the one owner's key: the two
    /// parameters of each backend's ownership test.
    pub(crate) fn sql_params(self) -> (bool, Option<i64>) {
        match self {
            Owner::All => (true, None),
            Owner::Key(key) => (false, key),
        }
    }

    /// The key new rows are made for (the admin key's rows are nobody's key).
    pub(crate) fn key_id(self) -> Option<i64> {
        match self {
            Owner::All => None,
            Owner::Key(key) => key,
        }
    }
}

/// Which end of a list comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    Desc,
}

impl Order {
    /// How a page in this order reads its rows by `seq`: the comparison with the cursor's
    /// `seq`, the `ORDER BY` direction, and the cursor of a first page.
    pub(crate) fn sql(self) -> (&'static str, &'static str, i64) {
        match self {
            Order::Desc => ("<", "DESC", i64::MAX),
            Order::Asc => (">", "ASC", i64::MIN),
        }
    }
}

/// A stored file, without its bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct File {
    pub(crate) id: String,
    pub(crate) key_id: Option<i64>,
    pub(crate) filename: String,
    pub(crate) purpose: String,
    pub(crate) bytes: i64,
    /// Unix seconds.
    pub(crate) created_at: i64,
    pub(crate) expires_at: Option<i64>,
}

/// What a list asks for: an owner's files, maybe of one purpose, `limit` of them after the
/// file with id `after`, in `order`.
#[derive(Debug, Clone)]
pub(crate) struct Listing {
    pub(crate) owner: Owner,
    pub(crate) purpose: Option<String>,
    pub(crate) limit: u32,
    pub(crate) after: Option<String>,
    pub(crate) order: Order,
}

/// Stores a file and its bytes in one acknowledged write.
pub(crate) fn insert(store: &Store, file: File, content: Vec<u8>) -> Result<(), StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::insert(conn, &file, &content)),
        Backend::Postgres(db) => db.write(|tx| pg::insert(tx, &file, &content)),
    }
}

/// The file with this id, if `owner` may see it.
pub(crate) fn get(store: &Store, owner: Owner, id: &str) -> Result<Option<File>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::get(c, owner, id)),
        Backend::Postgres(db) => db.query(|c| pg::get(c, owner, id)),
    }
}

/// The bytes of the file with this id, if `owner` may see it.
pub(crate) fn content(
    store: &Store,
    owner: Owner,
    id: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::content(c, owner, id)),
        Backend::Postgres(db) => db.query(|c| pg::content(c, owner, id)),
    }
}

/// A page of files. `None` when `after` names no file the owner may see.
pub(crate) fn list(store: &Store, listing: &Listing) -> Result<Option<Page<File>>, StoreError> {
    let found = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::list(c, listing)),
        Backend::Postgres(db) => db.query(|c| pg::list(c, listing)),
    }?;
    Ok(found.map(|items| page(items, listing.limit)))
}

/// Deletes the file if `owner` may see it, detaching it from every vector store. False when
/// there was none.
pub(crate) fn delete(store: &Store, owner: Owner, id: &str) -> Result<bool, StoreError> {
    let id = id.to_string();
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::delete(conn, owner, &id)),
        Backend::Postgres(db) => db.write(|tx| pg::delete(tx, owner, &id)),
    }
}

/// Deletes the files whose `expires_at` is at or before `now` (unix seconds); how many.
pub(crate) fn delete_expired(store: &Store, now: i64) -> Result<u64, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::delete_expired(conn, now)),
        Backend::Postgres(db) => db.write(|tx| pg::delete_expired(tx, now)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::stores;

    fn file(id: &str, key: Option<i64>, purpose: &str) -> File {
        File {
            id: id.to_string(),
            key_id: key,
            filename: format!("{id}.txt"),
            purpose: purpose.to_string(),
            bytes: 5,
            created_at: 1_700_000_000,
            expires_at: None,
        }
    }

    fn listing(owner: Owner) -> Listing {
        Listing {
            owner,
            purpose: None,
            limit: 100,
            after: None,
            order: Order::Desc,
        }
    }

    fn ids(page: &Page<File>) -> Vec<&str> {
        page.items.iter().map(|f| f.id.as_str()).collect()
    }

    #[test]
    fn a_file_and_its_bytes_are_kept_and_seen_only_by_their_owner_and_the_admin() {
        for t in stores("files_owner") {
            insert(
                &t.store,
                file("file-a", Some(1), "assistants"),
                b"alpha".to_vec(),
            )
            .unwrap();
            insert(
                &t.store,
                file("file-b", Some(2), "assistants"),
                b"beta\0\xff".to_vec(),
            )
            .unwrap();
            insert(
                &t.store,
                file("file-c", None, "assistants"),
                b"gamma".to_vec(),
            )
            .unwrap();

            let one = Owner::Key(Some(1));
            assert_eq!(
                get(&t.store, one, "file-a").unwrap(),
                Some(file("file-a", Some(1), "assistants"))
            );
            assert_eq!(get(&t.store, one, "file-b").unwrap(), None);
            assert_eq!(
                get(&t.store, Owner::Key(None), "file-c")
                    .unwrap()
                    .map(|f| f.id),
                Some("file-c".into())
            );
            assert_eq!(get(&t.store, Owner::Key(None), "file-a").unwrap(), None);
            assert_eq!(
                content(&t.store, Owner::Key(Some(2)), "file-b").unwrap(),
                Some(b"beta\0\xff".to_vec())
            );
            assert_eq!(content(&t.store, one, "file-b").unwrap(), None);
            assert_eq!(
                content(&t.store, Owner::All, "file-b")
                    .unwrap()
                    .map(|c| c.len()),
                Some(6)
            );

            let all = list(&t.store, &listing(Owner::All)).unwrap().unwrap();
            assert_eq!(ids(&all), ["file-c", "file-b", "file-a"]);
            let mine = list(&t.store, &listing(one)).unwrap().unwrap();
            assert_eq!(ids(&mine), ["file-a"]);

            assert!(
                !delete(&t.store, one, "file-b").unwrap(),
                "not the key's file"
            );
            assert!(delete(&t.store, Owner::Key(Some(2)), "file-b").unwrap());
            assert_eq!(content(&t.store, Owner::All, "file-b").unwrap(), None);
            assert!(!delete(&t.store, Owner::All, "file-b").unwrap());
        }
    }

    #[test]
    fn lists_page_after_a_cursor_in_either_order_and_filter_by_purpose() {
        for t in stores("files_pages") {
            for i in 0..5 {
                let purpose = if i % 2 == 0 { "assistants" } else { "batch" };
                insert(
                    &t.store,
                    file(&format!("file-{i}"), Some(1), purpose),
                    vec![b'x'; 3],
                )
                .unwrap();
            }
            let owner = Owner::Key(Some(1));
            let first = list(
                &t.store,
                &Listing {
                    limit: 2,
                    ..listing(owner)
                },
            )
            .unwrap()
            .unwrap();
            assert_eq!(
                (ids(&first), first.has_more),
                (vec!["file-4", "file-3"], true)
            );
            let next = Listing {
                limit: 2,
                after: Some("file-3".into()),
                ..listing(owner)
            };
            let next = list(&t.store, &next).unwrap().unwrap();
            assert_eq!(
                (ids(&next), next.has_more),
                (vec!["file-2", "file-1"], true)
            );
            let asc = Listing {
                order: Order::Asc,
                after: Some("file-2".into()),
                ..listing(owner)
            };
            let asc = list(&t.store, &asc).unwrap().unwrap();
            assert_eq!((ids(&asc), asc.has_more), (vec!["file-3", "file-4"], false));
            let batch = Listing {
                purpose: Some("batch".into()),
                ..listing(owner)
            };
            assert_eq!(
                ids(&list(&t.store, &batch).unwrap().unwrap()),
                ["file-3", "file-1"]
            );
            let stranger = Listing {
                after: Some("file-3".into()),
                ..listing(Owner::Key(Some(9)))
            };
            assert!(
                list(&t.store, &stranger).unwrap().is_none(),
                "a cursor the owner cannot see"
            );
        }
    }

    #[test]
    fn expired_files_are_deleted_and_others_kept() {
        for t in stores("files_expiry") {
            let mut old = file("file-old", None, "assistants");
            old.expires_at = Some(100);
            let mut later = file("file-later", None, "assistants");
            later.expires_at = Some(300);
            insert(&t.store, old, b"x".to_vec()).unwrap();
            insert(&t.store, later, b"y".to_vec()).unwrap();
            insert(
                &t.store,
                file("file-kept", None, "assistants"),
                b"z".to_vec(),
            )
            .unwrap();
            assert_eq!(delete_expired(&t.store, 200).unwrap(), 1);
            let left = list(&t.store, &listing(Owner::All)).unwrap().unwrap();
            assert_eq!(ids(&left), ["file-kept", "file-later"]);
        }
    }
}
