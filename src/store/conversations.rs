//! Conversations kept server-side and their messages, in the order they were stored. Reads
//! take a pooled connection; every write goes through the writer and returns once committed,
//! so whatever a client was told is stored is on disk. A repeated request with the same
//! idempotency key finds what the first one stored instead of storing it twice.

use super::postgres::conversations as pg;
use super::sqlite::conversations as sql;
pub(crate) use super::Page;
use super::{page, Backend, Store, StoreError};
use crate::tokens::Usage;

/// One conversation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Conversation {
    pub(crate) id: String,
    pub(crate) title: Option<String>,
    /// The model its turns use unless a turn names another.
    pub(crate) model: Option<String>,
    /// The system prompt sent first with every turn.
    pub(crate) system: Option<String>,
    pub(crate) created_ms: i64,
}

/// One stored message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub(crate) id: String,
    pub(crate) conversation_id: String,
    /// `user` or `assistant`.
    pub(crate) role: String,
    pub(crate) content: String,
    /// The model that wrote it (assistant replies only).
    pub(crate) model: Option<String>,
    pub(crate) created_ms: i64,
    /// The reply was cut short (a stream that ended early); `content` is what arrived.
    pub(crate) incomplete: bool,
    /// Tokens the provider reported for the turn, when it did.
    pub(crate) usage: Option<Usage>,
}

/// One conversation turn: the user's message and the reply, stored together or not at all.
pub(crate) struct Turn {
    pub(crate) user: Message,
    pub(crate) reply: Message,
    /// The request's `Idempotency-Key`, kept on the reply so a repeat finds it.
    pub(crate) idempotency_key: Option<String>,
}

/// Stores a new conversation and returns it. With `idempotency_key`, a conversation already
/// created with that key is returned instead, including when two requests race: the loser's
/// insert breaks the key's uniqueness and it reads the winner's.
pub(crate) fn create(
    store: &Store,
    conversation: Conversation,
    idempotency_key: Option<String>,
) -> Result<Conversation, StoreError> {
    if let Some(key) = &idempotency_key {
        if let Some(existing) = by_key(store, key)? {
            return Ok(existing);
        }
    }
    let row = conversation.clone();
    let key = idempotency_key.clone();
    let inserted = match store.backend() {
        Backend::Sqlite(db) => db
            .writer()
            .call(move |conn| sql::insert(conn, &row, key.as_deref())),
        Backend::Postgres(db) => db.write(|tx| pg::insert(tx, &row, key.as_deref())),
    };
    match (inserted, idempotency_key) {
        (Ok(()), _) => Ok(conversation),
        (Err(e), Some(key)) if e.is_unique_violation() => by_key(store, &key)?.ok_or(e),
        (Err(e), _) => Err(e),
    }
}

/// The conversation with this id, if there is one.
pub(crate) fn get(store: &Store, id: &str) -> Result<Option<Conversation>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::get(c, id)),
        Backend::Postgres(db) => db.query(|c| pg::get(c, id)),
    }
}

fn by_key(store: &Store, key: &str) -> Result<Option<Conversation>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::by_key(c, key)),
        Backend::Postgres(db) => db.query(|c| pg::by_key(c, key)),
    }
}

/// Up to `limit` conversations, newest first, starting after the one with id `before` when
/// given. `None` when `before` names no conversation.
pub(crate) fn list(
    store: &Store,
    limit: u32,
    before: Option<&str>,
) -> Result<Option<Page<Conversation>>, StoreError> {
    let found = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::list(c, limit + 1, before)),
        Backend::Postgres(db) => db.query(|c| pg::list(c, limit + 1, before)),
    }?;
    Ok(found.map(|items| page(items, limit)))
}

/// Deletes a conversation and, by cascade, its messages. False when there was none.
pub(crate) fn delete(store: &Store, id: &str) -> Result<bool, StoreError> {
    let id = id.to_string();
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::delete(conn, &id)),
        Backend::Postgres(db) => db.write(|tx| pg::delete(tx, &id)),
    }
}

/// The newest `max` messages of a conversation, oldest first: what a new turn sends along.
pub(crate) fn history(
    store: &Store,
    conversation_id: &str,
    max: usize,
) -> Result<Vec<Message>, StoreError> {
    let mut newest = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::newest_messages(c, conversation_id, max)),
        Backend::Postgres(db) => db.query(|c| pg::newest_messages(c, conversation_id, max)),
    }?;
    newest.reverse();
    Ok(newest)
}

/// Up to `limit` messages of a conversation, oldest first, starting after the message with id
/// `after` when given. `None` when `after` names no message of this conversation.
pub(crate) fn messages(
    store: &Store,
    conversation_id: &str,
    limit: u32,
    after: Option<&str>,
) -> Result<Option<Page<Message>>, StoreError> {
    let found = match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::messages(c, conversation_id, limit + 1, after)),
        Backend::Postgres(db) => db.query(|c| pg::messages(c, conversation_id, limit + 1, after)),
    }?;
    Ok(found.map(|items| page(items, limit)))
}

/// The reply a request with this idempotency key already got in this conversation, if any.
pub(crate) fn reply_for_key(
    store: &Store,
    conversation_id: &str,
    key: &str,
) -> Result<Option<Message>, StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.query(|c| sql::reply_for_key(c, conversation_id, key)),
        Backend::Postgres(db) => db.query(|c| pg::reply_for_key(c, conversation_id, key)),
    }
}

