//! Deployments: what a user wants served (a model, how many replicas, what each needs),
//! committed through raft; the leader's reconcile loop places the replicas and each node's
//! agent runs its share. Also the VRAM estimate shown before deploying, and node drain.
//!
//! Changes need the cluster cookie (the credential of cluster operations until accounts
//! and roles exist); reads are open, like the rest of the cluster's status.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use maas_actors::node::estimate::{ModelEstimate, estimate_model, estimate_version};
use maas_actors::node::journal::{self, LogLevel, LogLine};
use maas_consensus::reconcile::{self, ReconcileSettings};
use maas_consensus::state::{
    ClusterState, Command, DeploymentId, DeploymentOwner, DeploymentRecord, DeploymentSpec, NodeId, NodeStatus,
    PlacementStrategy, Rejection, ReplicaRequest,
};
use maas_store::Owner;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::auth::audit;
use super::cluster::{control_plane, now_ms};
use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::routes::openai::CalledFor;
use crate::state::AppState;

/// The most replicas one deployment may ask for.
pub const MAX_REPLICAS: u32 = 1000;
/// The most GPUs one replica may span (on one node, SCH-2).
pub const MAX_GPUS_PER_REPLICA: u32 = 16;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let list = warp::path!("v1" / "deployments")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|s: Arc<AppState>, c: Caller| async move { list_deployments(&s, &c).map_err(warp::reject::custom) });
    let get = warp::path!("v1" / "deployments" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            get_deployment(&s, &c, &id).map_err(warp::reject::custom)
        });
    let create = warp::path!("v1" / "deployments")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<DeploymentRequest>(64 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: DeploymentRequest| async move {
            create_deployment(&s, &c, request).await.map_err(warp::reject::custom)
        });
    let update = warp::path!("v1" / "deployments" / String)
        .and(warp::put())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<DeploymentRequest>(64 * 1024))
        .and_then(|id: String, s: Arc<AppState>, c: Caller, request: DeploymentRequest| async move {
            update_deployment(&s, &c, id, request).await.map_err(warp::reject::custom)
        });
    let scale = warp::path!("v1" / "deployments" / String)
        .and(warp::patch())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<ScaleRequest>(4 * 1024))
        .and_then(|id: String, s: Arc<AppState>, c: Caller, request: ScaleRequest| async move {
            scale_deployment(&s, &c, id, request).await.map_err(warp::reject::custom)
        });
    let delete = warp::path!("v1" / "deployments" / String)
        .and(warp::delete())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            delete_deployment(&s, &c, id).await.map_err(warp::reject::custom)
        });
    let estimate = warp::path!("v1" / "deployments" / "estimate")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<EstimateRequest>(16 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: EstimateRequest| async move {
            estimate_deployment(&s, &c, request).await.map_err(warp::reject::custom)
        });
    let drain = warp::path!("v1" / "nodes" / u64 / "drain")
        .and(warp::post().map(|| true).or(warp::delete().map(|| false)).unify())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: u64, start: bool, s: Arc<AppState>, c: Caller| async move {
            if start { drain_node(&s, &c, id).await } else { undrain_node(&s, &c, id).await }
                .map_err(warp::reject::custom)
        });
    // `estimate` before `get`/`create`, whose paths would otherwise take it.
    estimate
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(create)
        .unify()
        .or(update)
        .unify()
        .or(scale)
        .unify()
        .or(delete)
        .unify()
        .or(drain)
        .unify()
        .or(monitoring(state))
        .unify()
        .boxed()
}

/// A deployment's metrics and logs, for the cluster (`/v1`) and from this node
/// (`/internal`, for the node asked).
fn monitoring(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let metrics = warp::path!("v1" / "deployments" / String / "metrics")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::query::<MetricsQuery>())
        .and_then(|id: String, s: Arc<AppState>, c: Caller, query: MetricsQuery| async move {
            deployment_metrics(&s, &c, &id, query).await.map_err(warp::reject::custom)
        });
    let node_metrics = warp::path!("internal" / "monitor" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(warp::header::optional::<String>(super::cluster::COOKIE_HEADER))
        .and(crate::json::query::<NodeMetricsQuery>())
        .and_then(|id: String, s: Arc<AppState>, cookie: Option<String>, query: NodeMetricsQuery| async move {
            super::cluster::check_cookie(&s, cookie.as_deref()).map_err(warp::reject::custom)?;
            Ok::<_, warp::Rejection>(warp::reply::json(&s.monitor.buckets(&id, query.since_ms)).into_response())
        });
    let logs = warp::path!("v1" / "deployments" / String / "logs")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::query::<LogsQuery>())
        .and_then(|id: String, s: Arc<AppState>, c: Caller, query: LogsQuery| async move {
            deployment_logs(&s, &c, &id, query).await.map_err(warp::reject::custom)
        });
    let node_logs = warp::path!("internal" / "journal" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(warp::header::optional::<String>(super::cluster::COOKIE_HEADER))
        .and(crate::json::query::<NodeLogsQuery>())
        .and_then(|id: String, s: Arc<AppState>, cookie: Option<String>, query: NodeLogsQuery| async move {
            super::cluster::check_cookie(&s, cookie.as_deref()).map_err(warp::reject::custom)?;
            let lines = local_log(&s, &id, query.level, query.limit.min(journal::LINES_PER_DEPLOYMENT));
            Ok::<_, warp::Rejection>(warp::reply::json(&lines).into_response())
        });
    metrics.or(node_metrics).unify().or(logs).unify().or(node_logs).unify().boxed()
}

fn default_version() -> String {
    "latest".to_owned()
}
fn one() -> u32 {
    1
}
fn default_context() -> u32 {
    4096
}
fn default_sequences() -> u32 {
    4
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StrategyName {
    /// Fill GPUs that are in use first, leaving whole GPUs free (the default).
    #[default]
    Binpack,
    /// Put replicas on different nodes first.
    Spread,
}

/// Who may call a deployment.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Every tenant (a platform deployment, made by an administrator).
    Public,
    /// Only its owner: the user who made it, or the organisation they acted for.
    Private,
}

