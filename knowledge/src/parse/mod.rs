//! Document parsing: PDF, DOCX, plain text, Markdown and HTML bytes in, a flat list of
//! [`Block`]s out, each with its text, its kind (heading, paragraph, list item, table, code),
//! its page and the path of headings it sits under.
//!
//! [`parse`] is a pure function over bytes: no files, no network, no clock. It never panics on
//! arbitrary input (a panic inside a third-party parser is caught and reported as
//! [`ParseError::Corrupt`]), and every way a document can be refused is a [`ParseError`] with a
//! message the uploader can act on. It is CPU-bound: call it from a blocking thread.
//!
//! Limits, by format:
//! - **PDF** (lopdf): text comes from the page content streams' text operators, decoded through
//!   the fonts' encodings and `ToUnicode` maps; lines are rebuilt from the text positions and
//!   joined into paragraphs by their vertical gaps; a line set in a font clearly larger than the
//!   body text is taken as a heading. Text comes in the order the file draws it, which is the
//!   reading order for most generators; columns and tables come out as drawn. Text inside form
//!   XObjects, annotations and images is not read (a scanned PDF has no text layer and is
//!   refused as empty: run OCR on it first). A PDF with an owner password only (empty user
//!   password) is read; one that needs a password is refused. A file without its `%%EOF`
//!   marker is refused as cut short. Streams are inflated with a bound each, and page contents
//!   with a bound in total; the object streams lopdf inflates while loading are bounded one by
//!   one only, so the file size limit is what bounds their total.
//! - **DOCX** (zip + quick-xml): the body of `word/document.xml`; headings from the paragraph
//!   styles (`Heading 1`..`9`, by style name so localised style ids work, or an outline level),
//!   the `Title` style as the title, list paragraphs, tables as one block each. Pages come only
//!   from explicit page breaks. Headers, footers, footnotes, comments and tracked deletions are
//!   not read. The archive is read under [`ParseLimits`]' zip-bomb bounds.
//! - **Text**: UTF-8 (a byte-order mark is dropped) or UTF-16 with a byte-order mark; anything
//!   else is refused rather than decoded lossily, because a GBK or Latin-1 file decoded as UTF-8
//!   would be indexed as garbage without anyone noticing. Paragraphs are split at blank lines;
//!   a form feed starts a new page.
//! - **Markdown** (pulldown-cmark, CommonMark with tables): raw HTML inside Markdown is skipped;
//!   the title is the front matter's `title:` or else the first level-1 heading.
//! - **HTML** (scraper/html5ever): `script`, `style`, `nav`, `noscript`, `template`, `svg`,
//!   `head` and `hidden` elements are skipped; the title is `<title>` or else the first `h1`.
//!   The bytes must be UTF-8 (or UTF-16 with a byte-order mark), whatever a `<meta charset>`
//!   says.

mod blocks;
mod detect;
mod docx;
mod error;
mod html;
mod markdown;
mod pdf;
mod text;
mod zip_limits;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use error::ParseError;

/// What [`ParsedDocument::text`] puts between two blocks; chunk offsets count it.
pub const BLOCK_SEPARATOR: &str = "\n\n";

/// The document formats [`parse`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentKind {
    Pdf,
    Docx,
    Text,
    Markdown,
    Html,
}

impl DocumentKind {
    /// Every kind, for tables and tests.
    pub const ALL: [DocumentKind; 5] =
        [DocumentKind::Pdf, DocumentKind::Docx, DocumentKind::Text, DocumentKind::Markdown, DocumentKind::Html];

    /// The lowercase name used in messages and stored records.
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentKind::Pdf => "pdf",
            DocumentKind::Docx => "docx",
            DocumentKind::Text => "text",
            DocumentKind::Markdown => "markdown",
            DocumentKind::Html => "html",
        }
    }

    fn empty_reason(self) -> &'static str {
        match self {
            DocumentKind::Pdf => {
                "no page has a text layer; it is probably a scanned image: run OCR on it (or export it with text) and upload again"
            }
            DocumentKind::Docx => {
                "the body has no text (text only in images, text boxes, headers or footers is not read)"
            }
            DocumentKind::Text => "the file is empty or only whitespace",
            DocumentKind::Markdown => "the file is empty or only whitespace (raw HTML inside Markdown is not read)",
            DocumentKind::Html => "the page has no visible text outside scripts, styles and navigation",
        }
    }
}

