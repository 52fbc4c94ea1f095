//! The embedded store beyond the shared suite: crash safety (reopen without a snapshot, a
//! torn log tail, snapshot plus log replay), sharding (`shard_for` covers the hash range;
//! fanning out to shards answers as one shard does), recall against exact search, and
//! filtered search that stays exact when the filter is selective.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::path::Path;

use maas_knowledge::KnowledgeError;
use maas_knowledge::vector::distance::exact_top_k;
use maas_knowledge::vector::synthetic::ClusteredVectors;
use maas_knowledge::vector::{
    CollectionSpec, EmbeddedOptions, EmbeddedStore, HnswParams, Metric, SearchFilter, SearchHit, SearchRequest,
    ShardIndex, ShardSpec, VectorRecord, VectorStore, shard_for, shard_hash, shard_hash_range,
};
use proptest::prelude::*;

const DIMENSION: usize = 32;

fn data(count: usize, seed: u64) -> Vec<Vec<f32>> {
    ClusteredVectors::new(DIMENSION, 12, 0.6, 1).sample(count, seed)
}

fn records(vectors: &[Vec<f32>], first_id: u64) -> Vec<VectorRecord> {
    vectors
        .iter()
        .zip(first_id..)
        .map(|(vector, chunk_id)| VectorRecord {
            chunk_id,
            vector: vector.clone(),
            document_id: format!("doc-{}", chunk_id % 7),
            version: i64::from(chunk_id % 3 == 0),
            tags: if chunk_id % 5 == 0 { vec!["five".into()] } else { vec![] },
        })
        .collect()
}

fn shard_spec() -> ShardSpec {
    ShardSpec { dimension: DIMENSION, metric: Metric::Cosine, hnsw: HnswParams::default() }
}

fn answers(shard: &ShardIndex, queries: &[Vec<f32>], filter: &SearchFilter) -> Vec<Vec<SearchHit>> {
    queries.iter().map(|q| shard.search(q, 10, filter).unwrap()).collect()
}

fn wal_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("wal.log")).unwrap().len()
}

#[test]
fn a_reopened_shard_answers_the_same_without_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let queries = data(20, 77);
    let filter = SearchFilter::default().documents(["doc-2", "doc-3"]);
    let (before, before_filtered, len) = {
        let mut shard = ShardIndex::open_or_create(dir.path(), shard_spec()).unwrap();
        let vectors = data(600, 2);
        for batch in records(&vectors, 1).chunks(100) {
            shard.upsert(batch.to_vec()).unwrap();
        }
        shard.delete(&[5, 6, 7, 500]).unwrap();
        shard.delete_document("doc-4", Some(1)).unwrap();
        (answers(&shard, &queries, &SearchFilter::default()), answers(&shard, &queries, &filter), shard.len())
        // Dropped without a snapshot, as a crash would leave it.
    };
    assert!(!dir.path().join("snapshot.bin").exists());
    let shard = ShardIndex::open(dir.path()).unwrap();
    assert_eq!(shard.len(), len);
    assert_eq!(answers(&shard, &queries, &SearchFilter::default()), before);
    assert_eq!(answers(&shard, &queries, &filter), before_filtered);
}

#[test]
fn a_torn_log_tail_is_ignored_and_the_shard_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = data(60, 3);
    let whole = {
        let mut shard = ShardIndex::open_or_create(dir.path(), shard_spec()).unwrap();
        shard.upsert(records(&vectors[..40], 1)).unwrap();
        let whole = wal_len(dir.path());
        shard.upsert(records(&vectors[40..], 41)).unwrap();
        whole
    };
    let full = wal_len(dir.path());
    // Cut the last record at its start, in its header, in its middle and one byte short.
    for cut in [whole, whole + 3, whole + (full - whole) / 2, full - 1] {
        let copy = tempfile::tempdir().unwrap();
        for file in ["shard.json", "wal.log"] {
            std::fs::copy(dir.path().join(file), copy.path().join(file)).unwrap();
        }
        OpenOptions::new().write(true).open(copy.path().join("wal.log")).unwrap().set_len(cut).unwrap();
        let mut shard = ShardIndex::open(copy.path()).unwrap();
        assert_eq!(shard.len(), 40, "cut at byte {cut}");
        assert!(shard.contains(40) && !shard.contains(41));
        assert_eq!(wal_len(copy.path()), whole, "the torn tail is cut off on open");
        shard.upsert(records(&vectors[40..41], 41)).unwrap();
        drop(shard);
        let shard = ShardIndex::open(copy.path()).unwrap();
        assert_eq!(shard.len(), 41, "a write after the cut survives a reopen");
        assert_eq!(shard.search(&vectors[40], 1, &SearchFilter::default()).unwrap()[0].chunk_id, 41);
    }
}

