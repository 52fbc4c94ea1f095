//! Parsing never panics, whatever the bytes: random bytes and mutated real documents go to
//! every parser, which must return a document or an error. Any document returned keeps the
//! block invariants.

#[path = "parse/fixtures.rs"]
mod fixtures;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::LazyLock;

use maas_knowledge::parse::{DocumentKind, ParseLimits, parse};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;

/// Cases per property: well under a second each (20,000 each ran clean when this was written).
const CASES: u32 = 3_000;

/// Small limits, so that a mutation that inflates cannot make a case slow.
fn limits() -> ParseLimits {
    ParseLimits { max_bytes: 1024 * 1024, max_inflated_bytes: 4 * 1024 * 1024, max_pages: 50, ..ParseLimits::default() }
}

/// The kind of each seed.
const SEED_KINDS: [DocumentKind; 6] = [
    DocumentKind::Pdf,
    DocumentKind::Pdf,
    DocumentKind::Docx,
    DocumentKind::Text,
    DocumentKind::Markdown,
    DocumentKind::Html,
];

/// Valid documents of every kind to mutate.
static SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let pages = vec![
        vec![fixtures::para(18.0, &["Heading"]), fixtures::para(11.0, &["Body text on", "two lines."])],
        vec![fixtures::para(11.0, &["中文内容。"])],
    ];
    let mut uncompressed = fixtures::pdf_document(&pages, Some("Title"));
    vec![
        fixtures::pdf(&pages, Some("Title")),
        fixtures::save(&mut uncompressed),
        fixtures::docx(
            &[fixtures::paragraph(Some("1"), "标题"), fixtures::paragraph(None, "Body & more."), fixtures::paragraph(Some("a5"), "item")]
                .concat(),
        ),
        "Title line\n\n第二段。\u{C}Page two.".as_bytes().to_vec(),
        "---\ntitle: x\n---\n# H1\n\n- a\n- b\n\n```\ncode\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n".as_bytes().to_vec(),
        "<html><head><title>T</title></head><body><h1>H</h1><p>para<br>graph</p><table><tr><td>1</td></tr></table><ul><li>x</li></ul></body></html>"
            .as_bytes()
            .to_vec(),
    ]
});

fn kind(index: usize) -> DocumentKind {
    DocumentKind::ALL[index % DocumentKind::ALL.len()]
}

/// Parses, failing the case if the parser panicked or returned a malformed document.
fn check(bytes: &[u8], kind: DocumentKind) -> Result<(), TestCaseError> {
    let result = catch_unwind(AssertUnwindSafe(|| parse(bytes, kind, &limits())));
    let Ok(result) = result else {
        return Err(TestCaseError::fail(format!("parsing {} bytes as {kind} panicked", bytes.len())));
    };
    if let Ok(document) = result {
        prop_assert!(!document.blocks.is_empty());
        prop_assert!(document.page_count >= 1);
        for block in &document.blocks {
            prop_assert!(!block.text.is_empty() && block.text.trim() == block.text, "bad block {:?}", block);
            prop_assert!(block.page >= 1 && block.page <= document.page_count.max(block.page));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: CASES, failure_persistence: None, ..Config::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048), kind_index in 0..5_usize) {
        check(&bytes, kind(kind_index))?;
    }

    #[test]
    fn random_bytes_with_a_format_prefix_never_panic(
        prefix_index in 0..4_usize,
        bytes in vec(any::<u8>(), 0..2048),
        kind_index in 0..5_usize,
    ) {
        // A PDF body between a header and an end-of-file marker reaches lopdf's parser.
        let (prefix, suffix): (&[u8], &[u8]) =
            [(b"%PDF-1.7\n".as_slice(), b"\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n".as_slice()), (b"PK\x03\x04", b""), (b"<html><body>", b""), (b"# ", b"")]
                [prefix_index];
        let input = [prefix, bytes.as_slice(), suffix].concat();
        check(&input, kind(kind_index))?;
    }

    #[test]
    fn mutated_documents_never_panic(
        seed in any::<Index>(),
        flips in vec((any::<Index>(), any::<u8>()), 0..12),
        cut in proptest::option::of(any::<Index>()),
        splice in proptest::option::of((any::<Index>(), vec(any::<u8>(), 1..64))),
        other_parser in proptest::bool::weighted(0.2),
        other_kind in 0..5_usize,
    ) {
        let seed_index = seed.index(SEEDS.len());
        let mut bytes = SEEDS[seed_index].clone();
        for (at, value) in flips {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        if let Some((at, insert)) = splice {
            let at = at.index(bytes.len());
            bytes.splice(at..at, insert);
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        // Each seed under its own parser most of the time, under another now and then.
        let kind = if other_parser { kind(other_kind) } else { SEED_KINDS[seed_index] };
        check(&bytes, kind)?;
    }
}

#[test]
fn the_seeds_parse() {
    for (bytes, kind) in SEEDS.iter().zip(SEED_KINDS) {
        parse(bytes, kind, &limits()).unwrap_or_else(|error| panic!("seed {kind}: {error}"));
    }
}
