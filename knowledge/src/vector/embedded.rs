//! The embedded vector store: collections as folders of shards under one root, searched in
//! this process.
//!
//! Layout: `ROOT/<collection>/collection.json` (format version, name, dimension, metric,
//! shard count) and `ROOT/<collection>/shard-NNNN/` (a [`ShardIndex`]). A chunk lives in
//! shard [`shard_for`]`(chunk_id, shards)`; the shard count is fixed when the collection is
//! created. Every shard call runs on a blocking thread, never on the async workers: writes
//! go to the shards they touch in parallel, and a search goes to every shard in parallel
//! and merges their top k. An upsert that spans shards is durable in each when it returns;
//! a crash during one may leave it applied in some shards only, which the caller's retry
//! (upserts and deletes are idempotent) completes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::hnsw::HnswParams;
use super::shard::{ShardIndex, ShardSpec, shard_for};
use super::{
    CollectionSpec, Metric, SearchHit, SearchRequest, VectorRecord, VectorStore, codec, sort_and_truncate,
    validate_collection_name, validate_record, validate_search, validate_spec,
};
use crate::error::{KnowledgeError, Result};

const COLLECTION_MANIFEST: &str = "collection.json";
/// The collection manifest's format version.
const COLLECTION_MANIFEST_VERSION: u32 = 1;
/// A dropped collection's folder is renamed to this prefix + its name before it is removed,
/// so a crash midway leaves no half-removed collection; leftovers are removed on open.
const DROPPED_PREFIX: &str = ".dropped-";

/// Settings of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// The HNSW parameters of new shards (a shard keeps those it was created with).
    pub hnsw: HnswParams,
    /// A shard writes a snapshot and empties its log once the log passes this many bytes
    /// (default 32 MiB). Opening replays the log after the snapshot into the graph, about
    /// 20,000 384-dimensional vectors at most for the default, so this bounds how long a
    /// shard takes to open; a smaller value rewrites the snapshot more often while writing.
    pub snapshot_after_wal_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions { hnsw: HnswParams::default(), snapshot_after_wal_bytes: 32 << 20 }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectionManifest {
    version: u32,
    name: String,
    dimension: usize,
    metric: Metric,
    shards: u32,
}

type Shard = Arc<RwLock<ShardIndex>>;

#[derive(Debug)]
struct Collection {
    spec: CollectionSpec,
    shards: Vec<Shard>,
}

type CollectionCell = Arc<OnceCell<Arc<Collection>>>;

/// The embedded backend of [`VectorStore`].
#[derive(Debug)]
pub struct EmbeddedStore {
    root: PathBuf,
    options: EmbeddedOptions,
    /// Collections opened so far; a cell is filled by the first call that opens or creates
    /// the collection, so two calls never open the same files twice.
    collections: Mutex<HashMap<String, CollectionCell>>,
}

