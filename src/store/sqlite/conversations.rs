//! Conversations and their messages in SQLite. Pages follow `seq`, the order rows were stored;
//! idempotency keys are unique columns, so a racing twin's insert fails and it reads the winner.

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::store::conversations::{Conversation, Message, Turn};
use crate::tokens::Usage;

const CONVERSATION_COLUMNS: &str = "id, title, model, system, created_ms";
const MESSAGE_COLUMNS: &str = "id, conversation_id, role, content, model, created_ms, incomplete, \
     prompt_tokens, completion_tokens";

pub(crate) fn insert(
    conn: &Connection,
    conversation: &Conversation,
    idempotency_key: Option<&str>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO conversations (id, title, model, system, created_ms, idempotency_key) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        conversation.id,
        conversation.title,
        conversation.model,
        conversation.system,
        conversation.created_ms,
        idempotency_key
    ])
    .map(drop)
}

pub(crate) fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<Conversation>> {
    conn.prepare_cached(&format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?1"
    ))?
    .query_row([id], conversation_from_row)
    .optional()
}

pub(crate) fn by_key(conn: &Connection, key: &str) -> rusqlite::Result<Option<Conversation>> {
    conn.prepare_cached(&format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE idempotency_key = ?1"
    ))?
    .query_row([key], conversation_from_row)
    .optional()
}

/// Up to `limit` conversations, newest first, after the one with id `before`; `None` when
/// `before` names no conversation.
pub(crate) fn list(
    conn: &Connection,
    limit: u32,
    before: Option<&str>,
) -> rusqlite::Result<Option<Vec<Conversation>>> {
    let below = match before {
        None => i64::MAX,
        Some(id) => match cursor(conn, "SELECT seq FROM conversations WHERE id = ?1", &[id])? {
            Some(seq) => seq,
            None => return Ok(None),
        },
    };
    conn.prepare_cached(&format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE seq < ?1 \
         ORDER BY seq DESC LIMIT ?2"
    ))?
    .query_map(params![below, limit], conversation_from_row)?
    .collect::<rusqlite::Result<Vec<_>>>()
    .map(Some)
}

/// The `seq` a page cursor (an id) stands for; `None` when the id names nothing.
fn cursor(conn: &Connection, sql: &str, ids: &[&str]) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(sql)?
        .query_row(rusqlite::params_from_iter(ids), |r| r.get(0))
        .optional()
}

/// Deletes a conversation and, by cascade, its messages; false when there was none.
pub(crate) fn delete(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("DELETE FROM conversations WHERE id = ?1", [id])? > 0)
}

/// The newest `max` messages of a conversation, newest first.
pub(crate) fn newest_messages(
    conn: &Connection,
    conversation_id: &str,
    max: usize,
) -> rusqlite::Result<Vec<Message>> {
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 \
         ORDER BY seq DESC LIMIT ?2"
    ))?
    .query_map(
        params![conversation_id, i64::try_from(max).unwrap_or(i64::MAX)],
        message_from_row,
    )?
    .collect()
}

/// Up to `limit` messages of a conversation, oldest first, after the message `after`; `None`
/// when `after` names no message of this conversation.
pub(crate) fn messages(
    conn: &Connection,
    conversation_id: &str,
    limit: u32,
    after: Option<&str>,
) -> rusqlite::Result<Option<Vec<Message>>> {
    let sql = "SELECT seq FROM messages WHERE id = ?1 AND conversation_id = ?2";
    let above = match after {
        None => 0,
        Some(id) => match cursor(conn, sql, &[id, conversation_id])? {
            Some(seq) => seq,
            None => return Ok(None),
        },
    };
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND seq > ?2 \
         ORDER BY seq LIMIT ?3"
    ))?
    .query_map(params![conversation_id, above, limit], message_from_row)?
    .collect::<rusqlite::Result<Vec<_>>>()
    .map(Some)
}

pub(crate) fn reply_for_key(
    conn: &Connection,
    conversation_id: &str,
    key: &str,
) -> rusqlite::Result<Option<Message>> {
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages \
         WHERE conversation_id = ?1 AND idempotency_key = ?2"
    ))?
    .query_row([conversation_id, key], message_from_row)
    .optional()
}

/// Both messages of a turn (inside the writer's transaction, so together or not at all).
pub(crate) fn insert_turn(conn: &Connection, turn: &Turn) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO messages (id, conversation_id, role, content, model, created_ms, \
         incomplete, prompt_tokens, completion_tokens, idempotency_key) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for (m, key) in [
        (&turn.user, None),
        (&turn.reply, turn.idempotency_key.as_ref()),
    ] {
        let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        insert.execute(params![
            m.id,
            m.conversation_id,
            m.role,
            m.content,
            m.model,
            m.created_ms,
            m.incomplete,
            m.usage.map(|u| tokens(u.prompt_tokens)),
            m.usage.map(|u| tokens(u.completion_tokens)),
            key,
        ])?;
    }
    Ok(())
}

fn conversation_from_row(r: &Row<'_>) -> rusqlite::Result<Conversation> {
    Ok(Conversation {
        id: r.get(0)?,
        title: r.get(1)?,
        model: r.get(2)?,
        system: r.get(3)?,
        created_ms: r.get(4)?,
    })
}

fn message_from_row(r: &Row<'_>) -> rusqlite::Result<Message> {
    let prompt: Option<i64> = r.get(7)?;
    let completion: Option<i64> = r.get(8)?;
    Ok(Message {
        id: r.get(0)?,
        conversation_id: r.get(1)?,
        role: r.get(2)?,
        content: r.get(3)?,
        model: r.get(4)?,
        created_ms: r.get(5)?,
        incomplete: r.get(6)?,
        usage: prompt.map(|p| Usage {
            prompt_tokens: p.max(0) as u64,
            completion_tokens: completion.unwrap_or(0).max(0) as u64,
            cached_tokens: 0,
        }),
    })
}
