//! The records the control plane keeps, and the specs that commands carry to make them.
//! Times are Unix milliseconds chosen by the proposer (`at_ms`), never read from a clock
//! here. Every map is a `BTreeMap`, so iteration and serialisation are deterministic.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::ids::{DeploymentId, JobId, NodeId, ReplicaId, ShardId};

/// The longest a node label's key may be, in characters; a key is ASCII letters, digits,
/// `-`, `_`, `.` and `/` ([`label_key_is_valid`]).
pub const LABEL_KEY_MAX_CHARS: usize = 63;

/// The longest a node label's value may be, in characters (Unicode scalar values).
pub const LABEL_VALUE_MAX_CHARS: usize = 253;

/// Whether `key` may name a node label set through [`Command::SetNodeLabels`]: 1 to
/// [`LABEL_KEY_MAX_CHARS`] ASCII letters, digits, `-`, `_`, `.` or `/`.
///
/// [`Command::SetNodeLabels`]: super::Command::SetNodeLabels
pub fn label_key_is_valid(key: &str) -> bool {
    (1..=LABEL_KEY_MAX_CHARS).contains(&key.len())
        && key.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'/'))
}

/// What a node says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: NodeId,
    /// Unique among the nodes that have not left (a host name, usually).
    pub name: String,
    /// Where the node serves the HTTP API.
    pub api_addr: String,
    /// Where the node talks to its peers (raft and actors).
    pub cluster_addr: String,
    pub labels: BTreeMap<String, String>,
    pub resources: NodeResources,
}

/// What a node can run work on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeResources {
    pub cpu_cores: u32,
    pub memory_mib: u64,
    /// One entry per GPU, each with a distinct `index`.
    pub gpus: Vec<GpuRecord>,
}

impl NodeResources {
    pub fn gpu(&self, gpu_index: u32) -> Option<&GpuRecord> {
        self.gpus.iter().find(|gpu| gpu.index == gpu_index)
    }
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuRecord {
    /// The device index on its node (as CUDA numbers it).
    pub index: u32,
    pub model: String,
    pub memory_total_mib: u64,
    /// A GPU that does not exist: a test or `maas up` without hardware pretends it does.
    pub simulated: bool,
}

/// Liveness of a node, as the leader's failure detector (or an operator) last committed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Alive,
    /// Heartbeats were missed; not yet declared dead.
    Suspect,
    Dead,
    /// Takes no new work; its work is being moved away.
    Draining,
    /// Gone for good: the status never changes again and the id never rejoins.
    Left,
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeStatus::Alive => "alive",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Dead => "dead",
            NodeStatus::Draining => "draining",
            NodeStatus::Left => "left",
        })
    }
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
    pub cluster_addr: String,
    pub labels: BTreeMap<String, String>,
    pub resources: NodeResources,
    pub status: NodeStatus,
    pub status_since_ms: u64,
    pub joined_at_ms: u64,
    /// How many times the node has been declared dead (entered `Dead` from another
    /// status); the leader's hysteresis reads it to tell a flapping node (REC-1).
    pub dead_declarations: u32,
}

/// How the scheduler spreads a deployment's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementStrategy {
    /// Fill the fullest GPU that fits first, leaving whole GPUs free.
    Binpack,
    /// Put replicas on different nodes first.
    Spread,
}

/// What one replica of a deployment needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRequest {
    /// GPUs per replica, all on one node (SCH-2); 0 means a CPU-only deployment.
    pub gpus_per_replica: u32,
    pub memory_per_gpu_mib: u64,
    /// A replica may run on CPU (no GPUs) when no GPU fits.
    pub cpu_fallback_allowed: bool,
}

/// The desired state of a deployment, less its replica count. A change of any field is a
/// new generation; scaling is not (see [`DeploymentRecord::generation`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    pub model_name: String,
    pub model_version: String,
    /// Where the model's files are on every node that may run it (a Hugging Face folder
    /// or a `.gguf` file), for models not in the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_path: Option<String>,
    pub request: ReplicaRequest,

    pub strategy: PlacementStrategy,
    /// A node qualifies when it carries every one of these labels with the same value.
    pub node_selector: BTreeMap<String, String>,
    /// Higher runs first, and may preempt lower where the lower allows it.
    pub priority: i32,
    /// Whether this deployment's replicas may be preempted by higher-priority work.
    pub allow_preemption: bool,
    /// The tenant a private deployment answers; `None`: a platform deployment, which
    /// every tenant may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<DeploymentOwner>,
    /// The model is the owner's own, from their part of the repository; `false`: the
    /// platform's (or `model_path`'s).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tenant_model: bool,
    /// What each replica's engine is sized for; `None` (deployments made before it was
    /// recorded): the engine's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingLimits>,
}

/// The sequences a replica's KV cache is sized for, as its memory was estimated and
/// reserved: `concurrent_sequences` contexts of `context_tokens`. The engine caps a
/// sequence at `context_tokens` and keeps the KV positions of all running sequences within
/// `context_tokens x concurrent_sequences`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServingLimits {
    pub context_tokens: u32,
    pub concurrent_sequences: u32,
}

/// The owner of a private deployment: a user or an organisation (the store's `Owner`, in
/// the same JSON shape: `{"kind": "user", "id": "..."}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "lowercase")]
pub enum DeploymentOwner {
    User(String),
    Org(String),
}

