//! Which parser an upload needs, from its first bytes, its file name and its content type.

use super::{DocumentKind, ParseError};

const DOCX_CONTENT_TYPE: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

impl DocumentKind {
    /// The kind of an upload. The first bytes win where they are certain (`%PDF-`, a zip), then
    /// the file name's extension, then the content type, then a look at the bytes (HTML markup,
    /// or else text). Formats that are recognised but not read (legacy `.doc`, other zip-based
    /// formats, images) are [`ParseError::Unsupported`] with a hint.
    pub fn detect(filename: Option<&str>, content_type: Option<&str>, head: &[u8]) -> Result<DocumentKind, ParseError> {
        let extension = filename
            .and_then(|name| name.rsplit_once('.'))
            .map(|(_, extension)| extension.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let content_type = content_type
            .map(|value| value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
            .unwrap_or_default();
        let unsupported = |what: &str| ParseError::Unsupported { what: what.to_owned() };

        if find(head, b"%PDF-").is_some_and(|at| at < 1024) {
            return Ok(DocumentKind::Pdf);
        }
        if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            // A zip: only a Word document is read; the parser says so if it is not one.
            return if extension == "docx" || content_type == DOCX_CONTENT_TYPE || extension.is_empty() {
                Ok(DocumentKind::Docx)
            } else {
                Err(unsupported(&format!("a .{extension} archive")))
            };
        }
        if head.starts_with(&[0xD0, 0xCF, 0x11, 0xE0]) {
            return Err(unsupported("a legacy Office file (.doc: save it as .docx)"));
        }
        if let Some(kind) = from_extension(&extension) {
            return Ok(kind);
        }
        if let Some(kind) = from_content_type(&content_type) {
            return Ok(kind);
        }
        if let Some(what) = binary_signature(head) {
            return Err(unsupported(what));
        }
        if looks_like_html(head) {
            return Ok(DocumentKind::Html);
        }
        // Anything else that reads as text (a log, source code, CSV) is indexed as text.
        let utf16 = head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]);
        if head.contains(&0) && !utf16 {
            let what =
                if extension.is_empty() { "a binary file".to_owned() } else { format!("a binary .{extension} file") };
            return Err(unsupported(&what));
        }
        Ok(DocumentKind::Text)
    }
}

fn from_extension(extension: &str) -> Option<DocumentKind> {
    match extension {
        "pdf" => Some(DocumentKind::Pdf),
        "docx" => Some(DocumentKind::Docx),
        "txt" | "text" => Some(DocumentKind::Text),
        "md" | "markdown" | "mdown" | "mkd" => Some(DocumentKind::Markdown),
        "html" | "htm" | "xhtml" => Some(DocumentKind::Html),
        _ => None,
    }
}

fn from_content_type(content_type: &str) -> Option<DocumentKind> {
    match content_type {
        "application/pdf" => Some(DocumentKind::Pdf),
        DOCX_CONTENT_TYPE => Some(DocumentKind::Docx),
        "text/plain" => Some(DocumentKind::Text),
        "text/markdown" | "text/x-markdown" => Some(DocumentKind::Markdown),
        "text/html" | "application/xhtml+xml" => Some(DocumentKind::Html),
        _ => None,
    }
}

/// Common binary formats a user might upload by mistake.
fn binary_signature(head: &[u8]) -> Option<&'static str> {
    const SIGNATURES: [(&[u8], &str); 6] = [
        (b"\x89PNG", "a PNG image"),
        (b"\xFF\xD8\xFF", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"\x1F\x8B", "a gzip archive"),
        (b"Rar!", "a RAR archive"),
        (b"7z\xBC\xAF", "a 7-Zip archive"),
    ];
    SIGNATURES.iter().find(|(magic, _)| head.starts_with(magic)).map(|(_, what)| *what)
}

fn looks_like_html(head: &[u8]) -> bool {
    let start = head.iter().position(|byte| !byte.is_ascii_whitespace()).unwrap_or(head.len());
    let head = &head[start..head.len().min(start + 512)];
    let lowered = head.to_ascii_lowercase();
    lowered.starts_with(b"<!doctype html") || lowered.starts_with(b"<html") || find(&lowered, b"<html").is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}
