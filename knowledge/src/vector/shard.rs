//! One shard of an embedded collection: its HNSW graph, its chunks' metadata, and its log
//! and snapshot on disk. Synchronous: the embedded store (and later a `KbShardActor`) calls
//! it from a blocking thread.
//!
//! A shard folder holds `shard.json` (the manifest: format version, dimension, metric, HNSW
//! parameters), `snapshot.bin` (see `snapshot.rs`) and `wal.log` (see `wal.rs`). Opening
//! loads the snapshot and replays the log records after the snapshot's position. Every
//! change is logged and fsynced before it is applied in memory, and a change that fails
//! validation is neither.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::distance::{exact_top_k, prepare};
use super::filter::CompiledFilter;
use super::hnsw::{Hnsw, HnswParams, splitmix64};
use super::wal::{Wal, WalOp};
use super::{Metric, SearchFilter, SearchHit, VectorRecord, check_dimension, codec, snapshot, validate_record};
use crate::error::{KnowledgeError, Result};

const MANIFEST_FILE: &str = "shard.json";
/// The manifest's format version.
const MANIFEST_VERSION: u32 = 1;

/// A filtered search that passes at most this many chunks compares the query with each.
const EXACT_SEARCH_MIN_CANDIDATES: usize = 2048;

/// What a filtered graph walk costs, in dot products per unit of its effort: a walk that
/// keeps `ef` candidates computes the distances to the links of each node it expands and
/// spends about as much again on its heaps. Measured on 100,000 clustered vectors of
/// dimension 384 with a filter uncorrelated with the graph: 41 at half the chunks passing,
/// 63 at a quarter (where exact search and the walk both took 9 ms), 97 at a tenth, more
/// below; so exact search wins once fewer than about a quarter pass.
const WALK_DOTS_PER_EF: usize = 64;

/// Whether comparing the query with each of `candidates` chunks is cheaper than a graph
/// walk that must keep `ef * live / candidates` candidates to end with `ef` that pass:
/// exact costs `candidates` dot products, the walk about
/// `WALK_DOTS_PER_EF * ef * live / candidates`.
fn exact_is_cheaper(candidates: usize, live: usize, ef: usize) -> bool {
    candidates <= EXACT_SEARCH_MIN_CANDIDATES
        || candidates.saturating_mul(candidates) <= WALK_DOTS_PER_EF.saturating_mul(ef).saturating_mul(live)
}

/// A snapshot rebuilds the graph when at least this share of its nodes are deleted.
const REBUILD_DELETED_FRACTION: f64 = 0.25;

/// The hash a chunk id is sharded by: SplitMix64's mix, so consecutive ids spread evenly.
pub fn shard_hash(chunk_id: u64) -> u64 {
    splitmix64(chunk_id)
}

/// The shard (of `shards`) that owns a chunk: shard `s` owns the hash range
/// [`shard_hash_range`]`(s, shards)`, the `s`-th of `shards` equal slices of the `u64` range.
pub fn shard_for(chunk_id: u64, shards: u32) -> u32 {
    assert!(shards > 0, "a collection has at least one shard");
    let scaled = (u128::from(shard_hash(chunk_id)) * u128::from(shards)) >> 64;
    u32::try_from(scaled).expect("the product is below shards * 2^64")
}

/// The hashes shard `shard` of `shards` owns: `h` with `floor(h * shards / 2^64) == shard`.
pub fn shard_hash_range(shard: u32, shards: u32) -> RangeInclusive<u64> {
    assert!(shard < shards, "shard {shard} of {shards}");
    let start = |s: u32| (u128::from(s) << 64).div_ceil(u128::from(shards));
    let first = u64::try_from(start(shard)).expect("below 2^64 for shard < shards");
    let last = u64::try_from(start(shard + 1) - 1).expect("at most 2^64 - 1");
    first..=last
}

