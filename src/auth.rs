//! Who may call, decided on the connection thread before a request takes a queue slot or
//! reaches a provider: API keys for `/v1` and `/api`, the admin key for `/admin`, and the
//! development mode (no keys, loopback only) in which requests need no key at all.
//!
//! Keys live in memory (the keyring), loaded from the database at start, after every change
//! made through `/admin`, and whenever another process (`syncgate keys`) bumped the keys'
//! generation in the file. A presented key is hashed (SHA-256) and looked up by hash; the
//! final comparison of the full hash, and the admin key's, take the same time whatever the
//! bytes. Secrets are never logged, stored or echoed: only the hash and a short prefix exist.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use crate::http::Request;
use crate::limits::{Limiter, Limits, Permit, Refusal, Refused};
use crate::store::keys::{self, StoredKey};
use crate::store::{Store, StoreError};

/// A key the keyring knows; revoked ones are kept to be refused as such.
#[derive(Debug)]
pub(crate) struct ApiKey {
    pub(crate) id: i64,
    hash: [u8; 32],
    models: Option<Vec<String>>,
    limits: Limits,
    expires_ms: Option<i64>,
    revoked: bool,
}

/// Who a request came from, once admitted. Dropping it frees the key's in-flight slot.
pub(crate) enum Caller {
    /// Development mode, or an operator's `--allow-open`: no key needed.
    Open,
    /// A key, holding its permit for this request.
    Key { key: Arc<ApiKey>, permit: Permit },
    /// The admin key, on `/admin`.
    Admin,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Open => f.write_str("Open"),
            Caller::Key { key, .. } => write!(f, "Key({})", key.id),
            Caller::Admin => f.write_str("Admin"),
        }
    }
}

impl Caller {
    /// The key's id, for the request log.
    pub(crate) fn key_id(&self) -> Option<i64> {
        match self {
            Caller::Key { key, .. } => Some(key.id),
            Caller::Open | Caller::Admin => None,
        }
    }
}

/// Why a request was turned away before it was queued.
#[derive(Debug)]
pub(crate) enum Denied {
    /// No `Authorization: Bearer …` header.
    Missing,
    /// A key no one made.
    Unknown,
    Revoked,
    Expired,
    /// The key may not call this model.
    ModelNotAllowed {
        model: String,
    },
    /// `/admin` without the admin key (a user key included).
    NotAdmin,
    /// `/admin` while `SYNCGATE_ADMIN_KEY` is not set.
    AdminDisabled,
    /// Over one of the key's limits.
    Limited(Refusal),
    /// The shared limits could not be checked (`[limits] on_store_error = "closed"`).
    StoreUnavailable,
}

impl Denied {
    /// The `reason` label of `syncgate_auth_failures_total`; `None` for rate limits.
    pub(crate) fn reason(&self) -> Option<&'static str> {
        Some(match self {
            Denied::Missing => "missing",
            Denied::Unknown => "unknown",
            Denied::Revoked => "revoked",
            Denied::Expired => "expired",
            Denied::ModelNotAllowed { .. } => "model_not_allowed",
            Denied::NotAdmin | Denied::AdminDisabled => "not_admin",
            Denied::Limited(_) | Denied::StoreUnavailable => return None,
        })
    }
}

/// Every `reason` label, exported from start at 0.
pub(crate) const DENIAL_REASONS: &[&str] = &[
    "missing",
    "unknown",
    "revoked",
    "expired",
    "model_not_allowed",
    "not_admin",
];

/// The keyring, the admin key, and the policy for requests without a key.
pub(crate) struct Auth {
    keyring: RwLock<Keyring>,
    /// SHA-256 of `SYNCGATE_ADMIN_KEY`, when set.
    admin: Option<[u8; 32]>,
    /// Requests need no key while there are no keys: the listen address is loopback
    /// (development mode) or the operator passed `--allow-open`.
    open_without_keys: bool,
    /// The keys' generation the keyring was loaded at.
    generation: AtomicI64,
    pub(crate) limiter: Limiter,
}

#[derive(Default)]
struct Keyring {
    /// Keys by the first 8 bytes of their hash; the full hash is compared in constant time.
    by_hash: HashMap<[u8; 8], Vec<Arc<ApiKey>>>,
    /// Keys not revoked (expired ones included).
    active: usize,
    /// Every key ever made, revoked ones included.
    total: usize,
}

