//! The vector stores' shared suite: every case is written once, over `&dyn VectorStore`,
//! and `suite!` runs it against the embedded store (in a temporary folder, two shards) and
//! against Milvus at `MAAS_TEST_MILVUS_URL` (which `scripts/test` starts and sets; without
//! it the Milvus cases fail and say how to start one).

use std::collections::BTreeSet;

use maas_knowledge::KnowledgeError;
use maas_knowledge::vector::synthetic::SeededRng;
use maas_knowledge::vector::{
    CollectionSpec, EmbeddedOptions, EmbeddedStore, Metric, MilvusOptions, MilvusStore, SearchFilter, SearchHit,
    SearchRequest, VectorRecord, VectorStore,
};

const DIMENSION: usize = 8;

/// A store and the collection name a case uses in it.
struct Fixture {
    store: Box<dyn VectorStore>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

async fn embedded(case: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("the store opens");
    Fixture { store: Box::new(store), name: case.to_owned(), _dir: Some(dir) }
}

async fn milvus_store(case: &str) -> (MilvusStore, String) {
    let url = std::env::var("MAAS_TEST_MILVUS_URL").unwrap_or_else(|_| {
        panic!(
            "MAAS_TEST_MILVUS_URL is not set: run the tests with scripts/test, or start Milvus with scripts/milvus \
             and export MAAS_TEST_MILVUS_URL=<the url it prints>"
        )
    });
    let store = MilvusStore::connect(&url, MilvusOptions::default()).await.expect("milvus answers");
    // Unique per run (each test is its own process), and dropped first in case a crashed
    // run with the same process id left it behind.
    let name = format!("test_{case}_{}", std::process::id());
    store.drop_collection(&name).await.expect("drop a leftover collection");
    (store, name)
}

async fn milvus(case: &str) -> Fixture {
    let (store, name) = milvus_store(case).await;
    Fixture { store: Box::new(store), name, _dir: None }
}

fn vector(seed: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..DIMENSION).map(|_| rng.normal()).collect()
}

fn record(chunk_id: u64, document_id: &str, version: i64, tags: &[&str]) -> VectorRecord {
    VectorRecord {
        chunk_id,
        vector: vector(chunk_id),
        document_id: document_id.to_owned(),
        version,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
    }
}

fn spec(name: &str) -> CollectionSpec {
    CollectionSpec::new(name, DIMENSION, Metric::Cosine).with_shards(2)
}

fn ids(hits: &[SearchHit]) -> Vec<u64> {
    hits.iter().map(|h| h.chunk_id).collect()
}

fn id_set(hits: &[SearchHit]) -> BTreeSet<u64> {
    hits.iter().map(|h| h.chunk_id).collect()
}

async fn search(
    store: &dyn VectorStore,
    name: &str,
    query: Vec<f32>,
    k: usize,
    filter: SearchFilter,
) -> Vec<SearchHit> {
    store.search(name, &SearchRequest::new(query, k).filter(filter)).await.expect("search")
}

mod cases {
    use super::*;

    pub async fn upsert_then_search_finds_exact_matches_first(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        let records: Vec<_> = (1..=60).map(|id| record(id, &format!("doc-{}", id % 4), 1, &[])).collect();
        store.upsert(name, records).await.unwrap();
        for id in [1, 17, 42, 60] {
            let hits = search(store, name, vector(id), 5, SearchFilter::default()).await;
            assert_eq!(hits.len(), 5);
            assert_eq!(hits[0].chunk_id, id, "{hits:?}");
            assert!((hits[0].score - 1.0).abs() < 1e-4, "cosine of a vector with itself: {}", hits[0].score);
            assert!(hits.windows(2).all(|w| w[0].score >= w[1].score), "best first: {hits:?}");
        }
        store.drop_collection(name).await.unwrap();
    }

