//! Chunking through the crate's public API: the rules on hand-made documents, the invariants
//! as properties over random documents and settings, and the real all-MiniLM-L6-v2 tokenizer.

use std::path::PathBuf;

use maas_knowledge::chunk::{
    CharCounter, ChunkConfig, ChunkError, Chunks, TokenCounter, TokenizerCounter, chunk_document,
};
use maas_knowledge::parse::{BLOCK_SEPARATOR, Block, BlockKind, DocumentKind, ParsedDocument};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// One token per run of letters or digits, per CJK character and per other symbol.
#[derive(Debug, Clone, Copy)]
struct WordCounter;

fn is_cjk(c: char) -> bool {
    matches!(u32::from(c), 0x3000..=0x303F | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xFF00..=0xFFEF)
}

impl TokenCounter for WordCounter {
    fn count(&self, text: &str) -> usize {
        let mut tokens = 0;
        let mut in_word = false;
        for c in text.chars() {
            if c.is_alphanumeric() && !is_cjk(c) {
                if !in_word {
                    tokens += 1;
                }
                in_word = true;
            } else {
                in_word = false;
                if !c.is_whitespace() {
                    tokens += 1;
                }
            }
        }
        tokens
    }
}

/// A document from `(heading level or 0 for a paragraph, text, page)`, with heading paths as
/// the parsers give them.
fn document(blocks: &[(u8, &str, u32)]) -> ParsedDocument {
    let mut open: Vec<(u8, String)> = Vec::new();
    let blocks = blocks
        .iter()
        .map(|&(level, text, page)| {
            let kind = if level == 0 { BlockKind::Paragraph } else { BlockKind::Heading { level } };
            if level > 0 {
                while open.last().is_some_and(|(open_level, _)| *open_level >= level) {
                    open.pop();
                }
                open.push((level, text.to_owned()));
            }
            Block {
                kind,
                text: text.to_owned(),
                page,
                heading_path: open.iter().map(|(_, heading)| heading.clone()).collect(),
            }
        })
        .collect();
    ParsedDocument { kind: DocumentKind::Markdown, title: None, page_count: 1, blocks }
}

fn config(max_tokens: usize, overlap_tokens: usize, parent_max_tokens: usize) -> ChunkConfig {
    ChunkConfig { max_tokens, overlap_tokens, parent_max_tokens, respect_headings: true }
}

fn texts(chunks: &Chunks) -> Vec<&str> {
    chunks.chunks.iter().map(|chunk| chunk.text.as_str()).collect()
}

/// The index of the block holding a byte of the document text.
fn block_at(spans: &[(usize, usize)], offset: usize) -> usize {
    spans.iter().position(|(_, end)| *end > offset).unwrap_or(spans.len() - 1)
}

fn block_spans(document: &ParsedDocument) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut offset = 0;
    for block in &document.blocks {
        spans.push((offset, offset + block.text.len()));
        offset += block.text.len() + BLOCK_SEPARATOR.len();
    }
    spans
}

fn only_whitespace(text: &str) -> bool {
    text.chars().all(char::is_whitespace)
}