impl Auth {
    /// `limiter` keeps the keys' limits: in this process, or shared through the database.
    pub(crate) fn new(admin_key: Option<&str>, open_without_keys: bool, limiter: Limiter) -> Auth {
        Auth {
            keyring: RwLock::new(Keyring::default()),
            admin: admin_key.map(keys::hash),
            open_without_keys,
            generation: AtomicI64::new(-1),
            limiter,
        }
    }

    /// Replaces the keyring with `stored` as of `generation`; revoked keys lose their limiter
    /// state.
    pub(crate) fn load(&self, stored: Vec<StoredKey>, generation: i64) {
        let mut ring = Keyring::default();
        for k in stored {
            if k.revoked_ms.is_some() {
                self.limiter.forget(k.id);
            } else {
                ring.active += 1;
            }
            let key = Arc::new(ApiKey {
                id: k.id,
                hash: k.hash,
                models: k.models,
                limits: Limits {
                    rpm: k.rpm,
                    tpm: k.tpm,
                    max_in_flight: k.max_in_flight,
                },
                expires_ms: k.expires_ms,
                revoked: k.revoked_ms.is_some(),
            });
            ring.total += 1;
            ring.by_hash.entry(bucket(&key.hash)).or_default().push(key);
        }
        *self.keyring.write().unwrap_or_else(PoisonError::into_inner) = ring;
        self.generation.store(generation, Ordering::SeqCst);
    }

    /// Reloads the keyring if the keys changed in the file since it was loaded (by this
    /// process's `/admin` or by `syncgate keys`). Returns whether it reloaded.
    pub(crate) fn refresh(&self, store: &Store) -> Result<bool, StoreError> {
        let generation = keys::generation(store)?;
        if generation == self.generation() {
            return Ok(false);
        }
        // A change landing between the two reads leaves the keyring newer than its
        // generation: the next refresh loads it again, never the other way round.
        let stored = keys::all(store)?;
        self.load(stored, generation);
        Ok(true)
    }