/// A deployment: what the user asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRecord {
    pub id: DeploymentId,
    pub spec: DeploymentSpec,
    pub replicas_desired: u32,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Counts changes of [`DeploymentSpec`], from 1. A replica placed for an older
    /// generation runs an outdated spec and is due for replacement. Scaling changes only
    /// `replicas_desired`, so it does not make running replicas outdated.
    pub generation: u64,
}

/// Lifecycle of a model replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplicaState {
    /// Placed; its node has not started it yet.
    Pending,
    /// Fetching blobs and loading weights.
    Loading,
    /// Serving requests.
    Ready,
    Failed {
        reason: String,
    },
    /// On its way out: it never becomes anything else, only removed.
    Stopping,
}

impl ReplicaState {
    pub fn name(&self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Loading => "loading",
            ReplicaState::Ready => "ready",
            ReplicaState::Failed { .. } => "failed",
            ReplicaState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaState::Failed { reason } => write!(f, "failed ({reason})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Where the scheduler puts a replica: the fields of a [`ReplicaRecord`] it chooses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaPlacement {
    pub replica_id: ReplicaId,
    pub deployment_id: DeploymentId,
    /// The deployment generation the replica runs; must be the deployment's current one.
    pub deployment_generation: u64,
    pub node_id: NodeId,
    /// Distinct GPU indices on `node_id`; empty for a replica on CPU.
    pub gpu_indices: Vec<u32>,
    /// Memory promised on each of `gpu_indices`.
    pub memory_per_gpu_mib: u64,
}

/// A model replica placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRecord {
    pub id: ReplicaId,
    pub deployment_id: DeploymentId,
    pub deployment_generation: u64,
    pub node_id: NodeId,
    /// Empty: the replica runs on CPU.
    pub gpu_indices: Vec<u32>,
    pub memory_per_gpu_mib: u64,
    pub state: ReplicaState,
    pub state_since_ms: u64,
    pub placed_at_ms: u64,
    /// How many times the replica went from `Failed` back to `Pending` or `Loading`.
    pub restarts: u32,
}

/// Lifecycle of a training job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TrainingJobState {
    Pending,
    Running,
    /// Finished; terminal.
    Succeeded,
    /// May go back to `Pending` to resume from its last checkpoint (ING-1).
    Failed {
        reason: String,
    },
    /// Stopped by its owner; terminal.
    Cancelled,
}

impl TrainingJobState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, TrainingJobState::Succeeded | TrainingJobState::Cancelled)
    }

    pub fn name(&self) -> &'static str {
        match self {
            TrainingJobState::Pending => "pending",
            TrainingJobState::Running => "running",
            TrainingJobState::Succeeded => "succeeded",
            TrainingJobState::Failed { .. } => "failed",
            TrainingJobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TrainingJobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainingJobState::Failed { reason } => write!(f, "failed ({reason})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Where a training job runs and what it trains: the fields of a [`TrainingJobRecord`]
/// that its proposer chooses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingJobPlacement {
    pub job_id: JobId,
    /// The model (name and version, as the model registry spells it) being trained.
    pub base_model: String,
    pub node_id: NodeId,
    /// Distinct GPU indices on `node_id`; empty for a job on CPU.
    pub gpu_indices: Vec<u32>,
    pub memory_per_gpu_mib: u64,
}

/// A training job placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingJobRecord {
    pub id: JobId,
    pub base_model: String,
    pub node_id: NodeId,
    pub gpu_indices: Vec<u32>,
    pub memory_per_gpu_mib: u64,
    pub state: TrainingJobState,
    pub state_since_ms: u64,
    pub created_at_ms: u64,
}

/// Lifecycle of a knowledge-base shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KbShardState {
    Pending,
    /// Loading its index from disk or peers.
    Loading,
    Serving,
    Failed {
        reason: String,
    },
    /// On its way out: it never becomes anything else, only removed.
    Stopping,
}

impl KbShardState {
    pub fn name(&self) -> &'static str {
        match self {
            KbShardState::Pending => "pending",
            KbShardState::Loading => "loading",
            KbShardState::Serving => "serving",
            KbShardState::Failed { .. } => "failed",
            KbShardState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for KbShardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KbShardState::Failed { reason } => write!(f, "failed ({reason})"),
            other => f.write_str(other.name()),
        }
    }
}

/// The document-id hashes a shard owns: `start..=end_inclusive`, so one shard can own the
/// whole `u64` space. Shards of one knowledge base may overlap, so that a split can place
/// the new halves while the old shard still serves; routing picks serving shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashRange {
    pub start: u64,
    pub end_inclusive: u64,
}

impl fmt::Display for HashRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.start, self.end_inclusive)
    }
}

/// Where a knowledge-base shard lives: the fields of a [`KbShardRecord`] that its
/// proposer chooses. Shards hold their index in host memory, not on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbShardPlacement {
    pub shard_id: ShardId,
    /// The knowledge base the shard belongs to; fixed for the shard's life.
    pub knowledge_base_id: String,
    pub hash_range: HashRange,
    pub node_id: NodeId,
}

/// A knowledge-base shard placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbShardRecord {
    pub id: ShardId,
    pub knowledge_base_id: String,
    pub hash_range: HashRange,
    pub node_id: NodeId,
    pub state: KbShardState,
    pub state_since_ms: u64,
    pub created_at_ms: u64,
}
