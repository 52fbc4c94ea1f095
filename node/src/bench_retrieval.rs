//! `maas bench retrieval`: retrieval quality and ingestion speed through the knowledge-base
//! API of a running node, on the corpora committed in `knowledge/benches/corpora/` (a
//! folder of `docs/*.md` and a `questions.jsonl` of questions, each with its gold document
//! and a phrase of the passage that answers it).
//!
//! For each corpus it makes a knowledge base on the embedding deployment `--model`,
//! uploads every document and times ingestion until all are indexed (chunks/s end to end:
//! parse, chunk, embed, index), then embeds the same chunks straight through
//! `/v1/embeddings` in batches of 64 (the model's raw batched throughput, the bound
//! ingestion is compared with). Then it asks every question in the three modes (vector,
//! BM25, hybrid) for the top 10: a hit is relevant when it comes from the gold document and
//! holds the gold phrase; it reports recall@1/5/10, MRR and the latency of the retrievals.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::bench_gateway::percentile;

#[derive(Debug, clap::Args)]
pub struct RetrievalBench {
    /// The node's API address.
    #[arg(long, env = "MAAS_SERVER", default_value = "http://127.0.0.1:8080", value_name = "URL")]
    server: String,
    /// A corpus folder (docs/*.md and questions.jsonl); give it more than once.
    #[arg(long = "corpus", required = true, value_name = "DIR")]
    corpora: Vec<PathBuf>,
    /// The embedding deployment the knowledge bases use.
    #[arg(long, default_value = "minilm")]
    model: String,
    /// Where the vectors go: embedded or milvus.
    #[arg(long, default_value = "embedded")]
    backend: String,
    /// Keep the knowledge bases afterwards (to look at them in the console).
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Deserialize)]
struct Question {
    id: String,
    #[serde(rename = "question")]
    text: String,
    document: String,
    answer_contains: String,
}

struct Api {
    http: reqwest::Client,
    server: String,
}

impl Api {
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = crate::client::with_credentials(request).send().await.context("the node does not answer")?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{status}: {}", body["error"]["message"].as_str().unwrap_or("no message"));
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.server))).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.server)).json(body)).await
    }
}

pub async fn retrieval(args: &RetrievalBench) -> Result<String> {
    let api = Api { http: reqwest::Client::new(), server: args.server.trim_end_matches('/').to_owned() };
    let mut out = String::new();
    for corpus in &args.corpora {
        let report = run_corpus(&api, args, corpus).await.with_context(|| format!("corpus {}", corpus.display()))?;
        out.push_str(&report);
    }
    Ok(out)
}

/// A corpus's documents (file name, bytes) and questions.
type Corpus = (Vec<(String, Vec<u8>)>, Vec<Question>);

fn read_corpus(dir: &Path) -> Result<Corpus> {
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(dir.join("docs")).context("reading docs/")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md" || e == "txt") {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            docs.push((name, std::fs::read(&path)?));
        }
    }
    docs.sort();
    let questions = std::fs::read_to_string(dir.join("questions.jsonl")).context("reading questions.jsonl")?;
    let questions = questions
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad question line: {l}")))
        .collect::<Result<Vec<Question>>>()?;
    Ok((docs, questions))
}

async fn upload(api: &Api, kb: &str, name: &str, bytes: &[u8]) -> Result<String> {
    let boundary = "maas-bench-retrieval-boundary";
    let mut form = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         content-type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    form.extend_from_slice(bytes);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let request = api
        .http
        .post(format!("{}/v1/knowledge_bases/{kb}/documents", api.server))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(form);
    let document = api.send(request).await?;
    Ok(document["id"].as_str().unwrap_or_default().to_owned())
}