#[test]
fn snapshot_then_log_replay_restores_everything() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = data(500, 4);
    let queries = data(20, 78);
    let filter = SearchFilter::default().tags(["five"]).versions([0]);
    let (before, before_filtered, len) = {
        let mut shard = ShardIndex::open_or_create(dir.path(), shard_spec()).unwrap();
        shard.upsert(records(&vectors[..300], 1)).unwrap();
        shard.delete(&(1..=20).collect::<Vec<_>>()).unwrap();
        shard.snapshot().unwrap();
        assert!(wal_len(dir.path()) < 100, "a snapshot empties the log");
        shard.upsert(records(&vectors[300..], 301)).unwrap();
        shard.delete_document("doc-1", None).unwrap();
        (answers(&shard, &queries, &SearchFilter::default()), answers(&shard, &queries, &filter), shard.len())
    };
    let shard = ShardIndex::open(dir.path()).unwrap();
    assert_eq!(shard.len(), len);
    assert_eq!(answers(&shard, &queries, &SearchFilter::default()), before);
    assert_eq!(answers(&shard, &queries, &filter), before_filtered);
}

#[test]
fn a_snapshot_rebuilds_a_graph_of_mostly_deleted_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = data(400, 5);
    let mut shard = ShardIndex::open_or_create(dir.path(), shard_spec()).unwrap();
    shard.upsert(records(&vectors, 1)).unwrap();
    shard.delete(&(1..=300).collect::<Vec<_>>()).unwrap();
    assert_eq!(shard.deleted_nodes(), 300);
    shard.snapshot().unwrap();
    assert_eq!(shard.deleted_nodes(), 0);
    let queries = data(10, 79);
    let before = answers(&shard, &queries, &SearchFilter::default());
    for (query, hits) in queries.iter().zip(&before) {
        let exact = exact_top_k(query, vectors[300..].iter().zip(301..).map(|(v, id)| (id, v.as_slice())), 10);
        let found: BTreeSet<u64> = hits.iter().map(|h| h.chunk_id).collect();
        assert!(exact.iter().filter(|h| found.contains(&h.chunk_id)).count() >= 9);
    }
    drop(shard);
    let shard = ShardIndex::open(dir.path()).unwrap();
    assert_eq!(shard.len(), 100);
    assert_eq!(answers(&shard, &queries, &SearchFilter::default()), before);
}

#[test]
fn damaged_or_newer_snapshots_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = ShardIndex::open_or_create(dir.path(), shard_spec()).unwrap();
    shard.upsert(records(&data(10, 6), 1)).unwrap();
    shard.snapshot().unwrap();
    drop(shard);
    let path = dir.path().join("snapshot.bin");
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    flipped[40] ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    let err = ShardIndex::open(dir.path()).unwrap_err();
    assert!(matches!(err, KnowledgeError::Corrupt { .. }), "{err}");
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32(&newer[..newer.len() - 4]);
    let at = newer.len() - 4;
    newer[at..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &newer).unwrap();
    let err = ShardIndex::open(dir.path()).unwrap_err();
    assert!(matches!(err, KnowledgeError::UnsupportedVersion { found: 2, supported: 1, .. }), "{err}");
    std::fs::write(&path, &good).unwrap();
    assert_eq!(ShardIndex::open(dir.path()).unwrap().len(), 10);
}

/// CRC-32 (IEEE), as the snapshot's trailer uses.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn recall_at_10_against_exact_search() {
    let vectors = data(3000, 7);
    let queries = data(100, 80);
    let dir = tempfile::tempdir().unwrap();
    let mut shard = ShardIndex::open_or_create(dir.path(), shard_spec()).unwrap();
    shard.upsert(records(&vectors, 0)).unwrap();
    let mut found = 0;
    for query in &queries {
        let exact = exact_top_k(query, vectors.iter().zip(0..).map(|(v, id)| (id, v.as_slice())), 10);
        let approx: BTreeSet<u64> =
            shard.search(query, 10, &SearchFilter::default()).unwrap().iter().map(|h| h.chunk_id).collect();
        found += exact.iter().filter(|h| approx.contains(&h.chunk_id)).count();
    }
    let recall = f64::from(u32::try_from(found).unwrap()) / 1000.0;
    println!("recall@10 at 3,000 clustered {DIMENSION}-dimensional vectors: {recall:.3}");
    assert!(recall >= 0.95, "recall@10 {recall}");
}

