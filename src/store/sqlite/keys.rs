//! API keys in SQLite: the `api_keys` rows and the `keys` generation, bumped in the same
//! transaction as every change.

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::store::keys::StoredKey;

/// Stores a made key and returns its id (inside a write transaction).
pub(crate) fn insert(conn: &Connection, key: &StoredKey) -> rusqlite::Result<i64> {
    let models = key
        .models
        .as_ref()
        .map(|m| serde_json::to_string(m).unwrap_or_else(|_| "[]".to_string()));
    conn.execute(
        "INSERT INTO api_keys (name, prefix, hash, models, rpm, tpm, max_in_flight, \
         expires_ms, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            key.name,
            key.prefix,
            key.hash.as_slice(),
            models,
            key.rpm,
            key.tpm.map(|t| t.min(i64::MAX as u64) as i64),
            key.max_in_flight,
            key.expires_ms,
            key.created_ms,
        ],
    )?;
    let id = conn.last_insert_rowid();
    bump(conn)?;
    Ok(id)
}

/// Revokes a key; false when there is no such key or it was already revoked.
pub(crate) fn revoke(conn: &Connection, id: i64, at_ms: i64) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
        params![id, at_ms],
    )?;
    if n > 0 {
        bump(conn)?;
    }
    Ok(n > 0)
}

/// Every key, revoked ones included, oldest first.
pub(crate) fn all(conn: &Connection) -> rusqlite::Result<Vec<StoredKey>> {
    conn.prepare_cached(
        "SELECT id, name, prefix, hash, models, rpm, tpm, max_in_flight, expires_ms, \
         created_ms, revoked_ms FROM api_keys ORDER BY id",
    )?
    .query_map([], key_from_row)?
    .collect()
}

/// One key by id.
pub(crate) fn get(conn: &Connection, id: i64) -> rusqlite::Result<Option<StoredKey>> {
    conn.prepare_cached(
        "SELECT id, name, prefix, hash, models, rpm, tpm, max_in_flight, expires_ms, \
         created_ms, revoked_ms FROM api_keys WHERE id = ?1",
    )?
    .query_row([id], key_from_row)
    .optional()
}

/// The `keys` generation: it changes whenever a key is made or revoked.
pub(crate) fn generation(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT value FROM generations WHERE name = 'keys'")?
        .query_row([], |r| r.get(0))
}

fn bump(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE generations SET value = value + 1 WHERE name = 'keys'",
        [],
    )
    .map(drop)
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<StoredKey> {
    let hash: Vec<u8> = row.get(3)?;
    let models: Option<String> = row.get(4)?;
    Ok(StoredKey {
        id: row.get(0)?,
        name: row.get(1)?,
        prefix: row.get(2)?,
        hash: hash.try_into().unwrap_or([0; 32]),
        models: models.and_then(|m| serde_json::from_str(&m).ok()),
        rpm: row.get(5)?,
        tpm: row.get::<_, Option<i64>>(6)?.map(|t| t.max(0) as u64),
        max_in_flight: row.get(7)?,
        expires_ms: row.get(8)?,
        created_ms: row.get(9)?,
        revoked_ms: row.get(10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::{hash, make, NewKey, KEY_PREFIX};
    use crate::store::sqlite::migrate;

    #[test]
    fn a_key_is_stored_as_its_hash_and_prefix_and_found_again() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate::migrate(&mut conn).unwrap();
        let made = make(
            NewKey {
                name: "ci".into(),
                models: Some(vec!["fast".into()]),
                rpm: Some(20),
                ..NewKey::default()
            },
            1,
        )
        .unwrap();
        assert!(made.secret.starts_with(KEY_PREFIX));
        assert_eq!(made.secret.len(), KEY_PREFIX.len() + 64);
        assert!(made.secret.starts_with(&made.stored.prefix));
        let before = generation(&conn).unwrap();
        let id = insert(&conn, &made.stored).unwrap();
        assert_eq!(generation(&conn).unwrap(), before + 1);

        let stored = get(&conn, id).unwrap().unwrap();
        assert_eq!(stored.hash, hash(&made.secret));
        assert_eq!(stored.models, Some(vec!["fast".to_string()]));
        assert_eq!(stored.rpm, Some(20));
        // The secret itself is nowhere in the table.
        let dump: String = conn
            .query_row(
                "SELECT name || prefix || hex(hash) || ifnull(models, '') FROM api_keys",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!dump.contains(&made.secret[KEY_PREFIX.len()..]), "{dump}");

        assert!(revoke(&conn, id, 5).unwrap());
        assert!(
            !revoke(&conn, id, 6).unwrap(),
            "revoking twice changes nothing"
        );
        assert_eq!(get(&conn, id).unwrap().unwrap().revoked_ms, Some(5));
        assert_eq!(generation(&conn).unwrap(), before + 2);
    }
}
