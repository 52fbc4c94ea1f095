//! OpenAI's fine-tuning API: `POST /v1/fine_tuning/jobs`, `GET /v1/fine_tuning/jobs`,
//! `GET /v1/fine_tuning/jobs/{id}`, `POST /v1/fine_tuning/jobs/{id}/cancel`,
//! `GET /v1/fine_tuning/jobs/{id}/events`, and the trainer that runs jobs in the
//! background.
//!
//! A job trains a base model version of the repository (safetensors, Llama family) on a
//! `fine-tune` file (JSONL in OpenAI's chat or prompt/completion format) with LoRA
//! (default) or full fine-tuning ([`maas_engine::train`]). Every node runs one trainer
//! ([`spawn_trainer`]): it claims a job with a lease in SQL (as batches do), places it on
//! one of the node's GPUs through the control plane (`PutTrainingJob`, which refuses a GPU
//! without the memory: SCH-1), trains on a blocking thread, writes every step's loss as an
//! event (the console draws the curve live), checkpoints the trained tensors to a blob every
//! few steps (a node that dies is resumed from its last checkpoint by whichever node takes
//! the lease next: ING-1), and at the end registers the merged model as a new version owned
//! by the job's owner, ready to deploy.
//!
//! **GPU time** is metered while the job holds its GPUs: GPU seconds (wall time times GPUs
//! held) are usage records of kind `training`, costed by the base model's GPU-hour price,
//! and the owner's `gpu_hours_per_month` quota is checked when a job is created and every
//! few seconds while it trains: a job that uses the quota up is stopped (failed with
//! `quota_exceeded`) within one metering period, which is the overshoot QUO-1 allows. A job
//! on a node without GPUs runs on the CPU and uses no GPU time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use maas_consensus::state::{Command, JobId, NodeId, TrainingJobPlacement, TrainingJobState};
use maas_engine::train::{Example, Method, TrainSettings, Trainer, example_from_json};
use maas_store::repo::fine_tuning::{JobEvent, JobRecord, JobStatus, NewJob, Progress};
use maas_store::repo::models::{ModelFile, NewModelVersion};
use maas_store::{Digest, TenantScope};
use rand::seq::SliceRandom as _;
use rand::{SeedableRng as _, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::registry::stores;
use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::metering::Work;
use crate::state::{AppState, Stores};

/// How long a trainer's claim on a job lasts without renewal, and how often it renews.
const LEASE_MS: i64 = 30_000;
/// How often GPU time is metered and the GPU-hours quota checked, and the lease renewed.
const METER_EVERY: Duration = Duration::from_secs(2);
/// How often an idle trainer looks for work.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Steps between checkpoints.
const CHECKPOINT_EVERY: u64 = 10;
/// The most examples a training file may hold.
const MAX_EXAMPLES: usize = 100_000;
/// The longest example trained, in tokens (shorter when the model's context is).
const MAX_EXAMPLE_TOKENS: usize = 2048;

/// The jobs this node has said it waits for GPU memory for.
static WAITING_SAID: std::sync::Mutex<Option<std::collections::HashSet<String>>> = std::sync::Mutex::new(None);

/// The base learning rates `learning_rate_multiplier` scales.
const LORA_LEARNING_RATE: f64 = 2e-4;
const FULL_LEARNING_RATE: f64 = 2e-5;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let create = warp::path!("v1" / "fine_tuning" / "jobs")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::json_body::<CreateJob>(64 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: CreateJob| async move {
            create_job(&s, &c, request).await.map_err(warp::reject::custom)
        });
    let list = warp::path!("v1" / "fine_tuning" / "jobs")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::query::<super::batches::ListQuery>())
        .and_then(|s: Arc<AppState>, c: Caller, query: super::batches::ListQuery| async move {
            list_jobs(&s, &c, query).await.map_err(warp::reject::custom)
        });
    let get = warp::path!("v1" / "fine_tuning" / "jobs" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            get_job(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    let cancel = warp::path!("v1" / "fine_tuning" / "jobs" / String / "cancel")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            cancel_job(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    let events = warp::path!("v1" / "fine_tuning" / "jobs" / String / "events")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::query::<EventsQuery>())
        .and_then(|id: String, s: Arc<AppState>, c: Caller, query: EventsQuery| async move {
            list_events(&s, &c, &id, query).await.map_err(warp::reject::custom)
        });
    create.or(list).unify().or(get).unify().or(cancel).unify().or(events).unify().boxed()
}

// ---- requests and answers ----

/// A number, or `"auto"` for the platform's choice (OpenAI's hyperparameter values).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AutoOr<T> {
    Value(T),
    Auto(AutoWord),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoWord {
    Auto,
}

/// A hyperparameter's value as the document shows it: a number, or `"auto"`.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum NumberOrAuto {
    Number(f64),
    Auto(AutoWord),
}

impl<T: Copy> AutoOr<T> {
    fn or(value: Option<Self>, default: T) -> T {
        match value {
            Some(AutoOr::Value(v)) => v,
            _ => default,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    /// Passes over the training file (1 to 50; `auto`: 3).
    #[serde(default)]
    #[schema(value_type = Option<NumberOrAuto>)]
    pub n_epochs: Option<AutoOr<u32>>,
    /// Examples per step (1 to 64; `auto`: 4).
    #[serde(default)]
    #[schema(value_type = Option<NumberOrAuto>)]
    pub batch_size: Option<AutoOr<u32>>,
    /// Scales the base learning rate (2e-4 for LoRA, 2e-5 for full fine-tuning; `auto`: 1).
    #[serde(default)]
    #[schema(value_type = Option<NumberOrAuto>)]
    pub learning_rate_multiplier: Option<AutoOr<f64>>,
}

/// OpenAI's `method`: only `supervised` is offered.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MethodRequest {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub supervised: Option<SupervisedRequest>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SupervisedRequest {
    #[serde(default)]
    pub hyperparameters: Option<Hyperparameters>,
}

/// What is trained (maas's extension): LoRA adapters (default) or every weight.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Tuning {
    Lora {
        /// Rank of the adapters (1 to 256; default 8).
        #[serde(default = "default_rank")]
        rank: u32,
        /// Scale numerator: updates are scaled by alpha / rank (default 16).
        #[serde(default = "default_alpha")]
        alpha: f64,
    },
    Full,
}

