//! OpenAI's Files API: `POST /v1/files` (multipart/form-data with `purpose` and `file`,
//! as the OpenAI SDKs send it), `GET /v1/files`, `GET /v1/files/{id}`,
//! `GET /v1/files/{id}/content` and `DELETE /v1/files/{id}`. The bytes stream into the blob
//! store (never whole in memory) under the upload limit (`gateway.max_upload_bytes`,
//! enforced by the middleware); a `batch` file is checked line by line as a batch input
//! before it is recorded. Every query acts for [`caller_scope`], so another tenant's file
//! is not found.
//!
//! A file's bytes are on the disk of the node that received (or wrote) them: a node that
//! lacks them fetches them from a peer before it reads them ([`local_file_blob`]).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use maas_store::Digest;
use maas_store::repo::files::{FileRecord, NewFile};
use serde::Serialize;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::batches::{BatchFileError, BatchFileReader};
use super::registry::stores;
use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::state::AppState;

/// The purposes a client may upload a file for (OpenAI's list); `batch_output` files are
/// written by batches only.
pub const UPLOAD_PURPOSES: &[&str] = &["batch", "fine-tune", "assistants", "vision", "user_data", "evals"];

/// The purpose of the files a batch writes.
pub const BATCH_OUTPUT_PURPOSE: &str = "batch_output";

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let upload = warp::path!("v1" / "files")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::stream())
        .and_then(|s: Arc<AppState>, c: Caller, content_type: Option<String>, body| async move {
            upload_file(&s, &c, content_type.as_deref(), body).await.map_err(warp::reject::custom)
        });
    let list = warp::path!("v1" / "files")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|s: Arc<AppState>, c: Caller| async move { list_files(&s, &c).await.map_err(warp::reject::custom) });
    let get = warp::path!("v1" / "files" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            get_file(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    let content = warp::path!("v1" / "files" / String / "content")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            file_content(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    let delete = warp::path!("v1" / "files" / String)
        .and(warp::delete())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            delete_file(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    upload.or(list).unify().or(get).unify().or(content).unify().or(delete).unify().boxed()
}

/// OpenAI's file object.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub status: &'static str,
}

impl From<FileRecord> for FileObject {
    fn from(record: FileRecord) -> Self {
        FileObject {
            id: record.id,
            object: "file",
            bytes: record.size_bytes,
            created_at: record.created_at_ms / 1000,
            filename: record.filename,
            purpose: record.purpose,
            status: "processed",
        }
    }
}

/// Every file in one page: `has_more` is always false (SDKs page on it).
#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    pub object: &'static str,
    pub data: Vec<FileObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileDeleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

fn form_error_text(reason: &str) -> ApiError {
    ApiError::bad_request("invalid_multipart", format!("the multipart form could not be read: {reason}"))
}

/// The longest `purpose` field accepted.
const MAX_PURPOSE_BYTES: usize = 64;

/// Uploads a file: a multipart form with `purpose` and `file`. A `batch` file must be
/// JSONL whose every line is a request of the Batch API; the first bad line is named.
#[utoipa::path(post, path = "/v1/files", tag = "files",
    request_body(content = Object, content_type = "multipart/form-data", description = "`purpose` and `file`"),
    responses((status = 200, body = FileObject), (status = 400, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody)))]