/// Every invariant of the module documentation, checked from the outside.
#[allow(clippy::too_many_lines, reason = "one invariant after another, each a few lines")]
fn check_invariants(document: &ParsedDocument, config: &ChunkConfig, chunks: &Chunks, counter: &dyn TokenCounter) {
    let text = document.text();
    let spans = block_spans(document);
    // Parents: within budget, in order, covering the text but for whitespace.
    let mut previous_end = 0;
    for (index, parent) in chunks.parents.iter().enumerate() {
        let location = &parent.location;
        assert_eq!(parent.ordinal, index);
        assert_eq!(parent.text, text[location.start_byte..location.end_byte]);
        assert_eq!(parent.token_count, counter.count(&parent.text));
        assert!(parent.token_count <= config.parent_max_tokens, "parent over budget: {parent:?}");
        assert!(only_whitespace(&text[previous_end..location.start_byte]), "text lost before parent {index}");
        previous_end = location.end_byte;
        assert!(chunks.chunks.iter().any(|chunk| chunk.parent == index), "parent {index} has no child");
    }
    assert!(only_whitespace(&text[previous_end..]), "text lost after the last parent");
    // Chunks: within budget, in order, covering the text but for whitespace, inside parents.
    let mut previous_end = 0;
    for (index, chunk) in chunks.chunks.iter().enumerate() {
        let location = &chunk.location;
        assert_eq!(chunk.ordinal, index);
        assert_eq!(chunk.text, text[chunk.text_start_byte..location.end_byte]);
        assert!(!chunk.text.is_empty() && chunk.text.trim() == chunk.text, "untrimmed chunk {chunk:?}");
        assert_eq!(chunk.token_count, counter.count(&chunk.text));
        assert!(chunk.token_count <= config.max_tokens, "chunk over budget: {} tokens in {chunk:?}", chunk.token_count);
        assert!(chunk.text_start_byte <= location.start_byte && location.start_byte < location.end_byte);
        assert!(only_whitespace(&text[previous_end..location.start_byte]), "text lost before chunk {index}");
        assert!(location.start_byte >= previous_end, "chunk {index} overlaps the one before in its own text");
        previous_end = location.end_byte;
        assert_eq!(location.start_char, text[..location.start_byte].chars().count());
        assert_eq!(location.end_char, text[..location.end_byte].chars().count());
        let parent = &chunks.parents[chunk.parent].location;
        assert!(
            parent.start_byte <= chunk.text_start_byte && location.end_byte <= parent.end_byte,
            "chunk {index} outside its parent"
        );
        // Overlap: only from the chunk before in the same parent, and within its budget.
        if chunk.text_start_byte < location.start_byte {
            let before = &chunks.chunks[index - 1];
            assert_eq!(before.parent, chunk.parent, "overlap across parents");
            assert!(chunk.text_start_byte >= before.location.start_byte);
            let carried = counter.count(&text[chunk.text_start_byte..before.location.end_byte]);
            assert!(carried <= config.overlap_tokens, "overlap of {carried} tokens in {chunk:?}");
        }
        // Pages and headings from the blocks the chunk spans.
        let first_block = block_at(&spans, chunk.text_start_byte);
        let last_block = block_at(&spans, location.end_byte - 1);
        let pages = document.blocks[first_block..=last_block].iter().map(|block| block.page);
        assert_eq!(location.page_start, pages.clone().min().unwrap_or(1));
        assert_eq!(location.page_end, pages.max().unwrap_or(1));
        assert_eq!(location.heading_path, document.blocks[block_at(&spans, location.start_byte)].heading_path);
        if config.respect_headings {
            let spanned = &document.blocks[first_block..=last_block];
            assert!(
                spanned.iter().all(|block| block.heading_path == spanned[0].heading_path),
                "chunk {index} crosses a heading"
            );
            assert!(spanned.iter().skip(1).all(|block| !matches!(block.kind, BlockKind::Heading { .. })));
        }
    }
    assert!(only_whitespace(&text[previous_end..]), "text lost after the last chunk");
}

fn chunk_checked(document: &ParsedDocument, config: &ChunkConfig, counter: &dyn TokenCounter) -> Chunks {
    let chunks = chunk_document(document, config, counter).expect("valid config");
    check_invariants(document, config, &chunks, counter);
    assert_eq!(chunk_document(document, config, counter).expect("valid config"), chunks, "not deterministic");
    chunks
}

#[test]
fn config_validation_names_the_bad_field() {
    let table = [
        (config(8, 0, 64), "max_tokens"),
        (config(64, 33, 128), "overlap_tokens"),
        (config(64, 16, 32), "parent_max_tokens"),
    ];
    for (config, field) in table {
        let error = config.validate().unwrap_err();
        assert!(matches!(error, ChunkError::InvalidConfig { field: bad, .. } if bad == field), "{error:?}");
        assert!(error.to_string().contains(field), "{error}");
        let refused = chunk_document(&document(&[(0, "text", 1)]), &config, &CharCounter);
        assert_eq!(refused, Err(error));
    }
    ChunkConfig::default().validate().expect("the default is valid");
    assert_eq!(config(16, 8, 16).validate(), Ok(()));
}

#[test]
fn whole_blocks_are_packed_and_headings_are_not_crossed() {
    let document = document(&[
        (1, "Install", 1),
        (0, "One two three.", 1),
        (0, "Four five.", 1),
        (2, "On Linux", 2),
        (0, "Six seven eight nine.", 2),
        (0, "Ten.", 3),
    ]);
    let chunks = chunk_checked(&document, &config(16, 0, 64), &WordCounter);
    assert_eq!(
        texts(&chunks),
        ["Install\n\nOne two three.\n\nFour five.", "On Linux\n\nSix seven eight nine.\n\nTen."]
    );
    assert_eq!(chunks.chunks[1].location.heading_path, ["Install", "On Linux"]);
    assert_eq!((chunks.chunks[1].location.page_start, chunks.chunks[1].location.page_end), (2, 3));
    assert_eq!(chunks.parents.len(), 2);
    // Without heading boundaries the same text packs differently: across the heading.
    let across = chunk_checked(&document, &ChunkConfig { respect_headings: false, ..config(16, 0, 64) }, &WordCounter);
    assert_eq!(
        texts(&across),
        ["Install\n\nOne two three.\n\nFour five.\n\nOn Linux\n\nSix seven eight nine.", "Ten."]
    );
}

