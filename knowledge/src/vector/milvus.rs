//! The Milvus backend: one Milvus collection per knowledge base, through `milvus-sdk-rust`.
//!
//! A collection `NAME` is the Milvus collection [`milvus_collection_name`]`(NAME)` with the
//! fields `chunk_id` (INT64 primary key: the chunk id's bits as an `i64`), `vector`
//! (FLOAT_VECTOR), `document_id` (VARCHAR), `version` (INT64) and `tags` (ARRAY of VARCHAR),
//! strong consistency, and an HNSW index (COSINE or IP). Filters become boolean expressions
//! with every value quoted (`filter.rs`).
//!
//! Avoided on purpose: `get()` (reads by primary key go through `query` with a literal
//! `chunk_id in [...]`) and `list_collections()` (`has_collection` answers the one question
//! asked). The SDK waits 10 s for a closed port and retries an RPC 75 times by default;
//! [`MilvusOptions`] bounds both, and an unreachable server is reported as such.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use milvus::v2::prelude::{
    ClientV2, CollectionSchema, ConnectConfig, ConsistencyLevel, CreateCollectionRequest, CreateIndexRequest, DataType,
    DeleteRequest, DescribeCollectionRequest, DescribeIndexRequest, DropCollectionRequest, FieldData, FieldSchema,
    FlushRequest, HasCollectionRequest, Ids, IndexParam, IndexType, InsertRequest, LoadCollectionRequest, MetricType,
    QueryRequest, RetryConfig, SearchVectors, TelemetryConfig, UpsertRequest,
};

use super::distance::{exact_top_k, prepare};
use super::filter::{milvus_expression, milvus_ids_expression, milvus_string};
use super::{
    CollectionSpec, MAX_DOCUMENT_ID_BYTES, MAX_TAG_BYTES, MAX_TAGS, Metric, SearchHit, SearchRequest, VectorRecord,
    VectorStore, sort_and_truncate, validate_collection_name, validate_record, validate_search, validate_spec,
};
use crate::error::{KnowledgeError, Result};

const CHUNK_ID: &str = "chunk_id";
const VECTOR: &str = "vector";
const DOCUMENT_ID: &str = "document_id";
const VERSION: &str = "version";
const TAGS: &str = "tags";

/// Records per upsert request are capped by size: gRPC servers refuse messages over 4 MiB
/// by default, and milvus-lite keeps that default.
const MAX_UPSERT_BYTES: usize = 2 << 20;
/// Chunk ids per delete expression.
const MAX_IDS_PER_DELETE: usize = 4096;
/// A filtered search whose filter passes at most this many chunks reads them (vectors
/// included) and ranks them here, exactly: an HNSW walk that must pass many rejected
/// chunks to find a few accepted ones can end early with the wrong ones (milvus-lite
/// found 43% of the ten nearest chunks of one 50-chunk document among 100,000), and this
/// many 384-dimensional vectors are 1.5 MiB on the wire.
const EXACT_MAX_MATCHES: u64 = 1024;

/// Settings of the Milvus backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MilvusOptions {
    /// How long connecting may take before the server counts as unreachable.
    pub connect_timeout: Duration,
    /// How long one RPC may take (retries included).
    pub rpc_timeout: Duration,
    /// HNSW `M` of new collections.
    pub hnsw_m: u32,
    /// HNSW `efConstruction` of new collections.
    pub hnsw_ef_construction: u32,
    /// HNSW `ef` of searches (at least k).
    pub ef_search: u32,
    /// HNSW `ef` of filtered searches that pass more than 1,024 chunks (fewer are ranked
    /// exactly, here). Milvus walks the graph past chunks the filter rejects, so a filter
    /// needs a wider walk to find k that pass: with milvus-lite, a tag on a tenth of 10,000
    /// chunks gave recall@10 0.83 at ef 96, 0.985 at 400 and 1.0 at 1,600.
    pub filtered_ef_search: u32,
}