impl fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bounds on what one document may cost to parse. Every bound that is hit is a
/// [`ParseError`], never a truncated result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParseLimits {
    /// The largest input accepted, in bytes.
    pub max_bytes: usize,
    /// The most pages a PDF may have.
    pub max_pages: usize,
    /// The most bytes that decompression may produce: in total over a DOCX's parts, in total
    /// over a PDF's page contents, and for any one PDF stream.
    pub max_inflated_bytes: usize,
    /// The most entries a DOCX (zip) archive may have.
    pub max_archive_entries: usize,
    /// The largest ratio of inflated to compressed size for a DOCX part over 1 MiB.
    pub max_compression_ratio: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_bytes: 64 * 1024 * 1024,
            max_pages: 2_000,
            max_inflated_bytes: 256 * 1024 * 1024,
            max_archive_entries: 10_000,
            max_compression_ratio: 200,
        }
    }
}

/// What a block of text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockKind {
    /// A heading; level 1 is the outermost.
    Heading {
        level: u8,
    },
    Paragraph,
    ListItem,
    /// A whole table: one line per row, cells separated by ` | `.
    Table,
    /// Preformatted text, whitespace kept.
    Code,
}

/// One block of a document, in reading order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub kind: BlockKind,
    /// Never empty, never starts or ends with whitespace.
    pub text: String,
    /// 1-based. PDF: the page the block is on; DOCX and text: counted from explicit page breaks;
    /// Markdown and HTML: always 1.
    pub page: u32,
    /// The headings this block sits under, outermost first. A heading block's path ends with
    /// the heading itself, so a heading belongs to the section it opens.
    pub heading_path: Vec<String>,
}

/// A parsed document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedDocument {
    pub kind: DocumentKind,
    /// The document's own title, where it has one (PDF metadata, DOCX core properties or
    /// `Title` paragraph, Markdown front matter or first `#` heading, HTML `<title>`).
    pub title: Option<String>,
    /// Pages in the document (1 for formats without pages).
    pub page_count: u32,
    /// Never empty: a document without text is [`ParseError::Empty`].
    pub blocks: Vec<Block>,
}

impl ParsedDocument {
    /// The whole text: every block's text joined by [`BLOCK_SEPARATOR`]. Chunk offsets index it.
    pub fn text(&self) -> String {
        let mut text = String::with_capacity(self.blocks.iter().map(|block| block.text.len() + 2).sum());
        for (index, block) in self.blocks.iter().enumerate() {
            if index > 0 {
                text.push_str(BLOCK_SEPARATOR);
            }
            text.push_str(&block.text);
        }
        text
    }
}

/// What one format's parser hands back before the checks common to all.
#[derive(Debug, Default)]
struct Parsed {
    title: Option<String>,
    page_count: u32,
    blocks: Vec<Block>,
}

/// Parses a document of a known kind (see [`DocumentKind::detect`]).
pub fn parse(bytes: &[u8], kind: DocumentKind, limits: &ParseLimits) -> Result<ParsedDocument, ParseError> {
    if bytes.len() > limits.max_bytes {
        return Err(ParseError::TooLarge { size_bytes: bytes.len(), max_bytes: limits.max_bytes });
    }
    // Third-party parsers may panic on malformed input; the bytes are the uploader's, so that
    // is a corrupt file, not a crash. Every value the closure touches is dropped with it.
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match kind {
        DocumentKind::Pdf => pdf::parse(bytes, limits),
        DocumentKind::Docx => docx::parse(bytes, limits),
        DocumentKind::Text => text::parse(bytes),
        DocumentKind::Markdown => markdown::parse(bytes),
        DocumentKind::Html => html::parse(bytes),
    }))
    .unwrap_or_else(|_| Err(ParseError::corrupt(kind, "the parser failed on malformed input")))?;
    if parsed.blocks.is_empty() {
        return Err(ParseError::Empty { kind, reason: kind.empty_reason() });
    }
    Ok(ParsedDocument {
        kind,
        title: parsed.title.filter(|title| !title.is_empty()),
        page_count: parsed.page_count.max(1),
        blocks: parsed.blocks,
    })
}
