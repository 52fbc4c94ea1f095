//! The ingestion worker: every node runs one ([`spawn_worker`]). It claims a document with
//! work left (a lease in SQL, so any node may take any document, and a dead node's
//! documents pass to another when its lease runs out) and runs its remaining steps:
//!
//! 1. **parse** the uploaded bytes (fetched from a peer if the upload landed elsewhere);
//! 2. **chunk** them with the knowledge base's settings, counting tokens with the
//!    embedding deployment's own tokenizer, and save parents and chunks in one transaction
//!    (the document moves to `embedding`);
//! 3. **embed** the chunks in batches on the embedding deployment and write each batch to
//!    the vector store and the full-text index, then mark it embedded in SQL;
//! 4. extract the document's entities and relations into the knowledge graph
//!    ([`maas_knowledge::graph`]), replacing what an interrupted run saved;
//! 5. mark the document **indexed** and retire the older versions of its file in one
//!    transaction, then drop the retired versions' vectors.
//!
//! **ING-1** (a killed node resumes without duplicates or gaps): each step's result is
//! durable before the next starts; chunk ids derive from (document, level, ordinal), so a
//! step re-run after a crash writes the same ids, and both indexes upsert by id. A batch
//! written to the indexes but not yet marked embedded is written again, replacing itself.
//! Retrieval reads only chunks of documents in state `indexed`, so a retired version's
//! vectors that a crash left behind are never cited.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use maas_knowledge::chunk::{ChunkConfig, Chunks, chunk_document};
use maas_knowledge::fulltext::FullTextRecord;
use maas_knowledge::graph::Extracted;
use maas_knowledge::parse::{DocumentKind, parse};
use maas_knowledge::vector::{CollectionSpec, Metric, VectorRecord};
use maas_store::repo::knowledge::{Document, DocumentState, GraphMention, GraphRelation, KnowledgeBase, StoredChunk};
use maas_store::{Digest, StoreError};
use sha2::Digest as _;

use super::{KnowledgeService, knowledge_error};
use crate::error::ApiError;
use crate::routes::openai::CalledFor;
use crate::state::{AppState, Stores};

/// How often an idle worker looks for work (an upload on this node wakes it at once).
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Why a step did not finish.
#[derive(Debug)]
enum StepError {
    /// The document cannot be ingested as it is (its bytes, its settings): it fails with
    /// this reason.
    Permanent(String),
    /// Something outside the document is not ready (the embedding model, Milvus, the
    /// database): the reason is shown on the document and the step is retried when the
    /// lease runs out.
    Transient(String),
    /// The lease went to another worker or the document was deleted: stop touching it.
    Lost,
}

impl From<StoreError> for StepError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { .. } => StepError::Lost,
            other => StepError::Transient(format!("the database failed: {other}")),
        }
    }
}

fn transient(what: &str) -> impl Fn(ApiError) -> StepError + '_ {
    move |err| StepError::Transient(format!("{what}: {}", err.message))
}

/// Starts this node's ingestion worker. `worker_id` names the node in leases: the same
/// across restarts of a node, different between nodes.
pub fn spawn_worker(state: Arc<AppState>, worker_id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // Embedding needs the control plane and the serving table: wait for readiness.
            let ready = state.stores.get().filter(|_| state.readiness.is_ready()).cloned().zip(state.knowledge.get());
            let Some((stores, service)) = ready else {
                tokio::time::sleep(POLL_EVERY).await;
                continue;
            };
            let service = Arc::clone(service);
            match stores.db.knowledge_bases().claim_document(&worker_id, service.options.lease_ms).await {
                Ok(Some(document)) => {
                    work_on(&state, &stores, &service, &worker_id, document).await;
                    continue;
                }
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "cannot look for documents to ingest"),
            }
            tokio::select! {
                () = service.wake.notified() => {}
                () = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
    })
}

