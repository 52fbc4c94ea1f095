//! Models from the repository on a node: what a version's files say about the model
//! (metadata for the registry), the version's files laid out as a model folder under the
//! data directory (hard links into the blob store), and blobs fetched from the peers that
//! have them (checksummed, resumable).

use std::path::{Path, PathBuf};

use maas_engine::archive::{self, ArchiveError, ArchiveLimits};
use maas_engine::model_files::{GgufMetadataValue, ModelFiles, ModelFormat, gguf_file_type_name};
use maas_store::repo::models::{ModelFile, ModelMetadata, ModelVersionRecord};
use maas_store::{BlobStore, Digest};

use crate::node::ServingModel;
use sha2::Digest as _;

/// The registry's metadata for a model whose files were inspected.
pub fn metadata_of(files: &ModelFiles) -> ModelMetadata {
    match files.format {
        ModelFormat::Safetensors => {
            let config = files.config.clone().unwrap_or(serde_json::Value::Null);
            let architecture = files.architecture().unwrap_or_else(|| "unknown".to_owned());
            let text = |key: &str| config.get(key).and_then(serde_json::Value::as_str).map(str::to_owned);
            let model_type = text("model_type").unwrap_or_default();
            let embedding = model_type == "bert"
                || architecture.starts_with("Bert")
                || architecture.contains("Roberta")
                || architecture.ends_with("Model") && !architecture.contains("CausalLM");
            let tasks = if embedding {
                vec!["embedding".to_owned()]
            } else if files.chat_template.is_some() {
                vec!["chat".to_owned(), "completion".to_owned()]
            } else {
                vec!["completion".to_owned()]
            };
            ModelMetadata {
                format: "safetensors".into(),
                architecture,
                parameters: files.parameters,
                context_length: config.get("max_position_embeddings").and_then(serde_json::Value::as_u64).unwrap_or(0),
                dtype: text("torch_dtype").unwrap_or_else(|| "unknown".to_owned()),
                quantization: "none".into(),
                tasks,
                config,
            }
        }
        ModelFormat::Gguf => {
            let architecture = files.architecture().unwrap_or_else(|| "unknown".to_owned());
            let unsigned = |key: &str| match files.gguf_metadata.get(key) {
                Some(GgufMetadataValue::Unsigned(value)) => Some(*value),
                _ => None,
            };
            let quantization = unsigned("general.file_type").map_or_else(|| "unknown".to_owned(), gguf_file_type_name);
            let config: serde_json::Map<String, serde_json::Value> = files
                .gguf_metadata
                .iter()
                .filter(|(_, value)| !matches!(value, GgufMetadataValue::Array { .. }))
                .map(|(key, value)| (key.clone(), serde_json::to_value(value).unwrap_or_default()))
                .collect();
            let chat = files.gguf_metadata.contains_key("tokenizer.chat_template");
            ModelMetadata {
                format: "gguf".into(),
                parameters: unsigned("general.parameter_count").unwrap_or(files.parameters),
                context_length: unsigned(&format!("{architecture}.context_length")).unwrap_or(0),
                dtype: "quantized".into(),
                quantization,
                tasks: if chat { vec!["chat".into(), "completion".into()] } else { vec!["completion".into()] },
                architecture,
                config: serde_json::Value::Object(config),
            }
        }
    }
}

/// Checks the model at `path` (a folder or a .gguf file) from its configs and headers, on
/// a blocking thread.
pub async fn check_model(path: PathBuf) -> Result<ModelFiles, String> {
    tokio::task::spawn_blocking(move || maas_engine::model_files::inspect_headers(&path))
        .await
        .map_err(|e| format!("the checking thread failed: {e}"))?
        .map_err(|e| e.to_string())
}

/// Unpacks an uploaded archive (the blob `archive`: a .tar, .tar.gz or .zip of a model
/// folder or a .gguf file) into the blob store on a blocking thread, one blob per file;
/// returns the files as a version lists them. Blobs of a refused archive stay unreferenced
/// until blob garbage collection.
pub async fn unpack_archive(
    blobs: &BlobStore,
    archive: &Digest,
    limits: ArchiveLimits,
) -> Result<Vec<ModelFile>, ArchiveError> {
    let blobs = blobs.clone();
    let path = blobs.path_of(archive);
    let unpacked = tokio::task::spawn_blocking(move || {
        archive::unpack(&path, limits, |_, reader| blobs.put_blocking(reader).map_err(std::io::Error::other))
    })
    .await
    .map_err(|e| ArchiveError::Io(std::io::Error::other(format!("the unpacking thread failed: {e}"))))??;
    Ok(unpacked
        .files
        .into_iter()
        .map(|(path, info)| ModelFile { path, sha256: info.digest.to_hex(), size_bytes: info.size_bytes })
        .collect())
}

