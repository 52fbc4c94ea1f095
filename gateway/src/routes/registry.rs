//! The model repository over HTTP: blobs are uploaded (streamed, hashed, stored once by
//! content) and served to peers with byte ranges (a resumed download); a model version is
//! registered as a list of uploaded blobs with their paths (those the model needs), after
//! its files have been laid out and checked as a model (and against the built-in catalogue
//! when registered under a catalogue name), or as an uploaded archive the node unpacks into
//! blobs. Platform
//! administrators (and the cluster cookie) add the platform's models, which every tenant
//! may deploy; enterprise users add models of their own (or of an organisation they run),
//! which only they see and deploy (privately). Blob reads are for peers (the cookie).

use std::sync::Arc;

use futures_util::TryStreamExt as _;
use maas_actors::models::{check_model, materialise, metadata_of, unpack_archive};
use maas_engine::model_files::{self, ModelFiles, SAFETENSORS_INDEX, SkippedFile};
use maas_engine::{archive, catalog};
use maas_store::Digest;
use maas_store::repo::models::{ModelFile, ModelVersionRecord, NewModelVersion};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::cluster::check_cookie;
use super::with_state;
use crate::auth::{Access, Caller, caller, signed_in};
use crate::error::ApiError;
use crate::state::{AppState, Stores};

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let upload = warp::path!("v1" / "blobs")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(warp::body::stream())
        .and_then(|s: Arc<AppState>, c: Caller, body| async move {
            upload_blob(&s, &c, body).await.map_err(warp::reject::custom)
        });
    let download = warp::path!("v1" / "blobs" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(super::cluster::cookie_checked(state))
        .and(warp::header::optional::<String>("range"))
        .and_then(|digest: String, s: Arc<AppState>, cookie: Option<String>, range: Option<String>| async move {
            download_blob(&s, cookie.as_deref(), &digest, range.as_deref()).await.map_err(warp::reject::custom)
        });
    let register = warp::path!("v1" / "registry" / "models")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<RegisterRequest>(4 * 1024 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: RegisterRequest| async move {
            register_model(&s, &c, request).await.map_err(warp::reject::custom)
        });
    let list = warp::path!("v1" / "registry" / "models")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|s: Arc<AppState>, c: Caller| async move { list_models(&s, &c).await.map_err(warp::reject::custom) });
    let catalog = warp::path!("v1" / "registry" / "catalog")
        .and(warp::get())
        .and(with_state(state))
        .and(signed_in(state, Access::Manage))
        .and_then(|s: Arc<AppState>| async move { list_catalog(&s).await.map_err(warp::reject::custom) });
    upload.or(download).unify().or(register).unify().or(list).unify().or(catalog).unify().boxed()
}