impl EmbeddedStore {
    /// A store whose collections live under `root` (created if missing). Collections are
    /// opened from disk when first used.
    pub fn open(root: &Path, options: EmbeddedOptions) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| KnowledgeError::io("create", root, e))?;
        let entries = std::fs::read_dir(root).map_err(|e| KnowledgeError::io("list", root, e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(DROPPED_PREFIX) {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(|e| KnowledgeError::io("remove", &path, e))?;
            }
        }
        Ok(EmbeddedStore { root: root.to_path_buf(), options, collections: Mutex::new(HashMap::new()) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a snapshot of every shard of the collection and empties their logs (shards
    /// also do this by themselves as their logs grow).
    pub async fn snapshot(&self, collection: &str) -> Result<()> {
        let collection = self.collection(collection).await?;
        let tasks: Vec<_> =
            (0..collection.shards.len()).map(|shard| write_shard(&collection, shard, ShardIndex::snapshot)).collect();
        join_all(tasks).await.map(|_| ())
    }

    fn cell(&self, name: &str) -> CollectionCell {
        let mut collections = self.collections.lock().unwrap_or_else(PoisonError::into_inner);
        collections.entry(name.to_owned()).or_default().clone()
    }

    /// The open collection, opened from disk on first use.
    async fn collection(&self, name: &str) -> Result<Arc<Collection>> {
        validate_collection_name(name)?;
        let dir = self.root.join(name);
        let name = name.to_owned();
        let cell = self.cell(&name);
        let collection = cell
            .get_or_try_init(|| async move {
                let label = name.clone();
                blocking(&label, move || {
                    if !dir.join(COLLECTION_MANIFEST).exists() {
                        return Err(KnowledgeError::UnknownCollection { name });
                    }
                    open_collection(&dir, None)
                })
                .await
            })
            .await?;
        Ok(collection.clone())
    }
}

/// Opens the collection in `dir`, or creates it there from `create`.
fn open_collection(dir: &Path, create: Option<&(CollectionSpec, HnswParams)>) -> Result<Arc<Collection>> {
    let manifest_path = dir.join(COLLECTION_MANIFEST);
    let spec = if manifest_path.exists() {
        read_collection_manifest(&manifest_path)?
    } else if let Some((spec, _)) = create {
        std::fs::create_dir_all(dir).map_err(|e| KnowledgeError::io("create", dir, e))?;
        spec.clone()
    } else {
        return Err(KnowledgeError::UnknownCollection { name: dir.display().to_string() });
    };
    let hnsw = create.map_or_else(HnswParams::default, |(_, hnsw)| *hnsw);
    let shard_spec = ShardSpec { dimension: spec.dimension, metric: spec.metric, hnsw };
    let shards = std::thread::scope(|scope| {
        let opening: Vec<_> = (0..spec.shards)
            .map(|shard| {
                let shard_dir = dir.join(format!("shard-{shard:04}"));
                scope.spawn(move || ShardIndex::open_or_create(&shard_dir, shard_spec))
            })
            .collect();
        opening
            .into_iter()
            .map(|handle| handle.join().unwrap_or_else(|_| panic!("opening a shard panicked")))
            .map(|shard| shard.map(|s| Arc::new(RwLock::new(s))))
            .collect::<Result<Vec<_>>>()
    })?;
    if !manifest_path.exists() {
        // Written last: a collection without its manifest is not there, and a crash before
        // this leaves shard folders that the next create reuses.
        let manifest = CollectionManifest {
            version: COLLECTION_MANIFEST_VERSION,
            name: spec.name.clone(),
            dimension: spec.dimension,
            metric: spec.metric,
            shards: spec.shards,
        };
        codec::write_atomically(&manifest_path, |out| {
            serde_json::to_writer_pretty(&mut *out, &manifest).map_err(std::io::Error::other)
        })?;
    }
    Ok(Arc::new(Collection { spec, shards }))
}

fn read_collection_manifest(path: &Path) -> Result<CollectionSpec> {
    let bytes = std::fs::read(path).map_err(|e| KnowledgeError::io("read", path, e))?;
    let manifest: CollectionManifest =
        serde_json::from_slice(&bytes).map_err(|e| KnowledgeError::corrupt(path, e.to_string()))?;
    if manifest.version > COLLECTION_MANIFEST_VERSION {
        return Err(KnowledgeError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: manifest.version,
            supported: COLLECTION_MANIFEST_VERSION,
        });
    }
    Ok(CollectionSpec {
        name: manifest.name,
        dimension: manifest.dimension,
        metric: manifest.metric,
        shards: manifest.shards,
    })
}

/// Runs `work` on a blocking thread; a panic there becomes an error.
async fn blocking<T: Send + 'static>(collection: &str, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| KnowledgeError::ShardFailed {
        collection: collection.to_owned(),
        shard: 0,
        reason: format!("a blocking task failed: {e}"),
    })?
}

fn shard_failed(collection: &Collection, shard: usize, reason: impl Into<String>) -> KnowledgeError {
    KnowledgeError::ShardFailed {
        collection: collection.spec.name.clone(),
        shard: u32::try_from(shard).unwrap_or(u32::MAX),
        reason: reason.into(),
    }
}

/// Runs `work` on the shard's index under its write lock, on a blocking thread.
fn write_shard<T: Send + 'static>(
    collection: &Arc<Collection>,
    shard: usize,
    work: impl FnOnce(&mut ShardIndex) -> Result<T> + Send + 'static,
) -> tokio::task::JoinHandle<Result<T>> {
    let collection = collection.clone();
    tokio::task::spawn_blocking(move || {
        let mut index = collection.shards[shard]
            .write()
            .map_err(|_| shard_failed(&collection, shard, "an earlier write panicked midway"))?;
        work(&mut index)
    })
}

/// Runs `work` on the shard's index under its read lock, on a blocking thread.
fn read_shard<T: Send + 'static>(
    collection: &Arc<Collection>,
    shard: usize,
    work: impl FnOnce(&ShardIndex) -> Result<T> + Send + 'static,
) -> tokio::task::JoinHandle<Result<T>> {
    let collection = collection.clone();
    tokio::task::spawn_blocking(move || {
        let index = collection.shards[shard]
            .read()
            .map_err(|_| shard_failed(&collection, shard, "an earlier write panicked midway"))?;
        work(&index)
    })
}

/// Awaits every task (so none is left running), then returns the first error if any.
async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<Result<T>>>) -> Result<Vec<T>> {
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.map_err(|e| KnowledgeError::ShardFailed {
            collection: String::new(),
            shard: 0,
            reason: format!("a shard task failed: {e}"),
        }));
    }
    results.into_iter().map(|joined| joined.and_then(|result| result)).collect()
}

/// After a write: a shard whose log has grown past the limit folds it into a snapshot.
fn snapshot_if_due(index: &mut ShardIndex, limit_bytes: u64) -> Result<()> {
    if index.wal_bytes() > limit_bytes { index.snapshot() } else { Ok(()) }
}

