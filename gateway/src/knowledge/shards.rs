//! A knowledge base's shards across the cluster. Each knowledge base has `shard_count`
//! shards, each owning the chunks whose id hashes fall in its slice of the `u64` range;
//! the control plane places them on nodes ([`ensure`]: spread by the scheduler, moved off
//! dead and draining nodes by the leader's reconcile loop), and each node's agent runs a
//! `KbShardActor` per shard placed on it, holding the shard's BM25 index and, for the
//! embedded backend, its HNSW vectors ([`maas_actors::node::kb_shard`]).
//!
//! This module routes: a write goes to the shards its chunks belong to, a deletion and a
//! search to every shard (in parallel; hits are merged best first), each call to this
//! node's own shard directly or to the owning node's `POST /internal/kb_shards/{id}`.
//! A search still answers when a shard is away or rebuilding, naming the shards it missed.
//!
//! [`spawn_catch_up`] brings every shard opened on this node up to date with SQL, the
//! source of truth, before the agent reports it `serving`: a shard that moved here after
//! its node died starts empty and has its chunks' texts indexed and vectors embedded
//! again; a shard reopened after a restart finds nothing missing.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use maas_actors::node::{LocalShard, ShardCounts};
use maas_consensus::state::{Command, HashRange, KbShardPlacement, KbShardState, NodeId, NodeStatus, ShardId};
use maas_knowledge::KnowledgeError;
use maas_knowledge::fulltext::{FullTextRecord, TextStatistics};
use maas_knowledge::vector::{
    HnswParams, Metric, SearchFilter, SearchHit, SearchRequest, ShardSpec, VectorRecord, shard_hash, shard_hash_range,
    sort_and_truncate,
};
use maas_store::repo::knowledge::{Document, KnowledgeBase};
use serde::{Deserialize, Serialize};

use super::ingest::{indexed_text, text_record, vector_record};
use super::knowledge_error;
use crate::error::ApiError;
use crate::routes::cluster::{COOKIE_HEADER, control_plane, now_ms};
use crate::routes::openai::CalledFor;
use crate::state::AppState;

/// One call on a shard, as it crosses the network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ShardOp {
    Write { spec: Option<ShardSpec>, vectors: Vec<VectorRecord>, texts: Vec<FullTextRecord> },
    DeleteDocument { document_id: String, keep_version: Option<i64> },
    SearchVectors { request: SearchRequest },
    SearchText { query: String, k: usize, filter: SearchFilter, statistics: Option<TextStatistics> },
    TextStatistics { query: String },
    Counts,
}

/// A shard's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardAnswer {
    Done,
    Hits(Vec<SearchHit>),
    Counts(ShardCounts),
    Statistics(TextStatistics),
}

