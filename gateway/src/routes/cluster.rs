//! The control plane as users see it: the cluster's raft status and its members, and the
//! node list, read from this node's replicated state.

use std::sync::Arc;

use maas_consensus::state::{ClusterState, Command, NodeId, NodeRecord, NodeSpec, NodeStatus, Rejection};
use maas_consensus::{RaftHandle, RaftStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::auth::{Access, signed_in};
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let status = warp::path!("v1" / "cluster" / "status")
        .and(warp::get())
        .and(with_state(state))
        .and(signed_in(state, Access::Manage))
        .and_then(|s: Arc<AppState>| async move { cluster_status(&s).map_err(warp::reject::custom) });
    let nodes = warp::path!("v1" / "nodes")
        .and(warp::get())
        .and(with_state(state))
        .and(signed_in(state, Access::Manage))
        .and_then(|s: Arc<AppState>| async move { list_nodes(&s).map_err(warp::reject::custom) });
    let join = warp::path!("v1" / "cluster" / "members")
        .and(warp::post())
        .and(with_state(state))
        .and(cookie_checked(state))
        .and(crate::json::json_body::<NodeSpec>(64 * 1024))
        .and_then(|s: Arc<AppState>, cookie: Option<String>, spec: NodeSpec| async move {
            join_member(&s, cookie.as_deref(), spec).await.map_err(warp::reject::custom)
        });
    let remove = warp::path!("v1" / "cluster" / "members" / u64)
        .and(warp::delete())
        .and(with_state(state))
        .and(cookie_checked(state))
        .and_then(|id: u64, s: Arc<AppState>, cookie: Option<String>| async move {
            remove_member(&s, cookie.as_deref(), id).await.map_err(warp::reject::custom)
        });
    let labels = warp::path!("v1" / "nodes" / u64 / "labels")
        .and(warp::patch())
        .and(with_state(state))
        .and(cookie_checked(state))
        .and(crate::json::json_body::<LabelChange>(64 * 1024))
        .and_then(|id: u64, s: Arc<AppState>, cookie: Option<String>, change: LabelChange| async move {
            change_labels(&s, cookie.as_deref(), id, change).await.map_err(warp::reject::custom)
        });
    let gpus = warp::path!("v1" / "gpus")
        .and(warp::get())
        .and(with_state(state))
        .and(signed_in(state, Access::Manage))
        .and_then(|s: Arc<AppState>| async move { list_gpus(&s).map_err(warp::reject::custom) });
    let agent = warp::path!("v1" / "node" / "agent")
        .and(warp::get())
        .and(with_state(state))
        .and(signed_in(state, Access::Manage))
        .and_then(|s: Arc<AppState>| async move { node_agent(&s).map_err(warp::reject::custom) });
    status
        .or(nodes)
        .unify()
        .or(join)
        .unify()
        .or(remove)
        .unify()
        .or(labels)
        .unify()
        .or(gpus)
        .unify()
        .or(agent)
        .unify()
        .boxed()
}

/// This node's local actors as its agent last reconciled them: a GPU actor per GPU with
/// its leases, restarts, and the reason it is down if its restart budget is spent.
#[utoipa::path(
    get,
    path = "/v1/node/agent",
    tag = "cluster",
    responses((status = 200, description = "the agent's status", content_type = "application/json"), (status = 503, body = crate::error::ErrorBody))
)]
pub fn node_agent(state: &AppState) -> Result<Response, ApiError> {
    let status = state.agent.get().ok_or_else(|| ApiError::unavailable("the node agent is starting; retry shortly"))?;
    let status = status.read().expect("agent status lock").clone();
    Ok(warp::reply::json(&status).into_response())
}

/// One GPU of the cluster, with the memory promised to replicas and jobs placed on it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterGpu {
    pub node_id: u64,
    pub node_name: String,
    pub node_status: String,
    pub index: u32,
    pub model: String,
    pub simulated: bool,
    pub memory_total_mib: u64,
    /// Held by replicas loading or ready and training jobs running on this GPU.
    pub memory_used_mib: u64,
    /// Promised to the replicas and training jobs placed on this GPU (used included).
    pub memory_reserved_mib: u64,
    /// Total less reserved (the node also keeps `node.gpu_memory_reserve_mib` back).
    pub memory_free_mib: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GpuList {
    pub gpus: Vec<ClusterGpu>,
}

