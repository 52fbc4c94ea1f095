//! Lines into blocks. A line set clearly larger than the body text, and short, is a heading
//! (the largest such size is level 1); a line starting with a bullet or a number starts a list
//! item; other lines join the block above them unless the page changes or the gap between the
//! lines is wider than a line's spacing.

use super::super::BlockKind;
use super::super::blocks::{BlocksBuilder, is_cjk};
use super::lines::Line;

/// How much larger than the body text a heading is set.
const HEADING_SIZE_RATIO: f32 = 1.15;
/// The longest line, in characters, taken as a heading.
const MAX_HEADING_CHARS: usize = 150;
/// A vertical gap wider than this many font sizes between two lines starts a new block.
const PARAGRAPH_GAP_RATIO: f32 = 1.75;
const MAX_HEADING_LEVEL: u8 = 6;

/// A font size rounded to half a unit, so that sizes compare as equal when they print alike.
fn size_key(size: f32) -> i64 {
    // The float is rounded and clamped first, so the cast cannot truncate or wrap.
    #[allow(clippy::cast_possible_truncation, reason = "rounded and clamped before the cast")]
    let key = (size * 2.0).round().clamp(0.0, 1.0e6) as i64;
    key
}

/// The size that most of the text is set in, weighted by characters.
fn body_size_key(lines: &[Line]) -> i64 {
    let mut chars_by_size = std::collections::BTreeMap::<i64, usize>::new();
    for line in lines {
        *chars_by_size.entry(size_key(line.size)).or_default() += line.text.chars().count();
    }
    chars_by_size.into_iter().max_by_key(|(size, chars)| (*chars, -size)).map_or(0, |(size, _)| size)
}

struct Headings {
    /// Heading sizes, largest first.
    size_keys: Vec<i64>,
}

impl Headings {
    fn new(lines: &[Line], body: i64) -> Self {
        let mut size_keys: Vec<i64> =
            lines.iter().filter(|line| is_heading_size(line, body)).map(|line| size_key(line.size)).collect();
        size_keys.sort_unstable_by(|left, right| right.cmp(left));
        size_keys.dedup();
        Headings { size_keys }
    }

    fn level(&self, line: &Line, body: i64) -> Option<u8> {
        if !is_heading_size(line, body) {
            return None;
        }
        let rank = self.size_keys.iter().position(|key| *key == size_key(line.size))?;
        Some(u8::try_from(rank + 1).unwrap_or(MAX_HEADING_LEVEL).min(MAX_HEADING_LEVEL))
    }
}

fn is_heading_size(line: &Line, body: i64) -> bool {
    let body_size = ratio_of(body);
    body > 0 && line.size >= body_size * HEADING_SIZE_RATIO && line.text.trim().chars().count() <= MAX_HEADING_CHARS
}

fn ratio_of(key: i64) -> f32 {
    #[allow(clippy::cast_precision_loss, reason = "size keys are small")]
    let size = key as f32 / 2.0;
    size
}

/// A line that starts a list item: a bullet, or a number or letter followed by `.` or `)`.
fn starts_list_item(text: &str) -> bool {
    let text = text.trim_start();
    let mut chars = text.chars();
    let Some(first) = chars.next() else { return false };
    if matches!(first, '•' | '◦' | '▪' | '●' | '○' | '■' | '–' | '·' | '-' | '*') {
        return chars.next().is_some_and(char::is_whitespace);
    }
    let marker: String = text.chars().take_while(char::is_ascii_alphanumeric).take(3).collect();
    !marker.is_empty()
        && (marker.chars().all(|c| c.is_ascii_digit()) || marker.chars().count() == 1)
        && text[marker.len()..].starts_with(['.', ')'])
        && text[marker.len() + 1..].starts_with(char::is_whitespace)
}

struct OpenBlock {
    kind: BlockKind,
    text: String,
    page: u32,
    last_y: f32,
    last_size: f32,
}

pub(super) fn lines_to_blocks(lines: &[Line], builder: &mut BlocksBuilder) {
    let body = body_size_key(lines);
    let headings = Headings::new(lines, body);
    let mut open: Option<OpenBlock> = None;
    for line in lines {
        let level = headings.level(line, body);
        let kind = match level {
            Some(level) => BlockKind::Heading { level },
            None if starts_list_item(&line.text) => BlockKind::ListItem,
            None => BlockKind::Paragraph,
        };
        let continues = open.as_ref().is_some_and(|block| {
            let gap = block.last_y - line.y;
            let spacing = block.last_size.max(line.size) * PARAGRAPH_GAP_RATIO;
            let same_kind = block.kind == kind || (block.kind == BlockKind::ListItem && kind == BlockKind::Paragraph);
            block.page == line.page && same_kind && kind != BlockKind::ListItem && gap > 0.0 && gap <= spacing
        });
        match open.as_mut() {
            Some(block) if continues => {
                join_line(&mut block.text, line.text.trim());
                block.last_y = line.y;
                block.last_size = line.size;
            }
            _ => {
                if let Some(block) = open.take() {
                    builder.push(block.kind, &block.text, block.page);
                }
                open = Some(OpenBlock {
                    kind,
                    text: line.text.trim().to_owned(),
                    page: line.page,
                    last_y: line.y,
                    last_size: line.size,
                });
            }
        }
    }
    if let Some(block) = open {
        builder.push(block.kind, &block.text, block.page);
    }
}

/// Joins a wrapped line: no space between CJK characters, none after a hyphen that breaks a
/// word, one space otherwise.
fn join_line(text: &mut String, next: &str) {
    let mut tail = text.chars().rev();
    let last = tail.next();
    let before_last = tail.next();
    let first = next.chars().next();
    let hyphenated = last == Some('-') && before_last.is_some_and(char::is_alphabetic);
    let cjk = last.is_some_and(is_cjk) && first.is_some_and(is_cjk);
    if !hyphenated && !cjk {
        text.push(' ');
    }
    text.push_str(next);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_markers_are_recognised() {
        for (text, list) in [
            ("• first", true),
            ("- dash", true),
            ("1. one", true),
            ("12) twelve", true),
            ("a. letter", true),
            ("3.14 is pi", false),
            ("Section 2. text", false),
            ("-minus", false),
            ("中文", false),
        ] {
            assert_eq!(starts_list_item(text), list, "{text}");
        }
    }
}