impl Default for MilvusOptions {
    fn default() -> Self {
        MilvusOptions {
            connect_timeout: Duration::from_secs(3),
            rpc_timeout: Duration::from_secs(60),
            hnsw_m: 16,
            hnsw_ef_construction: 128,
            ef_search: 192,
            filtered_ef_search: 1024,
        }
    }
}

/// The Milvus collection that holds collection `name` (checked by
/// [`validate_collection_name`](super::validate_collection_name)): `kb_NAME`, with `-`
/// (which Milvus refuses) turned into `_` and then a hash of the original name appended, so
/// `a-b` and `a_b` stay apart.
pub fn milvus_collection_name(name: &str) -> String {
    let sanitised: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if sanitised == name {
        format!("kb_{name}")
    } else {
        format!("kb_{sanitised}_{:08x}", crc32fast::hash(name.as_bytes()))
    }
}

/// What this store knows of an existing collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    dimension: usize,
    metric: Metric,
}

/// The Milvus backend of [`VectorStore`].
pub struct MilvusStore {
    client: ClientV2,
    url: String,
    options: MilvusOptions,
    /// Collections seen so far, by our name.
    known: Mutex<HashMap<String, Known>>,
}

impl std::fmt::Debug for MilvusStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MilvusStore").field("url", &self.url).field("options", &self.options).finish_non_exhaustive()
    }
}