/// Every GPU in the cluster, from the committed state: where it is, its model, and how
/// much of its memory placements hold.
#[utoipa::path(
    get,
    path = "/v1/gpus",
    tag = "cluster",
    responses((status = 200, body = GpuList), (status = 503, body = crate::error::ErrorBody))
)]
pub fn list_gpus(state: &AppState) -> Result<Response, ApiError> {
    let handle = control_plane(state)?;
    let gpus = handle.read_local(|cluster| {
        let mut gpus = Vec::new();
        for node in cluster.nodes().values() {
            for gpu in &node.resources.gpus {
                let reserved = cluster.gpu_memory_placed_mib(node.id, gpu.index);
                gpus.push(ClusterGpu {
                    node_id: node.id.0,
                    node_name: node.name.clone(),
                    node_status: status_name(node),
                    index: gpu.index,
                    model: gpu.model.clone(),
                    simulated: gpu.simulated,
                    memory_total_mib: gpu.memory_total_mib,
                    memory_used_mib: cluster.gpu_memory_in_use_mib(node.id, gpu.index),
                    memory_reserved_mib: reserved,
                    memory_free_mib: gpu.memory_total_mib.saturating_sub(reserved),
                });
            }
        }
        gpus
    });
    Ok(warp::reply::json(&GpuList { gpus }).into_response())
}

/// Labels to set and to remove on a node, in one atomic change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelChange {
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub remove: std::collections::BTreeSet<String>,
}

/// Sets and removes labels of a node (deployments select nodes by label). The change is
/// merged atomically, so concurrent changes of different keys never lose each other.
#[utoipa::path(
    patch,
    path = "/v1/nodes/{id}/labels",
    tag = "cluster",
    request_body = LabelChange,
    params(
        ("id" = u64, Path, description = "the node id"),
        ("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")
    ),
    responses(
        (status = 200, body = NodeView),
        (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody),
        (status = 503, body = crate::error::ErrorBody)
    )
)]
pub async fn change_labels(
    state: &AppState,
    cookie: Option<&str>,
    id: u64,
    change: LabelChange,
) -> Result<Response, ApiError> {
    check_cookie(state, cookie)?;
    let handle = control_plane(state)?;
    let command =
        Command::SetNodeLabels { node_id: NodeId(id), set: change.set, remove: change.remove, at_ms: now_ms() };
    if let Err(rejection) = handle.propose(command).await? {
        return Err(match rejection {
            Rejection::UnknownNode(_) | Rejection::NodeRemoved(_) => ApiError::not_found(rejection.to_string()),
            other => ApiError::bad_request("invalid_labels", other.to_string()),
        });
    }

    let view = handle.read_local(|cluster| cluster.node(NodeId(id)).map(node_view));
    view.map(|view| warp::reply::json(&view).into_response())
        .ok_or_else(|| ApiError::not_found(format!("node {id} is not a member of this cluster")))
}

/// The header that carries the cluster cookie on membership changes.
pub const COOKIE_HEADER: &str = "x-maas-cluster-cookie";

/// Membership changes need the cluster's cookie (until admin accounts exist, it is the
/// credential of cluster operations).
pub(crate) fn check_cookie(state: &AppState, presented: Option<&str>) -> Result<(), ApiError> {
    let Some(expected) = state.cluster_cookie.get() else {
        return Err(ApiError::unavailable("the control plane is starting; retry shortly"));
    };
    let presented = presented.unwrap_or_default();
    // Compare in constant time for equal lengths.
    let same = presented.len() == expected.len()
        && presented.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            http::StatusCode::FORBIDDEN,
            "permission_error",
            "cluster_cookie_mismatch",
            format!("the {COOKIE_HEADER} header does not match this cluster's cookie (cluster.cookie)"),
        ))
    }
}

/// The cluster cookie of a node-to-node route, checked before anything else of the
/// request (its body is not read for a caller without it); the cookie is passed on.
pub(crate) fn cookie_checked(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Option<String>,), Error = warp::Rejection> + Clone + use<> {
    with_state(state).and(warp::header::optional::<String>(COOKIE_HEADER)).and_then(
        |s: Arc<AppState>, cookie: Option<String>| async move {
            check_cookie(&s, cookie.as_deref()).map_err(warp::reject::custom)?;
            Ok::<_, warp::Rejection>(cookie)
        },
    )
}

