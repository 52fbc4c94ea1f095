//! Knowledge bases: `/v1/knowledge_bases` (create, list, get with ingestion statistics,
//! update, delete), their documents (multipart upload into the blob store, list, get with
//! ingestion state and progress, delete, the chunk viewer) and the retrieval test
//! (`POST /v1/knowledge_bases/{id}/retrieve`). Every query acts for the caller's scope, so
//! another tenant's knowledge base is not found. Ingestion runs in the background
//! ([`crate::knowledge::ingest`]).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use maas_knowledge::chunk::ChunkConfig;
use maas_knowledge::parse::DocumentKind;
use maas_store::repo::knowledge::{
    Document, DocumentState, GraphEdge, GraphEntity, KnowledgeBase, NewDocument, NewKnowledgeBase, StoredChunk,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::knowledge::KnowledgeService;
use crate::knowledge::retrieve::{RetrieveRequest, RetrieveResponse, retrieve};
use crate::state::AppState;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let base = || with_state(state).and(caller(state, Access::Inference));
    let create = warp::path!("v1" / "knowledge_bases")
        .and(warp::post())
        .and(base())
        .and(crate::json::json_body::<CreateKnowledgeBase>(64 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, body| async move {
            create_knowledge_base(&s, &c, body).await.map_err(warp::reject::custom)
        });
    let list = warp::path!("v1" / "knowledge_bases").and(warp::get()).and(base()).and_then(
        |s: Arc<AppState>, c: Caller| async move { list_knowledge_bases(&s, &c).await.map_err(warp::reject::custom) },
    );
    let get = warp::path!("v1" / "knowledge_bases" / String).and(warp::get()).and(base()).and_then(
        |id: String, s: Arc<AppState>, c: Caller| async move {
            get_knowledge_base(&s, &c, &id).await.map_err(warp::reject::custom)
        },
    );
    let update = warp::path!("v1" / "knowledge_bases" / String)
        .and(warp::patch())
        .and(base())
        .and(crate::json::json_body::<UpdateKnowledgeBase>(64 * 1024))
        .and_then(|id: String, s: Arc<AppState>, c: Caller, body| async move {
            update_knowledge_base(&s, &c, &id, body).await.map_err(warp::reject::custom)
        });
    let delete = warp::path!("v1" / "knowledge_bases" / String).and(warp::delete()).and(base()).and_then(
        |id: String, s: Arc<AppState>, c: Caller| async move {
            delete_knowledge_base(&s, &c, &id).await.map_err(warp::reject::custom)
        },
    );
    create
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(update)
        .unify()
        .or(delete)
        .unify()
        .or(document_routes(state))
        .unify()
        .boxed()
}

/// The routes under a knowledge base: documents, chunks, retrieval, chat and the graph.
fn document_routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let base = || with_state(state).and(caller(state, Access::Inference));
    let upload = warp::path!("v1" / "knowledge_bases" / String / "documents")
        .and(warp::post())
        .and(base())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::stream())
        .and_then(|id: String, s: Arc<AppState>, c: Caller, content_type: Option<String>, body| async move {
            upload_document(&s, &c, &id, content_type.as_deref(), body).await.map_err(warp::reject::custom)
        });
    let documents = warp::path!("v1" / "knowledge_bases" / String / "documents").and(warp::get()).and(base()).and_then(
        |id: String, s: Arc<AppState>, c: Caller| async move {
            list_documents(&s, &c, &id).await.map_err(warp::reject::custom)
        },
    );
    let document = warp::path!("v1" / "knowledge_bases" / String / "documents" / String)
        .and(warp::get())
        .and(base())
        .and_then(|id: String, doc: String, s: Arc<AppState>, c: Caller| async move {
            get_document(&s, &c, &id, &doc).await.map_err(warp::reject::custom)
        });
    let delete_doc = warp::path!("v1" / "knowledge_bases" / String / "documents" / String)
        .and(warp::delete())
        .and(base())
        .and_then(|id: String, doc: String, s: Arc<AppState>, c: Caller| async move {
            delete_document(&s, &c, &id, &doc).await.map_err(warp::reject::custom)
        });
    let chunks = warp::path!("v1" / "knowledge_bases" / String / "documents" / String / "chunks")
        .and(warp::get())
        .and(base())
        .and(crate::json::query::<ChunkQuery>())
        .and_then(|id: String, doc: String, s: Arc<AppState>, c: Caller, query: ChunkQuery| async move {
            list_chunks(&s, &c, &id, &doc, &query).await.map_err(warp::reject::custom)
        });
    let search = warp::path!("v1" / "knowledge_bases" / String / "retrieve")
        .and(warp::post())
        .and(base())
        .and(crate::json::json_body::<RetrieveRequest>(64 * 1024))
        .and_then(|id: String, s: Arc<AppState>, c: Caller, body: RetrieveRequest| async move {
            retrieve_test(&s, &c, &id, &body).await.map_err(warp::reject::custom)
        });
    let chat = warp::path!("v1" / "knowledge_bases" / String / "chat")
        .and(warp::post())
        .and(base())
        .and(crate::json::json_body::<super::openai::InferenceRequest>(8 * 1024 * 1024))
        .and_then(|id: String, s: Arc<AppState>, c: Caller, body| async move {
            knowledge_chat(s, c, id, body).await.map_err(warp::reject::custom)
        });
    let graph = warp::path!("v1" / "knowledge_bases" / String / "graph")
        .and(warp::get())
        .and(base())
        .and(crate::json::query::<GraphQuery>())
        .and_then(|id: String, s: Arc<AppState>, c: Caller, query: GraphQuery| async move {
            knowledge_graph(&s, &c, &id, &query).await.map_err(warp::reject::custom)
        });
    // A shard of this node, for the node that routes a knowledge base's call to it.
    let shard = warp::path!("internal" / "kb_shards" / String)
        .and(warp::post())
        .and(with_state(state))
        .and(super::cluster::cookie_checked(state))
        .and(crate::json::json_body::<crate::knowledge::shards::ShardOp>(64 * 1024 * 1024))
        .and_then(|id: String, s: Arc<AppState>, _cookie: Option<String>, op| async move {
            let shard = crate::knowledge::shards::local(&s, &id).map_err(warp::reject::custom)?;
            let answer = crate::knowledge::shards::execute(shard, op).await.map_err(warp::reject::custom)?;
            Ok::<_, warp::Rejection>(warp::reply::json(&answer).into_response())
        });
    upload
        .or(shard)
        .unify()
        .or(documents)
        .unify()
        .or(document)
        .unify()
        .or(delete_doc)
        .unify()
        .or(chunks)
        .unify()
        .or(search)
        .unify()
        .or(chat)
        .unify()
        .or(graph)
        .unify()
        .boxed()
}

