-- Knowledge bases: their documents (each upload a version, with its ingestion state) and
-- the chunks ingestion made from them.

-- A knowledge base, owned by a user or an organisation. `settings` is JSON: chunking
-- (max_tokens, overlap_tokens, parent_max_tokens, respect_headings) and retrieval
-- defaults; `vector_backend` says where its vectors live.
CREATE TABLE knowledge_bases (
    id               TEXT PRIMARY KEY NOT NULL,
    owner_kind       TEXT NOT NULL CHECK (owner_kind IN ('user', 'org')),
    owner_id         TEXT NOT NULL,
    name             TEXT NOT NULL,
    description      TEXT NOT NULL,
    embedding_model  TEXT NOT NULL,
    vector_backend   TEXT NOT NULL CHECK (vector_backend IN ('embedded', 'milvus')),
    shard_count      BIGINT NOT NULL CHECK (shard_count > 0),
    settings         TEXT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    updated_at_ms    BIGINT NOT NULL,
    UNIQUE (owner_kind, owner_id, name)
);

-- One uploaded version of a document. Uploading the same file name again makes the next
-- version; when it is indexed, older versions are retired (their chunks leave the index).
-- `state` is the ingestion step reached: each step is durable, so a restarted node
-- continues from the last finished one. `lease_*` says which node works on it until when.
CREATE TABLE kb_documents (
    id                   TEXT PRIMARY KEY NOT NULL,
    kb_id                TEXT NOT NULL REFERENCES knowledge_bases (id) ON DELETE CASCADE,
    filename             TEXT NOT NULL,
    version              BIGINT NOT NULL CHECK (version > 0),
    kind                 TEXT NOT NULL,
    sha256               TEXT NOT NULL,
    size_bytes           BIGINT NOT NULL CHECK (size_bytes >= 0),
    tags                 TEXT NOT NULL,
    category             TEXT NOT NULL,
    state                TEXT NOT NULL CHECK (state IN
                             ('queued', 'parsing', 'chunking', 'embedding', 'indexed', 'failed', 'retired', 'deleting')),
    error                TEXT,
    attempts             BIGINT NOT NULL,
    page_count           BIGINT NOT NULL,
    chunks_total         BIGINT NOT NULL,
    chunks_embedded      BIGINT NOT NULL,
    lease_owner          TEXT,
    lease_expires_at_ms  BIGINT,
    created_at_ms        BIGINT NOT NULL,
    updated_at_ms        BIGINT NOT NULL,
    UNIQUE (kb_id, filename, version)
);
CREATE INDEX kb_documents_work ON kb_documents (state, updated_at_ms);

-- A chunk: `level` 'child' chunks are embedded and retrieved, 'parent' chunks are the
-- larger context a child stands for. `chunk_id` is derived from the document id and the
-- ordinal, so re-running a step writes the same ids (no duplicates after a crash).
CREATE TABLE kb_chunks (
    chunk_id        BIGINT PRIMARY KEY NOT NULL,
    kb_id           TEXT NOT NULL REFERENCES knowledge_bases (id) ON DELETE CASCADE,
    document_id     TEXT NOT NULL REFERENCES kb_documents (id) ON DELETE CASCADE,
    level           TEXT NOT NULL CHECK (level IN ('child', 'parent')),
    ordinal         BIGINT NOT NULL,
    parent_ordinal  BIGINT,
    text            TEXT NOT NULL,
    token_count     BIGINT NOT NULL,
    page_start      BIGINT NOT NULL,
    page_end        BIGINT NOT NULL,
    heading_path    TEXT NOT NULL,
    embedded        BIGINT NOT NULL,
    UNIQUE (document_id, level, ordinal)
);
CREATE INDEX kb_chunks_pending ON kb_chunks (document_id, embedded, ordinal);