#[test]
fn selective_filters_still_find_every_match() {
    let vectors = data(3000, 8);
    let dir = tempfile::tempdir().unwrap();
    let mut shard = ShardIndex::open_or_create(dir.path(), shard_spec()).unwrap();
    let mut all = records(&vectors, 0);
    for record in all.iter_mut().filter(|r| r.chunk_id % 500 == 3) {
        record.document_id = "rare".into();
        record.tags.push("rare-tag".into());
    }
    shard.upsert(all.clone()).unwrap();
    let query = &vectors[1];
    for filter in [SearchFilter::default().documents(["rare"]), SearchFilter::default().tags(["rare-tag"])] {
        let hits = shard.search(query, 10, &filter).unwrap();
        let expected = exact_top_k(
            query,
            all.iter().filter(|r| r.document_id == "rare").map(|r| (r.chunk_id, r.vector.as_slice())),
            10,
        );
        assert_eq!(
            hits.iter().map(|h| h.chunk_id).collect::<Vec<_>>(),
            expected.iter().map(|h| h.chunk_id).collect::<Vec<_>>()
        );
    }
    // A broad filter (about a third of the chunks) walks the graph and still finds k hits.
    let broad = SearchFilter::default().versions([1]);
    let hits = shard.search(query, 10, &broad).unwrap();
    assert_eq!(hits.len(), 10);
    let passing = |id: u64| id.is_multiple_of(3);
    assert!(hits.iter().all(|h| passing(h.chunk_id)), "{hits:?}");
    let expected =
        exact_top_k(query, all.iter().filter(|r| passing(r.chunk_id)).map(|r| (r.chunk_id, r.vector.as_slice())), 10);
    let found: BTreeSet<u64> = hits.iter().map(|h| h.chunk_id).collect();
    assert!(expected.iter().filter(|h| found.contains(&h.chunk_id)).count() >= 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_fan_out_merges_to_the_single_shard_answer() {
    let dir = tempfile::tempdir().unwrap();
    // An effort above the collection size makes each search exhaustive, so one shard and
    // four must agree exactly.
    let hnsw = HnswParams { ef_search: 1000, ..HnswParams::default() };
    let store = EmbeddedStore::open(dir.path(), EmbeddedOptions { hnsw, ..EmbeddedOptions::default() }).unwrap();
    let vectors = data(700, 9);
    for (name, shards) in [("one", 1), ("four", 4)] {
        store
            .ensure_collection(&CollectionSpec::new(name, DIMENSION, Metric::Cosine).with_shards(shards))
            .await
            .unwrap();
        store.upsert(name, records(&vectors, 1)).await.unwrap();
        store.delete(name, &[10, 20, 30]).await.unwrap();
    }
    assert_eq!(store.count("one").await.unwrap(), 697);
    assert_eq!(store.count("four").await.unwrap(), 697);
    for (i, query) in data(15, 81).into_iter().enumerate() {
        let filter =
            if i % 2 == 0 { SearchFilter::default() } else { SearchFilter::default().documents(["doc-1", "doc-5"]) };
        let request = SearchRequest::new(query, 25).filter(filter);
        let one = store.search("one", &request).await.unwrap();
        let four = store.search("four", &request).await.unwrap();
        assert_eq!(one, four, "query {i}");
        assert_eq!(one.len(), 25);
    }
    // Every shard got a share of the chunks.
    for shard in 0..4 {
        assert!((1..=700).any(|id| shard_for(id, 4) == shard));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_keeps_its_collections_and_snapshots_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    // A tiny log limit, so writes fold the log into snapshots as they go.
    let options = EmbeddedOptions { snapshot_after_wal_bytes: 4096, ..EmbeddedOptions::default() };
    let vectors = data(200, 10);
    let query = SearchRequest::new(vectors[17].clone(), 5);
    let before = {
        let store = EmbeddedStore::open(dir.path(), options).unwrap();
        store.ensure_collection(&CollectionSpec::new("kb", DIMENSION, Metric::Cosine).with_shards(3)).await.unwrap();
        for batch in records(&vectors, 1).chunks(20) {
            store.upsert("kb", batch.to_vec()).await.unwrap();
        }
        store.search("kb", &query).await.unwrap()
    };
    assert!(dir.path().join("kb/shard-0000/snapshot.bin").exists());
    let store = EmbeddedStore::open(dir.path(), options).unwrap();
    assert!(store.has_collection("kb").await.unwrap());
    assert_eq!(store.count("kb").await.unwrap(), 200);
    assert_eq!(store.search("kb", &query).await.unwrap(), before);
    assert_eq!(before[0].chunk_id, 18);
}

/// The number of shard hash ranges to check the boundaries of per case.
const RANGE_SAMPLES: u32 = 64;

proptest! {
    #[test]
    fn shard_for_covers_the_hash_range(chunk_id in any::<u64>(), shards in 1u32..=1024) {
        let shard = shard_for(chunk_id, shards);
        prop_assert!(shard < shards);
        prop_assert!(shard_hash_range(shard, shards).contains(&shard_hash(chunk_id)));
        // The ranges tile the whole u64 range in order: checked at the ends and at
        // boundaries spread over the shards.
        prop_assert_eq!(*shard_hash_range(0, shards).start(), 0);
        prop_assert_eq!(*shard_hash_range(shards - 1, shards).end(), u64::MAX);
        let step = (shards / RANGE_SAMPLES).max(1);
        for s in (0..shards - 1).step_by(step as usize) {
            let (this, next) = (shard_hash_range(s, shards), shard_hash_range(s + 1, shards));
            prop_assert!(this.start() <= this.end());
            prop_assert_eq!(this.end() + 1, *next.start());
        }
    }
}

#[test]
fn consecutive_chunk_ids_spread_evenly() {
    let mut counts = [0u32; 8];
    for chunk_id in 0..80_000 {
        counts[shard_for(chunk_id, 8) as usize] += 1;
    }
    assert!(counts.iter().all(|&c| (9_500..=10_500).contains(&c)), "{counts:?}");
}