fn service(state: &AppState) -> Result<&Arc<KnowledgeService>, ApiError> {
    state
        .knowledge
        .get()
        .ok_or_else(|| ApiError::unavailable("knowledge bases are starting on this node; retry shortly"))
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message).with_param(param)
}

// ---- knowledge bases ----

/// Retrieval settings of a knowledge base.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrievalSettings {
    /// Whether the embedding model covers languages beyond English; when false (the
    /// default, right for all-MiniLM-L6-v2), hybrid search weighs the vector ranking down
    /// for Chinese, Japanese and Korean queries.
    #[serde(default)]
    pub multilingual: bool,
}

/// How a knowledge base's graph is extracted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphSettings {
    /// A chat deployment that extracts each chunk's entities and relations (asked for
    /// JSON); empty or absent: the deterministic extractor. A chunk whose answer holds no
    /// usable graph, or a model that cannot be reached, falls back to the extractor.
    #[serde(default)]
    pub extraction_model: Option<String>,
}

impl GraphSettings {
    /// The extraction model, if one is set.
    pub fn model(&self) -> Option<&str> {
        self.extraction_model.as_deref().map(str::trim).filter(|m| !m.is_empty())
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKnowledgeBase {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The embedding deployment (its name, as in `/v1/embeddings`); default
    /// `knowledge.default_embedding_model`.
    #[serde(default)]
    pub embedding_model: Option<String>,
    /// `embedded` (default) or `milvus`.
    #[serde(default)]
    pub vector_backend: Option<String>,
    /// Shards the knowledge base's indexes are split into, spread over the nodes (1 to 64;
    /// default `knowledge.default_shards`).
    #[serde(default)]
    pub shards: Option<u32>,
    /// How documents are cut (defaults fit all-MiniLM-L6-v2).
    #[serde(default)]
    pub chunking: Option<ChunkConfig>,
    #[serde(default)]
    pub retrieval: Option<RetrievalSettings>,
    #[serde(default)]
    pub graph: Option<GraphSettings>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKnowledgeBase {
    #[serde(default)]
    pub description: Option<String>,
    /// New chunking settings apply to documents uploaded from now on.
    #[serde(default)]
    pub chunking: Option<ChunkConfig>,
    #[serde(default)]
    pub retrieval: Option<RetrievalSettings>,
    /// New graph settings apply to documents ingested from now on.
    #[serde(default)]
    pub graph: Option<GraphSettings>,
}

/// A knowledge base as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct KnowledgeBaseObject {
    pub id: String,
    pub object: &'static str,
    pub name: String,
    pub description: String,
    /// `user` or `org`, and its id.
    pub owner_kind: String,
    pub owner_id: String,
    pub embedding_model: String,
    pub vector_backend: String,
    pub shards: i64,
    pub settings: KnowledgeBaseSettings,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// Documents by ingestion state, chunks, vectors and shards (on `GET
    /// /v1/knowledge_bases/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<KnowledgeBaseStats>,
}

/// What a knowledge base holds and where its shards are.
#[derive(Debug, Serialize, ToSchema)]
pub struct KnowledgeBaseStats {
    /// Document versions, in every state.
    pub documents: usize,
    /// Document versions by ingestion state (`queued`, ..., `indexed`, `failed`).
    pub documents_by_state: std::collections::BTreeMap<String, u64>,
    /// Chunks of indexed documents.
    pub chunks: i64,
    /// Vectors in the index; null when Milvus could not be asked.
    pub vectors: Option<u64>,
    /// Chunks in the BM25 index.
    pub fulltext_entries: u64,
    /// The knowledge base's shards: where each is and its state.
    pub shards: Vec<crate::knowledge::shards::ShardPlacementView>,
    /// Shards that did not answer (their node is down): the counts miss what they hold.
    pub shards_unavailable: Vec<String>,
}

impl From<KnowledgeBase> for KnowledgeBaseObject {
    fn from(kb: KnowledgeBase) -> Self {
        let settings = KnowledgeBaseSettings::of(&kb);
        KnowledgeBaseObject {
            object: "knowledge_base",
            owner_kind: kb.owner.kind().to_owned(),
            owner_id: kb.owner.id().to_owned(),
            id: kb.id,
            name: kb.name,
            description: kb.description,
            embedding_model: kb.embedding_model,
            vector_backend: kb.vector_backend,
            shards: kb.shard_count,
            settings,
            created_at: kb.created_at_ms / 1000,
            updated_at: kb.updated_at_ms / 1000,
            stats: None,
        }
    }
}

/// A knowledge base's settings: how its documents are cut, searched and put in its graph.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct KnowledgeBaseSettings {
    #[serde(default)]
    pub chunking: ChunkConfig,
    #[serde(default)]
    pub retrieval: RetrievalSettings,
    #[serde(default)]
    pub graph: GraphSettings,
}

impl KnowledgeBaseSettings {
    /// A knowledge base's settings as stored; each part the default where it is absent (a
    /// knowledge base made before the part existed).
    pub fn of(kb: &KnowledgeBase) -> Self {
        fn part<T: serde::de::DeserializeOwned + Default>(kb: &KnowledgeBase, name: &str) -> T {
            kb.settings.get(name).and_then(|value| serde_json::from_value(value.clone()).ok()).unwrap_or_default()
        }
        KnowledgeBaseSettings {
            chunking: part(kb, "chunking"),
            retrieval: part(kb, "retrieval"),
            graph: part(kb, "graph"),
        }
    }

