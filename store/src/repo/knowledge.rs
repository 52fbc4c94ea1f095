//! Knowledge bases, their documents and chunks (migration 0009).
//!
//! Knowledge bases are tenant-owned: what a user or route does goes through a
//! [`TenantScope`]; documents and chunks are reached through their knowledge base. The
//! ingestion worker's methods ([`KnowledgeBases::claim_document`] and the ones after it)
//! take no scope: they act on documents a tenant already queued, the way the batch worker
//! does.

use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::tenant::{Owner, TenantScope, trusted_sql};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnowledgeBase {
    pub id: String,
    pub owner: Owner,
    pub name: String,
    pub description: String,
    pub embedding_model: String,
    pub vector_backend: String,
    pub shard_count: i64,
    /// Chunking and retrieval settings (JSON, validated by the gateway).
    pub settings: serde_json::Value,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct NewKnowledgeBase {
    pub name: String,
    pub description: String,
    pub embedding_model: String,
    pub vector_backend: String,
    pub shard_count: i64,
    pub settings: serde_json::Value,
}

/// Where a document's ingestion has got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DocumentState {
    Queued,
    Parsing,
    Chunking,
    Embedding,
    Indexed,
    Failed,
    /// A newer version of the same file is indexed; this one's chunks left the index.
    Retired,
    /// Deleted by its owner; the worker removes its vectors, then the row.
    Deleting,
}

impl DocumentState {
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentState::Queued => "queued",
            DocumentState::Parsing => "parsing",
            DocumentState::Chunking => "chunking",
            DocumentState::Embedding => "embedding",
            DocumentState::Indexed => "indexed",
            DocumentState::Failed => "failed",
            DocumentState::Retired => "retired",
            DocumentState::Deleting => "deleting",
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "queued" => DocumentState::Queued,
            "parsing" => DocumentState::Parsing,
            "chunking" => DocumentState::Chunking,
            "embedding" => DocumentState::Embedding,
            "indexed" => DocumentState::Indexed,
            "failed" => DocumentState::Failed,
            "retired" => DocumentState::Retired,
            "deleting" => DocumentState::Deleting,
            other => return Err(StoreError::InvalidInput(format!("unknown document state `{other}` in the database"))),
        })
    }

    /// Whether the worker still has steps to run.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            DocumentState::Queued
                | DocumentState::Parsing
                | DocumentState::Chunking
                | DocumentState::Embedding
                | DocumentState::Deleting
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Document {
    pub id: String,
    pub kb_id: String,
    pub filename: String,
    pub version: i64,
    pub kind: String,
    pub sha256: String,
    pub size_bytes: i64,
    pub tags: Vec<String>,
    pub category: String,
    pub state: DocumentState,
    pub error: Option<String>,
    pub attempts: i64,
    pub page_count: i64,
    pub chunks_total: i64,
    pub chunks_embedded: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct NewDocument {
    pub filename: String,
    pub kind: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub tags: Vec<String>,
    pub category: String,
}

/// A chunk as ingestion writes it and retrieval reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredChunk {
    pub chunk_id: i64,
    pub document_id: String,
    /// `child` (embedded, retrieved) or `parent` (the context a child stands for).
    pub level: String,
    pub ordinal: i64,
    pub parent_ordinal: Option<i64>,
    pub text: String,
    pub token_count: i64,
    pub page_start: i64,
    pub page_end: i64,
    pub heading_path: Vec<String>,
    pub embedded: bool,
}

type KbRow = (String, String, String, String, String, String, String, i64, String, i64, i64);
#[derive(sqlx::FromRow)]
struct DocumentRow {
    id: String,
    kb_id: String,
    filename: String,
    version: i64,
    kind: String,
    sha256: String,
    size_bytes: i64,
    tags: String,
    category: String,
    state: String,
    error: Option<String>,
    attempts: i64,
    page_count: i64,
    chunks_total: i64,
    chunks_embedded: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
}
type ChunkRow = (i64, String, String, i64, Option<i64>, String, i64, i64, i64, String, i64);

