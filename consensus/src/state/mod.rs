//! The replicated control-plane state: which nodes exist with which GPUs, which
//! deployments are wanted, and where each replica, training job and knowledge-base shard
//! is placed, with their lifecycle states.
//!
//! [`ClusterState`] changes only by [`Command`]s applied in raft log order, on every node
//! alike, so `apply` is a pure function of the state and the command: it reads no clock
//! (commands carry `at_ms`), draws no randomness, does no IO, and iterates only ordered
//! maps. A command is checked in full before anything changes, so a [`Rejection`] leaves
//! the state as it was.
//!
//! **Invariant SCH-1** (no GPU is promised more memory than it has): [`sch1_holds`] is the
//! predicate. `PlaceReplica` and `PutTrainingJob` refuse a promise that would break it,
//! after the reserve their proposer names; re-registering a node refuses to drop or shrink
//! a GPU below what is placed on it.
//!
//! **Referential integrity**: every replica, training job and shard names a node that
//! is in `nodes` (removing a node that holds work is refused), and every replica of a
//! live deployment was placed for one of its generations. A deleted deployment's replicas
//! stay, `Stopping`, until their node removes them.

mod apply;
mod command;
mod ids;
mod records;
mod rejection;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use command::{Applied, COMMAND_FORMAT_VERSION, COMMAND_FORMAT_VERSIONS_READ, Command, Effect};
pub use ids::{DeploymentId, JobId, NodeId, ReplicaId, ShardId};
pub use records::{
    DeploymentOwner, DeploymentRecord, DeploymentSpec, GpuRecord, HashRange, KbShardPlacement, KbShardRecord,
    KbShardState, LABEL_KEY_MAX_CHARS, LABEL_VALUE_MAX_CHARS, NodeRecord, NodeResources, NodeSpec, NodeStatus,
    PlacementStrategy, ReplicaPlacement, ReplicaRecord, ReplicaRequest, ReplicaState, ServingLimits,
    TrainingJobPlacement, TrainingJobRecord, TrainingJobState, label_key_is_valid,
};
pub use rejection::Rejection;
pub use snapshot::{SNAPSHOT_FORMAT_VERSION, SNAPSHOT_FORMAT_VERSIONS_READ};

/// The control plane of the cluster, as committed through raft.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    nodes: BTreeMap<NodeId, NodeRecord>,
    /// Ids of removed nodes: none of them may register again.
    removed_node_ids: BTreeSet<NodeId>,
    deployments: BTreeMap<DeploymentId, DeploymentRecord>,
    replicas: BTreeMap<ReplicaId, ReplicaRecord>,
    training_jobs: BTreeMap<JobId, TrainingJobRecord>,
    kb_shards: BTreeMap<ShardId, KbShardRecord>,
}

impl ClusterState {
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeRecord> {
        &self.nodes
    }

    pub fn node(&self, node_id: NodeId) -> Option<&NodeRecord> {
        self.nodes.get(&node_id)
    }

