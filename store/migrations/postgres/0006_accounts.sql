-- Accounts, credentials, quotas, usage and the audit log (PostgreSQL). Keep the tables and
-- columns identical to migrations/sqlite/0006_accounts.sql: tests compare the two.
-- Secrets (session tokens, API keys, one-time codes) are stored only as SHA-256 hex.

-- Console sign-ins and API sessions: a bearer token or an HTTP-only cookie.
CREATE TABLE auth_sessions (
    id             TEXT PRIMARY KEY NOT NULL,
    user_id        TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_sha256   TEXT NOT NULL UNIQUE,
    address        TEXT NOT NULL,
    user_agent     TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL,
    revoked_at_ms  BIGINT
);
CREATE INDEX auth_sessions_by_user ON auth_sessions (user_id, created_at_ms);

-- API keys, owned by a user or an organisation. `scopes` and `allowed_models` are JSON
-- arrays (an empty model list allows every model); `quota` is a JSON object of limits.
CREATE TABLE api_keys (
    id               TEXT PRIMARY KEY NOT NULL,
    owner_kind       TEXT NOT NULL CHECK (owner_kind IN ('user', 'org')),
    owner_id         TEXT NOT NULL,
    created_by       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name             TEXT NOT NULL,
    prefix           TEXT NOT NULL,
    secret_sha256    TEXT NOT NULL UNIQUE,
    scopes           TEXT NOT NULL,
    allowed_models   TEXT NOT NULL,
    quota            TEXT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    expires_at_ms    BIGINT,
    last_used_at_ms  BIGINT,
    revoked_at_ms    BIGINT
);
CREATE INDEX api_keys_by_owner ON api_keys (owner_kind, owner_id, created_at_ms);

-- One-time codes: account verification and password reset.
CREATE TABLE one_time_codes (
    id             TEXT PRIMARY KEY NOT NULL,
    user_id        TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose        TEXT NOT NULL CHECK (purpose IN ('verify', 'reset')),
    code_sha256    TEXT NOT NULL,
    attempts       BIGINT NOT NULL DEFAULT 0,
    created_at_ms  BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL,
    used_at_ms     BIGINT
);
CREATE INDEX one_time_codes_by_user ON one_time_codes (user_id, purpose, created_at_ms);

-- Messages to users (email, SMS). Every message is written here first; a configured
-- SMTP server or SMS provider sends it and `sent_at_ms` is set, otherwise admins read it.
CREATE TABLE outbox (
    id             TEXT PRIMARY KEY NOT NULL,
    channel        TEXT NOT NULL CHECK (channel IN ('email', 'sms')),
    recipient      TEXT NOT NULL,
    subject        TEXT NOT NULL,
    body           TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    sent_at_ms     BIGINT,
    error          TEXT
);

-- Quotas set for a user or an org, a JSON object of limits (a key's quota is on the key).
CREATE TABLE quotas (
    subject_kind   TEXT NOT NULL CHECK (subject_kind IN ('user', 'org')),
    subject_id     TEXT NOT NULL,
    limits         TEXT NOT NULL,
    updated_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (subject_kind, subject_id)
);

-- Prices in millionths of the currency unit: per 1,000 input and output tokens and per
-- GPU-hour. Model `*` is the default for models without a row of their own.
CREATE TABLE prices (
    model                 TEXT PRIMARY KEY NOT NULL,
    input_per_1k_micros   BIGINT NOT NULL CHECK (input_per_1k_micros >= 0),
    output_per_1k_micros  BIGINT NOT NULL CHECK (output_per_1k_micros >= 0),
    gpu_hour_micros       BIGINT NOT NULL CHECK (gpu_hour_micros >= 0),
    updated_at_ms         BIGINT NOT NULL
);

-- One row per metered event: an inference request, a training job's GPU time, a storage
-- sample. Cost is computed from the price table when the row is written.
CREATE TABLE usage_records (
    id                 TEXT PRIMARY KEY NOT NULL,
    owner_kind         TEXT NOT NULL CHECK (owner_kind IN ('user', 'org')),
    owner_id           TEXT NOT NULL,
    user_id            TEXT NOT NULL,
    key_id             TEXT,
    kind               TEXT NOT NULL CHECK (kind IN ('inference', 'training', 'storage')),
    model              TEXT NOT NULL,
    endpoint           TEXT NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    gpu_seconds        BIGINT NOT NULL,
    storage_bytes      BIGINT NOT NULL,
    latency_ms         BIGINT NOT NULL,
    status             BIGINT NOT NULL,
    cost_micros        BIGINT NOT NULL,
    created_at_ms      BIGINT NOT NULL
);
CREATE INDEX usage_records_by_owner ON usage_records (owner_kind, owner_id, created_at_ms);

-- Who did what, when and from where. Append-only: triggers refuse changes and deletions.
CREATE TABLE audit_log (
    id             TEXT PRIMARY KEY NOT NULL,
    at_ms          BIGINT NOT NULL,
    actor_user_id  TEXT,
    actor_key_id   TEXT,
    address        TEXT NOT NULL,
    action         TEXT NOT NULL,
    target         TEXT NOT NULL,
    detail         TEXT NOT NULL
);
CREATE INDEX audit_log_by_time ON audit_log (at_ms);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END;
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