/// What a shard holds: fixed when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub dimension: usize,
    pub metric: Metric,
    pub hnsw: HnswParams,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    version: u32,
    dimension: usize,
    metric: Metric,
    hnsw: HnswParams,
}

/// Live chunk ids by a metadata value (a document id, a tag).
type MetadataIndex = HashMap<String, HashSet<u64>>;

/// A graph node's chunk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodeMeta {
    pub(crate) chunk_id: u64,
    pub(crate) document_id: String,
    pub(crate) version: i64,
    pub(crate) tags: Vec<String>,
    /// Deleted or replaced: the node stays in the graph for navigation until a rebuild.
    pub(crate) deleted: bool,
}

/// One shard: owns its index and its files.
#[derive(Debug)]
pub struct ShardIndex {
    dir: PathBuf,
    spec: ShardSpec,
    wal: Wal,
    memory: Memory,
}

/// The shard's state in memory: what the snapshot and the log rebuild.
#[derive(Debug)]
struct Memory {
    graph: Hnsw,
    nodes: Vec<NodeMeta>,
    /// Live chunk id → its node.
    live: HashMap<u64, u32>,
    by_document: MetadataIndex,
    by_tag: MetadataIndex,
    /// The last log position applied.
    last_lsn: u64,
}

impl ShardIndex {
    /// Whether `dir` holds a shard (its manifest is there).
    pub fn exists(dir: &Path) -> bool {
        dir.join(MANIFEST_FILE).exists()
    }

    /// Opens the shard in `dir`, or creates it there with `spec`. An existing shard must
    /// have the same dimension and metric (its own HNSW parameters are kept).
    pub fn open_or_create(dir: &Path, spec: ShardSpec) -> Result<Self> {
        if dir.join(MANIFEST_FILE).exists() {
            let shard = ShardIndex::open(dir)?;
            if (shard.spec.dimension, shard.spec.metric) != (spec.dimension, spec.metric) {
                return Err(KnowledgeError::CollectionMismatch {
                    name: dir.display().to_string(),
                    existing: describe(&shard.spec),
                    requested: describe(&spec),
                });
            }
            return Ok(shard);
        }
        std::fs::create_dir_all(dir).map_err(|e| KnowledgeError::io("create", dir, e))?;
        let manifest =
            Manifest { version: MANIFEST_VERSION, dimension: spec.dimension, metric: spec.metric, hnsw: spec.hnsw };
        let wal = Wal::reset(dir)?;
        codec::write_atomically(&dir.join(MANIFEST_FILE), |out| {
            serde_json::to_writer_pretty(&mut *out, &manifest).map_err(std::io::Error::other)
        })?;
        if let Some(parent) = dir.parent() {
            codec::sync_dir(parent)?;
        }
        Ok(ShardIndex { dir: dir.to_path_buf(), spec, wal, memory: Memory::new(spec) })
    }

    /// Opens the shard in `dir`: its snapshot, then its log after the snapshot.
    pub fn open(dir: &Path) -> Result<Self> {
        let spec = read_manifest(dir)?;
        let _ = std::fs::remove_file(codec::tmp_path(&dir.join(snapshot::SNAPSHOT_FILE)));
        let mut memory = match snapshot::read(dir, spec.dimension, spec.hnsw)? {
            Some(snapshot) => Memory::restore(dir, spec, snapshot)?,
            None => Memory::new(spec),
        };
        let after = memory.last_lsn;
        let wal = Wal::open(dir, |lsn, op| {
            if lsn > after {
                memory.apply(op);
                memory.last_lsn = lsn;
            }
            Ok(())
        })?;
        Ok(ShardIndex { dir: dir.to_path_buf(), spec, wal, memory })
    }

    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Live chunks.
    pub fn len(&self) -> usize {
        self.memory.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.memory.live.is_empty()
    }

    pub fn contains(&self, chunk_id: u64) -> bool {
        self.memory.live.contains_key(&chunk_id)
    }

    /// Graph nodes of deleted or replaced chunks, until the next rebuild.
    pub fn deleted_nodes(&self) -> usize {
        self.memory.nodes.len() - self.memory.live.len()
    }