fn default_rank() -> u32 {
    8
}

fn default_alpha() -> f64 {
    16.0
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// The base model: `name` (its newest version) or `name:version`, a safetensors model
    /// of the Llama family from the repository.
    pub model: String,
    /// A file uploaded with purpose `fine-tune`.
    pub training_file: String,
    /// A `fine-tune` file whose loss is reported after each epoch.
    #[serde(default)]
    pub validation_file: Option<String>,
    #[serde(default)]
    pub hyperparameters: Option<Hyperparameters>,
    /// Up to 40 letters, digits, `-` or `_`, in the trained model's name.
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub method: Option<MethodRequest>,
    /// LoRA (default) or full fine-tuning.
    #[serde(default)]
    pub tuning: Option<Tuning>,
    /// Accepted for SDK compatibility; only an empty list is.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub integrations: Option<Vec<Value>>,
    /// Accepted for SDK compatibility (OpenAI's string pairs); not stored yet.
    #[serde(default)]
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(default)]
    pub limit: Option<u32>,
    /// An event id: list the events after it.
    #[serde(default)]
    pub after: Option<String>,
}

/// How a job trains, as stored with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobSettings {
    tuning: Tuning,
    n_epochs: u32,
    batch_size: u32,
    learning_rate_multiplier: f64,
    learning_rate: f64,
    seed: u64,
    examples: u64,
    /// The API key the job was created with (its usage is the key's too).
    key_id: Option<String>,
    /// The GPU-hours quotas of the creator's subjects: `(subject, hours)`.
    gpu_quotas: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HyperparametersObject {
    pub n_epochs: u32,
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
}

/// OpenAI's fine-tuning job object (times are Unix seconds), with maas's additions: the
/// tuning, progress, GPU time and the node.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobObject {
    pub id: String,
    pub object: &'static str,
    pub model: String,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub fine_tuned_model: Option<String>,
    pub organization_id: String,
    pub status: JobStatus,
    pub hyperparameters: HyperparametersObject,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub result_files: Vec<String>,
    pub trained_tokens: Option<i64>,
    pub error: Option<JobError>,
    pub seed: u64,
    pub suffix: Option<String>,
    pub estimated_finish: Option<i64>,
    pub integrations: Vec<String>,
    pub method: MethodObject,
    /// What is trained (`None` for a job whose settings cannot be read).
    pub tuning: Option<Tuning>,
    pub total_steps: i64,
    pub steps_done: i64,
    pub gpus: i64,
    /// GPU time used so far, in seconds (GPUs held times wall time).
    pub gpu_seconds: f64,
    pub node: Option<String>,
    pub started_at: Option<i64>,
}

impl JobObject {
    fn of(job: JobRecord) -> JobObject {
        let settings: Option<JobSettings> = serde_json::from_value(job.settings.clone()).ok();
        let hyperparameters = settings.as_ref().map_or(
            HyperparametersObject { n_epochs: 0, batch_size: 0, learning_rate_multiplier: 0.0 },
            |s| HyperparametersObject {
                n_epochs: s.n_epochs,
                batch_size: s.batch_size,
                learning_rate_multiplier: s.learning_rate_multiplier,
            },
        );
        #[allow(clippy::cast_precision_loss)]
        let gpu_seconds = job.gpu_ms as f64 / 1000.0;
        JobObject {
            object: "fine_tuning.job",
            organization_id: job.owner.id().to_owned(),
            created_at: job.created_at_ms / 1000,
            finished_at: job.finished_at_ms.map(|ms| ms / 1000),
            started_at: job.started_at_ms.map(|ms| ms / 1000),
            result_files: Vec::new(),
            trained_tokens: (job.status == JobStatus::Succeeded).then_some(job.trained_tokens),
            seed: settings.as_ref().map_or(0, |s| s.seed),
            estimated_finish: None,
            integrations: Vec::new(),
            method: MethodObject {
                kind: "supervised",
                supervised: SupervisedObject { hyperparameters: hyperparameters.clone() },
            },
            tuning: settings.as_ref().map(|s| s.tuning),
            hyperparameters,
            gpu_seconds,
            id: job.id,
            model: job.model,
            fine_tuned_model: job.fine_tuned_model,
            status: job.status,
            training_file: job.training_file,
            validation_file: job.validation_file,
            error: job.error.and_then(|error| serde_json::from_value(error).ok()),
            suffix: job.suffix,
            total_steps: job.total_steps,
            steps_done: job.steps_done,
            gpus: job.gpus,
            node: job.node,
        }
    }
}

/// Why a job failed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// `quota_exceeded`, `invalid_training_file`, `training_failed`, `model_not_found`...
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub param: Option<String>,
}

/// OpenAI's `method` of a job: always `supervised`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MethodObject {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub supervised: SupervisedObject,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SupervisedObject {
    pub hyperparameters: HyperparametersObject,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub object: &'static str,
    pub data: Vec<JobObject>,
    pub has_more: bool,
}

/// OpenAI's fine-tuning event: `message` events for state changes, `metrics` events with
/// `data.step`, `data.train_loss` (and `data.valid_loss` after an epoch).
#[derive(Debug, Serialize, ToSchema)]
pub struct EventObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    pub data: Option<EventMetrics>,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// A `metrics` event's figures.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventMetrics {
    pub step: u64,
    pub total_steps: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_loss: Option<f64>,
}

