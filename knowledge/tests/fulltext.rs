//! The full-text index through its public API: BM25 ranking in English, Chinese and mixed
//! text, filters, deletes, durability across reopen, and query text that must never fail.

use maas_knowledge::KnowledgeError;
use maas_knowledge::fulltext::{FORMAT_VERSION, FullTextIndex, FullTextRecord, MARKER_FILE};
use maas_knowledge::vector::{MAX_DOCUMENT_ID_BYTES, MAX_TOP_K, SearchFilter, SearchHit};

/// A small knowledge base: (chunk id, document, version, tags, text).
const CORPUS: &[(u64, &str, i64, &[&str], &str)] = &[
    (1, "rust-guide", 1, &["lang"], "Rust guarantees memory safety without a garbage collector."),
    (2, "biology", 1, &["science"], "Photosynthesis converts sunlight, water and carbon dioxide into glucose."),
    (3, "vectors", 1, &["search"], "The HNSW graph makes approximate nearest neighbour search fast."),
    (4, "rust-guide", 1, &["lang", "async"], "Tokio schedules asynchronous tasks on a pool of worker threads."),
    (10, "ml-intro", 1, &["ai"], "机器学习是人工智能的一个分支，它让计算机从数据中学习规律。"),
    (11, "kb-manual", 1, &["product"], "知识库把企业文档切分成段落，并为每个段落建立索引。"),
    (12, "vectors-zh", 1, &["search"], "向量检索通过比较嵌入向量的相似度来找到语义相关的内容。"),
    (13, "search-zh", 1, &["search"], "全文检索使用倒排索引和BM25算法为关键词匹配打分。"),
    (20, "mixed", 1, &["ai"], "我们用PyTorch训练Transformer模型，然后部署到GPU集群上。"),
];

fn corpus() -> Vec<FullTextRecord> {
    CORPUS
        .iter()
        .map(|&(chunk_id, document, version, tags, text)| {
            FullTextRecord::new(chunk_id, document, version, text).with_tags(tags.iter().copied())
        })
        .collect()
}

fn indexed_corpus() -> FullTextIndex {
    let index = FullTextIndex::in_memory().unwrap();
    index.upsert(&corpus()).unwrap();
    index
}

fn ids(hits: &[SearchHit]) -> Vec<u64> {
    hits.iter().map(|hit| hit.chunk_id).collect()
}

fn search_ids(index: &FullTextIndex, query: &str, filter: &SearchFilter) -> Vec<u64> {
    ids(&index.search(query, 10, filter).unwrap())
}

#[test]
fn exact_word_queries_rank_the_right_chunk_first() {
    let index = indexed_corpus();
    assert_eq!(index.len(), CORPUS.len() as u64);
    let cases: &[(&str, u64)] = &[
        ("garbage collector", 1),
        ("photosynthesis glucose", 2),
        ("nearest neighbour", 3),
        ("TOKIO Worker threads", 4),
        ("机器学习", 10),
        ("人工智能", 10),
        ("知识库", 11),
        ("段落", 11),
        ("向量检索", 12),
        ("倒排索引", 13),
        ("BM25", 13),
        ("pytorch", 20),
        ("GPU集群", 20),
        ("Transformer模型部署", 20),
        ("如何部署transformer", 20),
    ];
    for &(query, expected) in cases {
        let hits = index.search(query, 5, &SearchFilter::default()).unwrap();
        assert_eq!(hits.first().map(|hit| hit.chunk_id), Some(expected), "query {query:?} gave {hits:?}");
        assert!(hits.windows(2).all(|pair| pair[0].score >= pair[1].score), "not best first: {hits:?}");
    }
}

#[test]
fn a_query_finds_nothing_when_no_term_occurs() {
    let index = indexed_corpus();
    for query in ["quantum chromodynamics", "天气预报", "zzzz"] {
        assert_eq!(search_ids(&index, query, &SearchFilter::default()), Vec::<u64>::new(), "{query:?}");
    }
}

#[test]
fn filters_restrict_hits_like_the_vector_stores() {
    let index = indexed_corpus();
    // "search" and 检索 occur in chunks 3, 12 and 13; "rust" and "tasks" in 1 and 4.
    let query = "search 检索 rust tasks";
    let cases: &[(SearchFilter, &[u64])] = &[
        (SearchFilter::default().documents(["rust-guide"]), &[1, 4]),
        (SearchFilter::default().documents(["vectors", "search-zh"]), &[3, 13]),
        (SearchFilter::default().tags(["async"]), &[4]),
        (SearchFilter::default().tags(["search", "async"]), &[3, 4, 12, 13]),
        (SearchFilter::default().versions([1]), &[1, 3, 4, 12, 13]),
        (SearchFilter::default().versions([2]), &[]),
        (SearchFilter::default().documents(["rust-guide", "vectors"]).tags(["lang"]), &[1, 4]),
        (SearchFilter::default().documents(Vec::<String>::new()), &[]),
        (SearchFilter::default().tags(Vec::<String>::new()), &[]),
        (SearchFilter::default().documents(["no-such-document"]), &[]),
    ];
    for (filter, expected) in cases {
        let mut found = search_ids(&index, query, filter);
        found.sort_unstable();
        assert_eq!(found, *expected, "filter {filter:?}");
    }
}