/// Runs a claimed document's remaining steps and records how they ended.
async fn work_on(
    state: &Arc<AppState>,
    stores: &Stores,
    service: &Arc<KnowledgeService>,
    worker_id: &str,
    document: Document,
) {
    let lost = Arc::new(AtomicBool::new(false));
    let keeper = tokio::spawn(keep_lease(
        stores.db.clone(),
        document.id.clone(),
        worker_id.to_owned(),
        service.options.lease_ms,
        Arc::clone(&lost),
    ));
    let started = Instant::now();
    let id = document.id.clone();
    let outcome = run_steps(state, stores, service, document, &lost).await;
    keeper.abort();
    let db = stores.db.knowledge_bases();
    let recorded = match outcome {
        Ok(()) => Ok(()),
        Err(StepError::Lost) => {
            tracing::info!(document = %id, "document left this worker (deleted or taken over)");
            Ok(())
        }
        Err(StepError::Permanent(reason)) => {
            tracing::warn!(document = %id, %reason, "document failed");
            db.set_state(&id, DocumentState::Failed, Some(&reason)).await
        }
        Err(StepError::Transient(reason)) => {
            // The state stays; the lease runs out and the document is taken up again.
            tracing::warn!(document = %id, %reason, "document waits; retried when its lease runs out");
            match db.document(&id).await {
                Ok(current) if current.state.is_pending() && current.state != DocumentState::Deleting => {
                    db.set_state(&id, current.state, Some(&reason)).await
                }
                Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
                Err(err) => Err(err),
            }
        }
    };
    if let Err(err) = recorded {
        tracing::warn!(document = %id, error = %err, "cannot record the document's state");
    }
    tracing::debug!(document = %id, elapsed_ms = started.elapsed().as_millis(), "ingestion step ended");
}

/// Renews the lease every third of its length until aborted; a refused renewal (the
/// document was deleted or taken) sets `lost`.
async fn keep_lease(db: maas_store::Db, id: String, worker_id: String, lease_ms: i64, lost: Arc<AtomicBool>) {
    let every = Duration::from_millis(u64::try_from(lease_ms / 3).unwrap_or(1_000).max(100));
    loop {
        tokio::time::sleep(every).await;
        match db.knowledge_bases().renew_lease(&id, &worker_id, lease_ms).await {
            Ok(true) => {}
            Ok(false) => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(err) => tracing::warn!(document = %id, error = %err, "cannot renew the document lease"),
        }
    }
}

async fn run_steps(
    state: &Arc<AppState>,
    stores: &Stores,
    service: &KnowledgeService,
    document: Document,
    lost: &AtomicBool,
) -> Result<(), StepError> {
    let kb = stores.db.knowledge_bases().get_unscoped(&document.kb_id).await?;
    match document.state {
        DocumentState::Deleting => return remove(state, stores, service, &kb, &document).await,
        DocumentState::Queued | DocumentState::Parsing | DocumentState::Chunking => {
            parse_and_chunk(state, stores, service, &kb, &document).await?;
        }
        DocumentState::Embedding => {}
        DocumentState::Indexed | DocumentState::Failed | DocumentState::Retired => return Ok(()),
    }
    embed_all(state, stores, service, &kb, &document, lost).await?;
    save_graph(state, stores, &kb, &document).await?;
    let retired = stores.db.knowledge_bases().finish_indexed(&document.id).await?;
    let finished = stores.db.knowledge_bases().document(&document.id).await?;
    tracing::info!(
        document = %document.id, filename = %document.filename, version = document.version,
        chunks = finished.chunks_total, retired = retired.len(), "document indexed"
    );
    // Retrieval already ignores the retired versions (their state says so); their
    // vectors go now. A failure here leaves only unreachable entries behind.
    for old in retired {
        if let Err(err) = remove_indexed(state, service, &kb, &old).await {
            tracing::warn!(document = %old, error = %err.message, "cannot drop a retired version's vectors");
        }
    }
    Ok(())
}

