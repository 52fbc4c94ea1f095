//! Turning generated tokens into streamed text: pure, over any `decode` function.
//!
//! [`TextStream`] releases text only when it decodes cleanly (a byte-level BPE token can
//! end inside a multi-byte character) and holds back text that could be the start of a
//! stop sequence; a stop sequence found ends the text before it. It decodes a short window
//! of recent tokens each time (as text-generation-inference does), so decoders that strip
//! a leading space see the same context on both sides of the difference.
//!
//! An output filter's patterns hold back text the same way: from the earliest place where
//! a match may be in progress (the pattern's lazy DFA, anchored there, is not dead at the
//! end of the text), within the last [`PATTERN_HOLD_BYTES`].
//!
//! [`Detokenizer`] pairs tokens with the text they released: a token's event waits until
//! all text up to it is settled, so every event's text is final and the concatenation of
//! the events' texts is the output.

use regex_automata::hybrid;

/// Tokens held at most while their text ends inside a character.
const MAX_HELD_TOKENS: usize = 4;

/// How far back text that may be the start of a pattern's match is held. A match longer
/// than this can have begun in text already released (its end is still blocked).
const PATTERN_HOLD_BYTES: usize = 1024;

/// What the output must not contain (a tenant's output safety rules): keywords, compared
/// without regard to ASCII case, and regular expressions. Sent with a request to the
/// replica that runs it, so a remote replica filters the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct OutputFilter {
    pub keywords: Vec<String>,
    pub patterns: Vec<String>,
}

impl OutputFilter {
    pub fn is_empty(&self) -> bool {
        self.keywords.iter().all(String::is_empty) && self.patterns.is_empty()
    }
}

/// An [`OutputFilter`] ready to match: keywords lowercased, patterns compiled.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    keywords: Vec<String>,
    patterns: Vec<regex::Regex>,
    /// Each pattern as a lazy DFA (with its cache), to tell whether text at the end of the
    /// output may be the start of a match still in progress; `None` where the DFA cannot
    /// be built (a Unicode word boundary, say), and then the whole window is held.
    prefixes: Vec<Option<(hybrid::dfa::DFA, hybrid::dfa::Cache)>>,
}

/// Checks that `pattern` can be an output rule: it compiles, and it cannot match empty
/// text (which would block every answer at its first character).
pub fn check_pattern(pattern: &str) -> Result<regex::Regex, String> {
    let regex = regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|err| format!("the filter pattern `{pattern}` is not a valid regular expression: {err}"))?;
    let hir = regex_automata::util::syntax::parse(pattern)
        .map_err(|err| format!("the filter pattern `{pattern}` is not a valid regular expression: {err}"))?;
    if hir.properties().minimum_len() == Some(0) {
        return Err(format!("the filter pattern `{pattern}` matches empty text; it must match at least one character"));
    }
    Ok(regex)
}

impl CompiledFilter {
    /// Compiles `filter`; a pattern that is not a valid regular expression is named.
    pub fn new(filter: &OutputFilter) -> Result<Self, String> {
        let patterns = filter.patterns.iter().map(|pattern| check_pattern(pattern)).collect::<Result<Vec<_>, _>>()?;
        let prefixes = filter
            .patterns
            .iter()
            .map(|pattern| {
                hybrid::dfa::DFA::new(pattern).ok().map(|dfa| {
                    let cache = dfa.create_cache();
                    (dfa, cache)
                })
            })
            .collect();
        let keywords =
            filter.keywords.iter().filter(|k| !k.is_empty()).map(|keyword| keyword.to_ascii_lowercase()).collect();
        Ok(CompiledFilter { keywords, patterns, prefixes })
    }

    /// Where blocked text begins in `pending` (text not yet released, which follows
    /// `released`): the earliest keyword in `pending`, or the earliest pattern match in the
    /// whole output (0 when it began in released text).
    fn find(&self, released: &str, pending: &str) -> Option<usize> {
        let lowered = pending.to_ascii_lowercase();
        let keyword = self.keywords.iter().filter_map(|keyword| lowered.find(keyword.as_str())).min();
        let pattern = if self.patterns.is_empty() {
            None
        } else {
            let whole = format!("{released}{pending}");
            self.patterns
                .iter()
                .filter_map(|pattern| pattern.find(&whole))
                .map(|found| found.start().saturating_sub(released.len()))
                .min()
        };
        keyword.into_iter().chain(pattern).min()
    }