/// Stores a turn, both messages in one acknowledged write. Fails with a unique violation when
/// the reply's idempotency key is already taken in the conversation, and with a foreign key
/// violation when the conversation is gone.
pub(crate) fn add_turn(store: &Store, turn: Turn) -> Result<(), StoreError> {
    match store.backend() {
        Backend::Sqlite(db) => db.writer().call(move |conn| sql::insert_turn(conn, &turn)),
        Backend::Postgres(db) => db.write(|tx| pg::insert_turn(tx, &turn)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::stores;

    fn conversation(id: &str) -> Conversation {
        Conversation {
            id: id.to_string(),
            title: None,
            model: Some("m".into()),
            system: None,
            created_ms: 1,
        }
    }

    fn message(id: &str, conversation: &str, role: &str) -> Message {
        Message {
            id: id.to_string(),
            conversation_id: conversation.to_string(),
            role: role.to_string(),
            content: format!("text of {id}"),
            model: None,
            created_ms: 2,
            incomplete: false,
            usage: None,
        }
    }

    fn turn(conversation: &str, n: usize, key: Option<&str>) -> Turn {
        Turn {
            user: message(&format!("u{n}"), conversation, "user"),
            reply: message(&format!("a{n}"), conversation, "assistant"),
            idempotency_key: key.map(str::to_string),
        }
    }

    #[test]
    fn a_key_creates_one_conversation_and_repeats_return_it() {
        for t in stores("key") {
            let first = create(&t.store, conversation("c1"), Some("k".into())).unwrap();
            let again = create(&t.store, conversation("c2"), Some("k".into())).unwrap();
            assert_eq!(first, again);
            assert_eq!(get(&t.store, "c2").unwrap(), None);
            // Racers with a new key all get the one that was stored.
            let store = &t.store;
            let racers: Vec<Conversation> = std::thread::scope(|s| {
                let handles = ["r1", "r2", "r3"].map(|id| {
                    s.spawn(move || create(store, conversation(id), Some("race".into())))
                });
                handles.map(|h| h.join().unwrap().unwrap()).to_vec()
            });
            assert!(racers.iter().all(|c| *c == racers[0]), "{racers:?}");
            let all = list(&t.store, 100, None).unwrap().unwrap();
            assert_eq!(all.items.len(), 2);
        }
    }

    #[test]
    fn lists_page_newest_first_and_messages_oldest_first() {
        for t in stores("pages") {
            for i in 0..5 {
                create(&t.store, conversation(&format!("c{i}")), None).unwrap();
            }
            let first = list(&t.store, 2, None).unwrap().unwrap();
            let ids: Vec<_> = first.items.iter().map(|c| c.id.as_str()).collect();
            assert_eq!((ids, first.has_more), (vec!["c4", "c3"], true));
            let last = list(&t.store, 2, Some("c1")).unwrap().unwrap();
            let ids: Vec<_> = last.items.iter().map(|c| c.id.as_str()).collect();
            assert_eq!((ids, last.has_more), (vec!["c0"], false));
            assert!(list(&t.store, 2, Some("nope")).unwrap().is_none());

            for n in 0..3 {
                add_turn(&t.store, turn("c0", n, None)).unwrap();
            }
            let page = messages(&t.store, "c0", 4, None).unwrap().unwrap();
            let ids: Vec<_> = page.items.iter().map(|m| m.id.as_str()).collect();
            assert_eq!((ids, page.has_more), (vec!["u0", "a0", "u1", "a1"], true));
            let rest = messages(&t.store, "c0", 4, Some("a1")).unwrap().unwrap();
            assert_eq!(rest.items.len(), 2);
            assert!(!rest.has_more);
            assert!(messages(&t.store, "c1", 4, Some("a1")).unwrap().is_none());
            let newest: Vec<_> = history(&t.store, "c0", 3)
                .unwrap()
                .into_iter()
                .map(|m| m.id)
                .collect();
            assert_eq!(newest, ["a1", "u2", "a2"]);
        }
    }

    #[test]
    fn a_turn_is_stored_whole_or_not_at_all() {
        for t in stores("turns") {
            create(&t.store, conversation("c"), None).unwrap();
            add_turn(&t.store, turn("c", 0, Some("k"))).unwrap();
            let repeat = add_turn(&t.store, turn("c", 1, Some("k"))).unwrap_err();
            assert!(repeat.is_unique_violation(), "{repeat}");
            assert_eq!(
                reply_for_key(&t.store, "c", "k").unwrap().map(|m| m.id),
                Some("a0".to_string())
            );
            // The same key in another conversation is another turn.
            create(&t.store, conversation("d"), None).unwrap();
            add_turn(&t.store, turn("d", 1, Some("k"))).unwrap();
            let orphan = add_turn(&t.store, turn("gone", 2, None)).unwrap_err();
            assert!(!orphan.is_unique_violation(), "{orphan}");
            let page = messages(&t.store, "c", 100, None).unwrap().unwrap();
            assert_eq!(page.items.len(), 2, "the failed repeat left nothing behind");
        }
    }

    #[test]
    fn deleting_a_conversation_takes_its_messages() {
        for t in stores("delete") {
            create(&t.store, conversation("c"), None).unwrap();
            add_turn(&t.store, turn("c", 0, None)).unwrap();
            assert!(delete(&t.store, "c").unwrap());
            assert!(!delete(&t.store, "c").unwrap());
            let left = messages(&t.store, "c", 100, None).unwrap().unwrap();
            assert!(left.items.is_empty(), "{:?}", left.items);
        }
    }
}