#[test]
fn filters_do_not_change_scores() {
    let index = indexed_corpus();
    let unfiltered = index.search("检索", 10, &SearchFilter::default()).unwrap();
    let filtered = index.search("检索", 10, &SearchFilter::default().documents(["search-zh"])).unwrap();
    assert_eq!(ids(&filtered), [13]);
    let same = unfiltered.iter().find(|hit| hit.chunk_id == 13).unwrap();
    assert!((same.score - filtered[0].score).abs() < 1e-6, "{unfiltered:?} vs {filtered:?}");
}

#[test]
fn equal_scores_are_ordered_by_chunk_id_even_across_the_cut() {
    let index = FullTextIndex::in_memory().unwrap();
    // Inserted in descending id order, in two commits, so neither insertion order nor
    // segment order matches id order.
    let record = |id: u64| FullTextRecord::new(id, format!("doc-{id}"), 1, "identical text about retrieval");
    index.upsert(&[50, 40, 30].map(record)).unwrap();
    index.upsert(&[20, 10].map(record)).unwrap();
    let hits = index.search("retrieval", 3, &SearchFilter::default()).unwrap();
    assert_eq!(ids(&hits), [10, 20, 30]);
}

#[test]
fn k_bounds_the_hits() {
    let index = indexed_corpus();
    let cases: &[(usize, usize)] = &[(0, 0), (1, 1), (2, 2), (100, 3), (MAX_TOP_K, 3)];
    for &(k, expected) in cases {
        assert_eq!(index.search("检索 search", k, &SearchFilter::default()).unwrap().len(), expected, "k = {k}");
    }
    let err = index.search("search", MAX_TOP_K + 1, &SearchFilter::default()).unwrap_err();
    assert!(matches!(err, KnowledgeError::InvalidRequest { .. }), "{err}");
}

#[test]
fn query_text_is_never_syntax() {
    let index = indexed_corpus();
    let long = "garbage ".repeat(5_000);
    let queries = [
        "C++ (draft) AND",
        "\"unbalanced quote",
        "text:garbage",
        "garbage AND NOT collector OR",
        "*",
        "garbage~2^3",
        "[a TO z}",
        "\\ / ( ) { } [ ] ^ ~ : ! -",
        "+-+-",
        "🦀 rust 🦀",
        "\u{0}\u{7}\u{1b}[31m",
        "（括号）「引号」《书名》",
        long.as_str(),
    ];
    for query in queries {
        let result = index.search(query, 5, &SearchFilter::default());
        assert!(result.is_ok(), "query {query:?} failed: {result:?}");
    }
    assert_eq!(search_ids(&index, "C++ (garbage) AND", &SearchFilter::default()).first(), Some(&1));
    assert_eq!(search_ids(&index, &long, &SearchFilter::default()), [1]);
}

#[test]
fn a_query_without_terms_finds_nothing() {
    let index = indexed_corpus();
    for query in ["", "   ", "!?,.;:", "，。、！", "\n\t"] {
        assert_eq!(search_ids(&index, query, &SearchFilter::default()), Vec::<u64>::new(), "{query:?}");
    }
}

#[test]
fn upsert_replaces_a_chunk_by_id() {
    let index = indexed_corpus();
    index.upsert(&[FullTextRecord::new(1, "rust-guide", 2, "Ownership and borrowing replace a collector.")]).unwrap();
    assert_eq!(index.len(), CORPUS.len() as u64);
    assert_eq!(search_ids(&index, "garbage", &SearchFilter::default()), Vec::<u64>::new());
    assert_eq!(search_ids(&index, "borrowing", &SearchFilter::default().versions([2])), [1]);
    // The last record wins when one upsert repeats an id.
    index
        .upsert(&[FullTextRecord::new(7, "d", 1, "first draft"), FullTextRecord::new(7, "d", 1, "second draft")])
        .unwrap();
    assert_eq!(search_ids(&index, "draft", &SearchFilter::default()), [7]);
    assert_eq!(search_ids(&index, "first", &SearchFilter::default()), Vec::<u64>::new());
    assert_eq!(index.len(), CORPUS.len() as u64 + 1);
}

#[test]
fn an_invalid_record_rejects_the_whole_upsert() {
    let index = indexed_corpus();
    let too_long = "d".repeat(MAX_DOCUMENT_ID_BYTES + 1);
    let records = [FullTextRecord::new(100, "ok", 1, "valid words"), FullTextRecord::new(101, too_long, 1, "more")];
    let err = index.upsert(&records).unwrap_err();
    assert!(matches!(err, KnowledgeError::InvalidRequest { .. }), "{err}");
    assert_eq!(index.len(), CORPUS.len() as u64);
    assert_eq!(search_ids(&index, "valid", &SearchFilter::default()), Vec::<u64>::new());
}