    /// The settings checked, as the store keeps them.
    fn to_json(&self) -> Result<Value, ApiError> {
        self.chunking.validate().map_err(|e| bad("chunking", e.to_string()))?;
        if self.graph.extraction_model.as_ref().is_some_and(|m| m.len() > 256) {
            return Err(bad("graph.extraction_model", "graph.extraction_model is longer than 256 bytes"));
        }
        serde_json::to_value(self).map_err(|e| ApiError::internal(format!("the settings do not serialise: {e}")))
    }
}

/// A knowledge base's graph settings (the default for one made before they existed).
pub fn graph_settings(kb: &KnowledgeBase) -> GraphSettings {
    KnowledgeBaseSettings::of(kb).graph
}

/// Creates a knowledge base owned by the caller (or the organisation it acts for).
#[utoipa::path(post, path = "/v1/knowledge_bases", tag = "knowledge", request_body = CreateKnowledgeBase,
    responses((status = 200, body = KnowledgeBaseObject), (status = 400, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create_knowledge_base(
    state: &AppState,
    caller: &Caller,
    body: CreateKnowledgeBase,
) -> Result<Response, ApiError> {
    let service = service(state)?;
    let embedding_model = body
        .embedding_model
        .filter(|m| !m.trim().is_empty())
        .or_else(|| Some(service.options.default_embedding_model.clone()).filter(|m| !m.is_empty()))
        .ok_or_else(|| {
            bad(
                "embedding_model",
                "embedding_model is missing: name an embedding deployment (GET /v1/models lists them)",
            )
        })?;
    let vector_backend = body.vector_backend.unwrap_or_else(|| service.options.default_backend.clone());
    service.check_backend(&vector_backend)?;
    let shards = body.shards.unwrap_or(service.options.default_shards);
    if !(1..=64).contains(&shards) {
        return Err(bad("shards", "shards must be 1 to 64"));
    }
    let settings = KnowledgeBaseSettings {
        chunking: body.chunking.unwrap_or_default(),
        retrieval: body.retrieval.unwrap_or_default(),
        graph: body.graph.unwrap_or_default(),
    }
    .to_json()?;
    let record = super::registry::stores(state)?
        .db
        .knowledge_bases()
        .create(
            &caller.scope,
            NewKnowledgeBase {
                name: body.name,
                description: body.description,
                embedding_model,
                vector_backend,
                shard_count: i64::from(shards),
                settings,
            },
        )
        .await?;
    // Ingestion places them too if this fails (the cluster lost its leader just now).
    if let Err(err) = crate::knowledge::shards::ensure(state, &record).await {
        tracing::warn!(knowledge_base = %record.id, error = %err.message, "cannot place the knowledge base's shards yet");
    }
    let detail = json!({"name": record.name, "embedding_model": record.embedding_model});
    super::auth::audit(state, caller.audit_entry("knowledge_base.create", &record.id, detail)).await?;
    Ok(warp::reply::json(&KnowledgeBaseObject::from(record)).into_response())
}

/// The knowledge bases of the caller (or the organisation it acts for).
#[utoipa::path(get, path = "/v1/knowledge_bases", tag = "knowledge",
    responses((status = 200, description = "a list of knowledge bases", body = super::ListOf<KnowledgeBaseObject>)))]
pub async fn list_knowledge_bases(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let records = super::registry::stores(state)?.db.knowledge_bases().list(&caller.scope).await?;
    Ok(super::ListOf::reply(records.into_iter().map(KnowledgeBaseObject::from).collect()))
}

/// A knowledge base, with its documents counted by state and its chunks and vectors.
#[utoipa::path(get, path = "/v1/knowledge_bases/{id}", tag = "knowledge", params(("id" = String, Path, description = "the knowledge base id")),
    responses((status = 200, body = KnowledgeBaseObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_knowledge_base(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let stores = super::registry::stores(state)?;
    let service = service(state)?;
    let db = stores.db.knowledge_bases();
    let record = db.get(&caller.scope, id).await?;
    let documents = db.documents(&caller.scope, id).await?;
    let mut by_state = std::collections::BTreeMap::new();
    for document in &documents {
        *by_state.entry(document.state.as_str().to_owned()).or_insert(0) += 1;
    }
    let indexed = documents.iter().filter(|d| d.state == DocumentState::Indexed);
    let chunks: i64 = indexed.map(|d| d.chunks_total).sum();
    let shards = crate::knowledge::shards::KbShards::of(state, &record.id);
    let (counts, shards_unavailable) = shards.counts(state).await;
    let vector_count = if record.vector_backend == "milvus" {
        let milvus = service.milvus().await?;
        if milvus.has_collection(&record.id).await.unwrap_or(false) {
            milvus.count(&record.id).await.ok()
        } else {
            Some(0)
        }
    } else {
        Some(counts.vectors)
    };
    let mut object = KnowledgeBaseObject::from(record);
    object.stats = Some(KnowledgeBaseStats {
        documents: documents.len(),
        documents_by_state: by_state,
        chunks,
        vectors: vector_count,
        fulltext_entries: counts.fulltext,
        shards: shards.placements(),
        shards_unavailable,
    });
    Ok(warp::reply::json(&object).into_response())
}

/// Changes a knowledge base's description, chunking (for later uploads) or retrieval
/// settings; its embedding model and backend are fixed (the vectors depend on them).
#[utoipa::path(patch, path = "/v1/knowledge_bases/{id}", tag = "knowledge", request_body = UpdateKnowledgeBase,
    params(("id" = String, Path, description = "the knowledge base id")),
    responses((status = 200, body = KnowledgeBaseObject), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn update_knowledge_base(
    state: &AppState,
    caller: &Caller,
    id: &str,
    body: UpdateKnowledgeBase,
) -> Result<Response, ApiError> {
    let db = super::registry::stores(state)?.db.knowledge_bases();
    let current = db.get(&caller.scope, id).await?;
    let stored = KnowledgeBaseSettings::of(&current);
    let settings = KnowledgeBaseSettings {
        chunking: body.chunking.unwrap_or(stored.chunking),
        retrieval: body.retrieval.unwrap_or(stored.retrieval),
        graph: body.graph.unwrap_or(stored.graph),
    }
    .to_json()?;
    let record = db.update(&caller.scope, id, body.description.as_deref(), Some(&settings)).await?;
    Ok(warp::reply::json(&KnowledgeBaseObject::from(record)).into_response())
}

/// Deletes a knowledge base with its documents, chunks, vectors and full-text index.
#[utoipa::path(delete, path = "/v1/knowledge_bases/{id}", tag = "knowledge", params(("id" = String, Path, description = "the knowledge base id")),
    responses((status = 200, description = "deleted"), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete_knowledge_base(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let stores = super::registry::stores(state)?;
    let service = service(state)?;
    let record = stores.db.knowledge_bases().delete(&caller.scope, id).await?;
    service.drop_knowledge_base(state, &record).await?;
    let detail = json!({"name": record.name});
    super::auth::audit(state, caller.audit_entry("knowledge_base.delete", &record.id, detail)).await?;
    Ok(warp::reply::json(&json!({"id": record.id, "object": "knowledge_base", "deleted": true})).into_response())
}

// ---- documents ----

/// A document version as the API shows it, with its ingestion state and progress.
#[derive(Debug, Serialize, ToSchema)]
pub struct DocumentObject {
    pub id: String,
    pub object: &'static str,
    pub knowledge_base_id: String,
    pub filename: String,
    /// 1 for the first upload of a file name, then 2, 3...
    pub version: i64,
    /// pdf, docx, text, markdown or html.
    pub kind: String,
    pub sha256: String,
    pub bytes: i64,
    pub tags: Vec<String>,
    pub category: String,
    pub state: DocumentState,
    /// Why it failed, or what it waits for.
    pub error: Option<String>,
    pub attempts: i64,
    pub pages: i64,
    pub chunks_total: i64,
    pub chunks_embedded: i64,
    /// From 0 to 1.
    pub progress: f64,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<Document> for DocumentObject {
    fn from(d: Document) -> Self {
        let progress = match d.state {
            DocumentState::Indexed | DocumentState::Retired => 1.0,
            DocumentState::Embedding if d.chunks_total > 0 => {
                // Chunk counts are far below 2^52: exact in f64.
                #[allow(clippy::cast_precision_loss)]
                let share = d.chunks_embedded as f64 / d.chunks_total as f64;
                share
            }
            _ => 0.0,
        };
        DocumentObject {
            object: "knowledge_base.document",
            knowledge_base_id: d.kb_id,
            filename: d.filename,
            version: d.version,
            kind: d.kind,
            sha256: d.sha256,
            bytes: d.size_bytes,
            tags: d.tags,
            category: d.category,
            state: d.state,
            error: d.error,
            attempts: d.attempts,
            pages: d.page_count,
            chunks_total: d.chunks_total,
            chunks_embedded: d.chunks_embedded,
            progress,
            created_at: d.created_at_ms / 1000,
            updated_at: d.updated_at_ms / 1000,
            id: d.id,
        }
    }
}

/// The most tags a document may carry, and the longest tag or category.
const MAX_TAGS: usize = 32;
const MAX_TAG_BYTES: usize = 64;

/// Tags from a form field: a JSON array of strings, or a comma-separated list.
fn parse_tags(text: &str) -> Result<Vec<String>, ApiError> {
    let text = text.trim();
    let tags: Vec<String> = if text.starts_with('[') {
        serde_json::from_str(text).map_err(|e| bad("tags", format!("tags is not a JSON array of strings: {e}")))?
    } else {
        text.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect()
    };
    if tags.len() > MAX_TAGS {
        return Err(bad("tags", format!("at most {MAX_TAGS} tags")));
    }
    if let Some(tag) = tags.iter().find(|t| t.is_empty() || t.len() > MAX_TAG_BYTES) {
        return Err(bad("tags", format!("tag `{tag}` must be 1 to {MAX_TAG_BYTES} bytes")));
    }
    let mut unique = tags;
    unique.sort();
    unique.dedup();
    Ok(unique)
}

async fn small_field(field: &mut multer::Field<'_>, name: &str) -> Result<String, ApiError> {
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| form_error(&e))? {
        text.extend_from_slice(&chunk);
        if text.len() > 4096 {
            return Err(bad(name, format!("{name} is too long")));
        }
    }
    String::from_utf8(text).map_err(|_| bad(name, format!("{name} is not UTF-8 text")))
}

fn form_error(err: &multer::Error) -> ApiError {
    ApiError::bad_request("invalid_multipart", format!("the multipart form could not be read: {err}"))
}

/// Uploads a document: a multipart form with `file` and optional `tags` (a JSON array or
/// a comma-separated list) and `category`. The same file name again is the next version;
/// when it is indexed, the older versions leave the index. PDF, DOCX, TXT, Markdown and
/// HTML are read; the answer is the queued document (poll it for its state).
#[utoipa::path(post, path = "/v1/knowledge_bases/{id}/documents", tag = "knowledge",
    params(("id" = String, Path, description = "the knowledge base id")),
    request_body(content = Object, content_type = "multipart/form-data", description = "`file`, and optional `tags` and `category`"),
    responses((status = 200, body = DocumentObject), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 413, body = crate::error::ErrorBody)))]
pub async fn upload_document(
    state: &AppState,
    caller: &Caller,
    kb_id: &str,
    content_type: Option<&str>,
    body: impl futures_util::Stream<Item = Result<impl bytes::Buf, warp::Error>> + Unpin + Send + 'static,
) -> Result<Response, ApiError> {
    let stores = super::registry::stores(state)?;
    let service = service(state)?;
    // Unknown and foreign knowledge bases are refused before any byte is stored.
    let kb = stores.db.knowledge_bases().get(&caller.scope, kb_id).await?;
    let content_type = content_type.unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::bad_request(
            "invalid_content_type",
            format!("content-type `{content_type}` is not multipart/form-data: send the document as a multipart form with a `file` field"),
        )
    })?;
    let body = body.map_ok(|mut buf| buf.copy_to_bytes(buf.remaining()));
    let mut form = multer::Multipart::new(body, boundary);
    let mut tags = Vec::new();
    let mut category = String::new();
    let mut uploaded: Option<(String, Option<String>, maas_store::BlobInfo)> = None;
    let max_bytes = service.options.parse_limits.max_bytes as u64;
    while let Some(mut field) = form.next_field().await.map_err(|e| form_error(&e))? {
        match field.name() {
            Some("file") => {
                if uploaded.is_some() {
                    return Err(bad("file", "send one `file` field"));
                }
                let filename =
                    field.file_name().map(str::trim).filter(|n| !n.is_empty()).unwrap_or("document").to_owned();
                let part_type = field.content_type().map(ToString::to_string);
                let reader = tokio_util::io::StreamReader::new(
                    (&mut field).map(|chunk: Result<Bytes, multer::Error>| chunk.map_err(std::io::Error::other)),
                );
                let info =
                    stores.blobs.put(reader, Some(max_bytes)).await.map_err(|err| upload_error(err, max_bytes))?;
                uploaded = Some((filename, part_type, info));
            }
            Some("tags") => tags = parse_tags(&small_field(&mut field, "tags").await?)?,
            Some("category") => {
                let text = small_field(&mut field, "category").await?;
                category.clear();
                category.push_str(text.trim());
                if category.len() > MAX_TAG_BYTES {
                    return Err(bad("category", format!("category must be at most {MAX_TAG_BYTES} bytes")));
                }
            }
            Some(other) => {
                return Err(bad(other, format!("unknown form field `{other}`: send `file`, `tags` and `category`")));
            }
            None => return Err(bad("file", "a form field has no name")),
        }
    }
    let Some((filename, part_type, info)) = uploaded else {
        return Err(bad("file", "the form has no `file` field"));
    };
    if info.size_bytes == 0 {
        return Err(bad("file", "the file is empty"));
    }
    let head = read_head(stores, &info.digest).await?;
    let kind = DocumentKind::detect(Some(&filename), part_type.as_deref(), &head)
        .map_err(|e| ApiError::bad_request("unsupported_document", e.to_string()).with_param("file"))?;
    super::files::check_storage_quota(stores, caller, info.size_bytes).await?;
    let document = stores
        .db
        .knowledge_bases()
        .add_document(
            &caller.scope,
            &kb.id,
            NewDocument {
                filename,
                kind: kind.as_str().to_owned(),
                sha256: info.digest.to_hex(),
                size_bytes: info.size_bytes,
                tags,
                category,
            },
        )
        .await?;
    service.wake.notify_one();
    tracing::info!(kb = %kb.id, document = %document.id, version = document.version, bytes = document.size_bytes, "document queued");
    Ok(warp::reply::json(&DocumentObject::from(document)).into_response())
}

