//! The analyzer that turns mixed Chinese and English text into index terms, the same way
//! for documents and for queries.
//!
//! Text is split into runs of three kinds: Han ideographs, other letters and digits, and
//! everything else (spaces, punctuation, symbols), which only separates. A Han run is
//! segmented by jieba in search mode, which emits a long word's shorter dictionary words as
//! well (`知识库` gives `知识` and `知识库`), so a query for either finds it. Any other run is
//! one word, lowercased. There is no stemming: jieba's words are not stemmed either, and
//! an exact-word index keeps the analyzer one rule for every script; BM25's IDF already
//! discounts common words, so there is no stop-word list.

use std::sync::LazyLock;

use jieba_rs::Jieba;
use tantivy::tokenizer::{Token, TokenStream, Tokenizer};

/// The name the analyzer is registered under in the index's schema. A change to what it
/// emits needs a new name and a new [`super::FORMAT_VERSION`]: terms written by the old
/// rules would no longer match queries analysed by the new ones.
pub const ANALYZER_NAME: &str = "maas_mixed_v1";

/// Words longer than this many bytes (hashes, base64, URLs run together) are dropped: they
/// are rarely searched for and would bloat the term dictionary.
pub const MAX_TOKEN_BYTES: usize = 64;

/// jieba's built-in dictionary, loaded once per process (it takes a few hundred
/// milliseconds) and shared: segmentation only reads it.
pub(crate) static JIEBA: LazyLock<Jieba> = LazyLock::new(Jieba::new);

/// The terms `text` is indexed under, or searched for, in order (with repeats).
pub fn analyze(text: &str) -> Vec<String> {
    tokens(text).into_iter().map(|token| token.text).collect()
}

/// The analyzer as a tantivy tokenizer.
#[derive(Debug, Clone, Copy, Default)]
pub struct MixedTokenizer;

impl Tokenizer for MixedTokenizer {
    type TokenStream<'a> = MixedTokenStream;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> MixedTokenStream {
        MixedTokenStream { tokens: tokens(text).into_iter(), current: Token::default() }
    }
}

/// The tokens of one text, segmented up front.
#[derive(Debug)]
pub struct MixedTokenStream {
    tokens: std::vec::IntoIter<Token>,
    current: Token,
}

impl TokenStream for MixedTokenStream {
    fn advance(&mut self) -> bool {
        match self.tokens.next() {
            Some(token) => {
                self.current = token;
                true
            }
            None => false,
        }
    }

    fn token(&self) -> &Token {
        &self.current
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.current
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    Han,
    Word,
    Separator,
}

fn run_kind(c: char) -> RunKind {
    if is_han(c) {
        RunKind::Han
    } else if c.is_alphanumeric() {
        RunKind::Word
    } else {
        RunKind::Separator
    }
}

/// Whether `c` is a Han ideograph (the CJK Unified Ideographs blocks, their extensions and
/// the compatibility ideographs), the characters jieba segments.
pub fn is_han(c: char) -> bool {
    matches!(
        c,
        '\u{3007}'
            | '\u{3400}'..='\u{4DBF}'
            | '\u{4E00}'..='\u{9FFF}'
            | '\u{F900}'..='\u{FAFF}'
            | '\u{20000}'..='\u{2FA1F}'
            | '\u{30000}'..='\u{323AF}'
    )
}

fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut push = |word: String, offset_from: usize, offset_to: usize| {
        if !word.is_empty() && word.len() <= MAX_TOKEN_BYTES {
            let position = out.len();
            out.push(Token { offset_from, offset_to, position, text: word, position_length: 1 });
        }
    };
    for (kind, start, end) in runs(text) {
        let run = &text[start..end];
        match kind {
            RunKind::Han => {
                for word in JIEBA.cut_for_search(run, true) {
                    push(word.word.to_owned(), start + word.byte_start, start + word.byte_end);
                }
            }
            RunKind::Word => push(run.to_lowercase(), start, end),
            RunKind::Separator => {}
        }
    }
    out
}

/// The maximal runs of one kind, as byte ranges `(kind, start, end)`.
fn runs(text: &str) -> Vec<(RunKind, usize, usize)> {
    let mut runs: Vec<(RunKind, usize, usize)> = Vec::new();
    for (at, c) in text.char_indices() {
        let kind = run_kind(c);
        let end = at + c.len_utf8();
        match runs.last_mut() {
            Some(last) if last.0 == kind => last.2 = end,
            _ => runs.push((kind, at, end)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin_text_is_split_on_non_alphanumerics_and_lowercased() {
        let cases: &[(&str, &[&str])] = &[
            ("Hello, World!", &["hello", "world"]),
            ("C++ (draft) AND \"unbalanced", &["c", "draft", "and", "unbalanced"]),
            ("GPT-4o vs. llama_3", &["gpt", "4o", "vs", "llama", "3"]),
            ("ÉCOLE Straße", &["école", "straße"]),
            ("", &[]),
            ("  ,.;!? ", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(analyze(text), *expected, "analyzing {text:?}");
        }
    }

    #[test]
    fn han_runs_are_segmented_into_words() {
        let terms = analyze("机器学习");
        assert!(terms.contains(&"机器".to_owned()), "{terms:?}");
        assert!(terms.contains(&"学习".to_owned()), "{terms:?}");
        assert!(!terms.contains(&"机".to_owned()), "jieba keeps 机器 whole: {terms:?}");
    }

    #[test]
    fn mixed_text_splits_at_script_boundaries() {
        let terms = analyze("用PyTorch训练BERT模型，准确率99%");
        for expected in ["pytorch", "bert", "训练", "模型", "99"] {
            assert!(terms.contains(&expected.to_owned()), "{expected} missing from {terms:?}");
        }
        assert!(terms.iter().all(|t| !t.contains(['，', '%', ' '])), "{terms:?}");
    }

    #[test]
    fn overlong_words_are_dropped() {
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(analyze(&format!("short {long} word")), ["short", "word"]);
    }

    #[test]
    fn token_offsets_point_at_the_words() {
        let text = "Vector检索 works";
        for token in tokens(text) {
            let slice = &text[token.offset_from..token.offset_to];
            assert_eq!(slice.to_lowercase(), token.text);
        }
    }
}
