//! Knowledge-base shards on this node. A shard owns the chunks of one knowledge base
//! whose id hashes ([`maas_knowledge::vector::shard_hash`]) fall in its range: their
//! vectors in an HNSW [`ShardIndex`] (knowledge bases on the embedded backend; Milvus
//! holds the others' vectors) and their text in a BM25 [`FullTextIndex`], both under
//! `<root>/<shard id>/` and both crash-safe (a write is durable when it returns).
//!
//! A `KbShardActor` per shard placed here (the node agent starts and stops them from the
//! committed state) opens its indexes on a blocking thread, puts them in the
//! [`KbShardTable`] the gateway reads and writes through, and takes them out when it
//! stops; a shard retired from this node (moved away or its knowledge base deleted) has
//! its files removed. Reads and writes do not queue behind the actor's mailbox: searches
//! on one shard run concurrently, writes take turns on the index's own lock.
//!
//! A shard opened here is not `serving` until the gateway has caught it up with the
//! chunks SQL says it holds ([`LocalShard::mark_caught_up`]): a shard that moved here
//! after its node died starts empty and is rebuilt from them.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use maas_knowledge::KnowledgeError;
use maas_knowledge::fulltext::{FullTextIndex, FullTextRecord, TextStatistics};
use maas_knowledge::vector::{SearchFilter, SearchHit, SearchRequest, ShardIndex, ShardSpec, VectorRecord, shard_hash};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use serde::{Deserialize, Serialize};

use super::agent::AgentMsg;

type Result<T> = std::result::Result<T, KnowledgeError>;

/// The folders of one shard's indexes.
const VECTORS_DIR: &str = "vectors";
const FULLTEXT_DIR: &str = "fulltext";

/// One shard's open indexes.
#[derive(Debug)]
pub struct LocalShard {
    pub shard_id: String,
    pub knowledge_base_id: String,
    pub hash_range: RangeInclusive<u64>,
    dir: PathBuf,
    /// Created on the first write that carries vectors (the embedding model's dimension
    /// is known then); `None` for a knowledge base whose vectors are in Milvus.
    vectors: RwLock<Option<ShardIndex>>,
    fulltext: FullTextIndex,
    caught_up: AtomicBool,
}

/// How much a shard holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCounts {
    pub vectors: u64,
    pub fulltext: u64,
}

impl LocalShard {
    /// Opens (or creates) the shard's indexes under `dir`. Blocks on disk I/O.
    pub fn open(
        dir: &Path,
        shard_id: String,
        knowledge_base_id: String,
        hash_range: RangeInclusive<u64>,
    ) -> Result<Self> {
        let vector_dir = dir.join(VECTORS_DIR);
        let vectors = if ShardIndex::exists(&vector_dir) { Some(ShardIndex::open(&vector_dir)?) } else { None };
        let fulltext = FullTextIndex::open(dir.join(FULLTEXT_DIR))?;
        Ok(LocalShard {
            shard_id,
            knowledge_base_id,
            hash_range,
            dir: dir.to_owned(),
            vectors: RwLock::new(vectors),
            fulltext,
            caught_up: AtomicBool::new(false),
        })
    }

    /// Whether chunk `chunk_id` belongs to this shard.
    pub fn owns(&self, chunk_id: u64) -> bool {
        self.hash_range.contains(&shard_hash(chunk_id))
    }

    /// Writes vectors (creating the vector index with `spec` on the first) and texts;
    /// every record must belong to this shard. Durable when it returns.
    pub fn write(&self, spec: Option<ShardSpec>, vectors: Vec<VectorRecord>, texts: &[FullTextRecord]) -> Result<()> {
        let stray =
            vectors.iter().map(|r| r.chunk_id).chain(texts.iter().map(|r| r.chunk_id)).find(|&id| !self.owns(id));
        if let Some(chunk_id) = stray {
            return Err(KnowledgeError::InvalidRequest {
                reason: format!("chunk {chunk_id} does not belong to shard {}", self.shard_id),
            });
        }
        if !vectors.is_empty() {
            let mut index = self.vectors.write().expect("shard vectors lock");
            if index.is_none() {
                let Some(spec) = spec else {
                    return Err(KnowledgeError::InvalidRequest {
                        reason: format!("shard {} has no vector index yet and the write gave no spec", self.shard_id),
                    });
                };
                *index = Some(ShardIndex::open_or_create(&self.dir.join(VECTORS_DIR), spec)?);
            }
            let index = index.as_mut().expect("created above");
            index.upsert(vectors)?;
            snapshot_if_due(index)?;
        }
        self.fulltext.upsert(texts)
    }

