//! The engine's one error type. Messages are lowercase and say what to do where the
//! caller can act.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model's files cannot be used: missing, malformed or of an unsupported kind.
    #[error("cannot load the model at {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error(transparent)]
    Files(#[from] crate::model_files::ModelFilesError),
    #[error("the request queue is full ({max_queue} requests waiting): retry later or raise max_queue")]
    QueueFull { max_queue: usize },
    #[error(
        "the prompt has {prompt_tokens} tokens but the context holds {context_length}: shorten the prompt to at most {} tokens",
        context_length.saturating_sub(1)
    )]
    PromptTooLong { prompt_tokens: usize, context_length: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("chat template failed: {0}")]
    Template(String),
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    #[error("the engine has stopped: load the model again")]
    Stopped,
    /// The batching loop died (it panicked): the engine serves nothing more.
    #[error("the engine failed ({0}): its replica is being restarted, retry shortly")]
    Failed(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub(crate) fn load(path: &std::path::Path, reason: impl Into<String>) -> Self {
        EngineError::Load { path: path.to_owned(), reason: reason.into() }
    }

    pub(crate) fn tokenizer(error: impl std::fmt::Display) -> Self {
        EngineError::Tokenizer(error.to_string())
    }
}
