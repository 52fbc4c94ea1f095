//! Batches (OpenAI's Batch API): the lines of an uploaded JSONL file run through one
//! endpoint in the background. The rows are tenant-owned: the routes' queries take a
//! [`TenantScope`]. The worker's queries (claiming a batch with a lease, recording a
//! line's result, finishing) are the node's own and take none; the worker acts for a
//! batch's owner through [`Batches::scope_of`].
//!
//! **Invariant:** a line is answered at most once: its result is one row keyed by
//! (batch, line), committed when the line finishes, and a worker skips lines that have
//! a row. A line running when its node died has no row and runs again.

use serde::Serialize;
use serde_json::Value;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::repo::lease::Leases;
use crate::tenant::{Owner, TenantScope, trusted_sql};

/// Where a batch is in its life, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    Expired,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
            BatchStatus::Expired => "expired",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "validating" => BatchStatus::Validating,
            "in_progress" => BatchStatus::InProgress,
            "finalizing" => BatchStatus::Finalizing,
            "completed" => BatchStatus::Completed,
            "failed" => BatchStatus::Failed,
            "cancelling" => BatchStatus::Cancelling,
            "cancelled" => BatchStatus::Cancelled,
            "expired" => BatchStatus::Expired,
            other => return Err(StoreError::InvalidInput(format!("unknown batch status `{other}` in the database"))),
        })
    }

    /// Whether the batch has ended (no worker touches it again).
    pub fn is_final(self) -> bool {
        matches!(self, BatchStatus::Completed | BatchStatus::Failed | BatchStatus::Cancelled | BatchStatus::Expired)
    }
}

/// The statuses a worker claims: the batch still has work (lines or its output files).
const ACTIVE_STATUSES: &str = "('validating', 'in_progress', 'finalizing', 'cancelling')";

const LEASES: Leases = Leases { table: "batches", active: ACTIVE_STATUSES };

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchRecord {
    pub id: String,
    pub owner: Owner,
    pub created_by_user_id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// OpenAI's `errors.data`: a list of `{code, message, line, param}`.
    pub errors: Option<Value>,
    /// The caller's string map.
    pub metadata: Option<Value>,
    pub total_lines: i64,
    /// Lines answered with a 2xx.
    pub completed_lines: i64,
    /// Lines answered with an error.
    pub failed_lines: i64,
    pub created_at_ms: i64,
    pub in_progress_at_ms: Option<i64>,
    pub expires_at_ms: i64,
    pub finalizing_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    pub failed_at_ms: Option<i64>,
    pub expired_at_ms: Option<i64>,
    pub cancelling_at_ms: Option<i64>,
    pub cancelled_at_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct NewBatch {
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    /// How long the batch may take before it expires (the completion window).
    pub window_ms: i64,
    pub metadata: Option<Value>,
    pub total_lines: u64,
}

/// One answered line.
#[derive(Debug, Clone, PartialEq)]
pub struct LineResult {
    pub line_index: u64,
    pub custom_id: String,
    pub status_code: u16,
    pub request_id: String,
    /// The endpoint's JSON body (the error body for a failed line).
    pub response: Option<Value>,
    /// `(code, message)` when the line failed.
    pub error: Option<(String, String)>,
}

#[derive(sqlx::FromRow)]
struct BatchRow {
    id: String,
    owner_kind: String,
    owner_id: String,
    created_by_user_id: String,
    endpoint: String,
    input_file_id: String,
    completion_window: String,
    status: String,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    errors: Option<String>,
    metadata: Option<String>,
    total_lines: i64,
    completed_lines: i64,
    failed_lines: i64,
    created_at_ms: i64,
    in_progress_at_ms: Option<i64>,
    expires_at_ms: i64,
    finalizing_at_ms: Option<i64>,
    completed_at_ms: Option<i64>,
    failed_at_ms: Option<i64>,
    expired_at_ms: Option<i64>,
    cancelling_at_ms: Option<i64>,
    cancelled_at_ms: Option<i64>,
}

const BATCH_COLUMNS: &str = "b.id, b.owner_kind, b.owner_id, b.created_by_user_id, b.endpoint, b.input_file_id, \
     b.completion_window, b.status, b.output_file_id, b.error_file_id, b.errors, b.metadata, b.total_lines, \
     (SELECT COUNT(*) FROM batch_results r WHERE r.batch_id = b.id AND r.error_code IS NULL) AS completed_lines, \
     (SELECT COUNT(*) FROM batch_results r WHERE r.batch_id = b.id AND r.error_code IS NOT NULL) AS failed_lines, \
     b.created_at_ms, b.in_progress_at_ms, b.expires_at_ms, b.finalizing_at_ms, b.completed_at_ms, b.failed_at_ms, \
     b.expired_at_ms, b.cancelling_at_ms, b.cancelled_at_ms";

fn batch_from_row(row: BatchRow) -> Result<BatchRecord> {
    let json = |what: &str, text: Option<String>| -> Result<Option<Value>> {
        text.map(|text| {
            serde_json::from_str(&text).map_err(|err| {
                StoreError::InvalidInput(format!("batch `{}` has unreadable {what} in the database: {err}", row.id))
            })
        })
        .transpose()
    };
    let errors = json("errors", row.errors.clone())?;
    let metadata = json("metadata", row.metadata.clone())?;
    Ok(BatchRecord {
        owner: Owner::from_columns(&row.owner_kind, row.owner_id)?,
        status: BatchStatus::parse(&row.status)?,
        errors,
        metadata,
        id: row.id,
        created_by_user_id: row.created_by_user_id,
        endpoint: row.endpoint,
        input_file_id: row.input_file_id,
        completion_window: row.completion_window,
        output_file_id: row.output_file_id,
        error_file_id: row.error_file_id,
        total_lines: row.total_lines,
        completed_lines: row.completed_lines,
        failed_lines: row.failed_lines,
        created_at_ms: row.created_at_ms,
        in_progress_at_ms: row.in_progress_at_ms,
        expires_at_ms: row.expires_at_ms,
        finalizing_at_ms: row.finalizing_at_ms,
        completed_at_ms: row.completed_at_ms,
        failed_at_ms: row.failed_at_ms,
        expired_at_ms: row.expired_at_ms,
        cancelling_at_ms: row.cancelling_at_ms,
        cancelled_at_ms: row.cancelled_at_ms,
    })
}

type ResultRow = (i64, String, i64, String, Option<String>, Option<String>, Option<String>);

pub struct Batches<'a> {
    pub(crate) db: &'a Db,
}