    /// Removes a document's chunks (every version, or every version but `keep_version`).
    pub fn delete_document(&self, document_id: &str, keep_version: Option<i64>) -> Result<()> {
        if let Some(index) = self.vectors.write().expect("shard vectors lock").as_mut() {
            index.delete_document(document_id, keep_version)?;
            snapshot_if_due(index)?;
        }
        self.fulltext.delete_document(document_id, keep_version)
    }

    /// The nearest chunks to the query vector (none before the first vector is written).
    pub fn search_vectors(&self, request: &SearchRequest) -> Result<Vec<SearchHit>> {
        match self.vectors.read().expect("shard vectors lock").as_ref() {
            Some(index) => index.search(&request.vector, request.k, &request.filter),
            None => Ok(Vec::new()),
        }
    }

    /// The best BM25 matches of `query`, scored with the whole knowledge base's
    /// `statistics` when given (see [`TextStatistics`]).
    pub fn search_text(
        &self,
        query: &str,
        k: usize,
        filter: &SearchFilter,
        statistics: Option<&TextStatistics>,
    ) -> Result<Vec<SearchHit>> {
        self.fulltext.search_with(query, k, filter, statistics)
    }

    /// This shard's BM25 statistics for `query`.
    pub fn text_statistics(&self, query: &str) -> Result<TextStatistics> {
        self.fulltext.statistics(query)
    }

    pub fn counts(&self) -> ShardCounts {
        let vectors = self.vectors.read().expect("shard vectors lock").as_ref().map_or(0, |index| index.len() as u64);
        ShardCounts { vectors, fulltext: self.fulltext.len() }
    }

    /// Of `chunk_ids`, those the shard lacks: with `vectors`, in either index; otherwise
    /// in the full-text index.
    pub fn missing(&self, chunk_ids: &[u64], vectors: bool) -> Result<Vec<u64>> {
        let index = self.vectors.read().expect("shard vectors lock");
        let mut missing = Vec::new();
        for &chunk_id in chunk_ids {
            let has_vector = !vectors || index.as_ref().is_some_and(|index| index.contains(chunk_id));
            if !has_vector || !self.fulltext.contains(chunk_id)? {
                missing.push(chunk_id);
            }
        }
        Ok(missing)
    }

    /// Whether the shard holds every chunk SQL says it should (see the module notes).
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    pub fn mark_caught_up(&self) {
        self.caught_up.store(true, Ordering::SeqCst);
    }
}

/// A shard's log is folded into a snapshot when it passes this size, so opening it
/// replays little.
const SNAPSHOT_AFTER_WAL_BYTES: u64 = 32 << 20;

fn snapshot_if_due(index: &mut ShardIndex) -> Result<()> {
    if index.wal_bytes() > SNAPSHOT_AFTER_WAL_BYTES { index.snapshot() } else { Ok(()) }
}

/// Shard id → its open indexes, shared by the shard actors and the gateway.
#[derive(Clone, Default, Debug)]
pub struct KbShardTable(Arc<RwLock<HashMap<String, Arc<LocalShard>>>>);

impl KbShardTable {
    pub fn get(&self, shard_id: &str) -> Option<Arc<LocalShard>> {
        self.0.read().expect("shard table lock").get(shard_id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<LocalShard>> {
        self.0.read().expect("shard table lock").values().cloned().collect()
    }

    fn insert(&self, shard: Arc<LocalShard>) {
        self.0.write().expect("shard table lock").insert(shard.shard_id.clone(), shard);
    }

    fn remove(&self, shard_id: &str) -> Option<Arc<LocalShard>> {
        self.0.write().expect("shard table lock").remove(shard_id)
    }
}

/// What the agent hands a shard actor.
pub struct KbShardArgs {
    pub shard_id: String,
    pub knowledge_base_id: String,
    pub hash_range: RangeInclusive<u64>,
    /// `<data>/knowledge/shards/<shard id>`.
    pub dir: PathBuf,
    pub table: KbShardTable,
    pub agent: ActorRef<AgentMsg>,
}

#[derive(RactorMessage)]
pub enum KbShardMsg {
    /// The shard leaves this node for good: close it, remove its files, stop.
    Retire,
}

pub struct KbShardActor;

pub struct KbShardState {
    shard_id: String,
    dir: PathBuf,
    table: KbShardTable,
}

impl Actor for KbShardActor {
    type Msg = KbShardMsg;
    type State = KbShardState;
    type Arguments = KbShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<KbShardMsg>,
        args: KbShardArgs,
    ) -> std::result::Result<KbShardState, ActorProcessingErr> {
        let KbShardArgs { shard_id, knowledge_base_id, hash_range, dir, table, agent } = args;
        let (id, path) = (shard_id.clone(), dir.clone());
        let opened = tokio::task::spawn_blocking(move || LocalShard::open(&path, id, knowledge_base_id, hash_range))
            .await
            .map_err(|e| KnowledgeError::InvalidRequest { reason: format!("the opening thread failed: {e}") })
            .and_then(|opened| opened);
        match opened {
            Ok(shard) => {
                tracing::info!(shard = %shard_id, dir = %dir.display(), counts = ?shard.counts(), "knowledge-base shard open");
                table.insert(Arc::new(shard));
                let _ = agent.cast(AgentMsg::ShardReport { shard_id: shard_id.clone(), failed: None });
            }
            Err(err) => {
                let reason = format!("cannot open shard {shard_id} in {}: {err}", dir.display());
                tracing::error!(shard = %shard_id, "{reason}");
                let _ = agent.cast(AgentMsg::ShardReport { shard_id: shard_id.clone(), failed: Some(reason) });
                myself.stop(Some("the shard did not open".into()));
            }
        }
        Ok(KbShardState { shard_id, dir, table })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<KbShardMsg>,
        state: &mut KbShardState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        state.table.remove(&state.shard_id);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<KbShardMsg>,
        message: KbShardMsg,
        state: &mut KbShardState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match message {
            KbShardMsg::Retire => {
                drop(state.table.remove(&state.shard_id));
                let dir = state.dir.clone();
                let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                    Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
                    _ => Ok(()),
                })
                .await;
                match removed {
                    Ok(Ok(())) => {
                        tracing::info!(shard = %state.shard_id, "knowledge-base shard retired, files removed");
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(shard = %state.shard_id, error = %err, "cannot remove a retired shard's files");
                    }
                    Err(err) => tracing::warn!(shard = %state.shard_id, error = %err, "the removing thread failed"),
                }
                myself.stop(Some("retired".into()));
            }
        }
        Ok(())
    }
}

