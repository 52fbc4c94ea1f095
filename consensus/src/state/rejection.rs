//! Why a command was refused. A refused command changed nothing.

use std::fmt::Write as _;

use super::ids::{DeploymentId, JobId, NodeId, ReplicaId, ShardId};
use super::records::{
    KbShardState, LABEL_KEY_MAX_CHARS, LABEL_VALUE_MAX_CHARS, NodeStatus, ReplicaState, TrainingJobState,
};

/// A command that [`ClusterState`](super::ClusterState) refused; the state is as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{what} id must not be empty")]
    EmptyId { what: &'static str },

    // Nodes.
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    #[error("node {0} was removed from the cluster; its id cannot be used again, so register the node under a new id")]
    NodeRemoved(NodeId),
    #[error("node {0} has left the cluster and cannot rejoin with the same id; register it under a new id")]
    NodeLeft(NodeId),
    #[error("node {0} has left the cluster; its status cannot change")]
    NodeStatusFinal(NodeId),
    #[error("node {0} has left the cluster; its labels cannot change")]
    NodeLabelsFinal(NodeId),
    #[error("label {key:?} is both set and removed on node {node_id}; send it in one of `set` or `remove`")]
    LabelSetAndRemoved { node_id: NodeId, key: String },
    #[error(
        "label key {key:?} for node {node_id} must be 1 to {LABEL_KEY_MAX_CHARS} ascii letters, digits, `-`, `_`, \
         `.` or `/`"
    )]
    InvalidLabelKey { node_id: NodeId, key: String },
    #[error(
        "the value of label {key:?} for node {node_id} is {chars} characters long; at most \
         {LABEL_VALUE_MAX_CHARS} are allowed"
    )]
    LabelValueTooLong { node_id: NodeId, key: String, chars: usize },
    #[error("node {node_id} must have a name")]
    EmptyNodeName { node_id: NodeId },
    #[error("node name {name:?} is already taken by node {taken_by}")]
    NodeNameTaken { name: String, taken_by: NodeId },
    #[error("node {node_id} lists gpu {gpu_index} more than once")]
    DuplicateNodeGpu { node_id: NodeId, gpu_index: u32 },
    #[error(
        "registering node {node_id} again would drop gpu {gpu_index}, which holds {placed_mib} MiB of placed work; \
         move that work first"
    )]
    GpuInUseWouldVanish { node_id: NodeId, gpu_index: u32, placed_mib: u64 },
    #[error(
        "registering node {node_id} again would shrink gpu {gpu_index} to {memory_total_mib} MiB, below the \
         {placed_mib} MiB placed on it; move that work first"
    )]
    GpuInUseWouldShrink { node_id: NodeId, gpu_index: u32, memory_total_mib: u64, placed_mib: u64 },
    #[error(
        "node {node_id} still holds work ({}); move it to other nodes first",
        describe_work(.replicas, .training_jobs, .kb_shards)
    )]
    NodeHoldsWork { node_id: NodeId, replicas: Vec<ReplicaId>, training_jobs: Vec<JobId>, kb_shards: Vec<ShardId> },
    #[error("node {node_id} is {status}; only an alive node takes new work")]
    NodeNotAlive { node_id: NodeId, status: NodeStatus },
    #[error("node {node_id} lacks the label {key}={value} that deployment {deployment_id} selects")]
    NodeSelectorMismatch { node_id: NodeId, deployment_id: DeploymentId, key: String, value: String },
    #[error("node {node_id} has no gpu {gpu_index}")]
    UnknownGpu { node_id: NodeId, gpu_index: u32 },
    #[error("the placement lists gpu {gpu_index} more than once")]
    DuplicatePlacementGpu { gpu_index: u32 },
    #[error(
        "gpu {gpu_index} on node {node_id} has {free_mib} MiB free after the {reserve_mib} MiB reserve; \
         the placement needs {need_mib} MiB"
    )]
    GpuMemoryExhausted { node_id: NodeId, gpu_index: u32, need_mib: u64, free_mib: u64, reserve_mib: u64 },

    // Deployments and replicas.
    #[error("deployment {0} does not exist")]
    UnknownDeployment(DeploymentId),
    #[error("deployment {deployment_id} is invalid: {reason}")]
    InvalidDeployment { deployment_id: DeploymentId, reason: String },
    #[error(
        "replica {replica_id} is for generation {placed} of deployment {deployment_id}, which is at generation \
         {current}; plan it again"
    )]
    StaleGeneration { replica_id: ReplicaId, deployment_id: DeploymentId, placed: u64, current: u64 },
    #[error(
        "deployment {deployment_id} needs {needed} gpus per replica on one node{}, the placement gives {given}",
        if *.cpu_fallback_allowed { " (or none, on cpu)" } else { "" }
    )]
    WrongGpuCount { deployment_id: DeploymentId, needed: u32, cpu_fallback_allowed: bool, given: usize },
    #[error("replica {0} already exists")]
    ReplicaExists(ReplicaId),
    #[error("replica {0} does not exist")]
    UnknownReplica(ReplicaId),
    #[error("replica {replica_id} is stopping and cannot become {to}; it can only be removed")]
    ReplicaStopping { replica_id: ReplicaId, to: ReplicaState },

    // Training jobs.
    #[error("training job {0} does not exist")]
    UnknownTrainingJob(JobId),
    #[error("training job {job_id} has finished ({state}) and cannot change; start a new job under a new id")]
    TrainingJobFinished { job_id: JobId, state: TrainingJobState },
    #[error("training job {job_id} must name its base model")]
    EmptyBaseModel { job_id: JobId },

    // Knowledge-base shards.
    #[error("kb shard {0} does not exist")]
    UnknownKbShard(ShardId),
    #[error("kb shard {shard_id} is stopping and cannot become {to}; it can only be removed")]
    KbShardStopping { shard_id: ShardId, to: KbShardState },
    #[error("kb shard {shard_id} belongs to knowledge base {current:?}, not {asked:?}")]
    KbShardOtherKnowledgeBase { shard_id: ShardId, current: String, asked: String },
    #[error("kb shard {shard_id} must name its knowledge base")]
    EmptyKnowledgeBase { shard_id: ShardId },
    #[error("knowledge base {knowledge_base_id:?} must be placed with at least one shard")]
    NoKbShards { knowledge_base_id: String },
    #[error("kb shard {0} is named twice in one placement")]
    DuplicateKbShard(ShardId),
    #[error("kb shard {shard_id} has an empty hash range: start {start:#x} is after end {end_inclusive:#x}")]
    EmptyHashRange { shard_id: ShardId, start: u64, end_inclusive: u64 },
}

fn describe_work(replicas: &[ReplicaId], training_jobs: &[JobId], kb_shards: &[ShardId]) -> String {
    fn group<T: std::fmt::Display>(out: &mut String, kind: &str, ids: &[T]) {
        if ids.is_empty() {
            return;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(kind);
        for (position, id) in ids.iter().enumerate() {
            out.push_str(if position == 0 { " " } else { ", " });
            let _ = write!(out, "{id}");
        }
    }
    let mut out = String::new();
    group(&mut out, "replicas", replicas);
    group(&mut out, "training jobs", training_jobs);
    group(&mut out, "kb shards", kb_shards);
    out
}
