//! Retrieval from a knowledge base: vector search (the query embedded by the knowledge
//! base's embedding deployment), BM25 full-text search, or both fused by weighted
//! score divided by each list's best ([`maas_knowledge::hybrid::fuse`]), with filters on documents, tags and
//! versions. Hits are read back from SQL, so only chunks of documents in state `indexed`
//! are returned, each with where it came from (document, version, pages, headings) and,
//! on request, the larger parent chunk it stands for.

use std::collections::HashMap;
use std::sync::Arc;

use maas_knowledge::hybrid::{max_fusion, weights_for};
use maas_knowledge::vector::{SearchFilter, SearchHit, SearchRequest};
use maas_store::repo::knowledge::{Document, DocumentState, KnowledgeBase, StoredChunk};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::shards::{KbShards, ShardOp};
use super::{KnowledgeService, knowledge_error};
use crate::error::ApiError;
use crate::metering::Work;
use crate::state::{AppState, Stores};

/// The most chunks one retrieval returns.
pub const MAX_TOP_K: usize = 50;
/// The longest query accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

/// How a knowledge base is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetrievalMode {
    /// Nearest chunks by embedding.
    Vector,
    /// BM25 over the chunks' words (jieba segmentation for Chinese).
    Fulltext,
    /// Both, fused by weighted normalised score; the vector ranking counts less for
    /// queries in a language the embedding model does not cover.
    #[default]
    Hybrid,
}

/// What to retrieve: `POST /v1/knowledge_bases/{id}/retrieve`, and the `knowledge` part
/// of a RAG chat request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrieveRequest {
    pub query: String,
    /// How many chunks (1 to 50, default 5).
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub mode: Option<RetrievalMode>,
    /// Only these documents.
    #[serde(default)]
    pub document_ids: Option<Vec<String>>,
    /// Only documents carrying at least one of these tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Only these versions of their documents' files.
    #[serde(default)]
    pub versions: Option<Vec<i64>>,
    /// Whether each hit carries its parent chunk's text (default true).
    #[serde(default)]
    pub include_parent: Option<bool>,
    /// Widen the search through the knowledge graph: chunks that mention the query's
    /// entities and their neighbours join the ranking (default false).
    #[serde(default)]
    pub graph: Option<bool>,
}

/// One retrieved chunk, where it came from, and how it scored.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RetrievedChunk {
    /// 1 for the best.
    pub rank: usize,
    /// The chunk's id (a decimal string: it does not fit JavaScript's numbers).
    pub chunk_id: String,
    /// The score the ranking used: fused (hybrid), cosine similarity (vector) or BM25.
    pub score: f32,
    /// The cosine similarity to the query, where the vector search found the chunk.
    pub vector_score: Option<f32>,
    /// The BM25 score, where the full-text search found the chunk.
    pub fulltext_score: Option<f32>,
    pub document_id: String,
    pub filename: String,
    pub version: i64,
    /// Pages the chunk spans (1 for formats without pages).
    pub page_start: i64,
    pub page_end: i64,
    pub heading_path: Vec<String>,
    pub ordinal: i64,
    pub text: String,
    /// The larger context the chunk sits in.
    pub parent_text: Option<String>,
    pub tags: Vec<String>,
}

/// The answer of a retrieval.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RetrieveResponse {
    pub object: &'static str,
    pub knowledge_base_id: String,
    pub mode: RetrievalMode,
    pub query: String,
    pub data: Vec<RetrievedChunk>,
    /// Shards of the knowledge base that did not answer or are still rebuilding (their
    /// node died and they moved): the results may miss chunks they hold.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub incomplete_shards: Vec<String>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message).with_param(param)
}

