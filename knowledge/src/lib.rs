//! Knowledge bases: document parsing, chunking, the vector-store trait with Milvus and
//! embedded backends, hybrid retrieval, and RAG prompts with citations.
//!
//! - [`parse`]: PDF, DOCX, text, Markdown and HTML bytes into blocks with headings and pages.
//! - [`chunk`]: blocks into token-bounded chunks inside larger parent chunks, with overlap.
//! - [`vector`]: the [`vector::VectorStore`] trait and its backends: the embedded, sharded,
//!   crash-safe HNSW index (the default) and Milvus.
//! - [`fulltext`]: a BM25 index per knowledge base (tantivy), with jieba segmentation for
//!   Chinese and lowercased words for other scripts, filtered like the vector stores.
//! - [`graph`]: the knowledge graph's deterministic extractor (entities and the relations
//!   between them, per chunk).
//! - [`hybrid`]: weighted fusion of the vector and full-text rankings (reciprocal-rank and
//!   normalised-score), and the policy that weights them by the query's language.
//!
//! **Boundary:** uses `maas-engine` for embeddings; knows nothing about HTTP.

pub mod chunk;
pub mod error;
pub mod fulltext;
pub mod graph;
pub mod hybrid;
pub mod parse;
pub mod vector;

pub use error::{KnowledgeError, Result};
