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

/// The largest batch file, in bytes (OpenAI's limit is 200 MB).
pub const MAX_BATCH_FILE_BYTES: u64 = 200 * 1024 * 1024;

/// The longest line of a batch file, in bytes, line end excluded: one request with its
/// body. A line is read whole before it is parsed, so this bounds the memory one line
/// takes; it is well above any request the inference routes accept.
pub const MAX_BATCH_LINE_BYTES: usize = 4 * 1024 * 1024;

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
    pub fn finish(&self) -> Result<(), String> {
        if self.custom_ids.is_empty() {
            return Err("the file holds no requests: a batch file has one JSON request per line".into());
        }
        Ok(())
    }
}

/// Why a stored batch file cannot be used.
#[derive(Debug)]
pub(crate) enum BatchFileError {
    /// The file breaks a rule of batch files (a bad line, a limit): the client's to fix.
    /// The message names the line where there is one.
    Invalid(String),
    /// The bytes cannot be read on this node (a disk error, a corrupt blob).
    Unreadable(String),
}

/// Reads a stored batch file one line at a time, checking each line (and the file's
/// limits) as it goes: a line is parsed only once it is known to be at most
/// [`MAX_BATCH_LINE_BYTES`] long, and nothing but the custom ids seen is kept, so neither
/// the upload check nor the worker ever holds a whole file in memory.
pub(crate) struct BatchFileReader {
    reader: tokio::io::BufReader<maas_store::BlobReader>,
    checker: BatchInputChecker,
    line: Vec<u8>,
}

impl BatchFileReader {
    /// Opens the local blob `digest` as a batch file; a file over
    /// [`MAX_BATCH_FILE_BYTES`] is refused before anything is read.
    pub(crate) async fn open(blobs: &maas_store::BlobStore, digest: &Digest) -> Result<Self, BatchFileError> {
        let reader = blobs
            .open_blob(digest)
            .await
            .map_err(|err| BatchFileError::Unreadable(format!("the file cannot be read: {err}")))?;
        if reader.size_bytes() > MAX_BATCH_FILE_BYTES {
            return Err(BatchFileError::Invalid(format!(
                "the file has {} bytes: a batch file holds at most {MAX_BATCH_FILE_BYTES} bytes (200 MiB); split it into several batches",
                reader.size_bytes()
            )));
        }
        Ok(BatchFileReader {
            reader: tokio::io::BufReader::with_capacity(256 * 1024, reader),
            checker: BatchInputChecker::default(),
            line: Vec::new(),
        })
    }

    /// The next request and its index among the file's requests (from 0; blank lines are
    /// not requests, and batch results are keyed by this index). `None` at the end of a
    /// file that held at least one request.
    pub(crate) async fn next_request(&mut self) -> Result<Option<(u64, BatchLine)>, BatchFileError> {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
        loop {
            let number = self.checker.lines_read() + 1;
            self.line.clear();
            // At most one byte past the limit and a CRLF: enough to tell that a line is
            // too long without reading the rest of it.
            let most = MAX_BATCH_LINE_BYTES as u64 + 3;
            let read = (&mut self.reader)
                .take(most)
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|err| BatchFileError::Unreadable(format!("the file cannot be read: {err}")))?;
            if read == 0 {
                self.checker.finish().map_err(BatchFileError::Invalid)?;
                return Ok(None);
            }
            let text = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.len() > MAX_BATCH_LINE_BYTES {
                return Err(BatchFileError::Invalid(format!(
                    "line {number}: the line is longer than {MAX_BATCH_LINE_BYTES} bytes (4 MiB): a batch request must be shorter"
                )));
            }
            let text = std::str::from_utf8(text).map_err(|_| {
                BatchFileError::Invalid(format!("line {number}: the file is not UTF-8 text: a batch file is JSONL"))
            })?;
            if let Some(request) = self.checker.check(text).map_err(BatchFileError::Invalid)? {
                let index = self.checker.requests() - 1;
                return Ok(Some((index as u64, request)));
            }
        }
    }

    /// Lines read so far, blank ones included.
    pub(crate) fn lines_read(&self) -> usize {
        self.checker.lines_read()
    }
}