/// Where each member can be reached, returned to a node that joins.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberAddresses {
    pub id: u64,
    pub cluster_addr: String,
    pub api_addr: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JoinReply {
    /// Every member that has not left, the new one included.
    pub members: Vec<MemberAddresses>,
    pub voters: Vec<u64>,
}

/// Adds a node to the cluster: records its addresses (`RegisterNode`), then makes it a
/// voter. Sent by `maas node start --join` with the cluster cookie; safe to repeat.
#[utoipa::path(
    post,
    path = "/v1/cluster/members",
    tag = "cluster",
    request_body(content = Object, description = "the joining node's spec: id, name, api_addr, cluster_addr, labels, resources"),
    params(("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")),
    responses(
        (status = 200, body = JoinReply),
        (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody),
        (status = 503, body = crate::error::ErrorBody)
    )
)]
pub async fn join_member(state: &AppState, cookie: Option<&str>, spec: NodeSpec) -> Result<Response, ApiError> {
    check_cookie(state, cookie)?;
    let handle = control_plane(state)?;
    let id = spec.id.0;
    if id == 0 {
        return Err(ApiError::bad_request("invalid_input", "node id 0 is reserved: use 1 or more").with_param("id"));
    }
    let command = Command::RegisterNode { node: spec, at_ms: now_ms() };
    if let Err(rejection) = handle.propose(command).await? {
        return Err(ApiError::conflict(rejection.to_string()));
    }
    if !handle.status().voters.contains(&id) {
        handle.add_voter(id).await?;
    }
    let voters = handle.status().voters;
    let members = handle.read_local(|cluster| {
        cluster
            .nodes()
            .values()
            .filter(|node| node.status != NodeStatus::Left)
            .map(|node| MemberAddresses {
                id: node.id.0,
                cluster_addr: node.cluster_addr.clone(),
                api_addr: node.api_addr.clone(),
            })
            .collect()
    });
    tracing::info!(node_id = id, "a node joined the cluster");
    Ok(warp::reply::json(&JoinReply { members, voters }).into_response())
}

/// Removes a member: it stops being a voter, and its record is deleted (or marked as
/// left when work is still placed on it, for the scheduler to move).
#[utoipa::path(
    delete,
    path = "/v1/cluster/members/{id}",
    tag = "cluster",
    params(
        ("id" = u64, Path, description = "the node id"),
        ("x-maas-cluster-cookie" = String, Header, description = "the cluster cookie")
    ),
    responses(
        (status = 200, body = ClusterStatus),
        (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody),
        (status = 503, body = crate::error::ErrorBody)
    )
)]
pub async fn remove_member(state: &AppState, cookie: Option<&str>, id: u64) -> Result<Response, ApiError> {
    check_cookie(state, cookie)?;
    let handle = control_plane(state)?;
    let known = handle.read_local(|cluster| cluster.node(NodeId(id)).is_some());
    let voter = handle.status().voters.contains(&id);
    if !known && !voter {
        return Err(ApiError::not_found(format!("node {id} is not a member of this cluster")));
    }
    if voter {
        handle.remove_member(id).await?;
    }
    if known {
        let at_ms = now_ms();
        if handle.propose(Command::RemoveNode { node_id: NodeId(id), at_ms }).await?.is_err() {
            // Work is still placed on it: mark it as left; the scheduler moves the work.
            if let Err(rejection) =
                handle.propose(Command::SetNodeStatus { node_id: NodeId(id), status: NodeStatus::Left, at_ms }).await?
            {
                return Err(ApiError::conflict(rejection.to_string()));
            }
        }
    }
    tracing::info!(node_id = id, "a node was removed from the cluster");
    cluster_status(state)
}

pub(crate) fn now_ms() -> u64 {
    u64::try_from(maas_store::ids::now_ms()).unwrap_or(0)
}

pub(crate) fn control_plane(state: &AppState) -> Result<&RaftHandle<ClusterState>, ApiError> {
    state.cluster.get().ok_or_else(|| ApiError::unavailable("the control plane is starting; retry shortly"))
}

/// The raft view of the cluster from the node that answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: u64,
    /// `leader`, `follower`, `candidate` or `pre_candidate`.
    pub role: String,
    /// 0 when no leader is known.
    pub leader_id: u64,
    /// The leader's API address, when known.
    pub leader_api_addr: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    /// Why this node's raft stopped, if it stopped on a failure.
    pub failed: Option<String>,
    pub members: Vec<Member>,
}