    /// The longest suffix of `pending` that could begin a keyword or a pattern's match.
    fn held(&mut self, pending: &str) -> usize {
        let lowered = pending.to_ascii_lowercase();
        let by_keywords = self.keywords.iter().map(|keyword| held_suffix(&lowered, keyword)).max().unwrap_or(0);
        let by_patterns = self
            .prefixes
            .iter_mut()
            .map(|prefix| match prefix {
                Some((dfa, cache)) => held_by_pattern(dfa, cache, pending),
                None => held_window(pending),
            })
            .max()
            .unwrap_or(0);
        by_keywords.max(by_patterns)
    }
}

/// The last [`PATTERN_HOLD_BYTES`] of `text` (at a character boundary), as a length.
fn held_window(text: &str) -> usize {
    let mut start = text.len().saturating_sub(PATTERN_HOLD_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text.len() - start
}

/// The longest suffix of `text` (within [`PATTERN_HOLD_BYTES`]) from whose start the
/// pattern's DFA, anchored there, is still alive at the end of the text: a match may be in
/// progress. (A match already complete was found by [`CompiledFilter::find`] before this.)
fn held_by_pattern(dfa: &hybrid::dfa::DFA, cache: &mut hybrid::dfa::Cache, text: &str) -> usize {
    let window = held_window(text);
    let first = text.len() - window;
    (first..text.len())
        .filter(|&start| text.is_char_boundary(start))
        .find(|&start| may_be_matching(dfa, cache, text, start))
        .map_or(0, |start| text.len() - start)
}

/// Whether a match of the DFA's pattern starting at `start` could still be in progress at
/// the end of `text`. When the DFA gives up (its cache thrashes), the answer is yes.
fn may_be_matching(dfa: &hybrid::dfa::DFA, cache: &mut hybrid::dfa::Cache, text: &str, start: usize) -> bool {
    let input = regex_automata::Input::new(text).span(start..text.len()).anchored(regex_automata::Anchored::Yes);
    let Ok(mut state) = dfa.start_state_forward(cache, &input) else {
        return true;
    };
    for &byte in &text.as_bytes()[start..] {
        match dfa.next_state(cache, state, byte) {
            Ok(next) if next.is_dead() => return false,
            Ok(next) if next.is_quit() => return true,
            Ok(next) => state = next,
            Err(_) => return true,
        }
    }
    !state.is_dead()
}

/// Text released by one token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamStep {
    pub text: String,
    /// A stop sequence was found; `text` ends before it and generation should end.
    pub stopped: bool,
    /// The output filter matched; `text` ends before the match and generation should end.
    pub blocked: bool,
}