    /// Nodes whose status is `Alive`, in id order: those that may take new work.
    pub fn alive_nodes(&self) -> impl Iterator<Item = &NodeRecord> + '_ {
        self.nodes.values().filter(|node| node.status == NodeStatus::Alive)
    }

    pub fn removed_node_ids(&self) -> &BTreeSet<NodeId> {
        &self.removed_node_ids
    }

    pub fn deployments(&self) -> &BTreeMap<DeploymentId, DeploymentRecord> {
        &self.deployments
    }

    pub fn deployment(&self, deployment_id: &DeploymentId) -> Option<&DeploymentRecord> {
        self.deployments.get(deployment_id)
    }

    pub fn replicas(&self) -> &BTreeMap<ReplicaId, ReplicaRecord> {
        &self.replicas
    }

    pub fn replica(&self, replica_id: &ReplicaId) -> Option<&ReplicaRecord> {
        self.replicas.get(replica_id)
    }

    /// Replicas placed on a node, in replica id order, whatever their state.
    pub fn replicas_on_node(&self, node_id: NodeId) -> impl Iterator<Item = &ReplicaRecord> + '_ {
        self.replicas.values().filter(move |replica| replica.node_id == node_id)
    }

    /// Replicas of a deployment, in replica id order, whatever their state or generation.
    /// After a deployment is deleted, its `Stopping` replicas are still listed here.
    pub fn replicas_of_deployment<'a>(
        &'a self,
        deployment_id: &'a DeploymentId,
    ) -> impl Iterator<Item = &'a ReplicaRecord> + 'a {
        self.replicas.values().filter(move |replica| &replica.deployment_id == deployment_id)
    }

    pub fn training_jobs(&self) -> &BTreeMap<JobId, TrainingJobRecord> {
        &self.training_jobs
    }

    pub fn training_job(&self, job_id: &JobId) -> Option<&TrainingJobRecord> {
        self.training_jobs.get(job_id)
    }

    pub fn training_jobs_on_node(&self, node_id: NodeId) -> impl Iterator<Item = &TrainingJobRecord> + '_ {
        self.training_jobs.values().filter(move |job| job.node_id == node_id)
    }

    pub fn kb_shards(&self) -> &BTreeMap<ShardId, KbShardRecord> {
        &self.kb_shards
    }

    pub fn kb_shard(&self, shard_id: &ShardId) -> Option<&KbShardRecord> {
        self.kb_shards.get(shard_id)
    }

    pub fn kb_shards_on_node(&self, node_id: NodeId) -> impl Iterator<Item = &KbShardRecord> + '_ {
        self.kb_shards.values().filter(move |shard| shard.node_id == node_id)
    }

    /// Memory promised on one GPU: the sum over the replicas and training jobs placed on
    /// it, whatever their state (a `Stopping` or `Failed` replica holds its promise until
    /// it is removed). Saturates at `u64::MAX`.
    pub fn gpu_memory_placed_mib(&self, node_id: NodeId, gpu_index: u32) -> u64 {
        u64::try_from(self.gpu_memory_placed_exact_mib(node_id, gpu_index)).unwrap_or(u64::MAX)
    }

    /// Memory on one GPU held by what runs: replicas loading or ready, training jobs
    /// running. The rest of [`Self::gpu_memory_placed_mib`] is promised to work that has
    /// not started.
    pub fn gpu_memory_in_use_mib(&self, node_id: NodeId, gpu_index: u32) -> u64 {
        let replicas = self
            .replicas_on_node(node_id)
            .filter(|replica| matches!(replica.state, ReplicaState::Loading | ReplicaState::Ready))
            .filter(|replica| replica.gpu_indices.contains(&gpu_index))
            .map(|replica| replica.memory_per_gpu_mib);
        let jobs = self
            .training_jobs_on_node(node_id)
            .filter(|job| job.state == TrainingJobState::Running && job.gpu_indices.contains(&gpu_index))
            .map(|job| job.memory_per_gpu_mib);
        replicas.chain(jobs).fold(0, u64::saturating_add)
    }

    /// [`Self::gpu_memory_placed_mib`] without saturation, for the apply-time SCH-1 check.
    fn gpu_memory_placed_exact_mib(&self, node_id: NodeId, gpu_index: u32) -> u128 {
        self.gpu_holdings(node_id).filter(|(index, _)| *index == gpu_index).map(|(_, mib)| u128::from(mib)).sum()
    }

    /// Memory not yet promised on one GPU, before any reserve; `None` when the node or the
    /// GPU is unknown.
    pub fn free_gpu_memory_mib(&self, node_id: NodeId, gpu_index: u32) -> Option<u64> {
        let gpu = self.nodes.get(&node_id)?.resources.gpu(gpu_index)?;
        Some(gpu.memory_total_mib.saturating_sub(self.gpu_memory_placed_mib(node_id, gpu_index)))
    }

    /// Every `(gpu index, memory)` promise on a node, one per GPU of each replica and
    /// training job placed there.
    fn gpu_holdings(&self, node_id: NodeId) -> impl Iterator<Item = (u32, u64)> + '_ {
        let replicas = self
            .replicas
            .values()
            .filter(move |replica| replica.node_id == node_id)
            .flat_map(|replica| replica.gpu_indices.iter().map(|index| (*index, replica.memory_per_gpu_mib)));
        let jobs = self
            .training_jobs
            .values()
            .filter(move |job| job.node_id == node_id)
            .flat_map(|job| job.gpu_indices.iter().map(|index| (*index, job.memory_per_gpu_mib)));
        replicas.chain(jobs)
    }
}