/// The registered name of a shard actor: unique in the cluster, as ractor names must be.
pub fn kb_shard_actor_name(node_id: u64, shard_id: &str) -> String {
    format!("maas.kb_shard.{node_id}.{shard_id}")
}

#[cfg(test)]
mod tests {
    use maas_knowledge::vector::{HnswParams, Metric, shard_hash_range};

    use super::*;

    fn spec() -> ShardSpec {
        ShardSpec { dimension: 2, metric: Metric::Cosine, hnsw: HnswParams::default() }
    }

    fn as_f32(id: u64) -> f32 {
        f32::from(u16::try_from(id).unwrap())
    }

    /// Chunk ids whose hashes fall in shard `shard` of `shards`.
    fn ids_of(shard: u32, shards: u32, count: usize) -> Vec<u64> {
        let range = shard_hash_range(shard, shards);
        (1..).filter(|id| range.contains(&shard_hash(*id))).take(count).collect()
    }

    #[test]
    fn a_shard_keeps_its_own_chunks_across_a_reopen_and_says_what_it_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let range = shard_hash_range(1, 3);
        let open = || LocalShard::open(dir.path(), "kb.1".into(), "kb".into(), range.clone()).unwrap();
        let shard = open();
        let ids = ids_of(1, 3, 3);
        let vector = |id: u64| VectorRecord {
            chunk_id: id,
            vector: vec![1.0, as_f32(id)],
            document_id: "doc".into(),
            version: 1,
            tags: vec![],
        };
        let text = |id: u64| FullTextRecord::new(id, "doc", 1, format!("lighthouse number{id}"));

        // Another shard's chunk is refused; vectors without a spec before the index exists too.
        let stray = ids_of(0, 3, 1)[0];
        assert!(shard.write(Some(spec()), vec![], &[text(stray)]).is_err());
        assert!(shard.write(None, vec![vector(ids[0])], &[]).is_err());
        assert_eq!(shard.missing(&ids, true).unwrap(), ids);

        shard
            .write(Some(spec()), ids[..2].iter().map(|&id| vector(id)).collect(), &[text(ids[0]), text(ids[1])])
            .unwrap();
        assert_eq!(shard.counts(), ShardCounts { vectors: 2, fulltext: 2 });
        assert_eq!(shard.missing(&ids, true).unwrap(), vec![ids[2]]);
        let hits = shard.search_text(&format!("number{}", ids[1]), 5, &SearchFilter::default(), None).unwrap();
        assert_eq!(hits.iter().map(|h| h.chunk_id).collect::<Vec<_>>(), vec![ids[1]]);
        drop(shard);

        // Reopened (a restart): the same chunks, not yet caught up.
        let shard = open();
        assert!(!shard.caught_up());
        assert_eq!(shard.counts(), ShardCounts { vectors: 2, fulltext: 2 });
        let near = shard.search_vectors(&SearchRequest::new(vec![1.0, as_f32(ids[0])], 1)).unwrap();
        assert_eq!(near[0].chunk_id, ids[0]);
        shard.delete_document("doc", None).unwrap();
        assert_eq!(shard.counts(), ShardCounts::default());
        assert_eq!(shard.missing(&ids[..1], false).unwrap(), vec![ids[0]]);
    }
}