/// Runs `op` on a shard of this node, on a blocking thread.
pub async fn execute(shard: Arc<LocalShard>, op: ShardOp) -> Result<ShardAnswer, ApiError> {
    tokio::task::spawn_blocking(move || -> Result<ShardAnswer, KnowledgeError> {
        Ok(match op {
            ShardOp::Write { spec, vectors, texts } => {
                shard.write(spec, vectors, &texts)?;
                ShardAnswer::Done
            }
            ShardOp::DeleteDocument { document_id, keep_version } => {
                shard.delete_document(&document_id, keep_version)?;
                ShardAnswer::Done
            }
            ShardOp::SearchVectors { request } => ShardAnswer::Hits(shard.search_vectors(&request)?),
            ShardOp::SearchText { query, k, filter, statistics } => {
                ShardAnswer::Hits(shard.search_text(&query, k, &filter, statistics.as_ref())?)
            }
            ShardOp::TextStatistics { query } => ShardAnswer::Statistics(shard.text_statistics(&query)?),
            ShardOp::Counts => ShardAnswer::Counts(shard.counts()),
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("the shard thread failed: {e}")))?
    .map_err(|e| knowledge_error(&e))
}

/// This node's open shard `shard_id` (for `/internal/kb_shards/{id}`).
pub fn local(state: &AppState, shard_id: &str) -> Result<Arc<LocalShard>, ApiError> {
    state
        .kb_shards
        .get()
        .and_then(|table| table.get(shard_id))
        .ok_or_else(|| ApiError::unavailable(format!("shard {shard_id} is not open on this node")))
}

/// Where one shard is, as the committed state says.
#[derive(Debug, Clone)]
struct Route {
    shard_id: String,
    range: RangeInclusive<u64>,
    node_id: u64,
    /// The owner's API address; `None` when it is not alive.
    api: Option<String>,
    state: KbShardState,
}

/// A knowledge base's shards, read from the committed state once per operation.
#[derive(Debug, Clone)]
pub struct KbShards {
    knowledge_base_id: String,
    own: u64,
    routes: Vec<Route>,
}

/// What a fan-out found, and the shards it could not ask or that are still rebuilding.
#[derive(Debug, Default)]
pub struct Gathered {
    pub hits: Vec<SearchHit>,
    pub incomplete: Vec<String>,
}

impl KbShards {
    /// The shards of `kb_id` (none before [`ensure`] placed them, nor while the control
    /// plane is starting).
    pub fn of(state: &AppState, kb_id: &str) -> Self {
        let Ok(handle) = control_plane(state) else {
            return KbShards { knowledge_base_id: kb_id.to_owned(), own: 0, routes: Vec::new() };
        };
        let own = handle.id();
        let routes = handle.read_local(|cluster| {
            cluster
                .kb_shards()
                .values()
                .filter(|shard| shard.knowledge_base_id == kb_id && shard.state != KbShardState::Stopping)
                .map(|shard| Route {
                    shard_id: shard.id.0.clone(),
                    range: shard.hash_range.start..=shard.hash_range.end_inclusive,
                    node_id: shard.node_id.0,
                    api: cluster
                        .node(shard.node_id)
                        .filter(|node| {
                            matches!(node.status, NodeStatus::Alive | NodeStatus::Suspect | NodeStatus::Draining)
                        })
                        .map(|node| node.api_addr.clone()),
                    state: shard.state.clone(),
                })
                .collect()
        });
        KbShards { knowledge_base_id: kb_id.to_owned(), own, routes }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Whether every shard is open on its node (`loading` or `serving`: it takes writes).
    fn all_open(&self) -> bool {
        self.routes.iter().all(|route| matches!(route.state, KbShardState::Loading | KbShardState::Serving))
    }

    /// Waits, at most `within`, until every shard of the knowledge base is open (a shard
    /// just placed, or moved, opens within a reconciliation or two), and returns them as
    /// they are then. A write to a shard not open yet fails, and its ingestion step would
    /// wait for its lease to run out before trying again.
    pub async fn wait_open(state: &AppState, kb_id: &str, within: Duration) -> Self {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let shards = KbShards::of(state, kb_id);
            if shards.all_open() || tokio::time::Instant::now() >= deadline {
                return shards;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each shard's id, node and state (for the knowledge base's view).
    pub fn placements(&self) -> Vec<ShardPlacementView> {
        self.routes
            .iter()
            .map(|r| ShardPlacementView {
                id: r.shard_id.clone(),
                node_id: r.node_id,
                state: r.state.name().to_owned(),
            })
            .collect()
    }

    /// Writes vectors (the embedded backend's; empty for Milvus) and texts to the shards
    /// their chunks belong to. Durable on every shard when it returns.
    pub async fn write(
        &self,
        state: &AppState,
        spec: Option<ShardSpec>,
        vectors: Vec<VectorRecord>,
        texts: Vec<FullTextRecord>,
    ) -> Result<(), ApiError> {
        let mut parts: BTreeMap<usize, (Vec<VectorRecord>, Vec<FullTextRecord>)> = BTreeMap::new();
        for record in vectors {
            parts.entry(self.route_of(record.chunk_id)?).or_default().0.push(record);
        }
        for record in texts {
            parts.entry(self.route_of(record.chunk_id)?).or_default().1.push(record);
        }
        let calls = parts.into_iter().map(|(route, (vectors, texts))| {
            self.call(state, &self.routes[route], ShardOp::Write { spec, vectors, texts })
        });
        for outcome in futures_util::future::join_all(calls).await {
            outcome?;
        }
        Ok(())
    }

    /// Removes a document's chunks from every shard (all versions, or all but one).
    pub async fn delete_document(
        &self,
        state: &AppState,
        document_id: &str,
        keep_version: Option<i64>,
    ) -> Result<(), ApiError> {
        let op = ShardOp::DeleteDocument { document_id: document_id.to_owned(), keep_version };
        let calls = self.routes.iter().map(|route| self.call(state, route, op.clone()));
        for outcome in futures_util::future::join_all(calls).await {
            outcome?;
        }
        Ok(())
    }

    /// The best `k` hits of every shard that answers, merged.
    pub async fn search(&self, state: &AppState, op: ShardOp, k: usize) -> Gathered {
        let calls = self.routes.iter().map(|route| {
            let op = op.clone();
            async move { (route, self.call(state, route, op).await) }
        });
        let mut gathered = Gathered::default();
        for (route, outcome) in futures_util::future::join_all(calls).await {
            match outcome {
                Ok(ShardAnswer::Hits(hits)) => {
                    gathered.hits.extend(hits);
                    if route.state != KbShardState::Serving {
                        gathered.incomplete.push(route.shard_id.clone());
                    }
                }
                Ok(_) => gathered.incomplete.push(route.shard_id.clone()),
                Err(err) => {
                    tracing::warn!(shard = %route.shard_id, node = route.node_id, error = %err.message, "a shard did not answer a search");
                    gathered.incomplete.push(route.shard_id.clone());
                }
            }
        }
        sort_and_truncate(&mut gathered.hits, k);
        gathered
    }

    /// The best `k` BM25 hits of `query` over all shards. With more than one shard, their
    /// statistics for the query are summed first and every shard scores with the sum, so
    /// the ranking is the one a single index would give, whatever landed in which shard.
    pub async fn search_text(&self, state: &AppState, query: &str, k: usize, filter: &SearchFilter) -> Gathered {
        let statistics = if self.routes.len() > 1 {
            let op = ShardOp::TextStatistics { query: query.to_owned() };
            let calls = self.routes.iter().map(|route| self.call(state, route, op.clone()));
            let mut sum = TextStatistics::default();
            for answer in futures_util::future::join_all(calls).await {
                if let Ok(ShardAnswer::Statistics(statistics)) = answer {
                    sum.add(&statistics);
                }
            }
            Some(sum)
        } else {
            None
        };
        let op = ShardOp::SearchText { query: query.to_owned(), k, filter: filter.clone(), statistics };
        self.search(state, op, k).await
    }

    /// What the shards hold, summed over those that answer.
    pub async fn counts(&self, state: &AppState) -> (ShardCounts, Vec<String>) {
        let calls =
            self.routes.iter().map(|route| async move { (route, self.call(state, route, ShardOp::Counts).await) });
        let (mut total, mut missing) = (ShardCounts::default(), Vec::new());
        for (route, outcome) in futures_util::future::join_all(calls).await {
            match outcome {
                Ok(ShardAnswer::Counts(counts)) => {
                    total.vectors += counts.vectors;
                    total.fulltext += counts.fulltext;
                }
                _ => missing.push(route.shard_id.clone()),
            }
        }
        (total, missing)
    }

    fn route_of(&self, chunk_id: u64) -> Result<usize, ApiError> {
        let hash = shard_hash(chunk_id);
        self.routes.iter().position(|route| route.range.contains(&hash)).ok_or_else(|| {
            ApiError::unavailable(format!(
                "knowledge base {} has no shard for chunk {chunk_id} (its shards are not placed yet)",
                self.knowledge_base_id
            ))
        })
    }

    async fn call(&self, state: &AppState, route: &Route, op: ShardOp) -> Result<ShardAnswer, ApiError> {
        if route.node_id == self.own {
            return execute(local(state, &route.shard_id)?, op).await;
        }
        let Some(api) = &route.api else {
            return Err(ApiError::unavailable(format!(
                "shard {} is on node {}, which is down; it moves once the node is declared dead",
                route.shard_id, route.node_id
            )));
        };
        let url = format!("{}/internal/kb_shards/{}", api.trim_end_matches('/'), route.shard_id);
        let timeout = if matches!(op, ShardOp::Write { .. }) { WRITE_TIMEOUT } else { READ_TIMEOUT };
        let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
        let unreachable = |why: String| {
            ApiError::unavailable(format!("shard {} on node {} did not answer: {why}", route.shard_id, route.node_id))
        };
        let response = state
            .http
            .post(&url)
            .header(COOKIE_HEADER, cookie)
            .json(&op)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| unreachable(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| unreachable(format!("an unreadable answer: {e}")));
        }
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        if status == http::StatusCode::BAD_REQUEST {
            Err(ApiError::bad_request("invalid_request", message))
        } else {
            Err(unreachable(format!("{status}: {message}")))
        }
    }
}

const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A shard as a knowledge base's view shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ShardPlacementView {
    pub id: String,
    pub node_id: u64,
    /// `pending`, `loading` (opening or catching up), `serving` or `failed`.
    pub state: String,
}

/// Places knowledge base `kb`'s shards if they are not placed yet: `shard_count` slices of
/// the hash range, spread over the nodes that take work. Returns them once they are open
/// (or after [`OPEN_WAIT`], as they are then).
pub async fn ensure(state: &AppState, kb: &KnowledgeBase) -> Result<KbShards, ApiError> {
    let shards = KbShards::of(state, &kb.id);
    if !shards.is_empty() {
        return Ok(KbShards::wait_open(state, &kb.id, OPEN_WAIT).await);
    }
    let count = u32::try_from(kb.shard_count).unwrap_or(1).clamp(1, maas_knowledge::vector::MAX_SHARDS);
    let handle = control_plane(state)?;
    let holding = handle.read_local(maas_consensus::reconcile::shard_holdings);
    let nodes = maas_scheduler::place_shards(&holding, count as usize);
    if nodes.is_empty() {
        return Err(ApiError::unavailable("no node takes work: the knowledge base's shards cannot be placed"));
    }
    let placements = (0..count)
        .zip(nodes)
        .map(|(shard, node)| {
            let range = shard_hash_range(shard, count);
            KbShardPlacement {
                shard_id: ShardId(format!("{}.{shard}", kb.id)),
                knowledge_base_id: kb.id.clone(),
                hash_range: HashRange { start: *range.start(), end_inclusive: *range.end() },
                node_id: NodeId(node),
            }
        })
        .collect();
    // One command for all of them: two nodes placing the same new knowledge base at once
    // (an upload on one, a retrieval on another) agree on the first placement committed.
    let command = Command::PlaceKbShards { knowledge_base_id: kb.id.clone(), placements, at_ms: now_ms() };
    if let Err(rejection) = handle.propose(command).await? {
        return Err(ApiError::unavailable(format!("cannot place the shards of {}: {rejection}", kb.id)));
    }
    Ok(KbShards::wait_open(state, &kb.id, OPEN_WAIT).await)
}

/// How long [`ensure`] waits for a knowledge base's shards to open.
const OPEN_WAIT: Duration = Duration::from_secs(10);

/// Retires a deleted knowledge base's shards: their nodes drop them and their files.
pub async fn retire(state: &AppState, kb_id: &str) -> Result<(), ApiError> {
    let handle = control_plane(state)?;
    for route in KbShards::of(state, kb_id).routes {
        let command = Command::SetKbShardState {
            shard_id: ShardId(route.shard_id),
            state: KbShardState::Stopping,
            at_ms: now_ms(),
        };
        // A shard removed meanwhile (its node died) needs nothing more.
        let _ = handle.propose(command).await?;
    }
    Ok(())
}

/// The vector index's shape for knowledge base `kb`'s embedding model, or `None` when its
/// vectors are kept in Milvus.
pub async fn vector_spec(state: &Arc<AppState>, kb: &KnowledgeBase) -> Result<Option<ShardSpec>, ApiError> {
    if kb.vector_backend == "milvus" {
        return Ok(None);
    }
    let dimension =
        state.model_texts.embedding(state, CalledFor::owner(&kb.owner), &kb.embedding_model).await?.dimensions;
    Ok(Some(ShardSpec { dimension, metric: Metric::Cosine, hnsw: HnswParams::default() }))
}

/// Catches up, every second, each shard opened on this node that is not caught up yet.
pub fn spawn_catch_up(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failing: HashMap<String, String> = HashMap::new();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(table) = state.kb_shards.get() else { continue };
            if state.stores.get().is_none() || !state.readiness.is_ready() {
                continue;
            }
            for shard in table.all().into_iter().filter(|shard| !shard.caught_up()) {
                match catch_up(&state, &shard).await {
                    Ok(written) => {
                        failing.remove(&shard.shard_id);
                        tracing::info!(shard = %shard.shard_id, written, "knowledge-base shard caught up");
                        shard.mark_caught_up();
                    }
                    Err(err) => {
                        // Said once per reason: an embedding model that is not deployed
                        // yet would say it every second.
                        if failing.get(&shard.shard_id) != Some(&err.message) {
                            tracing::warn!(shard = %shard.shard_id, error = %err.message, "cannot catch the shard up yet");
                            failing.insert(shard.shard_id.clone(), err.message);
                        }
                    }
                }
            }
        }
    })
}