    pub async fn upsert_overwrites(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        store.upsert(name, vec![record(1, "old", 1, &["a"]), record(2, "other", 1, &[])]).await.unwrap();
        let replacement = VectorRecord { vector: vector(1000), ..record(1, "new", 2, &["b"]) };
        store.upsert(name, vec![replacement]).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 2);
        let hits = search(store, name, vector(1000), 1, SearchFilter::default()).await;
        assert_eq!(ids(&hits), vec![1]);
        assert!((hits[0].score - 1.0).abs() < 1e-4);
        assert!(search(store, name, vector(1), 5, SearchFilter::default().documents(["old"])).await.is_empty());
        assert!(search(store, name, vector(1), 5, SearchFilter::default().tags(["a"])).await.is_empty());
        let new =
            search(store, name, vector(1), 5, SearchFilter::default().documents(["new"]).tags(["b"]).versions([2]))
                .await;
        assert_eq!(ids(&new), vec![1]);
        // Within one call the last record of a chunk wins.
        let first = VectorRecord { vector: vector(7), ..record(3, "x", 1, &[]) };
        let last = VectorRecord { vector: vector(8), ..record(3, "y", 1, &[]) };
        store.upsert(name, vec![first, last]).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 3);
        assert_eq!(ids(&search(store, name, vector(8), 5, SearchFilter::default().documents(["y"])).await), vec![3]);
        store.drop_collection(name).await.unwrap();
    }

    pub async fn delete_by_id(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        store.upsert(name, (1..=10).map(|id| record(id, "d", 1, &[])).collect()).await.unwrap();
        store.delete(name, &[3, 4, 999]).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 8);
        let hits = search(store, name, vector(3), 10, SearchFilter::default()).await;
        assert_eq!(id_set(&hits), [1, 2, 5, 6, 7, 8, 9, 10].into_iter().collect());
        store.delete(name, &[]).await.unwrap();
        store.delete(name, &[3]).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 8);
        store.drop_collection(name).await.unwrap();
    }

    pub async fn delete_by_document_and_retire_old_versions(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        let mut records: Vec<_> = (1..=5).map(|id| record(id, "a", 1, &[])).collect();
        records.extend((6..=10).map(|id| record(id, "a", 2, &[])));
        records.extend((11..=15).map(|id| record(id, "b", 1, &[])));
        store.upsert(name, records).await.unwrap();
        store.delete_document(name, "a", Some(2)).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 10);
        let of_a = search(store, name, vector(1), 20, SearchFilter::default().documents(["a"])).await;
        assert_eq!(id_set(&of_a), (6..=10).collect());
        store.delete_document(name, "b", None).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 5);
        store.delete_document(name, "never uploaded", None).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 5);
        store.drop_collection(name).await.unwrap();
    }

    pub async fn filters_by_document_tag_and_version(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        // A document id that would end a quoted literal early if it were not escaped.
        let tricky = r#"doc "q" \ ] or true"#;
        let all: Vec<VectorRecord> = (1..=40)
            .map(|id| {
                let document = [tricky, "plain", "other"][(id % 3) as usize];
                let tags: &[&str] = match id % 4 {
                    0 => &["red"],
                    1 => &["blue", "green"],
                    2 => &[],
                    _ => &["green"],
                };
                record(id, document, i64::from(id % 2 == 1) + 1, tags)
            })
            .collect();
        store.upsert(name, all.clone()).await.unwrap();
        let filters = [
            SearchFilter::default().documents([tricky]),
            SearchFilter::default().documents(["plain", "other"]),
            SearchFilter::default().tags(["green"]),
            SearchFilter::default().tags(["red", "blue"]),
            SearchFilter::default().versions([2]),
            SearchFilter::default().documents([tricky]).tags(["green"]).versions([1, 2]),
            SearchFilter::default().documents(["plain"]).versions([1]),
        ];
        for filter in filters {
            let expected: BTreeSet<u64> = all
                .iter()
                .filter(|r| {
                    filter.document_ids.as_ref().is_none_or(|d| d.contains(&r.document_id))
                        && filter.versions.as_ref().is_none_or(|v| v.contains(&r.version))
                        && filter.tags.as_ref().is_none_or(|t| r.tags.iter().any(|tag| t.contains(tag)))
                })
                .map(|r| r.chunk_id)
                .collect();
            assert!(!expected.is_empty(), "{filter:?} should match something");
            let hits = search(store, name, vector(5), 100, filter.clone()).await;
            assert_eq!(id_set(&hits), expected, "{filter:?}");
            assert_eq!(hits.len(), expected.len(), "no duplicates for {filter:?}");
        }
        assert!(
            search(store, name, vector(5), 10, SearchFilter::default().documents(Vec::<String>::new()))
                .await
                .is_empty()
        );
        assert!(search(store, name, vector(5), 10, SearchFilter::default().tags(["absent"])).await.is_empty());
        store.drop_collection(name).await.unwrap();
    }

    pub async fn dimension_mismatch_is_an_error_naming_both(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        let short = VectorRecord { vector: vec![1.0, 0.0, 0.0], ..record(1, "d", 1, &[]) };
        let err = store.upsert(name, vec![record(2, "d", 1, &[]), short]).await.unwrap_err();
        assert!(matches!(err, KnowledgeError::DimensionMismatch { expected: 8, actual: 3, .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains('8') && message.contains('3'), "{message}");
        assert_eq!(store.count(name).await.unwrap(), 0, "a rejected upsert writes nothing");
        let err = store.search(name, &SearchRequest::new(vec![1.0; 9], 3)).await.unwrap_err();
        assert!(matches!(err, KnowledgeError::DimensionMismatch { expected: 8, actual: 9, .. }), "{err}");
        let err = store.ensure_collection(&CollectionSpec::new(name, 16, Metric::Cosine)).await.unwrap_err();
        assert!(matches!(err, KnowledgeError::CollectionMismatch { .. }), "{err}");
        let err =
            store.ensure_collection(&CollectionSpec::new(name, DIMENSION, Metric::InnerProduct)).await.unwrap_err();
        assert!(matches!(err, KnowledgeError::CollectionMismatch { .. }), "{err}");
        store.ensure_collection(&spec(name)).await.expect("the same spec again is fine");
        store.drop_collection(name).await.unwrap();
    }

    pub async fn invalid_vectors_and_names_are_refused(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        let zero = VectorRecord { vector: vec![0.0; DIMENSION], ..record(1, "d", 1, &[]) };
        let err = store.upsert(name, vec![zero]).await.unwrap_err();
        assert!(matches!(err, KnowledgeError::InvalidVector { .. }), "{err}");
        let mut nan = record(2, "d", 1, &[]);
        nan.vector[3] = f32::NAN;
        assert!(matches!(store.upsert(name, vec![nan]).await.unwrap_err(), KnowledgeError::InvalidVector { .. }));
        assert_eq!(store.count(name).await.unwrap(), 0);
        for bad in ["", "has space", "semi;colon", &"x".repeat(129)] {
            let err = store.ensure_collection(&CollectionSpec::new(bad, DIMENSION, Metric::Cosine)).await.unwrap_err();
            assert!(matches!(err, KnowledgeError::InvalidCollectionName { .. }), "{bad:?}: {err}");
        }
        let err = store.search(name, &SearchRequest::new(vector(1), 100_000)).await.unwrap_err();
        assert!(matches!(err, KnowledgeError::InvalidRequest { .. }), "{err}");
        store.drop_collection(name).await.unwrap();
    }

    pub async fn unknown_collection_is_an_error(store: &dyn VectorStore, name: &str) {
        assert!(!store.has_collection(name).await.unwrap());
        let is_unknown =
            |result: Result<(), KnowledgeError>| matches!(result, Err(KnowledgeError::UnknownCollection { .. }));
        assert!(is_unknown(store.upsert(name, vec![record(1, "d", 1, &[])]).await));
        assert!(is_unknown(store.delete(name, &[1]).await));
        assert!(is_unknown(store.delete_document(name, "d", None).await));
        assert!(is_unknown(store.count(name).await.map(|_| ())));
        let err = store.search(name, &SearchRequest::new(vector(1), 3)).await.unwrap_err();
        assert!(matches!(&err, KnowledgeError::UnknownCollection { .. }), "{err}");
        assert!(err.to_string().contains("create it first"), "{err}");
    }

    pub async fn count_counts_live_chunks(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 0);
        store.upsert(name, (1..=20).map(|id| record(id, "d", 1, &[])).collect()).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 20);
        store.upsert(name, (11..=25).map(|id| record(id, "d", 2, &[])).collect()).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 25);
        store.delete(name, &[1, 2, 3, 4, 5]).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 20);
        store.drop_collection(name).await.unwrap();
    }

    pub async fn drop_removes_the_collection(store: &dyn VectorStore, name: &str) {
        store.ensure_collection(&spec(name)).await.unwrap();
        store.ensure_collection(&spec(name)).await.expect("ensure is idempotent");
        store.upsert(name, (1..=5).map(|id| record(id, "d", 1, &[])).collect()).await.unwrap();
        assert!(store.has_collection(name).await.unwrap());
        store.drop_collection(name).await.unwrap();
        assert!(!store.has_collection(name).await.unwrap());
        assert!(matches!(store.count(name).await, Err(KnowledgeError::UnknownCollection { .. })));
        store.drop_collection(name).await.expect("dropping what is not there is fine");
        store.ensure_collection(&spec(name)).await.unwrap();
        assert_eq!(store.count(name).await.unwrap(), 0, "a re-created collection starts empty");
        store.drop_collection(name).await.unwrap();
    }
}

