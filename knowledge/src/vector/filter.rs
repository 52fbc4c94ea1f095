//! Search filters: evaluated in the embedded store, and written as Milvus boolean
//! expressions.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::SearchFilter;

/// A [`SearchFilter`] with its lists as sets, to test many chunks against.
#[derive(Debug)]
pub(crate) struct CompiledFilter<'a> {
    documents: Option<HashSet<&'a str>>,
    tags: Option<HashSet<&'a str>>,
    versions: Option<HashSet<i64>>,
}

impl<'a> CompiledFilter<'a> {
    pub(crate) fn new(filter: &'a SearchFilter) -> Self {
        CompiledFilter {
            documents: filter.document_ids.as_ref().map(|ids| ids.iter().map(String::as_str).collect()),
            tags: filter.tags.as_ref().map(|tags| tags.iter().map(String::as_str).collect()),
            versions: filter.versions.as_ref().map(|versions| versions.iter().copied().collect()),
        }
    }

    pub(crate) fn matches(&self, document_id: &str, version: i64, tags: &[String]) -> bool {
        self.documents.as_ref().is_none_or(|documents| documents.contains(document_id))
            && self.versions.as_ref().is_none_or(|versions| versions.contains(&version))
            && self.tags.as_ref().is_none_or(|wanted| tags.iter().any(|tag| wanted.contains(tag.as_str())))
    }
}

/// A string literal of Milvus's expression language. JSON's escapes (`\"`, `\\`, `\n`,
/// `\uXXXX`) are the ones Milvus's parser reads, so no value can end the literal early.
pub(crate) fn milvus_string(value: &str) -> String {
    serde_json::to_string(value).expect("a string serialises")
}

/// The Milvus boolean expression for a filter over the fields `document_id`, `version` and
/// `tags`; empty for no condition. The caller handles [`SearchFilter::matches_nothing`].
pub(crate) fn milvus_expression(filter: &SearchFilter) -> String {
    let mut clauses: Vec<String> = Vec::new();
    if let Some(documents) = &filter.document_ids {
        clauses.push(format!("document_id in [{}]", join(documents.iter().map(|d| milvus_string(d)))));
    }
    if let Some(versions) = &filter.versions {
        clauses.push(format!("version in [{}]", join(versions.iter().map(i64::to_string))));
    }
    if let Some(tags) = &filter.tags {
        clauses.push(format!("array_contains_any(tags, [{}])", join(tags.iter().map(|t| milvus_string(t)))));
    }
    clauses.join(" and ")
}

/// `chunk_id in [..]` for chunk ids (stored in Milvus as the `i64` with the same bits).
pub(crate) fn milvus_ids_expression(chunk_ids: &[u64]) -> String {
    let mut out = String::from("chunk_id in [");
    for (i, chunk_id) in chunk_ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}", i64::from_ne_bytes(chunk_id.to_ne_bytes()));
    }
    out.push(']');
    out
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_condition_must_hold() {
        let filter = SearchFilter::default().documents(["a", "b"]).tags(["x"]).versions([2]);
        let compiled = CompiledFilter::new(&filter);
        let tags = |t: &[&str]| t.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(compiled.matches("a", 2, &tags(&["y", "x"])));
        assert!(!compiled.matches("c", 2, &tags(&["x"])));
        assert!(!compiled.matches("a", 1, &tags(&["x"])));
        assert!(!compiled.matches("a", 2, &tags(&[])));
        assert!(CompiledFilter::new(&SearchFilter::default()).matches("any", 0, &[]));
    }

    #[test]
    fn milvus_expressions_quote_every_value() {
        let filter = SearchFilter::default().documents(["a\"] or true or [\""]).tags(["t\\"]).versions([-1, 3]);
        assert_eq!(
            milvus_expression(&filter),
            r#"document_id in ["a\"] or true or [\""] and version in [-1, 3] and array_contains_any(tags, ["t\\"])"#
        );
        assert_eq!(milvus_expression(&SearchFilter::default()), "");
        assert_eq!(milvus_ids_expression(&[1, u64::MAX]), "chunk_id in [1,-1]");
    }
}