/// A deployment as the user asks for it. Memory per GPU is estimated from the model's
/// files (`model_path`) unless given.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRequest {
    /// The deployment's name: 1 to 63 lowercase letters, digits and `-`, starting with a
    /// letter or digit. Optional on PUT (the path names it).
    #[serde(default)]
    pub name: Option<String>,
    /// The model's name.
    pub model: String,
    #[serde(default = "default_version")]
    pub model_version: String,
    /// Where the model's files are on the nodes: a Hugging Face folder or a `.gguf` file.
    #[serde(default)]
    pub model_path: Option<String>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// GPUs per replica, on one node (tensor parallelism); 0 runs on CPU.
    #[serde(default = "one")]
    pub gpus_per_replica: u32,
    /// Overrides the estimate.
    #[serde(default)]
    pub memory_per_gpu_mib: Option<u64>,
    /// The context length per sequence the KV cache is sized for.
    #[serde(default = "default_context")]
    pub context_tokens: u32,
    /// Sequences decoded at once (the KV cache holds this many contexts).
    #[serde(default = "default_sequences")]
    pub concurrent_sequences: u32,
    #[serde(default)]
    pub strategy: StrategyName,
    /// Only nodes with all these labels take replicas.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Higher places first.
    #[serde(default)]
    pub priority: i32,
    /// Whether higher-priority work may stop these replicas.
    #[serde(default)]
    pub allow_preemption: bool,
    /// Run on CPU when no GPU fits.
    #[serde(default)]
    pub cpu_fallback: bool,
    /// `public` (administrators only) or `private`; the default is `public` for an
    /// administrator and `private` for everyone else. Fixed once created.
    #[serde(default)]
    pub visibility: Option<Visibility>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub replicas: u32,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EstimateRequest {
    /// A model on disk (a folder or a .gguf file) ...
    #[serde(default)]
    pub model_path: Option<String>,
    /// ... or a model of the repository.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_version")]
    pub model_version: String,
    #[serde(default = "one")]
    pub gpus_per_replica: u32,
    #[serde(default = "default_context")]
    pub context_tokens: u32,
    #[serde(default = "default_sequences")]
    pub concurrent_sequences: u32,
    /// Bytes per parameter and KV element (2 for f16/bf16, 4 for f32); default: 4, as the
    /// engine holds a model of any stored dtype in f32.
    #[serde(default)]
    pub dtype_bytes: Option<f64>,
}

/// One replica of a deployment, from the committed state.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaView {
    pub id: String,
    pub node_id: u64,
    pub gpu_indices: Vec<u32>,
    pub memory_per_gpu_mib: u64,
    /// `pending`, `loading`, `ready`, `failed` or `stopping`.
    pub state: String,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    pub generation: u64,
    /// `current`, `outgoing` (an older generation or a draining node) or `stopping`.
    pub role: String,
    pub restarts: u32,
}

/// Why some replicas are not placed, and what came closest.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Shortfall {
    pub missing_replicas: u32,
    pub reason: String,
    pub closest_node_id: Option<u64>,
    pub closest_gpu_index: Option<u32>,
    pub closest_free_mib: Option<u64>,
    pub short_by_mib: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentView {
    pub id: String,
    pub model: String,
    pub model_version: String,
    /// Whose model of the repository it runs: `platform`, or `own` (the deployment owner's).
    pub model_owner: String,
    pub model_path: Option<String>,
    pub replicas_desired: u32,
    /// Ready replicas of the current generation.
    pub replicas_ready: u32,
    pub generation: u64,
    pub gpus_per_replica: u32,
    pub memory_per_gpu_mib: u64,
    pub strategy: StrategyName,
    pub node_selector: BTreeMap<String, String>,
    pub priority: i32,
    pub allow_preemption: bool,
    pub cpu_fallback: bool,
    pub visibility: Visibility,
    /// A private deployment's owner: `user` or `org`, and its id.
    pub owner_kind: Option<String>,
    pub owner_id: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub replicas: Vec<ReplicaView>,
    /// Set when the scheduler cannot place every replica.
    pub shortfall: Option<Shortfall>,
    /// The estimate the memory came from, on create and update when it was estimated.
    #[schema(value_type = Option<Object>)]
    pub estimate: Option<ModelEstimate>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentList {
    pub deployments: Vec<DeploymentView>,
}

#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    /// How far back, in minutes (1 to 60, default 15).
    #[serde(default)]
    pub minutes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// The most lines to return, newest kept (1 to 500, default 200).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The lowest level shown (default info: every line).
    #[serde(default)]
    pub level: Option<LogLevel>,
}

/// The last lines of a deployment's log, from every node that answered.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentLogs {
    pub deployment: String,
    /// The nodes whose lines are in.
    pub nodes: Vec<u64>,
    /// Live nodes that did not answer in time: their lines are missing.
    pub nodes_missing: Vec<u64>,
    /// Oldest first.
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, Deserialize)]
struct NodeLogsQuery {
    limit: usize,
    level: LogLevel,
}

#[derive(Debug, Clone, Deserialize)]
struct NodeMetricsQuery {
    #[serde(default)]
    since_ms: u64,
}

/// A deployment's figures over time, for the whole cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentMetrics {
    pub deployment: String,
    pub bucket_secs: u64,
    /// The nodes whose figures are in.
    pub nodes: Vec<u64>,
    /// Live nodes that did not answer in time: their requests and replicas are missing.
    pub nodes_missing: Vec<u64>,
    /// One point per bucket, oldest first.
    pub points: Vec<crate::monitor::MetricsPoint>,
}