/// Parses the document and saves its chunks (the document moves to `embedding`).
async fn parse_and_chunk(
    state: &Arc<AppState>,
    stores: &Stores,
    service: &KnowledgeService,
    kb: &KnowledgeBase,
    document: &Document,
) -> Result<(), StepError> {
    let db = stores.db.knowledge_bases();
    db.set_state(&document.id, DocumentState::Parsing, None).await?;
    let kind: DocumentKind = serde_json::from_value(serde_json::Value::String(document.kind.clone()))
        .map_err(|_| StepError::Permanent(format!("unknown document kind `{}`", document.kind)))?;
    let bytes = read_upload(state, stores, document).await?;
    let limits = service.options.parse_limits.clone();
    let parsed = tokio::task::spawn_blocking(move || parse(&bytes, kind, &limits))
        .await
        .map_err(|e| StepError::Transient(format!("the parsing thread failed: {e}")))?
        .map_err(|e| StepError::Permanent(e.to_string()))?;

    db.set_state(&document.id, DocumentState::Chunking, None).await?;
    let config = chunk_config(kb).map_err(StepError::Permanent)?;
    let text = state
        .model_texts
        .embedding(state, CalledFor::owner(&kb.owner), &kb.embedding_model)
        .await
        .map_err(transient(&format!("waiting for the embedding model `{}`", kb.embedding_model)))?;
    let page_count = i64::from(parsed.page_count);
    let chunks = tokio::task::spawn_blocking(move || chunk_document(&parsed, &config, &text.counter))
        .await
        .map_err(|e| StepError::Transient(format!("the chunking thread failed: {e}")))?
        .map_err(|e| StepError::Permanent(e.to_string()))?;
    let rows = stored_chunks(&document.id, &chunks);
    db.save_chunks(&document.id, page_count, &rows).await?;
    Ok(())
}

