//! OpenAI's Batch API: `POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{id}`,
//! `POST /v1/batches/{id}/cancel`, and the worker that runs batches in the background.
//!
//! A batch's input is a `batch` file (JSONL, one request a line, checked at upload by
//! [`BatchInputChecker`]). Every node runs one worker ([`spawn_worker`]): it claims a
//! batch with a lease in SQL (one node of a cluster works on a batch; a node that dies
//! stops renewing, and the lease passes on when it expires), runs the unanswered lines
//! in-process through the inference handlers with a small concurrency, commits each
//! line's result as it finishes (so a restart goes on with the rest and never answers a
//! line twice), and at the end writes the output and error files and ends the batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use maas_store::Digest;
use maas_store::TenantScope;
use maas_store::repo::batches::{BatchRecord, BatchStatus, LineResult, NewBatch};
use maas_store::repo::files::NewFile;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::files::BATCH_OUTPUT_PURPOSE;
use super::registry::stores;
use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::state::{AppState, Stores};

/// The endpoints a batch may run.
pub const BATCH_ENDPOINTS: &[&str] = &["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// The most requests one batch file may hold (OpenAI's limit).
pub const MAX_BATCH_LINES: usize = 50_000;

/// The one completion window offered (OpenAI's).
pub const COMPLETION_WINDOW: &str = "24h";
const COMPLETION_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

/// How many lines of a batch run at once on a node.
pub const LINE_CONCURRENCY: usize = 4;

/// How long a worker's claim on a batch lasts without renewal, and how often it renews.
const LEASE_MS: i64 = 30_000;
const LEASE_RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often an idle worker looks for work, and a running one for a cancellation.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// A line that got a transient answer (no ready replica, a full queue) waits this long
/// before it is tried again; it is not answered until it gets a final one.
const RETRY_AFTER: Duration = Duration::from_millis(250);
/// A line that failed inside the node (500) is tried this many times before its error is
/// its answer.
const MAX_INTERNAL_ATTEMPTS: u32 = 3;

// ---- the input file ----

/// One request of a batch file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLine {
    pub custom_id: String,
    pub method: String,
    pub url: String,
    pub body: Value,
}

/// Checks a batch file line by line, holding only the custom ids seen, so a large file
/// is checked as it streams. Blank lines are skipped; line numbers count from 1 over
/// every line of the file.
#[derive(Debug, Default)]
pub struct BatchInputChecker {
    lines_read: usize,
    /// custom_id -> the line number it was first seen on.
    custom_ids: HashMap<String, usize>,
}

impl BatchInputChecker {
    /// Lines read so far, blank ones included.
    pub fn lines_read(&self) -> usize {
        self.lines_read
    }

    /// Requests accepted so far.
    pub fn requests(&self) -> usize {
        self.custom_ids.len()
    }

    /// Checks the next line; returns its request (`None` for a blank line) or a message
    /// that names the line and the problem.
    pub fn check(&mut self, line: &str) -> Result<Option<BatchLine>, String> {
        self.lines_read += 1;
        let number = self.lines_read;
        if line.trim().is_empty() {
            return Ok(None);
        }
        if self.custom_ids.len() >= MAX_BATCH_LINES {
            return Err(format!("line {number}: a batch file holds at most {MAX_BATCH_LINES} requests"));
        }
        let value: Value = serde_json::from_str(line).map_err(|err| format!("line {number}: not valid JSON: {err}"))?;
        if !value.is_object() {
            return Err(format!("line {number}: each line must be a JSON object with custom_id, method, url and body"));
        }
        let request: BatchLine = serde_json::from_value(value).map_err(|err| format!("line {number}: {err}"))?;
        if request.custom_id.is_empty() || request.custom_id.len() > 512 {
            return Err(format!("line {number}: custom_id must be 1 to 512 bytes long"));
        }
        if request.method != "POST" {
            return Err(format!("line {number}: method must be \"POST\", not {:?}", request.method));
        }
        if !BATCH_ENDPOINTS.contains(&request.url.as_str()) {
            return Err(format!("line {number}: url {:?} is not one of {}", request.url, BATCH_ENDPOINTS.join(", ")));
        }
        if !request.body.is_object() {
            return Err(format!("line {number}: body must be a JSON object (the request of {})", request.url));
        }
        if let Some(first) = self.custom_ids.get(&request.custom_id) {
            return Err(format!(
                "line {number}: custom_id {:?} is already used on line {first}: each request needs its own",
                request.custom_id
            ));
        }
        self.custom_ids.insert(request.custom_id.clone(), number);
        Ok(Some(request))
    }