/// Where an estimated replica would go now, or why it would not fit.
#[derive(Debug, Serialize, ToSchema)]
pub struct EstimateReply {
    #[schema(value_type = Object)]
    pub model: ModelEstimate,
    pub gpus_per_replica: u32,
    /// The estimate split over the replica's GPUs.
    pub memory_per_gpu_mib: u64,
    /// A node that has room for one replica now, if any.
    pub fits_on_node: Option<u64>,
    pub fits_on_gpus: Vec<u32>,
    pub shortfall: Option<Shortfall>,
}

fn settings(state: &AppState) -> ReconcileSettings {
    ReconcileSettings { gpu_reserve_mib: state.gpu_reserve_mib.get().copied().unwrap_or(0) }
}

fn view(
    cluster: &ClusterState,
    deployment: &DeploymentRecord,
    shortfalls: &BTreeMap<String, Shortfall>,
) -> DeploymentView {
    let mut replicas_ready = 0;
    let replicas = cluster
        .replicas_of_deployment(&deployment.id)
        .map(|replica| {
            let role = match reconcile::replica_role(cluster, replica) {
                reconcile::ReplicaRole::Current => "current",
                reconcile::ReplicaRole::Outgoing => "outgoing",
                reconcile::ReplicaRole::Stopping => "stopping",
                reconcile::ReplicaRole::Lost => "lost",
            };
            if role == "current" && replica.state == maas_consensus::state::ReplicaState::Ready {
                replicas_ready += 1;
            }
            ReplicaView {
                id: replica.id.0.clone(),
                node_id: replica.node_id.0,
                gpu_indices: replica.gpu_indices.clone(),
                memory_per_gpu_mib: replica.memory_per_gpu_mib,
                state: replica.state.name().to_owned(),
                reason: match &replica.state {
                    maas_consensus::state::ReplicaState::Failed { reason } => Some(reason.clone()),
                    _ => None,
                },
                generation: replica.deployment_generation,
                role: role.to_owned(),
                restarts: replica.restarts,
            }
        })
        .collect();
    let spec = &deployment.spec;
    DeploymentView {
        id: deployment.id.0.clone(),
        model: spec.model_name.clone(),
        model_version: spec.model_version.clone(),
        model_path: spec.model_path.clone(),
        replicas_desired: deployment.replicas_desired,
        replicas_ready,
        generation: deployment.generation,
        gpus_per_replica: spec.request.gpus_per_replica,
        memory_per_gpu_mib: spec.request.memory_per_gpu_mib,
        strategy: match spec.strategy {
            PlacementStrategy::Binpack => StrategyName::Binpack,
            PlacementStrategy::Spread => StrategyName::Spread,
        },
        node_selector: spec.node_selector.clone(),
        priority: spec.priority,
        allow_preemption: spec.allow_preemption,
        cpu_fallback: spec.request.cpu_fallback_allowed,
        model_owner: if spec.tenant_model { "own" } else { "platform" }.to_owned(),
        visibility: if spec.owner.is_some() { Visibility::Private } else { Visibility::Public },
        owner_kind: spec.owner.as_ref().map(|owner| match owner {
            DeploymentOwner::User(_) => "user".to_owned(),
            DeploymentOwner::Org(_) => "org".to_owned(),
        }),
        owner_id: spec.owner.as_ref().map(|owner| match owner {
            DeploymentOwner::User(id) | DeploymentOwner::Org(id) => id.clone(),
        }),
        created_at_ms: deployment.created_at_ms,
        updated_at_ms: deployment.updated_at_ms,
        replicas,
        shortfall: shortfalls.get(&deployment.id.0).cloned(),
        estimate: None,
    }
}

/// The scheduler's shortfalls for the committed state, computed here (the plan is pure, so
/// any node gives the leader's answer for the state it has applied).
fn shortfalls(cluster: &ClusterState, settings: &ReconcileSettings) -> BTreeMap<String, Shortfall> {
    let plan = maas_scheduler::plan(&reconcile::snapshot(cluster, settings), &reconcile::demand(cluster));
    plan.unplaceable.into_iter().map(|short| (short.deployment_id.clone(), shortfall(short))).collect()
}

fn shortfall(short: maas_scheduler::Unplaceable) -> Shortfall {
    Shortfall {
        missing_replicas: short.missing_replicas,
        reason: short.reason,
        closest_node_id: short.closest.as_ref().map(|c| c.node_id),
        closest_gpu_index: short.closest.as_ref().and_then(|c| c.gpu_index),
        closest_free_mib: short.closest.as_ref().map(|c| c.free_mib),
        short_by_mib: short.closest.as_ref().map(|c| c.short_by_mib),
    }
}

/// Every deployment with its replicas and, where some cannot be placed, why.
#[utoipa::path(get, path = "/v1/deployments", tag = "deployments",
    responses((status = 200, body = DeploymentList), (status = 503, body = crate::error::ErrorBody)))]
pub fn list_deployments(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let handle = control_plane(state)?;
    let settings = settings(state);
    let deployments = handle.read_local(|cluster| {
        let shortfalls = shortfalls(cluster, &settings);
        cluster
            .deployments()
            .values()
            .filter(|d| may_see(caller, &d.spec))
            .map(|d| view(cluster, d, &shortfalls))
            .collect()
    });
    Ok(warp::reply::json(&DeploymentList { deployments }).into_response())
}

