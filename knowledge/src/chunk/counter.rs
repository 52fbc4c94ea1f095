//! How chunking counts tokens: the embedding model's tokenizer in production, simpler
//! counters in tests.

/// Counts the tokens of a text as the embedding model will see it, without special tokens.
/// Chunking asks only for counts, so any tokenizer fits; it checks every chunk with a real
/// count, so a counter need not be additive over concatenation.
pub trait TokenCounter {
    fn count(&self, text: &str) -> usize;
}

impl<T: TokenCounter + ?Sized> TokenCounter for &T {
    fn count(&self, text: &str) -> usize {
        (**self).count(text)
    }
}

/// One token per character. A WordPiece tokenizer (BERT's, all-MiniLM-L6-v2's) never counts
/// more, since each of its tokens covers at least one character; a byte-level BPE can (it may
/// spend several tokens on one CJK character).
#[derive(Debug, Clone, Copy, Default)]
pub struct CharCounter;

impl TokenCounter for CharCounter {
    fn count(&self, text: &str) -> usize {
        text.chars().count()
    }
}

/// The model's own tokenizer (`tokenizer.json`), with its truncation and padding turned off so
/// that counts are whole. Special tokens are not counted: leave room for them in `max_tokens`
/// (all-MiniLM-L6-v2 adds two). A text the tokenizer fails on counts as its length in bytes,
/// an upper bound for every tokenizer that maps each token to at least one byte.
#[derive(Debug, Clone)]
pub struct TokenizerCounter {
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerCounter {
    pub fn new(mut tokenizer: tokenizers::Tokenizer) -> Self {
        // Turning truncation off cannot fail: only new truncation parameters are checked.
        let _ = tokenizer.with_truncation(None);
        tokenizer.with_padding(None);
        TokenizerCounter { tokenizer }
    }
}

impl TokenizerCounter {
    /// A counter from a `tokenizer.json` text (as an embedding replica hands it out).
    pub fn from_json(json: &str) -> Result<Self, String> {
        json.parse::<tokenizers::Tokenizer>()
            .map(TokenizerCounter::new)
            .map_err(|e| format!("not a usable tokenizer.json: {e}"))
    }
}

impl From<tokenizers::Tokenizer> for TokenizerCounter {
    fn from(tokenizer: tokenizers::Tokenizer) -> Self {
        TokenizerCounter::new(tokenizer)
    }
}

impl TokenCounter for TokenizerCounter {
    fn count(&self, text: &str) -> usize {
        self.tokenizer.encode_fast(text, false).map_or(text.len(), |encoding| encoding.len())
    }
}

/// A tokenizer as loaded, whatever its truncation and padding (all-MiniLM-L6-v2's
/// `tokenizer.json` truncates and pads to 128). Padding is not counted; where the count
/// reaches the truncation length, the text is counted again by an untruncated copy of the
/// tokenizer, which is slow: prefer [`TokenizerCounter`] for many counts.
impl TokenCounter for tokenizers::Tokenizer {
    fn count(&self, text: &str) -> usize {
        let Ok(encoding) = self.encode_fast(text, false) else { return text.len() };
        let tokens = encoding.get_attention_mask().iter().filter(|mask| **mask != 0).count();
        if self.get_truncation().is_some_and(|truncation| tokens >= truncation.max_length) {
            return TokenizerCounter::new(self.clone()).count(text);
        }
        tokens
    }
}