impl crate::StateMachine for ClusterState {
    type Command = Command;
    type Response = Applied;
    type Rejection = Rejection;

    fn apply(&mut self, index: u64, command: Command) -> Result<Applied, Rejection> {
        let effect = self.apply_command(command)?;
        Ok(Applied { index, effect })
    }

    fn snapshot(&self) -> Vec<u8> {
        snapshot::encode(self)
    }

    fn restore(&mut self, snapshot: &[u8]) -> crate::Result<()> {
        *self = snapshot::decode(snapshot)?;
        Ok(())
    }
}

/// A GPU promised more memory than it has, or a promise on a GPU its node does not list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sch1Violation {
    pub node_id: NodeId,
    pub gpu_index: u32,
    pub placed_mib: u128,
    /// `None`: the node or the GPU is not in the state.
    pub memory_total_mib: Option<u64>,
}

impl fmt::Display for Sch1Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Sch1Violation { node_id, gpu_index, placed_mib, memory_total_mib } = self;
        match memory_total_mib {
            Some(total) => {
                write!(f, "SCH-1: gpu {gpu_index} on node {node_id} is promised {placed_mib} MiB of its {total} MiB")
            }
            None => {
                write!(f, "SCH-1: {placed_mib} MiB promised on gpu {gpu_index} of node {node_id}, which does not exist")
            }
        }
    }
}

/// Every breach of SCH-1 in the state, in node and GPU order; empty when it holds.
pub fn sch1_violations(state: &ClusterState) -> Vec<Sch1Violation> {
    let mut placed_by_gpu: BTreeMap<(NodeId, u32), u128> = BTreeMap::new();
    let replicas =
        state.replicas.values().map(|replica| (replica.node_id, &replica.gpu_indices, replica.memory_per_gpu_mib));
    let jobs = state.training_jobs.values().map(|job| (job.node_id, &job.gpu_indices, job.memory_per_gpu_mib));
    for (node_id, gpu_indices, memory_per_gpu_mib) in replicas.chain(jobs) {
        for gpu_index in gpu_indices {
            *placed_by_gpu.entry((node_id, *gpu_index)).or_default() += u128::from(memory_per_gpu_mib);
        }
    }
    placed_by_gpu
        .into_iter()
        .filter_map(|((node_id, gpu_index), placed_mib)| {
            let memory_total_mib = state
                .nodes
                .get(&node_id)
                .and_then(|node| node.resources.gpu(gpu_index))
                .map(|gpu| gpu.memory_total_mib);
            let holds = memory_total_mib.is_some_and(|total| placed_mib <= u128::from(total));
            (!holds).then_some(Sch1Violation { node_id, gpu_index, placed_mib, memory_total_mib })
        })
        .collect()
}

/// **SCH-1**: no GPU is promised more memory than it has, and no promise names a GPU
/// that does not exist. The reserve is the scheduler's configuration, so this checks the
/// hard bound; `PlaceReplica` also keeps the reserve its proposer names.
pub fn sch1_holds(state: &ClusterState) -> bool {
    sch1_violations(state).is_empty()
}
