//! Fine-tuning jobs (OpenAI's fine-tuning API) and their events. The rows are
//! tenant-owned: the routes' queries take a [`TenantScope`]. The trainer's queries
//! (claiming a job with a lease, recording progress, finishing) are the node's own and take
//! none; the trainer acts for a job's owner through [`FineTuningJobs::scope_of`].
//!
//! **Invariant:** only the lease holder records progress or finishes a job (every such
//! update names the worker), and a job that ended (succeeded, failed, cancelled) never
//! changes again, so a cancelled job cannot be finished as succeeded by a trainer that had
//! not noticed yet.

use serde::Serialize;
use serde_json::Value;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::repo::lease::Leases;
use crate::tenant::{Owner, TenantScope, trusted_sql};

/// Where a job is in its life, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "validating_files" => JobStatus::ValidatingFiles,
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            other => return Err(StoreError::InvalidInput(format!("unknown job status `{other}` in the database"))),
        })
    }

    /// Whether the job has ended (no trainer touches it again).
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// The statuses a trainer claims.
const ACTIVE_STATUSES: &str = "('validating_files', 'queued', 'running')";

const LEASES: Leases = Leases { table: "fine_tuning_jobs", active: ACTIVE_STATUSES };

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: String,
    pub owner: Owner,
    pub created_by_user_id: String,
    /// The base model version, `name:version`.
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// How it trains (method, epochs, batch size, learning rate...), as the API wrote it.
    pub settings: Value,
    pub suffix: Option<String>,
    pub status: JobStatus,
    /// `{code, message, param}` of a failed job.
    pub error: Option<Value>,
    /// The trained model, `name:version`, once it succeeded.
    pub fine_tuned_model: Option<String>,
    pub total_steps: i64,
    pub steps_done: i64,
    pub trained_tokens: i64,
    /// GPU time used: milliseconds times GPUs held.
    pub gpu_ms: i64,
    pub gpus: i64,
    pub node: Option<String>,
    pub checkpoint_sha256: Option<String>,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub settings: Value,
    pub suffix: Option<String>,
    pub total_steps: u64,
}

/// One event of a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobEvent {
    pub seq: i64,
    pub level: String,
    pub message: String,
    pub data: Option<Value>,
    pub created_at_ms: i64,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    owner_kind: String,
    owner_id: String,
    created_by_user_id: String,
    model: String,
    training_file: String,
    validation_file: Option<String>,
    settings: String,
    suffix: Option<String>,
    status: String,
    error: Option<String>,
    fine_tuned_model: Option<String>,
    total_steps: i64,
    steps_done: i64,
    trained_tokens: i64,
    gpu_ms: i64,
    gpus: i64,
    node: Option<String>,
    checkpoint_sha256: Option<String>,
    created_at_ms: i64,
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
}

const JOB_COLUMNS: &str = "j.id, j.owner_kind, j.owner_id, j.created_by_user_id, j.model, j.training_file, \
     j.validation_file, j.settings, j.suffix, j.status, j.error, j.fine_tuned_model, j.total_steps, j.steps_done, \
     j.trained_tokens, j.gpu_ms, j.gpus, j.node, j.checkpoint_sha256, j.created_at_ms, j.started_at_ms, j.finished_at_ms";

fn job_from_row(row: JobRow) -> Result<JobRecord> {
    let corrupt = |what: &str, err: serde_json::Error| {
        StoreError::InvalidInput(format!("fine-tuning job `{}` has unreadable {what} in the database: {err}", row.id))
    };
    let settings = serde_json::from_str(&row.settings).map_err(|e| corrupt("settings", e))?;
    let error = row.error.as_deref().map(serde_json::from_str).transpose().map_err(|e| corrupt("error", e))?;
    Ok(JobRecord {
        owner: Owner::from_columns(&row.owner_kind, row.owner_id)?,
        status: JobStatus::parse(&row.status)?,
        settings,
        error,
        id: row.id,
        created_by_user_id: row.created_by_user_id,
        model: row.model,
        training_file: row.training_file,
        validation_file: row.validation_file,
        suffix: row.suffix,
        fine_tuned_model: row.fine_tuned_model,
        total_steps: row.total_steps,
        steps_done: row.steps_done,
        trained_tokens: row.trained_tokens,
        gpu_ms: row.gpu_ms,
        gpus: row.gpus,
        node: row.node,
        checkpoint_sha256: row.checkpoint_sha256,
        created_at_ms: row.created_at_ms,
        started_at_ms: row.started_at_ms,
        finished_at_ms: row.finished_at_ms,
    })
}

/// Progress a trainer made: steps taken, tokens trained, and the checkpoint after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub steps_done: u64,
    pub trained_tokens: u64,
    pub checkpoint_sha256: Option<String>,
}

pub struct FineTuningJobs<'a> {
    pub(crate) db: &'a Db,
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| StoreError::InvalidInput(format!("{what} {value} is too large")))
}