    /// Ends the check: a file without any request is refused.
    pub fn finish(self) -> Result<(), String> {
        if self.custom_ids.is_empty() {
            return Err("the file holds no requests: a batch file has one JSON request per line".into());
        }
        Ok(())
    }
}

/// Reads a stored batch file's requests, with the line number of each.
async fn read_batch_file(stores: &Stores, sha256: &str) -> Result<Vec<(usize, BatchLine)>, String> {
    use tokio::io::AsyncBufReadExt as _;
    let digest: Digest = sha256.parse().map_err(|err| format!("{err}"))?;
    let reader =
        stores.blobs.open_blob(&digest).await.map_err(|err| format!("the input file cannot be read: {err}"))?;
    let mut lines = tokio::io::BufReader::new(reader).lines();
    let mut checker = BatchInputChecker::default();
    let mut requests = Vec::new();
    while let Some(line) = lines.next_line().await.map_err(|err| format!("the input file cannot be read: {err}"))? {
        if let Some(request) = checker.check(&line)? {
            requests.push((checker.lines_read(), request));
        }
    }
    checker.finish()?;
    Ok(requests)
}

// ---- the routes ----

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let create = warp::path!("v1" / "batches")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::json_body::<CreateBatch>(1024 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: CreateBatch| async move {
            create_batch(&s, &c, request).await.map_err(warp::reject::custom)
        });
    let list = warp::path!("v1" / "batches")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::query::<ListQuery>())
        .and_then(|s: Arc<AppState>, c: Caller, query: ListQuery| async move {
            list_batches(&s, &c, query).await.map_err(warp::reject::custom)
        });
    let get = warp::path!("v1" / "batches" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            get_batch(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    let cancel = warp::path!("v1" / "batches" / String / "cancel")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            cancel_batch(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    create.or(list).unify().or(get).unify().or(cancel).unify().boxed()
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    /// A file uploaded with purpose `batch`.
    pub input_file_id: String,
    /// `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`; every line's `url`.
    pub endpoint: String,
    /// `24h`.
    pub completion_window: String,
    /// Up to 16 string pairs for the caller's own use.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, Value>>,
    /// OpenAI's expiry policy for the output files; accepted so SDK calls that set it
    /// work, but files do not expire yet.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub output_expires_after: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

/// OpenAI's batch object; times are Unix seconds.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchObject {
    pub id: String,
    pub object: &'static str,
    pub endpoint: String,
    #[schema(value_type = Option<Object>)]
    pub errors: Option<Value>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatusName,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// `validating`, `in_progress`, `finalizing`, `completed`, `failed`, `cancelling`,
/// `cancelled` or `expired`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(transparent)]
pub struct BatchStatusName(pub &'static str);

impl From<BatchRecord> for BatchObject {
    fn from(batch: BatchRecord) -> Self {
        let seconds = |ms: Option<i64>| ms.map(|ms| ms / 1000);
        BatchObject {
            object: "batch",
            errors: batch.errors.map(|data| json!({"object": "list", "data": data})),
            status: BatchStatusName(batch.status.as_str()),
            created_at: batch.created_at_ms / 1000,
            in_progress_at: seconds(batch.in_progress_at_ms),
            expires_at: batch.expires_at_ms / 1000,
            finalizing_at: seconds(batch.finalizing_at_ms),
            completed_at: seconds(batch.completed_at_ms),
            failed_at: seconds(batch.failed_at_ms),
            expired_at: seconds(batch.expired_at_ms),
            cancelling_at: seconds(batch.cancelling_at_ms),
            cancelled_at: seconds(batch.cancelled_at_ms),
            request_counts: RequestCounts {
                total: batch.total_lines,
                completed: batch.completed_lines,
                failed: batch.failed_lines,
            },
            id: batch.id,
            endpoint: batch.endpoint,
            input_file_id: batch.input_file_id,
            completion_window: batch.completion_window,
            output_file_id: batch.output_file_id,
            error_file_id: batch.error_file_id,
            metadata: batch.metadata,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchList {
    pub object: &'static str,
    pub data: Vec<BatchObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

fn check_metadata(metadata: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    let bad = |message: String| ApiError::bad_request("invalid_metadata", message).with_param("metadata");
    if metadata.len() > 16 {
        return Err(bad(format!("metadata holds at most 16 pairs, not {}", metadata.len())));
    }
    for (key, value) in metadata {
        if key.len() > 64 {
            return Err(bad(format!("metadata key {key:?} is longer than 64 characters")));
        }
        match value {
            Value::String(text) if text.len() <= 512 => {}
            Value::String(_) => return Err(bad(format!("metadata value of {key:?} is longer than 512 characters"))),
            _ => return Err(bad(format!("metadata value of {key:?} must be a string"))),
        }
    }
    Ok(())
}

/// Creates a batch from an uploaded `batch` file; every line's `url` must be the
/// batch's `endpoint`. The batch starts `validating` and runs in the background.
#[utoipa::path(post, path = "/v1/batches", tag = "batches", request_body = CreateBatch,
    responses((status = 200, body = BatchObject), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn create_batch(state: &AppState, caller: &Caller, request: CreateBatch) -> Result<Response, ApiError> {
    if !BATCH_ENDPOINTS.contains(&request.endpoint.as_str()) {
        return Err(ApiError::bad_request(
            "invalid_endpoint",
            format!("endpoint {:?} is not one of {}", request.endpoint, BATCH_ENDPOINTS.join(", ")),
        )
        .with_param("endpoint"));
    }
    if request.completion_window != COMPLETION_WINDOW {
        return Err(ApiError::bad_request(
            "invalid_completion_window",
            format!("completion_window {:?} is not offered: use \"{COMPLETION_WINDOW}\"", request.completion_window),
        )
        .with_param("completion_window"));
    }
    if let Some(metadata) = &request.metadata {
        check_metadata(metadata)?;
    }
    let scope = caller.scope.clone();
    let stores = stores(state)?;
    let file = stores.db.files().get(&scope, &request.input_file_id).await.map_err(|err| match err {
        maas_store::StoreError::NotFound { .. } => ApiError::not_found(format!(
            "input file `{}` not found: upload it with POST /v1/files",
            request.input_file_id
        ))
        .with_param("input_file_id"),
        other => other.into(),
    })?;
    if file.purpose != "batch" {
        return Err(ApiError::bad_request(
            "invalid_input_file",
            format!("file `{}` was uploaded with purpose `{}`: a batch needs purpose `batch`", file.id, file.purpose),
        )
        .with_param("input_file_id"));
    }
    let lines = read_batch_file(stores, &file.sha256)
        .await
        .map_err(|message| ApiError::bad_request("invalid_input_file", message).with_param("input_file_id"))?;
    if let Some((number, line)) = lines.iter().find(|(_, line)| line.url != request.endpoint) {
        return Err(ApiError::bad_request(
            "mismatched_url",
            format!(
                "line {number}: url {:?} differs from the batch's endpoint {:?}: every line must use the endpoint",
                line.url, request.endpoint
            ),
        )
        .with_param("input_file_id"));
    }
    let batch = stores
        .db
        .batches()
        .create(
            &scope,
            NewBatch {
                endpoint: request.endpoint,
                input_file_id: file.id,
                completion_window: request.completion_window,
                window_ms: COMPLETION_WINDOW_MS,
                metadata: request.metadata.map(Value::Object),
                total_lines: lines.len() as u64,
            },
        )
        .await?;
    tracing::info!(batch = %batch.id, lines = batch.total_lines, endpoint = %batch.endpoint, "batch created");
    Ok(warp::reply::json(&BatchObject::from(batch)).into_response())
}

/// The caller's batches, newest first: `limit` (1 to 100, default 20) from after the
/// batch `after`.
#[utoipa::path(get, path = "/v1/batches", tag = "batches",
    params(("limit" = Option<u32>, Query, description = "1 to 100, default 20"), ("after" = Option<String>, Query, description = "a batch id: list older batches")),
    responses((status = 200, body = BatchList), (status = 400, body = crate::error::ErrorBody)))]
pub async fn list_batches(state: &AppState, caller: &Caller, query: ListQuery) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(
            ApiError::bad_request("invalid_limit", format!("limit must be 1 to 100, not {limit}")).with_param("limit")
        );
    }
    let scope = caller.scope.clone();
    let mut batches = stores(state)?.db.batches().list(&scope, limit + 1, query.after.as_deref()).await?;
    let has_more = batches.len() > limit as usize;
    batches.truncate(limit as usize);
    let data: Vec<BatchObject> = batches.into_iter().map(BatchObject::from).collect();
    let first_id = data.first().map(|b| b.id.clone());
    let last_id = data.last().map(|b| b.id.clone());
    Ok(warp::reply::json(&BatchList { object: "list", data, first_id, last_id, has_more }).into_response())
}

/// One batch, with its request counts.
#[utoipa::path(get, path = "/v1/batches/{id}", tag = "batches", params(("id" = String, Path, description = "the batch id")),
    responses((status = 200, body = BatchObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_batch(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let batch = stores(state)?.db.batches().get(&scope, id).await?;
    Ok(warp::reply::json(&BatchObject::from(batch)).into_response())
}

/// Cancels a batch: it is `cancelling` until the lines running finish, then `cancelled`
/// with the answers so far in its output file. A batch that already ended is a 409.
#[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "batches", params(("id" = String, Path, description = "the batch id")),
    responses((status = 200, body = BatchObject), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn cancel_batch(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let batch = stores(state)?.db.batches().cancel(&scope, id).await?;
    tracing::info!(batch = %batch.id, status = batch.status.as_str(), "batch cancellation requested");
    Ok(warp::reply::json(&BatchObject::from(batch)).into_response())
}

// ---- the worker ----

/// Starts this node's batch worker. `worker_id` names the node in leases: it must be the
/// same across restarts of a node (so a restarted node takes its batches back at once)
/// and differ between nodes.
pub fn spawn_worker(state: Arc<AppState>, worker_id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // Lines run through the inference handlers, which need the control plane and
            // the serving table: the worker waits for the node to be ready.
            let Some(stores) = state.stores.get().filter(|_| state.readiness.is_ready()).cloned() else {
                tokio::time::sleep(POLL_EVERY).await;
                continue;
            };
            let now = maas_store::ids::now_ms();
            match stores.db.batches().claim(&worker_id, now, now + LEASE_MS).await {
                Ok(Some(id)) => {
                    if let Err(err) = run_batch(&state, &stores, &worker_id, &id).await {
                        tracing::warn!(batch = %id, error = %err.message, "batch work stopped; it is taken up again");
                        let _ = stores.db.batches().release(&id, &worker_id).await;
                        tokio::time::sleep(POLL_EVERY * 4).await;
                    }
                }
                Ok(None) => tokio::time::sleep(POLL_EVERY).await,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot look for batch work");
                    tokio::time::sleep(POLL_EVERY * 4).await;
                }
            }
        }
    })
}

/// Why a worker stops taking lines of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stop {
    Running = 0,
    Cancelled = 1,
    Expired = 2,
    /// The lease passed to another node: this one must not touch the batch again.
    LeaseLost = 3,
}

#[derive(Debug, Default)]
struct StopFlag(AtomicU8);

impl StopFlag {
    fn get(&self) -> Stop {
        match self.0.load(Ordering::SeqCst) {
            1 => Stop::Cancelled,
            2 => Stop::Expired,
            3 => Stop::LeaseLost,
            _ => Stop::Running,
        }
    }

    fn set(&self, stop: Stop) {
        // The first reason to stop stays: a lost lease wins over everything.
        if stop == Stop::LeaseLost {
            self.0.store(stop as u8, Ordering::SeqCst);
        } else {
            let _ = self.0.compare_exchange(Stop::Running as u8, stop as u8, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

/// Renews the lease and watches for a cancellation or the end of the window, until
/// aborted.
async fn keep_lease(db: maas_store::Db, id: String, worker_id: String, expires_at_ms: i64, stop: Arc<StopFlag>) {
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        if renewed.elapsed() >= LEASE_RENEW_EVERY {
            match db.batches().renew(&id, &worker_id, maas_store::ids::now_ms() + LEASE_MS).await {
                Ok(true) => renewed = tokio::time::Instant::now(),
                Ok(false) => stop.set(Stop::LeaseLost),
                Err(err) => tracing::warn!(batch = %id, error = %err, "cannot renew the batch lease"),
            }
        }
        if let Ok(batch) = db.batches().get_any(&id).await
            && batch.status == BatchStatus::Cancelling
        {
            stop.set(Stop::Cancelled);
        }
        if maas_store::ids::now_ms() >= expires_at_ms {
            stop.set(Stop::Expired);
        }
    }
}

/// Works on a claimed batch until it ends (or its lease is lost).
async fn run_batch(state: &Arc<AppState>, stores: &Stores, worker_id: &str, id: &str) -> Result<(), ApiError> {
    let batches = stores.db.batches();
    let batch = batches.get_any(id).await?;
    let scope = match batches.scope_of(&batch).await {
        Ok(scope) => scope,
        Err(err) => {
            let errors =
                json!([{"code": "owner_unavailable", "message": err.to_string(), "line": null, "param": null}]);
            batches.finish(id, BatchStatus::Failed, None, None, Some(&errors)).await?;
            return Ok(());
        }
    };
    let input = match stores.db.files().get(&scope, &batch.input_file_id).await {
        Ok(file) => read_batch_file(stores, &file.sha256).await,
        Err(err) => Err(format!("the input file is gone: {err}")),
    };
    let lines = match input {
        Ok(lines) => lines,
        Err(message) => {
            let errors =
                json!([{"code": "invalid_input_file", "message": message, "line": null, "param": "input_file_id"}]);
            batches.finish(id, BatchStatus::Failed, None, None, Some(&errors)).await?;
            tracing::warn!(batch = %id, "batch failed: its input file cannot be read");
            return Ok(());
        }
    };
    batches.mark_in_progress(id).await?;
    let stop = Arc::new(StopFlag::default());
    match batch.status {
        BatchStatus::Cancelling => stop.set(Stop::Cancelled),
        _ if maas_store::ids::now_ms() >= batch.expires_at_ms => stop.set(Stop::Expired),
        _ => {}
    }
    let keeper = tokio::spawn(keep_lease(
        stores.db.clone(),
        id.to_owned(),
        worker_id.to_owned(),
        batch.expires_at_ms,
        Arc::clone(&stop),
    ));
    let caller = Caller::internal(scope.clone());
    let answered: HashSet<u64> = batches.answered_lines(id).await?.into_iter().collect();
    let total = lines.len();
    let pending: Vec<(u64, BatchLine)> = lines
        .into_iter()
        .enumerate()
        .map(|(index, (_, line))| (index as u64, line))
        .filter(|(index, _)| !answered.contains(index))
        .collect();
    if !pending.is_empty() {
        tracing::info!(batch = %id, pending = pending.len(), total, "working on a batch");
    }
    let outcomes: Vec<Result<(), ApiError>> = futures_util::stream::iter(pending)
        .map(|(index, line)| run_line(state, &caller, id, &batch.endpoint, index, line, &stop))
        .buffer_unordered(LINE_CONCURRENCY)
        .collect()
        .await;
    keeper.abort();
    outcomes.into_iter().collect::<Result<Vec<()>, ApiError>>()?;

    let final_status = match stop.get() {
        Stop::LeaseLost => {
            tracing::warn!(batch = %id, "another node took the batch over");
            return Ok(());
        }
        Stop::Cancelled => BatchStatus::Cancelled,
        Stop::Expired => BatchStatus::Expired,
        Stop::Running => {
            // A cancellation that came after the last line started still counts.
            if batches.get_any(id).await?.status == BatchStatus::Cancelling {
                BatchStatus::Cancelled
            } else {
                batches.mark_finalizing(id).await?;
                BatchStatus::Completed
            }
        }
    };
    let (output_file_id, error_file_id) = write_output_files(stores, &scope, id).await?;
    batches.finish(id, final_status, output_file_id.as_deref(), error_file_id.as_deref(), None).await?;
    tracing::info!(batch = %id, status = final_status.as_str(), "batch finished");
    Ok(())
}

/// Runs one line until it has a final answer, and commits it. Transient answers (no
/// ready replica yet, a full queue) are retried; the line is skipped once the batch
/// stops. Only a store failure is an error.
async fn run_line(
    state: &Arc<AppState>,
    caller: &Caller,
    batch_id: &str,
    endpoint: &str,
    index: u64,
    line: BatchLine,
    stop: &StopFlag,
) -> Result<(), ApiError> {
    let mut internal_attempts = 0;
    let answer = loop {
        if stop.get() != Stop::Running {
            return Ok(());
        }
        match super::openai::run_json(Arc::clone(state), caller.clone(), endpoint, &line.body).await {
            Ok(body) => break Ok(body),
            Err(err)
                if matches!(
                    err.status,
                    http::StatusCode::SERVICE_UNAVAILABLE | http::StatusCode::TOO_MANY_REQUESTS
                ) =>
            {
                tokio::time::sleep(RETRY_AFTER).await;
            }
            Err(err) if err.status.is_server_error() && internal_attempts + 1 < MAX_INTERNAL_ATTEMPTS => {
                internal_attempts += 1;
                tokio::time::sleep(RETRY_AFTER).await;
            }
            Err(err) => break Err(err),
        }
    };
    let request_id = format!("req_{}", uuid::Uuid::now_v7().simple());
    let result = match answer {
        Ok(body) => LineResult {
            line_index: index,
            custom_id: line.custom_id,
            status_code: 200,
            request_id,
            response: Some(body),
            error: None,
        },
        Err(err) => LineResult {
            line_index: index,
            custom_id: line.custom_id,
            status_code: err.status.as_u16(),
            response: Some(serde_json::to_value(err.body()).unwrap_or(Value::Null)),
            request_id,
            error: Some((err.code.to_owned(), err.message)),
        },
    };
    state.stores()?.db.batches().record_result(batch_id, &result).await?;
    Ok(())
}

/// Writes the output file (answered lines, input order) and the error file (failed
/// lines) of a batch as files of its owner; each is `None` when it would be empty.
async fn write_output_files(
    stores: &Stores,
    scope: &TenantScope,
    batch_id: &str,
) -> Result<(Option<String>, Option<String>), ApiError> {
    let results = stores.db.batches().results(batch_id).await?;
    let mut output = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        let id = format!("batch_req_{}", result.request_id.trim_start_matches("req_"));
        let response =
            json!({"status_code": result.status_code, "request_id": result.request_id, "body": result.response});
        let (target, error) = match &result.error {
            None => (&mut output, Value::Null),
            Some((code, message)) => (&mut errors, json!({"code": code, "message": message})),
        };
        let line = json!({"id": id, "custom_id": result.custom_id, "response": response, "error": error});
        serde_json::to_writer(&mut *target, &line).map_err(|err| ApiError::internal(err.to_string()))?;
        target.push(b'\n');
    }
    let output_file_id = write_output_file(stores, scope, batch_id, "output", &output).await?;
    let error_file_id = write_output_file(stores, scope, batch_id, "error", &errors).await?;
    Ok((output_file_id, error_file_id))
}

/// Stores one output file of a batch; `None` when it would be empty.
async fn write_output_file(
    stores: &Stores,
    scope: &TenantScope,
    batch_id: &str,
    kind: &str,
    bytes: &[u8],
) -> Result<Option<String>, ApiError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let info = stores.blobs.put_bytes(bytes).await?;
    let new = NewFile {
        filename: format!("{batch_id}_{kind}.jsonl"),
        purpose: BATCH_OUTPUT_PURPOSE.to_owned(),
        size_bytes: info.size_bytes,
        sha256: info.digest.to_hex(),
    };
    Ok(Some(stores.db.files().create(scope, new).await?.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(custom_id: &str, url: &str) -> String {
        json!({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", "messages": []}})
            .to_string()
    }

    #[test]
    fn batch_files_are_checked_line_by_line() {
        let good = line("a", "/v1/chat/completions");
        let table: Vec<(Vec<String>, Option<&str>)> = vec![
            (vec![good.clone(), String::new(), line("b", "/v1/embeddings")], None),
            (vec![good.clone(), "{".into()], Some("line 2: not valid JSON")),
            (vec!["[1]".into()], Some("line 1: each line must be a JSON object")),
            (vec![good.clone(), good.clone()], Some("line 2: custom_id \"a\" is already used on line 1")),
            (vec![line("a", "/v1/images")], Some("line 1: url \"/v1/images\" is not one of")),
            (
                vec![json!({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}).to_string()],
                Some("line 1: method must be \"POST\""),
            ),
            (
                vec![json!({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": 3}).to_string()],
                Some("line 1: body must be a JSON object"),
            ),
            (
                vec![json!({"method": "POST", "url": "/v1/completions", "body": {}}).to_string()],
                Some("line 1: missing field `custom_id`"),
            ),
            (
                vec![
                    json!({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}, "x": 1})
                        .to_string(),
                ],
                Some("line 1: unknown field `x`"),
            ),
            (vec![String::new()], Some("the file holds no requests")),
        ];
        for (lines, want) in table {
            let mut checker = BatchInputChecker::default();
            let outcome = lines.iter().try_for_each(|l| checker.check(l).map(|_| ())).and_then(|()| checker.finish());
            match (outcome, want) {
                (Ok(()), None) => {}
                (Err(message), Some(want)) => assert!(message.starts_with(want), "{message} should start with {want}"),
                (outcome, want) => panic!("{lines:?}: got {outcome:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_batch_file_holds_at_most_50000_requests() {
        let mut checker = BatchInputChecker::default();
        for index in 0..MAX_BATCH_LINES {
            checker.check(&line(&index.to_string(), "/v1/completions")).unwrap();
        }
        let refused = checker.check(&line("one-more", "/v1/completions")).unwrap_err();
        assert!(refused.starts_with("line 50001: a batch file holds at most 50000 requests"), "{refused}");
    }
}
