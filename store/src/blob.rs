//! The content-addressed blob store: model weights, uploads, datasets and checkpoints,
//! each a file named by the sha256 of its bytes under `<data_dir>/blobs/sha256/ab/abcd...`.
//!
//! **Invariant:** a blob path holds either nothing or the whole, verified content. Writes
//! stream into `tmp/`, are fsynced, and are renamed into place (then the directory is
//! fsynced), so a crash at any point leaves no partial blob; `tmp/` is swept when the store
//! opens. Reads hash as they stream and fail at the end if the bytes do not match the name.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use sha2::{Digest as _, Sha256};
use tokio::fs;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use crate::error::{Result, StoreError};

const CHUNK_BYTES: usize = 256 * 1024;

/// A sha256 digest naming a blob; printed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self> {
        let text = text.strip_prefix("sha256:").unwrap_or(text);
        let mut bytes = [0u8; 32];
        if text.len() != 64
            || text.bytes().any(|b| b.is_ascii_uppercase())
            || hex::decode_to_slice(text, &mut bytes).is_err()
        {
            return Err(StoreError::InvalidInput(format!(
                "`{text}` is not a sha256 digest: expected 64 lowercase hex digits"
            )));
        }
        Ok(Digest(bytes))
    }
}

/// What [`BlobStore::put`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// Writers hold it shared while they publish (or find) a blob; garbage collection
    /// holds it alone while it checks a blob's age and removes it, so a blob written
    /// again is never removed under its writer.
    gate: std::sync::Arc<tokio::sync::RwLock<()>>,
}

impl BlobStore {
    /// Opens (creating if needed) the store rooted at `root`, removing temporary files
    /// that an interrupted write left behind. The caller must hold the data directory's
    /// lock, so no other process is writing here.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let store = BlobStore { root: root.into(), gate: std::sync::Arc::default() };
        for dir in [store.tmp_dir(), store.root.join("sha256")] {
            fs::create_dir_all(&dir).await.map_err(|e| StoreError::io(&dir, e))?;
        }
        let tmp = store.tmp_dir();
        let mut entries = fs::read_dir(&tmp).await.map_err(|e| StoreError::io(&tmp, e))?;
        while let Some(entry) = entries.next_entry().await.map_err(|e| StoreError::io(&tmp, e))? {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing an unfinished blob write");
            fs::remove_file(&path).await.map_err(|e| StoreError::io(&path, e))?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    pub async fn contains(&self, digest: &Digest) -> bool {
        fs::try_exists(self.path_of(digest)).await.unwrap_or(false)
    }

    /// Streams `reader` into the store and returns the digest and size of what it held.
    /// Refuses (and keeps nothing) past `limit_bytes`.
    pub async fn put<R: AsyncRead + Unpin>(&self, reader: R, limit_bytes: Option<u64>) -> Result<BlobInfo> {
        self.put_checked(reader, limit_bytes, None).await
    }

    /// Like [`BlobStore::put`], and refuses (keeping nothing) content whose digest is not
    /// `expected`: for fetching a blob from a peer.
    pub async fn put_expected<R: AsyncRead + Unpin>(
        &self,
        reader: R,
        expected: &Digest,
        limit_bytes: Option<u64>,
    ) -> Result<BlobInfo> {
        self.put_checked(reader, limit_bytes, Some(expected)).await
    }

    pub async fn put_bytes(&self, bytes: &[u8]) -> Result<BlobInfo> {
        self.put(bytes, None).await
    }

    async fn put_checked<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        limit_bytes: Option<u64>,
        expected: Option<&Digest>,
    ) -> Result<BlobInfo> {
        let tmp_path = self.tmp_dir().join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let written = async {
            let mut file = fs::File::create(&tmp_path).await.map_err(|e| StoreError::io(&tmp_path, e))?;
            let mut hasher = Sha256::new();
            let mut size_bytes = 0u64;
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let n = reader.read(&mut buf).await.map_err(|e| StoreError::io(&tmp_path, e))?;
                if n == 0 {
                    break;
                }
                size_bytes += n as u64;
                if let Some(limit_bytes) = limit_bytes
                    && size_bytes > limit_bytes
                {
                    return Err(StoreError::BlobTooLarge { limit_bytes });
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(|e| StoreError::io(&tmp_path, e))?;
            }
            file.flush().await.map_err(|e| StoreError::io(&tmp_path, e))?;
            file.sync_all().await.map_err(|e| StoreError::io(&tmp_path, e))?;
            Ok(BlobInfo { digest: Digest(hasher.finalize().into()), size_bytes })
        }
        .await;
        let info = match written {
            Ok(info) => info,
            Err(err) => {
                let _ = fs::remove_file(&tmp_path).await;
                return Err(err);
            }
        };
        if let Some(expected) = expected
            && *expected != info.digest
        {
            let _ = fs::remove_file(&tmp_path).await;
            return Err(StoreError::BlobDigestMismatch { digest: info.digest.to_hex(), expected: expected.to_hex() });
        }
        self.publish(&tmp_path, &info.digest).await?;
        Ok(info)
    }