/// Chunks read from SQL per step of a catch-up.
const CATCH_UP_PAGE: i64 = 512;

/// Writes into `shard` the chunks SQL says it holds and it lacks; returns how many.
async fn catch_up(state: &Arc<AppState>, shard: &Arc<LocalShard>) -> Result<usize, ApiError> {
    let stores = state.stores()?;
    let db = stores.db.knowledge_bases();
    let kb = match db.get_unscoped(&shard.knowledge_base_id).await {
        Ok(kb) => kb,
        // Deleted: the shard is on its way out.
        Err(maas_store::StoreError::NotFound { .. }) => return Ok(0),
        Err(err) => return Err(err.into()),
    };
    let with_vectors = kb.vector_backend != "milvus";
    // The vector index's shape, asked of the embedding model once, when a vector is written.
    let mut spec = None;
    let mut documents: HashMap<String, Document> = HashMap::new();
    let (mut after, mut written) = (0_i64, 0_usize);
    loop {
        let page = db.indexed_chunks(&kb.id, after, CATCH_UP_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.chunk_id;
        let mine: Vec<_> = page.into_iter().filter(|chunk| shard.owns(chunk.chunk_id.cast_unsigned())).collect();
        let ids: Vec<u64> = mine.iter().map(|chunk| chunk.chunk_id.cast_unsigned()).collect();
        let local = Arc::clone(shard);
        let missing = tokio::task::spawn_blocking(move || local.missing(&ids, with_vectors))
            .await
            .map_err(|e| ApiError::internal(format!("the shard thread failed: {e}")))?
            .map_err(|e| knowledge_error(&e))?;
        let chunks: Vec<_> =
            mine.into_iter().filter(|chunk| missing.contains(&chunk.chunk_id.cast_unsigned())).collect();
        let batch = state.knowledge.get().map_or(64, |service| service.options.embed_batch.max(1));
        for part in chunks.chunks(batch) {
            for chunk in part {
                if !documents.contains_key(&chunk.document_id) {
                    documents.insert(chunk.document_id.clone(), db.document(&chunk.document_id).await?);
                }
            }
            let texts: Vec<String> = part.iter().map(indexed_text).collect();
            let records: Vec<FullTextRecord> = part
                .iter()
                .zip(&texts)
                .map(|(chunk, text)| text_record(chunk, &documents[&chunk.document_id], text.clone()))
                .collect();
            let (spec, vectors) = if with_vectors {
                let (embedded, _) =
                    crate::routes::openai::embed_texts(state, CalledFor::owner(&kb.owner), &kb.embedding_model, texts)
                        .await?;
                let vectors = part
                    .iter()
                    .zip(embedded)
                    .map(|(chunk, vector)| vector_record(chunk, &documents[&chunk.document_id], vector))
                    .collect();
                if spec.is_none() {
                    spec = vector_spec(state, &kb).await?;
                }
                (spec, vectors)
            } else {
                (None, Vec::new())
            };
            execute(Arc::clone(shard), ShardOp::Write { spec, vectors, texts: records }).await?;
            written += part.len();
        }
    }
    Ok(written)
}
