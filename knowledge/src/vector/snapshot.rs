//! A shard's snapshot: its whole state as of one log position.
//!
//! Format: `snapshot.bin` = `MAASVSNP`, version `u32`, then the last log position applied
//! (`lsn u64`), the dimension (`u32`), each node's metadata (`chunk_id u64`, `deleted u8`,
//! `version i64`, `document_id`, tags), the HNSW graph (vectors and links), and a CRC-32 of
//! everything before it. Written to `snapshot.bin.tmp`, fsynced and renamed over the old one,
//! so a crash leaves the old snapshot or the new, never a part.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use super::codec::{self, CrcWriter};
use super::hnsw::{Hnsw, HnswParams};
use super::shard::NodeMeta;
use crate::error::{KnowledgeError, Result};

pub(crate) const SNAPSHOT_FILE: &str = "snapshot.bin";
const MAGIC: &[u8; 8] = b"MAASVSNP";
/// The snapshot format's version; bump it (and keep reading the old one) when it changes.
pub(crate) const SNAPSHOT_VERSION: u32 = 1;

/// What a snapshot holds.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) last_lsn: u64,
    pub(crate) nodes: Vec<NodeMeta>,
    pub(crate) graph: Hnsw,
}

/// Writes the snapshot atomically.
pub(crate) fn write(dir: &Path, last_lsn: u64, nodes: &[NodeMeta], graph: &Hnsw) -> Result<()> {
    codec::write_atomically(&dir.join(SNAPSHOT_FILE), |out| {
        let mut out = CrcWriter::new(out);
        out.write_all(MAGIC)?;
        codec::put_u32(&mut out, SNAPSHOT_VERSION)?;
        codec::put_u64(&mut out, last_lsn)?;
        codec::put_u32(&mut out, u32::try_from(graph.dimension()).expect("dimensions are bounded"))?;
        codec::put_u64(&mut out, nodes.len() as u64)?;
        for node in nodes {
            codec::put_u64(&mut out, node.chunk_id)?;
            codec::put_u8(&mut out, u8::from(node.deleted))?;
            codec::put_i64(&mut out, node.version)?;
            codec::put_str(&mut out, &node.document_id)?;
            codec::put_u32(&mut out, u32::try_from(node.tags.len()).expect("tags are bounded"))?;
            for tag in &node.tags {
                codec::put_str(&mut out, tag)?;
            }
        }
        graph.write_to(&mut out)?;
        let (out, crc) = out.finish();
        codec::put_u32(out, crc)
    })
}

/// Reads the shard's snapshot, if it has one.
pub(crate) fn read(dir: &Path, dimension: usize, params: HnswParams) -> Result<Option<Snapshot>> {
    let path = dir.join(SNAPSHOT_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KnowledgeError::io("open", &path, e)),
    };
    check_crc(&file, &path)?;
    let file = File::open(&path).map_err(|e| KnowledgeError::io("open", &path, e))?;
    let mut input = BufReader::with_capacity(1 << 20, file);
    let corrupt = |e: io::Error| KnowledgeError::corrupt(&path, e.to_string());
    let mut magic = [0; 8];
    input.read_exact(&mut magic).map_err(corrupt)?;
    if &magic != MAGIC {
        return Err(KnowledgeError::corrupt(&path, "it does not start with MAASVSNP"));
    }
    let version = codec::get_u32(&mut input).map_err(corrupt)?;
    if version > SNAPSHOT_VERSION {
        return Err(KnowledgeError::UnsupportedVersion { path, found: version, supported: SNAPSHOT_VERSION });
    }
    let last_lsn = codec::get_u64(&mut input).map_err(corrupt)?;
    let stored_dimension = codec::get_u32(&mut input).map_err(corrupt)? as usize;
    if stored_dimension != dimension {
        return Err(KnowledgeError::corrupt(
            &path,
            format!("it holds {stored_dimension}-dimensional vectors, the shard's manifest says {dimension}"),
        ));
    }
    let count = codec::get_u64(&mut input).map_err(corrupt)?;
    let mut nodes = Vec::new();
    for _ in 0..count {
        nodes.push(read_node(&mut input).map_err(corrupt)?);
    }
    let graph =
        Hnsw::read_from(&mut input, dimension, params).map_err(|reason| KnowledgeError::corrupt(&path, reason))?;
    if graph.len() != nodes.len() {
        return Err(KnowledgeError::corrupt(
            &path,
            format!("{} nodes of metadata for {} in the graph", nodes.len(), graph.len()),
        ));
    }
    Ok(Some(Snapshot { last_lsn, nodes, graph }))
}

fn read_node(input: &mut impl Read) -> io::Result<NodeMeta> {
    let chunk_id = codec::get_u64(input)?;
    let deleted = codec::get_u8(input)? != 0;
    let version = codec::get_i64(input)?;
    let document_id = codec::get_str(input)?;
    let tags = (0..codec::get_u32(input)?).map(|_| codec::get_str(input)).collect::<io::Result<Vec<_>>>()?;
    Ok(NodeMeta { chunk_id, document_id, version, tags, deleted })
}

/// Checks the trailing CRC-32 before anything is parsed, so a damaged length can never
/// drive an allocation.
fn check_crc(file: &File, path: &Path) -> Result<()> {
    let len = file.metadata().map_err(|e| KnowledgeError::io("read", path, e))?.len();
    if len < 16 {
        return Err(KnowledgeError::corrupt(path, format!("it is {len} bytes long")));
    }
    let mut input = BufReader::with_capacity(1 << 20, file).take(len - 4);
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        let read = input.read(&mut buffer).map_err(|e| KnowledgeError::io("read", path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    let mut input = input.into_inner();
    let stored = codec::get_u32(&mut input).map_err(|e| KnowledgeError::io("read", path, e))?;
    if stored == hasher.finalize() { Ok(()) } else { Err(KnowledgeError::corrupt(path, "its checksum does not match")) }
}