/// Reads a whole stored batch file, checking every line, and returns how many requests
/// it holds.
async fn count_requests(blobs: &maas_store::BlobStore, digest: &Digest) -> Result<u64, BatchFileError> {
    let mut reader = BatchFileReader::open(blobs, digest).await?;
    let mut requests = 0;
    while reader.next_request().await?.is_some() {
        requests += 1;
    }
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
    // The upload may have landed on another node: its bytes are fetched from there.
    let digest = super::files::local_file_blob(state, stores, &file).await?;
    let input_error = |err: BatchFileError| match err {
        BatchFileError::Invalid(message) => {
            ApiError::bad_request("invalid_input_file", message).with_param("input_file_id")
        }
        BatchFileError::Unreadable(message) => ApiError::internal(format!("input file `{}`: {message}", file.id)),
    };
    let mut reader = BatchFileReader::open(&stores.blobs, &digest).await.map_err(input_error)?;
    let mut total_lines = 0_u64;
    while let Some((_, line)) = reader.next_request().await.map_err(input_error)? {
        if line.url != request.endpoint {
            return Err(ApiError::bad_request(
                "mismatched_url",
                format!(
                    "line {}: url {:?} differs from the batch's endpoint {:?}: every line must use the endpoint",
                    reader.lines_read(),
                    line.url,
                    request.endpoint
                ),
            )
            .with_param("input_file_id"));
        }
        total_lines += 1;
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
                total_lines,
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
    let Some((digest, total)) = batch_input(state, stores, &batch, &scope).await? else { return Ok(()) };
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
    let pending = total.saturating_sub(answered.len() as u64);
    if pending > 0 {
        tracing::info!(batch = %id, pending, total, "working on a batch");
    }
    // The lines stream from the file as they are taken, LINE_CONCURRENCY at a time: the
    // worker holds a handful of requests, never the file.
    let reader = BatchFileReader::open(&stores.blobs, &digest).await;
    let requests = futures_util::stream::try_unfold(reader, |reader| async move {
        let mut reader = reader?;
        Ok::<_, BatchFileError>(reader.next_request().await?.map(|request| (request, Ok(reader))))
    });
    let outcomes: Vec<Result<(), ApiError>> = requests
        .filter(|item| std::future::ready(!matches!(item, Ok((index, _)) if answered.contains(index))))
        .map(|item| {
            let stop = &stop;
            let caller = &caller;
            let endpoint = batch.endpoint.as_str();
            async move {
                match item {
                    Ok((index, line)) => run_line(state, caller, id, endpoint, index, line, stop).await,
                    Err(BatchFileError::Invalid(message) | BatchFileError::Unreadable(message)) => {
                        Err(ApiError::internal(format!("reading the input file again failed: {message}")))
                    }
                }
            }
        })
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

/// The local input of a claimed batch and how many requests it holds; `None` when the
/// batch ended instead (its input is gone or bad, or could not be fetched before the
/// batch's window ended).
async fn batch_input(
    state: &AppState,
    stores: &Stores,
    batch: &BatchRecord,
    scope: &TenantScope,
) -> Result<Option<(Digest, u64)>, ApiError> {
    let file = match stores.db.files().get(scope, &batch.input_file_id).await {
        Ok(file) => file,
        Err(err) => {
            let message = format!("the input file is gone: {err}");
            return fail_for_input(stores, &batch.id, &message).await.map(|()| None);
        }
    };
    // Any node may claim any batch, and the input's bytes are on the nodes that received
    // or fetched it: fetch them here first. A failed fetch is retried (by whichever node
    // claims the batch next) until the batch's window ends.
    let digest = match super::files::local_file_blob(state, stores, &file).await {
        Ok(digest) => digest,
        Err(err) if maas_store::ids::now_ms() < batch.expires_at_ms => return Err(err),
        Err(err) => {
            tracing::warn!(batch = %batch.id, error = %err.message, "batch expired: its input file cannot be fetched");
            let (output_file_id, error_file_id) = write_output_files(stores, scope, &batch.id).await?;
            stores
                .db
                .batches()
                .finish(&batch.id, BatchStatus::Expired, output_file_id.as_deref(), error_file_id.as_deref(), None)
                .await?;
            return Ok(None);
        }
    };
    // The whole file is checked before any line runs: a batch created before a limit
    // existed may break it, and then it fails as a bad upload would have.
    let total = match count_requests(&stores.blobs, &digest).await {
        Ok(total) => total,
        Err(BatchFileError::Invalid(message) | BatchFileError::Unreadable(message)) => {
            return fail_for_input(stores, &batch.id, &message).await.map(|()| None);
        }
    };
    Ok(Some((digest, total)))
}

/// Fails a batch whose input file cannot be used (gone, or breaking a rule of batch
/// files); nothing of it ran.
async fn fail_for_input(stores: &Stores, id: &str, message: &str) -> Result<(), ApiError> {
    let errors = json!([{"code": "invalid_input_file", "message": message, "line": null, "param": "input_file_id"}]);
    stores.db.batches().finish(id, BatchStatus::Failed, None, None, Some(&errors)).await?;
    tracing::warn!(batch = %id, "batch failed: its input file cannot be read");
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

    async fn blob_store() -> (tempfile::TempDir, maas_store::BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = maas_store::BlobStore::open(dir.path().join("blobs")).await.unwrap();
        (dir, blobs)
    }

    #[tokio::test]
    async fn requests_are_numbered_past_blank_lines_and_crlf_ends() {
        let (_dir, blobs) = blob_store().await;
        let text = format!("{}\r\n\r\n{}\n", line("a", "/v1/completions"), line("b", "/v1/completions"));
        let info = blobs.put_bytes(text.as_bytes()).await.unwrap();
        let mut reader = BatchFileReader::open(&blobs, &info.digest).await.unwrap();
        let (index, first) = reader.next_request().await.unwrap().unwrap();
        assert_eq!((index, first.custom_id.as_str(), reader.lines_read()), (0, "a", 1));
        let (index, second) = reader.next_request().await.unwrap().unwrap();
        assert_eq!((index, second.custom_id.as_str(), reader.lines_read()), (1, "b", 3));
        assert!(reader.next_request().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_line_at_the_length_limit_is_read_and_one_past_it_refused() {
        let (_dir, blobs) = blob_store().await;
        let padded = |bytes: usize| {
            let mut request = line("a", "/v1/completions");
            request.insert_str(1, &format!("\"pad\":\"{}\",", "x".repeat(bytes)));
            request
        };
        let base = padded(0).len();
        let at_limit = padded(MAX_BATCH_LINE_BYTES - base);
        assert_eq!(at_limit.len(), MAX_BATCH_LINE_BYTES);
        let info = blobs.put_bytes(at_limit.as_bytes()).await.unwrap();
        let mut reader = BatchFileReader::open(&blobs, &info.digest).await.unwrap();
        // The padding is an unknown field: the line was read whole and parsed.
        match reader.next_request().await {
            Err(BatchFileError::Invalid(message)) => assert!(message.contains("unknown field `pad`"), "{message}"),
            other => panic!("{other:?}"),
        }
        let past_limit = format!("{}\n{}\r\n", line("b", "/v1/completions"), padded(MAX_BATCH_LINE_BYTES - base + 1));
        let info = blobs.put_bytes(past_limit.as_bytes()).await.unwrap();
        let mut reader = BatchFileReader::open(&blobs, &info.digest).await.unwrap();
        assert!(reader.next_request().await.unwrap().is_some());
        match reader.next_request().await {
            Err(BatchFileError::Invalid(message)) => {
                assert!(message.starts_with("line 2: the line is longer than 4194304 bytes"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_batch_file_over_200_mib_is_refused_before_it_is_read() {
        let (_dir, blobs) = blob_store().await;
        // A sparse file in a blob's place: the size is checked on opening, so nothing of it
        // is read (or hashed).
        let digest = Digest::of(b"a stand-in");
        let path = blobs.path_of(&digest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::File::create(&path).unwrap().set_len(MAX_BATCH_FILE_BYTES + 1).unwrap();
        match BatchFileReader::open(&blobs, &digest).await {
            Err(BatchFileError::Invalid(message)) => {
                assert!(message.contains("a batch file holds at most 209715200 bytes"), "{message}");
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a 200 MiB + 1 byte file was taken"),
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