#[allow(clippy::too_many_lines)]
async fn run_corpus(api: &Api, args: &RetrievalBench, dir: &Path) -> Result<String> {
    let (docs, questions) = read_corpus(dir)?;
    let label = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let name = format!("bench-{label}-{}", std::process::id());
    let kb = api
        .post(
            "/v1/knowledge_bases",
            &json!({"name": name, "embedding_model": args.model, "vector_backend": args.backend}),
        )
        .await?;
    let kb_id = kb["id"].as_str().context("no knowledge base id")?.to_owned();

    // Ingestion, end to end.
    let started = Instant::now();
    let mut ids = Vec::new();
    for (name, bytes) in &docs {
        ids.push(upload(api, &kb_id, name, bytes).await?);
    }
    let chunks_total = loop {
        let listed = api.get(&format!("/v1/knowledge_bases/{kb_id}/documents")).await?;
        let documents = listed["data"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = documents.iter().find(|d| d["state"] == "failed") {
            bail!("{} failed: {}", failed["filename"], failed["error"]);
        }
        if documents.len() == ids.len() && documents.iter().all(|d| d["state"] == "indexed") {
            break documents.iter().filter_map(|d| d["chunks_total"].as_u64()).sum::<u64>();
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("ingestion did not finish within an hour");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ingestion = started.elapsed();

    // The model's raw batched throughput on the same chunk texts.
    let mut texts = Vec::new();
    for id in &ids {
        let chunks = api.get(&format!("/v1/knowledge_bases/{kb_id}/documents/{id}/chunks?limit=500")).await?;
        // As ingestion embeds them: the section's headings, then the text.
        texts.extend(chunks["data"].as_array().into_iter().flatten().filter_map(|c| {
            let text = c["text"].as_str()?;
            let headings: Vec<&str> = c["heading_path"].as_array()?.iter().filter_map(Value::as_str).collect();
            Some(if headings.is_empty() { text.to_owned() } else { format!("{}\n{text}", headings.join(" > ")) })
        }));
    }
    let raw_started = Instant::now();
    for batch in texts.chunks(64) {
        api.post("/v1/embeddings", &json!({"model": args.model, "input": batch})).await?;
    }
    let raw = raw_started.elapsed();

    let mut out = String::new();
    #[allow(clippy::cast_precision_loss)]
    let (ingest_rate, raw_rate) =
        (chunks_total as f64 / ingestion.as_secs_f64(), texts.len() as f64 / raw.as_secs_f64());
    let _ = writeln!(
        out,
        "corpus {label}: {} documents, {chunks_total} chunks, {} questions ({} backend, model {})",
        docs.len(),
        questions.len(),
        args.backend,
        args.model
    );
    let _ = writeln!(
        out,
        "  ingestion {:.1} s = {ingest_rate:.1} chunks/s end to end; raw embedding {:.1} s = {raw_rate:.1} chunks/s; ratio {:.0}%",
        ingestion.as_secs_f64(),
        raw.as_secs_f64(),
        100.0 * ingest_rate / raw_rate
    );
    let _ = writeln!(out, "  | mode | recall@1 | recall@5 | recall@10 | MRR | p50 | p99 |");
    let _ = writeln!(out, "  |---|---|---|---|---|---|---|");
    for mode in ["vector", "fulltext", "hybrid"] {
        let mut ranks = Vec::with_capacity(questions.len());
        let mut latencies = Vec::with_capacity(questions.len());
        for question in &questions {
            let asked = Instant::now();
            let found = api
                .post(
                    &format!("/v1/knowledge_bases/{kb_id}/retrieve"),
                    &json!({"query": question.text, "mode": mode, "top_k": 10, "include_parent": false}),
                )
                .await
                .with_context(|| format!("question {}", question.id))?;
            latencies.push(asked.elapsed());
            let rank = found["data"].as_array().into_iter().flatten().position(|hit| {
                hit["filename"] == question.document.as_str()
                    && hit["text"].as_str().is_some_and(|t| t.contains(&question.answer_contains))
            });
            ranks.push(rank.map(|r| r + 1));
        }
        latencies.sort();
        #[allow(clippy::cast_precision_loss)]
        let share = |k: usize| ranks.iter().filter(|r| r.is_some_and(|r| r <= k)).count() as f64 / ranks.len() as f64;
        #[allow(clippy::cast_precision_loss)]
        let mrr = ranks.iter().map(|r| r.map_or(0.0, |r| 1.0 / r as f64)).sum::<f64>() / ranks.len() as f64;
        let _ = writeln!(
            out,
            "  | {mode} | {:.3} | {:.3} | {:.3} | {mrr:.3} | {:.1} ms | {:.1} ms |",
            share(1),
            share(5),
            share(10),
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        );
    }
    if !args.keep {
        api.send(api.http.delete(format!("{}/v1/knowledge_bases/{kb_id}", api.server))).await?;
    }
    Ok(out)
}
