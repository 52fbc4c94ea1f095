//! Markdown through pulldown-cmark's event stream (CommonMark plus tables, task lists,
//! strikethrough and YAML front matter).

use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};

use super::blocks::{BlocksBuilder, collapse_whitespace, is_cjk};
use super::{BlockKind, DocumentKind, ParseError, Parsed, text};

pub(super) fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
    let source = text::decode(bytes, DocumentKind::Markdown)?;
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_YAML_STYLE_METADATA_BLOCKS;
    let mut walker = Walker::default();
    for event in Parser::new_ext(&source, options) {
        walker.event(event);
    }
    walker.flush();
    let front_matter_title = walker.front_matter_title.take();
    let title = front_matter_title.or_else(|| walker.builder.first_heading(1));
    Ok(Parsed { title, page_count: 1, blocks: walker.builder.finish() })
}

#[derive(Debug, Default)]
struct Walker {
    builder: BlocksBuilder,
    /// The text of the block being read.
    buffer: String,
    /// Byte positions in `buffer` of soft line breaks, resolved at the end of the block.
    soft_breaks: Vec<usize>,
    heading_level: Option<u8>,
    list_depth: usize,
    in_code: bool,
    in_table: bool,
    in_metadata: bool,
    skip_html: usize,
    front_matter: String,
    front_matter_title: Option<String>,
}

impl Walker {
    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Start(tag) => self.start(&tag),
            Event::End(tag) => self.end(tag),
            Event::Text(text) if self.in_metadata => self.front_matter.push_str(&text),
            Event::Text(text) | Event::Code(text) | Event::InlineMath(text) | Event::DisplayMath(text) => {
                if self.skip_html == 0 {
                    self.buffer.push_str(&text);
                }
            }
            Event::SoftBreak => {
                self.soft_breaks.push(self.buffer.len());
                self.buffer.push('\n');
            }
            Event::HardBreak => self.buffer.push('\n'),
            Event::TaskListMarker(done) => self.buffer.push_str(if done { "[x] " } else { "[ ] " }),
            Event::Rule => self.flush(),
            Event::Html(_) | Event::InlineHtml(_) | Event::FootnoteReference(_) => {}
        }
    }

    fn start(&mut self, tag: &Tag<'_>) {
        match tag {
            Tag::Heading { level, .. } => {
                self.flush();
                self.heading_level = Some(heading_level(*level));
            }
            Tag::CodeBlock(_) => {
                self.flush();
                self.in_code = true;
            }
            Tag::Table(_) => {
                self.flush();
                self.in_table = true;
            }
            Tag::List(_) => {
                self.flush();
                self.list_depth += 1;
            }
            Tag::Item | Tag::Paragraph | Tag::BlockQuote(_) | Tag::FootnoteDefinition(_) if !self.in_table => {
                self.flush();
            }
            Tag::MetadataBlock(_) => self.in_metadata = true,
            Tag::HtmlBlock => self.skip_html += 1,
            _ => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Heading(_) | TagEnd::Paragraph | TagEnd::Item | TagEnd::BlockQuote(_) => self.flush(),
            TagEnd::CodeBlock => {
                self.flush();
                self.in_code = false;
            }
            TagEnd::List(_) => {
                self.flush();
                self.list_depth = self.list_depth.saturating_sub(1);
            }
            TagEnd::TableCell => self.buffer.push_str(" | "),
            TagEnd::TableHead | TagEnd::TableRow => {
                let row_end = self.buffer.trim_end_matches(" | ").len();
                self.buffer.truncate(row_end);
                self.buffer.push('\n');
            }
            TagEnd::Table => {
                self.flush();
                self.in_table = false;
            }
            TagEnd::MetadataBlock(_) => {
                self.in_metadata = false;
                self.front_matter_title = front_matter_title(&self.front_matter);
            }
            TagEnd::HtmlBlock => self.skip_html = self.skip_html.saturating_sub(1),
            _ => {}
        }
    }

    /// Ends the block being read, if it has text.
    fn flush(&mut self) {
        let kind = if let Some(level) = self.heading_level.take() {
            BlockKind::Heading { level }
        } else if self.in_code {
            BlockKind::Code
        } else if self.in_table {
            BlockKind::Table
        } else if self.list_depth > 0 {
            BlockKind::ListItem
        } else {
            BlockKind::Paragraph
        };
        let text = resolve_soft_breaks(&self.buffer, &self.soft_breaks);
        self.builder.push(kind, &text, 1);
        self.buffer.clear();
        self.soft_breaks.clear();
    }
}

fn heading_level(level: HeadingLevel) -> u8 {
    match level {
        HeadingLevel::H1 => 1,
        HeadingLevel::H2 => 2,
        HeadingLevel::H3 => 3,
        HeadingLevel::H4 => 4,
        HeadingLevel::H5 => 5,
        HeadingLevel::H6 => 6,
    }
}

/// A soft line break is a space between words, and nothing between two CJK characters.
fn resolve_soft_breaks(buffer: &str, soft_breaks: &[usize]) -> String {
    let mut resolved = String::with_capacity(buffer.len());
    let mut previous_end = 0;
    for &at in soft_breaks {
        resolved.push_str(&buffer[previous_end..at]);
        let before = buffer[..at].chars().next_back();
        let after = buffer[at + 1..].chars().next();
        if !(before.is_some_and(is_cjk) && after.is_some_and(is_cjk)) {
            resolved.push(' ');
        }
        previous_end = at + 1;
    }
    resolved.push_str(&buffer[previous_end..]);
    resolved
}

/// `title:` from YAML front matter, quotes removed; only the simple one-line form is read.
fn front_matter_title(front_matter: &str) -> Option<String> {
    front_matter.lines().find_map(|line| {
        let value = line.strip_prefix("title:")?.trim();
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        Some(collapse_whitespace(value)).filter(|title| !title.is_empty())
    })
}
