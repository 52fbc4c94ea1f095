//! [`FullTextIndex`]: the tantivy index, its schema and its writer.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tantivy::collector::{Count, TopDocs};
use tantivy::directory::MmapDirectory;
use tantivy::query::{BooleanQuery, ConstScoreQuery, Occur, Query, TermQuery, TermSetQuery};
use tantivy::schema::{
    Field, INDEXED, IndexRecordOption, NumericOptions, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::tokenizer::TokenizerManager;
use tantivy::{
    DocId, Index, IndexBuilder, IndexReader, IndexWriter, ReloadPolicy, Score, SegmentReader, TantivyDocument,
    TantivyError, Term,
};

use super::analyzer::{ANALYZER_NAME, MixedTokenizer, analyze};
use super::{FORMAT_VERSION, FullTextRecord, MARKER_FILE, MAX_QUERY_TERMS, MAX_TEXT_BYTES};
use crate::error::{KnowledgeError, Result};
use crate::vector::{MAX_DOCUMENT_ID_BYTES, MAX_TAG_BYTES, MAX_TAGS, MAX_TOP_K, SearchFilter, SearchHit};

const CHUNK_ID: &str = "chunk_id";
const DOCUMENT_ID: &str = "document_id";
const VERSION: &str = "version";
const TAGS: &str = "tags";
const TEXT: &str = "text";

/// The writer's indexing memory: one thread, a little over tantivy's minimum (15 MB), so
/// an index per knowledge base stays cheap; a commit per upsert keeps segments small anyway.
const WRITER_MEMORY_BYTES: usize = 32 << 20;

/// The fields of the schema.
#[derive(Debug, Clone, Copy)]
struct Fields {
    chunk_id: Field,
    document_id: Field,
    version: Field,
    tags: Field,
    text: Field,
}

/// The schema: the chunk id is indexed (deletes find it), a fast field (searches read it
/// per hit) and stored; document id, version and tags are indexed as whole values for
/// filters and deletes; the text is analysed with term frequencies (BM25) but no
/// positions (no phrase queries) and not stored (the chunk's text lives in SQL).
fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let chunk_id = builder.add_u64_field(CHUNK_ID, NumericOptions::default().set_indexed().set_fast().set_stored());
    let document_id = builder.add_text_field(DOCUMENT_ID, STRING | STORED);
    let version = builder.add_i64_field(VERSION, INDEXED | STORED);
    let tags = builder.add_text_field(TAGS, STRING | STORED);
    let text_indexing =
        TextFieldIndexing::default().set_tokenizer(ANALYZER_NAME).set_index_option(IndexRecordOption::WithFreqs);
    let text = builder.add_text_field(TEXT, TextOptions::default().set_indexing_options(text_indexing));
    (builder.build(), Fields { chunk_id, document_id, version, tags, text })
}

/// What [`MARKER_FILE`] holds.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    format_version: u32,
    analyzer: String,
}

/// The BM25 index of one knowledge base's chunks. Shared as `Arc<FullTextIndex>`: searches
/// run concurrently; writes take turns on the one writer.
///
/// Every method is synchronous and blocks on disk I/O: call it from a blocking thread.
pub struct FullTextIndex {
    /// The folder, or `memory`, for error messages.
    location: String,
    fields: Fields,
    writer: Mutex<IndexWriter<TantivyDocument>>,
    reader: IndexReader,
}

impl std::fmt::Debug for FullTextIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FullTextIndex").field("location", &self.location).finish_non_exhaustive()
    }
}

