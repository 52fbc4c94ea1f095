//! `maas bench ann`: the embedded vector store at 100,000 clustered 384-dimensional unit
//! vectors (a seeded mixture of Gaussians, `maas_knowledge::vector::synthetic`). It builds
//! one collection per shard count through `EmbeddedStore` (batches of 1,000, each fsynced in
//! the shards' logs, snapshots as the logs grow), then measures recall@k against exact
//! search and the latency of queries issued one at a time: unfiltered, filtered by a tag
//! that a tenth of the chunks carry (a graph walk), and by one document (exact). On the
//! one-shard index it also times reopening from disk and sweeps the search effort `ef`.
//! With `--milvus URL` the same data and queries go through `MilvusStore`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use maas_knowledge::vector::distance::exact_top_k;
use maas_knowledge::vector::synthetic::ClusteredVectors;
use maas_knowledge::vector::{
    CollectionSpec, EmbeddedOptions, EmbeddedStore, Metric, MilvusOptions, MilvusStore, SearchFilter, SearchHit,
    SearchRequest, ShardIndex, VectorRecord, VectorStore,
};

use crate::bench_gateway::percentile;

#[derive(Debug, clap::Args)]
pub struct AnnBench {
    /// Vectors in the index.
    #[arg(long, default_value_t = 100_000)]
    vectors: usize,
    #[arg(long, default_value_t = 384)]
    dimension: usize,
    /// Queries (drawn from the same distribution, not in the index).
    #[arg(long, default_value_t = 500)]
    queries: usize,
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Gaussian clusters the vectors are drawn around (10,000: about ten vectors per
    /// cluster, so most of a query's ten nearest lie in other clusters: the hard case).
    #[arg(long, default_value_t = 10_000)]
    clusters: usize,
    /// Length of each vector's noise around its cluster's centre (before normalising).
    #[arg(long, default_value_t = 0.8)]
    spread: f32,
    /// Shard counts to build, comma-separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    shards: Vec<u32>,
    /// Search efforts to sweep on the one-shard index, comma-separated.
    #[arg(long, default_value = "32,64,96,128,192,256", value_delimiter = ',')]
    ef: Vec<usize>,
    /// Where the indexes go (default: a temporary directory, removed after).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Also measure a Milvus server at this url (e.g. http://127.0.0.1:19530).
    #[arg(long, value_name = "URL")]
    milvus: Option<String>,
    /// How many of the queries go to Milvus (milvus-lite answers in tens to hundreds of
    /// milliseconds).
    #[arg(long, default_value_t = 100)]
    milvus_queries: usize,
    /// Measure only Milvus (with `--milvus`): no embedded index is built.
    #[arg(long, requires = "milvus")]
    milvus_only: bool,
}

/// The longest one Milvus call of the bench may take before the bench gives up on it and
/// says which call it was (rather than waiting for good on a server that stopped answering).
const MILVUS_CALL_LIMIT: Duration = Duration::from_secs(120);

/// `call` within [`MILVUS_CALL_LIMIT`], or an error naming `what`.
async fn bounded<T>(what: &str, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(MILVUS_CALL_LIMIT, call)
        .await
        .map_err(|_| anyhow::anyhow!("milvus: {what} did not answer within {MILVUS_CALL_LIMIT:?}"))?
}

const TAG: &str = "tenth";
const CHUNKS_PER_DOCUMENT: u64 = 50;

fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

/// Chunk `i`: document `doc-(i / 50)`, version 1, the tag on every tenth.
fn record(chunk_id: u64, vector: &[f32]) -> VectorRecord {
    VectorRecord {
        chunk_id,
        vector: vector.to_vec(),
        document_id: format!("doc-{}", chunk_id / CHUNKS_PER_DOCUMENT),
        version: 1,
        tags: if chunk_id.is_multiple_of(10) { vec![TAG.to_owned()] } else { Vec::new() },
    }
}

/// Exact top k of every query among the chunks `passes` accepts, on every core.
fn ground_truth(vectors: &[Vec<f32>], queries: &[Vec<f32>], k: usize, passes: fn(u64) -> bool) -> Vec<HashSet<u64>> {
    let threads = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let per_thread = queries.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = queries
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|query| {
                            let candidates = vectors
                                .iter()
                                .zip(0u64..)
                                .filter(|(_, id)| passes(*id))
                                .map(|(v, id)| (id, v.as_slice()));
                            exact_top_k(query, candidates, k).into_iter().map(|hit| hit.chunk_id).collect()
                        })
                        .collect::<Vec<HashSet<u64>>>()
                })
            })
            .collect();
        parts.into_iter().flat_map(|part| part.join().expect("exact search does not panic")).collect()
    })
}

/// Recall of `answers` against `truth`, and the latencies sorted.
struct Measured {
    recall: f64,
    latencies: Vec<Duration>,
}

impl Measured {
    fn row(&self, label: &str) -> String {
        format!(
            "| {label} | {:.3} | {} | {} | {} |",
            self.recall,
            millis(percentile(&self.latencies, 0.5)),
            millis(percentile(&self.latencies, 0.99)),
            millis(self.latencies.last().copied().unwrap_or_default())
        )
    }
}