impl MilvusStore {
    /// Connects to the Milvus server at `url` (`http://HOST:PORT`).
    pub async fn connect(url: &str, options: MilvusOptions) -> Result<Self> {
        let unreachable = |reason: String| KnowledgeError::MilvusUnreachable { url: url.to_owned(), reason };
        // The SDK retries a refused connection until its timeout; a plain TCP connect first
        // reports a closed port at once.
        let address = socket_address(url);
        match tokio::time::timeout(options.connect_timeout, tokio::net::TcpStream::connect(&address)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(unreachable(format!("cannot connect to {address}: {e}"))),
            Err(_) => {
                return Err(unreachable(format!("no answer from {address} within {:?}", options.connect_timeout)));
            }
        }
        let retry = RetryConfig::new()
            .max_attempts(3)
            .max_retry_timeout(options.rpc_timeout)
            .initial_backoff(Duration::from_millis(50))
            .max_backoff(Duration::from_secs(1));
        let config = ConnectConfig::new()
            .uri(url)
            .connect_timeout(options.connect_timeout)
            .rpc_timeout(options.rpc_timeout)
            .retry(retry)
            .telemetry(TelemetryConfig::new().enabled(false));
        let client = ClientV2::new(&config).await.map_err(|e| unreachable(e.to_string()))?;
        Ok(MilvusStore { client, url: url.to_owned(), options, known: Mutex::new(HashMap::new()) })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Asks Milvus to seal the collection's recent writes into indexed segments and waits
    /// until it has (at most the RPC bound). Milvus does this by itself as segments fill;
    /// after a bulk load it makes searches use the index at once (milvus-lite searches
    /// unsealed rows by brute force: about 10 times slower at 10,000 rows).
    pub async fn flush(&self, collection: &str) -> Result<()> {
        self.known(collection).await?;
        let wait_ms = i64::try_from(self.options.rpc_timeout.as_millis()).unwrap_or(i64::MAX);
        let request = FlushRequest::builder()
            .collection_names([milvus_collection_name(collection)])
            .wait_flushed_ms(wait_ms)
            .build()
            .map_err(|e| self.failure("flush", &e))?;
        // The SDK polls the segments' state until they are flushed with no deadline of its
        // own (a server that never reports them flushed would hold the caller for good).
        let bound = self.options.rpc_timeout + Duration::from_secs(5);
        match tokio::time::timeout(bound, self.client.flush(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(self.after_failure(collection, "flush", &error).await),
            Err(_) => Err(KnowledgeError::Milvus {
                url: self.url.clone(),
                action: "flush",
                reason: format!("the segments were not reported flushed within {bound:?}"),
            }),
        }
    }

    /// Turns an SDK error into ours: a server that does not answer is unreachable.
    fn failure(&self, action: &'static str, error: &milvus::v2::error::Error) -> KnowledgeError {
        if is_unreachable(error) {
            KnowledgeError::MilvusUnreachable { url: self.url.clone(), reason: error.to_string() }
        } else {
            KnowledgeError::Milvus { url: self.url.clone(), action, reason: error.to_string() }
        }
    }

    fn forget(&self, name: &str) {
        self.known.lock().unwrap_or_else(PoisonError::into_inner).remove(name);
    }

    async fn exists(&self, milvus_name: &str) -> Result<bool> {
        let request = HasCollectionRequest::builder()
            .collection_name(milvus_name)
            .build()
            .map_err(|e| self.failure("check a collection", &e))?;
        let response = self.client.has_collection(request).await.map_err(|e| self.failure("check a collection", &e))?;
        Ok(response.exists())
    }

    /// The collection's dimension and metric, from this store's memory or from Milvus.
    async fn known(&self, name: &str) -> Result<Known> {
        validate_collection_name(name)?;
        if let Some(known) = self.known.lock().unwrap_or_else(PoisonError::into_inner).get(name) {
            return Ok(*known);
        }
        let milvus_name = milvus_collection_name(name);
        if !self.exists(&milvus_name).await? {
            return Err(KnowledgeError::UnknownCollection { name: name.to_owned() });
        }
        let known = self.describe(&milvus_name).await?;
        self.known.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned(), known);
        Ok(known)
    }

    /// Reads dimension and metric from Milvus.
    async fn describe(&self, milvus_name: &str) -> Result<Known> {
        let action = "describe a collection";
        let request = DescribeCollectionRequest::builder()
            .collection_name(milvus_name)
            .build()
            .map_err(|e| self.failure(action, &e))?;
        let response = self.client.describe_collection(request).await.map_err(|e| self.failure(action, &e))?;
        let dimension = response
            .description()
            .get_schema()
            .get_fields()
            .iter()
            .find(|field| field.get_name() == VECTOR)
            .map(|field| field.get_dimension() as usize)
            .filter(|dimension| *dimension > 0)
            .ok_or_else(|| KnowledgeError::Milvus {
                url: self.url.clone(),
                action,
                reason: format!("collection {milvus_name} has no `{VECTOR}` field: it was not made by maas"),
            })?;
        let request = DescribeIndexRequest::builder()
            .collection_name(milvus_name)
            .field_name(VECTOR)
            .build()
            .map_err(|e| self.failure(action, &e))?;
        let response = self.client.describe_index(request).await.map_err(|e| self.failure("describe an index", &e))?;
        let metric = match response.indexes().first().map(milvus::v2::prelude::IndexDesc::get_metric_type) {
            Some(MetricType::Cosine) => Metric::Cosine,
            Some(MetricType::Ip) => Metric::InnerProduct,
            other => {
                return Err(KnowledgeError::Milvus {
                    url: self.url.clone(),
                    action,
                    reason: format!("collection {milvus_name} has index metric {other:?}, not COSINE or IP"),
                });
            }
        };
        Ok(Known { dimension, metric })
    }

    async fn create(&self, milvus_name: &str, spec: &CollectionSpec) -> Result<()> {
        let action = "create a collection";
        let dimension = u32::try_from(spec.dimension).expect("validated against MAX_DIMENSION");
        let schema = CollectionSchema::new()
            .enable_dynamic_field(false)
            .add_field(FieldSchema::new().name(CHUNK_ID).data_type(DataType::Int64).primary_key(true))
            .add_field(FieldSchema::new().name(VECTOR).data_type(DataType::FloatVector).dimension(dimension))
            .add_field(
                FieldSchema::new()
                    .name(DOCUMENT_ID)
                    .data_type(DataType::VarChar)
                    .max_length(as_u32(MAX_DOCUMENT_ID_BYTES)),
            )
            .add_field(FieldSchema::new().name(VERSION).data_type(DataType::Int64))
            .add_field(
                FieldSchema::new()
                    .name(TAGS)
                    .data_type(DataType::Array)
                    .element_type(DataType::VarChar)
                    .max_capacity(as_u32(MAX_TAGS))
                    .max_length(as_u32(MAX_TAG_BYTES)),
            );
        let request = CreateCollectionRequest::builder()
            .collection_name(milvus_name)
            .description(format!("maas knowledge base {}", spec.name))
            .schema(schema)
            .consistency_level(ConsistencyLevel::Strong)
            .build()
            .map_err(|e| self.failure(action, &e))?;
        if let Err(error) = self.client.create_collection(request).await {
            // Another caller may have created it first; that is success.
            if !self.exists(milvus_name).await? {
                return Err(self.failure(action, &error));
            }
        }
        let metric = match spec.metric {
            Metric::Cosine => MetricType::Cosine,
            Metric::InnerProduct => MetricType::Ip,
        };
        let index = IndexParam::new().field_name(VECTOR).index_type(IndexType::Hnsw).metric_type(metric).extra_params(
            HashMap::from([
                ("M".to_owned(), self.options.hnsw_m.to_string()),
                ("efConstruction".to_owned(), self.options.hnsw_ef_construction.to_string()),
            ]),
        );
        let request = CreateIndexRequest::builder()
            .collection_name(milvus_name)
            .index_param(index)
            .sync(false)
            .build()
            .map_err(|e| self.failure("create an index", &e))?;
        self.client.create_index(request).await.map_err(|e| self.failure("create an index", &e))?;
        self.load(milvus_name).await
    }

    async fn load(&self, milvus_name: &str) -> Result<()> {
        let request = LoadCollectionRequest::builder()
            .collection_name(milvus_name)
            .build()
            .map_err(|e| self.failure("load a collection", &e))?;
        self.client.load_collection(request).await.map_err(|e| self.failure("load a collection", &e))
    }

    /// Deletes by a boolean expression.
    async fn delete_where(&self, name: &str, expression: String) -> Result<()> {
        let milvus_name = milvus_collection_name(name);
        let request = DeleteRequest::builder()
            .collection_name(&milvus_name)
            .filter(expression)
            .consistency_level(ConsistencyLevel::Strong)
            .build()
            .map_err(|e| self.failure("delete", &e))?;
        match self.client.delete(request).await {
            Ok(_) => Ok(()),
            Err(error) => Err(self.after_failure(name, "delete", &error).await),
        }
    }

    /// How many chunks pass a boolean expression (all of them for an empty one).
    async fn count_where(&self, name: &str, expression: &str) -> Result<u64> {
        let mut builder = QueryRequest::builder()
            .collection_name(milvus_collection_name(name))
            .output_fields(["count(*)"])
            .consistency_level(ConsistencyLevel::Strong);
        if !expression.is_empty() {
            builder = builder.filter(expression);
        }
        let request = builder.build().map_err(|e| self.failure("count", &e))?;
        let response = match self.client.query(request).await {
            Ok(response) => response,
            Err(error) => return Err(self.after_failure(name, "count", &error).await),
        };
        let count = response
            .results()
            .rows()
            .ok()
            .and_then(|mut rows| rows.next())
            .and_then(|row| row.get_i64("count(*)").ok())
            .and_then(|count| u64::try_from(count).ok());
        count.ok_or_else(|| KnowledgeError::Milvus {
            url: self.url.clone(),
            action: "count",
            reason: "no count(*) in the answer".into(),
        })
    }

    /// The exact top `k` of the (at most [`EXACT_MAX_MATCHES`]) chunks that pass the
    /// expression, read with their vectors by `query` and ranked here.
    async fn exact_where(&self, name: &str, expression: &str, query: &[f32], k: usize) -> Result<Vec<SearchHit>> {
        let action = "read filtered chunks";
        let request = QueryRequest::builder()
            .collection_name(milvus_collection_name(name))
            .filter(expression)
            .output_fields([CHUNK_ID, VECTOR])
            .limit(i64::try_from(EXACT_MAX_MATCHES).expect("small"))
            .consistency_level(ConsistencyLevel::Strong)
            .build()
            .map_err(|e| self.failure(action, &e))?;
        let response = match self.client.query(request).await {
            Ok(response) => response,
            Err(error) => return Err(self.after_failure(name, action, &error).await),
        };
        let results = response.results();
        let ids = results.get_output_field(CHUNK_ID).and_then(FieldData::as_int64);
        let vectors = results.get_output_field(VECTOR).and_then(FieldData::as_float_vectors);
        let (Some(ids), Some(vectors)) = (ids, vectors) else {
            return Err(KnowledgeError::Milvus {
                url: self.url.clone(),
                action,
                reason: "the answer lacks chunk ids or vectors".into(),
            });
        };
        let candidates = ids.iter().zip(vectors).map(|(&id, vector)| (from_milvus_id(id), vector.as_slice()));
        Ok(exact_top_k(query, candidates, k))
    }

    /// An RPC on a known collection failed: if the collection is gone (dropped elsewhere),
    /// say so and forget it.
    async fn after_failure(
        &self,
        name: &str,
        action: &'static str,
        error: &milvus::v2::error::Error,
    ) -> KnowledgeError {
        if !is_unreachable(error) && matches!(self.exists(&milvus_collection_name(name)).await, Ok(false)) {
            self.forget(name);
            return KnowledgeError::UnknownCollection { name: name.to_owned() };
        }
        self.failure(action, error)
    }

    async fn upsert_batch(&self, name: &str, batch: &[VectorRecord]) -> Result<()> {
        let columns = vec![
            FieldData::int64(CHUNK_ID, batch.iter().map(|r| to_milvus_id(r.chunk_id)).collect()),
            FieldData::float_vector(VECTOR, batch.iter().map(|r| r.vector.clone()).collect()),
            FieldData::varchar(DOCUMENT_ID, batch.iter().map(|r| r.document_id.clone()).collect()),
            FieldData::int64(VERSION, batch.iter().map(|r| r.version).collect()),
            FieldData::array_varchar(TAGS, batch.iter().map(|r| r.tags.clone()).collect()),
        ];
        let insert = InsertRequest::builder()
            .collection_name(milvus_collection_name(name))
            .columns(columns)
            .build()
            .map_err(|e| self.failure("upsert", &e))?;
        let request = UpsertRequest::builder().insert(insert).build().map_err(|e| self.failure("upsert", &e))?;
        match self.client.upsert(request).await {
            Ok(_) => Ok(()),
            Err(error) => Err(self.after_failure(name, "upsert", &error).await),
        }
    }
}

/// `HOST:PORT` of a Milvus url (`http://HOST:PORT/...`; the port defaults to 443 for
/// https and to Milvus's 19530 otherwise).
fn socket_address(url: &str) -> String {
    let default_port = if url.starts_with("https://") { 443 } else { 19_530 };
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let port_given = authority.rfind(':').is_some_and(|i| !authority[i..].contains(']') && i + 1 < authority.len());
    if port_given { authority.to_owned() } else { format!("{}:{default_port}", authority.trim_end_matches(':')) }
}

fn as_u32(value: usize) -> u32 {
    u32::try_from(value).expect("the limits are small")
}

/// The chunk id's bits as Milvus's signed primary key.
fn to_milvus_id(chunk_id: u64) -> i64 {
    i64::from_ne_bytes(chunk_id.to_ne_bytes())
}

fn from_milvus_id(id: i64) -> u64 {
    u64::from_ne_bytes(id.to_ne_bytes())
}

/// True for errors that mean the server did not answer: a connect or RPC timeout, or gRPC
/// `UNAVAILABLE` (code 14).
fn is_unreachable(error: &milvus::v2::error::Error) -> bool {
    use milvus::v2::error::Error;
    match error {
        Error::Timeout(_) => true,
        Error::Grpc(status) => i32::from(status.code()) == 14,
        Error::RetryExhausted { source, .. } => is_unreachable(source),
        _ => false,
    }
}

/// Groups records into requests under [`MAX_UPSERT_BYTES`].
fn batches(records: &[VectorRecord]) -> Vec<&[VectorRecord]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, record) in records.iter().enumerate() {
        let size = record.vector.len() * 4
            + record.document_id.len()
            + record.tags.iter().map(|t| t.len() + 8).sum::<usize>()
            + 32;
        if i > start && bytes + size > MAX_UPSERT_BYTES {
            out.push(&records[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
}

#[async_trait]
impl VectorStore for MilvusStore {
    async fn ensure_collection(&self, spec: &CollectionSpec) -> Result<()> {
        validate_spec(spec)?;
        let milvus_name = milvus_collection_name(&spec.name);
        let known = if self.exists(&milvus_name).await? {
            self.describe(&milvus_name).await?
        } else {
            self.create(&milvus_name, spec).await?;
            Known { dimension: spec.dimension, metric: spec.metric }
        };
        if known != (Known { dimension: spec.dimension, metric: spec.metric }) {
            return Err(KnowledgeError::CollectionMismatch {
                name: spec.name.clone(),
                existing: format!("dimension {} and metric {}", known.dimension, known.metric),
                requested: format!("dimension {} and metric {}", spec.dimension, spec.metric),
            });
        }
        self.known.lock().unwrap_or_else(PoisonError::into_inner).insert(spec.name.clone(), known);
        Ok(())
    }

    async fn has_collection(&self, name: &str) -> Result<bool> {
        validate_collection_name(name)?;
        self.exists(&milvus_collection_name(name)).await
    }

    async fn drop_collection(&self, name: &str) -> Result<()> {
        validate_collection_name(name)?;
        self.forget(name);
        let milvus_name = milvus_collection_name(name);
        if !self.exists(&milvus_name).await? {
            return Ok(());
        }
        let request = DropCollectionRequest::builder()
            .collection_name(&milvus_name)
            .build()
            .map_err(|e| self.failure("drop a collection", &e))?;
        self.client.drop_collection(request).await.map_err(|e| self.failure("drop a collection", &e))
    }

    async fn upsert(&self, collection: &str, records: Vec<VectorRecord>) -> Result<()> {
        let known = self.known(collection).await?;
        let mut seen = std::collections::HashSet::new();
        let mut prepared = Vec::with_capacity(records.len());
        for mut record in records.into_iter().rev() {
            validate_record(collection, known.dimension, &record)?;
            prepare(known.metric, &mut record.vector, &format!("chunk {}", record.chunk_id))?;
            if seen.insert(record.chunk_id) {
                prepared.push(record);
            }
        }
        prepared.reverse();
        for batch in batches(&prepared) {
            self.upsert_batch(collection, batch).await?;
        }
        Ok(())
    }

    async fn delete(&self, collection: &str, chunk_ids: &[u64]) -> Result<()> {
        self.known(collection).await?;
        for ids in chunk_ids.chunks(MAX_IDS_PER_DELETE) {
            self.delete_where(collection, milvus_ids_expression(ids)).await?;
        }
        Ok(())
    }

    async fn delete_document(&self, collection: &str, document_id: &str, keep_version: Option<i64>) -> Result<()> {
        self.known(collection).await?;
        let mut expression = format!("{DOCUMENT_ID} == {}", milvus_string(document_id));
        if let Some(keep) = keep_version {
            let _ = write!(expression, " and {VERSION} != {keep}");
        }
        self.delete_where(collection, expression).await
    }

    async fn search(&self, collection: &str, request: &SearchRequest) -> Result<Vec<SearchHit>> {
        let known = self.known(collection).await?;
        validate_search(collection, known.dimension, request)?;
        if request.k == 0 || request.filter.matches_nothing() {
            return Ok(Vec::new());
        }
        let mut query = request.vector.clone();
        prepare(known.metric, &mut query, "the query")?;
        let expression = milvus_expression(&request.filter);
        if !expression.is_empty() {
            let matches = self.count_where(collection, &expression).await?;
            if matches == 0 {
                return Ok(Vec::new());
            }
            if matches <= EXACT_MAX_MATCHES {
                return self.exact_where(collection, &expression, &query, request.k).await;
            }
        }
        let k = i64::try_from(request.k).expect("k is at most MAX_TOP_K");
        let ef = if request.filter.is_empty() { self.options.ef_search } else { self.options.filtered_ef_search };
        let ef = u64::from(ef).max(request.k as u64);
        let mut builder = milvus::v2::prelude::SearchRequest::builder()
            .collection_name(milvus_collection_name(collection))
            .vector_field(VECTOR)
            .vectors(SearchVectors::Float(vec![query]))
            .limit(k)
            .output_fields([CHUNK_ID])
            .consistency_level(ConsistencyLevel::Strong)
            .extra_params(HashMap::from([("ef".to_owned(), ef.to_string())]));
        if !expression.is_empty() {
            builder = builder.filter(expression);
        }
        let search = builder.build().map_err(|e| self.failure("search", &e))?;
        let response = match self.client.search(search).await {
            Ok(response) => response,
            Err(error) => return Err(self.after_failure(collection, "search", &error).await),
        };
        let mut hits = Vec::new();
        for result in response.results() {
            let Ids::Int64(ids) = result.get_ids() else {
                return Err(KnowledgeError::Milvus {
                    url: self.url.clone(),
                    action: "search",
                    reason: "ids are not integers".into(),
                });
            };
            hits.extend(
                ids.iter()
                    .zip(result.get_scores())
                    .map(|(&id, &score)| SearchHit { chunk_id: from_milvus_id(id), score }),
            );
        }
        sort_and_truncate(&mut hits, request.k);
        Ok(hits)
    }

    async fn count(&self, collection: &str) -> Result<u64> {
        self.known(collection).await?;
        self.count_where(collection, "").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names_follow_milvus_rules_and_stay_distinct() {
        assert_eq!(milvus_collection_name("kb_1"), "kb_kb_1");
        let dashed = milvus_collection_name("a-b");
        assert!(dashed.starts_with("kb_a_b_"), "{dashed}");
        assert_ne!(dashed, milvus_collection_name("a_b"));
        assert_ne!(dashed, milvus_collection_name("a_b-"));
        let long = milvus_collection_name(&"-".repeat(128));
        assert!(long.len() <= 255 && long.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    }

    #[test]
    fn socket_addresses_come_from_urls() {
        assert_eq!(socket_address("http://127.0.0.1:19530"), "127.0.0.1:19530");
        assert_eq!(socket_address("https://milvus.internal:443/db"), "milvus.internal:443");
        assert_eq!(socket_address("http://milvus"), "milvus:19530");
        assert_eq!(socket_address("https://milvus"), "milvus:443");
        assert_eq!(socket_address("http://[::1]:1234"), "[::1]:1234");
        assert_eq!(socket_address("http://[::1]"), "[::1]:19530");
        assert_eq!(socket_address("http://root:pw@host:5"), "host:5");
    }

    #[test]
    fn chunk_ids_keep_their_bits_through_milvus_ids() {
        for id in [0, 1, u64::MAX, 1 << 63, 12_345] {
            assert_eq!(from_milvus_id(to_milvus_id(id)), id);
        }
    }

    #[test]
    fn upserts_are_split_under_the_message_limit() {
        let record = |chunk_id| VectorRecord {
            chunk_id,
            vector: vec![0.0; 1024],
            document_id: "d".into(),
            version: 1,
            tags: vec![],
        };
        let records: Vec<_> = (0..2000).map(record).collect();
        let split = batches(&records);
        assert!(split.len() > 1);
        assert_eq!(split.iter().map(|b| b.len()).sum::<usize>(), 2000);
        assert!(split.iter().all(|b| b.len() * 4096 <= MAX_UPSERT_BYTES));
        assert!(batches(&[]).is_empty());
    }
}
