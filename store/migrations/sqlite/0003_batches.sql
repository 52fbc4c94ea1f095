-- OpenAI's Batch API. Keep the set of tables and columns identical across backends:
-- tests compare the two. A batch runs every line of an uploaded JSONL file (purpose
-- `batch`) through one endpoint in the background; `lease_owner` and
-- `lease_expires_at_ms` say which node works on it (a node that dies stops renewing its
-- lease, and another node, or the same one restarted, takes the batch over).
-- `metadata` and `errors` are JSON text; times are Unix milliseconds.

CREATE TABLE batches (
    id                  TEXT PRIMARY KEY NOT NULL,
    owner_kind          TEXT NOT NULL CHECK (owner_kind IN ('user', 'org')),
    owner_id            TEXT NOT NULL,
    created_by_user_id  TEXT NOT NULL,
    endpoint            TEXT NOT NULL,
    input_file_id       TEXT NOT NULL,
    completion_window   TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('validating', 'in_progress', 'finalizing', 'completed',
                                                        'failed', 'cancelling', 'cancelled', 'expired')),
    output_file_id      TEXT,
    error_file_id       TEXT,
    errors              TEXT,
    metadata            TEXT,
    total_lines         BIGINT NOT NULL CHECK (total_lines >= 0),
    created_at_ms       BIGINT NOT NULL,
    in_progress_at_ms   BIGINT,
    expires_at_ms       BIGINT NOT NULL,
    finalizing_at_ms    BIGINT,
    completed_at_ms     BIGINT,
    failed_at_ms        BIGINT,
    expired_at_ms       BIGINT,
    cancelling_at_ms    BIGINT,
    cancelled_at_ms     BIGINT,
    lease_owner         TEXT,
    lease_expires_at_ms BIGINT
);
CREATE INDEX batches_by_owner ON batches (owner_kind, owner_id, id);
CREATE INDEX batches_by_status ON batches (status, created_at_ms);

-- One row per answered line of a batch, committed as the line finishes, so a restarted
-- worker skips it: a line is answered at most once. `response` is the endpoint's JSON
-- body; `error_code` and `error_message` are set when the line failed.
CREATE TABLE batch_results (
    batch_id       TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    line_index     BIGINT NOT NULL CHECK (line_index >= 0),
    custom_id      TEXT NOT NULL,
    status_code    BIGINT NOT NULL,
    request_id     TEXT NOT NULL,
    response       TEXT,
    error_code     TEXT,
    error_message  TEXT,
    finished_at_ms BIGINT NOT NULL,
    PRIMARY KEY (batch_id, line_index)
);
