//! Full-text retrieval: a BM25 index per knowledge base, on tantivy.
//!
//! [`FullTextIndex`] holds one knowledge base's chunks: the chunk id (the key, the same id
//! the vector store uses), the document and version it was cut from, its tags, and its
//! text, analysed by [`analyzer`] (jieba for Chinese, lowercased words for everything
//! else). A search scores chunks by BM25 against the query's terms and applies the same
//! [`SearchFilter`] as the vector stores, so [`crate::hybrid`] can fuse the two rankings.
//!
//! **Blocking:** every method is synchronous and does disk I/O (and an upsert segments
//! text and fsyncs): async callers run them on a blocking thread (`spawn_blocking`) or the
//! shard actor's own thread, never on the async workers.
//!
//! **Invariant:** a write that returned is committed and durable (tantivy commits and
//! fsyncs), visible to the next search, and found again after a reopen; a write that
//! failed is rolled back and changes nothing.
//!
//! Queries never fail to parse: the query text goes through the same analyzer as the
//! documents, and its terms become a disjunction of term queries, so no character of user
//! text is syntax.

pub mod analyzer;
mod index;

pub use analyzer::{MixedTokenizer, analyze};
pub use index::{FullTextIndex, TextStatistics};

/// The version of the on-disk layout: tantivy's own files, with our schema and analyzer
/// ([`analyzer::ANALYZER_NAME`]). Written beside the index in [`MARKER_FILE`]; an index of
/// a newer version is refused, and a change to the schema or analyzer bumps it.
pub const FORMAT_VERSION: u32 = 1;

/// The file in an index's folder that records its [`FORMAT_VERSION`].
pub const MARKER_FILE: &str = "maas-fulltext.json";

/// The most distinct query terms a search uses; a longer query keeps its first ones (a
/// pasted page stays a bounded amount of work).
pub const MAX_QUERY_TERMS: usize = 256;

/// The longest chunk text, in bytes, an upsert accepts (chunks are a few hundred tokens).
pub const MAX_TEXT_BYTES: usize = 1 << 20;

pub use crate::vector::{MAX_TOP_K, SearchFilter, SearchHit};

/// One chunk to index: its text and the metadata searches filter on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FullTextRecord {
    pub chunk_id: u64,
    pub document_id: String,
    /// The document's version this chunk was cut from (see
    /// [`FullTextIndex::delete_document`]).
    pub version: i64,
    pub tags: Vec<String>,
    pub text: String,
}

impl FullTextRecord {
    /// A record without tags.
    pub fn new(chunk_id: u64, document_id: impl Into<String>, version: i64, text: impl Into<String>) -> Self {
        FullTextRecord { chunk_id, document_id: document_id.into(), version, tags: Vec::new(), text: text.into() }
    }

    #[must_use]
    pub fn with_tags<S: Into<String>>(mut self, tags: impl IntoIterator<Item = S>) -> Self {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }
}