/// Where a version's files are laid out: `<data_dir>/models/<digest of the file list>`,
/// the same on every node, so a folder made once serves every replica of the version.
pub fn model_dir(data_dir: &Path, files: &[ModelFile]) -> PathBuf {
    let mut listing = String::new();
    for file in files {
        listing.push_str(&file.path);
        listing.push('\t');
        listing.push_str(&file.sha256);
        listing.push('\n');
    }
    let digest = hex_digest(listing.as_bytes());
    data_dir.join("models").join(&digest[..32])
}

fn hex_digest(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Lays a version's files out as a model folder of hard links into the blob store (a
/// copy where the file system refuses links); every blob must be local. Idempotent, and
/// atomic: the folder appears complete or not at all.
pub async fn materialise(blobs: &BlobStore, data_dir: &Path, files: &[ModelFile]) -> Result<PathBuf, String> {
    let target = model_dir(data_dir, files);
    if tokio::fs::try_exists(&target).await.unwrap_or(false) {
        return Ok(target);
    }
    let staging = data_dir.join("models").join(format!(".staging-{}", uuid::Uuid::new_v4()));
    let result = async {
        for file in files {
            let digest: Digest = file.sha256.parse().map_err(|e| format!("{}: {e}", file.path))?;
            let source = blobs.path_of(&digest);
            let destination = staging.join(&file.path);
            if let Some(parent) = destination.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            if tokio::fs::hard_link(&source, &destination).await.is_err() {
                tokio::fs::copy(&source, &destination)
                    .await
                    .map_err(|e| format!("blob {} of {} is not on this node: {e}", file.sha256, file.path))?;
            }
        }
        match tokio::fs::rename(&staging, &target).await {
            Ok(()) => Ok(()),
            // Another replica made it meanwhile.
            Err(_) if tokio::fs::try_exists(&target).await.unwrap_or(false) => Ok(()),
            Err(e) => Err(format!("cannot publish {}: {e}", target.display())),
        }
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&staging).await;
    result.map(|()| target)
}

/// Fetches every blob of `record` this node lacks from one of `peers` (API base urls),
/// resuming a partial download where it stopped and keeping only content whose sha256
/// matches. Returns the number of bytes fetched.
pub async fn fetch_missing(
    blobs: &BlobStore,
    record: &ModelVersionRecord,
    peers: &[String],
    cookie: &str,
) -> Result<u64, String> {
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .build()
        .map_err(|e| format!("cannot build an http client: {e}"))?;
    let mut fetched = 0;
    for file in &record.files {
        let digest: Digest = file.sha256.parse().map_err(|e| format!("{}: {e}", file.path))?;
        if blobs.contains(&digest).await {
            continue;
        }
        let mut last_error = format!("no peer to fetch blob {} ({}) from", file.sha256, file.path);
        let mut done = false;
        for peer in peers {
            match fetch_one(&client, blobs, &digest, file.size_bytes, peer, cookie).await {
                Ok(bytes) => {
                    fetched += bytes;
                    done = true;
                    break;
                }
                Err(err) => last_error = format!("fetching {} from {peer}: {err}", file.path),
            }
        }
        if !done {
            return Err(last_error);
        }
    }
    Ok(fetched)
}

/// Fetches one blob this node lacks from the first of `peers` (API base urls) that has it,
/// checksummed and resumable like [`fetch_missing`]. Does nothing when the blob is local.
pub async fn fetch_blob(
    blobs: &BlobStore,
    digest: &Digest,
    size_bytes: u64,
    peers: &[String],
    cookie: &str,
) -> Result<(), String> {
    if blobs.contains(digest).await {
        return Ok(());
    }
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .build()
        .map_err(|e| format!("cannot build an http client: {e}"))?;
    let mut last_error = format!("no peer to fetch blob {} from", digest.to_hex());
    for peer in peers {
        match fetch_one(&client, blobs, digest, size_bytes, peer, cookie).await {
            Ok(_) => return Ok(()),
            Err(err) => last_error = format!("fetching blob {} from {peer}: {err}", digest.to_hex()),
        }
    }
    Err(last_error)
}

async fn fetch_one(
    client: &reqwest::Client,
    blobs: &BlobStore,
    digest: &Digest,
    size_bytes: u64,
    peer: &str,
    cookie: &str,
) -> Result<u64, String> {
    use futures_util::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;

    let partial_dir = blobs.root().join("partial");
    tokio::fs::create_dir_all(&partial_dir).await.map_err(|e| e.to_string())?;
    let partial = partial_dir.join(digest.to_hex());
    let have = tokio::fs::metadata(&partial).await.map_or(0, |m| m.len()).min(size_bytes);
    let url = format!("{}/v1/blobs/{}", peer.trim_end_matches('/'), digest.to_hex());
    let mut request = client.get(&url).header("x-maas-cluster-cookie", cookie);
    if have > 0 {
        request = request.header(http::header::RANGE, format!("bytes={have}-"));
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let resumed = status == http::StatusCode::PARTIAL_CONTENT;
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(&partial)
        .await
        .map_err(|e| e.to_string())?;
    let mut received = 0u64;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("the download broke off after {received} bytes: {e}"))?;
        received += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    file.flush().await.map_err(|e| e.to_string())?;
    drop(file);
    let reader = tokio::fs::File::open(&partial).await.map_err(|e| e.to_string())?;
    let stored = blobs.put_expected(reader, digest, Some(size_bytes)).await;
    // A mismatch means the partial file is bad: start over next time.
    let _ = tokio::fs::remove_file(&partial).await;
    stored.map_err(|e| e.to_string())?;
    Ok(received)
}

/// Where a node finds the other nodes' APIs (to fetch blobs from).
pub type PeerList = std::sync::Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// How this node loads replicas: a deployment's `model_path` when it has one, otherwise
/// its model version from the repository: the version's blobs are fetched from peers
/// where missing, laid out as a model folder, and every file is read and checked.
#[derive(Clone)]
pub struct NodeRuntime {
    /// How each generator replica's engine runs (batch size, queue bound).
    pub engine: maas_engine::EngineOptions,
    pub db: maas_store::Db,
    pub blobs: BlobStore,
    pub data_dir: PathBuf,
    pub peers: PeerList,
    pub cookie: String,
}

/// A model folder (or .gguf file) ready to load, and what its files hold.
pub struct LocalModel {
    pub path: PathBuf,
    pub files: ModelFiles,
}

impl NodeRuntime {
    /// Finds, fetches, lays out and checks the model of `spec`.
    pub async fn prepare(
        &self,
        spec: &crate::node::ReplicaSpec,
        log: &crate::node::ReplicaLog,
    ) -> Result<LocalModel, String> {
        let path = if let Some(path) = &spec.model_path {
            log.info(format!("loading {} from {path} on this node", spec.model_name));
            PathBuf::from(path)
        } else {
            log.info(format!("preparing the files of {}:{}", spec.model_name, spec.model_version));
            let record = self
                .db
                .models()
                .find(spec.model_owner.as_ref(), &spec.model_name, &spec.model_version)
                .await
                .map_err(|err| err.to_string())?;
            let peers = (self.peers)();
            let fetched = fetch_missing(&self.blobs, &record, &peers, &self.cookie).await?;
            if fetched > 0 {
                log.info(format!("fetched {fetched} bytes of model files from peers"));
            }
            let dir = materialise(&self.blobs, &self.data_dir, &record.files).await?;
            match record.files.as_slice() {
                [single] if record.metadata.format == "gguf" => dir.join(&single.path),
                _ => dir,
            }
        };
        let checked = path.clone();
        let files = tokio::task::spawn_blocking(move || maas_engine::model_files::inspect(&checked))
            .await
            .map_err(|e| format!("the loading thread failed: {e}"))?
            .map_err(|e| e.to_string())?;
        Ok(LocalModel { path, files })
    }
}

impl crate::node::ReplicaRuntime for NodeRuntime {
    fn load(&self, spec: crate::node::ReplicaSpec, log: crate::node::ReplicaLog) -> crate::node::LoadFuture {
        let runtime = self.clone();
        let options = self.engine.clone();
        Box::pin(async move {
            let model = runtime.prepare(&spec, &log).await?;
            let embedding = metadata_of(&model.files).tasks.iter().any(|task| task == "embedding");
            log.info(format!("loading the weights: {}", model.files.summary()));
            let path = model.path.clone();
            let serving = tokio::task::spawn_blocking(move || {
                if embedding {
                    maas_engine::EmbeddingModel::load(&path).map(|m| ServingModel::Embedder(std::sync::Arc::new(m)))
                } else {
                    maas_engine::Engine::load(&path, options).map(|e| ServingModel::Generator(std::sync::Arc::new(e)))
                }
            })
            .await
            .map_err(|e| format!("the loading thread failed: {e}"))?
            .map_err(|e| e.to_string())?;
            let summary = match &serving {
                ServingModel::Generator(engine) => {
                    let info = engine.info();
                    format!(
                        "{} {} ({} parameters, {}{}), context {}{}",
                        info.format,
                        info.architecture,
                        info.parameters,
                        info.dtype,
                        info.quantization.map(|q| format!(", {q}")).unwrap_or_default(),
                        info.context_length,
                        if info.tiny_random { "; a tiny random-weight model: its output is noise" } else { "" }
                    )
                }
                ServingModel::Embedder(model) => format!("embedding model, {} dimensions", model.dimensions()),
            };
            Ok(crate::node::LoadedReplica { summary, serving: Some(serving), model: Box::new(model.path) })
        })
    }
}