    /// The generation the keyring was last loaded at.
    pub(crate) fn generation(&self) -> i64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether requests need no key: no key was ever made (revoking the last one does not
    /// reopen a server) and the policy allows it.
    pub(crate) fn is_open(&self) -> bool {
        self.open_without_keys
            && self
                .keyring
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .total
                == 0
    }

    pub(crate) fn active_keys(&self) -> usize {
        self.keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .active
    }

    /// Decides a `/v1` or `/api` request: open mode, or a valid key allowed this model and
    /// within its limits (the limits are charged here, atomically).
    pub(crate) fn admit(&self, request: &Request, now_ms: i64) -> Result<Caller, Denied> {
        if self.is_open() {
            return Ok(Caller::Open);
        }
        let key = self.key_of(request)?;
        if key.revoked {
            return Err(Denied::Revoked);
        }
        if key.expires_ms.is_some_and(|at| at <= now_ms) {
            return Err(Denied::Expired);
        }
        let peek = Peek::of(&request.body);
        if let (Some(allowed), Some(model)) = (&key.models, &peek.model) {
            if !allowed.iter().any(|m| m == model) {
                return Err(Denied::ModelNotAllowed {
                    model: model.clone(),
                });
            }
        }
        // With shared limits the database decides, and checks again that the key is neither
        // revoked nor expired: another instance may have revoked it a moment ago.
        let permit = self
            .limiter
            .admit_key(key.id, &key.limits, peek.tokens(), Instant::now())
            .map_err(|refused| match refused {
                Refused::Limit(refusal) => Denied::Limited(refusal),
                Refused::Revoked => Denied::Revoked,
                Refused::Expired => Denied::Expired,
                Refused::Unknown => Denied::Unknown,
                Refused::StoreUnavailable => Denied::StoreUnavailable,
            })?;
        Ok(Caller::Key { key, permit })
    }

    /// Decides a read of the server's own status (`/api/status`): open mode, the admin key, or
    /// a key that is neither revoked nor expired. Its limits are not charged: a console polling
    /// once a second must not eat the key's requests per minute.
    pub(crate) fn verify(&self, request: &Request, now_ms: i64) -> Result<(), Denied> {
        if self.is_open() {
            return Ok(());
        }
        if let (Some(admin), Some(presented)) = (&self.admin, bearer(request)) {
            if same(&keys::hash(presented), admin) {
                return Ok(());
            }
        }
        let key = self.key_of(request)?;
        if key.revoked {
            return Err(Denied::Revoked);
        }
        if key.expires_ms.is_some_and(|at| at <= now_ms) {
            return Err(Denied::Expired);
        }
        Ok(())
    }

    /// Whether `key` may call `model` (for models known only after admission: a
    /// conversation's own model).
    pub(crate) fn allows_model(caller: &Caller, model: &str) -> bool {
        match caller {
            Caller::Key { key, .. } => key
                .models
                .as_ref()
                .is_none_or(|allowed| allowed.iter().any(|m| m == model)),
            Caller::Open | Caller::Admin => true,
        }
    }

    /// Whether the request carries the admin key.
    pub(crate) fn is_admin(&self, request: &Request) -> bool {
        matches!((&self.admin, bearer(request)), (Some(admin), Some(presented)) if same(&keys::hash(presented), admin))
    }

    /// Decides an `/admin` request: only the admin key passes.
    pub(crate) fn admit_admin(&self, request: &Request) -> Result<Caller, Denied> {
        let Some(admin) = &self.admin else {
            return Err(Denied::AdminDisabled);
        };
        match bearer(request) {
            Some(presented) if same(&keys::hash(presented), admin) => Ok(Caller::Admin),
            Some(_) => Err(Denied::NotAdmin),
            None => Err(Denied::Missing),
        }
    }

    fn key_of(&self, request: &Request) -> Result<Arc<ApiKey>, Denied> {
        let presented = bearer(request).ok_or(Denied::Missing)?;
        let hash = keys::hash(presented);
        let ring = self.keyring.read().unwrap_or_else(PoisonError::into_inner);
        ring.by_hash
            .get(&bucket(&hash))
            .and_then(|keys| keys.iter().find(|k| same(&k.hash, &hash)))
            .cloned()
            .ok_or(Denied::Unknown)
    }
}

/// The token of `Authorization: Bearer <token>`, if the header is there and well-formed.
fn bearer(request: &Request) -> Option<&str> {
    let value = request.header("authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn bucket(hash: &[u8; 32]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    b
}

/// Compares two hashes in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// What admission reads of a body, without building it: the model and what the call may cost
/// in tokens. A body that is not JSON reads as nothing; the handler answers it with a 400.
/// Every field is read as any JSON value, so that a field of an unexpected type cannot make
/// the whole read fail and the model check with it (the handler answers such a body, and
/// checks the model again before any provider call).
#[derive(Debug, Default, Deserialize)]
struct Peek {
    #[serde(default, deserialize_with = "lenient")]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Value>,
    /// A conversation turn's new message.
    #[serde(default, deserialize_with = "lenient")]
    content: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    max_completion_tokens: Option<u64>,
}

/// A field read as `T` when it has that type, as absent otherwise.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

impl Peek {
    fn of(body: &[u8]) -> Peek {
        serde_json::from_slice(body).unwrap_or_default()
    }

    /// The admission estimate: the prompt's characters ÷ 4 (the usual rule of thumb for
    /// English text) plus the completion tokens asked for at most. The provider's reported
    /// usage replaces it once the call ends.
    fn tokens(&self) -> u64 {
        let mut chars = self.content.as_ref().map_or(0, String::len);
        let messages = self.messages.as_ref().and_then(Value::as_array);
        for message in messages.into_iter().flatten() {
            chars += match message.get("content") {
                Some(Value::String(s)) => s.len(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .map(str::len)
                    .sum(),
                _ => 0,
            };
        }
        let completion = self.max_completion_tokens.or(self.max_tokens).unwrap_or(0);
        (chars as u64).div_ceil(4) + completion
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_counts_prompt_characters_and_the_completion_asked_for() {
        let p = Peek::of(
            br#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"},
            {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url"}]}],
            "max_tokens":10}"#,
        );
        assert_eq!(p.model.as_deref(), Some("m"));
        assert_eq!(p.tokens(), 3 + 10);
        assert_eq!(Peek::of(br#"{"content":"abcde"}"#).tokens(), 2);
        assert_eq!(Peek::of(b"not json").tokens(), 0);
    }

    #[test]
    fn a_field_of_an_unexpected_type_does_not_hide_the_model() {
        let p = Peek::of(br#"{"model":"m","content":5,"messages":"x","max_tokens":"many"}"#);
        assert_eq!(p.model.as_deref(), Some("m"));
        assert_eq!(p.tokens(), 0);
    }

    #[test]
    fn hashes_compare_equal_only_when_every_byte_is() {
        let a = keys::hash("sk-sg-a");
        let mut b = a;
        assert!(same(&a, &b));
        b[31] ^= 1;
        assert!(!same(&a, &b));
    }
}