#[test]
fn oversized_paragraphs_split_at_english_and_chinese_sentence_ends() {
    let english = "The first sentence is here. The second one follows! Is this the third? Yes it is.";
    let chinese = "这是第一句话。这是第二句话！这是第三句吗？是的；最后一句。";
    let document = document(&[(0, english, 1), (0, chinese, 1)]);
    let chunks = chunk_checked(&document, &config(16, 0, 200), &CharCounter);
    assert!(texts(&chunks).iter().all(|text| text.chars().count() <= 16));
    // Sentences pack up to the budget, across paragraphs of one section.
    let words = chunk_checked(&document, &config(16, 0, 200), &WordCounter);
    assert_eq!(
        texts(&words),
        [
            "The first sentence is here. The second one follows! Is this the third?",
            "Yes it is.\n\n这是第一句话。",
            "这是第二句话！这是第三句吗？",
            "是的；最后一句。",
        ]
    );
}

#[test]
fn text_without_sentence_ends_is_cut_at_token_boundaries() {
    let unbroken = "数据".repeat(40);
    let words = "word ".repeat(50);
    let document = document(&[(0, &unbroken, 1), (0, words.trim(), 1)]);
    let chunks = chunk_checked(&document, &config(16, 4, 64), &CharCounter);
    assert!(chunks.chunks.len() > 10);
    for chunk in &chunks.chunks {
        assert!(!chunk.text.ends_with("wor"), "cut inside a word: {:?}", chunk.text);
    }
}

#[test]
fn overlap_carries_whole_sentences_of_the_chunk_before() {
    let paragraph = "Alpha beta gamma. Delta epsilon. Zeta eta theta. Iota kappa. Lambda mu nu. Xi omicron.";
    let document = document(&[(0, paragraph, 1)]);
    // Sentences of 4, 3, 4, 3, 4 and 3 tokens: the second chunk carries the last two
    // sentences of the first (7 tokens; three would be 10, over the overlap of 8).
    let chunks = chunk_checked(&document, &config(16, 8, 64), &WordCounter);
    assert_eq!(
        texts(&chunks),
        [
            "Alpha beta gamma. Delta epsilon. Zeta eta theta. Iota kappa.",
            "Zeta eta theta. Iota kappa. Lambda mu nu. Xi omicron.",
        ]
    );
    let second = &chunks.chunks[1];
    assert_eq!(&paragraph[second.location.start_byte..second.location.end_byte], "Lambda mu nu. Xi omicron.");
    // With no overlap the second chunk is only its own text.
    let plain = chunk_checked(&document, &config(16, 0, 64), &WordCounter);
    assert_eq!(texts(&plain)[1], "Lambda mu nu. Xi omicron.");
}

#[test]
fn children_carry_their_parent_and_overlap_stays_inside_it() {
    let blocks: Vec<String> =
        (0..12).map(|index| format!("Paragraph {index} has some words. And a second sentence.")).collect();
    let entries: Vec<(u8, &str, u32)> = blocks
        .iter()
        .enumerate()
        .map(|(index, text)| (0, text.as_str(), u32::try_from(index / 4 + 1).unwrap()))
        .collect();
    let document = document(&entries);
    let chunks = chunk_checked(&document, &config(20, 8, 60), &WordCounter);
    assert!(chunks.parents.len() >= 3, "{:?}", chunks.parents);
    assert!(chunks.chunks.len() > chunks.parents.len());
    let first_children: Vec<_> = chunks
        .chunks
        .iter()
        .enumerate()
        .filter(|(index, chunk)| *index == 0 || chunks.chunks[index - 1].parent != chunk.parent)
        .collect();
    for (_, chunk) in first_children {
        assert_eq!(chunk.text_start_byte, chunk.location.start_byte, "the first child of a parent carries nothing");
    }
}

#[test]
fn an_empty_document_has_no_chunks() {
    let empty = ParsedDocument { kind: DocumentKind::Text, title: None, page_count: 1, blocks: Vec::new() };
    assert_eq!(chunk_document(&empty, &ChunkConfig::default(), &CharCounter), Ok(Chunks::default()));
}