#[derive(Debug, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    pending: String,
    stops: Vec<String>,
    filter: Option<CompiledFilter>,
    /// The text released so far, kept only when the filter has patterns (which may match
    /// across released and pending text).
    released: String,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self::filtered(stops, None)
    }

    /// A stream that also ends where `filter` matches (the match is not released).
    pub fn filtered(stops: Vec<String>, filter: Option<CompiledFilter>) -> Self {
        TextStream {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            pending: String::new(),
            stops: stops.into_iter().filter(|stop| !stop.is_empty()).collect(),
            filter,
            released: String::new(),
        }
    }

    /// True when nothing is held back (every token so far decoded, no stop prefix pending).
    pub fn is_settled(&self) -> bool {
        self.read_offset == self.ids.len() && self.pending.is_empty()
    }

    /// Adds a token; returns the text it releases.
    pub fn push<E>(&mut self, token: u32, decode: impl Fn(&[u32]) -> Result<String, E>) -> Result<StreamStep, E> {
        self.ids.push(token);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = decode(&self.ids[self.prefix_offset..])?;
        // A character is at most 4 bytes and a token at least one: more than 4 tokens that
        // still end in U+FFFD are not valid UTF-8 and will not become it.
        let undecodable = self.ids.len() - self.read_offset > MAX_HELD_TOKENS;
        if text == prefix {
            // The token adds no text (a special token, or an id the tokenizer lacks).
            self.read_offset = self.ids.len();
        } else if text.len() > prefix.len() && (!text.ends_with('\u{FFFD}') || undecodable) {
            if let Some(delta) = text.get(prefix.len()..) {
                self.pending.push_str(delta);
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(self.release())
    }

    /// Ends the stream: releases everything held, an incomplete character as U+FFFD.
    pub fn finish<E>(&mut self, decode: impl Fn(&[u32]) -> Result<String, E>) -> Result<StreamStep, E> {
        if self.read_offset < self.ids.len() {
            let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
            let text = decode(&self.ids[self.prefix_offset..])?;
            if let Some(delta) = text.get(prefix.len()..) {
                self.pending.push_str(delta);
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        let step = self.release();
        if step.stopped || step.blocked {
            return Ok(step);
        }
        let mut text = step.text;
        text.push_str(&std::mem::take(&mut self.pending));
        Ok(StreamStep { text, stopped: false, blocked: false })
    }

    fn release(&mut self) -> StreamStep {
        let stop = self.stops.iter().filter_map(|stop| self.pending.find(stop.as_str())).min();
        let blocked = self.filter.as_ref().and_then(|filter| filter.find(&self.released, &self.pending));
        // The earlier of the two ends the text; a filter match at the same place wins.
        let end = match (stop, blocked) {
            (Some(stop), Some(blocked)) if stop < blocked => Some((stop, false)),
            (_, Some(blocked)) => Some((blocked, true)),
            (Some(stop), None) => Some((stop, false)),
            (None, None) => None,
        };
        if let Some((position, blocked)) = end {
            let mut position = position.min(self.pending.len());
            while !self.pending.is_char_boundary(position) {
                position -= 1;
            }
            let text = self.pending[..position].to_owned();
            self.pending.clear();
            return StreamStep { text, stopped: !blocked, blocked };
        }
        let held_by_stops = self.stops.iter().map(|stop| held_suffix(&self.pending, stop)).max().unwrap_or(0);
        let held_by_filter = self.filter.as_mut().map_or(0, |filter| filter.held(&self.pending));
        let held = held_by_stops.max(held_by_filter);
        let text = self.pending[..self.pending.len() - held].to_owned();
        self.pending.drain(..self.pending.len() - held);
        if self.filter.as_ref().is_some_and(|filter| !filter.patterns.is_empty()) {
            self.released.push_str(&text);
        }
        StreamStep { text, stopped: false, blocked: false }
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`.
fn held_suffix(text: &str, stop: &str) -> usize {
    let longest = stop.len().saturating_sub(1).min(text.len());
    (1..=longest)
        .rev()
        .find(|&length| {
            text.is_char_boundary(text.len() - length)
                && stop.is_char_boundary(length)
                && text.ends_with(&stop[..length])
        })
        .unwrap_or(0)
}

/// Tokens paired with the settled text each releases.
#[derive(Debug, Clone)]
pub struct Detokenizer<T> {
    stream: TextStream,
    held: Vec<T>,
    unsent: String,
}

/// What a token released: events `(token, text)` in order, and whether a stop sequence
/// or the output filter ended the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Released<T> {
    pub events: Vec<(T, String)>,
    pub stopped: bool,
    pub blocked: bool,
}

impl<T> Detokenizer<T> {
    pub fn new(stops: Vec<String>) -> Self {
        Self::filtered(stops, None)
    }

    /// A detokenizer whose output also ends where `filter` matches.
    pub fn filtered(stops: Vec<String>, filter: Option<CompiledFilter>) -> Self {
        Detokenizer { stream: TextStream::filtered(stops, filter), held: Vec::new(), unsent: String::new() }
    }

    /// Adds a generated token (`item` is what its event carries besides the text).
    pub fn push<E>(
        &mut self,
        token: u32,
        item: T,
        decode: impl Fn(&[u32]) -> Result<String, E>,
    ) -> Result<Released<T>, E> {
        let step = self.stream.push(token, decode)?;
        self.held.push(item);
        self.unsent.push_str(&step.text);
        if step.stopped || step.blocked || self.stream.is_settled() {
            return Ok(Released { events: self.release_all(), stopped: step.stopped, blocked: step.blocked });
        }
        Ok(Released { events: Vec::new(), stopped: false, blocked: false })
    }

    /// Ends the output (end of sequence, length): releases every held token and text.
    pub fn finish<E>(&mut self, decode: impl Fn(&[u32]) -> Result<String, E>) -> Result<Released<T>, E> {
        let step = self.stream.finish(decode)?;
        self.unsent.push_str(&step.text);
        Ok(Released { events: self.release_all(), stopped: step.stopped, blocked: step.blocked })
    }

    /// The held tokens' events; the text goes with the last of them.
    fn release_all(&mut self) -> Vec<(T, String)> {
        let count = self.held.len();
        let mut text = std::mem::take(&mut self.unsent);
        self.held
            .drain(..)
            .enumerate()
            .map(|(index, item)| (item, if index + 1 == count { std::mem::take(&mut text) } else { String::new() }))
            .collect()
    }
}
