//! Little-endian encoding of the log's and snapshots' fields, and durable file writes.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use crate::error::{KnowledgeError, Result};

/// Makes a directory's entries (a created or renamed file) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| KnowledgeError::io("sync folder", dir, e))
}

/// Writes a file so that it holds either its old content or all of the new: into
/// `PATH.tmp`, fsynced, renamed over `PATH`, and the folder fsynced.
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let result = File::create(&tmp).and_then(|file| {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()
    });
    result.map_err(|e| KnowledgeError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| KnowledgeError::io("rename into place", path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// `PATH.tmp`, where [`write_atomically`] writes first.
pub(crate) fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The longest string the formats hold (document ids and tags are far shorter).
const MAX_STRING_BYTES: u32 = 1 << 20;

pub(crate) fn put_u8(out: &mut impl Write, value: u8) -> io::Result<()> {
    out.write_all(&[value])
}

pub(crate) fn put_u32(out: &mut impl Write, value: u32) -> io::Result<()> {
    out.write_all(&value.to_le_bytes())
}

pub(crate) fn put_u64(out: &mut impl Write, value: u64) -> io::Result<()> {
    out.write_all(&value.to_le_bytes())
}

pub(crate) fn put_i64(out: &mut impl Write, value: i64) -> io::Result<()> {
    out.write_all(&value.to_le_bytes())
}

pub(crate) fn put_str(out: &mut impl Write, value: &str) -> io::Result<()> {
    let len = u32::try_from(value.len()).ok().filter(|len| *len <= MAX_STRING_BYTES).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("a string of {} bytes is too long", value.len()))
    })?;
    put_u32(out, len)?;
    out.write_all(value.as_bytes())
}

pub(crate) fn put_f32s(out: &mut impl Write, values: &[f32]) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    out.write_all(&bytes)
}

pub(crate) fn get_u8(input: &mut impl Read) -> io::Result<u8> {
    let mut bytes = [0; 1];
    input.read_exact(&mut bytes)?;
    Ok(bytes[0])
}

pub(crate) fn get_u32(input: &mut impl Read) -> io::Result<u32> {
    let mut bytes = [0; 4];
    input.read_exact(&mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

pub(crate) fn get_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0; 8];
    input.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

pub(crate) fn get_i64(input: &mut impl Read) -> io::Result<i64> {
    let mut bytes = [0; 8];
    input.read_exact(&mut bytes)?;
    Ok(i64::from_le_bytes(bytes))
}

pub(crate) fn get_str(input: &mut impl Read) -> io::Result<String> {
    let len = get_u32(input)?;
    if len > MAX_STRING_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a string of {len} bytes")));
    }
    let mut bytes = vec![0; len as usize];
    input.read_exact(&mut bytes)?;
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads `count` floats and appends them to `into`.
pub(crate) fn get_f32s_into(input: &mut impl Read, count: usize, into: &mut Vec<f32>) -> io::Result<()> {
    let mut bytes = vec![0; count * 4];
    input.read_exact(&mut bytes)?;
    into.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    Ok(())
}

/// A writer that keeps the CRC-32 of everything written through it.
pub(crate) struct CrcWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> CrcWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        CrcWriter { inner, hasher: crc32fast::Hasher::new() }
    }

    pub(crate) fn finish(self) -> (W, u32) {
        (self.inner, self.hasher.finalize())
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