/// A knowledge base's chunking settings (`settings.chunking`, defaults where absent).
pub fn chunk_config(kb: &KnowledgeBase) -> Result<ChunkConfig, String> {
    let config = match kb.settings.get("chunking") {
        None | Some(serde_json::Value::Null) => ChunkConfig::default(),
        Some(value) => serde_json::from_value(value.clone()).map_err(|e| format!("settings.chunking: {e}"))?,
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// The uploaded bytes, fetched from a peer when the upload landed on another node.
async fn read_upload(state: &AppState, stores: &Stores, document: &Document) -> Result<Vec<u8>, StepError> {
    let digest: Digest =
        document.sha256.parse().map_err(|e| StepError::Permanent(format!("the upload's digest is bad: {e}")))?;
    if !stores.blobs.contains(&digest).await {
        let peers = peer_apis(state);
        let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
        let size = u64::try_from(document.size_bytes).unwrap_or(0);
        maas_actors::models::fetch_blob(&stores.blobs, &digest, size, &peers, &cookie)
            .await
            .map_err(|e| StepError::Transient(format!("the upload is not on this node yet: {e}")))?;
    }
    stores.blobs.read(&digest).await.map_err(StepError::from)
}

/// The other live nodes' API addresses.
pub(crate) fn peer_apis(state: &AppState) -> Vec<String> {
    let Ok(handle) = crate::routes::cluster::control_plane(state) else { return Vec::new() };
    let own = handle.id();
    handle.read_local(|cluster| {
        cluster
            .nodes()
            .values()
            .filter(|node| node.id.0 != own && matches!(node.status, maas_consensus::state::NodeStatus::Alive))
            .map(|node| node.api_addr.clone())
            .collect()
    })
}

/// A chunk's id: the first 63 bits of SHA-256 over (document, level, ordinal), so the
/// same step run twice writes the same ids.
pub fn chunk_id(document_id: &str, level: &str, ordinal: usize) -> i64 {
    let mut hasher = sha2::Sha256::new();
    hasher.update(document_id.as_bytes());
    hasher.update([0]);
    hasher.update(level.as_bytes());
    hasher.update([0]);
    hasher.update((ordinal as u64).to_le_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0_u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    let id = i64::from_le_bytes(bytes) & i64::MAX;
    id.max(1)
}

fn stored_chunks(document_id: &str, chunks: &Chunks) -> Vec<StoredChunk> {
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let parents = chunks.parents.iter().map(|parent| StoredChunk {
        chunk_id: chunk_id(document_id, "parent", parent.ordinal),
        document_id: document_id.to_owned(),
        level: "parent".into(),
        ordinal: count(parent.ordinal),
        parent_ordinal: None,
        text: parent.text.clone(),
        token_count: count(parent.token_count),
        page_start: i64::from(parent.location.page_start),
        page_end: i64::from(parent.location.page_end),
        heading_path: parent.location.heading_path.clone(),
        embedded: false,
    });
    let children = chunks.chunks.iter().map(|chunk| StoredChunk {
        chunk_id: chunk_id(document_id, "child", chunk.ordinal),
        document_id: document_id.to_owned(),
        level: "child".into(),
        ordinal: count(chunk.ordinal),
        parent_ordinal: Some(count(chunk.parent)),
        text: chunk.text.clone(),
        token_count: count(chunk.token_count),
        page_start: i64::from(chunk.location.page_start),
        page_end: i64::from(chunk.location.page_end),
        heading_path: chunk.location.heading_path.clone(),
        embedded: false,
    });
    parents.chain(children).collect()
}

/// What is embedded and indexed for a chunk: its section's headings, then its text, so a
/// chunk that continues a section still matches the section's subject.
pub fn indexed_text(chunk: &StoredChunk) -> String {
    if chunk.heading_path.is_empty() {
        chunk.text.clone()
    } else {
        format!("{}\n{}", chunk.heading_path.join(" > "), chunk.text)
    }
}

/// A chunk's entry in a vector index.
pub fn vector_record(chunk: &StoredChunk, document: &Document, vector: Vec<f32>) -> VectorRecord {
    VectorRecord {
        chunk_id: chunk.chunk_id.cast_unsigned(),
        vector,
        document_id: document.id.clone(),
        version: document.version,
        tags: document.tags.clone(),
    }
}

/// A chunk's entry in a full-text index (`text` is its [`indexed_text`]).
pub fn text_record(chunk: &StoredChunk, document: &Document, text: String) -> FullTextRecord {
    FullTextRecord::new(chunk.chunk_id.cast_unsigned(), document.id.clone(), document.version, text)
        .with_tags(document.tags.clone())
}

/// Embeds and indexes the document's chunks not yet embedded, a batch at a time.
async fn embed_all(
    state: &Arc<AppState>,
    stores: &Stores,
    service: &KnowledgeService,
    kb: &KnowledgeBase,
    document: &Document,
    lost: &AtomicBool,
) -> Result<(), StepError> {
    let db = stores.db.knowledge_bases();
    let shards =
        super::shards::ensure(state, kb).await.map_err(transient("the knowledge base's shards are not placed"))?;
    let waiting = format!("waiting for the embedding model `{}`", kb.embedding_model);
    let spec = super::shards::vector_spec(state, kb).await.map_err(transient(&waiting))?;
    let milvus = if kb.vector_backend == "milvus" {
        let milvus = service.milvus().await.map_err(transient("the vector store is unavailable"))?;
        let dimensions = state
            .model_texts
            .embedding(state, CalledFor::owner(&kb.owner), &kb.embedding_model)
            .await
            .map_err(transient(&waiting))?
            .dimensions;
        let collection = CollectionSpec::new(kb.id.clone(), dimensions, Metric::Cosine);
        milvus.ensure_collection(&collection).await.map_err(|e| match knowledge_error(&e) {
            err if err.status.is_client_error() => StepError::Permanent(err.message),
            err => StepError::Transient(err.message),
        })?;
        Some(milvus)
    } else {
        None
    };
    let batch = i64::try_from(service.options.embed_batch.max(1)).unwrap_or(64);
    let work = crate::metering::Work::for_owner(&kb.owner, "knowledge.ingest");
    loop {
        if lost.load(Ordering::SeqCst) {
            return Err(StepError::Lost);
        }
        let chunks = db.chunks_to_embed(&document.id, batch).await?;
        if chunks.is_empty() {
            return Ok(());
        }
        let texts: Vec<String> = chunks.iter().map(indexed_text).collect();
        let started = std::time::Instant::now();
        let (embedded, tokens) =
            crate::routes::openai::embed_texts(state, CalledFor::owner(&kb.owner), &kb.embedding_model, texts.clone())
                .await
                .map_err(|err| match err.status {
                    http::StatusCode::BAD_REQUEST => StepError::Permanent(err.message),
                    _ => StepError::Transient(format!("embedding on `{}` failed: {}", kb.embedding_model, err.message)),
                })?;
        work.record(state, &kb.embedding_model, (tokens, 0), started);
        let ids: Vec<i64> = chunks.iter().map(|c| c.chunk_id).collect();
        let records: Vec<VectorRecord> =
            chunks.iter().zip(embedded).map(|(chunk, vector)| vector_record(chunk, document, vector)).collect();
        let full: Vec<FullTextRecord> =
            chunks.iter().zip(texts).map(|(chunk, text)| text_record(chunk, document, text)).collect();
        let records = match &milvus {
            Some(milvus) => {
                milvus.upsert(&kb.id, records).await.map_err(|e| StepError::Transient(knowledge_error(&e).message))?;
                Vec::new()
            }
            None => records,
        };
        shards.write(state, spec, records, full).await.map_err(|e| StepError::Transient(e.message))?;
        let marked = db.mark_embedded(&document.id, &ids).await;
        // Deleted while this batch was written: the deletion may have dropped the
        // document's entries before this batch reached the indexes, so they are dropped
        // again here (a deletion after this look drops them itself).
        if deleted(&db, &document.id).await? {
            if let Err(err) = remove_indexed(state, service, kb, &document.id).await {
                tracing::warn!(document = %document.id, error = %err.message, "cannot drop a deleted document's last batch");
            }
            return Err(StepError::Lost);
        }
        marked?;
    }
}

/// Whether the document is gone or being deleted.
async fn deleted(db: &maas_store::repo::knowledge::KnowledgeBases<'_>, id: &str) -> Result<bool, StepError> {
    match db.document(id).await {
        Ok(current) => Ok(current.state == DocumentState::Deleting),
        Err(StoreError::NotFound { .. }) => Ok(true),
        Err(err) => Err(StepError::Transient(err.to_string())),
    }
}

/// Extracts the document's part of the knowledge graph from its chunks and saves it
/// (replacing what an interrupted run saved): with the knowledge base's extraction model
/// when it names one (each chunk's answer parsed by `graph::parse_model_answer`), else, and
/// for every chunk the model gives no usable graph for, with the deterministic extractor.
async fn save_graph(
    state: &Arc<AppState>,
    stores: &Stores,
    kb: &KnowledgeBase,
    document: &Document,
) -> Result<(), StepError> {
    let db = stores.db.knowledge_bases();
    let chunks = db.document_chunks(&document.id, "child", 0, i64::MAX).await?;
    let mut by_model: Vec<Option<Extracted>> = chunks.iter().map(|_| None).collect();
    if let Some(model) = crate::routes::knowledge::graph_settings(kb).model() {
        let mut asked = 0;
        for (chunk, slot) in chunks.iter().zip(&mut by_model) {
            asked += 1;
            match extract_with_model(state, kb, model, &chunk.text).await {
                Ok(extracted) => *slot = extracted,
                // Too long for the model's context, or refused: this chunk only.
                Err(err) if err.status.is_client_error() && err.status != http::StatusCode::NOT_FOUND => {}
                Err(err) => {
                    tracing::warn!(document = %document.id, model, error = %err.message,
                        "the graph extraction model cannot be reached; the extractor does the rest");
                    break;
                }
            }
        }
        let answered = by_model.iter().filter(|g| g.is_some()).count();
        tracing::info!(document = %document.id, model, asked, answered, chunks = chunks.len(),
            "graph extraction model asked; chunks without a usable answer use the extractor");
    }
    let (mentions, relations) = tokio::task::spawn_blocking(move || {
        let mut mentions = Vec::new();
        let mut relations = Vec::new();
        for (chunk, extracted) in chunks.iter().zip(by_model) {
            let extracted = extracted.unwrap_or_else(|| maas_knowledge::graph::extract(&chunk.text));
            mentions.extend(extracted.entities.into_iter().map(|entity| GraphMention {
                chunk_id: chunk.chunk_id,
                key: entity.key,
                name: entity.name,
                kind: entity.kind.as_str().to_owned(),
            }));
            relations.extend(extracted.relations.into_iter().map(|relation| GraphRelation {
                chunk_id: chunk.chunk_id,
                source: relation.source,
                target: relation.target,
                evidence: relation.evidence,
            }));
        }
        (mentions, relations)
    })
    .await
    .map_err(|e| StepError::Transient(format!("the graph thread failed: {e}")))?;
    db.save_graph(&document.id, &mentions, &relations).await?;
    Ok(())
}

/// The most tokens an extraction answer may take.
const EXTRACTION_MAX_TOKENS: usize = 384;

/// One chunk's graph as chat `model` extracts it; `None` when its answer holds none.
async fn extract_with_model(
    state: &Arc<AppState>,
    kb: &KnowledgeBase,
    model: &str,
    text: &str,
) -> Result<Option<Extracted>, ApiError> {
    let messages = vec![
        maas_engine::ChatMessage { role: "system".into(), content: maas_knowledge::graph::MODEL_INSTRUCTIONS.into() },
        maas_engine::ChatMessage { role: "user".into(), content: text.to_owned() },
    ];
    let work = crate::metering::Work::for_owner(&kb.owner, "knowledge.graph");
    let answer = crate::routes::openai::complete_chat(
        state,
        (CalledFor::owner(&kb.owner), None),
        &work,
        model,
        messages,
        EXTRACTION_MAX_TOKENS,
    )
    .await?;
    Ok(maas_knowledge::graph::parse_model_answer(&answer))
}

/// Drops a document's vectors and full-text entries (every version of its id).
async fn remove_indexed(
    state: &AppState,
    service: &KnowledgeService,
    kb: &KnowledgeBase,
    document_id: &str,
) -> Result<(), ApiError> {
    if kb.vector_backend == "milvus" {
        let milvus = service.milvus().await?;
        if milvus.has_collection(&kb.id).await.map_err(|e| knowledge_error(&e))? {
            milvus.delete_document(&kb.id, document_id, None).await.map_err(|e| knowledge_error(&e))?;
        }
    }
    super::shards::KbShards::of(state, &kb.id).delete_document(state, document_id, None).await
}

/// A deleted document: its vectors go, then its rows.
async fn remove(
    state: &AppState,
    stores: &Stores,
    service: &KnowledgeService,
    kb: &KnowledgeBase,
    document: &Document,
) -> Result<(), StepError> {
    remove_indexed(state, service, kb, &document.id)
        .await
        .map_err(transient("cannot remove the document's vectors"))?;
    stores.db.knowledge_bases().purge_document(&document.id).await?;
    tracing::info!(document = %document.id, filename = %document.filename, "document deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_are_stable_positive_and_distinct() {
        assert_eq!(chunk_id("doc-1", "child", 0), chunk_id("doc-1", "child", 0));
        let ids: std::collections::HashSet<i64> = (0..10_000)
            .flat_map(|n| {
                [chunk_id("doc-1", "child", n), chunk_id("doc-1", "parent", n), chunk_id("doc-2", "child", n)]
            })
            .collect();
        assert_eq!(ids.len(), 30_000);
        assert!(ids.iter().all(|id| *id > 0));
    }
}
