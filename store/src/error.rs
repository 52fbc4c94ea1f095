use std::io;

/// Every failure the store reports. Messages are lowercase and say what to do where the
/// caller can act.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database url `{url}`: use sqlite:PATH or postgres://USER@HOST:PORT/DB")]
    UnsupportedUrl { url: String },
    #[error("cannot connect to the database at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("blob is larger than the limit of {limit_bytes} bytes")]
    BlobTooLarge { limit_bytes: u64 },
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    BlobCorrupt { digest: String, actual: String },
    #[error("blob {digest} does not match the expected digest {expected}")]
    BlobDigestMismatch { digest: String, expected: String },
    /// A failure of the Redis server that holds quota counters; `url` is shown without
    /// its password.
    #[error("redis at {url}: {reason}")]
    Redis { url: String, reason: String },
    #[error("blob store i/o error at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(path: &std::path::Path, source: io::Error) -> Self {
        StoreError::Io { path: path.display().to_string(), source }
    }

    /// Maps a unique-constraint violation to `Conflict` with the given message, and
    /// passes every other database error through.
    pub(crate) fn conflict_on_unique(err: sqlx::Error, message: impl FnOnce() -> String) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
            _ => StoreError::Database(err),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
