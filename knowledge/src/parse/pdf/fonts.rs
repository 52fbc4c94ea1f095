//! A page's fonts: how to decode their strings (lopdf's encodings and `ToUnicode` maps) and
//! how far each glyph advances (the `Widths` or `W` arrays), which places text on its line.

use std::collections::BTreeMap;

use lopdf::{Dictionary, Document, Encoding, Object, ObjectId};

/// Glyph width where a font gives none, in thousandths of the font size.
const SIMPLE_DEFAULT_WIDTH: f32 = 500.0;
const CID_DEFAULT_WIDTH: f32 = 1000.0;
/// The most width entries read from one font; more are ignored (their glyphs use the default).
const MAX_WIDTH_ENTRIES: usize = 65_536;

pub(super) struct PageFont<'d> {
    /// `None` where lopdf cannot decode the font's strings; its glyphs still advance.
    pub(super) encoding: Option<Encoding<'d>>,
    /// Composite (Type0) fonts use two-byte codes.
    pub(super) two_byte: bool,
    widths: Widths,
}

impl PageFont<'_> {
    /// The advance of one glyph, in thousandths of the font size.
    pub(super) fn width(&self, code: u32) -> f32 {
        self.widths.of(code)
    }
}

#[derive(Debug, Default)]
struct Widths {
    first_code: u32,
    /// Simple fonts: the width of `first_code + index`.
    simple: Vec<f32>,
    /// Composite fonts: `(first, last, width)`, sorted by `first`.
    ranges: Vec<(u32, u32, f32)>,
    default: f32,
}

impl Widths {
    fn of(&self, code: u32) -> f32 {
        if let Some(index) = code.checked_sub(self.first_code).and_then(|index| usize::try_from(index).ok())
            && let Some(width) = self.simple.get(index)
        {
            return *width;
        }
        let after = self.ranges.partition_point(|(first, _, _)| *first <= code);
        match after.checked_sub(1).map(|index| self.ranges[index]) {
            Some((_, last, width)) if code <= last => width,
            _ => self.default,
        }
    }
}

/// The fonts a page names in its resources. A font whose encoding would inflate past `limit`
/// is an error (a decompression bomb); one whose encoding lopdf cannot read decodes no text.
pub(super) fn page_fonts(
    document: &Document,
    page_id: ObjectId,
    limit: usize,
) -> Result<BTreeMap<Vec<u8>, PageFont<'_>>, lopdf::Error> {
    let mut fonts = BTreeMap::new();
    for (name, font) in document.get_page_fonts(page_id).unwrap_or_default() {
        let encoding = match font.get_font_encoding_with_limit(document, limit) {
            Ok(encoding) => Some(encoding),
            Err(error @ lopdf::Error::Decompress(lopdf::DecompressError::MemoryLimitExceeded { .. })) => {
                return Err(error);
            }
            Err(_) => None,
        };
        let two_byte = font.get(b"Subtype").and_then(Object::as_name).is_ok_and(|subtype| subtype == b"Type0");
        let widths = if two_byte { cid_widths(document, font) } else { simple_widths(document, font) };
        fonts.insert(name, PageFont { encoding, two_byte, widths });
    }
    Ok(fonts)
}

fn deref<'d>(document: &'d Document, object: &'d Object) -> Option<&'d Object> {
    document.dereference(object).ok().map(|(_, object)| object)
}

fn number(document: &Document, object: &Object) -> Option<f32> {
    deref(document, object)?.as_float().ok().filter(|value| value.is_finite())
}

fn code(document: &Document, object: &Object) -> Option<u32> {
    deref(document, object)?.as_i64().ok().and_then(|value| u32::try_from(value).ok())
}

fn simple_widths(document: &Document, font: &Dictionary) -> Widths {
    let first_code = font.get(b"FirstChar").ok().and_then(|first| code(document, first)).unwrap_or(0);
    let widths = font
        .get_deref(b"Widths", document)
        .and_then(Object::as_array)
        .map(|widths| {
            widths.iter().take(MAX_WIDTH_ENTRIES).map(|width| number(document, width).unwrap_or(0.0)).collect()
        })
        .unwrap_or_default();
    Widths { first_code, simple: widths, ranges: Vec::new(), default: SIMPLE_DEFAULT_WIDTH }
}

/// The descendant CIDFont's `W` array: `c [w1 w2 ...]` and `first last w` entries.
fn cid_widths(document: &Document, font: &Dictionary) -> Widths {
    let Some(descendant) = font
        .get_deref(b"DescendantFonts", document)
        .and_then(Object::as_array)
        .ok()
        .and_then(|fonts| fonts.first())
        .and_then(|descendant| deref(document, descendant))
        .and_then(|descendant| descendant.as_dict().ok())
    else {
        return Widths { default: CID_DEFAULT_WIDTH, ..Widths::default() };
    };
    let default = descendant.get(b"DW").ok().and_then(|width| number(document, width)).unwrap_or(CID_DEFAULT_WIDTH);
    let entries =
        descendant.get_deref(b"W", document).and_then(Object::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut ranges = Vec::new();
    let mut index = 0;
    while index < entries.len() && ranges.len() < MAX_WIDTH_ENTRIES {
        let Some(first) = code(document, &entries[index]) else { break };
        match entries.get(index + 1).and_then(|next| deref(document, next)) {
            Some(Object::Array(widths)) => {
                for (offset, width) in (0_u32..).zip(widths.iter().take(MAX_WIDTH_ENTRIES)) {
                    let code = first.saturating_add(offset);
                    ranges.push((code, code, number(document, width).unwrap_or(default)));
                }
                index += 2;
            }
            Some(last) => {
                let last = code(document, last).unwrap_or(first);
                let width = entries.get(index + 2).and_then(|width| number(document, width)).unwrap_or(default);
                ranges.push((first, last.max(first), width));
                index += 3;
            }
            None => break,
        }
    }
    ranges.sort_by_key(|(first, _, _)| *first);
    Widths { first_code: 0, simple: Vec::new(), ranges, default }
}