#[async_trait]
impl VectorStore for EmbeddedStore {
    async fn ensure_collection(&self, spec: &CollectionSpec) -> Result<()> {
        validate_spec(spec)?;
        let dir = self.root.join(&spec.name);
        let create = (spec.clone(), self.options.hnsw);
        let name = spec.name.clone();
        let collection = self
            .cell(&spec.name)
            .get_or_try_init(|| async move { blocking(&name, move || open_collection(&dir, Some(&create))).await })
            .await?
            .clone();
        if (collection.spec.dimension, collection.spec.metric) != (spec.dimension, spec.metric) {
            return Err(KnowledgeError::CollectionMismatch {
                name: spec.name.clone(),
                existing: format!("dimension {} and metric {}", collection.spec.dimension, collection.spec.metric),
                requested: format!("dimension {} and metric {}", spec.dimension, spec.metric),
            });
        }
        Ok(())
    }

    async fn has_collection(&self, name: &str) -> Result<bool> {
        validate_collection_name(name)?;
        let manifest = self.root.join(name).join(COLLECTION_MANIFEST);
        tokio::fs::try_exists(&manifest).await.map_err(|e| KnowledgeError::io("look for", &manifest, e))
    }

    async fn drop_collection(&self, name: &str) -> Result<()> {
        validate_collection_name(name)?;
        self.collections.lock().unwrap_or_else(PoisonError::into_inner).remove(name);
        let dir = self.root.join(name);
        let doomed = self.root.join(format!("{DROPPED_PREFIX}{name}"));
        let root = self.root.clone();
        blocking(name, move || {
            if !dir.exists() {
                return Ok(());
            }
            if doomed.exists() {
                std::fs::remove_dir_all(&doomed).map_err(|e| KnowledgeError::io("remove", &doomed, e))?;
            }
            std::fs::rename(&dir, &doomed).map_err(|e| KnowledgeError::io("rename", &dir, e))?;
            codec::sync_dir(&root)?;
            std::fs::remove_dir_all(&doomed).map_err(|e| KnowledgeError::io("remove", &doomed, e))
        })
        .await
    }

    async fn upsert(&self, collection: &str, records: Vec<VectorRecord>) -> Result<()> {
        let collection = self.collection(collection).await?;
        for record in &records {
            validate_record(&collection.spec.name, collection.spec.dimension, record)?;
        }
        let shards = collection.spec.shards;
        let mut groups: Vec<Vec<VectorRecord>> = vec![Vec::new(); shards as usize];
        for record in records {
            groups[shard_for(record.chunk_id, shards) as usize].push(record);
        }
        let limit = self.options.snapshot_after_wal_bytes;
        let tasks = groups
            .into_iter()
            .enumerate()
            .filter(|(_, group)| !group.is_empty())
            .map(|(shard, group)| {
                write_shard(&collection, shard, move |index| {
                    index.upsert(group)?;
                    snapshot_if_due(index, limit)
                })
            })
            .collect();
        join_all(tasks).await.map(|_| ())
    }

    async fn delete(&self, collection: &str, chunk_ids: &[u64]) -> Result<()> {
        let collection = self.collection(collection).await?;
        let shards = collection.spec.shards;
        let mut groups: Vec<Vec<u64>> = vec![Vec::new(); shards as usize];
        for &chunk_id in chunk_ids {
            groups[shard_for(chunk_id, shards) as usize].push(chunk_id);
        }
        let limit = self.options.snapshot_after_wal_bytes;
        let tasks = groups
            .into_iter()
            .enumerate()
            .filter(|(_, group)| !group.is_empty())
            .map(|(shard, group)| {
                write_shard(&collection, shard, move |index| {
                    index.delete(&group)?;
                    snapshot_if_due(index, limit)
                })
            })
            .collect();
        join_all(tasks).await.map(|_| ())
    }

    async fn delete_document(&self, collection: &str, document_id: &str, keep_version: Option<i64>) -> Result<()> {
        let collection = self.collection(collection).await?;
        let limit = self.options.snapshot_after_wal_bytes;
        let tasks = (0..collection.shards.len())
            .map(|shard| {
                let document_id = document_id.to_owned();
                write_shard(&collection, shard, move |index| {
                    index.delete_document(&document_id, keep_version)?;
                    snapshot_if_due(index, limit)
                })
            })
            .collect();
        join_all(tasks).await.map(|_| ())
    }

    async fn search(&self, collection: &str, request: &SearchRequest) -> Result<Vec<SearchHit>> {
        let collection = self.collection(collection).await?;
        validate_search(&collection.spec.name, collection.spec.dimension, request)?;
        if request.k == 0 || request.filter.matches_nothing() {
            return Ok(Vec::new());
        }
        let request = Arc::new(request.clone());
        let tasks = (0..collection.shards.len())
            .map(|shard| {
                let request = request.clone();
                read_shard(&collection, shard, move |index| index.search(&request.vector, request.k, &request.filter))
            })
            .collect();
        let mut hits: Vec<SearchHit> = join_all(tasks).await?.into_iter().flatten().collect();
        sort_and_truncate(&mut hits, request.k);
        Ok(hits)
    }

    async fn count(&self, collection: &str) -> Result<u64> {
        let collection = self.collection(collection).await?;
        let tasks =
            (0..collection.shards.len()).map(|shard| read_shard(&collection, shard, |index| Ok(index.len()))).collect();
        Ok(join_all(tasks).await?.into_iter().map(|len| len as u64).sum())
    }
}
