-- Chat sessions (PostgreSQL). Keep the set of tables and columns identical to
-- migrations/sqlite/0004_sessions.sql: tests compare the two.
-- A session is tenant-owned (owner_kind/owner_id as in files); its messages are
-- numbered from 1 by seq. A user turn and its assistant reply are written together
-- when the reply ends; finish_reason marks how a reply ended (stop, length,
-- cancelled, failed) and is NULL for user messages.

CREATE TABLE chat_sessions (
    id             TEXT PRIMARY KEY NOT NULL,
    owner_kind     TEXT NOT NULL CHECK (owner_kind IN ('user', 'org')),
    owner_id       TEXT NOT NULL,
    model          TEXT NOT NULL,
    system_prompt  TEXT,
    sampling_json  TEXT NOT NULL,
    title          TEXT,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE INDEX chat_sessions_by_owner ON chat_sessions (owner_kind, owner_id, updated_at_ms);

CREATE TABLE chat_session_messages (
    session_id         TEXT NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    seq                BIGINT NOT NULL CHECK (seq >= 1),
    role               TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content            TEXT NOT NULL,
    finish_reason      TEXT CHECK (finish_reason IN ('stop', 'length', 'cancelled', 'failed', 'content_filter')),
    error              TEXT,
    prompt_tokens      BIGINT,
    completion_tokens  BIGINT,
    created_at_ms      BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