impl FineTuningJobs<'_> {
    /// Records a job owned by the scope's acting owner, `queued` until a trainer takes it.
    pub async fn create(&self, scope: &TenantScope, new: NewJob) -> Result<JobRecord> {
        let id = new_id("ftjob");
        let owner = scope.acting_as();
        sqlx::query(
            "INSERT INTO fine_tuning_jobs (id, owner_kind, owner_id, created_by_user_id, model, training_file, \
             validation_file, settings, suffix, status, total_steps, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', $10, $11)",
        )
        .bind(&id)
        .bind(owner.kind())
        .bind(owner.id())
        .bind(scope.user_id())
        .bind(&new.model)
        .bind(&new.training_file)
        .bind(&new.validation_file)
        .bind(new.settings.to_string())
        .bind(&new.suffix)
        .bind(to_i64(new.total_steps, "steps")?)
        .bind(now_ms())
        .execute(self.db.pool())
        .await?;
        self.add_event(&id, "info", &format!("Created fine-tuning job: {id}"), None).await?;
        self.get(scope, &id).await
    }

    /// A job the scope may read; another tenant's job is reported as not found.
    pub async fn get(&self, scope: &TenantScope, id: &str) -> Result<JobRecord> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs j WHERE j.id = $2 AND {}",
            TenantScope::readable_sql("j", 1)
        );
        let row: Option<JobRow> =
            sqlx::query_as(trusted_sql(sql)).bind(scope.user_id()).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(job_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound { what: "fine-tuning job", id: id.to_owned() })
    }

    /// The jobs of the scope's acting owner, newest first: at most `limit`, and only those
    /// older than the job `after` when given (OpenAI's cursor).
    pub async fn list(&self, scope: &TenantScope, limit: u32, after: Option<&str>) -> Result<Vec<JobRecord>> {
        let owner = scope.acting_as();
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs j WHERE j.owner_kind = $2 AND j.owner_id = $3 AND j.id < $4 \
             AND {} ORDER BY j.id DESC LIMIT $5",
            TenantScope::readable_sql("j", 1)
        );
        let rows: Vec<JobRow> = sqlx::query_as(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(owner.kind())
            .bind(owner.id())
            .bind(after.unwrap_or("~"))
            .bind(i64::from(limit))
            .fetch_all(self.db.pool())
            .await?;
        rows.into_iter().map(job_from_row).collect()
    }

    /// Cancels a job that has not ended; its trainer notices and stops. Cancelling a
    /// cancelled job changes nothing; a job that succeeded or failed is a conflict.
    pub async fn cancel(&self, scope: &TenantScope, id: &str) -> Result<JobRecord> {
        let job = self.get(scope, id).await?;
        if job.status == JobStatus::Cancelled {
            return Ok(job);
        }
        if job.status.is_final() {
            return Err(StoreError::Conflict(format!(
                "fine-tuning job `{id}` has {}: only a queued or running job can be cancelled",
                job.status.as_str()
            )));
        }
        let sql = format!(
            "UPDATE fine_tuning_jobs SET status = 'cancelled', finished_at_ms = $3 \
             WHERE id = $2 AND status IN {ACTIVE_STATUSES} AND {}",
            TenantScope::writable_sql("fine_tuning_jobs", 1)
        );
        let changed = sqlx::query(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(id)
            .bind(now_ms())
            .execute(self.db.pool())
            .await?
            .rows_affected();
        let now = self.get(scope, id).await?;
        if changed == 1 {
            self.add_event(id, "info", "Fine-tuning job cancelled", None).await?;
        } else if !now.status.is_final() {
            return Err(StoreError::Forbidden(format!(
                "only the owner, or an owner or admin of its organisation, may cancel fine-tuning job `{id}`"
            )));
        }
        Ok(now)
    }

    /// A job's events, oldest first, after the event numbered `after`, at most `limit`.
    pub async fn events(&self, scope: &TenantScope, id: &str, after: i64, limit: u32) -> Result<Vec<JobEvent>> {
        self.get(scope, id).await?;
        let rows: Vec<(i64, String, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT seq, level, message, data, created_at_ms FROM fine_tuning_events \
             WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(self.db.pool())
        .await?;
        rows.into_iter()
            .map(|(seq, level, message, data, created_at_ms)| {
                let data = data
                    .map(|text| serde_json::from_str(&text))
                    .transpose()
                    .map_err(|err| StoreError::InvalidInput(format!("unreadable event data: {err}")))?;
                Ok(JobEvent { seq, level, message, data, created_at_ms })
            })
            .collect()
    }

    // ---- the trainer's side: the node's own queries ----

    /// Appends an event to a job (numbered after its last one).
    pub async fn add_event(&self, id: &str, level: &str, message: &str, data: Option<&Value>) -> Result<()> {
        // Only a job's trainer and its owner's cancel write events; a rare collision of
        // the two takes the next number.
        for _ in 0..3 {
            let inserted = sqlx::query(
                "INSERT INTO fine_tuning_events (job_id, seq, level, message, data, created_at_ms) \
                 SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5 FROM fine_tuning_events WHERE job_id = $1 \
                 ON CONFLICT (job_id, seq) DO NOTHING",
            )
            .bind(id)
            .bind(level)
            .bind(message)
            .bind(data.map(Value::to_string))
            .bind(now_ms())
            .execute(self.db.pool())
            .await?
            .rows_affected();
            if inserted == 1 {
                return Ok(());
            }
        }
        Err(StoreError::Conflict(format!("could not number an event of fine-tuning job `{id}`")))
    }

    /// Claims one job with work left for `worker` until `lease_until_ms` ([`Leases::claim`],
    /// as batches do); returns the job's id.
    pub async fn claim(&self, worker: &str, now_ms: i64, lease_until_ms: i64) -> Result<Option<String>> {
        LEASES.claim(self.db, worker, now_ms, lease_until_ms).await
    }

    /// Extends `worker`'s lease; false when it no longer holds it or the job ended
    /// (cancelled), so the trainer must stop.
    pub async fn renew(&self, id: &str, worker: &str, lease_until_ms: i64) -> Result<bool> {
        LEASES.renew(self.db, id, worker, lease_until_ms).await
    }

    /// Gives a lease up (the job waits for another try).
    pub async fn release(&self, id: &str, worker: &str) -> Result<()> {
        LEASES.release(self.db, id, worker).await
    }

    /// A job by id, for the trainer.
    pub async fn get_any(&self, id: &str) -> Result<JobRecord> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM fine_tuning_jobs j WHERE j.id = $1");
        let row: Option<JobRow> = sqlx::query_as(trusted_sql(sql)).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(job_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound { what: "fine-tuning job", id: id.to_owned() })
    }

    /// The scope of the user who created the job, acting as its owner: the trainer reads
    /// the training file and registers the trained model in it (TEN-1).
    pub async fn scope_of(&self, job: &JobRecord) -> Result<TenantScope> {
        TenantScope::resolve(self.db, &job.created_by_user_id, Some(job.owner.clone())).await
    }

    /// Marks a job `running` on `node` with `gpus` GPUs (also when it resumes).
    pub async fn mark_running(&self, id: &str, worker: &str, node: &str, gpus: u64) -> Result<bool> {
        let sql = format!(
            "UPDATE fine_tuning_jobs SET status = 'running', node = $1, gpus = $2, \
             started_at_ms = COALESCE(started_at_ms, $3) WHERE id = $4 AND lease_owner = $5 AND status IN {ACTIVE_STATUSES}"
        );
        let changed = sqlx::query(trusted_sql(sql))
            .bind(node)
            .bind(to_i64(gpus, "gpus")?)
            .bind(now_ms())
            .bind(id)
            .bind(worker)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        Ok(changed == 1)
    }

    /// Records progress (and the checkpoint after it) of a job `worker` holds; false when
    /// it no longer does or the job ended.
    pub async fn record_progress(&self, id: &str, worker: &str, progress: &Progress) -> Result<bool> {
        let sql = format!(
            "UPDATE fine_tuning_jobs SET steps_done = $1, trained_tokens = $2, \
             checkpoint_sha256 = COALESCE($3, checkpoint_sha256) \
             WHERE id = $4 AND lease_owner = $5 AND status IN {ACTIVE_STATUSES}"
        );
        let changed = sqlx::query(trusted_sql(sql))
            .bind(to_i64(progress.steps_done, "steps")?)
            .bind(to_i64(progress.trained_tokens, "tokens")?)
            .bind(&progress.checkpoint_sha256)
            .bind(id)
            .bind(worker)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        Ok(changed == 1)
    }

    /// Adds GPU time to a job (whatever its status: time used before a cancel counts).
    pub async fn add_gpu_ms(&self, id: &str, gpu_ms: u64) -> Result<()> {
        sqlx::query("UPDATE fine_tuning_jobs SET gpu_ms = gpu_ms + $1 WHERE id = $2")
            .bind(to_i64(gpu_ms, "GPU time")?)
            .bind(id)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// Ends a job `worker` holds: `succeeded` with its model, or `failed` with its error.
    /// False when the job had ended already (cancelled meanwhile) or the lease was lost.
    pub async fn finish(
        &self,
        id: &str,
        worker: &str,
        status: JobStatus,
        fine_tuned_model: Option<&str>,
        error: Option<&Value>,
    ) -> Result<bool> {
        if !matches!(status, JobStatus::Succeeded | JobStatus::Failed) {
            return Err(StoreError::InvalidInput(format!("a trainer cannot finish a job as {}", status.as_str())));
        }
        let sql = format!(
            "UPDATE fine_tuning_jobs SET status = $1, finished_at_ms = $2, fine_tuned_model = $3, error = $4, \
             lease_owner = NULL, lease_expires_at_ms = NULL WHERE id = $5 AND lease_owner = $6 AND status IN {ACTIVE_STATUSES}"
        );
        let changed = sqlx::query(trusted_sql(sql))
            .bind(status.as_str())
            .bind(now_ms())
            .bind(fine_tuned_model)
            .bind(error.map(Value::to_string))
            .bind(id)
            .bind(worker)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        Ok(changed == 1)
    }
}