impl Batches<'_> {
    /// Records a batch owned by the scope's acting owner, `validating` until a worker
    /// takes it.
    pub async fn create(&self, scope: &TenantScope, new: NewBatch) -> Result<BatchRecord> {
        let total_lines = i64::try_from(new.total_lines)
            .map_err(|_| StoreError::InvalidInput(format!("{} lines are too many", new.total_lines)))?;
        let now = now_ms();
        let id = new_id("batch");
        let owner = scope.acting_as();
        sqlx::query(
            "INSERT INTO batches (id, owner_kind, owner_id, created_by_user_id, endpoint, input_file_id, \
             completion_window, status, metadata, total_lines, created_at_ms, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'validating', $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(owner.kind())
        .bind(owner.id())
        .bind(scope.user_id())
        .bind(&new.endpoint)
        .bind(&new.input_file_id)
        .bind(&new.completion_window)
        .bind(new.metadata.as_ref().map(Value::to_string))
        .bind(total_lines)
        .bind(now)
        .bind(now.saturating_add(new.window_ms))
        .execute(self.db.pool())
        .await?;
        self.get(scope, &id).await
    }

    /// A batch the scope may read; another tenant's batch is reported as not found.
    pub async fn get(&self, scope: &TenantScope, id: &str) -> Result<BatchRecord> {
        let sql =
            format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.id = $2 AND {}", TenantScope::readable_sql("b", 1));
        let row: Option<BatchRow> =
            sqlx::query_as(trusted_sql(sql)).bind(scope.user_id()).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(batch_from_row).transpose()?.ok_or_else(|| StoreError::NotFound { what: "batch", id: id.to_owned() })
    }

    /// The batches of the scope's acting owner, newest first: at most `limit`, and only
    /// those older than the batch `after` when given (OpenAI's cursor).
    pub async fn list(&self, scope: &TenantScope, limit: u32, after: Option<&str>) -> Result<Vec<BatchRecord>> {
        let owner = scope.acting_as();
        // Ids are time-ordered (UUIDv7), so the id is the cursor.
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches b WHERE b.owner_kind = $2 AND b.owner_id = $3 AND b.id < $4 AND {} \
             ORDER BY b.id DESC LIMIT $5",
            TenantScope::readable_sql("b", 1)
        );
        let rows: Vec<BatchRow> = sqlx::query_as(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(owner.kind())
            .bind(owner.id())
            // Every id sorts below `~`, so no cursor lists from the newest.
            .bind(after.unwrap_or("~"))
            .bind(i64::from(limit))
            .fetch_all(self.db.pool())
            .await?;
        rows.into_iter().map(batch_from_row).collect()
    }

    /// Asks a running batch to stop: it becomes `cancelling`, and its worker stops taking
    /// lines, lets the running ones finish and writes the partial output. Cancelling a
    /// batch that is already cancelling or cancelled changes nothing; a batch that ended
    /// otherwise is a conflict.
    pub async fn cancel(&self, scope: &TenantScope, id: &str) -> Result<BatchRecord> {
        let batch = self.get(scope, id).await?;
        if matches!(batch.status, BatchStatus::Cancelling | BatchStatus::Cancelled) {
            return Ok(batch);
        }
        let not_running = |status: BatchStatus| {
            StoreError::Conflict(format!(
                "batch `{id}` is {}: only a validating or in-progress batch can be cancelled",
                status.as_str()
            ))
        };
        if !matches!(batch.status, BatchStatus::Validating | BatchStatus::InProgress) {
            return Err(not_running(batch.status));
        }
        let sql = format!(
            "UPDATE batches SET status = 'cancelling', cancelling_at_ms = $3 \
             WHERE id = $2 AND status IN ('validating', 'in_progress') AND {}",
            TenantScope::writable_sql("batches", 1)
        );
        let changed = sqlx::query(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(id)
            .bind(now_ms())
            .execute(self.db.pool())
            .await?
            .rows_affected();
        let now = self.get(scope, id).await?;
        if changed == 0 {
            // Either the batch moved on meanwhile, or the scope may read but not change it.
            match now.status {
                BatchStatus::Cancelling | BatchStatus::Cancelled => {}
                BatchStatus::Validating | BatchStatus::InProgress => {
                    return Err(StoreError::Forbidden(format!(
                        "only the owner, or an owner or admin of its organisation, may cancel batch `{id}`"
                    )));
                }
                other => return Err(not_running(other)),
            }
        }
        Ok(now)
    }

    // ---- the worker's side: the node's own queries ----

    /// Claims one batch with work left for `worker` until `lease_until_ms` ([`Leases::claim`]);
    /// returns the batch's id.
    pub async fn claim(&self, worker: &str, now_ms: i64, lease_until_ms: i64) -> Result<Option<String>> {
        LEASES.claim(self.db, worker, now_ms, lease_until_ms).await
    }

    /// Extends `worker`'s lease on a batch; false when the worker no longer holds it
    /// (it expired and another node took the batch), so the worker must stop.
    pub async fn renew(&self, id: &str, worker: &str, lease_until_ms: i64) -> Result<bool> {
        LEASES.renew(self.db, id, worker, lease_until_ms).await
    }

    /// Gives a lease up (the worker finished with the batch or is stopping).
    pub async fn release(&self, id: &str, worker: &str) -> Result<()> {
        LEASES.release(self.db, id, worker).await
    }

    /// A batch by id, for the worker.
    pub async fn get_any(&self, id: &str) -> Result<BatchRecord> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.id = $1");
        let row: Option<BatchRow> = sqlx::query_as(trusted_sql(sql)).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(batch_from_row).transpose()?.ok_or_else(|| StoreError::NotFound { what: "batch", id: id.to_owned() })
    }

    /// The scope of the user who created the batch, acting as its owner: the worker reads
    /// the input file and writes the output files in it, so TEN-1 holds for them too.
    pub async fn scope_of(&self, batch: &BatchRecord) -> Result<TenantScope> {
        TenantScope::resolve(self.db, &batch.created_by_user_id, Some(batch.owner.clone())).await
    }

    /// Moves a `validating` batch to `in_progress`.
    pub async fn mark_in_progress(&self, id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE batches SET status = 'in_progress', in_progress_at_ms = $1 WHERE id = $2 AND status = 'validating'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Moves an `in_progress` batch to `finalizing` (every line answered; the output
    /// files are being written).
    pub async fn mark_finalizing(&self, id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE batches SET status = 'finalizing', finalizing_at_ms = $1 WHERE id = $2 AND status = 'in_progress'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Ends a batch: `completed`, `cancelled` or `expired` with its output files, or
    /// `failed` with its errors. Also gives the lease up.
    pub async fn finish(
        &self,
        id: &str,
        status: BatchStatus,
        output_file_id: Option<&str>,
        error_file_id: Option<&str>,
        errors: Option<&Value>,
    ) -> Result<()> {
        let at_column = match status {
            BatchStatus::Completed => "completed_at_ms",
            BatchStatus::Failed => "failed_at_ms",
            BatchStatus::Cancelled => "cancelled_at_ms",
            BatchStatus::Expired => "expired_at_ms",
            other => {
                return Err(StoreError::InvalidInput(format!("a batch cannot finish as {}", other.as_str())));
            }
        };
        let sql = format!(
            "UPDATE batches SET status = $1, {at_column} = $2, output_file_id = $3, error_file_id = $4, \
             errors = $5, lease_owner = NULL, lease_expires_at_ms = NULL WHERE id = $6 AND status IN {ACTIVE_STATUSES}"
        );
        sqlx::query(trusted_sql(sql))
            .bind(status.as_str())
            .bind(now_ms())
            .bind(output_file_id)
            .bind(error_file_id)
            .bind(errors.map(Value::to_string))
            .bind(id)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// Commits one line's result. A line that already has one keeps it (returns false):
    /// a line is answered at most once.
    pub async fn record_result(&self, batch_id: &str, result: &LineResult) -> Result<bool> {
        let line_index = i64::try_from(result.line_index)
            .map_err(|_| StoreError::InvalidInput(format!("line {} is out of range", result.line_index)))?;
        let (error_code, error_message) = match &result.error {
            Some((code, message)) => (Some(code.as_str()), Some(message.as_str())),
            None => (None, None),
        };
        let inserted = sqlx::query(
            "INSERT INTO batch_results (batch_id, line_index, custom_id, status_code, request_id, response, \
             error_code, error_message, finished_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (batch_id, line_index) DO NOTHING",
        )
        .bind(batch_id)
        .bind(line_index)
        .bind(&result.custom_id)
        .bind(i64::from(result.status_code))
        .bind(&result.request_id)
        .bind(result.response.as_ref().map(Value::to_string))
        .bind(error_code)
        .bind(error_message)
        .bind(now_ms())
        .execute(self.db.pool())
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Every answered line of a batch, in input order.
    pub async fn results(&self, batch_id: &str) -> Result<Vec<LineResult>> {
        let rows: Vec<ResultRow> = sqlx::query_as(
            "SELECT line_index, custom_id, status_code, request_id, response, error_code, error_message \
             FROM batch_results WHERE batch_id = $1 ORDER BY line_index",
        )
        .bind(batch_id)
        .fetch_all(self.db.pool())
        .await?;
        rows.into_iter()
            .map(|(line_index, custom_id, status_code, request_id, response, error_code, error_message)| {
                let response = response
                    .map(|text| serde_json::from_str(&text))
                    .transpose()
                    .map_err(|err| StoreError::InvalidInput(format!("unreadable batch result: {err}")))?;
                Ok(LineResult {
                    line_index: u64::try_from(line_index).unwrap_or(0),
                    custom_id,
                    status_code: u16::try_from(status_code).unwrap_or(0),
                    request_id,
                    response,
                    error: error_code.map(|code| (code, error_message.unwrap_or_default())),
                })
            })
            .collect()
    }

    /// The indexes of a batch's answered lines.
    pub async fn answered_lines(&self, batch_id: &str) -> Result<Vec<u64>> {
        let rows: Vec<i64> =
            sqlx::query_scalar("SELECT line_index FROM batch_results WHERE batch_id = $1 ORDER BY line_index")
                .bind(batch_id)
                .fetch_all(self.db.pool())
                .await?;
        Ok(rows.into_iter().filter_map(|i| u64::try_from(i).ok()).collect())
    }
}