/// One deployment with its replicas.
#[utoipa::path(get, path = "/v1/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "the deployment's name")),
    responses((status = 200, body = DeploymentView), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub fn get_deployment(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let handle = control_plane(state)?;
    let settings = settings(state);
    let found = handle.read_local(|cluster| {
        let deployment = cluster.deployment(&DeploymentId(id.to_owned())).filter(|d| may_see(caller, &d.spec))?;
        Some(view(cluster, deployment, &shortfalls(cluster, &settings)))
    });
    found.map(|v| warp::reply::json(&v).into_response()).ok_or_else(|| not_found(id))
}

/// A deployment's requests, errors, latency, tokens and replica load over the last
/// `minutes`, from every live node (each keeps an hour in ten-second buckets).
#[utoipa::path(get, path = "/v1/deployments/{id}/metrics", tag = "deployments",
    params(("id" = String, Path, description = "the deployment's name"), MetricsQuery),
    responses((status = 200, body = DeploymentMetrics), (status = 400, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn deployment_metrics(
    state: &AppState,
    caller: &Caller,
    id: &str,
    query: MetricsQuery,
) -> Result<Response, ApiError> {
    let minutes = query.minutes.unwrap_or(15);
    if !(1..=60).contains(&minutes) {
        return Err(ApiError::bad_request("invalid_input", "minutes must be 1 to 60").with_param("minutes"));
    }
    let (own, peers) = visible_with_peers(state, caller, id)?;
    let now = now_ms();
    let since = now.saturating_sub(minutes * 60_000);
    let (answers, nodes_missing) =
        ask_peers::<Vec<crate::monitor::NodeBucket>>(state, peers, &format!("/internal/monitor/{id}?since_ms={since}"))
            .await;
    let mut nodes = vec![own];
    let mut figures = vec![state.monitor.buckets(id, since)];
    for (node, buckets) in answers {
        nodes.push(node);
        figures.push(buckets);
    }
    nodes.sort_unstable();
    let points = crate::monitor::merge(&figures, since, now);
    let body = DeploymentMetrics {
        deployment: id.to_owned(),
        bucket_secs: crate::monitor::BUCKET_MS / 1000,
        nodes,
        nodes_missing,
        points,
    };
    Ok(warp::reply::json(&body).into_response())
}

/// The last lines of a deployment's log from every live node, oldest first: where each
/// replica was started, its files fetched, how it loaded or why it failed, its restarts
/// and stops.
#[utoipa::path(get, path = "/v1/deployments/{id}/logs", tag = "deployments",
    params(("id" = String, Path, description = "the deployment's name"), LogsQuery),
    responses((status = 200, body = DeploymentLogs), (status = 400, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn deployment_logs(
    state: &AppState,
    caller: &Caller,
    id: &str,
    query: LogsQuery,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(200);
    if !(1..=journal::LINES_PER_DEPLOYMENT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_input",
            format!("limit must be 1 to {}", journal::LINES_PER_DEPLOYMENT),
        )
        .with_param("limit"));
    }
    let level = query.level.unwrap_or(LogLevel::Info);
    let (own, peers) = visible_with_peers(state, caller, id)?;
    let (answers, nodes_missing) = ask_peers::<Vec<LogLine>>(
        state,
        peers,
        &format!("/internal/journal/{id}?limit={limit}&level={}", level.as_str()),
    )
    .await;
    let mut nodes = vec![own];
    let mut lines = local_log(state, id, level, limit);
    for (node, theirs) in answers {
        nodes.push(node);
        lines.extend(theirs);
    }
    nodes.sort_unstable();
    let body = DeploymentLogs { deployment: id.to_owned(), nodes, nodes_missing, lines: journal::merge(lines, limit) };
    Ok(warp::reply::json(&body).into_response())
}

fn local_log(state: &AppState, id: &str, level: LogLevel, limit: usize) -> Vec<LogLine> {
    state.journal.get().map(|journal| journal.lines(id, level, limit)).unwrap_or_default()
}

/// This node's id and the other live nodes (id, API address), when `caller` may see the
/// deployment `id`.
fn visible_with_peers(state: &AppState, caller: &Caller, id: &str) -> Result<(u64, Vec<(u64, String)>), ApiError> {
    let handle = control_plane(state)?;
    let own = handle.id();
    let peers = handle
        .read_local(|cluster| {
            cluster.deployment(&DeploymentId(id.to_owned())).filter(|d| may_see(caller, &d.spec))?;
            Some(
                cluster
                    .nodes()
                    .values()
                    .filter(|n| n.id.0 != own && matches!(n.status, NodeStatus::Alive | NodeStatus::Draining))
                    .map(|n| (n.id.0, n.api_addr.clone()))
                    .collect(),
            )
        })
        .ok_or_else(|| not_found(id))?;
    Ok((own, peers))
}

/// Asks each peer for `path` (an internal route that answers JSON) with the cluster cookie,
/// all at once, two seconds each: the answers by node, and the nodes that gave none.
async fn ask_peers<T: serde::de::DeserializeOwned>(
    state: &AppState,
    peers: Vec<(u64, String)>,
    path: &str,
) -> (Vec<(u64, T)>, Vec<u64>) {
    let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
    let asks = peers.into_iter().map(|(node, api)| {
        let (client, cookie) = (state.http.clone(), cookie.clone());
        let url = format!("{}{path}", api.trim_end_matches('/'));
        async move {
            let answer = async {
                let response = client
                    .get(&url)
                    .header(super::cluster::COOKIE_HEADER, cookie)
                    .timeout(std::time::Duration::from_secs(2))
                    .send()
                    .await
                    .ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response.json::<T>().await.ok()
            };
            (node, answer.await)
        }
    });
    let (mut answers, mut missing) = (Vec::new(), Vec::new());
    for (node, answer) in futures_util::future::join_all(asks).await {
        match answer {
            Some(value) => answers.push((node, value)),
            None => missing.push(node),
        }
    }
    (answers, missing)
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no deployment named {id}")).with_param("id")
}

/// Administrators see every deployment; others the platform's and their own private ones
/// (another tenant's private deployment does not exist for them: TEN-1).
fn may_see(caller: &Caller, spec: &DeploymentSpec) -> bool {
    caller.require_admin().is_ok() || CalledFor::scope(&caller.scope).may_call(spec)
}

/// Checks that `caller` may change deployment `id`: administrators every one; a deployer
/// (see [`Caller::require_deployer`]) their own private ones. Another tenant's private
/// deployment is 404; a platform deployment is 403 for a non-administrator.
fn check_manage(state: &AppState, caller: &Caller, id: &str) -> Result<DeploymentSpec, ApiError> {
    let spec = control_plane(state)?
        .read_local(|cluster| cluster.deployment(&DeploymentId(id.to_owned())).map(|d| d.spec.clone()))
        .filter(|spec| may_see(caller, spec))
        .ok_or_else(|| not_found(id))?;
    if caller.require_admin().is_ok() {
        return Ok(spec);
    }
    if spec.owner.is_none() {
        return Err(ApiError::forbidden(format!(
            "{id} is a platform deployment: only a platform administrator changes it"
        )));
    }
    caller.require_deployer()?;
    Ok(spec)
}

/// GPU memory (MiB) a deployment reserves: replicas x GPUs per replica x memory per GPU.
fn reserved_mib(spec: &DeploymentSpec, replicas: u32) -> u64 {
    u64::from(replicas) * u64::from(spec.request.gpus_per_replica) * spec.request.memory_per_gpu_mib
}

/// Refuses a private deployment (`id` with `spec` and `replicas`) that would take its
/// owner's private deployments past the owner's `deployment_gpu_mib` quota. The caller's
/// quotas hold the owner's when the caller acts for the owner; a platform administrator
/// changing another tenant's deployment is not held to it. Checked against the committed
/// state, so two changes proposed at the same instant may pass together.
fn check_gpu_quota(
    state: &AppState,
    caller: &Caller,
    id: &str,
    spec: &DeploymentSpec,
    replicas: u32,
) -> Result<(), ApiError> {
    let Some(owner) = spec.owner.as_ref().map(store_owner) else { return Ok(()) };
    let Some((subject, limit)) = caller.owner_limit(&owner, |limits| limits.deployment_gpu_mib) else { return Ok(()) };
    let held: u64 = control_plane(state)?.read_local(|cluster| {
        cluster
            .deployments()
            .values()
            .filter(|d| d.id.0 != id && d.spec.owner == spec.owner)
            .map(|d| reserved_mib(&d.spec, d.replicas_desired))
            .sum()
    });
    let asked = reserved_mib(spec, replicas);
    if held.saturating_add(asked) > limit {
        return Err(ApiError::new(
            http::StatusCode::FORBIDDEN,
            "permission_error",
            "gpu_quota_exceeded",
            format!(
                "deployment_gpu_mib limit of {subject} reached: its other private deployments reserve {held} MiB of GPU memory, {id} asks {asked} MiB, the quota is {limit} MiB; scale a deployment down or ask an administrator"
            ),
        ));
    }
    Ok(())
}

/// The owner a new deployment gets: none for a public one, else whom the caller acts for.
fn owner_for(caller: &Caller, visibility: Option<Visibility>) -> Result<Option<DeploymentOwner>, ApiError> {
    let admin = caller.require_admin().is_ok();
    match visibility.unwrap_or(if admin { Visibility::Public } else { Visibility::Private }) {
        Visibility::Public if admin => Ok(None),
        Visibility::Public => Err(ApiError::forbidden(
            "a public deployment (one every tenant may call) needs a platform administrator: ask for `visibility: private`",
        )
        .with_param("visibility")),
        Visibility::Private => Ok(Some(match caller.scope.acting_as() {
            Owner::User(id) => DeploymentOwner::User(id.clone()),
            Owner::Org(id) => DeploymentOwner::Org(id.clone()),
        })),
    }
}

/// The store's owner of a private deployment's tenant.
pub(crate) fn store_owner(owner: &DeploymentOwner) -> Owner {
    match owner {
        DeploymentOwner::User(id) => Owner::User(id.clone()),
        DeploymentOwner::Org(id) => Owner::Org(id.clone()),
    }
}

/// Refuses a model of the repository that this build's engine cannot run, naming its
/// architecture and those the engine serves: its replicas would only fail at load, restart
/// and fail again. The same rule the loaders apply, over the registered metadata. The model
/// a deployment already runs (`running`: its name and version) is not checked again.
fn check_servable(
    record: &maas_store::repo::models::ModelVersionRecord,
    name: &str,
    running: Option<(&str, &str)>,
) -> Result<(), ApiError> {
    use maas_engine::model_files::{ModelFormat, engine_support};
    if running == Some((name, record.version.as_str())) {
        return Ok(());
    }
    let format = if record.metadata.format == "gguf" { ModelFormat::Gguf } else { ModelFormat::Safetensors };
    engine_support(format, &record.metadata.config).map(drop).map_err(|reason| {
        ApiError::bad_request("model_not_servable", format!("model {}:{}: {reason}", record.name, record.version))
            .with_param("model")
    })
}

/// Checks a request and turns it into the spec of a deployment of `owner` (`None`: a
/// platform deployment); estimates memory from the model's files when not given. A private
/// deployment's model is its owner's own when the owner has one of that name, else the
/// platform's. A repository model this engine cannot run is refused, unless it is the
/// model the deployment already runs (`running`: its name and version, on an update).
async fn spec_from(
    state: &AppState,
    mut request: DeploymentRequest,
    owner: Option<DeploymentOwner>,
    running: Option<(&str, &str)>,
) -> Result<(DeploymentSpec, u32, Option<ModelEstimate>), ApiError> {
    let bad = |param: &str, message: String| ApiError::bad_request("invalid_input", message).with_param(param);
    if request.model.trim().is_empty() || request.model.len() > 256 {
        return Err(bad("model", "model must be 1 to 256 characters".into()));
    }
    if request.model_version.trim().is_empty() || request.model_version.len() > 128 {
        return Err(bad("model_version", "model_version must be 1 to 128 characters".into()));
    }
    if request.replicas > MAX_REPLICAS {
        return Err(bad("replicas", format!("replicas must be at most {MAX_REPLICAS}")));
    }
    if request.gpus_per_replica > MAX_GPUS_PER_REPLICA {
        return Err(bad("gpus_per_replica", format!("gpus_per_replica must be at most {MAX_GPUS_PER_REPLICA}")));
    }
    if request.context_tokens == 0 || request.concurrent_sequences == 0 {
        return Err(bad("context_tokens", "context_tokens and concurrent_sequences must be at least 1".into()));
    }
    let model_path = match request.model_path {
        Some(path) if path.trim().is_empty() => return Err(bad("model_path", "model_path is empty".into())),
        Some(path) if !Path::new(&path).is_absolute() => {
            return Err(bad("model_path", format!("model_path {path} must be absolute (every node resolves it)")));
        }
        other => other,
    };
    if request.gpus_per_replica > 0 && request.memory_per_gpu_mib == Some(0) {
        return Err(bad("memory_per_gpu_mib", "memory_per_gpu_mib must be above 0".into()));
    }
    // A model from the repository: its version is pinned now ("latest" resolved), and
    // its recorded config gives the estimate.
    let record = if model_path.is_none() {
        let stores = super::registry::stores(state)?;
        let model_owner = owner.as_ref().map(store_owner);
        let found = stores.db.models().find_for(model_owner.as_ref(), &request.model, &request.model_version).await;
        let record = found.map_err(|_| {
            bad(
                "model",
                format!(
                    "model {}:{} is not in the repository: import it with `maas model import PATH --name {}`, or give a model_path",
                    request.model, request.model_version, request.model
                ),
            )
        })?;
        request.model_version.clone_from(&record.version);
        check_servable(&record, &request.model, running)?;
        Some(record)
    } else {
        None
    };
    let mut estimate = None;
    let memory_per_gpu_mib = match (request.memory_per_gpu_mib, &model_path) {
        _ if request.gpus_per_replica == 0 => 0,
        (Some(0), _) => return Err(bad("memory_per_gpu_mib", "memory_per_gpu_mib must be above 0".into())),
        (Some(mib), _) => mib,
        (None, Some(path)) => {
            let (path, context, sequences) = (path.clone(), request.context_tokens, request.concurrent_sequences);
            let made = tokio::task::spawn_blocking(move || estimate_model(Path::new(&path), context, sequences, 0.0))
                .await
                .map_err(|err| ApiError::internal(format!("the estimate failed: {err}")))?
                .map_err(|reason| bad("model_path", format!("cannot estimate the model's memory: {reason}")))?;
            let per_gpu = made.estimate.total_mib.div_ceil(u64::from(request.gpus_per_replica));
            estimate = Some(made);
            per_gpu
        }
        (None, None) => {
            let record = record.as_ref().expect("looked up above");
            let made =
                estimate_version(record, request.context_tokens, request.concurrent_sequences).map_err(|reason| {
                    bad(
                        "memory_per_gpu_mib",
                        format!("cannot estimate the model's memory ({reason}): give memory_per_gpu_mib"),
                    )
                })?;
            let per_gpu = made.estimate.total_mib.div_ceil(u64::from(request.gpus_per_replica));
            estimate = Some(made);
            per_gpu
        }
    };
    let spec = DeploymentSpec {
        model_name: request.model,
        model_version: request.model_version,
        model_path,
        request: ReplicaRequest {
            gpus_per_replica: request.gpus_per_replica,
            memory_per_gpu_mib,
            cpu_fallback_allowed: request.cpu_fallback,
        },
        strategy: match request.strategy {
            StrategyName::Binpack => PlacementStrategy::Binpack,
            StrategyName::Spread => PlacementStrategy::Spread,
        },
        node_selector: request.node_selector,
        priority: request.priority,
        allow_preemption: request.allow_preemption,
        tenant_model: record.as_ref().is_some_and(|record| record.owner_kind != "platform"),
        owner,
        // The engine keeps to what the memory was estimated (and reserved) for.
        serving: Some(maas_consensus::state::ServingLimits {
            context_tokens: request.context_tokens,
            concurrent_sequences: request.concurrent_sequences,
        }),
    };
    Ok((spec, request.replicas, estimate))
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

async fn put(
    state: &AppState,
    id: String,
    spec: DeploymentSpec,
    replicas: u32,
    estimate: Option<ModelEstimate>,
    created: bool,
) -> Result<Response, ApiError> {
    let handle = control_plane(state)?;
    let command = Command::PutDeployment { deployment_id: DeploymentId(id.clone()), spec, replicas, at_ms: now_ms() };
    if let Err(rejection) = handle.propose(command).await? {
        return Err(ApiError::bad_request("invalid_deployment", rejection.to_string()));
    }
    let settings = settings(state);
    let mut found = handle
        .read_local(|cluster| {
            let deployment = cluster.deployment(&DeploymentId(id.clone()))?;
            Some(view(cluster, deployment, &shortfalls(cluster, &settings)))
        })
        .ok_or_else(|| not_found(&id))?;
    found.estimate = estimate;
    let status = if created { http::StatusCode::CREATED } else { http::StatusCode::OK };
    Ok(warp::reply::with_status(warp::reply::json(&found), status).into_response())
}

/// Creates a deployment. Without `memory_per_gpu_mib`, the memory per GPU is estimated
/// from the model's files and returned with the deployment.
#[utoipa::path(post, path = "/v1/deployments", tag = "deployments", request_body = DeploymentRequest,
    params(("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses((status = 201, body = DeploymentView), (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn create_deployment(
    state: &AppState,
    caller: &Caller,
    request: DeploymentRequest,
) -> Result<Response, ApiError> {
    caller.require_deployer()?;
    let owner = owner_for(caller, request.visibility)?;
    if request.model_path.is_some() && caller.require_admin().is_err() {
        return Err(ApiError::forbidden(
            "deploying from files on the nodes (model_path) needs a platform administrator: deploy a model of the repository",
        )
        .with_param("model_path"));
    }
    let name = request.name.clone().unwrap_or_default();
    if !valid_name(&name) {
        return Err(ApiError::bad_request(
            "invalid_input",
            format!("name {name:?} must be 1 to 63 lowercase letters, digits and -, starting with a letter or digit"),
        )
        .with_param("name"));
    }
    let handle = control_plane(state)?;
    if handle.read_local(|cluster| cluster.deployment(&DeploymentId(name.clone())).is_some()) {
        return Err(ApiError::conflict(format!(
            "the deployment name {name} is taken (names are unique in the cluster): choose another name, or update yours with PUT /v1/deployments/{name}"
        )));
    }
    let (spec, replicas, estimate) = spec_from(state, request, owner, None).await?;
    check_gpu_quota(state, caller, &name, &spec, replicas)?;
    let detail = serde_json::json!({"model": spec.model_name, "version": spec.model_version, "replicas": replicas});
    let response = put(state, name.clone(), spec, replicas, estimate, true).await?;
    audit(state, caller.audit_entry("deployment.create", &name, detail)).await?;
    Ok(response)
}

/// Replaces a deployment's spec: a rolling update (new replicas are Ready before old ones
/// stop). The replica count is set too.
#[utoipa::path(put, path = "/v1/deployments/{id}", tag = "deployments", request_body = DeploymentRequest,
    params(("id" = String, Path, description = "the deployment's name"), ("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses((status = 200, body = DeploymentView), (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn update_deployment(
    state: &AppState,
    caller: &Caller,
    id: String,
    request: DeploymentRequest,
) -> Result<Response, ApiError> {
    let current = check_manage(state, caller, &id)?;
    if request.model_path.is_some() && caller.require_admin().is_err() {
        return Err(ApiError::forbidden(
            "deploying from files on the nodes (model_path) needs a platform administrator",
        )
        .with_param("model_path"));
    }
    let visibility = if current.owner.is_some() { Visibility::Private } else { Visibility::Public };
    if request.visibility.is_some_and(|asked| asked != visibility) {
        return Err(ApiError::bad_request(
            "invalid_input",
            "a deployment's visibility is fixed when it is created: create another deployment",
        )
        .with_param("visibility"));
    }
    if request.name.as_ref().is_some_and(|name| *name != id) {
        return Err(ApiError::bad_request(
            "invalid_input",
            "the name in the body differs from the path's: a deployment cannot be renamed",
        )
        .with_param("name"));
    }
    let running = current.model_path.is_none().then_some((current.model_name.as_str(), current.model_version.as_str()));
    let (spec, replicas, estimate) = spec_from(state, request, current.owner.clone(), running).await?;
    check_gpu_quota(state, caller, &id, &spec, replicas)?;
    let detail = serde_json::json!({"model": spec.model_name, "version": spec.model_version, "replicas": replicas});
    let response = put(state, id.clone(), spec, replicas, estimate, false).await?;
    audit(state, caller.audit_entry("deployment.update", &id, detail)).await?;
    Ok(response)
}

/// Sets a deployment's replica count (not a new generation: running replicas stay).
#[utoipa::path(patch, path = "/v1/deployments/{id}", tag = "deployments", request_body = ScaleRequest,
    params(("id" = String, Path, description = "the deployment's name"), ("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses((status = 200, body = DeploymentView), (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn scale_deployment(
    state: &AppState,
    caller: &Caller,
    id: String,
    request: ScaleRequest,
) -> Result<Response, ApiError> {
    let spec = check_manage(state, caller, &id)?;
    if request.replicas > MAX_REPLICAS {
        return Err(ApiError::bad_request("invalid_input", format!("replicas must be at most {MAX_REPLICAS}"))
            .with_param("replicas"));
    }
    check_gpu_quota(state, caller, &id, &spec, request.replicas)?;
    let handle = control_plane(state)?;
    let command = Command::ScaleDeployment {
        deployment_id: DeploymentId(id.clone()),
        replicas: request.replicas,
        at_ms: now_ms(),
    };
    match handle.propose(command).await? {
        Ok(_) => {
            audit(
                state,
                caller.audit_entry("deployment.scale", &id, serde_json::json!({"replicas": request.replicas})),
            )
            .await?;
            get_deployment(state, caller, &id)
        }
        Err(Rejection::UnknownDeployment(_)) => Err(not_found(&id)),
        Err(other) => Err(ApiError::bad_request("invalid_input", other.to_string())),
    }
}

/// Deletes a deployment: its replicas stop.
#[utoipa::path(delete, path = "/v1/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "the deployment's name"), ("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses((status = 200, description = "deleted", content_type = "application/json"), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn delete_deployment(state: &AppState, caller: &Caller, id: String) -> Result<Response, ApiError> {
    check_manage(state, caller, &id)?;
    let handle = control_plane(state)?;
    let command = Command::DeleteDeployment { deployment_id: DeploymentId(id.clone()), at_ms: now_ms() };
    match handle.propose(command).await? {
        Ok(_) => {
            audit(state, caller.audit_entry("deployment.delete", &id, serde_json::json!({}))).await?;
            Ok(warp::reply::json(&serde_json::json!({"id": id, "deleted": true})).into_response())
        }
        Err(Rejection::UnknownDeployment(_)) => Err(not_found(&id)),
        Err(other) => Err(ApiError::bad_request("invalid_input", other.to_string())),
    }
}

/// The memory one replica of a model needs, and where it would fit now. A model of the
/// repository is the caller's own when they have one of that name (as a deployment they
/// make would use), else the platform's; a model on disk (`model_path`) is for platform
/// administrators, who alone may deploy from node files.
#[utoipa::path(post, path = "/v1/deployments/estimate", tag = "deployments", request_body = EstimateRequest,
    responses((status = 200, body = EstimateReply), (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn estimate_deployment(
    state: &AppState,
    caller: &Caller,
    request: EstimateRequest,
) -> Result<Response, ApiError> {
    let bad = |param: &str, message: String| ApiError::bad_request("invalid_input", message).with_param(param);
    let admin = caller.require_admin().is_ok();
    if request.model_path.is_some() && !admin {
        return Err(ApiError::forbidden(
            "estimating a model from files on the nodes (model_path) needs a platform administrator: estimate a model of the repository",
        )
        .with_param("model_path"));
    }
    if request.gpus_per_replica == 0 || request.gpus_per_replica > MAX_GPUS_PER_REPLICA {
        return Err(bad("gpus_per_replica", format!("gpus_per_replica must be 1 to {MAX_GPUS_PER_REPLICA}")));
    }
    if request.context_tokens == 0 || request.concurrent_sequences == 0 {
        return Err(bad("context_tokens", "context_tokens and concurrent_sequences must be at least 1".into()));
    }
    let dtype_bytes = request.dtype_bytes.unwrap_or(0.0);
    if !(0.0..=8.0).contains(&dtype_bytes) {
        return Err(bad("dtype_bytes", "dtype_bytes must be between 0 and 8".into()));
    }
    let (context, sequences) = (request.context_tokens, request.concurrent_sequences);
    let model = match (&request.model_path, &request.model) {
        (Some(path), _) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || estimate_model(Path::new(&path), context, sequences, dtype_bytes))
                .await
                .map_err(|err| ApiError::internal(format!("the estimate failed: {err}")))?
                .map_err(|reason| bad("model_path", reason))?
        }
        (None, Some(name)) => {
            let owner = (!admin).then(|| caller.scope.acting_as());
            let record = super::registry::stores(state)?
                .db
                .models()
                .find_for(owner, name, &request.model_version)
                .await
                .map_err(|err| bad("model", err.to_string()))?;
            estimate_version(&record, context, sequences).map_err(|reason| bad("model", reason))?
        }
        (None, None) => return Err(bad("model_path", "give a model_path or a model of the repository".into())),
    };
    let memory_per_gpu_mib = model.estimate.total_mib.div_ceil(u64::from(request.gpus_per_replica));

    // Where one replica would go now: the scheduler on the committed placements with only
    // this demand.
    let handle = control_plane(state)?;
    let settings = settings(state);
    let plan = handle.read_local(|cluster| {
        let demand = maas_scheduler::Demand {
            deployments: vec![maas_scheduler::DeploymentDemand {
                id: "\u{0}estimate".to_owned(),
                replicas: 1,
                request: maas_scheduler::ReplicaRequest {
                    gpus: request.gpus_per_replica,
                    memory_per_gpu_mib,
                    cpu_cores: 0,
                    memory_mib: 0,
                    allow_cpu_fallback: false,
                    allow_multi_node: false,
                },
                strategy: maas_scheduler::Strategy::Binpack,
                node_selector: BTreeMap::new(),
                priority: 0,
                allow_preemption: false,
            }],
        };
        maas_scheduler::plan(&reconcile::snapshot(cluster, &settings), &demand)
    });
    let place = plan.places().next().map(|(_, node, gpus, _)| (node, gpus.to_vec()));
    let reply = EstimateReply {
        model,
        gpus_per_replica: request.gpus_per_replica,
        memory_per_gpu_mib,
        fits_on_node: place.as_ref().map(|(node, _)| *node),
        fits_on_gpus: place.map(|(_, gpus)| gpus).unwrap_or_default(),
        shortfall: plan.unplaceable.into_iter().next().map(shortfall),
    };
    Ok(warp::reply::json(&reply).into_response())
}

/// Drains a node: it takes no new replicas, and each of its replicas is replaced on
/// another node before it stops (where room exists).
#[utoipa::path(post, path = "/v1/nodes/{id}/drain", tag = "cluster",
    params(("id" = u64, Path, description = "the node id"), ("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses((status = 200, description = "draining", content_type = "application/json"), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn drain_node(state: &AppState, caller: &Caller, id: u64) -> Result<Response, ApiError> {
    set_drain(state, caller, id, true).await
}

/// Ends a drain: the node takes work again.
#[utoipa::path(delete, path = "/v1/nodes/{id}/drain", tag = "cluster",
    params(("id" = u64, Path, description = "the node id"), ("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses((status = 200, description = "alive again", content_type = "application/json"), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn undrain_node(state: &AppState, caller: &Caller, id: u64) -> Result<Response, ApiError> {
    set_drain(state, caller, id, false).await
}

async fn set_drain(state: &AppState, caller: &Caller, id: u64, drain: bool) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let handle = control_plane(state)?;
    let Some(status) = handle.read_local(|cluster| cluster.node(NodeId(id)).map(|node| node.status)) else {
        return Err(ApiError::not_found(format!("node {id} is not a member of this cluster")));
    };
    let to = match (drain, status) {
        (true, NodeStatus::Alive | NodeStatus::Suspect | NodeStatus::Draining) => NodeStatus::Draining,
        (false, NodeStatus::Draining | NodeStatus::Alive) => NodeStatus::Alive,
        (_, other) => {
            return Err(ApiError::conflict(format!(
                "node {id} is {other}: only an alive node can be drained, and only a draining one undrained"
            )));
        }
    };
    if let Err(rejection) =
        handle.propose(Command::SetNodeStatus { node_id: NodeId(id), status: to, at_ms: now_ms() }).await?
    {
        return Err(ApiError::conflict(rejection.to_string()));
    }
    let action = if drain { "node.drain" } else { "node.undrain" };
    audit(state, caller.audit_entry(action, &id.to_string(), serde_json::json!({"status": to.to_string()}))).await?;
    Ok(warp::reply::json(&serde_json::json!({"node_id": id, "status": to.to_string()})).into_response())
}
