//! Documents made in code for the parsing tests: PDFs through lopdf, DOCX through the zip
//! writer, so no binary fixture is checked in.
#![allow(dead_code, reason = "each test binary uses a different part of the fixtures")]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Cursor, Write};

use lopdf::content::{Content, Operation};
use lopdf::{Document, Object, Stream, StringFormat, dictionary};
use zip::write::SimpleFileOptions;

/// A paragraph of a PDF page: lines set in one font size.
pub struct PdfParagraph {
    pub size: f32,
    pub lines: Vec<String>,
}

pub fn para(size: f32, lines: &[&str]) -> PdfParagraph {
    PdfParagraph { size, lines: lines.iter().map(|line| (*line).to_owned()).collect() }
}

/// Whether a line needs the CJK font (any character outside Latin-1).
fn needs_cjk_font(line: &str) -> bool {
    line.chars().any(|c| u32::from(c) > 0xFF)
}

/// A PDF with one page per entry. Latin lines use Helvetica (WinAnsi); lines with CJK use a
/// Type0 font with Identity-H codes and a `ToUnicode` map, as real CJK PDFs do. Streams are
/// compressed.
pub fn pdf(pages: &[Vec<PdfParagraph>], title: Option<&str>) -> Vec<u8> {
    let mut document = pdf_document(pages, title);
    document.compress();
    save(&mut document)
}

pub fn save(document: &mut Document) -> Vec<u8> {
    let mut bytes = Vec::new();
    document.save_to(&mut bytes).expect("save pdf");
    bytes
}

pub fn pdf_document(pages: &[Vec<PdfParagraph>], title: Option<&str>) -> Document {
    let mut document = Document::with_version("1.5");
    document.trailer.set(
        "ID",
        Object::Array(vec![Object::string_literal(b"0123456789abcdef"), Object::string_literal(b"fedcba9876543210")]),
    );
    let pages_id = document.new_object_id();
    let latin_font = document.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica", "Encoding" => "WinAnsiEncoding",
    });
    let cjk_chars: BTreeSet<char> = pages
        .iter()
        .flatten()
        .flat_map(|paragraph| &paragraph.lines)
        .filter(|line| needs_cjk_font(line))
        .flat_map(|line| line.chars())
        .collect();
    let to_unicode = document.add_object(Stream::new(dictionary! {}, to_unicode_cmap(&cjk_chars).into_bytes()));
    let cid_font = document.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "CIDFontType2", "BaseFont" => "SimSun",
        "CIDSystemInfo" => dictionary! {
            "Registry" => Object::string_literal("Adobe"), "Ordering" => Object::string_literal("Identity"), "Supplement" => 0,
        },
        "DW" => 1000,
    });
    let cjk_font = document.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type0", "BaseFont" => "SimSun", "Encoding" => "Identity-H",
        "DescendantFonts" => vec![Object::Reference(cid_font)], "ToUnicode" => to_unicode,
    });
    let resources = document.add_object(dictionary! {
        "Font" => dictionary! { "F1" => latin_font, "F2" => cjk_font },
    });
    let kids: Vec<Object> = pages
        .iter()
        .map(|paragraphs| {
            let content = page_content(paragraphs);
            let contents = document.add_object(Stream::new(dictionary! {}, content.encode().expect("encode content")));
            Object::Reference(document.add_object(dictionary! {
                "Type" => "Page", "Parent" => pages_id, "Resources" => resources, "Contents" => contents,
                "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
            }))
        })
        .collect();
    let count = i64::try_from(kids.len()).expect("page count");
    document
        .objects
        .insert(pages_id, Object::Dictionary(dictionary! { "Type" => "Pages", "Kids" => kids, "Count" => count }));
    let catalog = document.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    document.trailer.set("Root", catalog);
    if let Some(title) = title {
        let info = document
            .add_object(dictionary! { "Title" => Object::String(utf16_be_with_bom(title), StringFormat::Hexadecimal) });
        document.trailer.set("Info", info);
    }
    document
}

fn utf16_be_with_bom(text: &str) -> Vec<u8> {
    let mut bytes = vec![0xFE, 0xFF];
    bytes.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    bytes
}

/// Each line is its own BT/ET at a fixed x; lines step down by 1.2 sizes, paragraphs by 2.4.
fn page_content(paragraphs: &[PdfParagraph]) -> Content {
    let mut operations = Vec::new();
    let mut y = 800.0_f32;
    for paragraph in paragraphs {
        for line in &paragraph.lines {
            y -= paragraph.size * 1.2;
            let (font, string) = if needs_cjk_font(line) {
                let codes: Vec<u8> = line
                    .chars()
                    .flat_map(|c| u16::try_from(u32::from(c)).expect("a BMP character").to_be_bytes())
                    .collect();
                ("F2", Object::String(codes, StringFormat::Hexadecimal))
            } else {
                let latin1: Vec<u8> = line.chars().map(|c| u8::try_from(u32::from(c)).expect("latin-1")).collect();
                ("F1", Object::String(latin1, StringFormat::Literal))
            };
            operations.extend([
                Operation::new("BT", vec![]),
                Operation::new("Tf", vec![font.into(), paragraph.size.into()]),
                Operation::new("Td", vec![72.into(), y.into()]),
                Operation::new("Tj", vec![string]),
                Operation::new("ET", vec![]),
            ]);
        }
        y -= paragraph.size * 1.2;
    }
    Content { operations }
}