    /// Like [`BlobStore::put`], for a blocking thread (an archive being unpacked): the same
    /// write to `tmp/`, fsync and rename into place, with std's synchronous file calls.
    pub fn put_blocking(&self, reader: &mut dyn std::io::Read) -> Result<BlobInfo> {
        let tmp_path = self.tmp_dir().join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let written = write_blocking(reader, &tmp_path);
        let info = match written {
            Ok(info) => info,
            Err(err) => {
                let _ = std::fs::remove_file(&tmp_path);
                return Err(err);
            }
        };
        let _writing = self.gate.blocking_read();
        let final_path = self.path_of(&info.digest);
        if final_path.exists() {
            let _ = std::fs::remove_file(&tmp_path);
            refresh_blocking(&final_path)?;
            return Ok(info);
        }
        let shard_dir = final_path.parent().expect("blob paths have a shard directory").to_path_buf();
        let shard_is_new = !shard_dir.exists();
        std::fs::create_dir_all(&shard_dir).map_err(|e| StoreError::io(&shard_dir, e))?;
        std::fs::rename(&tmp_path, &final_path).map_err(|e| StoreError::io(&final_path, e))?;
        let sync = |dir: &Path| std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io(dir, e));
        sync(&shard_dir)?;
        if shard_is_new {
            sync(shard_dir.parent().expect("shard directories have a parent"))?;
        }
        Ok(info)
    }

    /// Moves a finished, fsynced temporary file to its content address, durably.
    async fn publish(&self, tmp_path: &Path, digest: &Digest) -> Result<()> {
        let _writing = self.gate.read().await;
        let final_path = self.path_of(digest);
        let shard_dir = final_path.parent().expect("blob paths have a shard directory").to_path_buf();
        if fs::try_exists(&final_path).await.unwrap_or(false) {
            // Same content is already stored whole: keep the existing file, made young
            // again so garbage collection waits for the reference this write is for.
            let _ = fs::remove_file(tmp_path).await;
            let path = final_path.clone();
            return tokio::task::spawn_blocking(move || refresh_blocking(&path))
                .await
                .map_err(|join| StoreError::io(&final_path, io::Error::other(join)))?;
        }
        let shard_is_new = !fs::try_exists(&shard_dir).await.unwrap_or(false);
        fs::create_dir_all(&shard_dir).await.map_err(|e| StoreError::io(&shard_dir, e))?;
        fs::rename(tmp_path, &final_path).await.map_err(|e| StoreError::io(&final_path, e))?;
        sync_dir(&shard_dir).await?;
        if shard_is_new {
            sync_dir(shard_dir.parent().expect("shard directories have a parent")).await?;
        }
        Ok(())
    }

    /// Opens a blob for streaming; the reader fails at the end if the content does not
    /// hash to `digest`.
    pub async fn open_blob(&self, digest: &Digest) -> Result<BlobReader> {
        let path = self.path_of(digest);
        let file = match fs::File::open(&path).await {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { what: "blob", id: digest.to_hex() });
            }
            Err(err) => return Err(StoreError::io(&path, err)),
        };
        let size_bytes = file.metadata().await.map_err(|e| StoreError::io(&path, e))?.len();
        Ok(BlobReader { file, hasher: Some(Sha256::new()), expected: *digest, size_bytes })
    }

    /// Reads a whole blob into memory, verified.
    pub async fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut reader = self.open_blob(digest).await?;
        let mut bytes = Vec::with_capacity(usize::try_from(reader.size_bytes()).unwrap_or(0));
        reader.read_to_end(&mut bytes).await.map_err(|e| corrupt_or_io(e, &self.path_of(digest)))?;
        Ok(bytes)
    }

    /// Re-hashes a stored blob; returns its size, or `BlobCorrupt`.
    pub async fn verify(&self, digest: &Digest) -> Result<u64> {
        let mut reader = self.open_blob(digest).await?;
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut reader, &mut sink).await.map_err(|e| corrupt_or_io(e, &self.path_of(digest)))
    }

    /// The blobs last written before `cutoff`, with their sizes (garbage collection's
    /// candidates).
    pub async fn blobs_written_before(&self, cutoff: std::time::SystemTime) -> Result<Vec<(Digest, u64)>> {
        let root = self.root.join("sha256");
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            let shards = std::fs::read_dir(&root).map_err(|e| StoreError::io(&root, e))?;
            for shard in shards.flatten() {
                let Ok(entries) = std::fs::read_dir(shard.path()) else { continue };
                for entry in entries.flatten() {
                    let Ok(digest) = entry.file_name().to_string_lossy().parse::<Digest>() else { continue };
                    let Ok(metadata) = entry.metadata() else { continue };
                    if metadata.modified().is_ok_and(|at| at < cutoff) {
                        found.push((digest, metadata.len()));
                    }
                }
            }
            found.sort();
            Ok(found)
        })
        .await
        .map_err(|join| StoreError::io(&self.root, io::Error::other(join)))?
    }

    /// Removes a blob if it was last written before `cutoff`; its size if it was removed.
    /// A blob written again since the caller looked is kept.
    pub async fn remove_if_written_before(
        &self,
        digest: &Digest,
        cutoff: std::time::SystemTime,
    ) -> Result<Option<u64>> {
        let _alone = self.gate.write().await;
        let path = self.path_of(digest);
        let metadata = match fs::metadata(&path).await {
            Ok(metadata) => metadata,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(StoreError::io(&path, err)),
        };
        if metadata.modified().map_err(|e| StoreError::io(&path, e))? >= cutoff {
            return Ok(None);
        }
        fs::remove_file(&path).await.map_err(|e| StoreError::io(&path, e))?;
        Ok(Some(metadata.len()))
    }

    /// Deletes a blob; returns whether it existed.
    pub async fn remove(&self, digest: &Digest) -> Result<bool> {
        let path = self.path_of(digest);
        match fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(StoreError::io(&path, err)),
        }
    }
}

