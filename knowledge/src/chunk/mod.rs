//! Chunking: a [`ParsedDocument`] into chunks sized for the embedding model, each inside a
//! larger parent chunk (small chunks are embedded and matched; their parents give the
//! language model more context). Pure functions over plain data.
//!
//! Rules, in order:
//! - With `respect_headings`, a document is first cut into sections at every heading (a
//!   heading starts the section it titles) and no chunk or parent crosses a section.
//! - Parents pack whole blocks of a section up to `parent_max_tokens`; children pack whole
//!   blocks of a parent up to `max_tokens`. A block too big for the budget is cut into
//!   sentences (after `.`, `!` or `?` followed by a space, after `。！？；…`, and at line
//!   breaks), and a sentence still too big is cut at token boundaries (at the last space
//!   that fits, or between any two characters in text without spaces).
//! - From the second child of a parent on, a child starts with the tail of the child before
//!   it: whole sentences up to `overlap_tokens`, or a token-boundary tail of the last sentence
//!   where that alone is longer; the overlap counts towards `max_tokens`. Overlap never
//!   crosses a parent.
//! - Every chunk's token count is a real count of its whole text (overlap included) with the
//!   counter given, and is at most its budget (the one exception: a single character that
//!   alone counts more, which `validate` makes impossible in practice by asking for at least
//!   16 tokens).
//!
//! Offsets index [`ParsedDocument::text`] (blocks joined by [`BLOCK_SEPARATOR`]). The chunks'
//! own spans cover all of the document's text except whitespace between them, so nothing is
//! lost; a chunk's text is exactly the document text from `text_start_byte` to `end_byte`.
//!
//! [`BLOCK_SEPARATOR`]: crate::parse::BLOCK_SEPARATOR

mod counter;
mod error;
mod pack;
mod split;

use std::ops::Range;

use serde::{Deserialize, Serialize};

pub use counter::{CharCounter, TokenCounter, TokenizerCounter};
pub use error::ChunkError;

use crate::parse::{BLOCK_SEPARATOR, BlockKind, ParsedDocument};

/// The smallest `max_tokens` accepted: below it a single character could outgrow a chunk.
pub const MIN_MAX_TOKENS: usize = 16;

/// How a knowledge base cuts its documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkConfig {
    /// The most tokens in a chunk, overlap included (special tokens excluded).
    pub max_tokens: usize,
    /// The most tokens carried from the end of one chunk into the next.
    pub overlap_tokens: usize,
    /// The most tokens in a parent chunk.
    pub parent_max_tokens: usize,
    /// Never let a chunk span two sections of the document.
    pub respect_headings: bool,
}

impl Default for ChunkConfig {
    /// Sized for all-MiniLM-L6-v2: 256 tokens a sequence, less its two special tokens and a
    /// margin.
    fn default() -> Self {
        ChunkConfig { max_tokens: 240, overlap_tokens: 32, parent_max_tokens: 1024, respect_headings: true }
    }
}

impl ChunkConfig {
    /// Checks the settings against each other; the error names the bad field.
    pub fn validate(&self) -> Result<(), ChunkError> {
        let invalid = |field, reason: String| Err(ChunkError::InvalidConfig { field, reason });
        if self.max_tokens < MIN_MAX_TOKENS {
            return invalid("max_tokens", format!("{} is below the minimum of {MIN_MAX_TOKENS}", self.max_tokens));
        }
        if self.overlap_tokens > self.max_tokens / 2 {
            return invalid(
                "overlap_tokens",
                format!(
                    "{} is more than half of max_tokens ({}): use at most {}",
                    self.overlap_tokens,
                    self.max_tokens,
                    self.max_tokens / 2
                ),
            );
        }
        if self.parent_max_tokens < self.max_tokens {
            return invalid(
                "parent_max_tokens",
                format!(
                    "{} is below max_tokens ({}): a parent must hold a chunk",
                    self.parent_max_tokens, self.max_tokens
                ),
            );
        }
        Ok(())
    }
}

/// Where a chunk or parent sits in the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLocation {
    /// The first page the text is on, and the last.
    pub page_start: u32,
    pub page_end: u32,
    /// The headings of the block where the chunk's own text starts, outermost first.
    pub heading_path: Vec<String>,
    /// The chunk's own text (overlap excluded) in the document text, in bytes and in
    /// characters, end exclusive.
    pub start_byte: usize,
    pub end_byte: usize,
    pub start_char: usize,
    pub end_char: usize,
}

/// A chunk to embed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Its index in [`Chunks::chunks`]: document order, the same on every run.
    pub ordinal: usize,
    /// The index of its parent in [`Chunks::parents`].
    pub parent: usize,
    /// The document text from `text_start_byte` to `location.end_byte`: the overlap carried
    /// from the chunk before, then the chunk's own text.
    pub text: String,
    /// Where `text` starts; equal to `location.start_byte` when nothing is carried.
    pub text_start_byte: usize,
    /// Tokens in `text`, counted by the counter chunking was given.
    pub token_count: usize,
    pub location: ChunkLocation,
}

/// A parent chunk: the context returned with the chunks found inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentChunk {
    /// Its index in [`Chunks::parents`].
    pub ordinal: usize,
    pub text: String,
    pub token_count: usize,
    pub location: ChunkLocation,
}

