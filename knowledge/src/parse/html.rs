//! HTML through html5ever (by way of scraper), walked as open and close edges so that deeply
//! nested markup cannot overflow the stack.

use ego_tree::iter::Edge;
use scraper::{Html, Node};

use super::blocks::{BlocksBuilder, collapse_whitespace};
use super::{BlockKind, DocumentKind, ParseError, Parsed, text};

/// Elements whose content is never read: not visible, or navigation rather than content.
const SKIPPED: [&str; 10] =
    ["script", "style", "nav", "noscript", "template", "svg", "canvas", "iframe", "object", "select"];

/// Elements that end the block before them and start a new one.
const BLOCK_LEVEL: [&str; 27] = [
    "address",
    "article",
    "aside",
    "blockquote",
    "body",
    "caption",
    "dd",
    "details",
    "dialog",
    "div",
    "dl",
    "dt",
    "fieldset",
    "figcaption",
    "figure",
    "footer",
    "form",
    "header",
    "hr",
    "main",
    "ol",
    "p",
    "section",
    "summary",
    "ul",
    "menu",
    "hgroup",
];

pub(super) fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
    let source = text::decode(bytes, DocumentKind::Html)?;
    let document = Html::parse_document(&source);
    let mut walker = Walker::default();
    for edge in document.tree.root().traverse() {
        match edge {
            Edge::Open(node) => match node.value() {
                Node::Element(element) => {
                    let hidden = element.attr("hidden").is_some()
                        || element.attr("aria-hidden").is_some_and(|value| value.eq_ignore_ascii_case("true"));
                    walker.open(element.name(), hidden);
                }
                Node::Text(text) => walker.text(text),
                _ => {}
            },
            Edge::Close(node) => {
                if let Node::Element(element) = node.value() {
                    walker.close(element.name());
                }
            }
        }
    }
    walker.flush();
    let title = walker.title.take().or_else(|| walker.builder.first_heading(1));
    Ok(Parsed { title, page_count: 1, blocks: walker.builder.finish() })
}

#[derive(Debug, Default)]
struct Walker {
    builder: BlocksBuilder,
    buffer: String,
    /// Open elements inside a skipped one, itself included.
    skip_depth: usize,
    heading_level: Option<u8>,
    pre_depth: usize,
    list_depth: usize,
    table_depth: usize,
    row: Vec<String>,
    rows: Vec<String>,
    in_title: bool,
    title_buffer: String,
    title: Option<String>,
}

impl Walker {
    fn open(&mut self, name: &str, hidden: bool) {
        if self.skip_depth > 0 || hidden || SKIPPED.contains(&name) {
            self.skip_depth += 1;
            return;
        }
        if self.table_depth > 0 {
            self.open_in_table(name);
            return;
        }
        match name {
            "title" => self.in_title = true,
            "br" => self.buffer.push('\n'),
            "pre" => {
                self.flush();
                self.pre_depth += 1;
            }
            "table" => {
                self.flush();
                self.table_depth = 1;
            }
            "li" => {
                self.flush();
                self.list_depth += 1;
            }
            _ => {
                if let Some(level) = heading_level(name) {
                    self.flush();
                    self.heading_level = Some(level);
                } else if BLOCK_LEVEL.contains(&name) {
                    self.flush();
                }
            }
        }
    }

    fn open_in_table(&mut self, name: &str) {
        match name {
            // A table inside a cell is read as that cell's text.
            "table" => self.table_depth += 1,
            "tr" if self.table_depth == 1 => self.row.clear(),
            "td" | "th" if self.table_depth == 1 => self.buffer.clear(),
            "br" => self.buffer.push(' '),
            _ if BLOCK_LEVEL.contains(&name) || heading_level(name).is_some() || name == "li" => {
                self.buffer.push(' ');
            }
            _ => {}
        }
    }

    fn close(&mut self, name: &str) {
        if self.skip_depth > 0 {
            self.skip_depth -= 1;
            return;
        }
        if self.table_depth > 0 {
            self.close_in_table(name);
            return;
        }
        match name {
            "title" => {
                self.in_title = false;
                let title = collapse_whitespace(&self.title_buffer);
                if self.title.is_none() && !title.is_empty() {
                    self.title = Some(title);
                }
            }
            "pre" => {
                self.flush();
                self.pre_depth = self.pre_depth.saturating_sub(1);
            }
            "li" => {
                self.flush();
                self.list_depth = self.list_depth.saturating_sub(1);
            }
            _ => {
                if heading_level(name).is_some() || BLOCK_LEVEL.contains(&name) {
                    self.flush();
                }
            }
        }
    }

    fn close_in_table(&mut self, name: &str) {
        match name {
            "table" => {
                self.table_depth -= 1;
                if self.table_depth == 0 {
                    self.builder.push(BlockKind::Table, &self.rows.join("\n"), 1);
                    self.rows.clear();
                    self.buffer.clear();
                }
            }
            "td" | "th" if self.table_depth == 1 => {
                self.row.push(collapse_whitespace(&self.buffer));
                self.buffer.clear();
            }
            "tr" if self.table_depth == 1 => {
                if self.row.iter().any(|cell| !cell.is_empty()) {
                    self.rows.push(self.row.join(" | "));
                }
                self.row.clear();
            }
            _ => {}
        }
    }

    fn text(&mut self, text: &str) {
        if self.skip_depth > 0 {
            return;
        }
        if self.in_title {
            self.title_buffer.push_str(text);
        } else if self.pre_depth > 0 {
            self.buffer.push_str(text);
        } else {
            // Whitespace in flowing HTML text is one space, as a browser shows it.
            for c in text.chars() {
                if c.is_whitespace() {
                    if !self.buffer.is_empty() && !self.buffer.ends_with(char::is_whitespace) {
                        self.buffer.push(' ');
                    }
                } else {
                    self.buffer.push(c);
                }
            }
        }
    }

    fn flush(&mut self) {
        let kind = if let Some(level) = self.heading_level.take() {
            BlockKind::Heading { level }
        } else if self.pre_depth > 0 {
            BlockKind::Code
        } else if self.list_depth > 0 {
            BlockKind::ListItem
        } else {
            BlockKind::Paragraph
        };
        self.builder.push(kind, &self.buffer, 1);
        self.buffer.clear();
    }
}

fn heading_level(name: &str) -> Option<u8> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}