#[test]
fn delete_chunks_removes_only_those() {
    let index = indexed_corpus();
    index.delete_chunks(&[1, 12, 999]).unwrap();
    index.delete_chunks(&[]).unwrap();
    assert_eq!(index.len(), CORPUS.len() as u64 - 2);
    assert_eq!(search_ids(&index, "garbage", &SearchFilter::default()), Vec::<u64>::new());
    assert_eq!(search_ids(&index, "检索", &SearchFilter::default()), [13]);
}

#[test]
fn delete_document_removes_all_or_all_but_one_version() {
    let index = indexed_corpus();
    index
        .upsert(&[
            FullTextRecord::new(30, "handbook", 1, "old handbook text"),
            FullTextRecord::new(31, "handbook", 2, "new handbook text"),
            FullTextRecord::new(32, "handbook", 3, "newest handbook text"),
        ])
        .unwrap();
    index.delete_document("handbook", Some(2)).unwrap();
    assert_eq!(search_ids(&index, "handbook", &SearchFilter::default()), [31]);
    index.delete_document("rust-guide", None).unwrap();
    assert_eq!(search_ids(&index, "rust tokio garbage", &SearchFilter::default()), Vec::<u64>::new());
    index.delete_document("no-such-document", None).unwrap();
    assert_eq!(index.len(), CORPUS.len() as u64 - 2 + 1);
}

#[test]
fn writes_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb-1");
    {
        let index = FullTextIndex::open(&path).unwrap();
        assert!(index.is_empty());
        index.upsert(&corpus()).unwrap();
        index.delete_chunks(&[2]).unwrap();
        index.delete_document("ml-intro", None).unwrap();
    }
    let index = FullTextIndex::open(&path).unwrap();
    assert_eq!(index.len(), CORPUS.len() as u64 - 2);
    assert_eq!(search_ids(&index, "知识库", &SearchFilter::default()).first(), Some(&11));
    assert_eq!(search_ids(&index, "photosynthesis 机器学习", &SearchFilter::default()), Vec::<u64>::new());
    let marker = std::fs::read_to_string(path.join(MARKER_FILE)).unwrap();
    assert!(marker.contains(&format!("\"format_version\": {FORMAT_VERSION}")), "{marker}");
}

#[test]
fn a_second_open_of_the_same_folder_is_refused_while_the_first_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let first = FullTextIndex::open(dir.path()).unwrap();
    let err = FullTextIndex::open(dir.path()).unwrap_err();
    assert!(matches!(err, KnowledgeError::FullText { .. }), "{err}");
    assert!(err.to_string().contains("close that one first"), "{err}");
    drop(first);
    FullTextIndex::open(dir.path()).unwrap();
}

#[test]
fn an_index_from_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("{{\"format_version\": {}, \"analyzer\": \"future\"}}", FORMAT_VERSION + 1);
    std::fs::write(dir.path().join(MARKER_FILE), marker).unwrap();
    let err = FullTextIndex::open(dir.path()).unwrap_err();
    assert!(matches!(err, KnowledgeError::UnsupportedVersion { found, .. } if found == FORMAT_VERSION + 1), "{err}");
}

#[test]
fn a_corrupt_marker_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(MARKER_FILE), "not json").unwrap();
    let err = FullTextIndex::open(dir.path()).unwrap_err();
    assert!(matches!(err, KnowledgeError::Corrupt { .. }), "{err}");
}

#[test]
fn split_indexes_scored_with_summed_statistics_rank_like_one_index() {
    use maas_knowledge::fulltext::TextStatistics;
    let whole = indexed_corpus();
    // The corpus split unevenly over two indexes (as a knowledge base's shards).
    let (left, right) = (FullTextIndex::in_memory().unwrap(), FullTextIndex::in_memory().unwrap());
    let records = corpus();
    left.upsert(&records[..2]).unwrap();
    right.upsert(&records[2..]).unwrap();
    for query in ["rust memory tasks", "检索 索引 向量", "search graph GPU 模型"] {
        let mut sum = TextStatistics::default();
        sum.add(&left.statistics(query).unwrap());
        sum.add(&right.statistics(query).unwrap());
        assert_eq!(sum.documents, records.len() as u64);
        let filter = SearchFilter::default();
        let mut merged: Vec<SearchHit> = left.search_with(query, 10, &filter, Some(&sum)).unwrap();
        merged.extend(right.search_with(query, 10, &filter, Some(&sum)).unwrap());
        merged.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.chunk_id.cmp(&b.chunk_id)));
        let expected = whole.search(query, 10, &filter).unwrap();
        assert_eq!(ids(&merged), ids(&expected), "{query}");
        for (got, want) in merged.iter().zip(&expected) {
            assert!((got.score - want.score).abs() < 1e-4, "{query}: {got:?} vs {want:?}");
        }
    }
}
