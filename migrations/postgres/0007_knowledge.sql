-- The knowledge base (issue 16): uploaded files, vector stores, the files attached to them and
-- the chunks their text was cut into, each with its embedding and a full-text vector. The
-- same tables as SQLite's 0006, in PostgreSQL's types.

CREATE TABLE files (
    seq        BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    key_id     BIGINT,
    filename   TEXT    NOT NULL,
    purpose    TEXT    NOT NULL,
    bytes      BIGINT  NOT NULL,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT
);
CREATE INDEX files_owner ON files (key_id, seq);
CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE file_contents (
    file_id TEXT  NOT NULL PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    content BYTEA NOT NULL
);

CREATE TABLE vector_stores (
    seq                BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                 TEXT    NOT NULL UNIQUE,
    key_id             BIGINT,
    name               TEXT,
    metadata           TEXT,
    embedding_model    TEXT    NOT NULL,
    created_at         BIGINT  NOT NULL,
    last_active_at     BIGINT  NOT NULL,
    expires_after_days INTEGER,
    version            BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX vector_stores_owner ON vector_stores (key_id, seq);

CREATE TABLE file_batches (
    seq             BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    vector_store_id TEXT    NOT NULL REFERENCES vector_stores (id) ON DELETE CASCADE,
    created_at      BIGINT  NOT NULL,
    cancelled       BOOLEAN NOT NULL DEFAULT false
);

CREATE TABLE vector_store_files (
    seq               BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vector_store_id   TEXT    NOT NULL REFERENCES vector_stores (id) ON DELETE CASCADE,
    file_id           TEXT    NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    batch_id          TEXT    REFERENCES file_batches (id) ON DELETE SET NULL,
    status            TEXT    NOT NULL
                      CHECK (status IN ('in_progress', 'completed', 'cancelled', 'failed')),
    last_error        TEXT,
    attributes        TEXT,
    chunking_strategy TEXT    NOT NULL,
    usage_bytes       BIGINT  NOT NULL DEFAULT 0,
    created_at        BIGINT  NOT NULL,
    UNIQUE (vector_store_id, file_id)
);
CREATE INDEX vector_store_files_file ON vector_store_files (file_id);
CREATE INDEX vector_store_files_batch ON vector_store_files (batch_id) WHERE batch_id IS NOT NULL;

-- The text of a file cut into chunks, each with its embedding (little-endian f32s) and its
-- full-text vector for hybrid ranking.
CREATE TABLE chunks (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vector_store_id TEXT    NOT NULL,
    file_id         TEXT    NOT NULL,
    position        INTEGER NOT NULL,
    text            TEXT    NOT NULL,
    tokens          INTEGER NOT NULL,
    embedding       BYTEA   NOT NULL,
    tsv             TSVECTOR GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    FOREIGN KEY (vector_store_id, file_id)
        REFERENCES vector_store_files (vector_store_id, file_id) ON DELETE CASCADE
);
CREATE INDEX chunks_store ON chunks (vector_store_id, id);
CREATE INDEX chunks_file ON chunks (vector_store_id, file_id);
CREATE INDEX chunks_tsv ON chunks USING GIN (tsv);

ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'ingest'));