/// Marks an existing blob as written now.
fn refresh_blocking(path: &Path) -> Result<()> {
    std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|file| file.set_modified(std::time::SystemTime::now()))
        .map_err(|e| StoreError::io(path, e))
}

/// Turns the reader's end-of-stream verification failure back into `BlobCorrupt`.
fn corrupt_or_io(err: io::Error, path: &Path) -> StoreError {
    match err.get_ref().and_then(|inner| inner.downcast_ref::<CorruptBlob>()) {
        Some(corrupt) => StoreError::BlobCorrupt { digest: corrupt.expected.clone(), actual: corrupt.actual.clone() },
        None => StoreError::io(path, err),
    }
}

/// Writes `reader` to `tmp_path`, hashing it, and fsyncs the file.
fn write_blocking(reader: &mut dyn std::io::Read, tmp_path: &Path) -> Result<BlobInfo> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(tmp_path).map_err(|e| StoreError::io(tmp_path, e))?;
    let mut hasher = Sha256::new();
    let mut size_bytes = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(StoreError::io(tmp_path, err)),
        };
        size_bytes += n as u64;
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| StoreError::io(tmp_path, e))?;
    }
    file.sync_all().map_err(|e| StoreError::io(tmp_path, e))?;
    Ok(BlobInfo { digest: Digest(hasher.finalize().into()), size_bytes })
}

async fn sync_dir(dir: &Path) -> Result<()> {
    let owned = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&owned)?.sync_all())
        .await
        .map_err(|join| StoreError::io(dir, io::Error::other(join)))?
        .map_err(|e| StoreError::io(dir, e))
}

#[derive(Debug, thiserror::Error)]
#[error("blob {expected} is corrupt: its content hashes to {actual}")]
struct CorruptBlob {
    expected: String,
    actual: String,
}

/// A verifying reader over one blob: at end of stream it compares the hash of what it
/// read with the blob's name and fails with `InvalidData` on a mismatch.
pub struct BlobReader {
    file: fs::File,
    hasher: Option<Sha256>,
    expected: Digest,
    size_bytes: u64,
}

impl BlobReader {
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

impl AsyncRead for BlobReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.file).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if !fresh.is_empty() {
                    if let Some(hasher) = this.hasher.as_mut() {
                        hasher.update(fresh);
                    }
                } else if let Some(hasher) = this.hasher.take() {
                    let actual = Digest(hasher.finalize().into());
                    if actual != this.expected {
                        let corrupt = CorruptBlob { expected: this.expected.to_hex(), actual: actual.to_hex() };
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, corrupt)));
                    }
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_only_lowercase_sha256_hex() {
        let digest = Digest::of(b"hello");
        assert_eq!(digest.to_hex(), "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(digest.to_hex().parse::<Digest>().unwrap(), digest);
        assert_eq!(format!("sha256:{digest}").parse::<Digest>().unwrap(), digest);
        for bad in ["", "abc", &digest.to_hex().to_uppercase(), &"g".repeat(64), &"0".repeat(65)] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }
}
