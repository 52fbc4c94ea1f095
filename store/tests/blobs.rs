//! The blob store: content addressing, verification on read, limits, and crash safety
//! with a real writer process killed mid-write.

use std::io::{BufRead, BufReader};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};

use maas_store::{BlobStore, Digest, StoreError};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

#[tokio::test]
async fn blobs_are_content_addressed_and_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let first = store.put_bytes(b"weights").await.unwrap();
    let second = store.put_bytes(b"weights").await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first.digest, Digest::of(b"weights"));
    assert_eq!(first.size_bytes, 7);
    assert_eq!(store.read(&first.digest).await.unwrap(), b"weights");
    assert!(store.contains(&first.digest).await);
    assert!(store.remove(&first.digest).await.unwrap());
    assert!(!store.contains(&first.digest).await);
    assert!(matches!(store.read(&first.digest).await, Err(StoreError::NotFound { .. })));
}

#[tokio::test]
async fn streaming_large_blobs_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let bytes = pattern(5 * 1024 * 1024 + 17);
    let info = store.put(bytes.as_slice(), None).await.unwrap();
    assert_eq!(info.size_bytes, bytes.len() as u64);
    let mut reader = store.open_blob(&info.digest).await.unwrap();
    assert_eq!(reader.size_bytes(), bytes.len() as u64);
    let mut back = Vec::new();
    reader.read_to_end(&mut back).await.unwrap();
    assert!(back == bytes);
}

#[tokio::test]
async fn a_corrupted_blob_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let info = store.put_bytes(&pattern(100_000)).await.unwrap();
    let path = store.path_of(&info.digest);
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[50_000] ^= 0xff;
    std::fs::write(&path, on_disk).unwrap();
    assert!(matches!(store.read(&info.digest).await, Err(StoreError::BlobCorrupt { .. })));
    assert!(matches!(store.verify(&info.digest).await, Err(StoreError::BlobCorrupt { .. })));
}

#[tokio::test]
async fn limits_and_expected_digests_refuse_and_keep_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let too_large = store.put(pattern(1000).as_slice(), Some(999)).await;
    assert!(matches!(too_large, Err(StoreError::BlobTooLarge { limit_bytes: 999 })), "{too_large:?}");
    let wrong = store.put_expected(&b"abc"[..], &Digest::of(b"abd"), None).await;
    assert!(matches!(wrong, Err(StoreError::BlobDigestMismatch { .. })), "{wrong:?}");
    assert!(!store.contains(&Digest::of(b"abc")).await);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temporary file is left");
    let right = store.put_expected(&b"abc"[..], &Digest::of(b"abc"), Some(3)).await.unwrap();
    assert_eq!(right.digest, Digest::of(b"abc"));
}

const CHILD_ENV: &str = "MAAS_BLOB_WRITER_CHILD_DIR";
const CHILD_BLOB_BYTES: usize = 24 * 1024 * 1024;
const CHILD_CHUNK_BYTES: usize = 64 * 1024;

/// Not a test of its own: the body of the writer process that
/// `a_killed_writer_leaves_no_partial_blob` starts and kills. It streams a blob in chunks
/// and prints each chunk's index once it has been handed to the store.
#[tokio::test]
async fn blob_writer_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = BlobStore::open(&dir).await.unwrap();
    let source = ReportingReader { bytes: pattern(CHILD_BLOB_BYTES), position: 0 };
    let info = store.put(source, None).await.unwrap();
    println!("done {}", info.digest);
}

/// Kills a writer process at many points (before, during and after the rename) and
/// checks that the blob is then absent or whole, and that reopening sweeps leftovers.
#[tokio::test]
async fn a_killed_writer_leaves_no_partial_blob() {
    let total_chunks = CHILD_BLOB_BYTES / CHILD_CHUNK_BYTES;
    let expected = Digest::of(&pattern(CHILD_BLOB_BYTES));
    let kill_points: Vec<Option<usize>> =
        [0, 1, total_chunks / 3, total_chunks / 2, total_chunks - 2, total_chunks - 1]
            .into_iter()
            .map(Some)
            .chain([None])
            .collect();
    let mut outcomes = Vec::new();
    for kill_after_chunk in kill_points {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "blob_writer_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut finished = false;
        for line in stdout.lines() {
            let line = line.unwrap();
            if line.starts_with("done ") {
                finished = true;
                break;
            }
            if let (Some(kill_at), Some(chunk)) = (kill_after_chunk, line.strip_prefix("chunk "))
                && chunk.parse::<usize>().unwrap() >= kill_at
            {
                break;
            }
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .ok();
        child.wait().unwrap();

        let store = BlobStore::open(dir.path()).await.unwrap();
        let present = store.contains(&expected).await;
        if present {
            assert_eq!(store.verify(&expected).await.unwrap(), CHILD_BLOB_BYTES as u64, "a present blob is whole");
        }
        assert!(!finished || present, "an acknowledged blob survives the kill");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "reopening sweeps partial writes");
        outcomes.push((kill_after_chunk, present));
    }
    assert!(outcomes.iter().any(|(_, present)| !present), "some kills landed mid-write: {outcomes:?}");
    assert!(outcomes.iter().any(|(_, present)| *present), "the unkilled writer finished: {outcomes:?}");
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from((i * 31 + i / 251) % 256).unwrap()).collect()
}

/// Hands out its bytes a chunk at a time and prints `chunk N` after each, so the parent
/// can kill the writer at a known point.
struct ReportingReader {
    bytes: Vec<u8>,
    position: usize,
}

impl AsyncRead for ReportingReader {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let end = (self.position + CHILD_CHUNK_BYTES.min(buf.remaining())).min(self.bytes.len());
        let chunk_index = self.position / CHILD_CHUNK_BYTES;
        buf.put_slice(&self.bytes[self.position..end]);
        if end > self.position {
            println!("chunk {chunk_index}");
        }
        self.position = end;
        Poll::Ready(Ok(()))
    }
}
