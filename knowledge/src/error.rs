use std::io;
use std::path::{Path, PathBuf};

/// Every failure the vector stores report. Messages are lowercase and say what to do where
/// the caller can act.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    #[error("invalid collection name {name:?}: {reason}")]
    InvalidCollectionName { name: String, reason: &'static str },
    #[error("unknown collection {name:?}: create it first (ensure_collection)")]
    UnknownCollection { name: String },
    #[error("collection {name:?} already exists with {existing}, not {requested}: drop it first or use another name")]
    CollectionMismatch { name: String, existing: String, requested: String },
    #[error(
        "dimension mismatch in collection {collection:?}: it holds {expected}-dimensional vectors, got {actual} \
         dimensions; embed with the knowledge base's model"
    )]
    DimensionMismatch { collection: String, expected: usize, actual: usize },
    #[error("invalid vector for {what}: {reason}")]
    InvalidVector { what: String, reason: &'static str },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[error("milvus unreachable at {url}: {reason}; start it (scripts/milvus) or check the configured url")]
    MilvusUnreachable { url: String, reason: String },
    #[error("milvus at {url} could not {action}: {reason}")]
    Milvus { url: String, action: &'static str, reason: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is corrupt ({reason}): restore it from a backup, or delete the shard's folder and re-index its documents", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{} has format version {found}; this build reads versions up to {supported}: upgrade maas", path.display())]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("shard {shard} of collection {collection:?} failed: {reason}; restart the node to reopen it from disk")]
    ShardFailed { collection: String, shard: u32, reason: String },
    /// A document that cannot be parsed: the uploader's to fix.
    #[error(transparent)]
    Parse(#[from] crate::parse::ParseError),
    /// Chunking settings that do not fit together.
    #[error(transparent)]
    Chunk(#[from] crate::chunk::ChunkError),
    /// The full-text index (tantivy) failed; `location` is its folder, or `memory`.
    #[error("full-text index at {location} could not {action}: {reason}")]
    FullText { location: String, action: &'static str, reason: String },
}

impl KnowledgeError {
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        KnowledgeError::Io { action, path: path.to_path_buf(), source }
    }

    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        KnowledgeError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
    }
}

pub type Result<T, E = KnowledgeError> = std::result::Result<T, E>;
