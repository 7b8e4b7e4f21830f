-- The request log: one row per /v1 and /api call. Never a header and never a key; bodies
-- only when [log] bodies = true. Times are unix milliseconds; durations are milliseconds.
CREATE TABLE requests (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT    NOT NULL,
    ts_ms             INTEGER NOT NULL,
    method            TEXT    NOT NULL,
    route             TEXT    NOT NULL,
    model             TEXT,
    provider          TEXT,
    upstream_model    TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    total_ms          REAL    NOT NULL,
    queue_ms          REAL    NOT NULL,
    upstream_ms       REAL    NOT NULL,
    overhead_ms       REAL    NOT NULL,
    ttft_ms           REAL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    streamed          INTEGER NOT NULL DEFAULT 0,
    client_left       INTEGER NOT NULL DEFAULT 0,
    request_body      BLOB,
    response_body     BLOB
);
-- Newest first, by time; the filters the API offers; retention scans by time.
CREATE INDEX requests_ts ON requests (ts_ms);
CREATE INDEX requests_model_ts ON requests (model, ts_ms);
CREATE INDEX requests_status_ts ON requests (status, ts_ms);

-- Conversations kept server-side, and their messages in order. `seq` is the order of
-- creation (commit order), which lists page by: ids are random and clocks tie.
CREATE TABLE conversations (
    seq             INTEGER PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    title           TEXT,
    model           TEXT,
    system          TEXT,
    created_ms      INTEGER NOT NULL,
    -- The key of the request that created it, so a repeat finds it.
    idempotency_key TEXT    UNIQUE
);

CREATE TABLE messages (
    seq               INTEGER PRIMARY KEY,
    id                TEXT    NOT NULL UNIQUE,
    conversation_id   TEXT    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role              TEXT    NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content           TEXT    NOT NULL,
    model             TEXT,
    created_ms        INTEGER NOT NULL,
    -- 1 when the reply was cut short (a stream that ended early); its text is what arrived.
    incomplete        INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    -- On an assistant reply: the key of the request that produced it, so a repeat finds it.
    idempotency_key   TEXT
);
CREATE INDEX messages_conversation ON messages (conversation_id, seq);
CREATE UNIQUE INDEX messages_idempotency ON messages (conversation_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