/// A `ToUnicode` map from each two-byte code to the character with that code point.
fn to_unicode_cmap(chars: &BTreeSet<char>) -> String {
    let mut cmap = String::from(
        "/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n/CMapName /Identity-UCS def\n/CMapType 2 def\n1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n",
    );
    let chars: Vec<char> = chars.iter().copied().collect();
    for group in chars.chunks(100) {
        writeln!(cmap, "{} beginbfchar", group.len()).expect("write to a string");
        for c in group {
            let code = u32::from(*c);
            writeln!(cmap, "<{code:04X}> <{code:04X}>").expect("write to a string");
        }
        cmap.push_str("endbfchar\n");
    }
    cmap.push_str("endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend\n");
    cmap
}

/// A PDF whose only page draws a filled rectangle and an image-like shape, with no text: what a
/// scan without OCR looks like to a text extractor.
pub fn pdf_without_text() -> Vec<u8> {
    let mut document = pdf_document(&[vec![]], None);
    let page = *document.get_pages().values().next().expect("a page");
    let content = Content {
        operations: vec![
            Operation::new("re", vec![0.into(), 0.into(), 595.into(), 842.into()]),
            Operation::new("f", vec![]),
        ],
    };
    let contents = document.add_object(Stream::new(dictionary! {}, content.encode().expect("encode")));
    document.get_dictionary_mut(page).expect("page").set("Contents", contents);
    save(&mut document)
}

/// The same PDF, encrypted (RC4, 128 bits) with these passwords.
pub fn encrypted_pdf(owner_password: &str, user_password: &str) -> Vec<u8> {
    let mut document = pdf_document(&[vec![para(12.0, &["Secret text."])]], None);
    let state = lopdf::EncryptionState::try_from(lopdf::EncryptionVersion::V2 {
        document: &document,
        owner_password,
        user_password,
        key_length: 128,
        permissions: lopdf::Permissions::all(),
    })
    .expect("encryption state");
    document.encrypt(&state).expect("encrypt");
    save(&mut document)
}

/// DOCX parts.
pub const CONTENT_TYPES: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/><Override PartName="/word/styles.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.styles+xml"/></Types>"#;
pub const RELS: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>"#;

/// Styles as a Chinese Word writes them: localised style ids, English built-in names.
pub const STYLES: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:styles xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">
<w:style w:type="paragraph" w:default="1" w:styleId="a"><w:name w:val="Normal"/></w:style>
<w:style w:type="paragraph" w:styleId="1"><w:name w:val="heading 1"/><w:basedOn w:val="a"/><w:pPr><w:outlineLvl w:val="0"/></w:pPr></w:style>
<w:style w:type="paragraph" w:styleId="2"><w:name w:val="heading 2"/><w:basedOn w:val="a"/></w:style>
<w:style w:type="paragraph" w:styleId="a3"><w:name w:val="Title"/><w:basedOn w:val="a"/></w:style>
<w:style w:type="paragraph" w:styleId="a5"><w:name w:val="List Paragraph"/><w:basedOn w:val="a"/></w:style>
<w:style w:type="paragraph" w:styleId="MyHeading"><w:name w:val="My Heading"/><w:basedOn w:val="1"/></w:style>
</w:styles>"#;

pub const CORE: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cp:coreProperties xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/core-properties" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>安装手册 &amp; Guide</dc:title></cp:coreProperties>"#;

/// A `w:p` with an optional style and the given runs' text.
pub fn paragraph(style: Option<&str>, text: &str) -> String {
    let properties = style.map(|style| format!(r#"<w:pPr><w:pStyle w:val="{style}"/></w:pPr>"#)).unwrap_or_default();
    format!(r#"<w:p>{properties}<w:r><w:t xml:space="preserve">{}</w:t></w:r></w:p>"#, escape(text))
}

pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub fn document_xml(body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main" xmlns:mc="http://schemas.openxmlformats.org/markup-compatibility/2006"><w:body>{body}<w:sectPr/></w:body></w:document>"#
    )
}

/// A zip of the given parts, deflated.
pub fn zip(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in parts {
        writer.start_file(*name, options).expect("start zip entry");
        writer.write_all(bytes).expect("write zip entry");
    }
    writer.finish().expect("finish zip").into_inner()
}

/// A DOCX with this body, the styles above and the core properties.
pub fn docx(body: &str) -> Vec<u8> {
    let document = document_xml(body);
    zip(&[
        ("[Content_Types].xml", CONTENT_TYPES.as_bytes()),
        ("_rels/.rels", RELS.as_bytes()),
        ("word/document.xml", document.as_bytes()),
        ("word/styles.xml", STYLES.as_bytes()),
        ("docProps/core.xml", CORE.as_bytes()),
    ])
}

/// Rewrites the uncompressed size that the zip's local and central headers declare for
/// every entry, as a crafted archive would.
pub fn patch_declared_sizes(zip: &mut [u8], declared: u32) {
    let patch = |zip: &mut [u8], at: usize| zip[at..at + 4].copy_from_slice(&declared.to_le_bytes());
    let mut offset = 0;
    while offset + 4 <= zip.len() {
        match &zip[offset..offset + 4] {
            b"PK\x03\x04" if offset + 26 <= zip.len() => patch(zip, offset + 22),
            b"PK\x01\x02" if offset + 28 <= zip.len() => patch(zip, offset + 24),
            _ => {}
        }
        offset += 1;
    }
}
