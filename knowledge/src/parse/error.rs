//! Why a document could not be parsed. Every variant is the uploader's to fix (a 4xx at the
//! API), and each message says what to do.

use super::DocumentKind;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the document is {size_bytes} bytes, over the limit of {max_bytes} bytes: split it into smaller files")]
    TooLarge { size_bytes: usize, max_bytes: usize },
    #[error("{what} is not a supported document type: upload PDF, DOCX, TXT, Markdown or HTML")]
    Unsupported { what: String },
    #[error("the {kind} file is corrupt or truncated ({reason}): export it again and upload the new file")]
    Corrupt { kind: DocumentKind, reason: String },
    #[error("the pdf is encrypted with a password: remove the password and upload it again")]
    Encrypted,
    #[error("the pdf has {pages} pages, over the limit of {max_pages}: split it into smaller files")]
    TooManyPages { pages: usize, max_pages: usize },
    #[error("the {kind} file expands too far when decompressed ({reason}); it looks like a decompression bomb")]
    DecompressionBomb { kind: DocumentKind, reason: String },
    #[error(
        "the {kind} file is not valid UTF-8 text (first bad byte at offset {offset}): save it as UTF-8 and upload it again"
    )]
    NotUtf8 { kind: DocumentKind, offset: usize },
    #[error("the {kind} file has no text to index: {reason}")]
    Empty { kind: DocumentKind, reason: &'static str },
}

impl ParseError {
    pub(crate) fn corrupt(kind: DocumentKind, reason: impl std::fmt::Display) -> Self {
        ParseError::Corrupt { kind, reason: reason.to_string() }
    }

    pub(crate) fn bomb(kind: DocumentKind, reason: impl Into<String>) -> Self {
        ParseError::DecompressionBomb { kind, reason: reason.into() }
    }
}
