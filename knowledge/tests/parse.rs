//! Parsing through the crate's public API, on documents made in code: every format, Chinese
//! text, headings and pages, and every way a bad upload is refused.

#[path = "parse/fixtures.rs"]
mod fixtures;

use std::fmt::Write as _;

use fixtures::{docx, para, paragraph, pdf};
use maas_knowledge::parse::{Block, BlockKind, DocumentKind, ParseError, ParseLimits, ParsedDocument, parse};

fn parse_ok(bytes: &[u8], kind: DocumentKind) -> ParsedDocument {
    parse(bytes, kind, &ParseLimits::default()).unwrap_or_else(|error| panic!("{kind} should parse: {error}"))
}

fn parse_err(bytes: &[u8], kind: DocumentKind, limits: &ParseLimits) -> ParseError {
    match parse(bytes, kind, limits) {
        Ok(document) => panic!("{kind} should be refused, parsed {:?}", document.blocks),
        Err(error) => error,
    }
}

fn path(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
}

/// `(kind, text, heading path, page)` of each block, for compact comparisons.
fn summary(document: &ParsedDocument) -> Vec<(BlockKind, &str, Vec<String>, u32)> {
    document
        .blocks
        .iter()
        .map(|block| (block.kind, block.text.as_str(), block.heading_path.clone(), block.page))
        .collect()
}

fn assert_blocks_are_clean(blocks: &[Block]) {
    for block in blocks {
        assert!(!block.text.is_empty(), "empty block {block:?}");
        assert_eq!(block.text.trim(), block.text, "untrimmed block {block:?}");
        assert!(block.page >= 1, "page 0 in {block:?}");
    }
}

const H1: BlockKind = BlockKind::Heading { level: 1 };
const H2: BlockKind = BlockKind::Heading { level: 2 };
const P: BlockKind = BlockKind::Paragraph;
const LI: BlockKind = BlockKind::ListItem;