impl EventObject {
    fn of(event: JobEvent) -> EventObject {
        EventObject {
            id: format!("ftevent-{}", event.seq),
            object: "fine_tuning.job.event",
            created_at: event.created_at_ms / 1000,
            kind: if event.data.is_some() { "metrics" } else { "message" },
            level: event.level,
            message: event.message,
            data: event.data.and_then(|data| serde_json::from_value(data).ok()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub object: &'static str,
    pub data: Vec<EventObject>,
    pub has_more: bool,
}

// ---- handlers ----

fn bad(param: &'static str, message: String) -> ApiError {
    ApiError::bad_request("invalid_input", message).with_param(param)
}

/// Why a training file's lines could not be read.
enum LinesError {
    /// No such file in the scope.
    NotFound,
    /// Not a `fine-tune` file, or its lines are not examples: the reason.
    Invalid(String),
    /// Its bytes are on no reachable node right now.
    Unavailable(String),
}

/// The examples of the `fine-tune` file `id` in `scope`, checked line by line (JSON shape
/// only; the tokenizer checks lengths when the job starts); the bytes are fetched from a
/// peer when the upload landed on another node. Creating a job and starting it both read
/// files through this.
async fn training_lines(
    state: &AppState,
    stores: &Stores,
    scope: &TenantScope,
    id: &str,
) -> Result<Vec<Value>, LinesError> {
    let file = stores.db.files().get(scope, id).await.map_err(|err| match err {
        maas_store::StoreError::NotFound { .. } => LinesError::NotFound,
        other => LinesError::Unavailable(other.to_string()),
    })?;
    if file.purpose != "fine-tune" {
        return Err(LinesError::Invalid(format!(
            "file `{id}` was uploaded with purpose `{}`: fine-tuning needs purpose `fine-tune`",
            file.purpose
        )));
    }
    let digest: Digest =
        file.sha256.parse().map_err(|_| LinesError::Invalid(format!("file `{id}` has a bad digest")))?;
    let size = u64::try_from(file.size_bytes).unwrap_or(0);
    let peers = crate::knowledge::ingest::peer_apis(state);
    let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
    maas_actors::models::fetch_blob(&stores.blobs, &digest, size, &peers, &cookie)
        .await
        .map_err(LinesError::Unavailable)?;
    let bytes = stores.blobs.read(&digest).await.map_err(|e| LinesError::Unavailable(e.to_string()))?;
    parse_lines(&bytes).map_err(LinesError::Invalid)
}

/// [`training_lines`] for a request: 404, 400 or 503 naming the parameter.
async fn read_training_file(
    state: &AppState,
    stores: &Stores,
    scope: &TenantScope,
    id: &str,
    param: &'static str,
) -> Result<Vec<Value>, ApiError> {
    training_lines(state, stores, scope, id).await.map_err(|err| match err {
        LinesError::NotFound => {
            ApiError::not_found(format!("file `{id}` not found: upload it with POST /v1/files")).with_param(param)
        }
        LinesError::Invalid(message) => ApiError::bad_request("invalid_training_file", message).with_param(param),
        LinesError::Unavailable(reason) => {
            ApiError::unavailable(format!("file `{id}` cannot be read right now ({reason}); retry shortly"))
        }
    })
}

/// The JSON lines of a training file, each checked for OpenAI's shapes.
fn parse_lines(bytes: &[u8]) -> Result<Vec<Value>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the file is not UTF-8 text".to_owned())?;
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| format!("line {number}: not valid JSON: {e}"))?;
        let shaped = match &value {
            Value::Object(map) if map.contains_key("messages") => map["messages"].as_array().is_some_and(|messages| {
                messages.iter().any(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
            }),
            Value::Object(map) => {
                map.get("prompt").is_some_and(Value::is_string) && map.get("completion").is_some_and(Value::is_string)
            }
            _ => false,
        };
        if !shaped {
            return Err(format!(
                "line {number}: expected {{\"messages\": [...]}} with an assistant message, or {{\"prompt\": \"...\", \"completion\": \"...\"}}"
            ));
        }
        lines.push(value);
        if lines.len() > MAX_EXAMPLES {
            return Err(format!("the file holds more than {MAX_EXAMPLES} examples"));
        }
    }
    if lines.is_empty() {
        return Err("the file holds no examples".into());
    }
    Ok(lines)
}

/// The first day of `now_ms`'s UTC month, in milliseconds.
fn month_start_ms(now_ms: i64) -> i64 {
    const DAY_MS: i64 = 86_400_000;
    let (year, month, _) = maas_store::quota::window::civil_from_days(now_ms.div_euclid(DAY_MS));
    maas_store::quota::window::days_from_civil(year, month, 1) * DAY_MS
}

/// The first GPU-hours quota used up, as a 429 naming it.
async fn gpu_quota_exceeded(stores: &Stores, quotas: &[(String, u64)]) -> Result<Option<ApiError>, ApiError> {
    let now = maas_store::ids::now_ms();
    for (subject, hours) in quotas {
        let used = stores.db.usage().gpu_seconds_since(subject, month_start_ms(now)).await?;
        if used >= hours.saturating_mul(3600) {
            let window = maas_store::quota::window::Window::month(now);
            let exceeded = maas_store::quota::QuotaExceeded {
                subject: subject.clone(),
                limit: "gpu_hours_per_month",
                max: *hours,
                used: used / 3600,
                retry_after_secs: window.retry_after_secs(now),
            };
            return Ok(Some(crate::metering::quota_error(&exceeded)));
        }
    }
    Ok(None)
}

/// Creates a fine-tuning job: the base model and the files are checked, the GPU-hours
/// quota must have room, and the job is `queued` until a node's trainer takes it.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", tag = "fine-tuning", request_body = CreateJob,
    responses((status = 200, body = JobObject), (status = 400, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
pub async fn create_job(state: &AppState, caller: &Caller, request: CreateJob) -> Result<Response, ApiError> {
    caller.require_deployer()?;
    let stores = stores(state)?;
    if let Some(method) = &request.method
        && method.kind != "supervised"
    {
        return Err(bad("method", format!("method {:?} is not offered: use \"supervised\"", method.kind)));
    }
    if request.integrations.as_ref().is_some_and(|list| !list.is_empty()) {
        return Err(bad("integrations", "integrations are not offered".into()));
    }
    if let Some(suffix) = &request.suffix
        && (suffix.is_empty()
            || suffix.len() > 40
            || !suffix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(bad("suffix", format!("suffix {suffix:?} must be 1 to 40 letters, digits, `-` or `_`")));
    }
    let hyper = request
        .hyperparameters
        .clone()
        .or_else(|| request.method.as_ref().and_then(|m| m.supervised.as_ref()).and_then(|s| s.hyperparameters.clone()))
        .unwrap_or_default();
    let n_epochs = AutoOr::or(hyper.n_epochs, 3);
    let batch_size = AutoOr::or(hyper.batch_size, 4);
    let multiplier = AutoOr::or(hyper.learning_rate_multiplier, 1.0);
    if !(1..=50).contains(&n_epochs) {
        return Err(bad("hyperparameters.n_epochs", format!("n_epochs must be 1 to 50, not {n_epochs}")));
    }
    if !(1..=64).contains(&batch_size) {
        return Err(bad("hyperparameters.batch_size", format!("batch_size must be 1 to 64, not {batch_size}")));
    }
    if !(multiplier.is_finite() && multiplier > 0.0 && multiplier <= 1000.0) {
        return Err(bad(
            "hyperparameters.learning_rate_multiplier",
            format!("learning_rate_multiplier must be above 0 and at most 1000, not {multiplier}"),
        ));
    }
    let tuning = request.tuning.unwrap_or(Tuning::Lora { rank: default_rank(), alpha: default_alpha() });
    if let Tuning::Lora { rank, alpha } = tuning
        && !((1..=256).contains(&rank) && alpha.is_finite() && alpha > 0.0)
    {
        return Err(bad("tuning", format!("a LoRA rank must be 1 to 256 and alpha above 0 (got {rank} and {alpha})")));
    }
    let (name, version) = request.model.split_once(':').unwrap_or((&request.model, maas_store::repo::models::LATEST));
    let owner = caller.scope.acting_as().clone();
    let record = stores.db.models().find_for(Some(&owner), name, version).await.map_err(|_| {
        ApiError::not_found(format!("model `{}` is not in the repository you can use", request.model))
            .with_param("model")
    })?;
    if record.metadata.format != "safetensors" || record.metadata.tasks.iter().any(|t| t == "embedding") {
        return Err(bad(
            "model",
            format!(
                "model `{}:{}` is {} ({}): fine-tuning trains Llama-family chat or completion models in safetensors",
                record.name, record.version, record.metadata.format, record.metadata.architecture
            ),
        ));
    }
    let examples = read_training_file(state, stores, &caller.scope, &request.training_file, "training_file").await?;
    if let Some(validation) = &request.validation_file {
        read_training_file(state, stores, &caller.scope, validation, "validation_file").await?;
    }
    let gpu_quotas: Vec<(String, u64)> = caller
        .quotas
        .iter()
        .filter(|check| check.limits.gpu_hours_per_month > 0)
        .map(|check| (check.subject.clone(), check.limits.gpu_hours_per_month))
        .collect();
    if let Some(exceeded) = gpu_quota_exceeded(stores, &gpu_quotas).await? {
        return Err(exceeded);
    }
    let base_rate = if matches!(tuning, Tuning::Full) { FULL_LEARNING_RATE } else { LORA_LEARNING_RATE };
    let steps_per_epoch = examples.len().div_ceil(batch_size as usize) as u64;
    let settings = JobSettings {
        tuning,
        n_epochs,
        batch_size,
        learning_rate_multiplier: multiplier,
        learning_rate: base_rate * multiplier,
        // Below 2^32, as OpenAI's seeds are: exact in every JSON reader.
        seed: request.seed.unwrap_or_else(|| u64::from(rand::random::<u32>())),
        examples: examples.len() as u64,
        key_id: caller.key_id().map(str::to_owned),
        gpu_quotas,
    };
    let new = NewJob {
        model: format!("{}:{}", record.name, record.version),
        training_file: request.training_file,
        validation_file: request.validation_file,
        settings: serde_json::to_value(&settings).map_err(|e| ApiError::internal(e.to_string()))?,
        suffix: request.suffix,
        total_steps: steps_per_epoch * u64::from(n_epochs),
    };
    let job = stores.db.fine_tuning_jobs().create(&caller.scope, new).await?;
    tracing::info!(job = %job.id, model = %job.model, steps = job.total_steps, "fine-tuning job created");
    let detail = json!({"model": job.model, "training_file": job.training_file});
    super::auth::audit(state, caller.audit_entry("fine_tuning.create", &job.id, detail)).await?;
    Ok(warp::reply::json(&JobObject::of(job)).into_response())
}

/// The caller's fine-tuning jobs, newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", tag = "fine-tuning",
    params(("limit" = Option<u32>, Query, description = "1 to 100, default 20"), ("after" = Option<String>, Query, description = "a job id: list older jobs")),
    responses((status = 200, body = JobList), (status = 400, body = crate::error::ErrorBody)))]
pub async fn list_jobs(
    state: &AppState,
    caller: &Caller,
    query: super::batches::ListQuery,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(bad("limit", format!("limit must be 1 to 100, not {limit}")));
    }
    let mut jobs = stores(state)?.db.fine_tuning_jobs().list(&caller.scope, limit + 1, query.after.as_deref()).await?;
    let has_more = jobs.len() > limit as usize;
    jobs.truncate(limit as usize);
    let data = jobs.into_iter().map(JobObject::of).collect();
    Ok(warp::reply::json(&JobList { object: "list", data, has_more }).into_response())
}