impl FullTextIndex {
    /// Opens the index in `dir`, creating the folder and an empty index if they are not
    /// there. Only one `FullTextIndex` may have a folder open at a time (tantivy's writer
    /// lock); a second open fails until the first is dropped.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir)
            .map_err(|source| KnowledgeError::io("create the full-text index folder", dir, source))?;
        check_or_write_marker(dir)?;
        let location = dir.display().to_string();
        let directory = MmapDirectory::open(dir).map_err(|err| KnowledgeError::FullText {
            location: location.clone(),
            action: "open its folder",
            reason: err.to_string(),
        })?;
        let (schema, fields) = schema();
        let index = index_builder(schema)
            .open_or_create(directory)
            .map_err(|err| tantivy_error(&location, "open the index", &err))?;
        Self::from_index(&index, location, fields)
    }

    /// An index in memory, gone when dropped (for tests and scratch use).
    pub fn in_memory() -> Result<Self> {
        let location = "memory".to_owned();
        let (schema, fields) = schema();
        let index =
            index_builder(schema).create_in_ram().map_err(|err| tantivy_error(&location, "create the index", &err))?;
        Self::from_index(&index, location, fields)
    }

    fn from_index(index: &Index, location: String, fields: Fields) -> Result<Self> {
        let writer = index
            .writer_with_num_threads(1, WRITER_MEMORY_BYTES)
            .map_err(|err| tantivy_error(&location, "take the index's writer", &err))?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|err| tantivy_error(&location, "open a reader", &err))?;
        Ok(FullTextIndex { location, fields, writer: Mutex::new(writer), reader })
    }

    /// Indexes the records, replacing any chunk with the same id (the last record wins when
    /// an id repeats). Committed and durable when it returns; on an error nothing changed.
    pub fn upsert(&self, records: &[FullTextRecord]) -> Result<()> {
        for record in records {
            validate_record(record)?;
        }
        if records.is_empty() {
            return Ok(());
        }
        self.write("index chunks", |writer, fields| {
            for record in records {
                writer.delete_term(Term::from_field_u64(fields.chunk_id, record.chunk_id));
                let mut doc = TantivyDocument::new();
                doc.add_u64(fields.chunk_id, record.chunk_id);
                doc.add_text(fields.document_id, &record.document_id);
                doc.add_i64(fields.version, record.version);
                for tag in &record.tags {
                    doc.add_text(fields.tags, tag);
                }
                doc.add_text(fields.text, &record.text);
                writer.add_document(doc)?;
            }
            Ok(())
        })
    }

    /// Removes these chunks; ids that are not there are ignored.
    pub fn delete_chunks(&self, chunk_ids: &[u64]) -> Result<()> {
        if chunk_ids.is_empty() {
            return Ok(());
        }
        self.write("delete chunks", |writer, fields| {
            for &chunk_id in chunk_ids {
                writer.delete_term(Term::from_field_u64(fields.chunk_id, chunk_id));
            }
            Ok(())
        })
    }

    /// Removes a document's chunks: all of them, or with `keep_version`, every version but
    /// that one (a re-uploaded document retires its old chunks).
    pub fn delete_document(&self, document_id: &str, keep_version: Option<i64>) -> Result<()> {
        self.write("delete a document's chunks", |writer, fields| {
            let document = term_query(Term::from_field_text(fields.document_id, document_id));
            let query: Box<dyn Query> = match keep_version {
                None => document,
                Some(version) => Box::new(BooleanQuery::new(vec![
                    (Occur::Must, document),
                    (Occur::MustNot, term_query(Term::from_field_i64(fields.version, version))),
                ])),
            };
            writer.delete_query(query)?;
            Ok(())
        })
    }

    /// The `k` chunks that best match the query by BM25 and pass the filter, best first,
    /// ties by chunk id. A query with no terms (empty, or only punctuation) finds nothing;
    /// no query text is an error. `k` is at most [`MAX_TOP_K`].
    pub fn search(&self, query: &str, k: usize, filter: &SearchFilter) -> Result<Vec<SearchHit>> {
        self.search_with(query, k, filter, None)
    }

    /// This index's BM25 statistics for `query` (see [`TextStatistics`]).
    pub fn statistics(&self, query: &str) -> Result<TextStatistics> {
        let searcher = self.reader.searcher();
        let error = |err: tantivy::TantivyError| tantivy_error(&self.location, "read statistics", &err);
        let mut term_documents = Vec::new();
        for term in query_terms(self.fields.text, query) {
            term_documents.push(searcher.doc_freq(&term).map_err(error)?);
        }
        Ok(TextStatistics {
            documents: searcher.num_docs(),
            tokens: tantivy::query::Bm25StatisticsProvider::total_num_tokens(&searcher, self.fields.text)
                .map_err(error)?,
            term_documents,
        })
    }

    /// [`Self::search`], scored with `statistics` (several indexes' summed) instead of this
    /// index's own when given.
    pub fn search_with(
        &self,
        query: &str,
        k: usize,
        filter: &SearchFilter,
        statistics: Option<&TextStatistics>,
    ) -> Result<Vec<SearchHit>> {
        let query_text = query;
        if k > MAX_TOP_K {
            return Err(KnowledgeError::InvalidRequest { reason: format!("k = {k} is over {MAX_TOP_K}") });
        }
        let fields = self.fields;
        let Some(text_query) = text_query(fields.text, query) else {
            return Ok(Vec::new());
        };
        if k == 0 || filter.matches_nothing() {
            return Ok(Vec::new());
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, text_query)];
        if let Some(documents) = &filter.document_ids {
            let terms = documents.iter().map(|id| Term::from_field_text(fields.document_id, id));
            clauses.push((Occur::Must, filter_query(terms)));
        }
        if let Some(tags) = &filter.tags {
            clauses.push((Occur::Must, filter_query(tags.iter().map(|tag| Term::from_field_text(fields.tags, tag)))));
        }
        if let Some(versions) = &filter.versions {
            let terms = versions.iter().map(|&version| Term::from_field_i64(fields.version, version));
            clauses.push((Occur::Must, filter_query(terms)));
        }
        let query = BooleanQuery::new(clauses);
        // The sort key is (BM25 score, the smallest chunk id first), so ties are broken
        // inside the top-k collection itself, not after a cut that may have split them.
        let collector = TopDocs::with_limit(k).tweak_score(|segment: &SegmentReader| {
            let chunk_ids = segment.fast_fields().u64(CHUNK_ID).ok().map(|column| column.first_or_default_col(0));
            move |doc: DocId, score: Score| (score, Reverse(chunk_ids.as_ref().map_or(0, |ids| ids.get_val(doc))))
        });
        let searcher = self.reader.searcher();
        let top = match statistics {
            None => searcher.search(&query, &collector),
            Some(given) => {
                let terms = query_terms(fields.text, query_text).into_iter().zip(given.term_documents.iter().copied());
                let provider =
                    GivenStatistics { searcher: &searcher, text: fields.text, given, terms: terms.collect() };
                searcher.search_with_statistics_provider(&query, &collector, &provider)
            }
        }
        .map_err(|err| tantivy_error(&self.location, "search", &err))?;
        Ok(top.into_iter().map(|((score, Reverse(chunk_id)), _)| SearchHit { chunk_id, score }).collect())
    }

    /// Whether the index holds chunk `chunk_id`.
    pub fn contains(&self, chunk_id: u64) -> Result<bool> {
        let query = term_query(Term::from_field_u64(self.fields.chunk_id, chunk_id));
        let found = self
            .reader
            .searcher()
            .search(&query, &Count)
            .map_err(|err| tantivy_error(&self.location, "look a chunk up", &err))?;
        Ok(found > 0)
    }

    /// How many chunks the index holds.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Whether the index holds no chunks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `ops` on the writer and commits; on an error rolls the uncommitted operations
    /// back, so a failed write leaves the index as it was.
    fn write(
        &self,
        action: &'static str,
        ops: impl FnOnce(&mut IndexWriter<TantivyDocument>, &Fields) -> tantivy::Result<()>,
    ) -> Result<()> {
        let mut writer = self.lock_writer();
        let outcome = ops(&mut writer, &self.fields).and_then(|()| writer.commit().map(drop));
        if let Err(err) = outcome {
            // The rollback's own failure adds nothing the caller can act on beyond `err`.
            let _ = writer.rollback();
            return Err(tantivy_error(&self.location, action, &err));
        }
        drop(writer);
        self.reader.reload().map_err(|err| tantivy_error(&self.location, "reload its reader", &err))
    }

    /// The writer. A panic while it was held can have left uncommitted operations behind:
    /// they are rolled back before the writer is used again.
    fn lock_writer(&self) -> MutexGuard<'_, IndexWriter<TantivyDocument>> {
        match self.writer.lock() {
            Ok(writer) => writer,
            Err(poisoned) => {
                let mut writer = poisoned.into_inner();
                let _ = writer.rollback();
                self.writer.clear_poison();
                writer
            }
        }
    }
}

