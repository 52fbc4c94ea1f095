//! A shard's append-only log of changes since its last snapshot.
//!
//! Format: `wal.log` = header (`MAASVLOG`, version `u32`) then records
//! `[len u32][crc32 u32][payload]`, all little-endian. A payload is `[lsn u64][op u8]` and
//! the op's body: an upsert (the records, vectors already prepared for the metric) or a
//! delete (chunk ids). One record per call, fsynced before the call returns, so a crash
//! replays a call whole or not at all. A torn or corrupt tail (a short record, a length past
//! the end, a checksum that does not match) is cut off on open, fsynced, and never applied.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::VectorRecord;
use super::codec;
use crate::error::{KnowledgeError, Result};

pub(crate) const WAL_FILE: &str = "wal.log";
const MAGIC: &[u8; 8] = b"MAASVLOG";
/// The log format's version; bump it (and keep reading the old one) when the format changes.
pub(crate) const WAL_VERSION: u32 = 1;
const HEADER_BYTES: u64 = 12;
/// The largest record accepted; a larger length can only be a torn or corrupt tail.
pub(crate) const MAX_RECORD_BYTES: usize = 1 << 30;

const OP_UPSERT: u8 = 1;
const OP_DELETE: u8 = 2;

/// One logged change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WalOp {
    Upsert(Vec<VectorRecord>),
    Delete(Vec<u64>),
}

/// The open log, positioned at its end.
#[derive(Debug)]
pub(crate) struct Wal {
    path: PathBuf,
    file: File,
    bytes: u64,
}

impl Wal {
    /// Opens the shard's log (creating an empty one if there is none), passes every intact
    /// record to `apply` in order, and cuts off a torn tail.
    pub(crate) fn open(dir: &Path, mut apply: impl FnMut(u64, WalOp) -> Result<()>) -> Result<Wal> {
        let path = dir.join(WAL_FILE);
        if !path.exists() {
            return Wal::reset(dir);
        }
        let file =
            OpenOptions::new().read(true).append(true).open(&path).map_err(|e| KnowledgeError::io("open", &path, e))?;
        let file_bytes = file.metadata().map_err(|e| KnowledgeError::io("read", &path, e))?.len();
        let mut input = BufReader::with_capacity(1 << 20, &file);
        read_header(&mut input, &path)?;
        let mut good = HEADER_BYTES;
        let mut tail_problem = None;
        loop {
            match read_record(&mut input, file_bytes - good) {
                Ok(None) => break,
                Ok(Some(payload)) => {
                    let (lsn, op) = decode(&payload).map_err(|reason| {
                        KnowledgeError::corrupt(
                            &path,
                            format!("record at byte {good} has a good checksum but {reason}"),
                        )
                    })?;
                    apply(lsn, op)?;
                    good += 8 + payload.len() as u64;
                }
                Err(problem) => {
                    tail_problem = Some(problem);
                    break;
                }
            }
        }
        drop(input);
        if let Some(problem) = tail_problem {
            tracing::warn!(
                path = %path.display(), kept_bytes = good, dropped_bytes = file_bytes - good,
                "cutting off a torn log tail ({problem}); the write it held was never acknowledged"
            );
            file.set_len(good).and_then(|()| file.sync_all()).map_err(|e| KnowledgeError::io("truncate", &path, e))?;
        }
        Ok(Wal { path, file, bytes: good })
    }

    /// Replaces the log with an empty one (after a snapshot has made its records redundant).
    pub(crate) fn reset(dir: &Path) -> Result<Wal> {
        let path = dir.join(WAL_FILE);
        codec::write_atomically(&path, |out| {
            out.write_all(MAGIC)?;
            codec::put_u32(out, WAL_VERSION)
        })?;
        let file =
            OpenOptions::new().read(true).append(true).open(&path).map_err(|e| KnowledgeError::io("open", &path, e))?;
        Ok(Wal { path, file, bytes: HEADER_BYTES })
    }