macro_rules! suite {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let fixture = super::$backend(stringify!($case)).await;
                    super::cases::$case(&*fixture.store, &fixture.name).await;
                }
            )*
        }
    };
}

macro_rules! every_case {
    ($backend:ident) => {
        suite!($backend:
            upsert_then_search_finds_exact_matches_first,
            upsert_overwrites,
            delete_by_id,
            delete_by_document_and_retire_old_versions,
            filters_by_document_tag_and_version,
            dimension_mismatch_is_an_error_naming_both,
            invalid_vectors_and_names_are_refused,
            unknown_collection_is_an_error,
            count_counts_live_chunks,
            drop_removes_the_collection,
        );
    };
}

every_case!(embedded);
every_case!(milvus);

#[tokio::test]
async fn an_unreachable_milvus_is_reported_by_url() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let err = MilvusStore::connect(&url, MilvusOptions::default()).await.unwrap_err();
    assert!(matches!(err, KnowledgeError::MilvusUnreachable { .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("milvus unreachable at {url}: ")), "{err}");
}

/// Milvus only: `flush` seals writes into indexed segments, and filtered search over them
/// is right both ways it is done: a filter passing few chunks (read and ranked here,
/// exactly) and one passing many (the HNSW walk with its wider `ef`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn milvus_flush_seals_writes_and_filters_stay_right() {
    let (store, name) = milvus_store("flush").await;
    assert!(matches!(store.flush(&name).await, Err(KnowledgeError::UnknownCollection { .. })));
    store.ensure_collection(&spec(&name)).await.unwrap();
    // "few" on every hundredth chunk (12), "many" on all but every twelfth (1,100).
    let tags = |id: u64| {
        let mut tags = Vec::new();
        if id.is_multiple_of(100) {
            tags.push("few".to_owned());
        }
        if !id.is_multiple_of(12) {
            tags.push("many".to_owned());
        }
        tags
    };
    let records: Vec<VectorRecord> =
        (1..=1200).map(|id| VectorRecord { tags: tags(id), ..record(id, "d", 1, &[]) }).collect();
    store.upsert(&name, records.clone()).await.unwrap();
    store.flush(&name).await.unwrap();
    store.upsert(&name, vec![record(1201, "d", 1, &[])]).await.unwrap();
    assert_eq!(store.count(&name).await.unwrap(), 1201);
    for id in [1, 600, 1201] {
        assert_eq!(search(&store, &name, vector(id), 1, SearchFilter::default()).await[0].chunk_id, id);
    }
    let few = search(&store, &name, vector(2), 20, SearchFilter::default().tags(["few"])).await;
    assert_eq!(id_set(&few), (1..=12).map(|i| i * 100).collect());
    let many = search(&store, &name, vector(5), 10, SearchFilter::default().tags(["many"])).await;
    assert_eq!(many.len(), 10);
    assert!(many.iter().all(|hit| !hit.chunk_id.is_multiple_of(12)), "{many:?}");
    assert_eq!(many[0].chunk_id, 5, "the query's own chunk passes and comes first");
    store.drop_collection(&name).await.unwrap();
}