/// One member: a raft voter or a registered node, or both.
#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    pub id: u64,
    pub name: Option<String>,
    pub api_addr: Option<String>,
    pub voter: bool,
    /// The committed liveness status (`alive`, `suspect`, `dead`, `draining`, `left`), or
    /// `unregistered` for a voter that has not registered yet.
    pub status: String,
    pub leader: bool,
    /// How far behind the leader's log the member is, in entries; known on the leader only.
    pub lag: Option<u64>,
    /// This node's connection to the member (`connected`, `connecting`, `unreachable`,
    /// `cookie_mismatch`), or none for the answering node itself.
    pub connection: Option<String>,
}

/// A registered node and its resources.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub id: u64,
    pub name: String,
    pub api_addr: String,
    pub cluster_addr: String,
    pub status: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub cpu_cores: u32,
    pub memory_mib: u64,
    pub gpus: Vec<GpuView>,
    pub joined_at_ms: u64,
    pub status_since_ms: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GpuView {
    pub index: u32,
    pub model: String,
    pub memory_total_mib: u64,
    pub simulated: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

fn status_name(record: &NodeRecord) -> String {
    format!("{:?}", record.status).to_lowercase()
}

/// The cluster's raft status and members, as this node sees them (lag is known on the
/// leader; `leader_api_addr` says where to ask).
#[utoipa::path(
    get,
    path = "/v1/cluster/status",
    tag = "cluster",
    responses((status = 200, body = ClusterStatus), (status = 503, body = crate::error::ErrorBody))
)]
pub fn cluster_status(state: &AppState) -> Result<Response, ApiError> {
    let handle = control_plane(state)?;
    let raft: RaftStatus = handle.status();
    let connections = state.peer_health.get().map(|health| health()).unwrap_or_default();
    let members = handle.read_local(|cluster| {
        let mut ids: Vec<u64> = raft.voters.clone();
        ids.extend(cluster.nodes().keys().map(|id| id.0));
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let record = cluster.node(maas_consensus::state::NodeId(id));
                Member {
                    id,
                    name: record.map(|r| r.name.clone()),
                    api_addr: record.map(|r| r.api_addr.clone()),
                    voter: raft.voters.contains(&id),
                    status: record.map_or_else(|| "unregistered".to_owned(), status_name),
                    leader: raft.leader_id == id,
                    lag: raft.matched.get(&id).map(|matched| raft.last_index.saturating_sub(*matched)),
                    connection: connections.get(&id).cloned(),
                }
            })
            .collect::<Vec<_>>()
    });
    let leader_api_addr = members.iter().find(|m| m.leader).and_then(|m| m.api_addr.clone());
    let role = match raft.role.as_str() {
        "PreCandidate" => "pre_candidate".to_owned(),
        other => other.to_lowercase(),
    };
    Ok(warp::reply::json(&ClusterStatus {
        node_id: raft.id,
        role,
        leader_id: raft.leader_id,
        leader_api_addr,
        term: raft.term,
        commit_index: raft.commit_index,
        applied_index: raft.applied_index,
        last_index: raft.last_index,
        snapshot_index: raft.snapshot_index,
        failed: raft.failed.clone(),
        members,
    })
    .into_response())
}

/// Every registered node with its resources and committed status (this node's applied
/// state: possibly a moment behind the leader).
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "cluster",
    responses((status = 200, body = NodeList), (status = 503, body = crate::error::ErrorBody))
)]
pub fn list_nodes(state: &AppState) -> Result<Response, ApiError> {
    let handle = control_plane(state)?;
    let nodes = handle.read_local(|cluster| cluster.nodes().values().map(node_view).collect());
    Ok(warp::reply::json(&NodeList { nodes }).into_response())
}

fn node_view(record: &NodeRecord) -> NodeView {
    NodeView {
        id: record.id.0,
        name: record.name.clone(),
        api_addr: record.api_addr.clone(),
        cluster_addr: record.cluster_addr.clone(),
        status: status_name(record),
        labels: record.labels.clone(),
        cpu_cores: record.resources.cpu_cores,
        memory_mib: record.resources.memory_mib,
        gpus: record
            .resources
            .gpus
            .iter()
            .map(|gpu| GpuView {
                index: gpu.index,
                model: gpu.model.clone(),
                memory_total_mib: gpu.memory_total_mib,
                simulated: gpu.simulated,
            })
            .collect(),
        joined_at_ms: record.joined_at_ms,
        status_since_ms: record.status_since_ms,
    }
}