    /// The log's size: what a snapshot would fold away.
    pub fn wal_bytes(&self) -> u64 {
        self.wal.bytes()
    }

    /// Inserts or replaces the records (the last of several with the same chunk id wins).
    /// Durable when it returns; nothing changes if any record is invalid.
    pub fn upsert(&mut self, records: Vec<VectorRecord>) -> Result<()> {
        let label = self.dir.display().to_string();
        let mut seen = HashSet::new();
        let mut prepared = Vec::with_capacity(records.len());
        for mut record in records.into_iter().rev() {
            validate_record(&label, self.spec.dimension, &record)?;
            prepare(self.spec.metric, &mut record.vector, &format!("chunk {}", record.chunk_id))?;
            if seen.insert(record.chunk_id) {
                prepared.push(record);
            }
        }
        if prepared.is_empty() {
            return Ok(());
        }
        prepared.reverse();
        self.commit(WalOp::Upsert(prepared))
    }

    /// Removes the chunks; returns how many were there. Durable when it returns.
    pub fn delete(&mut self, chunk_ids: &[u64]) -> Result<usize> {
        let mut present: Vec<u64> = chunk_ids.iter().copied().filter(|id| self.memory.live.contains_key(id)).collect();
        present.sort_unstable();
        present.dedup();
        let removed = present.len();
        if removed > 0 {
            self.commit(WalOp::Delete(present))?;
        }
        Ok(removed)
    }

