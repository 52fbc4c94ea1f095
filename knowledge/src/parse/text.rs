//! Plain text, and the decoding that Markdown and HTML share with it.

use std::borrow::Cow;

use super::blocks::BlocksBuilder;
use super::{BlockKind, DocumentKind, ParseError, Parsed};

/// Decodes UTF-8 (dropping a byte-order mark) or UTF-16 with a byte-order mark. Anything else
/// is refused: decoding lossily would index a GBK or Latin-1 file as replacement characters.
pub(super) fn decode(bytes: &[u8], kind: DocumentKind) -> Result<Cow<'_, str>, ParseError> {
    if let Some(rest) = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        return utf8(rest, kind, 3);
    }
    let utf16_big_endian = match bytes {
        [0xFF, 0xFE, ..] => false,
        [0xFE, 0xFF, ..] => true,
        _ => return utf8(bytes, kind, 0),
    };
    let body = &bytes[2..];
    if !body.len().is_multiple_of(2) {
        return Err(ParseError::corrupt(kind, "utf-16 text with an odd number of bytes"));
    }
    let units = body.chunks_exact(2).map(|pair| {
        let pair = [pair[0], pair[1]];
        if utf16_big_endian { u16::from_be_bytes(pair) } else { u16::from_le_bytes(pair) }
    });
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .map(Cow::Owned)
        .map_err(|_| ParseError::corrupt(kind, "utf-16 text with an unpaired surrogate"))
}

fn utf8(bytes: &[u8], kind: DocumentKind, offset_base: usize) -> Result<Cow<'_, str>, ParseError> {
    std::str::from_utf8(bytes)
        .map(Cow::Borrowed)
        .map_err(|error| ParseError::NotUtf8 { kind, offset: offset_base + error.valid_up_to() })
}

/// Paragraphs are separated by blank lines; a form feed (as `pdftotext` writes) starts a new
/// page.
pub(super) fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
    let text = decode(bytes, DocumentKind::Text)?;
    let mut builder = BlocksBuilder::default();
    let mut page = 1_u32;
    for page_text in text.split('\u{C}') {
        let mut paragraph = String::new();
        for line in page_text.lines() {
            if line.trim().is_empty() {
                builder.push(BlockKind::Paragraph, &paragraph, page);
                paragraph.clear();
            } else {
                if !paragraph.is_empty() {
                    paragraph.push('\n');
                }
                paragraph.push_str(line);
            }
        }
        builder.push(BlockKind::Paragraph, &paragraph, page);
        page = page.saturating_add(1);
    }
    Ok(Parsed { title: None, page_count: page - 1, blocks: builder.finish() })
}
