//! Why chunking refused to run.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunking setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}
