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
            // An encoder embeds; every other model (`ChatGLMModel` included) generates.
            let tasks = if maas_engine::model_files::is_encoder(&config) {
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
            let file_type = unsigned("general.file_type").map(gguf_file_type_name);
            // What the weights are stored as: the file type llama.cpp names (`q4_k_m`), else
            // the tensor type holding the most elements (`q8_0`).
            let dtype = file_type
                .as_deref()
                .or(files.gguf_dominant_type())
                .map_or_else(|| "unknown".to_owned(), str::to_ascii_lowercase);
            let quantization = file_type.unwrap_or_else(|| match files.gguf_dominant_type() {
                Some("f32" | "f16" | "bf16" | "f64") => "none".to_owned(),
                Some(dominant) => dominant.to_ascii_uppercase(),
                None => "unknown".to_owned(),
            });
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
                dtype,
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

/// How long a peer may send nothing (no answer, then no bytes) before a fetch from it is
/// given up and the next peer is tried. A resumed fetch goes on from the bytes already
/// kept, so a stalled peer costs this much and no data.
pub const PEER_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long connecting to a peer may take.
const PEER_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

fn fetch_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(PEER_CONNECT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build an http client: {e}"))
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
    let client = fetch_client()?;
    let mut fetched = 0;
    for file in &record.files {
        let digest: Digest = file.sha256.parse().map_err(|e| format!("{}: {e}", file.path))?;
        fetched += fetch_from_peers(&client, blobs, &digest, file.size_bytes, peers, cookie, PEER_IDLE_TIMEOUT)
            .await
            .map_err(|err| format!("{}: {err}", file.path))?;
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
    let client = fetch_client()?;
    fetch_from_peers(&client, blobs, digest, size_bytes, peers, cookie, PEER_IDLE_TIMEOUT).await.map(|_| ())
}

/// The fetches in progress in this process, one lock per partial file: two fetches of one
/// blob (two replicas of a model, a batch and a download of its input) would otherwise
/// write the same `partial/<digest>` at once and spoil each other. A data directory has one
/// process (its `LOCK`), so a lock in memory covers every writer of a partial file.
static FETCH_LOCKS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<tokio::sync::Mutex<()>>>>,
> = std::sync::LazyLock::new(Default::default);

/// The lock of the fetches of one partial file, shared by every fetch of it now running.
fn fetch_lock(partial: &Path) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    let mut locks = FETCH_LOCKS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(lock) = locks.get(partial).and_then(std::sync::Weak::upgrade) {
        return lock;
    }
    // Locks no fetch holds any more go as new ones come, so the map stays small.
    locks.retain(|_, lock| lock.strong_count() > 0);
    let lock = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    locks.insert(partial.to_owned(), std::sync::Arc::downgrade(&lock));
    lock
}

/// Fetches one blob from the first peer that sends it whole; returns the bytes fetched
/// (0 when it is local, or another fetch brought it meanwhile). Fetches of the same blob
/// take turns; a peer silent for `idle_timeout` is left for the next.
async fn fetch_from_peers(
    client: &reqwest::Client,
    blobs: &BlobStore,
    digest: &Digest,
    size_bytes: u64,
    peers: &[String],
    cookie: &str,
    idle_timeout: std::time::Duration,
) -> Result<u64, String> {
    if blobs.contains(digest).await {
        return Ok(0);
    }
    let partial_dir = blobs.root().join("partial");
    tokio::fs::create_dir_all(&partial_dir).await.map_err(|e| e.to_string())?;
    let partial = partial_dir.join(digest.to_hex());
    let lock = fetch_lock(&partial);
    let _turn = lock.lock().await;
    // The fetch this one waited for may have brought the blob.
    if blobs.contains(digest).await {
        return Ok(0);
    }
    let mut last_error = format!("no peer to fetch blob {} from", digest.to_hex());
    for peer in peers {
        match fetch_one(client, blobs, digest, size_bytes, &partial, peer, cookie, idle_timeout).await {
            Ok(bytes) => return Ok(bytes),
            Err(err) => last_error = format!("fetching blob {} from {peer}: {err}", digest.to_hex()),
        }
    }
    Err(last_error)
}

/// One try at a peer, appending to `partial` (the caller holds its lock).
#[allow(clippy::too_many_arguments)] // The parts of one fetch, each needed; a struct would only rename them.
async fn fetch_one(
    client: &reqwest::Client,
    blobs: &BlobStore,
    digest: &Digest,
    size_bytes: u64,
    partial: &Path,
    peer: &str,
    cookie: &str,
    idle_timeout: std::time::Duration,
) -> Result<u64, String> {
    use futures_util::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;

    let have = tokio::fs::metadata(partial).await.map_or(0, |m| m.len()).min(size_bytes);
    let url = format!("{}/v1/blobs/{}", peer.trim_end_matches('/'), digest.to_hex());
    let mut request = client.get(&url).header("x-maas-cluster-cookie", cookie);
    if have > 0 {
        request = request.header(http::header::RANGE, format!("bytes={have}-"));
    }
    let response = tokio::time::timeout(idle_timeout, request.send())
        .await
        .map_err(|_| format!("{url} did not answer within {idle_timeout:?}"))?
        .map_err(|e| e.to_string())?;
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
        .open(partial)
        .await
        .map_err(|e| e.to_string())?;
    let mut received = 0u64;
    let mut stream = response.bytes_stream();
    loop {
        // A peer that stops sending (hung, paused, cut off) fails this try; what arrived
        // stays in the partial file for the next.
        let next = tokio::time::timeout(idle_timeout, stream.next())
            .await
            .map_err(|_| format!("the download stalled: nothing for {idle_timeout:?} after {received} bytes"))?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| format!("the download broke off after {received} bytes: {e}"))?;
        received += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    file.flush().await.map_err(|e| e.to_string())?;
    drop(file);
    let reader = tokio::fs::File::open(partial).await.map_err(|e| e.to_string())?;
    let stored = blobs.put_expected(reader, digest, Some(size_bytes)).await;
    // A mismatch means the partial file is bad: start over next time.
    let _ = tokio::fs::remove_file(partial).await;
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
    /// This node's GPUs the engine can run on: real ones, in a build with CUDA (their
    /// indices are CUDA ordinals). A replica placed on another GPU (a simulated one, or any
    /// GPU in a CPU-only build) computes on the CPU, and its log says so.
    pub cuda_gpus: Vec<u32>,
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
        let mut options = self.engine.clone();
        options.cuda_device = engine_device(&spec.gpu_indices, &self.cuda_gpus);
        if let Some(limits) = spec.serving {
            let context = usize::try_from(limits.context_tokens).unwrap_or(usize::MAX);
            let sequences = usize::try_from(limits.concurrent_sequences).unwrap_or(usize::MAX);
            options.max_context_tokens = Some(context);
            options.max_kv_tokens = Some(context.saturating_mul(sequences));
        }
        Box::pin(async move {
            let model = runtime.prepare(&spec, &log).await?;
            let embedding = metadata_of(&model.files).tasks.iter().any(|task| task == "embedding");
            log.info(format!("loading the weights: {}", model.files.summary()));
            match (options.cuda_device, spec.gpu_indices.as_slice()) {
                (Some(ordinal), [_, more @ ..]) if !embedding => {
                    log.info(format!("computing on CUDA device {ordinal}"));
                    if !more.is_empty() {
                        log.warn(format!(
                            "placed on {} GPUs, but the engine runs a replica on one: GPUs {more:?} hold its reservation unused",
                            spec.gpu_indices.len()
                        ));
                    }
                }
                (_, []) => {}
                (_, gpus) => log.info(format!(
                    "computing on the CPU: GPU(s) {gpus:?} are {}",
                    if embedding { "not used by embedding models" } else { "simulated, or this build has no CUDA" }
                )),
            }
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

/// The CUDA device a replica placed on `gpu_indices` computes on: its first GPU, when that
/// is one the engine can use.
fn engine_device(gpu_indices: &[u32], cuda_gpus: &[u32]) -> Option<usize> {
    let first = *gpu_indices.first()?;
    cuda_gpus.contains(&first).then(|| usize::try_from(first).ok()).flatten()
}

#[cfg(test)]
mod fetch_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A peer's `GET /v1/blobs/{digest}` over a real socket: serves `blob` (from a
    /// `Range: bytes=N-` start when asked, as 206), in small pieces with pauses so
    /// concurrent fetches overlap; with `stall_after`, it sends that many bytes and then
    /// nothing more. Counts requests and keeps each one's range start.
    struct Peer {
        url: String,
        starts: Arc<std::sync::Mutex<Vec<usize>>>,
        requests: Arc<AtomicUsize>,
    }

    async fn peer(blob: Vec<u8>, stall_after: Option<usize>) -> Peer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let (seen, counted) = (Arc::clone(&starts), Arc::clone(&requests));
        let blob = Arc::new(blob);
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let (blob, seen, counted) = (Arc::clone(&blob), Arc::clone(&seen), Arc::clone(&counted));
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut byte = [0_u8; 1];
                        if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let start = head
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
                    seen.lock().unwrap().push(start.unwrap_or(0));
                    let status = if start.is_some() { "206 Partial Content" } else { "200 OK" };
                    let body = &blob[start.unwrap_or(0)..];
                    let answer =
                        format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                    socket.write_all(answer.as_bytes()).await.unwrap();
                    let send = stall_after.map_or(body.len(), |n| n.min(body.len()));
                    for piece in body[..send].chunks(body.len().div_ceil(8).max(1)) {
                        if socket.write_all(piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if stall_after.is_some() {
                        // Hung: the connection stays open and silent.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                });
            }
        });
        Peer { url, starts, requests }
    }

    fn blob_bytes() -> Vec<u8> {
        (0..200_000_u32).map(|i| u8::try_from(i % 253).unwrap()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_fetches_of_one_blob_take_turns_and_download_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).await.unwrap();
        let blob = blob_bytes();
        let digest = Digest::of(&blob);
        let peer = peer(blob.clone(), None).await;
        let peers = vec![peer.url.clone()];
        let size = blob.len() as u64;
        let (first, second) = tokio::join!(
            fetch_blob(&blobs, &digest, size, &peers, "cookie"),
            fetch_blob(&blobs, &digest, size, &peers, "cookie"),
        );
        first.unwrap();
        second.unwrap();
        assert_eq!(blobs.read(&digest).await.unwrap(), blob);
        assert_eq!(peer.requests.load(Ordering::SeqCst), 1, "the second fetch found the blob the first brought");
        assert!(!blobs.root().join("partial").join(digest.to_hex()).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_peer_is_left_for_the_next_which_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).await.unwrap();
        let blob = blob_bytes();
        let digest = Digest::of(&blob);
        let stalled_at = 60_000;
        let hung = peer(blob.clone(), Some(stalled_at)).await;
        let good = peer(blob.clone(), None).await;
        let peers = vec![hung.url.clone(), good.url.clone()];
        let client = fetch_client().unwrap();
        let fetched =
            fetch_from_peers(&client, &blobs, &digest, blob.len() as u64, &peers, "cookie", Duration::from_millis(300))
                .await
                .unwrap();
        assert_eq!(blobs.read(&digest).await.unwrap(), blob);
        let kept = *hung.starts.lock().unwrap().first().unwrap();
        assert_eq!(kept, 0);
        let resumed_from = good.starts.lock().unwrap().clone();
        assert_eq!(resumed_from.len(), 1, "one request to the second peer");
        assert!(resumed_from[0] > 0, "the second peer sent only the rest: {resumed_from:?}");
        assert_eq!(usize::try_from(fetched).unwrap(), blob.len() - resumed_from[0]);
    }
}
