-- Fine-tuning jobs (OpenAI's fine-tuning API). Keep the set of tables and columns
-- identical across backends: tests compare the two. A job trains a base model version
-- (`model`, as `name:version`) on an uploaded JSONL file (purpose `fine-tune`) in the
-- background; `lease_owner` and `lease_expires_at_ms` say which node trains it (a node
-- that dies stops renewing its lease, and another node, or the same one restarted, resumes
-- the job from `checkpoint_sha256`, a blob of the trained tensors after `steps_done`
-- steps: ING-1). `settings` and `error` are JSON text; `gpu_ms` is GPU time used, in
-- milliseconds times GPUs held; times are Unix milliseconds.

CREATE TABLE fine_tuning_jobs (
    id                  TEXT PRIMARY KEY NOT NULL,
    owner_kind          TEXT NOT NULL CHECK (owner_kind IN ('user', 'org')),
    owner_id            TEXT NOT NULL,
    created_by_user_id  TEXT NOT NULL,
    model               TEXT NOT NULL,
    training_file       TEXT NOT NULL,
    validation_file     TEXT,
    settings            TEXT NOT NULL,
    suffix              TEXT,
    status              TEXT NOT NULL CHECK (status IN ('validating_files', 'queued', 'running', 'succeeded',
                                                        'failed', 'cancelled')),
    error               TEXT,
    fine_tuned_model    TEXT,
    total_steps         BIGINT NOT NULL CHECK (total_steps >= 0),
    steps_done          BIGINT NOT NULL DEFAULT 0,
    trained_tokens      BIGINT NOT NULL DEFAULT 0,
    gpu_ms              BIGINT NOT NULL DEFAULT 0,
    gpus                BIGINT NOT NULL DEFAULT 0,
    node                TEXT,
    checkpoint_sha256   TEXT,
    created_at_ms       BIGINT NOT NULL,
    started_at_ms       BIGINT,
    finished_at_ms      BIGINT,
    lease_owner         TEXT,
    lease_expires_at_ms BIGINT
);
CREATE INDEX fine_tuning_jobs_by_owner ON fine_tuning_jobs (owner_kind, owner_id, id);
CREATE INDEX fine_tuning_jobs_by_status ON fine_tuning_jobs (status, created_at_ms);

-- A job's events, numbered from 1: state changes, and the loss of every step (`data`
-- holds `step`, `train_loss`, `valid_loss` as JSON), which the console draws live.
CREATE TABLE fine_tuning_events (
    job_id        TEXT NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
    seq           BIGINT NOT NULL,
    level         TEXT NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    message       TEXT NOT NULL,
    data          TEXT,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