    /// Appends one record and fsyncs it.
    pub(crate) fn append(&mut self, lsn: u64, op: &WalOp) -> Result<()> {
        let payload = encode(lsn, op).map_err(|e| KnowledgeError::io("encode a record for", &self.path, e))?;
        if payload.len() > MAX_RECORD_BYTES {
            return Err(KnowledgeError::InvalidRequest {
                reason: format!(
                    "one write of {} bytes is over the 1 GiB limit: send fewer records per upsert",
                    payload.len()
                ),
            });
        }
        let mut record = Vec::with_capacity(payload.len() + 8);
        let len = u32::try_from(payload.len()).expect("checked against MAX_RECORD_BYTES");
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        let written = self.file.write_all(&record).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A partly written record would sit before the next one: cut it off, so the log
            // stays a sequence of whole records.
            let _ = self.file.set_len(self.bytes);
            return Err(KnowledgeError::io("append to", &self.path, e));
        }
        self.bytes += record.len() as u64;
        Ok(())
    }

    /// The log's size in bytes, header included.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn read_header(input: &mut impl Read, path: &Path) -> Result<()> {
    let mut magic = [0; 8];
    input.read_exact(&mut magic).map_err(|e| KnowledgeError::corrupt(path, format!("no log header: {e}")))?;
    if &magic != MAGIC {
        return Err(KnowledgeError::corrupt(path, "it does not start with MAASVLOG"));
    }
    let version = codec::get_u32(input).map_err(|e| KnowledgeError::corrupt(path, format!("no log version: {e}")))?;
    if version > WAL_VERSION {
        return Err(KnowledgeError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: WAL_VERSION,
        });
    }
    Ok(())
}

/// Reads one record's payload: `Ok(None)` at a clean end, `Err` with the reason for a torn or
/// corrupt record.
fn read_record(input: &mut impl Read, remaining: u64) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut header = [0; 8];
    let mut filled = 0;
    while filled < header.len() {
        match input.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(format!("a record header cut after {filled} bytes")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD_BYTES || len as u64 > remaining.saturating_sub(8) {
        return Err(format!("a record length of {len} bytes past the end"));
    }
    let mut payload = vec![0; len];
    input.read_exact(&mut payload).map_err(|e| format!("a record cut short: {e}"))?;
    if crc32fast::hash(&payload) != crc {
        return Err("a record whose checksum does not match".to_owned());
    }
    Ok(Some(payload))
}

fn encode(lsn: u64, op: &WalOp) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    codec::put_u64(&mut out, lsn)?;
    match op {
        WalOp::Upsert(records) => {
            codec::put_u8(&mut out, OP_UPSERT)?;
            codec::put_u32(&mut out, count(records.len())?)?;
            for record in records {
                codec::put_u64(&mut out, record.chunk_id)?;
                codec::put_i64(&mut out, record.version)?;
                codec::put_str(&mut out, &record.document_id)?;
                codec::put_u32(&mut out, count(record.tags.len())?)?;
                for tag in &record.tags {
                    codec::put_str(&mut out, tag)?;
                }
                codec::put_u32(&mut out, count(record.vector.len())?)?;
                codec::put_f32s(&mut out, &record.vector)?;
            }
        }
        WalOp::Delete(chunk_ids) => {
            codec::put_u8(&mut out, OP_DELETE)?;
            codec::put_u32(&mut out, count(chunk_ids.len())?)?;
            for chunk_id in chunk_ids {
                codec::put_u64(&mut out, *chunk_id)?;
            }
        }
    }
    Ok(out)
}

fn count(len: usize) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many items in one record"))
}