/// `(file name, content type, first bytes, the kind detected or None if refused)`.
type DetectCase = (Option<&'static str>, Option<&'static str>, &'static [u8], Option<DocumentKind>);

#[test]
fn detection_uses_magic_bytes_then_extension_then_content_type_then_content() {
    let docx_type = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";
    let table: [DetectCase; 16] = [
        (Some("report.bin"), None, b"%PDF-1.7\n", Some(DocumentKind::Pdf)),
        (None, None, b"\n%PDF-1.4", Some(DocumentKind::Pdf)),
        (Some("notes.docx"), None, b"PK\x03\x04rest", Some(DocumentKind::Docx)),
        (Some("upload"), Some(docx_type), b"PK\x03\x04rest", Some(DocumentKind::Docx)),
        (Some("book.epub"), None, b"PK\x03\x04rest", None),
        (Some("old.doc"), None, b"\xD0\xCF\x11\xE0\xA1\xB1", None),
        (Some("README.md"), Some("text/plain"), b"# Title", Some(DocumentKind::Markdown)),
        (Some("page.HTM"), None, b"<p>hi</p>", Some(DocumentKind::Html)),
        (Some("notes.txt"), None, b"hello", Some(DocumentKind::Text)),
        (None, Some("text/markdown; charset=utf-8"), b"hello", Some(DocumentKind::Markdown)),
        (None, Some("application/pdf"), b"garbage", Some(DocumentKind::Pdf)),
        (None, None, b"  <!DOCTYPE html><html>", Some(DocumentKind::Html)),
        (Some("photo.png"), None, b"\x89PNG\r\n", None),
        (Some("main.rs"), None, b"fn main() {}", Some(DocumentKind::Text)),
        (Some("data.bin"), None, b"\x00\x01\x02", None),
        (Some("notes"), None, b"\xFF\xFEh\x00i\x00", Some(DocumentKind::Text)),
    ];
    for (filename, content_type, head, expected) in table {
        let detected = DocumentKind::detect(filename, content_type, head);
        match expected {
            Some(kind) => assert_eq!(detected, Ok(kind), "{filename:?} {content_type:?}"),
            None => assert!(
                matches!(detected, Err(ParseError::Unsupported { .. })),
                "{filename:?} should be unsupported, got {detected:?}"
            ),
        }
    }
    let legacy = DocumentKind::detect(Some("old.doc"), None, b"\xD0\xCF\x11\xE0").unwrap_err().to_string();
    assert!(legacy.contains("save it as .docx"), "{legacy}");
}

#[test]
fn text_paragraphs_split_at_blank_lines_and_pages_at_form_feeds() {
    let text = "First paragraph\nstill first.\n\n  \n第二段：中文内容保持完整。\n\u{C}Page two.\r\n\r\nLast.";
    let document = parse_ok(text.as_bytes(), DocumentKind::Text);
    assert_eq!(
        summary(&document),
        vec![
            (P, "First paragraph\nstill first.", vec![], 1),
            (P, "第二段：中文内容保持完整。", vec![], 1),
            (P, "Page two.", vec![], 2),
            (P, "Last.", vec![], 2),
        ]
    );
    assert_eq!(document.page_count, 2);
    assert_eq!(document.title, None);
}

#[test]
fn text_encodings_utf8_with_bom_and_utf16_decode_and_others_are_refused() {
    let mut utf8_bom = vec![0xEF, 0xBB, 0xBF];
    utf8_bom.extend("中文 text".as_bytes());
    let mut little_endian = vec![0xFF, 0xFE];
    little_endian.extend("中文 text".encode_utf16().flat_map(u16::to_le_bytes));
    let mut big_endian = vec![0xFE, 0xFF];
    big_endian.extend("中文 text".encode_utf16().flat_map(u16::to_be_bytes));
    for bytes in [utf8_bom, little_endian, big_endian] {
        assert_eq!(parse_ok(&bytes, DocumentKind::Text).blocks[0].text, "中文 text");
    }
    // "中文" in GBK is not UTF-8: refused with where it goes wrong, not indexed as garbage.
    let gbk = b"ok \xD6\xD0\xCE\xC4";
    for kind in [DocumentKind::Text, DocumentKind::Markdown, DocumentKind::Html] {
        let error = parse_err(gbk, kind, &ParseLimits::default());
        assert_eq!(error, ParseError::NotUtf8 { kind, offset: 3 });
        assert!(error.to_string().contains("save it as UTF-8"), "{error}");
    }
}

#[test]
fn markdown_gives_headings_lists_code_tables_and_the_front_matter_title() {
    let markdown = "---\ntitle: \"安装指南\"\n---\n# Install\n\nIntro text\nwrapped line.\n\n## On Linux\n\n- first item\n- second **bold** item\n  1. nested\n\n```sh\napt install maas\n  indented\n```\n\n| a | b |\n|---|---|\n| 1 | 中 |\n\n<div>raw html is skipped</div>\n\n## 中文\n\n第一行\n第二行。\n\n# Use\n\nDone.\n";
    let document = parse_ok(markdown.as_bytes(), DocumentKind::Markdown);
    assert_eq!(document.title.as_deref(), Some("安装指南"));
    let linux = path(&["Install", "On Linux"]);
    assert_eq!(
        summary(&document),
        vec![
            (H1, "Install", path(&["Install"]), 1),
            (P, "Intro text wrapped line.", path(&["Install"]), 1),
            (H2, "On Linux", linux.clone(), 1),
            (LI, "first item", linux.clone(), 1),
            (LI, "second bold item", linux.clone(), 1),
            (LI, "nested", linux.clone(), 1),
            (BlockKind::Code, "apt install maas\n  indented", linux.clone(), 1),
            (BlockKind::Table, "a | b\n1 | 中", linux, 1),
            (H2, "中文", path(&["Install", "中文"]), 1),
            (P, "第一行第二行。", path(&["Install", "中文"]), 1),
            (H1, "Use", path(&["Use"]), 1),
            (P, "Done.", path(&["Use"]), 1),
        ]
    );
    let without_front_matter = parse_ok(b"Preface.\n\n# The Title\n\nBody.", DocumentKind::Markdown);
    assert_eq!(without_front_matter.title.as_deref(), Some("The Title"));
}

#[test]
fn html_skips_scripts_styles_and_navigation_and_keeps_structure() {
    let html = r#"<!DOCTYPE html><html><head><title> Guide &amp; 指南 </title><style>p { color: red }</style>
        <script>var hidden = "no";</script></head><body>
        <nav><a href="/">Home</a> <a href="/docs">Docs</a></nav>
        <h1>Install</h1><p>Run   the
        installer.<br>Then restart.</p>
        <div hidden>secret</div><div aria-hidden="true">also hidden</div>
        <h2>On Linux</h2><ul><li>apt <b>install</b></li><li>done</li></ul>
        <pre>  code
   kept</pre>
        <table><tr><th>key</th><th>value</th></tr><tr><td>语言</td><td><p>中文</p></td></tr></table>
        <h3>深入</h3><div><div><p>嵌套的段落。</p></div></div>
        <noscript>enable js</noscript></body></html>"#;
    let document = parse_ok(html.as_bytes(), DocumentKind::Html);
    assert_eq!(document.title.as_deref(), Some("Guide & 指南"));
    let linux = path(&["Install", "On Linux"]);
    assert_eq!(
        summary(&document),
        vec![
            (H1, "Install", path(&["Install"]), 1),
            (P, "Run the installer.\nThen restart.", path(&["Install"]), 1),
            (H2, "On Linux", linux.clone(), 1),
            (LI, "apt install", linux.clone(), 1),
            (LI, "done", linux.clone(), 1),
            (BlockKind::Code, "code\n   kept", linux.clone(), 1),
            (BlockKind::Table, "key | value\n语言 | 中文", linux, 1),
            (BlockKind::Heading { level: 3 }, "深入", path(&["Install", "On Linux", "深入"]), 1),
            (P, "嵌套的段落。", path(&["Install", "On Linux", "深入"]), 1),
        ]
    );
}

#[test]
fn deeply_nested_html_does_not_overflow_the_stack() {
    let depth = 10_000;
    let html = format!("{}deep text{}", "<div><span>".repeat(depth), "</span></div>".repeat(depth));
    let document = parse_ok(html.as_bytes(), DocumentKind::Html);
    assert_eq!(document.blocks.len(), 1);
    assert_eq!(document.blocks[0].text, "deep text");
}

#[test]
fn pdf_text_comes_per_page_with_headings_from_font_sizes_and_chinese_intact() {
    let pages = vec![
        vec![
            para(20.0, &["Installation Guide"]),
            para(11.0, &["This guide explains how to install", "the platform on a server."]),
            para(15.0, &["On Linux"]),
            para(11.0, &["• Download the package."]),
            para(11.0, &["• Run the installer."]),
        ],
        vec![
            para(15.0, &["中文部分"]),
            para(11.0, &["这是第一行中文文本，", "这是第二行。"]),
            para(11.0, &["Last words."]),
        ],
    ];
    let bytes = pdf(&pages, Some("Maas 指南"));
    let document = parse_ok(&bytes, DocumentKind::Pdf);
    assert_eq!(document.page_count, 2);
    assert_eq!(document.title.as_deref(), Some("Maas 指南"));
    let guide = path(&["Installation Guide"]);
    let linux = path(&["Installation Guide", "On Linux"]);
    let chinese = path(&["Installation Guide", "中文部分"]);
    assert_eq!(
        summary(&document),
        vec![
            (H1, "Installation Guide", guide.clone(), 1),
            (P, "This guide explains how to install the platform on a server.", guide, 1),
            (H2, "On Linux", linux.clone(), 1),
            (LI, "• Download the package.", linux.clone(), 1),
            (LI, "• Run the installer.", linux, 1),
            (H2, "中文部分", chinese.clone(), 2),
            (P, "这是第一行中文文本，这是第二行。", chinese.clone(), 2),
            (P, "Last words.", chinese, 2),
        ]
    );
}

#[test]
fn pdf_without_a_title_entry_takes_its_first_large_heading() {
    let bytes = pdf(&[vec![para(18.0, &["Annual Report"]), para(10.0, &["Body text here."])]], None);
    assert_eq!(parse_ok(&bytes, DocumentKind::Pdf).title.as_deref(), Some("Annual Report"));
}

#[test]
fn pdf_refusals_name_the_reason() {
    let limits = ParseLimits::default();
    let three_pages =
        pdf(&[vec![para(11.0, &["one"])], vec![para(11.0, &["two"])], vec![para(11.0, &["three"])]], None);
    let error = parse_err(&three_pages, DocumentKind::Pdf, &ParseLimits { max_pages: 2, ..limits.clone() });
    assert_eq!(error, ParseError::TooManyPages { pages: 3, max_pages: 2 });

    let scanned = parse_err(&fixtures::pdf_without_text(), DocumentKind::Pdf, &limits);
    assert!(matches!(scanned, ParseError::Empty { kind: DocumentKind::Pdf, .. }), "{scanned:?}");
    assert!(scanned.to_string().contains("OCR"), "{scanned}");

    let locked = parse_err(&fixtures::encrypted_pdf("owner", "user"), DocumentKind::Pdf, &limits);
    assert_eq!(locked, ParseError::Encrypted);
    // An owner password alone (empty user password) restricts editing, not reading.
    let owner_only = parse_ok(&fixtures::encrypted_pdf("owner", ""), DocumentKind::Pdf);
    assert_eq!(owner_only.blocks[0].text, "Secret text.");

    for cut in [three_pages.len() / 2, 20, 9] {
        let error = parse_err(&three_pages[..cut], DocumentKind::Pdf, &limits);
        assert!(matches!(error, ParseError::Corrupt { .. } | ParseError::Empty { .. }), "cut at {cut}: {error:?}");
    }
    let error = parse_err(b"not a pdf at all", DocumentKind::Pdf, &limits);
    assert!(matches!(error, ParseError::Corrupt { kind: DocumentKind::Pdf, .. }), "{error:?}");
}

#[test]
fn pdf_content_that_inflates_past_the_limit_is_a_decompression_bomb() {
    let long_line = "A line of text that repeats. ".repeat(20);
    let paragraphs: Vec<_> = (0..40).map(|_| para(11.0, &[long_line.as_str()])).collect();
    let bytes = pdf(&[paragraphs], None);
    let limits = ParseLimits { max_inflated_bytes: 4 * 1024, ..ParseLimits::default() };
    let error = parse_err(&bytes, DocumentKind::Pdf, &limits);
    assert!(matches!(error, ParseError::DecompressionBomb { kind: DocumentKind::Pdf, .. }), "{error:?}");
    // The same file under the default limits parses.
    assert_eq!(parse_ok(&bytes, DocumentKind::Pdf).page_count, 1);
}

#[test]
fn docx_headings_come_from_style_names_even_with_localised_ids() {
    let body = [
        paragraph(Some("a3"), "产品手册"),
        paragraph(Some("1"), "安装"),
        paragraph(None, "先下载安装包。"),
        paragraph(Some("2"), "On Linux"),
        paragraph(Some("a5"), "apt install maas"),
        r#"<w:p><w:pPr><w:numPr><w:ilvl w:val="0"/><w:numId w:val="1"/></w:numPr></w:pPr><w:r><w:t>numbered item</w:t></w:r></w:p>"#.to_owned(),
        "<w:tbl><w:tr><w:tc><w:p><w:r><w:t>键</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>值</w:t></w:r></w:p></w:tc></w:tr><w:tr><w:tc><w:p><w:r><w:t>a</w:t></w:r></w:p><w:p><w:r><w:t>b</w:t></w:r></w:p></w:tc><w:tc><w:p/></w:tc></w:tr></w:tbl>".to_owned(),
        r#"<w:p><w:r><w:t>before</w:t></w:r><w:r><w:br w:type="page"/></w:r><w:r><w:t xml:space="preserve"> after &amp; more</w:t></w:r></w:p>"#.to_owned(),
        r#"<w:p><w:r><w:t>kept</w:t></w:r><w:del><w:r><w:delText>deleted</w:delText></w:r></w:del><w:r><mc:AlternateContent><mc:Choice><w:t xml:space="preserve"> once</w:t></mc:Choice><mc:Fallback><w:t>twice</w:t></mc:Fallback></mc:AlternateContent></w:r></w:p>"#.to_owned(),
        paragraph(Some("MyHeading"), "Custom heading"),
        "<w:p><w:pPr><w:pageBreakBefore/></w:pPr><w:r><w:t>page three</w:t></w:r></w:p>".to_owned(),
    ]
    .concat();
    let document = parse_ok(&docx(&body), DocumentKind::Docx);
    assert_eq!(document.title.as_deref(), Some("安装手册 & Guide"));
    assert_eq!(document.page_count, 3);
    let linux = path(&["安装", "On Linux"]);
    let custom = path(&["Custom heading"]);
    assert_eq!(
        summary(&document),
        vec![
            (P, "产品手册", vec![], 1),
            (H1, "安装", path(&["安装"]), 1),
            (P, "先下载安装包。", path(&["安装"]), 1),
            (H2, "On Linux", linux.clone(), 1),
            (LI, "apt install maas", linux.clone(), 1),
            (LI, "numbered item", linux.clone(), 1),
            (BlockKind::Table, "键 | 值\na b |", linux.clone(), 1),
            (P, "before after & more", linux.clone(), 1),
            (P, "kept once", linux, 2),
            (H1, "Custom heading", custom.clone(), 2),
            (P, "page three", custom, 3),
        ]
    );
}

#[test]
fn docx_title_falls_back_to_the_title_paragraph() {
    let document_xml = fixtures::document_xml(&[paragraph(Some("a3"), "My Title"), paragraph(None, "Body.")].concat());
    let bytes = fixtures::zip(&[
        ("word/document.xml", document_xml.as_bytes()),
        ("word/styles.xml", fixtures::STYLES.as_bytes()),
    ]);
    assert_eq!(parse_ok(&bytes, DocumentKind::Docx).title.as_deref(), Some("My Title"));
}

#[test]
fn docx_that_is_not_a_word_document_is_corrupt_with_the_reason() {
    let limits = ParseLimits::default();
    let no_document = fixtures::zip(&[("hello.txt", b"hi".as_slice())]);
    let broken_xml = fixtures::zip(&[("word/document.xml", b"<document><body></p></body>".as_slice())]);
    let whole = docx(&paragraph(None, "text"));
    let table: [(&[u8], &str); 4] = [
        (b"plain text, not a zip", "not a zip archive"),
        (&no_document, "word/document.xml"),
        (&broken_xml, "not well-formed xml"),
        (&whole[..whole.len() / 2], "not a zip archive"),
    ];
    for (bytes, reason) in table {
        let error = parse_err(bytes, DocumentKind::Docx, &limits);
        assert!(matches!(error, ParseError::Corrupt { kind: DocumentKind::Docx, .. }), "{error:?}");
        assert!(error.to_string().contains(reason), "{error} should mention {reason}");
    }
    let empty = parse_err(&docx(&paragraph(None, "   ")), DocumentKind::Docx, &limits);
    assert!(matches!(empty, ParseError::Empty { kind: DocumentKind::Docx, .. }), "{empty:?}");
}

#[test]
fn zip_bombs_are_refused_before_and_while_inflating() {
    let limits = ParseLimits { max_inflated_bytes: 8 * 1024 * 1024, max_archive_entries: 50, ..ParseLimits::default() };
    // 32 MiB of one repeated paragraph deflates to a few tens of KiB: a ratio far over 200.
    let bomb_xml = fixtures::document_xml(&paragraph(None, &"a".repeat(32 * 1024 * 1024)));
    let high_ratio = fixtures::zip(&[("word/document.xml", bomb_xml.as_bytes())]);
    // 6 MiB of the same: under the byte limit, still over the ratio.
    let ratio_only_xml = fixtures::document_xml(&paragraph(None, &"b".repeat(6 * 1024 * 1024)));
    let ratio_only = fixtures::zip(&[("word/document.xml", ratio_only_xml.as_bytes())]);
    let entries: Vec<(String, Vec<u8>)> = (0..60).map(|index| (format!("part{index}.xml"), vec![b'x'; 10])).collect();
    let entry_refs: Vec<(&str, &[u8])> =
        entries.iter().map(|(name, bytes)| (name.as_str(), bytes.as_slice())).collect();
    let many_entries = fixtures::zip(&entry_refs);
    // Declares 1 GiB for a small part.
    let mut declares_a_gigabyte = docx(&paragraph(None, "small"));
    fixtures::patch_declared_sizes(&mut declares_a_gigabyte, 1 << 30);
    let cases: [(&[u8], &str); 4] = [
        (&high_ratio, "declare"),
        (&ratio_only, "times"),
        (&many_entries, "60 archive entries"),
        (&declares_a_gigabyte, "declare"),
    ];
    for (bytes, reason) in cases {
        let error = parse_err(bytes, DocumentKind::Docx, &limits);
        assert!(matches!(error, ParseError::DecompressionBomb { kind: DocumentKind::Docx, .. }), "{error:?}");
        assert!(error.to_string().contains(reason), "{error} should mention {reason}");
    }
}

#[test]
fn a_zip_part_that_lies_about_its_size_is_caught_while_inflating() {
    // 4 MiB of text that compresses well but not past the ratio limit, declared as 100 bytes.
    let text = (0..400_000).fold(String::new(), |mut text, index| {
        write!(text, "{index:x} ").expect("write to a string");
        text
    });
    let xml = fixtures::document_xml(&paragraph(None, &text));
    let mut lying = fixtures::zip(&[("word/document.xml", xml.as_bytes())]);
    fixtures::patch_declared_sizes(&mut lying, 100);
    let limits = ParseLimits { max_inflated_bytes: 1024 * 1024, ..ParseLimits::default() };
    let error = parse_err(&lying, DocumentKind::Docx, &limits);
    assert!(
        matches!(error, ParseError::DecompressionBomb { .. } | ParseError::Corrupt { .. }),
        "a part that inflates past its declared size must be refused: {error:?}"
    );
}

#[test]
fn input_over_the_size_limit_is_refused_for_every_kind() {
    let limits = ParseLimits { max_bytes: 10, ..ParseLimits::default() };
    for kind in DocumentKind::ALL {
        assert_eq!(parse_err(&[b'a'; 11], kind, &limits), ParseError::TooLarge { size_bytes: 11, max_bytes: 10 });
    }
}

#[test]
fn empty_documents_are_refused_with_the_likely_reason() {
    let table: [(&[u8], DocumentKind, &str); 4] = [
        (b"  \n\n \t", DocumentKind::Text, "empty"),
        (b"<!-- nothing -->\n", DocumentKind::Markdown, "empty"),
        (b"<html><head><script>x()</script></head><body><nav>menu</nav></body></html>", DocumentKind::Html, "scripts"),
        (b"", DocumentKind::Text, "empty"),
    ];
    for (bytes, kind, reason) in table {
        let error = parse_err(bytes, kind, &ParseLimits::default());
        assert!(matches!(error, ParseError::Empty { .. }), "{error:?}");
        assert!(error.to_string().contains(reason), "{error} should mention {reason}");
    }
}

#[test]
fn every_parsed_block_is_trimmed_and_non_empty() {
    let documents = [
        (pdf(&[vec![para(11.0, &["  padded  "])]], None), DocumentKind::Pdf),
        (docx(&paragraph(None, "  padded  ")), DocumentKind::Docx),
        (b"  padded  \n\n\n\n  x ".to_vec(), DocumentKind::Text),
        (b"#   padded   \n\n   x   ".to_vec(), DocumentKind::Markdown),
        (b"<p>  padded  </p><p> </p>".to_vec(), DocumentKind::Html),
    ];
    for (bytes, kind) in documents {
        let document = parse_ok(&bytes, kind);
        assert_blocks_are_clean(&document.blocks);
        assert_eq!(document.blocks[0].text, "padded", "{kind}");
    }
}