const KB_COLUMNS: &str = "k.id, k.owner_kind, k.owner_id, k.name, k.description, k.embedding_model, \
    k.vector_backend, k.shard_count, k.settings, k.created_at_ms, k.updated_at_ms";
const DOCUMENT_COLUMNS: &str = "d.id, d.kb_id, d.filename, d.version, d.kind, d.sha256, d.size_bytes, d.tags, \
    d.category, d.state, d.error, d.attempts, d.page_count, d.chunks_total, d.chunks_embedded, d.created_at_ms, \
    d.updated_at_ms";
const CHUNK_COLUMNS: &str = "c.chunk_id, c.document_id, c.level, c.ordinal, c.parent_ordinal, c.text, \
    c.token_count, c.page_start, c.page_end, c.heading_path, c.embedded";

fn kb_from_row(row: KbRow) -> Result<KnowledgeBase> {
    let (id, owner_kind, owner_id, name, description, embedding_model, vector_backend, shard_count, settings, c, u) =
        row;
    Ok(KnowledgeBase {
        id,
        owner: Owner::from_columns(&owner_kind, owner_id)?,
        name,
        description,
        embedding_model,
        vector_backend,
        shard_count,
        settings: serde_json::from_str(&settings).unwrap_or(serde_json::Value::Null),
        created_at_ms: c,
        updated_at_ms: u,
    })
}

fn document_from_row(row: DocumentRow) -> Result<Document> {
    Ok(Document {
        state: DocumentState::parse(&row.state)?,
        tags: serde_json::from_str(&row.tags).unwrap_or_default(),
        id: row.id,
        kb_id: row.kb_id,
        filename: row.filename,
        version: row.version,
        kind: row.kind,
        sha256: row.sha256,
        size_bytes: row.size_bytes,
        category: row.category,
        error: row.error,
        attempts: row.attempts,
        page_count: row.page_count,
        chunks_total: row.chunks_total,
        chunks_embedded: row.chunks_embedded,
        created_at_ms: row.created_at_ms,
        updated_at_ms: row.updated_at_ms,
    })
}

fn chunk_from_row(row: ChunkRow) -> StoredChunk {
    let (
        chunk_id,
        document_id,
        level,
        ordinal,
        parent_ordinal,
        text,
        token_count,
        page_start,
        page_end,
        path,
        embedded,
    ) = row;
    StoredChunk {
        chunk_id,
        document_id,
        level,
        ordinal,
        parent_ordinal,
        text,
        token_count,
        page_start,
        page_end,
        heading_path: serde_json::from_str(&path).unwrap_or_default(),
        embedded: embedded != 0,
    }
}

fn json_text(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// An entity mentioned in a chunk, for [`KnowledgeBases::save_graph`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphMention {
    pub chunk_id: i64,
    pub key: String,
    pub name: String,
    pub kind: String,
}

/// Two entities one sentence of a chunk relates, for [`KnowledgeBases::save_graph`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphRelation {
    pub chunk_id: i64,
    pub source: String,
    pub target: String,
    pub evidence: String,
}

/// An entity of a knowledge base's graph, over its indexed documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct GraphEntity {
    pub key: String,
    pub name: String,
    pub kind: String,
    /// Chunks that mention it.
    pub mentions: i64,
    /// Documents that mention it.
    pub documents: i64,
}

/// A relation of a knowledge base's graph: how many sentences relate the two, and one of
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct GraphEdge {
    pub source: String,
    pub target: String,
    pub weight: i64,
    pub evidence: String,
}

pub struct KnowledgeBases<'a> {
    pub(crate) db: &'a Db,
}