/// A document's chunks and their parents, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunks {
    pub parents: Vec<ParentChunk>,
    pub chunks: Vec<Chunk>,
}

/// Cuts a parsed document into parents and chunks (see the module's rules).
pub fn chunk_document(
    document: &ParsedDocument,
    config: &ChunkConfig,
    counter: &dyn TokenCounter,
) -> Result<Chunks, ChunkError> {
    config.validate()?;
    let text = document.text();
    let layout = Layout::new(document);
    let mut spans = Vec::new();
    for section in sections(document, config.respect_headings) {
        let segments = &layout.block_spans[section];
        for parent in pack::pack(&text, segments, config.parent_max_tokens, 0, counter) {
            let child_segments: Vec<Range<usize>> =
                segments.iter().filter_map(|segment| intersect(segment, &parent.span)).collect();
            let children = pack::pack(&text, &child_segments, config.max_tokens, config.overlap_tokens, counter);
            spans.push((parent, children));
        }
    }
    let chars = CharOffsets::new(&text, &spans);
    let mut chunks = Chunks::default();
    for (parent_ordinal, (parent, children)) in spans.into_iter().enumerate() {
        chunks.parents.push(ParentChunk {
            ordinal: parent_ordinal,
            text: text[parent.span.clone()].to_owned(),
            token_count: parent.tokens,
            location: layout.locate(document, parent.span.start, &parent.span, &chars),
        });
        for child in children {
            chunks.chunks.push(Chunk {
                ordinal: chunks.chunks.len(),
                parent: parent_ordinal,
                text: text[child.text_start..child.span.end].to_owned(),
                text_start_byte: child.text_start,
                token_count: child.tokens,
                location: layout.locate(document, child.text_start, &child.span, &chars),
            });
        }
    }
    Ok(chunks)
}

/// Runs of blocks that chunks may not cross, as ranges of block indices.
fn sections(document: &ParsedDocument, respect_headings: bool) -> Vec<Range<usize>> {
    let count = document.blocks.len();
    if !respect_headings {
        return std::iter::once(0..count).filter(|section| !section.is_empty()).collect();
    }
    let mut sections = Vec::new();
    let mut start = 0;
    for index in 1..count {
        let block = &document.blocks[index];
        if matches!(block.kind, BlockKind::Heading { .. })
            || block.heading_path != document.blocks[index - 1].heading_path
        {
            sections.push(start..index);
            start = index;
        }
    }
    if start < count {
        sections.push(start..count);
    }
    sections
}

fn intersect(left: &Range<usize>, right: &Range<usize>) -> Option<Range<usize>> {
    let range = left.start.max(right.start)..left.end.min(right.end);
    (range.start < range.end).then_some(range)
}

/// Where each block's text lies in the document text.
struct Layout {
    block_spans: Vec<Range<usize>>,
}

impl Layout {
    fn new(document: &ParsedDocument) -> Self {
        let mut block_spans = Vec::with_capacity(document.blocks.len());
        let mut offset = 0;
        for (index, block) in document.blocks.iter().enumerate() {
            if index > 0 {
                offset += BLOCK_SEPARATOR.len();
            }
            block_spans.push(offset..offset + block.text.len());
            offset += block.text.len();
        }
        Layout { block_spans }
    }

    /// The index of the block holding byte `offset` (or the next block, for a separator).
    fn block_at(&self, offset: usize) -> usize {
        self.block_spans.partition_point(|span| span.end <= offset).min(self.block_spans.len().saturating_sub(1))
    }

    fn locate(
        &self,
        document: &ParsedDocument,
        text_start: usize,
        span: &Range<usize>,
        chars: &CharOffsets,
    ) -> ChunkLocation {
        let first = &document.blocks[self.block_at(text_start)];
        let last = &document.blocks[self.block_at(span.end.saturating_sub(1))];
        let own_first = &document.blocks[self.block_at(span.start)];
        ChunkLocation {
            page_start: first.page.min(last.page),
            page_end: first.page.max(last.page),
            heading_path: own_first.heading_path.clone(),
            start_byte: span.start,
            end_byte: span.end,
            start_char: chars.at(span.start),
            end_char: chars.at(span.end),
        }
    }
}

/// Byte offsets to character offsets, for the offsets chunking produced, in one pass.
struct CharOffsets {
    by_byte: Vec<(usize, usize)>,
}

impl CharOffsets {
    fn new(text: &str, spans: &[(pack::Packed, Vec<pack::Packed>)]) -> Self {
        let mut bytes: Vec<usize> = spans
            .iter()
            .flat_map(|(parent, children)| std::iter::once(parent).chain(children))
            .flat_map(|packed| [packed.span.start, packed.span.end])
            .collect();
        bytes.sort_unstable();
        bytes.dedup();
        let mut by_byte = Vec::with_capacity(bytes.len());
        let (mut byte, mut char_count) = (0, 0);
        for offset in bytes {
            char_count += text[byte..offset].chars().count();
            byte = offset;
            by_byte.push((offset, char_count));
        }
        CharOffsets { by_byte }
    }

    fn at(&self, byte: usize) -> usize {
        self.by_byte.binary_search_by_key(&byte, |(offset, _)| *offset).map_or(0, |index| self.by_byte[index].1)
    }
}
