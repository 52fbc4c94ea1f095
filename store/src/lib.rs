//! Tenant data and large files: sqlx repositories over SQLite or PostgreSQL with one
//! tenant scope that every tenant-owned query goes through, the content-addressed blob
//! store, and the quota and rate limiter (in this process or in Redis).
//!
//! **Boundary:** this crate knows nothing about HTTP; the gateway maps [`StoreError`] to
//! statuses.

pub mod blob;
pub mod db;
mod error;
pub mod gc;
pub mod ids;
pub mod quota;
pub mod repo;
pub mod tenant;

pub use blob::{BlobInfo, BlobReader, BlobStore, Digest};
pub use db::{Backend, Db, DbOptions};
pub use error::{Result, StoreError};
pub use quota::{FailureStatus, Limiter, Permit, QuotaCheck, QuotaExceeded, QuotaLimits, QuotaUsage};
pub use tenant::{Owner, TenantScope};