    /// Removes a document's chunks, or with `keep_version` those of its other versions;
    /// returns how many.
    pub fn delete_document(&mut self, document_id: &str, keep_version: Option<i64>) -> Result<usize> {
        let doomed: Vec<u64> = self
            .memory
            .by_document
            .get(document_id)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| {
                keep_version.is_none_or(|keep| self.memory.nodes[self.memory.live[id] as usize].version != keep)
            })
            .collect();
        self.delete(&doomed)
    }

    fn commit(&mut self, op: WalOp) -> Result<()> {
        let lsn = self.memory.last_lsn + 1;
        self.wal.append(lsn, &op)?;
        self.memory.apply(op);
        self.memory.last_lsn = lsn;
        Ok(())
    }

    /// The `k` live chunks most similar to `query` that pass `filter`, best first.
    pub fn search(&self, query: &[f32], k: usize, filter: &SearchFilter) -> Result<Vec<SearchHit>> {
        self.search_with_ef(query, k, self.spec.hnsw.ef_search, filter)
    }

    /// [`ShardIndex::search`] with another search effort `ef` than the shard's.
    ///
    /// Unfiltered, it walks the graph. Filtered, it first lists the chunks that pass (through
    /// the document or tag index where the filter names documents or tags); when they are
    /// few it compares the query with each (exact), otherwise it walks the graph keeping
    /// `ef` scaled up by how selective the filter is. Whenever the walk finds fewer than
    /// `k` hits that exist, the answer comes from exact search instead, so a filter never
    /// loses hits to the approximation.
    pub fn search_with_ef(&self, query: &[f32], k: usize, ef: usize, filter: &SearchFilter) -> Result<Vec<SearchHit>> {
        check_dimension(&self.dir.display().to_string(), self.spec.dimension, query.len())?;
        let mut query = query.to_vec();
        prepare(self.spec.metric, &mut query, "the query")?;
        if k == 0 || self.memory.live.is_empty() || filter.matches_nothing() {
            return Ok(Vec::new());
        }
        if filter.is_empty() {
            let hits = self.walk(&query, k, ef, &|node| !self.memory.nodes[node as usize].deleted);
            if hits.len() >= k.min(self.memory.live.len()) {
                return Ok(hits);
            }
            return Ok(self.exact(&query, k, self.memory.live.values().copied()));
        }
        let compiled = CompiledFilter::new(filter);
        let candidates = self.candidates(filter, &compiled);
        let live = self.memory.live.len();
        let ef = ef.max(k);
        if exact_is_cheaper(candidates.len(), live, ef) {
            return Ok(self.exact(&query, k, candidates.into_iter()));
        }
        // The walk keeps more candidates the fewer chunks pass, so it still ends with k
        // that pass; passing is one bit per node, set from the candidate list.
        let mut passes = vec![0u64; self.memory.nodes.len().div_ceil(64)];
        for &node in &candidates {
            passes[node as usize / 64] |= 1 << (node % 64);
        }
        let walk_ef = ef.saturating_mul(live).div_ceil(candidates.len()).min(self.memory.nodes.len());
        let hits = self.walk(&query, k, walk_ef, &|node| passes[node as usize / 64] & (1 << (node % 64)) != 0);
        if hits.len() >= k.min(candidates.len()) {
            return Ok(hits);
        }
        Ok(self.exact(&query, k, candidates.into_iter()))
    }

    fn walk(&self, query: &[f32], k: usize, ef: usize, accept: &dyn Fn(u32) -> bool) -> Vec<SearchHit> {
        self.memory
            .graph
            .search(query, k, ef, accept)
            .into_iter()
            .map(|s| SearchHit { chunk_id: self.memory.nodes[s.node as usize].chunk_id, score: -s.dist })
            .collect()
    }

    fn exact(&self, query: &[f32], k: usize, nodes: impl Iterator<Item = u32>) -> Vec<SearchHit> {
        exact_top_k(
            query,
            nodes.map(|node| (self.memory.nodes[node as usize].chunk_id, self.memory.graph.vector(node))),
            k,
        )
    }

    /// The live nodes that pass the filter, listed through the narrowest index it names.
    fn candidates(&self, filter: &SearchFilter, compiled: &CompiledFilter<'_>) -> Vec<u32> {
        let listed: Option<(&MetadataIndex, &Vec<String>)> = filter
            .document_ids
            .as_ref()
            .map(|documents| (&self.memory.by_document, documents))
            .or_else(|| filter.tags.as_ref().map(|tags| (&self.memory.by_tag, tags)));
        let passes = |node: &u32| {
            let meta = &self.memory.nodes[*node as usize];
            compiled.matches(&meta.document_id, meta.version, &meta.tags)
        };
        let mut nodes: Vec<u32> = match listed {
            Some((index, keys)) => {
                let chunk_ids: HashSet<u64> = keys.iter().filter_map(|key| index.get(key)).flatten().copied().collect();
                chunk_ids.into_iter().map(|id| self.memory.live[&id]).filter(passes).collect()
            }
            None => self.memory.live.values().copied().filter(passes).collect(),
        };
        // In node order, exact search reads the vectors front to back.
        nodes.sort_unstable();
        nodes
    }

    /// Writes a snapshot of the whole shard and empties the log. Rebuilds the graph first
    /// when a quarter or more of its nodes are deleted chunks.
    pub fn snapshot(&mut self) -> Result<()> {
        #[allow(clippy::cast_precision_loss, reason = "a ratio")]
        let deleted_fraction = self.deleted_nodes() as f64 / self.memory.nodes.len().max(1) as f64;
        if deleted_fraction >= REBUILD_DELETED_FRACTION {
            self.rebuild();
        }
        snapshot::write(&self.dir, self.memory.last_lsn, &self.memory.nodes, &self.memory.graph)?;
        self.wal = Wal::reset(&self.dir)?;
        Ok(())
    }

    /// Builds a new graph of the live chunks only, in their current order.
    fn rebuild(&mut self) {
        let mut graph = Hnsw::new(self.spec.dimension, self.spec.hnsw);
        let mut nodes = Vec::with_capacity(self.memory.live.len());
        let mut live = HashMap::with_capacity(self.memory.live.len());
        for (old, meta) in self.memory.nodes.iter().enumerate() {
            if !meta.deleted {
                let old = u32::try_from(old).expect("node numbers fit u32");
                let node = graph.insert(self.memory.graph.vector(old));
                live.insert(meta.chunk_id, node);
                nodes.push(meta.clone());
            }
        }
        self.memory.graph = graph;
        self.memory.nodes = nodes;
        self.memory.live = live;
    }
}

