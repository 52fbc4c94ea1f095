//! The scheduler's input and output types. The control plane converts its committed state
//! into these; they are plain data with no behaviour beyond small helpers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the cluster looks like now: its nodes and the replicas already placed on them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// Every known node; node ids are unique.
    pub nodes: Vec<NodeView>,
    /// Every replica placed so far; replica ids are unique.
    pub replicas: Vec<PlacedReplica>,
}

/// One node as the scheduler sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// The node's id, unique in the cluster.
    pub id: u64,
    /// Labels matched by node selectors.
    pub labels: BTreeMap<String, String>,
    /// Alive and not draining; unhealthy nodes get no placements and their replicas are
    /// replaced elsewhere.
    pub healthy: bool,
    /// Host CPU cores not yet used by anything.
    pub cpu_free_cores: u32,
    /// Host memory not yet used by anything, in MiB.
    pub memory_free_mib: u64,
    /// The node's GPUs; indices are unique on the node.
    pub gpus: Vec<GpuView>,
}

/// One GPU of a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuView {
    /// The device index on its node.
    pub index: u32,
    /// The model name, for humans.
    pub model: String,
    /// The device's total memory in MiB.
    pub memory_total_mib: u64,
    /// Memory kept back for the runtime and never promised to replicas, in MiB.
    pub reserve_mib: u64,
    /// Utilisation between 0 and 1.
    pub load: f32,
}

impl GpuView {
    /// The memory that may be promised to replicas: total minus reserve (SCH-1).
    pub fn promisable_mib(&self) -> u64 {
        self.memory_total_mib.saturating_sub(self.reserve_mib)
    }
}

/// A replica already placed on a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacedReplica {
    /// The replica's id, unique in the cluster.
    pub replica_id: String,
    /// The deployment it belongs to.
    pub deployment_id: String,
    /// The node it runs on.
    pub node_id: u64,
    /// The GPUs it holds on that node; empty for a CPU replica.
    pub gpu_indices: Vec<u32>,
    /// The memory it holds on each of its GPUs, in MiB.
    pub memory_per_gpu_mib: u64,
    /// Its deployment's priority; higher is more important.
    pub priority: i32,
    /// Whether a higher-priority deployment may stop it to make room.
    pub preemptible: bool,
}

/// What should be running.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// Every deployment the scheduler manages. A deployment absent from this list is left
    /// alone (its replicas are not stopped); give it `replicas: 0` to remove its replicas.
    pub deployments: Vec<DeploymentDemand>,
}

/// The desired state of one deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeploymentDemand {
    /// The deployment's id, unique in the demand.
    pub id: String,
    /// The desired number of replicas.
    pub replicas: u32,
    /// What each replica needs.
    pub request: ReplicaRequest,
    /// How replicas are spread over nodes.
    pub strategy: Strategy,
    /// Only nodes with every one of these labels (equal values) are eligible.
    pub node_selector: BTreeMap<String, String>,
    /// Higher is more important: planned first, and may preempt lower priorities.
    pub priority: i32,
    /// Whether this deployment may stop preemptible replicas of strictly lower priority.
    pub allow_preemption: bool,
}

/// The resources one replica needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaRequest {
    /// Tensor-parallel degree: the number of GPUs per replica; 0 means CPU only.
    pub gpus: u32,
    /// Memory needed on each of those GPUs, in MiB.
    pub memory_per_gpu_mib: u64,
    /// Host CPU cores needed on the node (checked for every placement, GPU or CPU).
    pub cpu_cores: u32,
    /// Host memory needed on the node, in MiB (checked for every placement, GPU or CPU).
    pub memory_mib: u64,
    /// Whether the replica may run on CPU when no GPU fits.
    pub allow_cpu_fallback: bool,
    /// Whether the replica's GPUs may span nodes (not supported yet: such a replica is
    /// still placed on one node when one fits, and reported unplaceable otherwise).
    pub allow_multi_node: bool,
}

/// How the replicas of one deployment are laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// Fewest GPUs and nodes touched: nodes already in use first, then best fit (the
    /// least free memory that still fits).
    #[default]
    Binpack,
    /// Replicas of one deployment on different nodes first, then best fit.
    Spread,
}

/// The scheduler's answer: actions to take, and what could not be placed and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Actions in the order they should be proposed: stops before the places that need
    /// their room.
    pub actions: Vec<Action>,
    /// Deployments left short of their desired replica count.
    pub unplaceable: Vec<Unplaceable>,
}

impl Plan {
    /// The `Place` actions of the plan.
    pub fn places(&self) -> impl Iterator<Item = (&str, u64, &[u32], u64)> {
        self.actions.iter().filter_map(|action| match action {
            Action::Place { deployment_id, node_id, gpu_indices, memory_per_gpu_mib } => {
                Some((deployment_id.as_str(), *node_id, gpu_indices.as_slice(), *memory_per_gpu_mib))
            }
            Action::Stop { .. } => None,
        })
    }

    /// The replica ids the plan stops.
    pub fn stops(&self) -> impl Iterator<Item = &str> {
        self.actions.iter().filter_map(|action| match action {
            Action::Stop { replica_id, .. } => Some(replica_id.as_str()),
            Action::Place { .. } => None,
        })
    }
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Start a new replica of a deployment on a node.
    Place {
        /// The deployment the new replica belongs to.
        deployment_id: String,
        /// The node to run it on.
        node_id: u64,
        /// The GPUs it holds, sorted; empty for a CPU replica.
        gpu_indices: Vec<u32>,
        /// The memory it holds on each of those GPUs, in MiB.
        memory_per_gpu_mib: u64,
    },
    /// Stop a replica (scale-down, unhealthy node, or preemption).
    Stop {
        /// The replica to stop.
        replica_id: String,
        /// Why, for humans.
        reason: String,
    },
}

/// A deployment the plan leaves short, with the reason and the closest miss.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaceable {
    /// The deployment left short.
    pub deployment_id: String,
    /// How many replicas are missing after this plan.
    pub missing_replicas: u32,
    /// Why, and what to do about it.
    pub reason: String,
    /// The node (and GPU) that came closest, if any node was eligible.
    pub closest: Option<Closest>,
}

/// The node (and GPU) that came closest to fitting a replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closest {
    /// The node.
    pub node_id: u64,
    /// The limiting GPU on that node; `None` when host memory was the limit.
    pub gpu_index: Option<u32>,
    /// The free memory there, in MiB.
    pub free_mib: u64,
    /// How much more memory the replica needs there, in MiB.
    pub short_by_mib: u64,
}
