-- Foundation schema (PostgreSQL). Keep the set of tables and columns identical to
-- migrations/sqlite/0001_foundation.sql: tests compare the two.
-- Times are Unix milliseconds (BIGINT); flags are 0/1 integers, so one query text
-- serves both backends through sqlx's Any driver.

CREATE TABLE users (
    id             TEXT PRIMARY KEY NOT NULL,
    email          TEXT UNIQUE,
    phone          TEXT UNIQUE,
    display_name   TEXT NOT NULL,
    password_hash  TEXT,
    role           TEXT NOT NULL CHECK (role IN ('admin', 'enterprise', 'user')),
    status         TEXT NOT NULL CHECK (status IN ('pending', 'active', 'disabled')),
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL,
    CHECK (email IS NOT NULL OR phone IS NOT NULL)
);

CREATE TABLE orgs (
    id             TEXT PRIMARY KEY NOT NULL,
    name           TEXT NOT NULL UNIQUE,
    display_name   TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);

CREATE TABLE org_members (
    org_id         TEXT NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id        TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    org_role       TEXT NOT NULL CHECK (org_role IN ('owner', 'admin', 'member')),
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX org_members_by_user ON org_members (user_id);

-- Files a tenant uploaded (OpenAI's /v1/files: batch inputs, training data,
-- documents); the bytes live in the blob store under their sha256.
CREATE TABLE files (
    id             TEXT PRIMARY KEY NOT NULL,
    owner_kind     TEXT NOT NULL CHECK (owner_kind IN ('user', 'org')),
    owner_id       TEXT NOT NULL,
    filename       TEXT NOT NULL,
    purpose        TEXT NOT NULL,
    size_bytes     BIGINT NOT NULL CHECK (size_bytes >= 0),
    sha256         TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX files_by_owner ON files (owner_kind, owner_id, created_at_ms);