/// A failed upload's answer: a broken form is the client's, an oversized document a 413.
fn upload_error(err: maas_store::StoreError, max_bytes: u64) -> ApiError {
    match err {
        maas_store::StoreError::Io { source, .. }
            if source.get_ref().and_then(|inner| inner.downcast_ref::<multer::Error>()).is_some() =>
        {
            ApiError::bad_request("invalid_multipart", format!("the multipart form could not be read: {source}"))
        }
        maas_store::StoreError::BlobTooLarge { .. } => ApiError::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "document_too_large",
            format!("the document is larger than the {max_bytes}-byte limit of knowledge.max_document_bytes"),
        )
        .with_param("file"),
        other => other.into(),
    }
}

/// The first 4 KiB of a stored upload, where formats show what they are.
async fn read_head(stores: &crate::state::Stores, digest: &maas_store::Digest) -> Result<Vec<u8>, ApiError> {
    use tokio::io::AsyncReadExt as _;
    let mut reader = stores.blobs.open_blob(digest).await?;
    let mut head = vec![0; 4096];
    let mut filled = 0;
    while filled < head.len() {
        let read = reader.read(&mut head[filled..]).await.map_err(|e| ApiError::internal(e.to_string()))?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    head.truncate(filled);
    Ok(head)
}

/// The documents of a knowledge base (every version), newest first.
#[utoipa::path(get, path = "/v1/knowledge_bases/{id}/documents", tag = "knowledge",
    params(("id" = String, Path, description = "the knowledge base id")),
    responses((status = 200, description = "a list of documents", body = super::ListOf<DocumentObject>), (status = 404, body = crate::error::ErrorBody)))]
