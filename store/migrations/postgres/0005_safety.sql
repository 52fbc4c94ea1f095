-- Safety rules: what a tenant's requests (input) and model answers (output) must not
-- contain. A keyword is matched without regard to ASCII case; a pattern is a regular
-- expression (Rust regex syntax). `reason` is shown in the refusal.
CREATE TABLE safety_rules (
    id             TEXT PRIMARY KEY NOT NULL,
    owner_kind     TEXT NOT NULL CHECK (owner_kind IN ('user', 'org')),
    owner_id       TEXT NOT NULL,
    direction      TEXT NOT NULL CHECK (direction IN ('input', 'output', 'both')),
    kind           TEXT NOT NULL CHECK (kind IN ('keyword', 'regex')),
    pattern        TEXT NOT NULL,
    reason         TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX safety_rules_by_owner ON safety_rules (owner_kind, owner_id, created_at_ms);
