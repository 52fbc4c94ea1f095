//! Vector stores: one trait, [`VectorStore`], and two backends that pass the same tests.
//!
//! - [`EmbeddedStore`] (the default): our own HNSW index in this process, split into shards
//!   by hash range of the chunk id ([`shard_for`]); each shard ([`ShardIndex`]) keeps an
//!   append-only, checksummed, fsynced log of its changes and periodic snapshots, so an
//!   acknowledged write survives a crash.
//! - [`MilvusStore`]: a Milvus server through `milvus-sdk-rust`, one Milvus collection per
//!   knowledge base with an HNSW index.
//!
//! A collection holds the chunks of one knowledge base: a chunk id (the primary key), its
//! embedding and the metadata search filters on (document, document version, tags). Scores
//! are similarities, higher is better: the cosine for [`Metric::Cosine`] (vectors are
//! L2-normalised on the way in) and the dot product for [`Metric::InnerProduct`] (for
//! vectors the caller has already normalised, as sentence-embedding models return them).

mod codec;
pub mod distance;
mod embedded;
mod filter;
pub mod hnsw;
mod milvus;
mod shard;
mod snapshot;
pub mod synthetic;
mod wal;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{KnowledgeError, Result};

pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use hnsw::HnswParams;
pub use milvus::{MilvusOptions, MilvusStore, milvus_collection_name};
pub use shard::{ShardIndex, ShardSpec, shard_for, shard_hash, shard_hash_range};

/// The most hits one search may ask for (Milvus's own limit).
pub const MAX_TOP_K: usize = 16_384;

/// The longest collection name, in bytes.
pub const MAX_COLLECTION_NAME_BYTES: usize = 128;

/// The longest document id, in bytes.
pub const MAX_DOCUMENT_ID_BYTES: usize = 512;

/// The most tags one chunk may carry.
pub const MAX_TAGS: usize = 64;

/// The longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 256;

/// How two vectors compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Cosine similarity: vectors are L2-normalised when stored and when searched with.
    Cosine,
    /// The dot product of the vectors as given (meant for vectors already normalised).
    InnerProduct,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::InnerProduct => "inner_product",
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A collection: the vectors of one knowledge base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionSpec {
    /// Letters, digits, `_` and `-`, at most [`MAX_COLLECTION_NAME_BYTES`] bytes.
    pub name: String,
    pub dimension: usize,
    pub metric: Metric,
    /// How many shards the embedded store splits the collection into (at least 1); the
    /// Milvus backend leaves sharding to Milvus.
    pub shards: u32,
}

impl CollectionSpec {
    /// A collection of one shard.
    pub fn new(name: impl Into<String>, dimension: usize, metric: Metric) -> Self {
        CollectionSpec { name: name.into(), dimension, metric, shards: 1 }
    }

    #[must_use]
    pub fn with_shards(mut self, shards: u32) -> Self {
        self.shards = shards;
        self
    }
}

/// One chunk's vector and the metadata search filters on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VectorRecord {
    pub chunk_id: u64,
    pub vector: Vec<f32>,
    pub document_id: String,
    /// The document's version this chunk was cut from; a re-upload writes a new version and
    /// retires the old one's chunks ([`VectorStore::delete_document`]).
    pub version: i64,
    pub tags: Vec<String>,
}

/// Which chunks a search may return. Every field that is `Some` must hold; `None` places no
/// condition, and `Some(vec![])` matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchFilter {
    /// The chunk belongs to one of these documents.
    pub document_ids: Option<Vec<String>>,
    /// The chunk carries at least one of these tags.
    pub tags: Option<Vec<String>>,
    /// The chunk's version is one of these.
    pub versions: Option<Vec<i64>>,
}

impl SearchFilter {
    /// No condition.
    pub fn is_empty(&self) -> bool {
        self.document_ids.is_none() && self.tags.is_none() && self.versions.is_none()
    }

    /// True when some field is `Some(vec![])`, so nothing can match.
    pub fn matches_nothing(&self) -> bool {
        self.document_ids.as_ref().is_some_and(Vec::is_empty)
            || self.tags.as_ref().is_some_and(Vec::is_empty)
            || self.versions.as_ref().is_some_and(Vec::is_empty)
    }

    #[must_use]
    pub fn documents<S: Into<String>>(mut self, ids: impl IntoIterator<Item = S>) -> Self {
        self.document_ids = Some(ids.into_iter().map(Into::into).collect());
        self
    }

    #[must_use]
    pub fn tags<S: Into<String>>(mut self, tags: impl IntoIterator<Item = S>) -> Self {
        self.tags = Some(tags.into_iter().map(Into::into).collect());
        self
    }

    #[must_use]
    pub fn versions(mut self, versions: impl IntoIterator<Item = i64>) -> Self {
        self.versions = Some(versions.into_iter().collect());
        self
    }
}

/// A nearest-neighbour query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchRequest {
    pub vector: Vec<f32>,
    /// How many hits to return at most (at most [`MAX_TOP_K`]).
    pub k: usize,
    pub filter: SearchFilter,
}