pub async fn list_documents(state: &AppState, caller: &Caller, kb_id: &str) -> Result<Response, ApiError> {
    let documents = super::registry::stores(state)?.db.knowledge_bases().documents(&caller.scope, kb_id).await?;
    Ok(super::ListOf::reply(documents.into_iter().map(DocumentObject::from).collect()))
}

/// A document with its ingestion state and progress.
#[utoipa::path(get, path = "/v1/knowledge_bases/{id}/documents/{document_id}", tag = "knowledge",
    params(("id" = String, Path, description = "the knowledge base id"), ("document_id" = String, Path, description = "the document id")),
    responses((status = 200, body = DocumentObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_document(
    state: &AppState,
    caller: &Caller,
    kb_id: &str,
    document_id: &str,
) -> Result<Response, ApiError> {
    let document =
        super::registry::stores(state)?.db.knowledge_bases().scoped_document(&caller.scope, kb_id, document_id).await?;
    Ok(warp::reply::json(&DocumentObject::from(document)).into_response())
}

/// Deletes a document version: it leaves retrieval at once; its vectors and chunks go in
/// the background.
#[utoipa::path(delete, path = "/v1/knowledge_bases/{id}/documents/{document_id}", tag = "knowledge",
    params(("id" = String, Path, description = "the knowledge base id"), ("document_id" = String, Path, description = "the document id")),
    responses((status = 200, body = DocumentObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete_document(
    state: &AppState,
    caller: &Caller,
    kb_id: &str,
    document_id: &str,
) -> Result<Response, ApiError> {
    let document =
        super::registry::stores(state)?.db.knowledge_bases().delete_document(&caller.scope, kb_id, document_id).await?;
    service(state)?.wake.notify_one();
    let detail = json!({"filename": document.filename, "version": document.version});
    super::auth::audit(state, caller.audit_entry("knowledge_base.document.delete", &document.id, detail)).await?;
    Ok(warp::reply::json(&DocumentObject::from(document)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkQuery {
    /// `child` (default: the retrieved chunks) or `parent`.
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub offset: Option<i64>,
    /// 1 to 500, default 100.
    #[serde(default)]
    pub limit: Option<i64>,
}

/// A chunk as the chunk viewer shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkObject {
    /// A decimal string (it does not fit JavaScript's numbers).
    pub chunk_id: String,
    pub level: String,
    pub ordinal: i64,
    pub parent_ordinal: Option<i64>,
    pub text: String,
    pub tokens: i64,
    pub page_start: i64,
    pub page_end: i64,
    pub heading_path: Vec<String>,
    pub embedded: bool,
    /// The document the chunk is of (in an entity's neighbourhood, which spans documents).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document_id: Option<String>,
}

/// A page of a document's chunks.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<ChunkObject>,
    /// The document's chunks at this level, on every page.
    pub total: i64,
}

impl From<StoredChunk> for ChunkObject {
    fn from(c: StoredChunk) -> Self {
        ChunkObject {
            chunk_id: c.chunk_id.to_string(),
            level: c.level,
            ordinal: c.ordinal,
            parent_ordinal: c.parent_ordinal,
            text: c.text,
            tokens: c.token_count,
            page_start: c.page_start,
            page_end: c.page_end,
            heading_path: c.heading_path,
            embedded: c.embedded,
            document_id: None,
        }
    }
}

/// A document's chunks in order (the chunk viewer), a page at a time.
#[utoipa::path(get, path = "/v1/knowledge_bases/{id}/documents/{document_id}/chunks", tag = "knowledge",
    params(("id" = String, Path, description = "the knowledge base id"), ("document_id" = String, Path, description = "the document id"),
        ("level" = Option<String>, Query, description = "child (default) or parent"),
        ("offset" = Option<i64>, Query, description = "chunks to skip"), ("limit" = Option<i64>, Query, description = "1 to 500, default 100")),
    responses((status = 200, description = "a page of chunks", body = ChunkList), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn list_chunks(
    state: &AppState,
    caller: &Caller,
    kb_id: &str,
    document_id: &str,
    query: &ChunkQuery,
) -> Result<Response, ApiError> {
    let level = query.level.as_deref().unwrap_or("child");
    if !matches!(level, "child" | "parent") {
        return Err(bad("level", format!("level `{level}` is not child or parent")));
    }
    let offset = query.offset.unwrap_or(0);
    let limit = query.limit.unwrap_or(100);
    if offset < 0 {
        return Err(bad("offset", "offset must not be negative"));
    }
    if !(1..=500).contains(&limit) {
        return Err(bad("limit", "limit must be 1 to 500"));
    }
    let db = super::registry::stores(state)?.db.knowledge_bases();
    let document = db.scoped_document(&caller.scope, kb_id, document_id).await?;
    let chunks = db.document_chunks(&document.id, level, offset, limit).await?;
    let total = db.count_document_chunks(&document.id, level).await?;
    let data = chunks.into_iter().map(ChunkObject::from).collect();
    Ok(warp::reply::json(&ChunkList { object: "list", data, total }).into_response())
}

/// The retrieval test: the ranked chunks a query finds, with their scores.
#[utoipa::path(post, path = "/v1/knowledge_bases/{id}/retrieve", tag = "knowledge", request_body = RetrieveRequest,
    params(("id" = String, Path, description = "the knowledge base id")),
    responses((status = 200, body = RetrieveResponse), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 503, body = crate::error::ErrorBody)))]
pub async fn retrieve_test(
    state: &Arc<AppState>,
    caller: &Caller,
    kb_id: &str,
    request: &RetrieveRequest,
) -> Result<Response, ApiError> {
    let stores = super::registry::stores(state)?;
    let service = service(state)?;
    let kb = stores.db.knowledge_bases().get(&caller.scope, kb_id).await?;
    let work = crate::metering::Work::for_caller(caller, "knowledge.retrieve");
    let answer = retrieve(state, stores, service, &kb, request, &work).await?;
    Ok(warp::reply::json(&answer).into_response())
}

/// Chat with a knowledge base: a chat completion (same body, same answer, streaming too)
/// that retrieves from this knowledge base and cites its sources.
#[utoipa::path(post, path = "/v1/knowledge_bases/{id}/chat", tag = "knowledge",
    params(("id" = String, Path, description = "the knowledge base id")),
    request_body(content = super::openai::InferenceRequest, description = "a chat completion request; `retrieval` sets how sources are found"),
    responses((status = 200, description = "a chat.completion with `citations`, or an SSE stream whose first event carries them", content_type = "application/json"),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn knowledge_chat(
    state: Arc<AppState>,
    caller: Caller,
    kb_id: String,
    mut request: super::openai::InferenceRequest,
) -> Result<Response, ApiError> {
    if request.knowledge_base_ids.is_some() {
        return Err(bad("knowledge_base_ids", "the path names the knowledge base: leave knowledge_base_ids out"));
    }
    request.knowledge_base_ids = Some(vec![kb_id]);
    super::openai::chat_completions(state, caller, request).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphQuery {
    /// Only entities whose name contains this.
    #[serde(default)]
    pub q: Option<String>,
    /// One entity's neighbourhood: its relations and the chunks that mention it.
    #[serde(default)]
    pub entity: Option<String>,
    /// 1 to 500, default 100.
    #[serde(default)]
    pub limit: Option<i64>,
}

/// A knowledge base's graph: entities with the relations between them.
#[derive(Debug, Serialize, ToSchema)]
pub struct KnowledgeGraph {
    /// Always `knowledge_base.graph`.
    pub object: &'static str,
    /// Most mentioned first.
    pub entities: Vec<GraphEntity>,
    /// Relations whose two ends are both among `entities`.
    pub relations: Vec<GraphEdge>,
}

/// One entity's neighbourhood: its relations and the chunks that mention it.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntityNeighbourhood {
    /// Always `knowledge_base.graph.entity`.
    pub object: &'static str,
    /// The entity's key (its name, normalised).
    pub entity: String,
    pub relations: Vec<GraphEdge>,
    /// With their `document_id`.
    pub chunks: Vec<ChunkObject>,
}

/// What `GET /v1/knowledge_bases/{id}/graph` answers: the graph, or with `entity` one
/// entity's neighbourhood.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum GraphReply {
    Graph(KnowledgeGraph),
    Entity(EntityNeighbourhood),
}

/// The knowledge graph: entities (most mentioned first) with the relations between them,
/// or, with `entity`, one entity's relations and the chunks that mention it.
#[utoipa::path(get, path = "/v1/knowledge_bases/{id}/graph", tag = "knowledge",
    params(("id" = String, Path, description = "the knowledge base id"),
        ("q" = Option<String>, Query, description = "only entities whose name contains this"),
        ("entity" = Option<String>, Query, description = "one entity's neighbourhood"),
        ("limit" = Option<i64>, Query, description = "1 to 500, default 100")),
    responses((status = 200, description = "the graph (`knowledge_base.graph`), or with `entity` its neighbourhood (`knowledge_base.graph.entity`)", body = GraphReply),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn knowledge_graph(
    state: &AppState,
    caller: &Caller,
    kb_id: &str,
    query: &GraphQuery,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(bad("limit", "limit must be 1 to 500"));
    }
    let db = super::registry::stores(state)?.db.knowledge_bases();
    let kb = db.get(&caller.scope, kb_id).await?;
    let reply = if let Some(entity) = &query.entity {
        let key = maas_knowledge::graph::entity_key(entity);
        let relations = db.graph_edges(&kb.id, std::slice::from_ref(&key), limit).await?;
        let ids = db.graph_entity_chunks(&kb.id, &key, limit).await?;
        let chunks: Vec<ChunkObject> = db
            .chunks(&kb.id, &ids)
            .await?
            .into_iter()
            .map(|chunk| {
                let document_id = chunk.document_id.clone();
                ChunkObject { document_id: Some(document_id), ..ChunkObject::from(chunk) }
            })
            .collect();
        if relations.is_empty() && chunks.is_empty() {
            return Err(ApiError::not_found(format!("no entity `{entity}` in knowledge base `{kb_id}`")));
        }
        GraphReply::Entity(EntityNeighbourhood {
            object: "knowledge_base.graph.entity",
            entity: key,
            relations,
            chunks,
        })
    } else {
        let entities = db.graph_entities(&kb.id, query.q.as_deref().unwrap_or_default(), limit).await?;
        let keys: Vec<String> = entities.iter().map(|e| e.key.clone()).collect();
        let relations = db
            .graph_edges(&kb.id, &keys, limit * 4)
            .await?
            .into_iter()
            .filter(|edge| keys.contains(&edge.source) && keys.contains(&edge.target))
            .collect();
        GraphReply::Graph(KnowledgeGraph { object: "knowledge_base.graph", entities, relations })
    };
    Ok(warp::reply::json(&reply).into_response())
}
