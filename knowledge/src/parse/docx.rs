//! DOCX: the zip archive read under the zip-bomb bounds, then `word/document.xml` streamed
//! with quick-xml. Styles come from `word/styles.xml` (by style name, so the localised style
//! ids of a Chinese or German Word still give headings), the title from `docProps/core.xml`.

use std::collections::HashMap;

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::{NsReader, XmlVersion};

use super::blocks::{BlocksBuilder, collapse_whitespace};
use super::zip_limits::LimitedZip;
use super::{BlockKind, DocumentKind, ParseError, Parsed};

const KIND: DocumentKind = DocumentKind::Docx;
/// WordprocessingML, transitional and strict.
const WORD_NAMESPACES: [&str; 2] = [
    "http://schemas.openxmlformats.org/wordprocessingml/2006/main",
    "http://purl.oclc.org/ooxml/wordprocessingml/main",
];
/// How far `basedOn` chains of styles are followed.
const MAX_STYLE_DEPTH: usize = 16;

pub(super) fn parse(bytes: &[u8], limits: &super::ParseLimits) -> Result<Parsed, ParseError> {
    let mut archive = LimitedZip::open(bytes, KIND, limits)?;
    let document = archive.read("word/document.xml")?.ok_or_else(|| {
        ParseError::corrupt(KIND, "the archive has no word/document.xml, so it is not a Word document")
    })?;
    let styles = match archive.read("word/styles.xml")? {
        Some(xml) => read_styles(&xml)?,
        None => Styles::default(),
    };
    let core_title = match archive.read("docProps/core.xml")? {
        Some(xml) => read_core_title(&xml)?,
        None => None,
    };
    let mut walker = BodyWalker::new(&styles);
    walk_xml(&document, "word/document.xml", |event| walker.event(&event))?;
    let title = core_title.or(walker.title_paragraph.take());
    Ok(Parsed { title, page_count: walker.page, blocks: walker.builder.finish() })
}