/// One fine-tuning job, with its progress and GPU time.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{id}", tag = "fine-tuning", params(("id" = String, Path, description = "the job id")),
    responses((status = 200, body = JobObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_job(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let job = stores(state)?.db.fine_tuning_jobs().get(&caller.scope, id).await?;
    Ok(warp::reply::json(&JobObject::of(job)).into_response())
}

/// Cancels a queued or running job; its trainer stops within a step. A job that ended
/// otherwise is a 409.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{id}/cancel", tag = "fine-tuning", params(("id" = String, Path, description = "the job id")),
    responses((status = 200, body = JobObject), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn cancel_job(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let job = stores(state)?.db.fine_tuning_jobs().cancel(&caller.scope, id).await?;
    super::auth::audit(state, caller.audit_entry("fine_tuning.cancel", &job.id, Value::Null)).await?;
    Ok(warp::reply::json(&JobObject::of(job)).into_response())
}

/// A job's events, oldest first (OpenAI lists newest first; this list is a log to follow:
/// pass the last id as `after` to get what came since).
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{id}/events", tag = "fine-tuning",
    params(("id" = String, Path, description = "the job id"), ("limit" = Option<u32>, Query, description = "1 to 1000, default 100"),
        ("after" = Option<String>, Query, description = "an event id: list the events after it")),
    responses((status = 200, body = EventList), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn list_events(
    state: &AppState,
    caller: &Caller,
    id: &str,
    query: EventsQuery,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(bad("limit", format!("limit must be 1 to 1000, not {limit}")));
    }
    let after = match query.after.as_deref() {
        None => 0,
        Some(text) => text
            .strip_prefix("ftevent-")
            .and_then(|n| n.parse::<i64>().ok())
            .ok_or_else(|| bad("after", format!("after {text:?} is not an event id")))?,
    };
    let mut events = stores(state)?.db.fine_tuning_jobs().events(&caller.scope, id, after, limit + 1).await?;
    let has_more = events.len() > limit as usize;
    events.truncate(limit as usize);
    let data = events.into_iter().map(EventObject::of).collect();
    Ok(warp::reply::json(&EventList { object: "list", data, has_more }).into_response())
}

// ---- the trainer ----

/// Starts this node's trainer; `worker_id` names the node in leases (the same across
/// restarts of a node, different between nodes).
pub fn spawn_trainer(state: Arc<AppState>, worker_id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Some(stores) = state.stores.get().filter(|_| state.readiness.is_ready()).cloned() else {
                tokio::time::sleep(POLL_EVERY).await;
                continue;
            };
            let now = maas_store::ids::now_ms();
            match stores.db.fine_tuning_jobs().claim(&worker_id, now, now + LEASE_MS).await {
                Ok(Some(id)) => {
                    let outcome = run_job(&state, &stores, &worker_id, &id).await;
                    release_gpus(&state, &id).await;
                    if let Err(err) = outcome {
                        tracing::warn!(job = %id, error = %err, "fine-tuning stopped; it is taken up again");
                        let _ = stores.db.fine_tuning_jobs().release(&id, &worker_id).await;
                        tokio::time::sleep(POLL_EVERY * 8).await;
                    }
                }
                Ok(None) => tokio::time::sleep(POLL_EVERY).await,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot look for fine-tuning work");
                    tokio::time::sleep(POLL_EVERY * 4).await;
                }
            }
        }
    })
}