pub async fn upload_file(
    state: &AppState,
    caller: &Caller,
    content_type: Option<&str>,
    body: impl futures_util::Stream<Item = Result<impl bytes::Buf, warp::Error>> + Unpin + Send + 'static,
) -> Result<Response, ApiError> {
    let content_type = content_type.unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::bad_request(
            "invalid_content_type",
            format!("content-type `{content_type}` is not multipart/form-data: send the file as a multipart form with `purpose` and `file`"),
        )
    })?;
    let scope = caller.scope.clone();
    let stores = stores(state)?;
    let body = body.map_ok(|mut buf| buf.copy_to_bytes(buf.remaining()));
    let mut form = multer::Multipart::new(body, boundary);
    let form_error = |err: multer::Error| form_error_text(&err.to_string());
    let mut purpose: Option<String> = None;
    let mut uploaded: Option<(String, maas_store::BlobInfo)> = None;
    while let Some(mut field) = form.next_field().await.map_err(form_error)? {
        match field.name() {
            Some("purpose") => {
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(form_error)? {
                    text.extend_from_slice(&chunk);
                    if text.len() > MAX_PURPOSE_BYTES {
                        return Err(
                            ApiError::bad_request("invalid_purpose", "purpose is too long").with_param("purpose")
                        );
                    }
                }
                purpose = Some(String::from_utf8_lossy(&text).trim().to_owned());
            }
            Some("file") => {
                if uploaded.is_some() {
                    return Err(ApiError::bad_request("invalid_multipart", "send one `file` field").with_param("file"));
                }
                let filename = field.file_name().filter(|name| !name.is_empty()).unwrap_or("file").to_owned();
                let reader = tokio_util::io::StreamReader::new(
                    (&mut field).map(|chunk: Result<Bytes, multer::Error>| chunk.map_err(std::io::Error::other)),
                );
                let info = stores.blobs.put(reader, None).await.map_err(|err| match err {
                    // The form broke off (or grew past the upload limit, which the
                    // middleware then answers with a 413): the client's side.
                    maas_store::StoreError::Io { source, .. }
                        if source.get_ref().and_then(|inner| inner.downcast_ref::<multer::Error>()).is_some() =>
                    {
                        form_error_text(&source.to_string())
                    }
                    other => other.into(),
                })?;
                uploaded = Some((filename, info));
            }
            // Fields OpenAI may add later (such as `expires_after`) are read past.
            _ => while field.chunk().await.map_err(form_error)?.is_some() {},
        }
    }
    let Some(purpose) = purpose else {
        return Err(ApiError::bad_request(
            "missing_purpose",
            "the form has no `purpose` field: add purpose=batch (or another purpose)",
        )
        .with_param("purpose"));
    };
    if !UPLOAD_PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::bad_request(
            "invalid_purpose",
            format!("purpose `{purpose}` is not one of {}", UPLOAD_PURPOSES.join(", ")),
        )
        .with_param("purpose"));
    }
    let Some((filename, info)) = uploaded else {
        return Err(ApiError::bad_request("missing_file", "the form has no `file` field").with_param("file"));
    };
    if purpose == "batch" {
        // The bytes stay in the blob store when the check fails; blob garbage collection
        // takes blobs no file or model refers to.
        check_batch_file(stores, &info.digest).await?;
    }
    check_storage_quota(stores, caller, info.size_bytes).await?;
    let record = stores
        .db
        .files()
        .create(&scope, NewFile { filename, purpose, size_bytes: info.size_bytes, sha256: info.digest.to_hex() })
        .await?;
    tracing::info!(file = %record.id, purpose = %record.purpose, bytes = record.size_bytes, "file uploaded");
    Ok(warp::reply::json(&FileObject::from(record)).into_response())
}

/// Refuses an upload that would take the owner's stored bytes past its `storage_bytes`
/// quota. The bytes stay in the blob store until garbage collection (nothing refers to
/// them); waiting does not help here, deleting files does, so the answer is a 403.
pub(crate) async fn check_storage_quota(
    stores: &crate::state::Stores,
    caller: &Caller,
    size_bytes: u64,
) -> Result<(), ApiError> {
    let owner = caller.scope.acting_as();
    let Some((subject, limit)) = caller.owner_limit(owner, |limits| limits.storage_bytes) else { return Ok(()) };
    let in_use = stores.db.usage().stored_bytes(owner).await?;
    if in_use.saturating_add(size_bytes) > limit {
        return Err(ApiError::new(
            http::StatusCode::FORBIDDEN,
            "permission_error",
            "storage_quota_exceeded",
            format!(
                "storage_bytes limit of {subject} reached: {in_use} bytes stored, this file has {size_bytes}, the quota is {limit}; delete files to make room"
            ),
        ));
    }
    Ok(())
}

