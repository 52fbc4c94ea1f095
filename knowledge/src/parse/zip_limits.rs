//! A zip archive read under [`ParseLimits`]: a cap on the number of entries, on the sizes the
//! entries declare, on each part's compression ratio, and on the bytes actually inflated
//! (counted while inflating, so an entry that lies about its size is caught too).

use std::io::{Cursor, Read};

use zip::ZipArchive;
use zip::result::ZipError;

use super::{DocumentKind, ParseError, ParseLimits};

/// Parts smaller than this are not held to the compression ratio: small XML compresses well.
const RATIO_FLOOR_BYTES: u64 = 1024 * 1024;

pub(super) struct LimitedZip<'a> {
    archive: ZipArchive<Cursor<&'a [u8]>>,
    kind: DocumentKind,
    limits: &'a ParseLimits,
    inflated_bytes: usize,
}

impl<'a> LimitedZip<'a> {
    pub(super) fn open(bytes: &'a [u8], kind: DocumentKind, limits: &'a ParseLimits) -> Result<Self, ParseError> {
        let mut archive = ZipArchive::new(Cursor::new(bytes))
            .map_err(|error| ParseError::corrupt(kind, format!("not a zip archive: {error}")))?;
        if archive.len() > limits.max_archive_entries {
            return Err(ParseError::bomb(
                kind,
                format!("{} archive entries, over the limit of {}", archive.len(), limits.max_archive_entries),
            ));
        }
        let mut declared_bytes: u64 = 0;
        for index in 0..archive.len() {
            let entry = archive
                .by_index_raw(index)
                .map_err(|error| ParseError::corrupt(kind, format!("bad archive entry {index}: {error}")))?;
            declared_bytes = declared_bytes.saturating_add(entry.size());
        }
        if declared_bytes > to_u64(limits.max_inflated_bytes) {
            return Err(ParseError::bomb(
                kind,
                format!(
                    "its entries declare {declared_bytes} bytes uncompressed, over the limit of {}",
                    limits.max_inflated_bytes
                ),
            ));
        }
        Ok(LimitedZip { archive, kind, limits, inflated_bytes: 0 })
    }

    /// The inflated bytes of the named part, or `None` if the archive has no such part.
    pub(super) fn read(&mut self, name: &str) -> Result<Option<Vec<u8>>, ParseError> {
        let kind = self.kind;
        let mut entry = match self.archive.by_name(name) {
            Ok(entry) => entry,
            Err(ZipError::FileNotFound) => return Ok(None),
            Err(error) => return Err(ParseError::corrupt(kind, format!("cannot read {name}: {error}"))),
        };
        let remaining = self.limits.max_inflated_bytes.saturating_sub(self.inflated_bytes);
        let declared = entry.size();
        let compressed = entry.compressed_size();
        if declared > to_u64(remaining) {
            return Err(ParseError::bomb(
                kind,
                format!("{name} declares {declared} bytes, over the {remaining} bytes left of the limit"),
            ));
        }
        let ratio_limit = to_u64(self.limits.max_compression_ratio);
        if declared > RATIO_FLOOR_BYTES && declared > compressed.saturating_mul(ratio_limit) {
            return Err(ParseError::bomb(
                kind,
                format!("{name} inflates from {compressed} to {declared} bytes, more than {ratio_limit} times"),
            ));
        }
        let mut inflated = Vec::new();
        (&mut entry)
            .take(to_u64(remaining).saturating_add(1))
            .read_to_end(&mut inflated)
            .map_err(|error| ParseError::corrupt(kind, format!("cannot inflate {name}: {error}")))?;
        let actual = to_u64(inflated.len());
        if inflated.len() > remaining {
            return Err(ParseError::bomb(
                kind,
                format!("{name} inflates past the {remaining} bytes left of the limit although it declares {declared}"),
            ));
        }
        if actual > RATIO_FLOOR_BYTES && actual > compressed.saturating_mul(ratio_limit) {
            return Err(ParseError::bomb(
                kind,
                format!("{name} inflates from {compressed} to {actual} bytes, more than {ratio_limit} times"),
            ));
        }
        self.inflated_bytes += inflated.len();
        Ok(Some(inflated))
    }
}

fn to_u64(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}
