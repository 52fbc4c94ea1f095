//! What every format's parser shares: building the block list with its heading paths, and
//! cleaning text.

use super::{Block, BlockKind};

/// Collects blocks in reading order and keeps the stack of open headings.
#[derive(Debug, Default)]
pub(super) struct BlocksBuilder {
    blocks: Vec<Block>,
    open_headings: Vec<(u8, String)>,
}

impl BlocksBuilder {
    /// Adds a block after cleaning its text; a block with no text is dropped. A heading closes
    /// every open heading at its level or deeper, then opens itself.
    pub(super) fn push(&mut self, kind: BlockKind, text: &str, page: u32) {
        let text = match kind {
            BlockKind::Code | BlockKind::Table => clean_preformatted(text),
            BlockKind::Heading { .. } => collapse_whitespace(text),
            BlockKind::Paragraph | BlockKind::ListItem => clean(text),
        };
        if text.is_empty() {
            return;
        }
        if let BlockKind::Heading { level } = kind {
            while self.open_headings.last().is_some_and(|(open_level, _)| *open_level >= level) {
                self.open_headings.pop();
            }
            self.open_headings.push((level, text.clone()));
        }
        let heading_path = self.open_headings.iter().map(|(_, heading)| heading.clone()).collect();
        self.blocks.push(Block { kind, text, page: page.max(1), heading_path });
    }

    pub(super) fn first_heading(&self, level: u8) -> Option<String> {
        self.blocks.iter().find_map(|block| match block.kind {
            BlockKind::Heading { level: found } if found == level => Some(block.text.clone()),
            _ => None,
        })
    }

    pub(super) fn finish(self) -> Vec<Block> {
        self.blocks
    }
}

/// Whether a character belongs to a script written without spaces between words (CJK
/// ideographs, kana, Hangul syllables, and their punctuation), where joining two lines must
/// not add a space.
pub(crate) fn is_cjk(c: char) -> bool {
    matches!(u32::from(c),
        0x1100..=0x11FF
        | 0x2E80..=0x2FDF
        | 0x3000..=0x30FF
        | 0x3100..=0x31FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xAC00..=0xD7AF
        | 0xF900..=0xFAFF
        | 0xFE30..=0xFE4F
        | 0xFF00..=0xFFEF
        | 0x20000..=0x3134F)
}

/// Appends `next` to `line` with a space between them, except where either side already has
/// whitespace or both sides are CJK.
pub(super) fn join_with_space(line: &mut String, next: &str) {
    let (Some(last), Some(first)) = (line.chars().next_back(), next.chars().next()) else {
        line.push_str(next);
        return;
    };
    let separated = last.is_whitespace() || first.is_whitespace() || (is_cjk(last) && is_cjk(first));
    if !separated {
        line.push(' ');
    }
    line.push_str(next);
}

/// Control characters other than tab and newline are dropped, carriage returns become
/// newlines.
fn strip_controls(text: &str) -> String {
    let text = text.replace("\r\n", "\n");
    text.chars()
        .filter_map(|c| match c {
            '\r' | '\u{2028}' | '\u{2029}' => Some('\n'),
            '\n' | '\t' => Some(c),
            c if c.is_control() || c == '\u{FEFF}' => None,
            c => Some(c),
        })
        .collect()
}

/// Prose: controls dropped, trailing spaces on lines removed, runs of blank lines collapsed,
/// trimmed.
fn clean(text: &str) -> String {
    let stripped = strip_controls(text);
    let mut cleaned = String::with_capacity(stripped.len());
    let mut blank_run = 0;
    for line in stripped.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank_run += 1;
            continue;
        }
        if !cleaned.is_empty() {
            cleaned.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        cleaned.push_str(line);
    }
    cleaned.trim().to_owned()
}

/// Code and tables: controls dropped and the ends trimmed of blank lines, inner whitespace
/// kept.
fn clean_preformatted(text: &str) -> String {
    let stripped = strip_controls(text);
    let lines: Vec<&str> = stripped.lines().map(str::trim_end).collect();
    let first = lines.iter().position(|line| !line.trim().is_empty());
    let last = lines.iter().rposition(|line| !line.trim().is_empty());
    match (first, last) {
        (Some(first), Some(last)) => lines[first..=last].join("\n").trim_start().to_owned(),
        _ => String::new(),
    }
}

/// One line: every run of whitespace becomes one space.
pub(super) fn collapse_whitespace(text: &str) -> String {
    let stripped = strip_controls(text);
    let mut collapsed = String::with_capacity(stripped.len());
    for word in stripped.split_whitespace() {
        join_with_space(&mut collapsed, word);
    }
    collapsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heading_closes_headings_at_its_level_and_deeper() {
        let mut builder = BlocksBuilder::default();
        builder.push(BlockKind::Heading { level: 1 }, "Install", 1);
        builder.push(BlockKind::Heading { level: 2 }, "On Linux", 1);
        builder.push(BlockKind::Paragraph, "apt install", 1);
        builder.push(BlockKind::Heading { level: 2 }, "On Mac", 1);
        builder.push(BlockKind::Heading { level: 1 }, "Use", 1);
        let paths: Vec<Vec<String>> = builder.finish().into_iter().map(|block| block.heading_path).collect();
        assert_eq!(
            paths,
            vec![
                vec!["Install".to_owned()],
                vec!["Install".to_owned(), "On Linux".to_owned()],
                vec!["Install".to_owned(), "On Linux".to_owned()],
                vec!["Install".to_owned(), "On Mac".to_owned()],
                vec!["Use".to_owned()],
            ]
        );
    }

    #[test]
    fn joining_cjk_adds_no_space_and_latin_gets_one() {
        for (left, right, joined) in [
            ("中文", "文本", "中文文本"),
            ("hello", "world", "hello world"),
            ("中文", "text", "中文 text"),
            ("a ", "b", "a b"),
        ] {
            let mut line = left.to_owned();
            join_with_space(&mut line, right);
            assert_eq!(line, joined);
        }
    }

    #[test]
    fn cleaning_drops_controls_and_blank_runs() {
        assert_eq!(clean("  a\u{0}b \r\n\r\n\n c\u{7}  "), "ab\n\n c");
        assert_eq!(clean_preformatted("\n\n  fn main() {\n      x\n  }\n\n"), "fn main() {\n      x\n  }");
        assert_eq!(collapse_whitespace(" On \n Linux "), "On Linux");
    }
}