/// What the training thread reports.
enum Report {
    Step { step: u64, loss: f32, tokens: usize },
    Checkpoint { path: PathBuf, step: u64 },
    Validation { step: u64, loss: f32 },
    Done { model_dir: PathBuf },
}

/// Why a job ends here (other than an error to retry).
enum Ending {
    Succeeded(String),
    Failed {
        code: &'static str,
        message: String,
    },
    /// Cancelled by its owner, or the lease passed to another node: nothing more to write.
    Stopped,
}

/// Trains one claimed job until it ends. An `Err` leaves the job to be taken up again.
#[allow(clippy::too_many_lines)]
async fn run_job(state: &Arc<AppState>, stores: &Stores, worker_id: &str, id: &str) -> Result<(), String> {
    let jobs = stores.db.fine_tuning_jobs();
    let job = jobs.get_any(id).await.map_err(|e| e.to_string())?;
    let settings: JobSettings = match serde_json::from_value(job.settings.clone()) {
        Ok(settings) => settings,
        Err(err) => {
            return fail(stores, worker_id, &job, "invalid_settings", format!("unreadable settings: {err}")).await;
        }
    };
    let scope = match jobs.scope_of(&job).await {
        Ok(scope) => scope,
        Err(err) => return fail(stores, worker_id, &job, "owner_unavailable", err.to_string()).await,
    };
    let prepared = match prepare(state, stores, &scope, &job).await {
        Ok(prepared) => prepared,
        Err(Prepare::Permanent(code, message)) => return fail(stores, worker_id, &job, code, message).await,
        Err(Prepare::Transient(message)) => return Err(message),
    };
    let Some(gpus) = place(state, &job, &prepared, &settings).await? else {
        // No GPU of this node has the memory now: another node, or this one later.
        let _ = jobs.release(id, worker_id).await;
        tokio::time::sleep(POLL_EVERY * 8).await;
        return Ok(());
    };
    let node = state.node_name.clone();
    if !jobs.mark_running(id, worker_id, &node, gpus).await.map_err(|e| e.to_string())? {
        return Ok(());
    }
    let start_message = if job.steps_done > 0 {
        format!("Fine-tuning job resumed from step {} on {node}", job.steps_done)
    } else {
        format!("Fine-tuning job started on {node} ({gpus} GPU)")
    };
    jobs.add_event(id, "info", &start_message, None).await.map_err(|e| e.to_string())?;

    let checkpoint = match &job.checkpoint_sha256 {
        Some(sha) => match checkpoint_file(stores, sha, &prepared.work_dir).await {
            Ok(path) => Some(path),
            Err(reason) => {
                // The node that wrote it is gone: the job starts again from its first step.
                let message =
                    format!("The checkpoint after step {} cannot be read ({reason}): starting over", job.steps_done);
                jobs.add_event(id, "warn", &message, None).await.map_err(|e| e.to_string())?;
                None
            }
        },
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let plan = TrainingPlan {
        model_dir: prepared.model_dir.clone(),
        work_dir: prepared.work_dir.clone(),
        examples: prepared.examples,
        validation: prepared.validation,
        settings: settings.clone(),
        total_steps: u64::try_from(job.total_steps).unwrap_or(0),
        checkpoint,
    };
    let thread_stop = Arc::clone(&stop);
    let training = tokio::task::spawn_blocking(move || train(&plan, &thread_stop, &sender));

    let work =
        Work::for_owner(&job.owner, "fine_tuning").acting_for(&job.created_by_user_id, settings.key_id.as_deref());
    let base_name = job.model.split_once(':').map_or(job.model.as_str(), |(name, _)| name).to_owned();
    let mut meter = GpuMeter::new(gpus);
    let mut ticks = tokio::time::interval(METER_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut trained_tokens = u64::try_from(job.trained_tokens).unwrap_or(0);
    let mut ending: Option<Ending> = None;
    let mut done_dir = None;
    loop {
        tokio::select! {
            report = receiver.recv() => match report {
                Some(Report::Step { step, loss, tokens }) => {
                    trained_tokens += tokens as u64;
                    let data = json!({"step": step, "train_loss": loss, "total_steps": job.total_steps});
                    let message = format!("Step {step}/{}: training loss={loss:.4}", job.total_steps);
                    jobs.add_event(id, "info", &message, Some(&data)).await.map_err(|e| e.to_string())?;
                }
                Some(Report::Validation { step, loss }) => {
                    let data = json!({"step": step, "valid_loss": loss, "total_steps": job.total_steps});
                    let message = format!("Step {step}/{}: validation loss={loss:.4}", job.total_steps);
                    jobs.add_event(id, "info", &message, Some(&data)).await.map_err(|e| e.to_string())?;
                }
                Some(Report::Checkpoint { path, step }) => {
                    let sha = put_file(stores, &path).await?;
                    let _ = tokio::fs::remove_file(&path).await;
                    let progress = Progress { steps_done: step, trained_tokens, checkpoint_sha256: Some(sha) };
                    if !jobs.record_progress(id, worker_id, &progress).await.map_err(|e| e.to_string())? {
                        stop.store(true, Ordering::SeqCst);
                        ending.get_or_insert(Ending::Stopped);
                    }
                }
                Some(Report::Done { model_dir }) => done_dir = Some(model_dir),
                None => break,
            },
            _ = ticks.tick() => {
                meter.record(state, stores, id, &work, &base_name).await;
                if ending.is_none() {
                    let lease = jobs.renew(id, worker_id, maas_store::ids::now_ms() + LEASE_MS).await.unwrap_or(true);
                    if !lease {
                        ending = Some(Ending::Stopped);
                    } else if let Ok(Some(exceeded)) = gpu_quota_exceeded(stores, &settings.gpu_quotas).await {
                        ending = Some(Ending::Failed { code: "quota_exceeded", message: exceeded.message });
                    }
                    if ending.is_some() {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
    }
    let result = training.await.map_err(|e| format!("the training thread failed: {e}"))?;
    meter.record(state, stores, id, &work, &base_name).await;
    let ending = match (ending, result, done_dir) {
        (Some(ending), _, _) => ending,
        (None, Err(message), _) => Ending::Failed { code: "training_failed", message },
        (None, Ok(()), Some(dir)) => match register(stores, &scope, &job, &base_name, &dir).await {
            Ok(model) => Ending::Succeeded(model),
            Err(message) => return Err(message),
        },
        (None, Ok(()), None) => Ending::Stopped,
    };
    match ending {
        Ending::Succeeded(model) => {
            let steps_done = u64::try_from(job.total_steps).unwrap_or(0);
            let progress = Progress { steps_done, trained_tokens, checkpoint_sha256: None };
            jobs.record_progress(id, worker_id, &progress).await.map_err(|e| e.to_string())?;
            if jobs.finish(id, worker_id, JobStatus::Succeeded, Some(&model), None).await.map_err(|e| e.to_string())? {
                let message = format!("The job has successfully completed: {model}");
                jobs.add_event(id, "info", &message, None).await.map_err(|e| e.to_string())?;
                tracing::info!(job = %id, model = %model, "fine-tuning job succeeded");
            }
        }
        Ending::Failed { code, message } => fail(stores, worker_id, &job, code, message).await?,
        Ending::Stopped => {}
    }
    let _ = tokio::fs::remove_dir_all(&prepared.work_dir).await;
    Ok(())
}

/// Ends a job as failed with `code` and `message` (also an error event).
async fn fail(stores: &Stores, worker_id: &str, job: &JobRecord, code: &str, message: String) -> Result<(), String> {
    let jobs = stores.db.fine_tuning_jobs();
    let error = json!({"code": code, "message": message, "param": null});
    if jobs.finish(&job.id, worker_id, JobStatus::Failed, None, Some(&error)).await.map_err(|e| e.to_string())? {
        jobs.add_event(&job.id, "error", &format!("Fine-tuning failed: {message}"), None)
            .await
            .map_err(|e| e.to_string())?;
        tracing::warn!(job = %job.id, code, reason = %message, "fine-tuning job failed");
    }
    Ok(())
}

/// GPU time of a running job, metered as it passes.
struct GpuMeter {
    gpus: u64,
    since: Instant,
    /// Milliseconds of GPU time not yet added to the job.
    recorded_seconds: u64,
    total_ms: u64,
}

impl GpuMeter {
    fn new(gpus: u64) -> GpuMeter {
        GpuMeter { gpus, since: Instant::now(), recorded_seconds: 0, total_ms: 0 }
    }

    /// Adds the GPU time since the last call to the job, and its whole seconds to usage.
    async fn record(&mut self, state: &Arc<AppState>, stores: &Stores, id: &str, work: &Work, model: &str) {
        if self.gpus == 0 {
            return;
        }
        let now = Instant::now();
        let elapsed = u64::try_from(now.duration_since(self.since).as_millis()).unwrap_or(u64::MAX);
        self.since = now;
        let added = elapsed.saturating_mul(self.gpus);
        self.total_ms += added;
        if let Err(err) = stores.db.fine_tuning_jobs().add_gpu_ms(id, added).await {
            tracing::warn!(job = %id, error = %err, "recording GPU time failed");
        }
        let seconds = self.total_ms / 1000 - self.recorded_seconds;
        if seconds > 0 {
            self.recorded_seconds += seconds;
            // Written at once (not batched): the quota check reads it next.
            if let Err(err) = work.record_gpu_seconds(state, model, seconds).await {
                tracing::warn!(job = %id, error = %err, "recording GPU usage failed");
            }
        }
    }
}

/// A job's inputs on this node.
struct Prepared {
    model_dir: PathBuf,
    work_dir: PathBuf,
    examples: Vec<Example>,
    validation: Vec<Example>,
    config: maas_engine::config::ModelConfig,
    /// The longest example, in tokens.
    max_tokens: usize,
}

enum Prepare {
    Permanent(&'static str, String),
    Transient(String),
}

/// Fetches the base model's files and tokenises the training files.
async fn prepare(state: &AppState, stores: &Stores, scope: &TenantScope, job: &JobRecord) -> Result<Prepared, Prepare> {
    let (name, version) = job.model.split_once(':').unwrap_or((&job.model, maas_store::repo::models::LATEST));
    let record = stores
        .db
        .models()
        .find_for(Some(&job.owner), name, version)
        .await
        .map_err(|e| Prepare::Permanent("model_not_found", e.to_string()))?;
    let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
    maas_actors::models::fetch_missing(&stores.blobs, &record, &crate::knowledge::ingest::peer_apis(state), &cookie)
        .await
        .map_err(Prepare::Transient)?;
    let model_dir = maas_actors::models::materialise(&stores.blobs, &stores.data_dir, &record.files)
        .await
        .map_err(Prepare::Transient)?;
    let mut files = Vec::new();
    for (file_id, param) in std::iter::once((&job.training_file, "training_file"))
        .chain(job.validation_file.as_ref().map(|f| (f, "validation_file")))
    {
        let lines = training_lines(state, stores, scope, file_id).await.map_err(|err| match err {
            LinesError::NotFound => Prepare::Permanent("invalid_training_file", format!("{param} {file_id} is gone")),
            LinesError::Invalid(message) => Prepare::Permanent("invalid_training_file", format!("{param}: {message}")),
            LinesError::Unavailable(reason) => Prepare::Transient(reason),
        })?;
        files.push(lines);
    }
    let dir = model_dir.clone();
    let tokenized = tokio::task::spawn_blocking(move || tokenize(&dir, &files))
        .await
        .map_err(|e| Prepare::Transient(format!("the tokenising thread failed: {e}")))?
        .map_err(|m| Prepare::Permanent("invalid_training_file", m))?;
    let (examples, validation, config) = tokenized;
    let max_tokens = examples.iter().chain(&validation).map(|e| e.tokens.len()).max().unwrap_or(1);
    let work_dir = stores.data_dir.join("fine_tuning").join(&job.id);
    tokio::fs::create_dir_all(&work_dir).await.map_err(|e| Prepare::Transient(e.to_string()))?;
    Ok(Prepared { model_dir, work_dir, examples, validation, config, max_tokens })
}

/// The training examples, the validation examples, and the model's shape.
type Tokenized = (Vec<Example>, Vec<Example>, maas_engine::config::ModelConfig);

/// Tokenises the training (and validation) lines with the model's tokenizer and template.
fn tokenize(model_dir: &Path, files: &[Vec<Value>]) -> Result<Tokenized, String> {
    let tokenizer = maas_engine::tokenizer::ModelTokenizer::load(model_dir).map_err(|e| e.to_string())?;
    let config = maas_engine::config::ModelConfig::from_hf(
        model_dir,
        &serde_json::from_slice(&std::fs::read(model_dir.join("config.json")).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let max_tokens = config.context_length.min(MAX_EXAMPLE_TOKENS);
    let mut out = Vec::new();
    for (which, lines) in files.iter().enumerate() {
        let mut examples = Vec::with_capacity(lines.len());
        for (index, line) in lines.iter().enumerate() {
            let example = example_from_json(&tokenizer, line, max_tokens).map_err(|e| {
                format!("{} example {}: {e}", if which == 0 { "training" } else { "validation" }, index + 1)
            })?;
            examples.push(example);
        }
        out.push(examples);
    }
    let validation = if out.len() > 1 { out.pop().unwrap_or_default() } else { Vec::new() };
    let examples = out.pop().unwrap_or_default();
    Ok((examples, validation, config))
}

/// Places a job on one of this node's GPUs through the control plane: `Some(gpus held)`,
/// `Some(0)` on a node without GPUs (it trains on the CPU), `None` when no GPU has room.
async fn place(
    state: &AppState,
    job: &JobRecord,
    prepared: &Prepared,
    settings: &JobSettings,
) -> Result<Option<u64>, String> {
    let handle = crate::routes::cluster::control_plane(state).map_err(|e| e.message)?;
    let node_id = NodeId(handle.id());
    let reserve = state.gpu_reserve_mib.get().copied().unwrap_or(0);
    let memory = maas_engine::train::memory_estimate_mib(
        &prepared.config,
        matches!(settings.tuning, Tuning::Full),
        prepared.max_tokens,
    );
    let mut candidates: Vec<(u64, u32)> = handle.read_local(|cluster| {
        let Some(node) = cluster.node(node_id) else { return Vec::new() };
        node.resources
            .gpus
            .iter()
            .map(|gpu| (cluster.free_gpu_memory_mib(node_id, gpu.index).unwrap_or(0), gpu.index))
            .collect()
    });
    let job_id = JobId(job.id.clone());
    if candidates.is_empty() {
        let placement = TrainingJobPlacement {
            job_id: job_id.clone(),
            base_model: job.model.clone(),
            node_id,
            gpu_indices: Vec::new(),
            memory_per_gpu_mib: 0,
        };
        let command = Command::PutTrainingJob { placement, gpu_reserve_mib: reserve, at_ms: now_u64() };
        let _ = handle.propose(command).await.map_err(|e| e.to_string())?;
        return Ok(Some(0));
    }
    // The GPU with the most room first.
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, index) in candidates {
        let placement = TrainingJobPlacement {
            job_id: job_id.clone(),
            base_model: job.model.clone(),
            node_id,
            gpu_indices: vec![index],
            memory_per_gpu_mib: memory,
        };
        let command = Command::PutTrainingJob { placement, gpu_reserve_mib: reserve, at_ms: now_u64() };
        if handle.propose(command).await.map_err(|e| e.to_string())?.is_ok() {
            let running = Command::SetTrainingJobState {
                job_id: job_id.clone(),
                state: TrainingJobState::Running,
                at_ms: now_u64(),
            };
            let _ = handle.propose(running).await.map_err(|e| e.to_string())?;
            return Ok(Some(1));
        }
    }
    let jobs = state.stores().map_err(|e| e.message)?.db.fine_tuning_jobs();
    // Said once per job and node, not at every try.
    let first =
        WAITING_SAID.lock().map_or(true, |mut said| said.get_or_insert_with(Default::default).insert(job.id.clone()));
    if first {
        let message = format!("Waiting for {memory} MiB on a GPU of {}", state.node_name);
        let _ = jobs.add_event(&job.id, "warn", &message, None).await;
    }
    Ok(None)
}

/// Gives a job's GPUs back (removes its placement from the control plane).
async fn release_gpus(state: &AppState, id: &str) {
    let Ok(handle) = crate::routes::cluster::control_plane(state) else { return };
    let job_id = JobId(id.to_owned());
    if handle.read_local(|cluster| cluster.training_job(&job_id).is_some()) {
        let _ = handle.propose(Command::RemoveTrainingJob { job_id, at_ms: now_u64() }).await;
    }
}

fn now_u64() -> u64 {
    u64::try_from(maas_store::ids::now_ms()).unwrap_or(0)
}

/// A checkpoint blob of this node's blob store as a local file. (A checkpoint is written
/// where the job trained: a job taken over by another node after its node died starts
/// again, with a warning event.)
async fn checkpoint_file(stores: &Stores, sha: &str, work_dir: &Path) -> Result<PathBuf, String> {
    let digest: Digest = sha.parse().map_err(|_| format!("checkpoint digest {sha} is bad"))?;
    let bytes = stores.blobs.read(&digest).await.map_err(|e| format!("checkpoint {sha}: {e}"))?;
    let path = work_dir.join("resume.safetensors");
    tokio::fs::write(&path, bytes).await.map_err(|e| e.to_string())?;
    Ok(path)
}

/// Stores a file as a blob; its sha256.
async fn put_file(stores: &Stores, path: &Path) -> Result<String, String> {
    let file = tokio::fs::File::open(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
    let info = stores.blobs.put(file, None).await.map_err(|e| e.to_string())?;
    Ok(info.digest.to_hex())
}

/// Registers the trained model folder as a version of `<base>-<suffix>` (default
/// `<base>-ft`) owned by the job's owner; returns `name:version`.
async fn register(
    stores: &Stores,
    scope: &TenantScope,
    job: &JobRecord,
    base_name: &str,
    dir: &Path,
) -> Result<String, String> {
    let mut files = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await.map_err(|e| e.to_string())?;
    while let Some(entry) = entries.next_entry().await.map_err(|e| e.to_string())? {
        let path = entry.path();
        let file = tokio::fs::File::open(&path).await.map_err(|e| e.to_string())?;
        let info = stores.blobs.put(file, None).await.map_err(|e| e.to_string())?;
        files.push(ModelFile {
            path: entry.file_name().to_string_lossy().into_owned(),
            sha256: info.digest.to_hex(),
            size_bytes: info.size_bytes,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let checked = maas_actors::models::check_model(dir.to_owned()).await?;
    let metadata = maas_actors::models::metadata_of(&checked);
    let name = format!("{base_name}-{}", job.suffix.as_deref().unwrap_or("ft"));
    let version = job.id.clone();
    let new = NewModelVersion {
        name: name.clone(),
        version: Some(version.clone()),
        description: format!("{} fine-tuned by {}", job.model, job.id),
        metadata,
        files,
    };
    match stores.db.models().register_in(scope, new).await {
        Ok(record) => Ok(format!("{}:{}", record.name, record.version)),
        // Registered by an earlier try that stopped before finishing the job.
        Err(maas_store::StoreError::Conflict(_)) => Ok(format!("{name}:{version}")),
        Err(err) => Err(err.to_string()),
    }
}

/// What the training thread needs.
struct TrainingPlan {
    model_dir: PathBuf,
    work_dir: PathBuf,
    examples: Vec<Example>,
    validation: Vec<Example>,
    settings: JobSettings,
    total_steps: u64,
    checkpoint: Option<PathBuf>,
}

/// Trains on this thread from the checkpoint's step to the last, reporting each step,
/// checkpointing every [`CHECKPOINT_EVERY`] steps, until done or told to stop.
fn train(
    plan: &TrainingPlan,
    stop: &AtomicBool,
    reports: &tokio::sync::mpsc::UnboundedSender<Report>,
) -> Result<(), String> {
    let settings = &plan.settings;
    let method = match settings.tuning {
        Tuning::Lora { rank, alpha } => Method::Lora { rank: usize::try_from(rank).unwrap_or(1), alpha },
        Tuning::Full => Method::Full,
    };
    let train_settings = TrainSettings { method, learning_rate: settings.learning_rate, seed: settings.seed };
    // GPU placement reserves the memory; the compute runs where candle runs this build
    // (the CPU in the default build).
    let device = maas_engine::Device::Cpu;
    let mut trainer = Trainer::load(&plan.model_dir, train_settings, &device).map_err(|e| e.to_string())?;
    if let Some(checkpoint) = &plan.checkpoint {
        trainer.load_checkpoint(checkpoint).map_err(|e| e.to_string())?;
    }
    let batch_size = settings.batch_size as usize;
    let steps_per_epoch = plan.examples.len().div_ceil(batch_size) as u64;
    let send = |report: Report| reports.send(report).map_err(|_| "the job's runner stopped".to_owned());
    while trainer.steps() < plan.total_steps {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let taken = trainer.steps();
        let epoch = taken / steps_per_epoch;
        let in_epoch = usize::try_from(taken % steps_per_epoch).unwrap_or(0);
        // Each epoch visits the examples in its own seeded order, so a resumed job takes
        // the same batches it would have.
        let mut order: Vec<usize> = (0..plan.examples.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(settings.seed.wrapping_add(epoch)));
        let batch: Vec<Example> =
            order.iter().skip(in_epoch * batch_size).take(batch_size).map(|i| plan.examples[*i].clone()).collect();
        let report = trainer.step(&batch).map_err(|e| e.to_string())?;
        let done = trainer.steps();
        send(Report::Step { step: done, loss: report.loss, tokens: report.tokens })?;
        let end_of_epoch = done % steps_per_epoch == 0;
        if end_of_epoch
            && !plan.validation.is_empty()
            && let Some(loss) = trainer.evaluate(&plan.validation).map_err(|e| e.to_string())?
        {
            send(Report::Validation { step: done, loss })?;
        }
        if (done % CHECKPOINT_EVERY == 0 || end_of_epoch) && done < plan.total_steps {
            let path = plan.work_dir.join(format!("checkpoint-{done}.safetensors"));
            trainer.save_checkpoint(&path).map_err(|e| e.to_string())?;
            send(Report::Checkpoint { path, step: done })?;
        }
    }
    let model_dir = plan.work_dir.join("model");
    trainer.write_model(&model_dir).map_err(|e| e.to_string())?;
    send(Report::Done { model_dir })
}