fn index_builder(schema: Schema) -> IndexBuilder {
    let tokenizers = TokenizerManager::default();
    tokenizers.register(ANALYZER_NAME, MixedTokenizer);
    IndexBuilder::new().schema(schema).tokenizers(tokenizers)
}

fn term_query(term: Term) -> Box<dyn Query> {
    Box::new(TermQuery::new(term, IndexRecordOption::Basic))
}

/// A filter clause: matches documents with any of the terms, adding nothing to the score.
fn filter_query(terms: impl Iterator<Item = Term>) -> Box<dyn Query> {
    Box::new(ConstScoreQuery::new(Box::new(TermSetQuery::new(terms)), 0.0))
}

/// The query's distinct terms (the first [`MAX_QUERY_TERMS`]) as a disjunction of BM25
/// term queries; `None` when the query has no terms.
/// The distinct terms of a query, in order, at most [`MAX_QUERY_TERMS`].
fn query_terms(field: Field, query: &str) -> Vec<Term> {
    let mut seen = HashSet::new();
    analyze(query)
        .into_iter()
        .filter(|term| seen.insert(term.clone()))
        .take(MAX_QUERY_TERMS)
        .map(|term| Term::from_field_text(field, &term))
        .collect()
}

fn text_query(field: Field, query: &str) -> Option<Box<dyn Query>> {
    let clauses: Vec<(Occur, Box<dyn Query>)> = query_terms(field, query)
        .into_iter()
        .map(|term| {
            let query: Box<dyn Query> = Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs));
            (Occur::Should, query)
        })
        .collect();
    (!clauses.is_empty()).then(|| Box::new(BooleanQuery::new(clauses)) as Box<dyn Query>)
}

