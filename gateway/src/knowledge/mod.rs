//! Knowledge bases on a node: where their vectors and full-text indexes live, the
//! ingestion worker ([`ingest`]) and retrieval ([`retrieve`]).
//!
//! A knowledge base's rows (the base, its documents with their ingestion state, its
//! chunks) are in SQL; its vectors are in the vector store its `vector_backend` names (the
//! embedded sharded HNSW store under `<data>/knowledge/vectors`, or Milvus) as the
//! collection named by its id; its BM25 index is a tantivy folder
//! `<data>/knowledge/fulltext/<id>`. The embedding model is a deployment: chunking counts
//! tokens with that deployment's own tokenizer, embedding runs on its replicas like any
//! `/v1/embeddings` request.

pub mod ingest;
pub mod rag;
pub mod retrieve;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use maas_knowledge::KnowledgeError;
use maas_knowledge::fulltext::FullTextIndex;
use maas_knowledge::parse::ParseLimits;
use maas_knowledge::vector::{EmbeddedOptions, EmbeddedStore, MilvusOptions, MilvusStore, VectorStore};

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
    embedded: Arc<EmbeddedStore>,
    milvus: tokio::sync::OnceCell<Arc<MilvusStore>>,
    fulltext_root: PathBuf,
    /// Open full-text indexes. An async lock, held while one opens: tantivy allows one
    /// writer per index folder, so two workers must not open the same one at once.
    fulltext: tokio::sync::Mutex<HashMap<String, Arc<FullTextIndex>>>,
    /// Woken when a document is queued, so the worker starts at once.
    pub wake: tokio::sync::Notify,
}

impl std::fmt::Debug for KnowledgeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeService").field("options", &self.options).finish_non_exhaustive()
    }
}

impl KnowledgeService {
    /// Opens the embedded vector store and the full-text folder under `data_dir/knowledge`.
    pub fn open(data_dir: &std::path::Path, options: KnowledgeOptions) -> Result<Self, KnowledgeError> {
        let root = data_dir.join("knowledge");
        let embedded = EmbeddedStore::open(&root.join("vectors"), EmbeddedOptions::default())?;
        let fulltext_root = root.join("fulltext");
        std::fs::create_dir_all(&fulltext_root).map_err(|source| KnowledgeError::Io {
            action: "create",
            path: fulltext_root.clone(),
            source,
        })?;
        Ok(KnowledgeService {
            options,
            embedded: Arc::new(embedded),
            milvus: tokio::sync::OnceCell::new(),
            fulltext_root,
            fulltext: tokio::sync::Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        })
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

    /// The vector store of `backend` (Milvus is connected on first use).
    pub async fn vectors(&self, backend: &str) -> Result<Arc<dyn VectorStore>, ApiError> {
        if backend != "milvus" {
            return Ok(Arc::clone(&self.embedded) as Arc<dyn VectorStore>);
        }
        self.check_backend(backend)?;
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

    /// The full-text index of knowledge base `kb_id`, opened (or created) on first use.
    pub async fn fulltext(&self, kb_id: &str) -> Result<Arc<FullTextIndex>, ApiError> {
        let mut open = self.fulltext.lock().await;
        if let Some(index) = open.get(kb_id) {
            return Ok(Arc::clone(index));
        }
        let dir = self.fulltext_root.join(kb_id);
        let index = tokio::task::spawn_blocking(move || FullTextIndex::open(dir))
            .await
            .map_err(|e| ApiError::internal(format!("the index thread failed: {e}")))?
            .map_err(|e| knowledge_error(&e))?;
        let index = Arc::new(index);
        open.insert(kb_id.to_owned(), Arc::clone(&index));
        Ok(index)
    }

    /// The full-text index of a knowledge base that has one; `None` before its first
    /// document is indexed (reading a knowledge base makes no folder).
    pub async fn existing_fulltext(&self, kb_id: &str) -> Result<Option<Arc<FullTextIndex>>, ApiError> {
        let exists = self.fulltext.lock().await.contains_key(kb_id)
            || tokio::fs::try_exists(self.fulltext_root.join(kb_id)).await.unwrap_or(false);
        if exists { self.fulltext(kb_id).await.map(Some) } else { Ok(None) }
    }

    /// Removes a deleted knowledge base's vectors and full-text index.
    pub async fn drop_knowledge_base(&self, kb_id: &str, backend: &str) -> Result<(), ApiError> {
        self.vectors(backend).await?.drop_collection(kb_id).await.map_err(|e| knowledge_error(&e))?;
        let index = self.fulltext.lock().await.remove(kb_id);
        drop(index);
        let dir = self.fulltext_root.join(kb_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(ApiError::internal(format!("cannot remove {}: {err}", dir.display()))),
        }
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
