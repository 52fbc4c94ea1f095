//! Knowledge bases on a node: where their vectors and full-text indexes live, the
//! ingestion worker ([`ingest`]), retrieval ([`retrieve`]) and the shards ([`shards`]).
//!
//! A knowledge base's rows (the base, its documents with their ingestion state, its
//! chunks) are in SQL, the source of truth. Its indexes are split into `shard_count`
//! shards placed across the cluster by the control plane: each shard holds the BM25 index
//! of its chunks and, on the embedded backend, their HNSW vectors; on the Milvus backend
//! the vectors are in one Milvus collection named by the knowledge base's id. The
//! embedding model is a deployment: chunking counts tokens with that deployment's own
//! tokenizer, embedding runs on its replicas like any `/v1/embeddings` request.

pub mod ingest;
pub mod rag;
pub mod retrieve;
pub mod shards;

use std::sync::Arc;

use maas_knowledge::KnowledgeError;
use maas_knowledge::parse::ParseLimits;
use maas_knowledge::vector::{MilvusOptions, MilvusStore, VectorStore};
use maas_store::repo::knowledge::KnowledgeBase;

use crate::error::ApiError;

/// The two places a knowledge base's vectors may live.
pub const BACKENDS: &[&str] = &["embedded", "milvus"];

/// How knowledge bases behave on this node (`[knowledge]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnowledgeOptions {
    /// The backend of a knowledge base created without one: `embedded` or `milvus`.
    pub default_backend: String,
    /// Milvus's gRPC address (`http://host:19530`); empty: Milvus is not offered.
    pub milvus_url: String,
    /// Shards of a new knowledge base's embedded index.
    pub default_shards: u32,
    /// The embedding deployment of a knowledge base created without one.
    pub default_embedding_model: String,
    /// Bounds on parsing one document (its size, pages, decompressed bytes).
    pub parse_limits: ParseLimits,
    /// How long a worker's claim on a document lasts without renewal.
    pub lease_ms: i64,
    /// Chunks embedded and indexed per step (one durable progress record each).
    pub embed_batch: usize,
}

impl Default for KnowledgeOptions {
    fn default() -> Self {
        KnowledgeOptions {
            default_backend: "embedded".into(),
            milvus_url: String::new(),
            default_shards: 2,
            default_embedding_model: String::new(),
            parse_limits: ParseLimits::default(),
            lease_ms: 30_000,
            embed_batch: 64,
        }
    }
}

/// The node's handles on knowledge-base storage.
pub struct KnowledgeService {
    pub options: KnowledgeOptions,
    milvus: tokio::sync::OnceCell<Arc<MilvusStore>>,
    /// Woken when a document is queued, so the worker starts at once.
    pub wake: tokio::sync::Notify,
}

impl std::fmt::Debug for KnowledgeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeService").field("options", &self.options).finish_non_exhaustive()
    }
}

impl KnowledgeService {
    pub fn new(options: KnowledgeOptions) -> Self {
        KnowledgeService { options, milvus: tokio::sync::OnceCell::new(), wake: tokio::sync::Notify::new() }
    }

    /// Checks a backend name for a new knowledge base.
    pub fn check_backend(&self, backend: &str) -> Result<(), ApiError> {
        match backend {
            "embedded" => Ok(()),
            "milvus" if !self.options.milvus_url.is_empty() => Ok(()),
            "milvus" => Err(ApiError::bad_request(
                "milvus_not_configured",
                "this cluster has no Milvus: set knowledge.milvus_url, or use vector_backend \"embedded\"",
            )
            .with_param("vector_backend")),
            other => Err(ApiError::bad_request(
                "invalid_vector_backend",
                format!("vector_backend `{other}` is not one of {}", BACKENDS.join(", ")),
            )
            .with_param("vector_backend")),
        }
    }

    /// Milvus, connected on first use (for knowledge bases on the `milvus` backend).
    pub async fn milvus(&self) -> Result<Arc<dyn VectorStore>, ApiError> {
        self.check_backend("milvus")?;
        let url = self.options.milvus_url.clone();
        let store = self
            .milvus
            .get_or_try_init(|| async move {
                MilvusStore::connect(&url, MilvusOptions::default())
                    .await
                    .map(Arc::new)
                    .map_err(|e| knowledge_error(&e))
            })
            .await?;
        Ok(Arc::clone(store) as Arc<dyn VectorStore>)
    }

    /// Removes a deleted knowledge base's indexes: its Milvus collection, and its shards
    /// (their nodes drop them).
    pub async fn drop_knowledge_base(
        &self,
        state: &crate::state::AppState,
        kb: &KnowledgeBase,
    ) -> Result<(), ApiError> {
        if kb.vector_backend == "milvus" {
            self.milvus().await?.drop_collection(&kb.id).await.map_err(|e| knowledge_error(&e))?;
        }
        shards::retire(state, &kb.id).await
    }
}

/// A knowledge-library error as an API error: the caller's mistakes are 400s, an
/// unreachable Milvus a 503, the rest 500s.
pub fn knowledge_error(err: &KnowledgeError) -> ApiError {
    match err {
        KnowledgeError::InvalidCollectionName { .. }
        | KnowledgeError::InvalidRequest { .. }
        | KnowledgeError::InvalidVector { .. }
        | KnowledgeError::DimensionMismatch { .. }
        | KnowledgeError::CollectionMismatch { .. }
        | KnowledgeError::Parse(_)
        | KnowledgeError::Chunk(_) => ApiError::bad_request("invalid_request", err.to_string()),
        KnowledgeError::MilvusUnreachable { .. } => ApiError::unavailable(err.to_string()),
        _ => ApiError::internal(err.to_string()),
    }
}