/// BM25's corpus statistics for one query over several indexes (a knowledge base's
/// shards): each index's [`FullTextIndex::statistics`], summed with [`Self::add`], then
/// given to every index's [`FullTextIndex::search_with`], so that a chunk scores as it
/// would in one index holding them all (the shards' own statistics differ with what
/// happened to land in each).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextStatistics {
    /// Chunks indexed.
    pub documents: u64,
    /// Tokens of their text.
    pub tokens: u64,
    /// For each of the query's terms, in order: the chunks holding it.
    pub term_documents: Vec<u64>,
}

impl TextStatistics {
    /// Adds another index's statistics for the same query.
    pub fn add(&mut self, other: &TextStatistics) {
        self.documents += other.documents;
        self.tokens += other.tokens;
        if self.term_documents.len() < other.term_documents.len() {
            self.term_documents.resize(other.term_documents.len(), 0);
        }
        for (sum, count) in self.term_documents.iter_mut().zip(&other.term_documents) {
            *sum += count;
        }
    }
}

/// [`TextStatistics`] as tantivy asks for them; a term outside the query (none is
/// scored) falls back to this index's own count.
struct GivenStatistics<'a> {
    searcher: &'a tantivy::Searcher,
    text: Field,
    given: &'a TextStatistics,
    terms: HashMap<Term, u64>,
}

impl tantivy::query::Bm25StatisticsProvider for GivenStatistics<'_> {
    fn total_num_tokens(&self, field: Field) -> tantivy::Result<u64> {
        if field == self.text { Ok(self.given.tokens) } else { self.searcher.total_num_tokens(field) }
    }

    fn total_num_docs(&self) -> tantivy::Result<u64> {
        Ok(self.given.documents)
    }

    fn doc_freq(&self, term: &Term) -> tantivy::Result<u64> {
        match self.terms.get(term) {
            Some(count) => Ok(*count),
            None => self.searcher.doc_freq(term),
        }
    }
}

fn validate_record(record: &FullTextRecord) -> Result<()> {
    let reason = if record.document_id.len() > MAX_DOCUMENT_ID_BYTES {
        Some(format!("its document id is longer than {MAX_DOCUMENT_ID_BYTES} bytes"))
    } else if record.tags.len() > MAX_TAGS {
        Some(format!("it has {} tags, over the limit of {MAX_TAGS}", record.tags.len()))
    } else if record.tags.iter().any(|tag| tag.len() > MAX_TAG_BYTES) {
        Some(format!("a tag is longer than {MAX_TAG_BYTES} bytes"))
    } else if record.text.len() > MAX_TEXT_BYTES {
        Some(format!("its text is longer than {MAX_TEXT_BYTES} bytes; chunk the document first"))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KnowledgeError::InvalidRequest { reason: format!("chunk {}: {reason}", record.chunk_id) }),
        None => Ok(()),
    }
}

fn tantivy_error(location: &str, action: &'static str, err: &TantivyError) -> KnowledgeError {
    let reason = match err {
        TantivyError::LockFailure(..) => {
            format!("{err}; another index object or process has it open: close that one first")
        }
        TantivyError::SchemaError(_) => format!("{err}; rebuild the index (delete its folder and re-index)"),
        _ => err.to_string(),
    };
    KnowledgeError::FullText { location: location.to_owned(), action, reason }
}

/// Checks the folder's [`MARKER_FILE`], or writes one (fsynced, by rename) into a folder
/// that holds no index yet.
fn check_or_write_marker(dir: &Path) -> Result<()> {
    let path = dir.join(MARKER_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let marker: Marker =
                serde_json::from_slice(&bytes).map_err(|err| KnowledgeError::corrupt(&path, err.to_string()))?;
            if marker.format_version > FORMAT_VERSION {
                return Err(KnowledgeError::UnsupportedVersion {
                    path,
                    found: marker.format_version,
                    supported: FORMAT_VERSION,
                });
            }
            if marker.analyzer != ANALYZER_NAME {
                return Err(KnowledgeError::corrupt(
                    &path,
                    format!("it was built with analyzer {:?}, this build has {ANALYZER_NAME:?}", marker.analyzer),
                ));
            }
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("meta.json").exists() {
                return Err(KnowledgeError::corrupt(&path, "the index is there but its format marker is missing"));
            }
            write_marker(dir, &path)
        }
        Err(err) => Err(KnowledgeError::io("read", &path, err)),
    }
}

fn write_marker(dir: &Path, path: &Path) -> Result<()> {
    let marker = Marker { format_version: FORMAT_VERSION, analyzer: ANALYZER_NAME.to_owned() };
    let bytes = serde_json::to_vec_pretty(&marker).expect("a marker serialises");
    let temporary = dir.join(format!("{MARKER_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| KnowledgeError::io("write", path, source))
}