/// Random text: words, CJK, numbers with dots, sentence ends of both scripts, line breaks, and
/// now and then a long run with no break at all.
fn text_strategy() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        6 => prop::sample::select(vec!["alpha", "beta", "数据", "模型", "3.14", "e.g.", "x", "Tokenizer", "の", "한국"]).prop_map(str::to_owned),
        3 => prop::sample::select(vec![". ", "! ", "? ", "。", "！", "；", "\n", " ", ", "]).prop_map(str::to_owned),
        1 => (1..120_usize, prop::sample::select(vec!["a", "中", "-"])).prop_map(|(count, unit)| unit.repeat(count)),
    ];
    vec(piece, 1..60).prop_map(|pieces| {
        let mut text = String::new();
        for piece in pieces {
            if !text.is_empty() && !text.ends_with(char::is_whitespace) && piece.starts_with(char::is_alphanumeric) {
                text.push(' ');
            }
            text.push_str(&piece);
        }
        let trimmed = text.trim();
        if trimmed.is_empty() { "fallback".to_owned() } else { trimmed.to_owned() }
    })
}

fn document_strategy() -> impl Strategy<Value = ParsedDocument> {
    vec((prop_oneof![4 => Just(0_u8), 1 => 1..4_u8], text_strategy(), 0..2_u32), 1..14).prop_map(|entries| {
        let mut page = 1;
        let blocks: Vec<(u8, String, u32)> = entries
            .into_iter()
            .map(|(level, text, page_step)| {
                page += page_step;
                let text = if level > 0 { text.lines().next().unwrap_or("heading").trim().to_owned() } else { text };
                (level, if text.is_empty() { "heading".to_owned() } else { text }, page)
            })
            .collect();
        let borrowed: Vec<(u8, &str, u32)> =
            blocks.iter().map(|(level, text, page)| (*level, text.as_str(), *page)).collect();
        document(&borrowed)
    })
}

fn config_strategy() -> impl Strategy<Value = ChunkConfig> {
    (16..80_usize, 0..=100_usize, 1..5_usize, any::<bool>()).prop_map(
        |(max_tokens, overlap_percent, parent_factor, respect_headings)| ChunkConfig {
            max_tokens,
            overlap_tokens: max_tokens / 2 * overlap_percent / 100,
            parent_max_tokens: max_tokens * parent_factor,
            respect_headings,
        },
    )
}

proptest! {
    #![proptest_config(Config { cases: 300, failure_persistence: None, ..Config::default() })]

    #[test]
    fn chunking_keeps_its_invariants(document in document_strategy(), config in config_strategy(), by_chars in any::<bool>()) {
        let counter: &dyn TokenCounter = if by_chars { &CharCounter } else { &WordCounter };
        chunk_checked(&document, &config, counter);
    }
}

#[test]
fn chunks_fit_the_real_minilm_tokenizer() {
    let Some(dir) = std::env::var_os("MAAS_TEST_MINILM_DIR").map(PathBuf::from) else {
        panic!(
            "MAAS_TEST_MINILM_DIR is not set: run the tests through scripts/test, which fetches all-MiniLM-L6-v2 and sets it"
        );
    };
    let path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&path)
        .unwrap_or_else(|error| panic!("cannot load {}: {error}", path.display()));
    // The tokenizer file truncates at 128 and pads to 128; counting must see past both.
    let mut plain = tokenizer.clone();
    plain.with_truncation(None).expect("no truncation");
    plain.with_padding(None);
    let english = "Retrieval-augmented generation grounds answers in documents. ".repeat(12);
    let chinese = "知识库把文档切成小块，每一块都先嵌入再检索。检索到的块连同上下文一起交给模型。".repeat(8);
    let mixed = "The platform supports 中文 and English in one paragraph; tokenizers split them differently.".repeat(6);
    let document =
        document(&[(1, "Knowledge bases", 1), (0, &english, 1), (2, "中文", 2), (0, &chinese, 2), (0, &mixed, 3)]);
    let config = config(64, 16, 256);
    let counter = TokenizerCounter::new(tokenizer.clone());
    let chunks = chunk_checked(&document, &config, &counter);
    // The tokenizer as loaded counts the same, its truncation notwithstanding.
    assert_eq!(chunk_checked(&document, &config, &tokenizer), chunks);
    assert!(chunks.chunks.len() >= 8, "{} chunks", chunks.chunks.len());
    let mut over_128 = false;
    for parent in &chunks.parents {
        let tokens = plain.encode(parent.text.as_str(), false).expect("encode").len();
        assert_eq!(parent.token_count, tokens);
        over_128 |= tokens > 128;
    }
    assert!(over_128, "some parent should be longer than the tokenizer's own truncation");
    for chunk in &chunks.chunks {
        let tokens = plain.encode(chunk.text.as_str(), false).expect("encode").len();
        assert_eq!(chunk.token_count, tokens, "{:?}", chunk.text);
        assert!(tokens <= 64);
        // With [CLS] and [SEP] the model sees two more.
        assert_eq!(plain.encode(chunk.text.as_str(), true).expect("encode").len(), tokens + 2);
    }
    assert!(chunks.chunks.iter().any(|chunk| chunk.text.contains("知识库")));
}
