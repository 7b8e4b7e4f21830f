//! API keys at rest: a SHA-256 hash and a short display prefix per key, never the key itself.
//! A key is made here (32 random bytes from the operating system, shown once), listed without
//! its secret, and revoked; every change bumps the `keys` generation so a running server
//! reloads its keyring even when the change came from `syncgate keys` in another process.

use sha2::{Digest, Sha256};

use super::postgres::keys as pg;
use super::sqlite::keys as sql;
use super::{Backend, Store, StoreError};

/// What every key starts with, so that one pasted in the wrong place is recognisable.
pub(crate) const KEY_PREFIX: &str = "sk-sg-";
/// Secret characters kept in the display prefix (of 64).
const SHOWN_CHARS: usize = 6;

/// A key as stored: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredKey {
    pub(crate) id: i64,
    pub(crate) name: String,
    /// `sk-sg-` and the first characters of the secret.
    pub(crate) prefix: String,
    pub(crate) hash: [u8; 32],
    /// The models it may call; `None` allows every model.
    pub(crate) models: Option<Vec<String>>,
    pub(crate) rpm: Option<u32>,
    pub(crate) tpm: Option<u64>,
    pub(crate) max_in_flight: Option<u32>,
    pub(crate) expires_ms: Option<i64>,
    pub(crate) created_ms: i64,
    pub(crate) revoked_ms: Option<i64>,
}

/// What a new key is made with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NewKey {
    pub(crate) name: String,
    pub(crate) models: Option<Vec<String>>,
    pub(crate) rpm: Option<u32>,
    pub(crate) tpm: Option<u64>,
    pub(crate) max_in_flight: Option<u32>,
    pub(crate) expires_ms: Option<i64>,
}

/// A freshly made key: the secret, to show once, and what is stored.
pub(crate) struct MadeKey {
    pub(crate) secret: String,
    pub(crate) stored: StoredKey,
}

/// SHA-256 of a presented key: what lookups compare.
pub(crate) fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Makes a secret (`sk-sg-` + 32 random bytes in hex) and what will be stored of it. The row
/// is written by [`insert`]; its id is filled in then.
pub(crate) fn make(new: NewKey, created_ms: i64) -> Result<MadeKey, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = format!("{KEY_PREFIX}{hex}");
    let stored = StoredKey {
        id: 0,
        name: new.name,
        prefix: format!("{KEY_PREFIX}{}", &hex[..SHOWN_CHARS]),
        hash: hash(&secret),
        models: new.models,
        rpm: new.rpm,
        tpm: new.tpm,
        max_in_flight: new.max_in_flight,
        expires_ms: new.expires_ms,
        created_ms,
        revoked_ms: None,
    };
    Ok(MadeKey { secret, stored })
}

/// Stores a made key and returns its id; the keys generation moves with it.
pub(crate) fn insert(store: &Store, key: StoredKey) -> Result<i64, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::insert(conn, &key)),
        Backend::Postgres(db) => db.write(|tx| pg::insert(tx, &key)),
    }
}

/// Revokes a key; false when there is no such key or it was already revoked.
pub(crate) fn revoke(store: &Store, id: i64, at_ms: i64) -> Result<bool, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::revoke(conn, id, at_ms)),
        Backend::Postgres(db) => db.write(|tx| pg::revoke(tx, id, at_ms)),
    }
}

/// Every key, revoked ones included, oldest first.
pub(crate) fn all(store: &Store) -> Result<Vec<StoredKey>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(sql::all),
        Backend::Postgres(db) => db.query(pg::all),
    }
}

/// One key by id.
pub(crate) fn get(store: &Store, id: i64) -> Result<Option<StoredKey>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::get(c, id)),
        Backend::Postgres(db) => db.query(|c| pg::get(c, id)),
    }
}

/// The `keys` generation: it changes whenever a key is made or revoked, by any process.
pub(crate) fn generation(store: &Store) -> Result<i64, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(sql::generation),
        Backend::Postgres(db) => db.query(pg::generation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::stores;

    #[test]
    fn keys_are_stored_found_and_revoked_and_every_change_moves_the_generation() {
        for t in stores("keys") {
            let made = make(
                NewKey {
                    name: "ci".into(),
                    models: Some(vec!["fast".into()]),
                    rpm: Some(20),
                    tpm: Some(1000),
                    ..NewKey::default()
                },
                1,
            )
            .unwrap();
            let before = generation(&t).unwrap();
            let id = insert(&t, made.stored.clone()).unwrap();
            assert_eq!(generation(&t).unwrap(), before + 1);
            let stored = get(&t, id).unwrap().unwrap();
            assert_eq!(stored.hash, hash(&made.secret));
            assert_eq!(stored.models, Some(vec!["fast".to_string()]));
            assert_eq!((stored.rpm, stored.tpm), (Some(20), Some(1000)));
            assert_eq!(all(&t).unwrap().len(), 1);
            assert!(revoke(&t, id, 5).unwrap());
            assert!(
                !revoke(&t, id, 6).unwrap(),
                "revoking twice changes nothing"
            );
            assert_eq!(get(&t, id).unwrap().unwrap().revoked_ms, Some(5));
            assert_eq!(generation(&t).unwrap(), before + 2);
            assert!(get(&t, id + 1000).unwrap().is_none());
        }
    }

    #[test]
    fn two_keys_never_share_a_secret() {
        let a = make(NewKey::default(), 1).unwrap();
        let b = make(NewKey::default(), 1).unwrap();
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.stored.hash, b.stored.hash);
    }
}
