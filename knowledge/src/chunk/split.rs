//! Cutting text into units that fit a token budget: whole segments where they fit, else
//! sentences, else pieces cut at token boundaries. Every unit is a byte span of the document
//! text with no whitespace at either end.

use std::ops::Range;

use super::TokenCounter;

/// A span of the document text and its token count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Unit {
    pub(super) span: Range<usize>,
    pub(super) tokens: usize,
}

/// Ends a sentence wherever it stands (Chinese and Japanese full-width punctuation).
fn ends_sentence_anywhere(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '；' | '…')
}

/// Ends a sentence when whitespace (or the end) follows: `3.14` and `e.g.x` stay whole.
fn ends_sentence_before_space(c: char) -> bool {
    matches!(c, '.' | '!' | '?')
}

/// Closing quotes and brackets that belong to the sentence they follow.
fn closes_sentence(c: char) -> bool {
    matches!(c, '"' | '\'' | ')' | ']' | '”' | '’' | '」' | '』' | '）' | '】' | '》')
}

/// `span` trimmed of whitespace at both ends; `None` if nothing is left.
pub(super) fn trim(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let slice = &text[span.clone()];
    let start = span.start + (slice.len() - slice.trim_start().len());
    let end = span.end - (slice.len() - slice.trim_end().len());
    (start < end).then_some(start..end)
}