fn decode(payload: &[u8]) -> std::result::Result<(u64, WalOp), String> {
    let mut input = payload;
    let io = |e: io::Error| e.to_string();
    let lsn = codec::get_u64(&mut input).map_err(io)?;
    let op = match codec::get_u8(&mut input).map_err(io)? {
        OP_UPSERT => {
            let records = codec::get_u32(&mut input).map_err(io)?;
            // Each record takes at least 28 bytes, which bounds the allocation.
            let mut out = Vec::with_capacity((records as usize).min(input.len() / 28));
            for _ in 0..records {
                let chunk_id = codec::get_u64(&mut input).map_err(io)?;
                let version = codec::get_i64(&mut input).map_err(io)?;
                let document_id = codec::get_str(&mut input).map_err(io)?;
                let tag_count = codec::get_u32(&mut input).map_err(io)?;
                let tags =
                    (0..tag_count).map(|_| codec::get_str(&mut input)).collect::<io::Result<Vec<_>>>().map_err(io)?;
                let dimension = codec::get_u32(&mut input).map_err(io)? as usize;
                if dimension * 4 > input.len() {
                    return Err(format!("a vector of {dimension} dimensions past the end"));
                }
                let mut vector = Vec::with_capacity(dimension);
                codec::get_f32s_into(&mut input, dimension, &mut vector).map_err(io)?;
                out.push(VectorRecord { chunk_id, vector, document_id, version, tags });
            }
            WalOp::Upsert(out)
        }
        OP_DELETE => {
            let ids = codec::get_u32(&mut input).map_err(io)?;
            let mut out = Vec::with_capacity((ids as usize).min(input.len() / 8));
            for _ in 0..ids {
                out.push(codec::get_u64(&mut input).map_err(io)?);
            }
            WalOp::Delete(out)
        }
        other => return Err(format!("an unknown operation {other}")),
    };
    if !input.is_empty() {
        return Err(format!("{} bytes after the operation", input.len()));
    }
    Ok((lsn, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(chunk_id: u64) -> VectorRecord {
        VectorRecord {
            chunk_id,
            vector: vec![0.5, -0.25],
            document_id: "doc \"1\"".into(),
            version: -3,
            tags: vec!["a".into(), "ü".into()],
        }
    }

    #[test]
    fn records_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), |_, _| unreachable!("a new log is empty")).unwrap();
        wal.append(1, &WalOp::Upsert(vec![record(1), record(2)])).unwrap();
        wal.append(2, &WalOp::Delete(vec![1, u64::MAX])).unwrap();
        drop(wal);
        let mut seen = Vec::new();
        Wal::open(dir.path(), |lsn, op| {
            seen.push((lsn, op));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(1, WalOp::Upsert(vec![record(1), record(2)])), (2, WalOp::Delete(vec![1, u64::MAX]))]);
    }

    #[test]
    fn every_torn_tail_is_cut_off_and_the_log_stays_appendable() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), |_, _| Ok(())).unwrap();
        wal.append(1, &WalOp::Delete(vec![7])).unwrap();
        let whole = wal.bytes();
        wal.append(2, &WalOp::Upsert(vec![record(3)])).unwrap();
        let full = std::fs::read(dir.path().join(WAL_FILE)).unwrap();
        drop(wal);
        for cut in usize::try_from(whole).unwrap()..full.len() {
            std::fs::write(dir.path().join(WAL_FILE), &full[..cut]).unwrap();
            let mut lsns = Vec::new();
            let mut wal = Wal::open(dir.path(), |lsn, _| {
                lsns.push(lsn);
                Ok(())
            })
            .unwrap();
            assert_eq!(lsns, vec![1], "cut at byte {cut}");
            assert_eq!(wal.bytes(), whole);
            wal.append(3, &WalOp::Delete(vec![8])).unwrap();
            drop(wal);
            let mut lsns = Vec::new();
            Wal::open(dir.path(), |lsn, _| {
                lsns.push(lsn);
                Ok(())
            })
            .unwrap();
            assert_eq!(lsns, vec![1, 3], "cut at byte {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_in_the_last_record_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), |_, _| Ok(())).unwrap();
        wal.append(1, &WalOp::Delete(vec![7])).unwrap();
        wal.append(2, &WalOp::Delete(vec![9])).unwrap();
        drop(wal);
        let path = dir.path().join(WAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let mut lsns = Vec::new();
        Wal::open(dir.path(), |lsn, _| {
            lsns.push(lsn);
            Ok(())
        })
        .unwrap();
        assert_eq!(lsns, vec![1]);
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(WAL_VERSION + 1).to_le_bytes());
        std::fs::write(dir.path().join(WAL_FILE), bytes).unwrap();
        let err = Wal::open(dir.path(), |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, KnowledgeError::UnsupportedVersion { found: 2, supported: 1, .. }), "{err}");
    }
}