impl Memory {
    fn new(spec: ShardSpec) -> Self {
        Memory {
            graph: Hnsw::new(spec.dimension, spec.hnsw),
            nodes: Vec::new(),
            live: HashMap::new(),
            by_document: HashMap::new(),
            by_tag: HashMap::new(),
            last_lsn: 0,
        }
    }

    fn restore(dir: &Path, spec: ShardSpec, snapshot: snapshot::Snapshot) -> Result<Self> {
        let mut memory = Memory::new(spec);
        memory.graph = snapshot.graph;
        memory.last_lsn = snapshot.last_lsn;
        for (node, meta) in snapshot.nodes.iter().enumerate() {
            if !meta.deleted {
                let node = u32::try_from(node).expect("the graph numbers nodes in u32");
                if memory.live.insert(meta.chunk_id, node).is_some() {
                    return Err(KnowledgeError::corrupt(
                        &dir.join(snapshot::SNAPSHOT_FILE),
                        format!("chunk {} is live twice", meta.chunk_id),
                    ));
                }
                memory.index_metadata(meta);
            }
        }
        memory.nodes = snapshot.nodes;
        Ok(memory)
    }

    /// Applies a logged change to memory (also on replay).
    fn apply(&mut self, op: WalOp) {
        match op {
            WalOp::Upsert(records) => {
                for record in records {
                    self.remove_live(record.chunk_id);
                    let node = self.graph.insert(&record.vector);
                    debug_assert_eq!(node as usize, self.nodes.len());
                    let meta = NodeMeta {
                        chunk_id: record.chunk_id,
                        document_id: record.document_id,
                        version: record.version,
                        tags: record.tags,
                        deleted: false,
                    };
                    self.index_metadata(&meta);
                    self.live.insert(meta.chunk_id, node);
                    self.nodes.push(meta);
                }
            }
            WalOp::Delete(chunk_ids) => {
                for chunk_id in chunk_ids {
                    self.remove_live(chunk_id);
                }
            }
        }
    }

    fn index_metadata(&mut self, meta: &NodeMeta) {
        self.by_document.entry(meta.document_id.clone()).or_default().insert(meta.chunk_id);
        for tag in &meta.tags {
            self.by_tag.entry(tag.clone()).or_default().insert(meta.chunk_id);
        }
    }

    fn remove_live(&mut self, chunk_id: u64) {
        let Some(node) = self.live.remove(&chunk_id) else { return };
        let meta = &mut self.nodes[node as usize];
        meta.deleted = true;
        remove_from(&mut self.by_document, &meta.document_id, chunk_id);
        for tag in &meta.tags {
            remove_from(&mut self.by_tag, tag, chunk_id);
        }
    }
}

fn remove_from(index: &mut MetadataIndex, key: &str, chunk_id: u64) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(&chunk_id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

fn describe(spec: &ShardSpec) -> String {
    format!("dimension {} and metric {}", spec.dimension, spec.metric)
}

fn read_manifest(dir: &Path) -> Result<ShardSpec> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(|e| KnowledgeError::io("read", &path, e))?;
    let version = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| KnowledgeError::corrupt(&path, e.to_string()))?
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| KnowledgeError::corrupt(&path, "no version"))?;
    if version > u64::from(MANIFEST_VERSION) {
        return Err(KnowledgeError::UnsupportedVersion {
            path,
            found: u32::try_from(version).unwrap_or(u32::MAX),
            supported: MANIFEST_VERSION,
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| KnowledgeError::corrupt(&path, e.to_string()))?;
    Ok(ShardSpec { dimension: manifest.dimension, metric: manifest.metric, hnsw: manifest.hnsw })
}