impl KnowledgeBases<'_> {
    /// Makes a knowledge base owned by the scope's acting owner; names are unique per owner.
    pub async fn create(&self, scope: &TenantScope, new: NewKnowledgeBase) -> Result<KnowledgeBase> {
        let name = new.name.trim().to_owned();
        if name.is_empty() || name.len() > 100 {
            return Err(StoreError::InvalidInput("a knowledge base name must be 1 to 100 bytes long".into()));
        }
        let id = new_id("kb");
        let now = now_ms();
        let owner = scope.acting_as();
        sqlx::query(
            "INSERT INTO knowledge_bases (id, owner_kind, owner_id, name, description, embedding_model, \
             vector_backend, shard_count, settings, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)",
        )
        .bind(&id)
        .bind(owner.kind())
        .bind(owner.id())
        .bind(&name)
        .bind(&new.description)
        .bind(&new.embedding_model)
        .bind(&new.vector_backend)
        .bind(new.shard_count)
        .bind(json_text(&new.settings))
        .bind(now)
        .execute(self.db.pool())
        .await
        .map_err(|err| StoreError::conflict_on_unique(err, || format!("a knowledge base named `{name}` exists")))?;
        self.get(scope, &id).await
    }

    /// A knowledge base the scope may read; another tenant's is not found.
    pub async fn get(&self, scope: &TenantScope, id: &str) -> Result<KnowledgeBase> {
        let sql = format!(
            "SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.id = $2 AND {}",
            TenantScope::readable_sql("k", 1)
        );
        let row: Option<KbRow> =
            sqlx::query_as(trusted_sql(sql)).bind(scope.user_id()).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(kb_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound { what: "knowledge base", id: id.to_owned() })
    }

    /// A knowledge base by id, for the worker and retrieval after the route checked scope.
    pub async fn get_unscoped(&self, id: &str) -> Result<KnowledgeBase> {
        let sql = format!("SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.id = $1");
        let row: Option<KbRow> = sqlx::query_as(trusted_sql(sql)).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(kb_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound { what: "knowledge base", id: id.to_owned() })
    }

    /// The acting owner's knowledge bases, newest first.
    pub async fn list(&self, scope: &TenantScope) -> Result<Vec<KnowledgeBase>> {
        let owner = scope.acting_as();
        let sql = format!(
            "SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.owner_kind = $2 AND k.owner_id = $3 AND {} \
             ORDER BY k.created_at_ms DESC, k.id DESC",
            TenantScope::readable_sql("k", 1)
        );
        let rows: Vec<KbRow> = sqlx::query_as(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(owner.kind())
            .bind(owner.id())
            .fetch_all(self.db.pool())
            .await?;
        rows.into_iter().map(kb_from_row).collect()
    }

    /// Changes a knowledge base's description and settings (its embedding model and
    /// backend are fixed: the vectors depend on them).
    pub async fn update(
        &self,
        scope: &TenantScope,
        id: &str,
        description: Option<&str>,
        settings: Option<&serde_json::Value>,
    ) -> Result<KnowledgeBase> {
        let current = self.get(scope, id).await?;
        let sql = format!(
            "UPDATE knowledge_bases SET description = $3, settings = $4, updated_at_ms = $5 WHERE id = $2 AND {}",
            TenantScope::writable_sql("knowledge_bases", 1)
        );
        let changed = sqlx::query(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(id)
            .bind(description.unwrap_or(&current.description))
            .bind(json_text(settings.unwrap_or(&current.settings)))
            .bind(now_ms())
            .execute(self.db.pool())
            .await?
            .rows_affected();
        if changed == 0 {
            return Err(StoreError::Forbidden(format!("only the owner may change knowledge base `{id}`")));
        }
        self.get(scope, id).await
    }

    /// Deletes a knowledge base with its documents and chunks; the caller drops its
    /// vectors. Returns the deleted record.
    pub async fn delete(&self, scope: &TenantScope, id: &str) -> Result<KnowledgeBase> {
        let record = self.get(scope, id).await?;
        let sql = format!(
            "DELETE FROM knowledge_bases WHERE id = $2 AND {}",
            TenantScope::writable_sql("knowledge_bases", 1)
        );
        let deleted =
            sqlx::query(trusted_sql(sql)).bind(scope.user_id()).bind(id).execute(self.db.pool()).await?.rows_affected();
        if deleted == 0 {
            return Err(StoreError::Forbidden(format!("only the owner may delete knowledge base `{id}`")));
        }
        Ok(record)
    }

    /// Queues an uploaded document: the next version of its file name in the knowledge base.
    pub async fn add_document(&self, scope: &TenantScope, kb_id: &str, new: NewDocument) -> Result<Document> {
        let kb = self.get(scope, kb_id).await?;
        if new.filename.is_empty() || new.filename.len() > 255 {
            return Err(StoreError::InvalidInput("a file name must be 1 to 255 bytes long".into()));
        }
        let size_bytes = i64::try_from(new.size_bytes)
            .map_err(|_| StoreError::InvalidInput(format!("file size {} is too large", new.size_bytes)))?;
        let id = new_id("doc");
        let now = now_ms();
        // Two uploads of one file name racing for a version: the unique key refuses the
        // loser, which tries the next version.
        for _ in 0..5 {
            let version: i64 = sqlx::query_scalar(
                "SELECT CAST(COALESCE(MAX(version), 0) + 1 AS BIGINT) FROM kb_documents WHERE kb_id = $1 AND filename = $2",
            )
            .bind(&kb.id)
            .bind(&new.filename)
            .fetch_one(self.db.pool())
            .await?;
            let inserted = sqlx::query(
                "INSERT INTO kb_documents (id, kb_id, filename, version, kind, sha256, size_bytes, tags, category, \
                 state, error, attempts, page_count, chunks_total, chunks_embedded, created_at_ms, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', NULL, 0, 0, 0, 0, $10, $10)",
            )
            .bind(&id)
            .bind(&kb.id)
            .bind(&new.filename)
            .bind(version)
            .bind(&new.kind)
            .bind(&new.sha256)
            .bind(size_bytes)
            .bind(json_text(&new.tags))
            .bind(&new.category)
            .bind(now)
            .execute(self.db.pool())
            .await;
            match inserted {
                Ok(_) => return self.document(&id).await,
                Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {}
                Err(err) => return Err(err.into()),
            }
        }
        Err(StoreError::Conflict(format!("`{}` is being uploaded by someone else: try again", new.filename)))
    }

    /// The documents of a knowledge base the scope may read, newest first.
    pub async fn documents(&self, scope: &TenantScope, kb_id: &str) -> Result<Vec<Document>> {
        let kb = self.get(scope, kb_id).await?;
        let sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM kb_documents d WHERE d.kb_id = $1 ORDER BY d.created_at_ms DESC, d.id DESC"
        );
        let rows: Vec<DocumentRow> = sqlx::query_as(trusted_sql(sql)).bind(&kb.id).fetch_all(self.db.pool()).await?;
        rows.into_iter().map(document_from_row).collect()
    }

    /// A document of a knowledge base the scope may read.
    pub async fn scoped_document(&self, scope: &TenantScope, kb_id: &str, document_id: &str) -> Result<Document> {
        let kb = self.get(scope, kb_id).await?;
        let document = self.document(document_id).await?;
        if document.kb_id != kb.id {
            return Err(StoreError::NotFound { what: "document", id: document_id.to_owned() });
        }
        Ok(document)
    }

    /// Marks a document for deletion (the worker removes its vectors, then the row).
    pub async fn delete_document(&self, scope: &TenantScope, kb_id: &str, document_id: &str) -> Result<Document> {
        let kb = self.get(scope, kb_id).await?;
        let sql = format!(
            "UPDATE kb_documents SET state = 'deleting', lease_owner = NULL, lease_expires_at_ms = NULL, \
             updated_at_ms = $4 WHERE id = $2 AND kb_id = $3 AND EXISTS (SELECT 1 FROM knowledge_bases kb \
             WHERE kb.id = $3 AND {})",
            TenantScope::writable_sql("kb", 1)
        );
        let changed = sqlx::query(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(document_id)
            .bind(&kb.id)
            .bind(now_ms())
            .execute(self.db.pool())
            .await?
            .rows_affected();
        if changed == 0 {
            self.scoped_document(scope, kb_id, document_id).await?;
            return Err(StoreError::Forbidden(format!("only the owner may delete documents of `{kb_id}`")));
        }
        self.document(document_id).await
    }

    /// A document by id (the worker's view).
    pub async fn document(&self, id: &str) -> Result<Document> {
        let sql = format!("SELECT {DOCUMENT_COLUMNS} FROM kb_documents d WHERE d.id = $1");
        let row: Option<DocumentRow> = sqlx::query_as(trusted_sql(sql)).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(document_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound { what: "document", id: id.to_owned() })
    }

    /// The documents of `ids` that exist (in no particular order), in one query per 500.
    pub async fn documents_by_id(&self, ids: &[String]) -> Result<Vec<Document>> {
        let mut found = Vec::with_capacity(ids.len());
        for batch in ids.chunks(500) {
            let placeholders: Vec<String> = (1..=batch.len()).map(|i| format!("${i}")).collect();
            let sql =
                format!("SELECT {DOCUMENT_COLUMNS} FROM kb_documents d WHERE d.id IN ({})", placeholders.join(", "));
            let mut query = sqlx::query_as::<_, DocumentRow>(trusted_sql(sql));
            for id in batch {
                query = query.bind(id);
            }
            for row in query.fetch_all(self.db.pool()).await? {
                found.push(document_from_row(row)?);
            }
        }
        Ok(found)
    }

    /// Takes the oldest document with work left whose lease is free or has run out, for
    /// `worker` until `lease_ms` from now. A worker that dies loses the lease and another
    /// continues from the document's last durable step.
    pub async fn claim_document(&self, worker: &str, lease_ms: i64) -> Result<Option<Document>> {
        let now = now_ms();
        let candidates: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM kb_documents WHERE state IN ('queued', 'parsing', 'chunking', 'embedding', 'deleting') \
             AND (lease_expires_at_ms IS NULL OR lease_expires_at_ms < $1) ORDER BY updated_at_ms, id LIMIT 8",
        )
        .bind(now)
        .fetch_all(self.db.pool())
        .await?;
        for id in candidates {
            let claimed = sqlx::query(
                "UPDATE kb_documents SET lease_owner = $1, lease_expires_at_ms = $2, attempts = attempts + 1 \
                 WHERE id = $3 AND (lease_expires_at_ms IS NULL OR lease_expires_at_ms < $4)",
            )
            .bind(worker)
            .bind(now + lease_ms)
            .bind(&id)
            .bind(now)
            .execute(self.db.pool())
            .await?
            .rows_affected();
            if claimed == 1 {
                return Ok(Some(self.document(&id).await?));
            }
        }
        Ok(None)
    }

    /// Extends `worker`'s lease; false when it lost the document (to a deletion or
    /// another worker), so it stops.
    pub async fn renew_lease(&self, document_id: &str, worker: &str, lease_ms: i64) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE kb_documents SET lease_expires_at_ms = $1 WHERE id = $2 AND lease_owner = $3 AND state <> 'deleting'",
        )
        .bind(now_ms() + lease_ms)
        .bind(document_id)
        .bind(worker)
        .execute(self.db.pool())
        .await?
        .rows_affected();
        Ok(renewed == 1)
    }

    /// Records the step a document reached (and, for a failure, why).
    pub async fn set_state(&self, document_id: &str, state: DocumentState, error: Option<&str>) -> Result<()> {
        let release = !state.is_pending() || state == DocumentState::Deleting;
        sqlx::query(
            "UPDATE kb_documents SET state = $1, error = $2, updated_at_ms = $3, \
             lease_owner = CASE WHEN $4 THEN NULL ELSE lease_owner END, \
             lease_expires_at_ms = CASE WHEN $4 THEN NULL ELSE lease_expires_at_ms END \
             WHERE id = $5 AND state <> 'deleting'",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(now_ms())
        .bind(release)
        .bind(document_id)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Writes a document's chunks (replacing any an interrupted run wrote) and moves it to
    /// `embedding`, in one transaction.
    pub async fn save_chunks(&self, document_id: &str, page_count: i64, chunks: &[StoredChunk]) -> Result<()> {
        let document = self.document(document_id).await?;
        let mut tx = self.db.begin_write().await?;
        sqlx::query("DELETE FROM kb_chunks WHERE document_id = $1").bind(document_id).execute(&mut *tx).await?;
        for chunk in chunks {
            sqlx::query(
                "INSERT INTO kb_chunks (chunk_id, kb_id, document_id, level, ordinal, parent_ordinal, text, \
                 token_count, page_start, page_end, heading_path, embedded) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0)",
            )
            .bind(chunk.chunk_id)
            .bind(&document.kb_id)
            .bind(document_id)
            .bind(&chunk.level)
            .bind(chunk.ordinal)
            .bind(chunk.parent_ordinal)
            .bind(&chunk.text)
            .bind(chunk.token_count)
            .bind(chunk.page_start)
            .bind(chunk.page_end)
            .bind(json_text(&chunk.heading_path))
            .execute(&mut *tx)
            .await
            .map_err(|err| StoreError::conflict_on_unique(err, || format!("chunk id {} is taken", chunk.chunk_id)))?;
        }
        let children = i64::try_from(chunks.iter().filter(|c| c.level == "child").count()).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE kb_documents SET state = 'embedding', page_count = $1, chunks_total = $2, chunks_embedded = 0, \
             updated_at_ms = $3 WHERE id = $4 AND state <> 'deleting'",
        )
        .bind(page_count)
        .bind(children)
        .bind(now_ms())
        .bind(document_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The next child chunks of a document still to embed, in order.
    pub async fn chunks_to_embed(&self, document_id: &str, limit: i64) -> Result<Vec<StoredChunk>> {
        let sql = format!(
            "SELECT {CHUNK_COLUMNS} FROM kb_chunks c WHERE c.document_id = $1 AND c.level = 'child' \
             AND c.embedded = 0 ORDER BY c.ordinal LIMIT $2"
        );
        let rows: Vec<ChunkRow> =
            sqlx::query_as(trusted_sql(sql)).bind(document_id).bind(limit).fetch_all(self.db.pool()).await?;
        Ok(rows.into_iter().map(chunk_from_row).collect())
    }

    /// The child chunks of knowledge base `kb_id` that its indexes hold (embedded, of a
    /// document being embedded or indexed), by chunk id after `after`, at most `limit`:
    /// what a knowledge-base shard is rebuilt from.
    pub async fn indexed_chunks(&self, kb_id: &str, after: i64, limit: i64) -> Result<Vec<StoredChunk>> {
        let sql = format!(
            "SELECT {CHUNK_COLUMNS} FROM kb_chunks c JOIN kb_documents d ON d.id = c.document_id \
             WHERE c.kb_id = $1 AND c.level = 'child' AND c.embedded = 1 \
             AND d.state IN ('embedding', 'indexed') AND c.chunk_id > $2 ORDER BY c.chunk_id LIMIT $3"
        );
        let rows: Vec<ChunkRow> =
            sqlx::query_as(trusted_sql(sql)).bind(kb_id).bind(after).bind(limit).fetch_all(self.db.pool()).await?;
        Ok(rows.into_iter().map(chunk_from_row).collect())
    }

    /// Records that these chunks' vectors are in the index (after the index acknowledged
    /// them), and the document's progress.
    pub async fn mark_embedded(&self, document_id: &str, chunk_ids: &[i64]) -> Result<()> {
        let mut tx = self.db.begin_write().await?;
        for id in chunk_ids {
            sqlx::query("UPDATE kb_chunks SET embedded = 1 WHERE chunk_id = $1 AND document_id = $2")
                .bind(id)
                .bind(document_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE kb_documents SET chunks_embedded = (SELECT COUNT(*) FROM kb_chunks WHERE document_id = $1 \
             AND level = 'child' AND embedded = 1), updated_at_ms = $2 WHERE id = $1",
        )
        .bind(document_id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks a document indexed and retires the older versions of its file; returns the
    /// retired documents' ids (their vectors are to be deleted).
    pub async fn finish_indexed(&self, document_id: &str) -> Result<Vec<String>> {
        let document = self.document(document_id).await?;
        let mut tx = self.db.begin_write().await?;
        let retired: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM kb_documents WHERE kb_id = $1 AND filename = $2 AND version < $3 \
             AND state NOT IN ('retired', 'deleting')",
        )
        .bind(&document.kb_id)
        .bind(&document.filename)
        .bind(document.version)
        .fetch_all(&mut *tx)
        .await?;
        let now = now_ms();
        for id in &retired {
            sqlx::query("UPDATE kb_documents SET state = 'retired', updated_at_ms = $1 WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE kb_documents SET state = 'indexed', error = NULL, lease_owner = NULL, lease_expires_at_ms = NULL, \
             updated_at_ms = $1 WHERE id = $2 AND state <> 'deleting'",
        )
        .bind(now)
        .bind(document_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(retired)
    }

    /// Removes a document marked `deleting` with its chunks (after its vectors went).
    pub async fn purge_document(&self, document_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM kb_documents WHERE id = $1 AND state = 'deleting'")
            .bind(document_id)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// Chunks by id, in the order asked (ids not found are left out), for retrieval. One
    /// query per 500 ids, not one per id: retrieval reads a few dozen at a time.
    pub async fn chunks(&self, kb_id: &str, chunk_ids: &[i64]) -> Result<Vec<StoredChunk>> {
        let mut found = std::collections::HashMap::with_capacity(chunk_ids.len());
        for batch in chunk_ids.chunks(500) {
            let placeholders: Vec<String> = (0..batch.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "SELECT {CHUNK_COLUMNS} FROM kb_chunks c WHERE c.kb_id = $1 AND c.chunk_id IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query_as::<_, ChunkRow>(trusted_sql(sql)).bind(kb_id);
            for id in batch {
                query = query.bind(id);
            }
            for row in query.fetch_all(self.db.pool()).await? {
                let chunk = chunk_from_row(row);
                found.insert(chunk.chunk_id, chunk);
            }
        }
        Ok(chunk_ids.iter().filter_map(|id| found.remove(id)).collect())
    }

    /// A document's chunks at `level`, in order (the chunk viewer).
    pub async fn document_chunks(
        &self,
        document_id: &str,
        level: &str,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<StoredChunk>> {
        let sql = format!(
            "SELECT {CHUNK_COLUMNS} FROM kb_chunks c WHERE c.document_id = $1 AND c.level = $2 \
             ORDER BY c.ordinal LIMIT $3 OFFSET $4"
        );
        let rows: Vec<ChunkRow> = sqlx::query_as(trusted_sql(sql))
            .bind(document_id)
            .bind(level)
            .bind(limit)
            .bind(offset)
            .fetch_all(self.db.pool())
            .await?;
        Ok(rows.into_iter().map(chunk_from_row).collect())
    }

    /// How many chunks of a level (`child` or `parent`) a document has.
    pub async fn count_document_chunks(&self, document_id: &str, level: &str) -> Result<i64> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM kb_chunks WHERE document_id = $1 AND level = $2")
            .bind(document_id)
            .bind(level)
            .fetch_one(self.db.pool())
            .await?;
        Ok(count)
    }

    /// Replaces a document's part of the knowledge graph, in one transaction.
    pub async fn save_graph(
        &self,
        document_id: &str,
        mentions: &[GraphMention],
        relations: &[GraphRelation],
    ) -> Result<()> {
        let document = self.document(document_id).await?;
        let mut tx = self.db.begin_write().await?;
        sqlx::query("DELETE FROM kb_graph_mentions WHERE document_id = $1").bind(document_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM kb_graph_relations WHERE document_id = $1")
            .bind(document_id)
            .execute(&mut *tx)
            .await?;
        for mention in mentions {
            sqlx::query(
                "INSERT INTO kb_graph_mentions (kb_id, document_id, chunk_id, entity_key, name, kind) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(&document.kb_id)
            .bind(document_id)
            .bind(mention.chunk_id)
            .bind(&mention.key)
            .bind(&mention.name)
            .bind(&mention.kind)
            .execute(&mut *tx)
            .await?;
        }
        for relation in relations {
            sqlx::query(
                "INSERT INTO kb_graph_relations (kb_id, document_id, chunk_id, source_key, target_key, evidence) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(&document.kb_id)
            .bind(document_id)
            .bind(relation.chunk_id)
            .bind(&relation.source)
            .bind(&relation.target)
            .bind(&relation.evidence)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The graph's entities, most mentioned first; with `search`, those whose key
    /// contains it.
    pub async fn graph_entities(&self, kb_id: &str, search: &str, limit: i64) -> Result<Vec<GraphEntity>> {
        let pattern = format!("%{}%", search.to_lowercase());
        let rows: Vec<GraphEntity> = sqlx::query_as(
            "SELECT m.entity_key AS key, MIN(m.name) AS name, MIN(m.kind) AS kind, \
             CAST(COUNT(*) AS BIGINT) AS mentions, CAST(COUNT(DISTINCT m.document_id) AS BIGINT) AS documents \
             FROM kb_graph_mentions m JOIN kb_documents d ON d.id = m.document_id \
             WHERE m.kb_id = $1 AND d.state = 'indexed' AND m.entity_key LIKE $2 \
             GROUP BY m.entity_key ORDER BY mentions DESC, key LIMIT $3",
        )
        .bind(kb_id)
        .bind(pattern)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows)
    }

    /// The relations that touch any of `keys`, strongest first.
    pub async fn graph_edges(&self, kb_id: &str, keys: &[String], limit: i64) -> Result<Vec<GraphEdge>> {
        let mut edges: Vec<GraphEdge> = Vec::new();
        for key in keys {
            let rows: Vec<GraphEdge> = sqlx::query_as(
                "SELECT r.source_key AS source, r.target_key AS target, CAST(COUNT(*) AS BIGINT) AS weight, \
                 MIN(r.evidence) AS evidence \
                 FROM kb_graph_relations r JOIN kb_documents d ON d.id = r.document_id \
                 WHERE r.kb_id = $1 AND d.state = 'indexed' AND (r.source_key = $2 OR r.target_key = $2) \
                 GROUP BY r.source_key, r.target_key ORDER BY weight DESC, source, target LIMIT $3",
            )
            .bind(kb_id)
            .bind(key)
            .bind(limit)
            .fetch_all(self.db.pool())
            .await?;
            for row in rows {
                if !edges.iter().any(|e| e.source == row.source && e.target == row.target) {
                    edges.push(row);
                }
            }
        }
        edges.sort_by(|a, b| b.weight.cmp(&a.weight).then_with(|| (&a.source, &a.target).cmp(&(&b.source, &b.target))));
        edges.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(edges)
    }

    /// The graph's entity keys (of two characters or more) that occur in `text`
    /// (lowercased), most mentioned first.
    pub async fn graph_entities_in(&self, kb_id: &str, text: &str, limit: i64) -> Result<Vec<String>> {
        let keys: Vec<(String, i64)> = sqlx::query_as(
            "SELECT m.entity_key, CAST(COUNT(*) AS BIGINT) AS mentions \
             FROM kb_graph_mentions m JOIN kb_documents d ON d.id = m.document_id \
             WHERE m.kb_id = $1 AND d.state = 'indexed' AND LENGTH(m.entity_key) >= 2 \
             AND $2 LIKE '%' || m.entity_key || '%' \
             GROUP BY m.entity_key ORDER BY mentions DESC, m.entity_key LIMIT $3",
        )
        .bind(kb_id)
        .bind(text.to_lowercase())
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        Ok(keys.into_iter().map(|(key, _)| key).collect())
    }

    /// Chunks of indexed documents that mention `key`, at most `limit`.
    pub async fn graph_entity_chunks(&self, kb_id: &str, key: &str, limit: i64) -> Result<Vec<i64>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT m.chunk_id FROM kb_graph_mentions m JOIN kb_documents d ON d.id = m.document_id \
             WHERE m.kb_id = $1 AND m.entity_key = $2 AND d.state = 'indexed' ORDER BY m.chunk_id LIMIT $3",
        )
        .bind(kb_id)
        .bind(key)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        Ok(ids)
    }
}
