-- API keys: only a SHA-256 hash of each key and a short prefix to recognise it by are kept;
-- the key itself is shown once, when it is made, and never stored.
CREATE TABLE api_keys (
    id             INTEGER PRIMARY KEY,
    name           TEXT    NOT NULL,
    -- "sk-sg-" and the first characters of the secret: enough to tell keys apart in a list.
    prefix         TEXT    NOT NULL,
    hash           BLOB    NOT NULL UNIQUE,
    -- The models the key may call, as a JSON array of names; NULL allows every model.
    models         TEXT,
    rpm            INTEGER,
    tpm            INTEGER,
    max_in_flight  INTEGER,
    expires_ms     INTEGER,
    created_ms     INTEGER NOT NULL,
    revoked_ms     INTEGER
);

-- Counters other processes bump so that a running server notices: `keys` changes whenever a
-- key is made or revoked (by the API or by `syncgate keys` on the same file).
CREATE TABLE generations (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO generations (name, value) VALUES ('keys', 0);

-- Which key made each logged call (NULL in development mode).
ALTER TABLE requests ADD COLUMN key_id INTEGER;
