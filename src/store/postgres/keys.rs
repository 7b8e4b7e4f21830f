//! API keys on PostgreSQL: the `api_keys` rows and the `keys` generation, bumped in the same
//! transaction as every change, so every instance's keyring reloads after it.

use postgres::{GenericClient, Row};

use super::{Session, Tx};
use crate::store::keys::StoredKey;

type Result<T> = std::result::Result<T, postgres::Error>;

const COLUMNS: &str = "id, name, prefix, hash, models, rpm, tpm, max_in_flight, expires_ms, \
                       created_ms, revoked_ms";

pub(crate) fn insert(tx: &mut Tx<'_, '_>, key: &StoredKey) -> Result<i64> {
    let models = key
        .models
        .as_ref()
        .map(|m| serde_json::to_string(m).unwrap_or_else(|_| "[]".to_string()));
    let id: i64 = tx
        .query_one(
            "INSERT INTO api_keys (name, prefix, hash, models, rpm, tpm, max_in_flight, \
             expires_ms, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            &[
                &key.name,
                &key.prefix,
                &key.hash.as_slice(),
                &models,
                &key.rpm.map(i64::from),
                &key.tpm.map(|t| t.min(i64::MAX as u64) as i64),
                &key.max_in_flight.map(i64::from),
                &key.expires_ms,
                &key.created_ms,
            ],
        )?
        .get(0);
    bump(tx)?;
    Ok(id)
}

pub(crate) fn revoke(tx: &mut Tx<'_, '_>, id: i64, at_ms: i64) -> Result<bool> {
    let n = tx.execute(
        "UPDATE api_keys SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL",
        &[&id, &at_ms],
    )?;
    if n > 0 {
        bump(tx)?;
    }
    Ok(n > 0)
}

pub(crate) fn all(c: &mut Session<'_, impl GenericClient>) -> Result<Vec<StoredKey>> {
    Ok(
        c.query(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY id"), &[])?
            .iter()
            .map(key_from_row)
            .collect(),
    )
}

pub(crate) fn get(c: &mut Session<'_, impl GenericClient>, id: i64) -> Result<Option<StoredKey>> {
    Ok(c.query_opt(
        &format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"),
        &[&id],
    )?
    .map(|r| key_from_row(&r)))
}

pub(crate) fn generation(c: &mut Session<'_, impl GenericClient>) -> Result<i64> {
    Ok(
        c.query_one("SELECT value FROM generations WHERE name = 'keys'", &[])?
            .get(0),
    )
}

fn bump(tx: &mut Tx<'_, '_>) -> Result<()> {
    tx.execute(
        "UPDATE generations SET value = value + 1 WHERE name = 'keys'",
        &[],
    )
    .map(drop)
}

fn key_from_row(row: &Row) -> StoredKey {
    let hash: Vec<u8> = row.get(3);
    let models: Option<String> = row.get(4);
    let small = |n: Option<i64>| n.map(|n| n.clamp(0, i64::from(u32::MAX)) as u32);
    StoredKey {
        id: row.get(0),
        name: row.get(1),
        prefix: row.get(2),
        hash: hash.try_into().unwrap_or([0; 32]),
        models: models.and_then(|m| serde_json::from_str(&m).ok()),
        rpm: small(row.get(5)),
        tpm: row.get::<_, Option<i64>>(6).map(|t| t.max(0) as u64),
        max_in_flight: small(row.get(7)),
        expires_ms: row.get(8),
        created_ms: row.get(9),
        revoked_ms: row.get(10),
    }
}