impl SearchRequest {
    pub fn new(vector: Vec<f32>, k: usize) -> Self {
        SearchRequest { vector, k, filter: SearchFilter::default() }
    }

    #[must_use]
    pub fn filter(mut self, filter: SearchFilter) -> Self {
        self.filter = filter;
        self
    }
}

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    pub chunk_id: u64,
    /// The similarity to the query (higher is better; see [`Metric`]).
    pub score: f32,
}

/// A store of knowledge-base vectors. Shared as `Arc<dyn VectorStore>`.
///
/// `async-trait` boxes the futures: `async fn` in traits is not yet object-safe, and the
/// node picks a backend at run time from its configuration, so the trait must be usable as
/// `dyn VectorStore`.
#[async_trait]
pub trait VectorStore: Send + Sync {
    /// Creates the collection, or checks that an existing one has the same dimension and
    /// metric ([`KnowledgeError::CollectionMismatch`] otherwise).
    async fn ensure_collection(&self, spec: &CollectionSpec) -> Result<()>;

    /// Whether the collection exists.
    async fn has_collection(&self, name: &str) -> Result<bool>;

    /// Removes the collection and everything in it; a collection that is not there is not
    /// an error.
    async fn drop_collection(&self, name: &str) -> Result<()>;

    /// Inserts the records, replacing any with the same chunk id. Durable when it returns.
    async fn upsert(&self, collection: &str, records: Vec<VectorRecord>) -> Result<()>;

    /// Removes these chunks; ids that are not there are ignored.
    async fn delete(&self, collection: &str, chunk_ids: &[u64]) -> Result<()>;

    /// Removes a document's chunks: all of them, or with `keep_version`, every version but
    /// that one (a re-uploaded document retires its old chunks).
    async fn delete_document(&self, collection: &str, document_id: &str, keep_version: Option<i64>) -> Result<()>;

    /// The `k` chunks most similar to the query that pass the filter, best first (ties by
    /// chunk id).
    async fn search(&self, collection: &str, request: &SearchRequest) -> Result<Vec<SearchHit>>;

    /// How many chunks the collection holds.
    async fn count(&self, collection: &str) -> Result<u64>;
}

/// Checks a collection name: letters, digits, `_` and `-`, 1 to
/// [`MAX_COLLECTION_NAME_BYTES`] bytes. Both backends apply the same rule, so a knowledge
/// base can move between them.
pub fn validate_collection_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_COLLECTION_NAME_BYTES {
        Some("it is longer than 128 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        Some("use only letters, digits, '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KnowledgeError::InvalidCollectionName { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// Checks a collection spec before it is created.
pub(crate) fn validate_spec(spec: &CollectionSpec) -> Result<()> {
    validate_collection_name(&spec.name)?;
    if spec.dimension == 0 || spec.dimension > distance::MAX_DIMENSION {
        return Err(KnowledgeError::InvalidRequest {
            reason: format!("dimension {} is outside 1..={}", spec.dimension, distance::MAX_DIMENSION),
        });
    }
    if spec.shards == 0 || spec.shards > MAX_SHARDS {
        return Err(KnowledgeError::InvalidRequest {
            reason: format!("{} shards is outside 1..={MAX_SHARDS}", spec.shards),
        });
    }
    Ok(())
}

/// The most shards one collection may have.
pub const MAX_SHARDS: u32 = 1024;

/// Checks `k` and the query vector's dimension against the collection's.
pub(crate) fn validate_search(collection: &str, dimension: usize, request: &SearchRequest) -> Result<()> {
    if request.k > MAX_TOP_K {
        return Err(KnowledgeError::InvalidRequest { reason: format!("k = {} is over {MAX_TOP_K}", request.k) });
    }
    check_dimension(collection, dimension, request.vector.len())?;
    distance::check_finite(&request.vector, "the query")
}

/// Checks a record against the collection's dimension and the metadata limits.
pub(crate) fn validate_record(collection: &str, dimension: usize, record: &VectorRecord) -> Result<()> {
    check_dimension(collection, dimension, record.vector.len())?;
    let what = || format!("chunk {}", record.chunk_id);
    distance::check_finite(&record.vector, &what())?;
    let reason = if record.document_id.len() > MAX_DOCUMENT_ID_BYTES {
        Some(format!("its document id is longer than {MAX_DOCUMENT_ID_BYTES} bytes"))
    } else if record.tags.len() > MAX_TAGS {
        Some(format!("it has {} tags, over the limit of {MAX_TAGS}", record.tags.len()))
    } else if record.tags.iter().any(|tag| tag.len() > MAX_TAG_BYTES) {
        Some(format!("a tag is longer than {MAX_TAG_BYTES} bytes"))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KnowledgeError::InvalidRequest { reason: format!("{}: {reason}", what()) }),
        None => Ok(()),
    }
}

pub(crate) fn check_dimension(collection: &str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(KnowledgeError::DimensionMismatch { collection: collection.to_owned(), expected, actual })
    }
}

/// Sorts hits best first, ties by chunk id, and keeps the first `k`.
pub fn sort_and_truncate(hits: &mut Vec<SearchHit>, k: usize) {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.chunk_id.cmp(&b.chunk_id)));
    hits.truncate(k);
}