/// Reads a stored batch file line by line and refuses it at its first bad line, or when
/// it breaks a limit of batch files (size, line length, requests).
async fn check_batch_file(stores: &crate::state::Stores, digest: &Digest) -> Result<(), ApiError> {
    let refused = |err: BatchFileError| match err {
        BatchFileError::Invalid(message) => ApiError::bad_request("invalid_batch_file", message).with_param("file"),
        BatchFileError::Unreadable(message) => ApiError::internal(format!("checking the uploaded file: {message}")),
    };
    let mut reader = BatchFileReader::open(&stores.blobs, digest).await.map_err(refused)?;
    while reader.next_request().await.map_err(refused)?.is_some() {}
    Ok(())
}

/// Makes a stored file's bytes local and returns their digest. Every node keeps blobs on
/// its own disk, so a file uploaded to (or a batch output written by) another node is
/// fetched from a live peer first, checksummed and resumable: the same fetch that brings
/// model files, fine-tuning files and knowledge-base uploads. A 503 when no peer can send
/// the bytes now (their node may be restarting).
pub(crate) async fn local_file_blob(
    state: &AppState,
    stores: &crate::state::Stores,
    file: &FileRecord,
) -> Result<Digest, ApiError> {
    let digest: Digest = file.sha256.parse()?;
    if stores.blobs.contains(&digest).await {
        return Ok(digest);
    }
    let peers = crate::knowledge::ingest::peer_apis(state);
    let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
    let size_bytes = u64::try_from(file.size_bytes).unwrap_or(0);
    maas_actors::models::fetch_blob(&stores.blobs, &digest, size_bytes, &peers, &cookie).await.map_err(|reason| {
        tracing::warn!(file = %file.id, %reason, "a file's bytes cannot be fetched from a peer");
        ApiError::unavailable(format!(
            "the bytes of file `{}` are on another node, which cannot send them now ({reason}); retry shortly",
            file.id
        ))
    })?;
    Ok(digest)
}

/// The caller's files, newest first.
#[utoipa::path(get, path = "/v1/files", tag = "files", responses((status = 200, body = FileList)))]
pub async fn list_files(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let files = stores(state)?.db.files().list(&scope).await?;
    let data: Vec<FileObject> = files.into_iter().map(FileObject::from).collect();
    let first_id = data.first().map(|f| f.id.clone());
    let last_id = data.last().map(|f| f.id.clone());
    Ok(warp::reply::json(&FileList { object: "list", data, first_id, last_id, has_more: false }).into_response())
}

/// One file's record.
#[utoipa::path(get, path = "/v1/files/{id}", tag = "files", params(("id" = String, Path, description = "the file id")),
    responses((status = 200, body = FileObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_file(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let record = stores(state)?.db.files().get(&scope, id).await?;
    Ok(warp::reply::json(&FileObject::from(record)).into_response())
}

/// A file's bytes, streamed from the blob store (fetched from a peer first when they are
/// on another node).
#[utoipa::path(get, path = "/v1/files/{id}/content", tag = "files", params(("id" = String, Path, description = "the file id")),
    responses((status = 200, description = "the bytes", content_type = "application/octet-stream"), (status = 404, body = crate::error::ErrorBody)))]
pub async fn file_content(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let stores = stores(state)?;
    let record = stores.db.files().get(&scope, id).await?;
    let digest = local_file_blob(state, stores, &record).await?;
    let reader = stores.blobs.open_blob(&digest).await?;
    let size = reader.size_bytes();
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
    let mut response = warp::reply::stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
    headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(size));
    Ok(response)
}

/// Deletes a file's record. Its bytes stay in the blob store until no file or model
/// refers to them and blob garbage collection runs.
#[utoipa::path(delete, path = "/v1/files/{id}", tag = "files", params(("id" = String, Path, description = "the file id")),
    responses((status = 200, body = FileDeleted), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete_file(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let record = stores(state)?.db.files().delete(&scope, id).await?;
    let detail = serde_json::json!({"filename": record.filename, "bytes": record.size_bytes});
    super::auth::audit(state, caller.audit_entry("file.delete", &record.id, detail)).await?;
    Ok(warp::reply::json(&FileDeleted { id: record.id, object: "file", deleted: true }).into_response())
}
