//! Blob garbage collection: blobs no row refers to (no file, model version, knowledge-base
//! document or fine-tuning job's checkpoint) are removed once they are older than a grace
//! period. A job's older checkpoints are left to it.
//!
//! **Invariant:** a blob is removed only if it was last written before the cutoff and no row
//! referred to it when it was checked. Every new reference to a blob is made after a write
//! of that blob (an upload, an import or a fetch from a peer), and a write of content
//! already stored makes the blob young again ([`BlobStore`] refreshes it under a gate that
//! removal takes alone), so a reference made after the check finds its blob kept. The grace
//! period covers writes whose reference comes long after the bytes (a large import).
//!
//! Each node collects its own blob store; references are read from the shared database.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::blob::BlobStore;
use crate::db::Db;
use crate::error::Result;

/// What one collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Blobs old enough to be considered.
    pub examined: u64,
    pub removed: u64,
    pub removed_bytes: u64,
}

impl Db {
    /// Whether any row refers to the blob `sha256`.
    pub async fn blob_is_referenced(&self, sha256: &str) -> Result<bool> {
        let count: i64 = sqlx::query_scalar(
            "SELECT CAST((SELECT COUNT(*) FROM files WHERE sha256 = $1) \
             + (SELECT COUNT(*) FROM kb_documents WHERE sha256 = $1) \
             + (SELECT COUNT(*) FROM fine_tuning_jobs WHERE checkpoint_sha256 = $1) \
             + (SELECT COUNT(*) FROM model_versions WHERE files LIKE $2) AS BIGINT)",
        )
        .bind(sha256)
        .bind(format!("%\"{sha256}\"%"))
        .fetch_one(self.pool())
        .await?;
        Ok(count > 0)
    }
}

/// Removes the blobs of `blobs` that no row of `db` refers to and that were last written
/// more than `grace` ago.
pub async fn collect_garbage(db: &Db, blobs: &BlobStore, grace: Duration) -> Result<GcReport> {
    let cutoff = SystemTime::now().checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut report = GcReport::default();
    for (digest, _) in blobs.blobs_written_before(cutoff).await? {
        report.examined += 1;
        if db.blob_is_referenced(&digest.to_hex()).await? {
            continue;
        }
        if let Some(size_bytes) = blobs.remove_if_written_before(&digest, cutoff).await? {
            tracing::info!(blob = %digest, bytes = size_bytes, "removed a blob nothing refers to");
            report.removed += 1;
            report.removed_bytes += size_bytes;
        }
    }
    Ok(report)
}
