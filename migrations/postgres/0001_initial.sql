-- syncgate's schema on PostgreSQL: the same tables as on SQLite (migrations/sqlite/, up to
-- 0003), with PostgreSQL's types. Times are unix milliseconds; durations are milliseconds.

-- The request log: one row per /v1 and /api call. Never a header and never a key; bodies
-- only when [log] bodies = true.
CREATE TABLE requests (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id        TEXT             NOT NULL,
    ts_ms             BIGINT           NOT NULL,
    method            TEXT             NOT NULL,
    route             TEXT             NOT NULL,
    model             TEXT,
    provider          TEXT,
    upstream_model    TEXT,
    attempts          INTEGER          NOT NULL DEFAULT 0,
    status            INTEGER          NOT NULL,
    error_code        TEXT,
    total_ms          DOUBLE PRECISION NOT NULL,
    queue_ms          DOUBLE PRECISION NOT NULL,
    upstream_ms       DOUBLE PRECISION NOT NULL,
    overhead_ms       DOUBLE PRECISION NOT NULL,
    ttft_ms           DOUBLE PRECISION,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    streamed          BOOLEAN          NOT NULL DEFAULT false,
    client_left       BOOLEAN          NOT NULL DEFAULT false,
    request_body      BYTEA,
    response_body     BYTEA,
    -- Which key made the call (NULL in development mode).
    key_id            BIGINT
);
-- Newest first, by time; the filters the API offers; retention scans by time.
CREATE INDEX requests_ts ON requests (ts_ms, id);
CREATE INDEX requests_model_ts ON requests (model, ts_ms, id);
CREATE INDEX requests_status_ts ON requests (status, ts_ms, id);

-- Conversations kept server-side, and their messages in order. `seq` is the order of
-- creation, which lists page by: ids are random and clocks tie.
CREATE TABLE conversations (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              TEXT   NOT NULL UNIQUE,
    title           TEXT,
    model           TEXT,
    system          TEXT,
    created_ms      BIGINT NOT NULL,
    -- The key of the request that created it, so a repeat finds it.
    idempotency_key TEXT   UNIQUE
);

CREATE TABLE messages (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT    NOT NULL UNIQUE,
    conversation_id   TEXT    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role              TEXT    NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content           TEXT    NOT NULL,
    model             TEXT,
    created_ms        BIGINT  NOT NULL,
    -- The reply was cut short (a stream that ended early); its text is what arrived.
    incomplete        BOOLEAN NOT NULL DEFAULT false,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    -- On an assistant reply: the key of the request that produced it, so a repeat finds it.
    idempotency_key   TEXT
);
CREATE INDEX messages_conversation ON messages (conversation_id, seq);
CREATE UNIQUE INDEX messages_idempotency ON messages (conversation_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- API keys: only a SHA-256 hash of each key and a short prefix to recognise it by.
CREATE TABLE api_keys (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT   NOT NULL,
    prefix        TEXT   NOT NULL,
    hash          BYTEA  NOT NULL UNIQUE,
    -- The models the key may call, as a JSON array of names; NULL allows every model.
    models        TEXT,
    rpm           BIGINT,
    tpm           BIGINT,
    max_in_flight BIGINT,
    expires_ms    BIGINT,
    created_ms    BIGINT NOT NULL,
    revoked_ms    BIGINT
);

-- Counters other processes bump so that a running server notices: `keys` changes whenever a
-- key is made or revoked, by any instance or by `syncgate keys`.
CREATE TABLE generations (
    name  TEXT   PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO generations (name, value) VALUES ('keys', 0);

-- Durable background jobs: a chat completion to run later, at least once, by a job runner.
CREATE TABLE jobs (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    status           TEXT    NOT NULL
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    request          TEXT    NOT NULL,
    metadata         TEXT,
    model            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    result           TEXT,
    error            TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    idempotency_key  TEXT    UNIQUE,
    key_id           BIGINT,
    created_ms       BIGINT  NOT NULL,
    started_ms       BIGINT,
    finished_ms      BIGINT,
    -- A running job belongs to its runner until then; past it, any runner may take it again.
    lease_until_ms   BIGINT
);
CREATE INDEX jobs_status ON jobs (status, seq);