pub(crate) fn stores(state: &AppState) -> Result<&Stores, ApiError> {
    state.stores()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BlobReply {
    pub sha256: String,
    pub size_bytes: u64,
}

/// Stores the request body as a blob and names it by its sha256 (storing the same bytes
/// twice keeps one copy). The body may be as large as `gateway.max_upload_bytes`.
#[utoipa::path(post, path = "/v1/blobs", tag = "models",
    params(("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = BlobReply), (status = 403, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody)))]
pub async fn upload_blob(
    state: &AppState,
    caller: &Caller,
    body: impl futures_util::Stream<Item = Result<impl bytes::Buf, warp::Error>> + Unpin + Send,
) -> Result<Response, ApiError> {
    caller.require_deployer()?;
    let stores = stores(state)?;
    let reader = tokio_util::io::StreamReader::new(
        body.map_ok(|mut buf| buf.copy_to_bytes(buf.remaining())).map_err(std::io::Error::other),
    );
    let info = stores.blobs.put(reader, None).await?;
    Ok(warp::reply::json(&BlobReply { sha256: info.digest.to_hex(), size_bytes: info.size_bytes }).into_response())
}

/// A blob's bytes, for a peer fetching a model: `Range: bytes=N-` resumes at byte N.
#[utoipa::path(get, path = "/v1/blobs/{sha256}", tag = "models",
    params(("sha256" = String, Path, description = "the blob's sha256"), ("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses((status = 200, description = "the bytes", content_type = "application/octet-stream"), (status = 206, description = "the bytes from the range's start"),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 416, body = crate::error::ErrorBody)))]
pub async fn download_blob(
    state: &AppState,
    cookie: Option<&str>,
    digest: &str,
    range: Option<&str>,
) -> Result<Response, ApiError> {
    use tokio::io::AsyncSeekExt as _;
    check_cookie(state, cookie)?;
    let stores = stores(state)?;
    let digest: Digest = digest.parse().map_err(|_| ApiError::bad_request("invalid_input", "not a sha256 digest"))?;
    let path = stores.blobs.path_of(&digest);
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found(format!("blob {} is not on this node", digest.to_hex())))?;
    let size = file.metadata().await.map_err(|e| ApiError::internal(e.to_string()))?.len();
    let start = match range {
        None => 0,
        Some(range) => {
            let start = range
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("invalid_range", "only `Range: bytes=N-` is supported"))?;
            if start > size {
                return Err(ApiError::new(
                    http::StatusCode::RANGE_NOT_SATISFIABLE,
                    "invalid_request_error",
                    "range_not_satisfiable",
                    format!("the blob has {size} bytes; the range starts at {start}"),
                ));
            }
            file.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| ApiError::internal(e.to_string()))?;
            start
        }
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    let mut response = warp::reply::stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
    headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(size - start));
    if range.is_some() {
        if let Ok(value) = http::HeaderValue::from_str(&format!("bytes {start}-{}/{size}", size.saturating_sub(1))) {
            headers.insert(http::header::CONTENT_RANGE, value);
        }
        *response.status_mut() = http::StatusCode::PARTIAL_CONTENT;
    }
    Ok(response)
}

/// A version of a model: its uploaded files, or an uploaded archive of them.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// A catalogue name (`GET /v1/registry/catalog`) has its files checked against the
    /// catalogue's entry.
    pub name: String,
    /// Default: the next `vN`.
    #[serde(default)]
    pub version: Option<String>,
    /// Default: the catalogue entry's description, for a catalogue name.
    #[serde(default)]
    pub description: String,
    /// `chat`, `completion`, `embedding`. Default: the catalogue entry's tasks, or what
    /// the files say.
    #[serde(default)]
    pub tasks: Option<Vec<String>>,
    /// The uploaded files (`POST /v1/blobs`) with their paths in the model.
    #[serde(default)]
    pub files: Vec<ModelFile>,
    /// Instead of `files`: an uploaded .tar, .tar.gz or .zip of the model folder (or of a
    /// .gguf file), unpacked on the node into one blob per file.
    #[serde(default)]
    pub archive_sha256: Option<String>,
}

/// Registers a model version from uploaded blobs, or from an uploaded archive unpacked into
/// blobs: a platform model when a platform administrator registers it, else a model of the
/// caller's own (or of the organisation they act for). The files are laid out as a model
/// folder and checked (config, tokenizer, every safetensors header, or the GGUF header),
/// and against the catalogue entry when the name is a catalogue name; the metadata
/// (architecture, parameters, context length, dtype, quantisation, tasks) comes from them.
/// Of a Hugging Face download only the files the model needs are registered: the reply's
/// `skipped_files` lists the others (`consolidated*`, `original/`, PyTorch or ONNX
/// weights...), each with why. A refused registration leaves no files behind.
#[utoipa::path(post, path = "/v1/registry/models", tag = "models", request_body = RegisterRequest,
    params(("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses((status = 201, description = "the version", content_type = "application/json"), (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody)))]
pub async fn register_model(state: &AppState, caller: &Caller, request: RegisterRequest) -> Result<Response, ApiError> {
    caller.require_deployer()?;
    let stores = stores(state)?;
    maas_store::repo::models::validate_names(&request.name, request.version.as_deref())?;
    if let Some(tasks) = &request.tasks
        && let Some(unknown) = tasks.iter().find(|task| !catalog::TASKS.contains(&task.as_str()))
    {
        return Err(ApiError::bad_request(
            "invalid_input",
            format!("task `{unknown}` is not one of {}", catalog::TASKS.join(", ")),
        )
        .with_param("tasks"));
    }
    let files = match (&request.archive_sha256, request.files.is_empty()) {
        (Some(_), false) => {
            return Err(ApiError::bad_request("invalid_input", "give either `files` or `archive_sha256`, not both"));
        }
        (None, true) => {
            return Err(ApiError::bad_request(
                "invalid_input",
                "give `files` (uploaded blobs with their paths) or `archive_sha256` (an uploaded archive)",
            ));
        }
        (Some(archive), true) => unpack_uploaded_archive(state, stores, archive).await?,
        (None, false) => {
            check_uploaded(stores, &request.files).await?;
            request.files.clone()
        }
    };
    let entry = catalog::find(&request.name);
    let mut new = NewModelVersion {
        name: request.name,
        version: request.version,
        description: request.description,
        metadata: maas_store::repo::models::ModelMetadata {
            format: String::new(),
            architecture: String::new(),
            parameters: 0,
            context_length: 0,
            dtype: String::new(),
            quantization: String::new(),
            tasks: Vec::new(),
            config: serde_json::Value::Null,
        },
        files,
    };
    // Check names and paths before laying anything out.
    maas_store::repo::models::validate(&new)?;
    check_no_file_is_a_folder(&new.files)?;
    // Only the files the model needs are registered (an archive of a whole Hugging Face
    // download holds other frameworks' copies of the weights too); the blobs of the rest
    // stay unreferenced until blob garbage collection.
    let skipped = keep_needed_files(stores, &mut new.files).await?;
    if !skipped.is_empty() {
        tracing::info!(model = %new.name, skipped = skipped.len(), "files the model does not need are not registered");
    }
    // A tenant's model counts against its storage quota.
    let total_bytes = new.files.iter().map(|file| file.size_bytes).fold(0, u64::saturating_add);
    let admin = caller.require_admin().is_ok();
    if !admin {
        super::files::check_storage_quota(stores, caller, total_bytes).await?;
    }
    let files = check_laid_out(stores, &new.files).await?;
    let mut metadata = metadata_of(&files);
    let mut description = new.description.clone();
    if let Some(entry) = entry {
        catalog::check(entry, &files).map_err(|reason| ApiError::bad_request("catalog_mismatch", reason))?;
        if description.is_empty() {
            description = entry.description();
        }
        metadata.tasks = entry.tasks.iter().map(|task| (*task).to_owned()).collect();
    }
    if let Some(tasks) = request.tasks {
        metadata.tasks = tasks;
    }
    let new = NewModelVersion { metadata, description, ..new };
    let models = stores.db.models();
    let record =
        if admin { models.register_platform(new).await? } else { models.register_in(&caller.scope, new).await? };
    tracing::info!(model = %record.name, version = %record.version, bytes = record.total_bytes, "model version registered");
    let target = format!("{}:{}", record.name, record.version);
    let detail = serde_json::json!({"bytes": record.total_bytes});
    super::auth::audit(state, caller.audit_entry("model.register", &target, detail)).await?;
    let mut reply = serde_json::to_value(&record).map_err(|e| ApiError::internal(e.to_string()))?;
    reply["skipped_files"] = serde_json::to_value(&skipped).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(warp::reply::with_status(warp::reply::json(&reply), http::StatusCode::CREATED).into_response())
}

/// A path cannot be both a file and the folder of another file (`a` and `a/b`): no folder
/// could hold both.
fn check_no_file_is_a_folder(files: &[ModelFile]) -> Result<(), ApiError> {
    let paths: std::collections::BTreeSet<&str> = files.iter().map(|file| file.path.as_str()).collect();
    for file in files {
        let mut folder = file.path.as_str();
        while let Some((parent, _)) = folder.rsplit_once('/') {
            if paths.contains(parent) {
                return Err(ApiError::bad_request(
                    "invalid_input",
                    format!("file `{parent}` is also the folder of file `{}`: a path cannot be both", file.path),
                )
                .with_param("files"));
            }
            folder = parent;
        }
    }
    Ok(())
}

/// Keeps only the files of a Hugging Face folder that the model needs, by the same rule as
/// the CLI's upload ([`maas_engine::model_files::select_model_files`]); returns the rest
/// with the reason each is left out. A single .gguf file is kept as it is.
async fn keep_needed_files(stores: &Stores, files: &mut Vec<ModelFile>) -> Result<Vec<SkippedFile>, ApiError> {
    if let [single] = files.as_slice()
        && single.path.to_ascii_lowercase().ends_with(".gguf")
    {
        return Ok(Vec::new());
    }
    let index = files.iter().find(|file| file.path == SAFETENSORS_INDEX);
    // An index that is not JSON is reported by the model check, which reads it.
    let shards = match index {
        Some(index) if index.size_bytes <= INDEX_MAX_BYTES => {
            let digest: Digest = index.sha256.parse().map_err(|_| {
                ApiError::bad_request("invalid_input", format!("file {}: not a sha256 digest", index.path))
            })?;
            tokio::fs::read(stores.blobs.path_of(&digest))
                .await
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .and_then(|index| model_files::index_shards(&index))
        }
        _ => None,
    };
    let paths: Vec<&str> = files.iter().map(|file| file.path.as_str()).collect();
    let selection = model_files::select_model_files(&paths, shards.as_ref());
    if selection.needed.is_empty() {
        return Err(ApiError::bad_request(
            "not_a_model",
            "none of the files is part of a model: give a Hugging Face folder's config.json, tokenizer.json and \
             *.safetensors, or a single .gguf file",
        ));
    }
    files.retain(|file| selection.needed.binary_search(&file.path).is_ok());
    Ok(selection.skipped)
}

/// Lays the files out as a model folder in a private place under the data directory and
/// checks them there (config, tokenizer, every safetensors header, or the GGUF header). The
/// folder is removed whatever the outcome: a replica lays out its own when it starts.
async fn check_laid_out(stores: &Stores, files: &[ModelFile]) -> Result<ModelFiles, ApiError> {
    let root = stores.data_dir.join("models").join(format!(".check-{}", uuid::Uuid::new_v4()));
    let checked = async {
        let dir = materialise(&stores.blobs, &root, files).await.map_err(|reason| {
            tracing::error!(error = %reason, "laying out a model to check it failed");
            ApiError::internal(format!("the node could not lay out the model's files: {reason}"))
        })?;
        let inspect_dir = match files {
            [single] if single.path.to_ascii_lowercase().ends_with(".gguf") => dir.join(&single.path),
            _ => dir,
        };
        check_model(inspect_dir).await.map_err(|reason| ApiError::bad_request("not_a_model", reason))
    }
    .await;
    if let Err(err) = tokio::fs::remove_dir_all(&root).await
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %err, folder = %root.display(), "cannot remove a model checking folder");
    }
    checked
}

/// The largest `model.safetensors.index.json` read to choose the weights (real ones are a
/// few hundred KiB).
const INDEX_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Every listed file must be an uploaded blob of the listed size.
async fn check_uploaded(stores: &Stores, files: &[ModelFile]) -> Result<(), ApiError> {
    for file in files {
        let digest: Digest = file
            .sha256
            .parse()
            .map_err(|_| ApiError::bad_request("invalid_input", format!("file {}: not a sha256 digest", file.path)))?;
        let stored_bytes = tokio::fs::metadata(stores.blobs.path_of(&digest)).await.map(|m| m.len()).ok();
        if stored_bytes != Some(file.size_bytes) {
            return Err(ApiError::bad_request(
                "blob_missing",
                format!(
                    "file {}: blob {} of {} bytes was not uploaded (POST /v1/blobs)",
                    file.path, file.sha256, file.size_bytes
                ),
            ));
        }
    }
    Ok(())
}

/// Unpacks an uploaded archive into one blob per file, bounded by the upload limit and
/// [`archive::MAX_ENTRIES`].
async fn unpack_uploaded_archive(state: &AppState, stores: &Stores, sha256: &str) -> Result<Vec<ModelFile>, ApiError> {
    let digest: Digest = sha256.parse().map_err(|_| {
        ApiError::bad_request("invalid_input", "archive_sha256 is not a sha256 digest").with_param("archive_sha256")
    })?;
    if !stores.blobs.contains(&digest).await {
        return Err(ApiError::bad_request(
            "blob_missing",
            format!("archive blob {sha256} was not uploaded (POST /v1/blobs)"),
        )
        .with_param("archive_sha256"));
    }
    let limits =
        archive::ArchiveLimits { max_total_bytes: state.options.max_upload_bytes, max_entries: archive::MAX_ENTRIES };
    unpack_archive(&stores.blobs, &digest, limits).await.map_err(|err| {
        use archive::ArchiveError as E;
        let message = err.to_string();
        match err {
            E::NotAnArchive | E::Empty => ApiError::bad_request("not_an_archive", message),
            E::Corrupt(_) => ApiError::bad_request("archive_corrupt", message),
            E::Refused { .. } => ApiError::bad_request("archive_entry_refused", message),
            E::TooLarge { .. } | E::TooManyEntries { .. } => ApiError::new(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "archive_too_large",
                message,
            ),
            E::Store { .. } | E::Io(_) => {
                tracing::error!(error = %message, "unpacking an archive failed");
                ApiError::internal("the node could not unpack the archive into its blob store; the request id in x-request-id finds the details in the log")
            }
        }
    })
}

/// A catalogue entry and the versions of it in the repository.
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogModel {
    #[serde(flatten)]
    #[schema(value_type = catalog::CatalogEntry)]
    pub entry: &'static catalog::CatalogEntry,
    pub description: String,
    /// Versions registered under this catalogue name.
    pub imported_versions: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogList {
    pub models: Vec<CatalogModel>,
}

/// The built-in catalogue of well-known open models: each one's source, licence,
/// identifying values, size, context, tasks, expected files, whether this build serves it,
/// and which versions of it the repository holds. Import one by registering its files
/// under its catalogue name.
#[utoipa::path(get, path = "/v1/registry/catalog", tag = "models",
    responses((status = 200, body = CatalogList), (status = 503, body = crate::error::ErrorBody)))]
pub async fn list_catalog(state: &AppState) -> Result<Response, ApiError> {
    let versions = stores(state)?.db.models().list_platform().await?;
    let models = catalog::entries()
        .iter()
        .map(|entry| CatalogModel {
            entry,
            description: entry.description(),
            imported_versions: versions
                .iter()
                .filter(|version| version.name.eq_ignore_ascii_case(entry.name))
                .map(|version| version.version.clone())
                .collect(),
        })
        .collect();
    Ok(warp::reply::json(&CatalogList { models }).into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistryList {
    pub versions: Vec<ModelVersionRecord>,
}

/// The versions of the models the caller may deploy: the platform's and their own (and
/// their organisations'); administrators see every tenant's too. By name, then owner, newest
/// first within a model.
#[utoipa::path(get, path = "/v1/registry/models", tag = "models",
    responses((status = 200, body = RegistryList), (status = 503, body = crate::error::ErrorBody)))]
pub async fn list_models(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let models = stores(state)?.db.models();
    let versions = if caller.require_admin().is_ok() {
        models.list_all().await?
    } else {
        models.list_visible(&caller.scope).await?
    };
    Ok(warp::reply::json(&RegistryList { versions }).into_response())
}