fn recall(answers: &[Vec<SearchHit>], truth: &[HashSet<u64>]) -> f64 {
    let (found, wanted) = answers.iter().zip(truth).fold((0usize, 0usize), |(found, wanted), (hits, truth)| {
        (found + hits.iter().filter(|hit| truth.contains(&hit.chunk_id)).count(), wanted + truth.len())
    });
    #[allow(clippy::cast_precision_loss, reason = "a ratio of small counts")]
    let ratio = found as f64 / wanted.max(1) as f64;
    ratio
}

/// Queries one at a time through the store.
async fn measure(
    store: &dyn VectorStore,
    collection: &str,
    queries: &[Vec<f32>],
    k: usize,
    filter: &SearchFilter,
    truth: &[HashSet<u64>],
) -> Result<Measured> {
    let mut answers = Vec::with_capacity(queries.len());
    let mut latencies = Vec::with_capacity(queries.len());
    for query in queries {
        let request = SearchRequest::new(query.clone(), k).filter(filter.clone());
        let started = Instant::now();
        answers.push(bounded("a search", async { Ok(store.search(collection, &request).await?) }).await?);
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    Ok(Measured { recall: recall(&answers, truth), latencies })
}

/// The same through one shard with another search effort, on this thread.
fn measure_shard(
    shard: &ShardIndex,
    queries: &[Vec<f32>],
    k: usize,
    ef: usize,
    truth: &[HashSet<u64>],
) -> Result<Measured> {
    let mut answers = Vec::with_capacity(queries.len());
    let mut latencies = Vec::with_capacity(queries.len());
    for query in queries {
        let started = Instant::now();
        answers.push(shard.search_with_ef(query, k, ef, &SearchFilter::default())?);
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    Ok(Measured { recall: recall(&answers, truth), latencies })
}

/// Upserts every vector in batches of 1,000; the time it took.
async fn load(store: &dyn VectorStore, collection: &str, vectors: &[Vec<f32>]) -> Result<Duration> {
    let started = Instant::now();
    for (batch, first) in vectors.chunks(1000).zip((0u64..).step_by(1000)) {
        let records = batch.iter().zip(first..).map(|(vector, id)| record(id, vector)).collect();
        bounded("an upsert of 1,000 vectors", async { Ok(store.upsert(collection, records).await?) }).await?;
    }
    Ok(started.elapsed())
}

struct Workload {
    vectors: Vec<Vec<f32>>,
    queries: Vec<Vec<f32>>,
    truth: Vec<HashSet<u64>>,
    tagged_truth: Vec<HashSet<u64>>,
    document_truth: Vec<HashSet<u64>>,
    document: SearchFilter,
}

impl Workload {
    fn tagged() -> SearchFilter {
        SearchFilter::default().tags([TAG])
    }

    /// Unfiltered, tagged and one-document rows for one store, over the first `queries`.
    async fn rows(
        &self,
        store: &dyn VectorStore,
        collection: &str,
        (k, queries): (usize, usize),
        label: &str,
        out: &mut String,
    ) -> Result<()> {
        let n = queries.min(self.queries.len());
        let queries = &self.queries[..n];
        let mut row = |measured: &Measured, what: &str| {
            let line = measured.row(&format!("{label}, {what}"));
            eprintln!("{line}");
            writeln!(out, "{line}")
        };
        let all = measure(store, collection, queries, k, &SearchFilter::default(), &self.truth[..n]).await?;
        row(&all, "no filter")?;
        let tagged = measure(store, collection, queries, k, &Workload::tagged(), &self.tagged_truth[..n]).await?;
        row(&tagged, "tag on 10% of chunks")?;
        let document = measure(store, collection, queries, k, &self.document, &self.document_truth[..n]).await?;
        row(&document, &format!("one document ({CHUNKS_PER_DOCUMENT} chunks)"))?;
        Ok(())
    }
}

pub async fn ann(args: &AnnBench) -> Result<String> {
    let temporary = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| temporary.path().to_owned());
    let mut out = String::new();
    let started = Instant::now();
    let data = ClusteredVectors::new(args.dimension, args.clusters, args.spread, 1);
    let vectors = data.sample(args.vectors, 2);
    let queries = data.sample(args.queries, 3);
    let document = SearchFilter::default().documents(["doc-7"]);
    let truth = ground_truth(&vectors, &queries, args.k, |_| true);
    let exact_elapsed = started.elapsed();
    let workload = Workload {
        tagged_truth: ground_truth(&vectors, &queries, args.k, |id| id.is_multiple_of(10)),
        document_truth: ground_truth(&vectors, &queries, args.k, |id| id / CHUNKS_PER_DOCUMENT == 7),
        vectors,
        queries,
        truth,
        document,
    };
    writeln!(
        out,
        "{} vectors of dimension {} around {} clusters (spread {}), {} queries, k = {}",
        args.vectors, args.dimension, args.clusters, args.spread, args.queries, args.k
    )?;
    let exact_single = exact_latency(&workload.vectors, &workload.queries[..workload.queries.len().min(20)], args.k);
    writeln!(
        out,
        "exact search (one thread, one query): p50 {}; data and ground truth took {:.1} s\n",
        millis(percentile(&exact_single, 0.5)),
        exact_elapsed.as_secs_f64()
    )?;
    writeln!(out, "| index | recall@{} | p50 | p99 | max |", args.k)?;
    writeln!(out, "|---|---|---|---|---|")?;
    let mut builds = String::new();
    let shard_counts: &[u32] = if args.milvus_only { &[] } else { &args.shards };
    for &shards in shard_counts {
        embedded(args, &root, shards, &workload, &mut out, &mut builds).await?;
    }
    if let Some(url) = &args.milvus {
        milvus(args, url, &workload, &mut out, &mut builds).await?;
    }
    writeln!(out, "\n{builds}")?;
    sweep(args, &root, &workload, &mut out)?;
    Ok(out)
}

async fn embedded(
    args: &AnnBench,
    root: &Path,
    shards: u32,
    workload: &Workload,
    out: &mut String,
    builds: &mut String,
) -> Result<()> {
    let dir = root.join(format!("embedded-{shards}"));
    let _ = std::fs::remove_dir_all(&dir);
    let store = EmbeddedStore::open(&dir, EmbeddedOptions::default())?;
    let spec = CollectionSpec::new("bench", args.dimension, Metric::Cosine).with_shards(shards);
    store.ensure_collection(&spec).await?;
    let built = load(&store, "bench", &workload.vectors).await?;
    #[allow(clippy::cast_precision_loss, reason = "a rate")]
    let rate = workload.vectors.len() as f64 / built.as_secs_f64();
    writeln!(
        builds,
        "embedded, {shards} shard(s): built in {:.1} s ({rate:.0} vectors/s, logged and fsynced per batch of 1,000)",
        built.as_secs_f64(),
    )?;
    workload.rows(&store, "bench", (args.k, args.queries), &format!("embedded, {shards} shard(s)"), out).await
}

async fn milvus(args: &AnnBench, url: &str, workload: &Workload, out: &mut String, builds: &mut String) -> Result<()> {
    let store = MilvusStore::connect(url, MilvusOptions::default()).await?;
    let collection = "maas_bench_ann";
    bounded("dropping the last run's collection", async { Ok(store.drop_collection(collection).await?) }).await?;
    let spec = CollectionSpec::new(collection, args.dimension, Metric::Cosine);
    bounded("creating the collection", async { Ok(store.ensure_collection(&spec).await?) }).await?;
    let built = load(&store, collection, &workload.vectors).await?;
    eprintln!("milvus: inserted {} vectors in {:.1} s", workload.vectors.len(), built.as_secs_f64());
    // Sealing the writes into indexed segments, which Milvus also does by itself as they
    // fill; the first query waits for the index where the server builds it lazily.
    let flushed = Instant::now();
    bounded("the flush", async { Ok(store.flush(collection).await?) }).await?;
    eprintln!("milvus: flushed in {:.1} s", flushed.elapsed().as_secs_f64());
    let first = SearchRequest::new(workload.queries[0].clone(), args.k);
    bounded("the first search", async { Ok(store.search(collection, &first).await?) }).await?;
    writeln!(
        builds,
        "milvus at {url}: inserted in {:.1} s, flushed and indexed in {:.1} s more",
        built.as_secs_f64(),
        flushed.elapsed().as_secs_f64()
    )?;
    let label = format!("milvus (first {} queries)", args.milvus_queries.min(args.queries));
    workload.rows(&store, collection, (args.k, args.milvus_queries), &label, out).await?;
    bounded("dropping the collection", async { Ok(store.drop_collection(collection).await?) }).await?;
    Ok(())
}

/// Reopens the one-shard index from disk and sweeps `ef` on it.
fn sweep(args: &AnnBench, root: &Path, workload: &Workload, out: &mut String) -> Result<()> {
    let dir = root.join("embedded-1/bench/shard-0000");
    if !dir.exists() {
        return Ok(());
    }
    let started = Instant::now();
    let shard = ShardIndex::open(&dir).with_context(|| format!("reopening {}", dir.display()))?;
    writeln!(
        out,
        "reopened the one-shard index ({} chunks) from its snapshot and log in {:.2} s\n",
        shard.len(),
        started.elapsed().as_secs_f64()
    )?;
    writeln!(out, "| ef (one shard, no filter) | recall@{} | p50 | p99 | max |", args.k)?;
    writeln!(out, "|---|---|---|---|---|")?;
    for &ef in &args.ef {
        let measured = measure_shard(&shard, &workload.queries, args.k, ef, &workload.truth)?;
        writeln!(out, "{}", measured.row(&ef.to_string()))?;
    }
    Ok(())
}

fn exact_latency(vectors: &[Vec<f32>], queries: &[Vec<f32>], k: usize) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = queries
        .iter()
        .map(|query| {
            let started = Instant::now();
            let hits = exact_top_k(query, vectors.iter().zip(0u64..).map(|(v, id)| (id, v.as_slice())), k);
            std::hint::black_box(hits);
            started.elapsed()
        })
        .collect();
    latencies.sort_unstable();
    latencies
}