/// The sentences of a span: cut after sentence-ending punctuation (with any closing quotes
/// after it) and at line breaks; each trimmed, none empty.
pub(super) fn sentences(text: &str, span: Range<usize>) -> Vec<Range<usize>> {
    let mut sentences = Vec::new();
    let mut start = span.start;
    let mut chars = text[span.clone()].char_indices().map(|(offset, c)| (span.start + offset, c)).peekable();
    while let Some((at, c)) = chars.next() {
        let end = if c == '\n' {
            Some(at)
        } else if ends_sentence_anywhere(c) || ends_sentence_before_space(c) {
            let mut end = at + c.len_utf8();
            while let Some(&(next_at, next)) = chars.peek() {
                if closes_sentence(next) || ends_sentence_anywhere(next) || ends_sentence_before_space(next) {
                    end = next_at + next.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let followed_by_space = chars.peek().is_none_or(|(_, next)| next.is_whitespace());
            (ends_sentence_anywhere(c) || followed_by_space).then_some(end)
        } else {
            None
        };
        if let Some(end) = end {
            sentences.extend(trim(text, start..end));
            start = end;
        }
    }
    sentences.extend(trim(text, start..span.end));
    sentences
}

/// The longest prefix of `span` that fits `limit`, cut at the last whitespace in it where
/// that keeps more than half of it, else at the last character boundary that fits. Always at
/// least one character, so cutting makes progress.
fn fitting_prefix_end(text: &str, span: &Range<usize>, limit: usize, counter: &dyn TokenCounter) -> usize {
    let slice = &text[span.clone()];
    let boundary = |offset: usize| {
        let mut offset = offset.min(slice.len());
        while !slice.is_char_boundary(offset) {
            offset += 1;
        }
        offset
    };
    let first_char_end = slice.chars().next().map_or(slice.len(), char::len_utf8);
    let fits = |end: usize| counter.count(&slice[..end]) <= limit;
    // Grow a window until it no longer fits, then search between the last fit and it.
    let mut low = first_char_end;
    let mut high = boundary(limit.saturating_mul(4).max(first_char_end));
    while high < slice.len() && fits(high) {
        low = high;
        high = boundary(high.saturating_mul(2));
    }
    if high >= slice.len() && fits(slice.len()) {
        return span.end;
    }
    // Invariant: `low` fits (or is the first character), `high` does not.
    while high - low > 1 {
        let middle = boundary(low + (high - low) / 2);
        if middle >= high {
            break;
        }
        if fits(middle) {
            low = middle;
        } else {
            high = middle;
        }
    }
    match slice[..low].rfind(char::is_whitespace) {
        Some(space) if space > low / 2 && fits(space) => span.start + space,
        _ => span.start + low,
    }
}

/// The start of the longest suffix of `span` that fits `limit`, moved to just after a
/// whitespace where that keeps more than half of it; `None` if not even the last character
/// fits.
pub(super) fn fitting_suffix_start(
    text: &str,
    span: &Range<usize>,
    limit: usize,
    counter: &dyn TokenCounter,
) -> Option<usize> {
    let slice = &text[span.clone()];
    let fits = |start: usize| counter.count(&slice[start..]) <= limit;
    let boundary = |offset: usize| {
        let mut offset = offset.min(slice.len());
        while !slice.is_char_boundary(offset) {
            offset += 1;
        }
        offset
    };
    let last_char_start = slice.char_indices().next_back().map_or(0, |(offset, _)| offset);
    if !fits(last_char_start) {
        return None;
    }
    // Invariant: `high` fits, `low` does not (or is the start of the span).
    let (mut low, mut high) = (0, last_char_start);
    if fits(0) {
        return Some(span.start);
    }
    while high - low > 1 {
        let middle = boundary(low + (high - low) / 2);
        if middle >= high {
            break;
        }
        if fits(middle) {
            high = middle;
        } else {
            low = middle;
        }
    }
    let kept = slice.len() - high;
    match slice[high..].find(char::is_whitespace) {
        Some(space) if slice.len() - (high + space) > kept / 2 => {
            let after = slice[high + space..].trim_start();
            Some(span.start + slice.len() - after.len())
        }
        _ => Some(span.start + high),
    }
}

/// Pieces of a span that fit `limit`, cut at token boundaries (see [`fitting_prefix_end`]).
fn token_pieces(text: &str, span: Range<usize>, limit: usize, counter: &dyn TokenCounter) -> Vec<Unit> {
    let mut pieces = Vec::new();
    let mut rest = Some(span);
    while let Some(span) = rest.take() {
        let tokens = counter.count(&text[span.clone()]);
        if tokens <= limit {
            pieces.push(Unit { span, tokens });
            break;
        }
        let end = fitting_prefix_end(text, &span, limit, counter);
        if let Some(piece) = trim(text, span.start..end) {
            let tokens = counter.count(&text[piece.clone()]);
            pieces.push(Unit { span: piece, tokens });
        }
        rest = trim(text, end..span.end);
    }
    pieces
}

/// The units of a segment for a budget of `limit` tokens.
pub(super) fn units(text: &str, segment: Range<usize>, limit: usize, counter: &dyn TokenCounter) -> Vec<Unit> {
    let Some(segment) = trim(text, segment) else { return Vec::new() };
    let tokens = counter.count(&text[segment.clone()]);
    if tokens <= limit {
        return vec![Unit { span: segment, tokens }];
    }
    let mut units = Vec::new();
    for sentence in sentences(text, segment) {
        let tokens = counter.count(&text[sentence.clone()]);
        if tokens <= limit {
            units.push(Unit { span: sentence, tokens });
        } else {
            units.extend(token_pieces(text, sentence, limit, counter));
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::super::CharCounter;
    use super::*;

    fn sentence_texts(text: &str) -> Vec<&str> {
        sentences(text, 0..text.len()).into_iter().map(|span| &text[span]).collect()
    }

    #[test]
    fn sentences_end_at_english_and_chinese_punctuation_and_newlines() {
        let table: [(&str, &[&str]); 5] = [
            ("One. Two! Three? Four", &["One.", "Two!", "Three?", "Four"]),
            ("Pi is 3.14 today. Yes.", &["Pi is 3.14 today.", "Yes."]),
            ("第一句。第二句！第三句？第四；五", &["第一句。", "第二句！", "第三句？", "第四；", "五"]),
            ("He said \"stop.\" Then left.", &["He said \"stop.\"", "Then left."]),
            ("line one\nline two\n\n", &["line one", "line two"]),
        ];
        for (text, expected) in table {
            assert_eq!(sentence_texts(text), expected, "{text}");
        }
    }

    #[test]
    fn an_unbreakable_run_is_cut_at_token_boundaries_preferring_spaces() {
        let text = "aaaa bbbb cccc dddd";
        let pieces = token_pieces(text, 0..text.len(), 10, &CharCounter);
        let texts: Vec<&str> = pieces.iter().map(|unit| &text[unit.span.clone()]).collect();
        assert_eq!(texts, ["aaaa bbbb", "cccc dddd"]);
        let cjk = "一二三四五六七八九十";
        let pieces = token_pieces(cjk, 0..cjk.len(), 4, &CharCounter);
        let texts: Vec<&str> = pieces.iter().map(|unit| &cjk[unit.span.clone()]).collect();
        assert_eq!(texts, ["一二三四", "五六七八", "九十"]);
    }
}