/// One XML event, reduced to what the walkers need. An empty element is an `Open` and a
/// `Close`.
enum XmlEvent<'e> {
    Open { element: &'e BytesStart<'e>, word: bool },
    Close { local_name: &'e str, word: bool },
    Text(&'e str),
}

fn walk_xml(xml: &[u8], part: &str, mut visit: impl FnMut(XmlEvent<'_>)) -> Result<(), ParseError> {
    let xml =
        std::str::from_utf8(xml).map_err(|error| ParseError::corrupt(KIND, format!("{part} is not utf-8: {error}")))?;
    let mut reader = NsReader::from_str(xml);
    loop {
        let (resolved, event) = reader
            .read_resolved_event()
            .map_err(|error| ParseError::corrupt(KIND, format!("{part} is not well-formed xml: {error}")))?;
        let word = matches!(resolved, ResolveResult::Bound(Namespace(uri)) if WORD_NAMESPACES.contains(&uri));
        match event {
            Event::Start(element) => visit(XmlEvent::Open { element: &element, word }),
            Event::Empty(element) => {
                visit(XmlEvent::Open { element: &element, word });
                visit(XmlEvent::Close { local_name: element.local_name().as_ref(), word });
            }
            Event::End(element) => visit(XmlEvent::Close { local_name: element.local_name().as_ref(), word }),
            Event::Text(text) => visit(XmlEvent::Text(&text.xml10_content())),
            Event::CData(text) => visit(XmlEvent::Text(&text.xml10_content())),
            Event::GeneralRef(reference) => {
                if let Ok(Some(c)) = reference.resolve_char_ref() {
                    visit(XmlEvent::Text(c.encode_utf8(&mut [0; 4])));
                } else if let Some(resolved) = quick_xml::escape::resolve_predefined_entity(&reference) {
                    visit(XmlEvent::Text(resolved));
                }
            }
            Event::Eof => return Ok(()),
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
}

/// The value of an element's `val` attribute (`w:val`).
fn val(element: &BytesStart<'_>) -> Option<String> {
    element.attributes().flatten().find(|attribute| attribute.key.local_name().as_ref() == "val").and_then(
        |attribute| attribute.normalized_value(XmlVersion::Implicit1_0).ok().map(std::borrow::Cow::into_owned),
    )
}

/// What a paragraph style means for parsing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StyleMeaning {
    heading_level: Option<u8>,
    title: bool,
    list: bool,
}

#[derive(Debug, Default)]
struct RawStyle {
    name: String,
    based_on: Option<String>,
    outline_level: Option<u8>,
    numbered: bool,
}

#[derive(Debug, Default)]
struct Styles {
    by_id: HashMap<String, RawStyle>,
}

impl Styles {
    /// A style's meaning, following `basedOn` for what is inherited (outline level, numbering).
    fn meaning(&self, style_id: &str) -> StyleMeaning {
        let mut meaning = meaning_from_name(style_id);
        let mut next = Some(style_id);
        for _ in 0..MAX_STYLE_DEPTH {
            let Some(style) = next.and_then(|id| self.by_id.get(id)) else { break };
            let named = meaning_from_name(&style.name);
            meaning.heading_level = meaning.heading_level.or(named.heading_level).or(style.outline_level);
            meaning.title |= named.title;
            meaning.list |= named.list || style.numbered;
            next = style.based_on.as_deref();
        }
        meaning
    }
}

/// Built-in style names are stored in English whatever the language of Word ("heading 1",
/// "Title", "List Paragraph"); style ids are often the same without spaces.
fn meaning_from_name(name: &str) -> StyleMeaning {
    let lowered: String = name.chars().filter(|c| !c.is_whitespace()).flat_map(char::to_lowercase).collect();
    let heading_level = lowered
        .strip_prefix("heading")
        .and_then(|level| level.parse::<u8>().ok())
        .filter(|level| (1..=9).contains(level));
    StyleMeaning { heading_level, title: lowered == "title", list: lowered.starts_with("list") }
}

fn read_styles(xml: &[u8]) -> Result<Styles, ParseError> {
    let mut styles = Styles::default();
    let mut current: Option<(String, RawStyle)> = None;
    walk_xml(xml, "word/styles.xml", |event| match event {
        XmlEvent::Open { element, word: true } => match element.local_name().as_ref() {
            "style" => {
                let mut id = None;
                let mut paragraph = false;
                for attribute in element.attributes().flatten() {
                    let value = attribute.normalized_value(XmlVersion::Implicit1_0).unwrap_or_default();
                    match attribute.key.local_name().as_ref() {
                        "styleId" => id = Some(value.into_owned()),
                        "type" => paragraph = value == "paragraph",
                        _ => {}
                    }
                }
                current = id.filter(|_| paragraph).map(|id| (id, RawStyle::default()));
            }
            "name" => {
                if let Some((_, style)) = current.as_mut() {
                    style.name = val(element).unwrap_or_default();
                }
            }
            "basedOn" => {
                if let Some((_, style)) = current.as_mut() {
                    style.based_on = val(element);
                }
            }
            "outlineLvl" => {
                if let Some((_, style)) = current.as_mut() {
                    style.outline_level = outline_heading_level(element);
                }
            }
            "numPr" => {
                if let Some((_, style)) = current.as_mut() {
                    style.numbered = true;
                }
            }
            _ => {}
        },
        XmlEvent::Close { local_name: "style", word: true } => {
            if let Some((id, style)) = current.take() {
                styles.by_id.insert(id, style);
            }
        }
        _ => {}
    })?;
    Ok(styles)
}

/// `w:outlineLvl` 0..8 is a heading of level 1..9; 9 is body text.
fn outline_heading_level(element: &BytesStart<'_>) -> Option<u8> {
    val(element).and_then(|level| level.parse::<u8>().ok()).filter(|level| *level < 9).map(|level| level + 1)
}

/// `dc:title` from the core properties.
fn read_core_title(xml: &[u8]) -> Result<Option<String>, ParseError> {
    let mut in_title = false;
    let mut title = String::new();
    walk_xml(xml, "docProps/core.xml", |event| match event {
        XmlEvent::Open { element, .. } => in_title = element.local_name().as_ref() == "title",
        XmlEvent::Close { .. } => in_title = false,
        XmlEvent::Text(text) if in_title => title.push_str(text),
        XmlEvent::Text(_) => {}
    })?;
    let title = collapse_whitespace(&title);
    Ok(Some(title).filter(|title| !title.is_empty()))
}

/// The paragraph being read.
#[derive(Debug, Default)]
struct Paragraph {
    text: String,
    page: u32,
    style: Option<String>,
    numbered: bool,
    outline_level: Option<u8>,
}

#[derive(Debug)]
struct BodyWalker<'s> {
    styles: &'s Styles,
    builder: BlocksBuilder,
    page: u32,
    /// Open `w:p` elements; more than one inside a text box.
    paragraph_depth: usize,
    paragraph: Paragraph,
    in_paragraph_properties: bool,
    in_text: bool,
    /// Open elements inside one whose content is not read (`mc:Fallback`, `w:del`).
    skip_depth: usize,
    table_depth: usize,
    table_page: u32,
    cell: String,
    row: Vec<String>,
    rows: Vec<String>,
    title_paragraph: Option<String>,
}

impl<'s> BodyWalker<'s> {
    fn new(styles: &'s Styles) -> Self {
        BodyWalker {
            styles,
            builder: BlocksBuilder::default(),
            page: 1,
            paragraph_depth: 0,
            paragraph: Paragraph::default(),
            in_paragraph_properties: false,
            in_text: false,
            skip_depth: 0,
            table_depth: 0,
            table_page: 1,
            cell: String::new(),
            row: Vec::new(),
            rows: Vec::new(),
            title_paragraph: None,
        }
    }

    fn event(&mut self, event: &XmlEvent<'_>) {
        match *event {
            XmlEvent::Open { element, word } => {
                let name = element.local_name();
                let name = name.as_ref();
                if self.skip_depth > 0 || name == "Fallback" || (word && name == "del") {
                    self.skip_depth += 1;
                } else if word {
                    self.open(name, element);
                }
            }
            XmlEvent::Close { local_name, word } => {
                if self.skip_depth > 0 {
                    self.skip_depth -= 1;
                } else if word {
                    self.close(local_name);
                }
            }
            XmlEvent::Text(text) => {
                if self.in_text && self.skip_depth == 0 {
                    self.paragraph.text.push_str(text);
                }
            }
        }
    }

    fn open(&mut self, name: &str, element: &BytesStart<'_>) {
        match name {
            "p" => {
                self.paragraph_depth += 1;
                if self.paragraph_depth == 1 {
                    self.paragraph = Paragraph { page: self.page, ..Paragraph::default() };
                } else {
                    self.paragraph.text.push('\n');
                }
            }
            "pPr" if self.paragraph_depth == 1 => self.in_paragraph_properties = true,
            "pStyle" if self.in_paragraph_properties => self.paragraph.style = val(element),
            "numPr" if self.in_paragraph_properties => self.paragraph.numbered = true,
            "outlineLvl" if self.in_paragraph_properties => {
                self.paragraph.outline_level = outline_heading_level(element);
            }
            "pageBreakBefore"
                if self.in_paragraph_properties && val(element).is_none_or(|on| on != "0" && on != "false") =>
            {
                self.page_break();
            }
            "t" => self.in_text = true,
            "tab" if self.paragraph_depth > 0 && !self.in_paragraph_properties => self.paragraph.text.push('\t'),
            "cr" => self.paragraph.text.push('\n'),
            "noBreakHyphen" => self.paragraph.text.push('-'),
            "br" => {
                let page = element
                    .attributes()
                    .flatten()
                    .any(|attribute| attribute.key.local_name().as_ref() == "type" && &*attribute.value == "page");
                if page { self.page_break() } else { self.paragraph.text.push('\n') }
            }
            "tbl" => {
                self.table_depth += 1;
                if self.table_depth == 1 {
                    self.table_page = self.page;
                }
            }
            "tc" if self.table_depth == 1 => self.cell.clear(),
            "tr" if self.table_depth == 1 => self.row.clear(),
            _ => {}
        }
    }

    /// An explicit page break: what follows is on the next page, and so is the paragraph it
    /// sits in if nothing of that paragraph came before it.
    fn page_break(&mut self) {
        self.page = self.page.saturating_add(1);
        if self.paragraph.text.trim().is_empty() {
            self.paragraph.page = self.page;
        }
    }

    fn close(&mut self, name: &str) {
        match name {
            "p" => {
                self.paragraph_depth = self.paragraph_depth.saturating_sub(1);
                if self.paragraph_depth == 0 {
                    self.end_paragraph();
                }
            }
            "pPr" => self.in_paragraph_properties = false,
            "t" => self.in_text = false,
            "tc" if self.table_depth == 1 => self.row.push(collapse_whitespace(&self.cell)),
            "tr" if self.table_depth == 1 && self.row.iter().any(|cell| !cell.is_empty()) => {
                self.rows.push(self.row.join(" | "));
            }
            "tbl" => {
                self.table_depth = self.table_depth.saturating_sub(1);
                if self.table_depth == 0 {
                    self.builder.push(BlockKind::Table, &self.rows.join("\n"), self.table_page);
                    self.rows.clear();
                }
            }
            _ => {}
        }
    }

    fn end_paragraph(&mut self) {
        let paragraph = std::mem::take(&mut self.paragraph);
        if self.table_depth > 0 {
            if !self.cell.is_empty() {
                self.cell.push(' ');
            }
            self.cell.push_str(&paragraph.text);
            return;
        }
        let meaning = paragraph.style.as_deref().map(|style| self.styles.meaning(style)).unwrap_or_default();
        let kind = if let Some(level) = paragraph.outline_level.or(meaning.heading_level) {
            BlockKind::Heading { level }
        } else if paragraph.numbered || meaning.list {
            BlockKind::ListItem
        } else {
            BlockKind::Paragraph
        };
        if meaning.title && self.title_paragraph.is_none() {
            let title = collapse_whitespace(&paragraph.text);
            self.title_paragraph = Some(title).filter(|title| !title.is_empty());
        }
        self.builder.push(kind, &paragraph.text, paragraph.page);
    }
}
