-- The model repository. Keep the set of tables and columns identical across backends:
-- tests compare the two. A model is a name owned by the platform (visible to every
-- tenant; imported by operators), a user or an organisation; a version is immutable: its
-- files are blobs in the blob store, listed in `files` as JSON
-- ([{"path": ..., "sha256": ..., "size_bytes": ...}]); `config` is the model's own
-- description as JSON (config.json, or a GGUF file's scalar metadata), which estimates
-- read without the files.

CREATE TABLE models (
    id             TEXT PRIMARY KEY NOT NULL,
    owner_kind     TEXT NOT NULL CHECK (owner_kind IN ('platform', 'user', 'org')),
    owner_id       TEXT NOT NULL,
    name           TEXT NOT NULL,
    description    TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    UNIQUE (owner_kind, owner_id, name)
);

CREATE TABLE model_versions (
    id              TEXT PRIMARY KEY NOT NULL,
    model_id        TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    version         TEXT NOT NULL,
    format          TEXT NOT NULL CHECK (format IN ('safetensors', 'gguf')),
    architecture    TEXT NOT NULL,
    parameters      BIGINT NOT NULL,
    context_length  BIGINT NOT NULL,
    dtype           TEXT NOT NULL,
    quantization    TEXT NOT NULL,
    tasks           TEXT NOT NULL,
    config          TEXT NOT NULL,
    files           TEXT NOT NULL,
    total_bytes     BIGINT NOT NULL CHECK (total_bytes >= 0),
    created_at_ms   BIGINT NOT NULL,
    UNIQUE (model_id, version)
);
CREATE INDEX model_versions_by_model ON model_versions (model_id, created_at_ms);
