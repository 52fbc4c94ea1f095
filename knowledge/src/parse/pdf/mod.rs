//! PDF: lopdf loads the file (each stream inflated under a bound), then each page's content
//! stream is read for its text operators (see `lines`) and the lines are grouped into blocks
//! (see `layout`).

mod fonts;
mod layout;
mod lines;

use lopdf::content::Content;
use lopdf::{DecompressError, Document, LoadOptions, Object};

use super::blocks::{BlocksBuilder, collapse_whitespace};
use super::{DocumentKind, ParseError, ParseLimits, Parsed};

const KIND: DocumentKind = DocumentKind::Pdf;

pub(super) fn parse(bytes: &[u8], limits: &ParseLimits) -> Result<Parsed, ParseError> {
    // A PDF ends with `%%EOF` (PDF 32000-1 §7.5.5; readers allow it within the last KiB).
    // Without it the file was cut short, and lopdf's lenient repair could read a partial
    // document as if it were whole.
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    if !tail.windows(5).any(|window| window == b"%%EOF") {
        return Err(ParseError::corrupt(KIND, "it has no end-of-file marker, so it was probably cut short"));
    }
    let options = LoadOptions { max_decompressed_size: Some(limits.max_inflated_bytes), ..LoadOptions::default() };
    let document = Document::load_mem_with_options(bytes, options).map_err(|error| load_error(&error, limits))?;
    // lopdf opens a file whose user password is empty by itself; one it could not open still
    // names an /Encrypt dictionary in its trailer and has no decryption state.
    if document.trailer.get(b"Encrypt").is_ok() && !document.was_encrypted() {
        return Err(ParseError::Encrypted);
    }
    let pages = document.get_pages();
    if pages.is_empty() {
        return Err(ParseError::corrupt(KIND, "it has no pages"));
    }
    if pages.len() > limits.max_pages {
        return Err(ParseError::TooManyPages { pages: pages.len(), max_pages: limits.max_pages });
    }
    let mut inflated_budget = limits.max_inflated_bytes;
    let mut all_lines = Vec::new();
    let mut unreadable_pages = 0_usize;
    for (&page_number, &page_id) in &pages {
        let content = document
            .get_page_content_with_limit(page_id, inflated_budget)
            .map_err(|error| load_error(&error, limits))?;
        inflated_budget = inflated_budget.saturating_sub(content.len());
        let fonts = fonts::page_fonts(&document, page_id, limits.max_inflated_bytes)
            .map_err(|error| load_error(&error, limits))?;
        let Ok(content) = Content::decode(&content) else {
            unreadable_pages += 1;
            continue;
        };
        let mut reader = lines::LineReader::new(&fonts, page_number);
        for operation in &content.operations {
            reader.operation(operation);
        }
        all_lines.extend(reader.finish());
    }
    if all_lines.is_empty() && unreadable_pages > 0 {
        return Err(ParseError::corrupt(KIND, format!("the content of {unreadable_pages} page(s) cannot be read")));
    }
    let mut builder = BlocksBuilder::default();
    layout::lines_to_blocks(&all_lines, &mut builder);
    let title = info_title(&document).or_else(|| builder.first_heading(1));
    let page_count = u32::try_from(pages.len()).unwrap_or(u32::MAX);
    Ok(Parsed { title, page_count, blocks: builder.finish() })
}

fn load_error(error: &lopdf::Error, limits: &ParseLimits) -> ParseError {
    match error {
        lopdf::Error::Decompress(DecompressError::MemoryLimitExceeded { .. }) => {
            ParseError::bomb(KIND, format!("a stream inflates past the limit of {} bytes", limits.max_inflated_bytes))
        }
        lopdf::Error::InvalidPassword | lopdf::Error::Decryption(_) | lopdf::Error::UnsupportedSecurityHandler(_) => {
            ParseError::Encrypted
        }
        other => ParseError::corrupt(KIND, other),
    }
}

/// `/Title` from the document information dictionary.
fn info_title(document: &Document) -> Option<String> {
    let info = document.trailer.get(b"Info").ok()?;
    let info = document.dereference(info).ok()?.1.as_dict().ok()?;
    let title = info.get(b"Title").ok()?;
    let title = document.dereference(title).ok()?.1;
    let title = match title {
        Object::String(..) => lopdf::decode_text_string(title).ok()?,
        _ => return None,
    };
    Some(collapse_whitespace(&title)).filter(|title| !title.is_empty())
}