/// Checks a request and fills in defaults: (top_k, mode, filter, include_parent).
fn checked(request: &RetrieveRequest) -> Result<(usize, RetrievalMode, SearchFilter, bool), ApiError> {
    if request.query.trim().is_empty() {
        return Err(bad("query", "query is empty"));
    }
    if request.query.len() > MAX_QUERY_BYTES {
        return Err(bad("query", format!("query is longer than {MAX_QUERY_BYTES} bytes")));
    }
    let top_k = request.top_k.unwrap_or(5);
    if !(1..=MAX_TOP_K).contains(&top_k) {
        return Err(bad("top_k", format!("top_k must be 1 to {MAX_TOP_K}")));
    }
    let filter = SearchFilter {
        document_ids: request.document_ids.clone(),
        tags: request.tags.clone(),
        versions: request.versions.clone(),
    };
    Ok((top_k, request.mode.unwrap_or_default(), filter, request.include_parent.unwrap_or(true)))
}

/// Whether a knowledge base's embedding model covers languages beyond English
/// (`settings.retrieval.multilingual`, default false: all-MiniLM-L6-v2 does not).
fn multilingual(kb: &KnowledgeBase) -> bool {
    crate::routes::knowledge::KnowledgeBaseSettings::of(kb).retrieval.multilingual
}

/// Retrieves from `kb` (whose access the caller checked).
pub async fn retrieve(
    state: &Arc<AppState>,
    stores: &Stores,
    service: &KnowledgeService,
    kb: &KnowledgeBase,
    request: &RetrieveRequest,
    work: &Work,
) -> Result<RetrieveResponse, ApiError> {
    let (top_k, mode, filter, include_parent) = checked(request)?;
    // Chunks of retired or deleted versions may still be in the indexes for a moment:
    // fetch more than asked, and keep the indexed ones.
    let fetch = top_k * 3 + 10;
    let weights = weights_for(&request.query, multilingual(kb));
    // A hybrid query whose vector ranking would count for nothing (a Chinese query on an
    // English-only model) is not embedded at all.
    let skip_vectors = mode == RetrievalMode::Fulltext || (mode == RetrievalMode::Hybrid && weights.vector <= 0.0);
    let mut shards = KbShards::of(state, &kb.id);
    if shards.is_empty() {
        // A knowledge base made before shards existed gets them now; they fill from SQL.
        if let Ok(placed) = super::shards::ensure(state, kb).await {
            shards = placed;
        }
    }
    let mut incomplete = Vec::new();
    let vector_hits = if skip_vectors {
        Vec::new()
    } else {
        let search = VectorSearch { query: &request.query, k: fetch, filter: &filter, work };
        vector_search(state, service, &shards, kb, &search, &mut incomplete).await?
    };
    let fulltext_hits = if mode == RetrievalMode::Vector {
        Vec::new()
    } else {
        let gathered = shards.search_text(state, &request.query, fetch, &filter).await;
        incomplete.extend(gathered.incomplete);
        gathered.hits
    };
    incomplete.sort_unstable();
    incomplete.dedup();
    let graph_hits = if request.graph.unwrap_or(false) {
        graph_search(stores, kb, &request.query, fetch).await?
    } else {
        Vec::new()
    };
    let ranked = match mode {
        RetrievalMode::Vector if graph_hits.is_empty() => vector_hits.clone(),
        RetrievalMode::Fulltext if graph_hits.is_empty() => fulltext_hits.clone(),
        RetrievalMode::Vector => max_fusion(&[(1.0, &vector_hits), (GRAPH_WEIGHT, &graph_hits)], fetch),
        RetrievalMode::Fulltext => max_fusion(&[(1.0, &fulltext_hits), (GRAPH_WEIGHT, &graph_hits)], fetch),
        RetrievalMode::Hybrid => {
            let lists = [
                (weights.vector, &vector_hits[..]),
                (weights.fulltext, &fulltext_hits[..]),
                (GRAPH_WEIGHT, &graph_hits[..]),
            ];
            max_fusion(&lists, fetch)
        }
    };
    let data = hydrate(stores, kb, &ranked, (&vector_hits, &fulltext_hits), &filter, top_k, include_parent).await?;
    Ok(RetrieveResponse {
        object: "knowledge_base.retrieval",
        knowledge_base_id: kb.id.clone(),
        mode,
        query: request.query.clone(),
        data,
        incomplete_shards: incomplete,
    })
}

/// How much the graph's ranking counts in a fusion, against 1 for the vector and BM25
/// rankings: it only widens them.
const GRAPH_WEIGHT: f32 = 0.5;

