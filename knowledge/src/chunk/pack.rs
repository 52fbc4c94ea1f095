//! Greedy packing of units into chunks of at most `limit` tokens, each chunk measured with a
//! real count, and the overlap carried from one chunk into the next.

use std::ops::Range;

use super::TokenCounter;
use super::split::{self, Unit};

/// One packed chunk: its own span, and where its text starts (before its own span when it
/// carries an overlap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Packed {
    pub(super) text_start: usize,
    pub(super) span: Range<usize>,
    /// The tokens of `text[text_start..span.end]`.
    pub(super) tokens: usize,
}

/// Packs the segments' units, in order, into chunks of at most `limit` tokens; from the
/// second chunk on, each starts with up to `overlap_tokens` tokens of the one before, and
/// that overlap counts towards its limit.
pub(super) fn pack(
    text: &str,
    segments: &[Range<usize>],
    limit: usize,
    overlap_tokens: usize,
    counter: &dyn TokenCounter,
) -> Vec<Packed> {
    let units: Vec<Unit> =
        segments.iter().flat_map(|segment| split::units(text, segment.clone(), limit, counter)).collect();
    let mut packed: Vec<Packed> = Vec::new();
    let mut first = 0;
    while first < units.len() {
        let start = units[first].span.start;
        // The longest tail of the previous chunk that fits beside the first unit.
        let carried = match packed.last() {
            Some(previous) if overlap_tokens > 0 => {
                let gap = counter.count(&text[previous.span.end..start]);
                tails(text, &previous.span, overlap_tokens, counter)
                    .into_iter()
                    .find(|(_, tail_tokens)| tail_tokens + gap + units[first].tokens <= limit)
                    .map(|(tail_start, tail_tokens)| (tail_start, tail_tokens + gap))
            }
            _ => None,
        };
        let (mut text_start, carried_tokens) = carried.unwrap_or((start, 0));
        // Grow by estimate (the sum of the parts), then check the real count and give back
        // units (then the overlap) while it is over: a tokenizer need not be additive.
        let mut last = first;
        let mut estimate = carried_tokens + units[first].tokens;
        while let Some(next) = units.get(last + 1) {
            let gap = counter.count(&text[units[last].span.end..next.span.start]);
            let grown = estimate + gap + next.tokens;
            if grown > limit {
                break;
            }
            estimate = grown;
            last += 1;
        }
        let mut tokens = counter.count(&text[text_start..units[last].span.end]);
        while tokens > limit && (last > first || text_start < start) {
            if last > first {
                last -= 1;
            } else {
                text_start = start;
            }
            tokens = counter.count(&text[text_start..units[last].span.end]);
        }
        packed.push(Packed { text_start, span: start..units[last].span.end, tokens });
        first = last + 1;
    }
    packed
}

/// The tails of the previous chunk that fit `overlap_tokens`, longest first, with their
/// token counts: each starts at one of its sentences; where even the last sentence is too
/// long, a tail of it cut at a token boundary.
fn tails(
    text: &str,
    previous: &Range<usize>,
    overlap_tokens: usize,
    counter: &dyn TokenCounter,
) -> Vec<(usize, usize)> {
    let mut tails = Vec::new();
    for sentence in split::sentences(text, previous.clone()).iter().rev() {
        let tokens = counter.count(&text[sentence.start..previous.end]);
        if tokens > overlap_tokens {
            if tails.is_empty()
                && let Some(tail_start) = split::fitting_suffix_start(text, sentence, overlap_tokens, counter)
            {
                tails.push((tail_start, counter.count(&text[tail_start..previous.end])));
            }
            break;
        }
        tails.push((sentence.start, tokens));
    }
    tails.reverse();
    tails
}

#[cfg(test)]
mod tests {
    use super::super::CharCounter;
    use super::*;

    #[test]
    fn whole_sentences_overlap_when_they_fit() {
        let text = "Aaa aaa. Bbb bbb. Ccc ccc. Ddd ddd.";
        let whole = 0..text.len();
        let packed = pack(text, std::slice::from_ref(&whole), 17, 8, &CharCounter);
        let texts: Vec<&str> = packed.iter().map(|chunk| &text[chunk.text_start..chunk.span.end]).collect();
        assert_eq!(texts, ["Aaa aaa. Bbb bbb.", "Bbb bbb. Ccc ccc.", "Ccc ccc. Ddd ddd."]);
        let own: Vec<&str> = packed.iter().map(|chunk| &text[chunk.span.clone()]).collect();
        assert_eq!(own, ["Aaa aaa. Bbb bbb.", "Ccc ccc.", "Ddd ddd."]);
    }
}
