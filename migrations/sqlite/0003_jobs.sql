-- Durable background jobs: a chat completion to run later, at least once, by the job runner.
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    status           TEXT    NOT NULL
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- The chat completions body as submitted, and the client's metadata (JSON).
    request          TEXT    NOT NULL,
    metadata         TEXT,
    model            TEXT    NOT NULL,
    -- Runs started (a run lost with its process or its lease counts too).
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    -- The chat completion (JSON) once succeeded; the last error ({"message","type","code"}).
    result           TEXT,
    error            TEXT,
    -- Set when a running job is cancelled: it ends cancelled when its call returns.
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT    UNIQUE,
    key_id           INTEGER,
    created_ms       INTEGER NOT NULL,
    started_ms       INTEGER,
    finished_ms      INTEGER,
    -- A running job belongs to its runner until then; past it, any runner may take it again.
    lease_until_ms   INTEGER
);
CREATE INDEX jobs_status ON jobs (status, seq);