/// Chunks that mention the query's entities (the graph's entities named in the query, and
/// those the extractor finds in it), then chunks that mention their neighbours, best first.
async fn graph_search(stores: &Stores, kb: &KnowledgeBase, query: &str, k: usize) -> Result<Vec<SearchHit>, ApiError> {
    let db = stores.db.knowledge_bases();
    let limit = i64::try_from(k).unwrap_or(i64::MAX);
    let mut keys = db.graph_entities_in(&kb.id, query, 5).await?;
    for entity in maas_knowledge::graph::extract(query).entities {
        if !keys.contains(&entity.key) {
            keys.push(entity.key);
        }
    }
    let mut neighbours = Vec::new();
    for edge in db.graph_edges(&kb.id, &keys, 10).await? {
        for end in [edge.source, edge.target] {
            if !keys.contains(&end) && !neighbours.contains(&end) {
                neighbours.push(end);
            }
        }
    }
    let mut ids: Vec<i64> = Vec::new();
    for (key, per_key) in keys.iter().map(|k| (k, limit)).chain(neighbours.iter().map(|k| (k, 5))) {
        if ids.len() >= k {
            // The best k are in: the keys and neighbours further down cannot displace them.
            break;
        }
        for id in db.graph_entity_chunks(&kb.id, key, per_key).await? {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids.truncate(k);
    #[allow(clippy::cast_precision_loss)]
    Ok(ids
        .into_iter()
        .enumerate()
        .map(|(rank, id)| SearchHit { chunk_id: id.cast_unsigned(), score: 1.0 / (rank + 1) as f32 })
        .collect())
}

/// What a vector search looks for, and whose work its query's embedding is.
struct VectorSearch<'a> {
    query: &'a str,
    k: usize,
    filter: &'a SearchFilter,
    work: &'a Work,
}

async fn vector_search(
    state: &Arc<AppState>,
    service: &KnowledgeService,
    shards: &KbShards,
    kb: &KnowledgeBase,
    search: &VectorSearch<'_>,
    incomplete: &mut Vec<String>,
) -> Result<Vec<SearchHit>, ApiError> {
    let &VectorSearch { query, k, filter, work } = search;
    // Nothing was ever indexed: nothing to find (and no model needed to say so).
    let milvus = if kb.vector_backend == "milvus" {
        let milvus = service.milvus().await?;
        if !milvus.has_collection(&kb.id).await.map_err(|e| knowledge_error(&e))? {
            return Ok(Vec::new());
        }
        Some(milvus)
    } else {
        let (counts, missing) = shards.counts(state).await;
        if counts.vectors == 0 && missing.is_empty() {
            return Ok(Vec::new());
        }
        None
    };
    let started = std::time::Instant::now();
    let (mut embedded, tokens) = crate::routes::openai::embed_texts(
        state,
        crate::routes::openai::CalledFor::owner(&kb.owner),
        &kb.embedding_model,
        vec![query.to_owned()],
    )
    .await?;
    work.record(state, &kb.embedding_model, (tokens, 0), started);
    let vector = embedded.pop().ok_or_else(|| ApiError::internal("the embedding model answered no vector"))?;
    let request = SearchRequest::new(vector, k).filter(filter.clone());
    if let Some(milvus) = milvus {
        return milvus.search(&kb.id, &request).await.map_err(|e| knowledge_error(&e));
    }
    let gathered = shards.search(state, ShardOp::SearchVectors { request }, k).await;
    incomplete.extend(gathered.incomplete);
    Ok(gathered.hits)
}

/// Reads the ranked chunks back from SQL, keeps those of indexed documents, and makes
/// the answer's entries.
async fn hydrate(
    stores: &Stores,
    kb: &KnowledgeBase,
    ranked: &[SearchHit],
    (vector_hits, fulltext_hits): (&[SearchHit], &[SearchHit]),
    filter: &SearchFilter,
    top_k: usize,
    include_parent: bool,
) -> Result<Vec<RetrievedChunk>, ApiError> {
    let db = stores.db.knowledge_bases();
    let vector_scores: HashMap<u64, f32> = vector_hits.iter().map(|h| (h.chunk_id, h.score)).collect();
    let fulltext_scores: HashMap<u64, f32> = fulltext_hits.iter().map(|h| (h.chunk_id, h.score)).collect();
    let ids: Vec<i64> = ranked.iter().map(|h| h.chunk_id.cast_signed()).collect();
    let chunks: HashMap<i64, _> = db.chunks(&kb.id, &ids).await?.into_iter().map(|c| (c.chunk_id, c)).collect();
    // Their documents, in one look; the graph's hits did not pass the indexes' filters, so
    // the same filter applies here.
    let mut document_ids: Vec<String> = chunks.values().map(|c| c.document_id.clone()).collect();
    document_ids.sort_unstable();
    document_ids.dedup();
    let documents: HashMap<String, Document> = db
        .documents_by_id(&document_ids)
        .await?
        .into_iter()
        .filter(|d| d.state == DocumentState::Indexed)
        .filter(|d| filter.document_ids.as_ref().is_none_or(|ids| ids.contains(&d.id)))
        .filter(|d| filter.versions.as_ref().is_none_or(|versions| versions.contains(&d.version)))
        .filter(|d| filter.tags.as_ref().is_none_or(|tags| tags.iter().any(|t| d.tags.contains(t))))
        .map(|d| (d.id.clone(), d))
        .collect();
    let kept: Vec<(&SearchHit, &StoredChunk, &Document)> = ranked
        .iter()
        .filter_map(|hit| {
            let chunk = chunks.get(&hit.chunk_id.cast_signed())?;
            Some((hit, chunk, documents.get(&chunk.document_id)?))
        })
        .take(top_k)
        .collect();
    // Their parents, in one look too (a parent's id derives from its document and ordinal).
    let parent_ids: Vec<i64> =
        if include_parent { kept.iter().filter_map(|(_, chunk, _)| parent_id(chunk)).collect() } else { Vec::new() };
    let parents: HashMap<i64, String> =
        db.chunks(&kb.id, &parent_ids).await?.into_iter().map(|p| (p.chunk_id, p.text)).collect();
    let mut out = Vec::with_capacity(kept.len());
    for (hit, chunk, document) in kept {
        let parent_text = parent_id(chunk).and_then(|id| parents.get(&id).cloned());
        out.push(RetrievedChunk {
            rank: out.len() + 1,
            chunk_id: chunk.chunk_id.to_string(),
            score: hit.score,
            vector_score: vector_scores.get(&hit.chunk_id).copied(),
            fulltext_score: fulltext_scores.get(&hit.chunk_id).copied(),
            document_id: document.id.clone(),
            filename: document.filename.clone(),
            version: document.version,
            page_start: chunk.page_start,
            page_end: chunk.page_end,
            heading_path: chunk.heading_path.clone(),
            ordinal: chunk.ordinal,
            text: chunk.text.clone(),
            parent_text,
            tags: document.tags.clone(),
        });
    }
    Ok(out)
}

/// The id of a child chunk's parent chunk.
fn parent_id(chunk: &StoredChunk) -> Option<i64> {
    let ordinal = usize::try_from(chunk.parent_ordinal?).ok()?;
    Some(super::ingest::chunk_id(&chunk.document_id, "parent", ordinal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> Result<RetrieveRequest, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn requests_are_checked_and_defaulted() {
        let (top_k, mode, filter, parent) = checked(&request(serde_json::json!({"query": "q"})).unwrap()).unwrap();
        assert_eq!((top_k, mode, parent), (5, RetrievalMode::Hybrid, true));
        assert!(filter.is_empty());
        for bad in [
            serde_json::json!({"query": "  "}),
            serde_json::json!({"query": "q", "top_k": 0}),
            serde_json::json!({"query": "q", "top_k": 51}),
            serde_json::json!({"query": "x".repeat(MAX_QUERY_BYTES + 1)}),
        ] {
            assert!(checked(&request(bad.clone()).unwrap()).is_err(), "{bad}");
        }
        assert!(request(serde_json::json!({"query": "q", "mode": "magic"})).is_err());
        assert!(request(serde_json::json!({"query": "q", "unknown": 1})).is_err());
    }
}
