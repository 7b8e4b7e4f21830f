-- The knowledge base (issue 16): uploaded files, vector stores, the files attached to them and
-- the chunks their text was cut into, each with its embedding and a full-text row. Everything
-- lives in this one database file, beside the request log and the jobs.

-- A file as uploaded through POST /v1/files. Its bytes are in a table of their own, so lists
-- and lookups never page through them.
CREATE TABLE files (
    seq        INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    -- The key that uploaded it (NULL in development mode, where there is one owner).
    key_id     INTEGER,
    filename   TEXT    NOT NULL,
    purpose    TEXT    NOT NULL,
    bytes      INTEGER NOT NULL,
    -- Unix seconds, as OpenAI's API shows them.
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
CREATE INDEX files_owner ON files (key_id, seq);
CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE file_contents (
    file_id TEXT NOT NULL PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    content BLOB NOT NULL
);

CREATE TABLE vector_stores (
    seq                INTEGER PRIMARY KEY,
    id                 TEXT    NOT NULL UNIQUE,
    key_id             INTEGER,
    name               TEXT,
    -- JSON objects, as the client sent them.
    metadata           TEXT,
    -- The model its chunks were embedded with, pinned at creation: a query must use the same.
    embedding_model    TEXT    NOT NULL,
    created_at         INTEGER NOT NULL,
    last_active_at     INTEGER NOT NULL,
    -- expires_after {anchor: "last_active_at", days}; the store expires that long after it
    -- was last used.
    expires_after_days INTEGER,
    -- Raised whenever its chunks change: a cached copy of its vectors from an older version
    -- is stale.
    version            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX vector_stores_owner ON vector_stores (key_id, seq);

-- A batch of files attached together; its status and counts come from its files.
CREATE TABLE file_batches (
    seq             INTEGER PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    vector_store_id TEXT    NOT NULL REFERENCES vector_stores (id) ON DELETE CASCADE,
    created_at      INTEGER NOT NULL,
    cancelled       INTEGER NOT NULL DEFAULT 0
);

-- A file attached to a vector store. Detaching it, deleting the store or deleting the file
-- removes it and, through chunks' foreign key, its chunks.
CREATE TABLE vector_store_files (
    seq               INTEGER PRIMARY KEY,
    vector_store_id   TEXT    NOT NULL REFERENCES vector_stores (id) ON DELETE CASCADE,
    file_id           TEXT    NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    batch_id          TEXT    REFERENCES file_batches (id) ON DELETE SET NULL,
    status            TEXT    NOT NULL
                      CHECK (status IN ('in_progress', 'completed', 'cancelled', 'failed')),
    -- {"code", "message"} once failed.
    last_error        TEXT,
    attributes        TEXT,
    -- The resolved strategy, as OpenAI shows it: {"type": "static", "static": {…}}.
    chunking_strategy TEXT    NOT NULL,
    -- Bytes its chunks take: their text and their vectors.
    usage_bytes       INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    UNIQUE (vector_store_id, file_id)
);
CREATE INDEX vector_store_files_file ON vector_store_files (file_id);
CREATE INDEX vector_store_files_batch ON vector_store_files (batch_id) WHERE batch_id IS NOT NULL;

-- The text of a file cut into chunks, each with its embedding: little-endian f32s.
CREATE TABLE chunks (
    id              INTEGER PRIMARY KEY,
    vector_store_id TEXT    NOT NULL,
    file_id         TEXT    NOT NULL,
    position        INTEGER NOT NULL,
    text            TEXT    NOT NULL,
    tokens          INTEGER NOT NULL,
    embedding       BLOB    NOT NULL,
    FOREIGN KEY (vector_store_id, file_id)
        REFERENCES vector_store_files (vector_store_id, file_id) ON DELETE CASCADE
);
CREATE INDEX chunks_store ON chunks (vector_store_id, id);
CREATE INDEX chunks_file ON chunks (vector_store_id, file_id);

-- Full-text search over the chunks for hybrid ranking, kept in step by triggers (an
-- external-content FTS5 table holds only the index, not a second copy of the text).
CREATE VIRTUAL TABLE chunks_fts USING fts5 (
    text, content = 'chunks', content_rowid = 'id', tokenize = 'porter unicode61'
);
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;

-- What a job does: a chat completion, as before, or the ingestion of a file into a vector
-- store ({"vector_store_id", "file_id"} in request).
ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'ingest'));
