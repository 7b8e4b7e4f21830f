//! Conversations and their messages on PostgreSQL. Pages follow `seq`, the order rows were
//! stored; idempotency keys are unique, so a racing twin's insert fails and it reads the winner.

use postgres::{GenericClient, Row};

use super::{Session, Tx};
use crate::store::conversations::{Conversation, Message, Turn};
use crate::tokens::Usage;

type Result<T> = std::result::Result<T, postgres::Error>;

const CONVERSATION_COLUMNS: &str = "id, title, model, system, created_ms";
const MESSAGE_COLUMNS: &str = "id, conversation_id, role, content, model, created_ms, incomplete, \
     prompt_tokens, completion_tokens";

pub(crate) fn insert(
    tx: &mut Tx<'_, '_>,
    conversation: &Conversation,
    idempotency_key: Option<&str>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO conversations (id, title, model, system, created_ms, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &conversation.id,
            &conversation.title,
            &conversation.model,
            &conversation.system,
            &conversation.created_ms,
            &idempotency_key,
        ],
    )
    .map(drop)
}

pub(crate) fn get(
    c: &mut Session<'_, impl GenericClient>,
    id: &str,
) -> Result<Option<Conversation>> {
    Ok(c.query_opt(
        &format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1"),
        &[&id],
    )?
    .map(|r| conversation_from_row(&r)))
}

pub(crate) fn by_key(
    c: &mut Session<'_, impl GenericClient>,
    key: &str,
) -> Result<Option<Conversation>> {
    Ok(c.query_opt(
        &format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE idempotency_key = $1"),
        &[&key],
    )?
    .map(|r| conversation_from_row(&r)))
}

pub(crate) fn list(
    c: &mut Session<'_, impl GenericClient>,
    limit: u32,
    before: Option<&str>,
) -> Result<Option<Vec<Conversation>>> {
    let below: i64 = match before {
        None => i64::MAX,
        Some(id) => match c.query_opt("SELECT seq FROM conversations WHERE id = $1", &[&id])? {
            Some(row) => row.get(0),
            None => return Ok(None),
        },
    };
    Ok(Some(
        c.query(
            &format!(
                "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE seq < $1 \
                 ORDER BY seq DESC LIMIT $2"
            ),
            &[&below, &i64::from(limit)],
        )?
        .iter()
        .map(conversation_from_row)
        .collect(),
    ))
}

pub(crate) fn delete(tx: &mut Tx<'_, '_>, id: &str) -> Result<bool> {
    Ok(tx.execute("DELETE FROM conversations WHERE id = $1", &[&id])? > 0)
}

pub(crate) fn newest_messages(
    c: &mut Session<'_, impl GenericClient>,
    conversation_id: &str,
    max: usize,
) -> Result<Vec<Message>> {
    Ok(c.query(
        &format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 \
             ORDER BY seq DESC LIMIT $2"
        ),
        &[&conversation_id, &i64::try_from(max).unwrap_or(i64::MAX)],
    )?
    .iter()
    .map(message_from_row)
    .collect())
}

pub(crate) fn messages(
    c: &mut Session<'_, impl GenericClient>,
    conversation_id: &str,
    limit: u32,
    after: Option<&str>,
) -> Result<Option<Vec<Message>>> {
    let above: i64 = match after {
        None => 0,
        Some(id) => match c.query_opt(
            "SELECT seq FROM messages WHERE id = $1 AND conversation_id = $2",
            &[&id, &conversation_id],
        )? {
            Some(row) => row.get(0),
            None => return Ok(None),
        },
    };
    Ok(Some(
        c.query(
            &format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3"
            ),
            &[&conversation_id, &above, &i64::from(limit)],
        )?
        .iter()
        .map(message_from_row)
        .collect(),
    ))
}

pub(crate) fn reply_for_key(
    c: &mut Session<'_, impl GenericClient>,
    conversation_id: &str,
    key: &str,
) -> Result<Option<Message>> {
    Ok(c.query_opt(
        &format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages \
             WHERE conversation_id = $1 AND idempotency_key = $2"
        ),
        &[&conversation_id, &key],
    )?
    .map(|r| message_from_row(&r)))
}

pub(crate) fn insert_turn(tx: &mut Tx<'_, '_>, turn: &Turn) -> Result<()> {
    let insert = "INSERT INTO messages (id, conversation_id, role, content, model, created_ms, \
                  incomplete, prompt_tokens, completion_tokens, idempotency_key) \
                  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
    for (m, key) in [
        (&turn.user, None),
        (&turn.reply, turn.idempotency_key.as_ref()),
    ] {
        let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        tx.execute(
            insert,
            &[
                &m.id,
                &m.conversation_id,
                &m.role,
                &m.content,
                &m.model,
                &m.created_ms,
                &m.incomplete,
                &m.usage.map(|u| tokens(u.prompt_tokens)),
                &m.usage.map(|u| tokens(u.completion_tokens)),
                &key,
            ],
        )?;
    }
    Ok(())
}

fn conversation_from_row(r: &Row) -> Conversation {
    Conversation {
        id: r.get(0),
        title: r.get(1),
        model: r.get(2),
        system: r.get(3),
        created_ms: r.get(4),
    }
}

fn message_from_row(r: &Row) -> Message {
    let prompt: Option<i64> = r.get(7);
    let completion: Option<i64> = r.get(8);
    Message {
        id: r.get(0),
        conversation_id: r.get(1),
        role: r.get(2),
        content: r.get(3),
        model: r.get(4),
        created_ms: r.get(5),
        incomplete: r.get(6),
        usage: prompt.map(|p| Usage {
            prompt_tokens: p.max(0) as u64,
            completion_tokens: completion.unwrap_or(0).max(0) as u64,
            cached_tokens: 0,
        }),
    }
}
