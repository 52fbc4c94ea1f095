//! The commands that change [`ClusterState`](super::ClusterState), their wire format, and
//! what applying one reports.
//!
//! # Wire format
//!
//! A command is one JSON object: the format version `v`, the operation `op`, and the
//! operation's fields, for example
//! `{"v":1,"op":"set_node_status","node_id":3,"status":"dead","at_ms":1700000000000}`.
//! Decoding refuses an unknown version, an unknown `op`, a missing field and an unknown
//! field, each with a message that names it. The envelope is read through a
//! `serde_json::Value`, so commands need a self-describing format (the driver uses JSON).
//!
//! # Versions
//!
//! [`COMMAND_FORMAT_VERSION`] is the version this code writes. Commands live in the raft
//! log for as long as it is not compacted, so a node must read every version it or an
//! older node may have written. When a change to [`Command`] cannot be made by adding a
//! field with a `#[serde(default)]` (renaming or removing an op or a field, changing a
//! field's meaning), the format becomes version 2:
//!
//! 1. copy today's `Command` into a frozen module `v1` (a private `enum Command` with the
//!    same serde attributes) and never change it again;
//! 2. change [`Command`] and set [`COMMAND_FORMAT_VERSION`] to 2;
//! 3. write `impl From<v1::Command> for Command`, the migration, and add `1 =>` to the
//!    match in `Command`'s `Deserialize`: decode as `v1::Command`, then convert;
//! 4. add a golden v2 fixture beside the v1 one in `tests/state.rs`; keep the v1 fixture.
//!
//! A rolling upgrade must not propose v2 commands until every node reads them: the leader
//! keeps writing v1 while any voter runs older code.
//!
//! Adding an op (as `set_node_labels` was) keeps version 1: every old command still
//! decodes. But a node running older code cannot decode the new op; the raft core logs
//! the entry and skips it, so that node's state would drift from the others'. The same
//! rule holds: do not propose a new op until every voter runs code that reads it.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::Error as _;
use serde::ser::{Error as _, SerializeMap as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ids::{DeploymentId, JobId, NodeId, ReplicaId, ShardId};
use super::records::{
    DeploymentSpec, KbShardPlacement, KbShardState, NodeSpec, NodeStatus, ReplicaPlacement, ReplicaState,
    TrainingJobPlacement, TrainingJobState,
};

/// The command format version this code writes.
pub const COMMAND_FORMAT_VERSION: u64 = 1;

/// Command format versions this code reads.
pub const COMMAND_FORMAT_VERSIONS_READ: &[u64] = &[1];

/// A change to the control plane, committed through raft and applied on every node.
/// `at_ms` is the proposer's clock when it proposed the command; `apply` reads no clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// `remote = "Self"` makes the derives inherent functions, which the trait impls below
// wrap with the version envelope.
#[serde(remote = "Self", tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Adds a node, or updates the description (addresses, labels, resources, name) of a
    /// registered one: a restarted node registers again. Its status is left to the
    /// failure detector ([`Command::SetNodeStatus`]); a new node starts `Alive`. For a
    /// registered node the labels it carries are merged into the node's labels (they win
    /// on the same keys), so labels set by [`Command::SetNodeLabels`] survive restarts;
    /// removing a label takes [`Command::SetNodeLabels`].
    RegisterNode {
        node: NodeSpec,
        at_ms: u64,
    },
    /// Records a node's liveness. Entering `Dead` counts a dead declaration; `Left` is
    /// final. Work on a node that is no longer alive stays placed until the scheduler moves
    /// it.
    SetNodeStatus {
        node_id: NodeId,
        status: NodeStatus,
        at_ms: u64,
    },
    /// Merges `set` into a node's labels and deletes the keys in `remove`, in one step;
    /// the node's other labels stay. It is a merge, not a replace, so that operators
    /// labelling the same node from different clients do not undo each other's keys.
    /// Removing a key the node lacks is fine; a key in both `set` and `remove` is refused.
    /// A key is 1 to 63 ASCII letters, digits, `-`, `_`, `.` or `/`, and a value at most
    /// 253 characters; a key the node already carries may be removed whatever its form.
    /// A node that left cannot be relabelled.
    ///
    /// Only the labels change: not the status, the resources or the addresses. Existing
    /// work is not moved by a relabel: node selectors are checked when a replica is placed
    /// ([`Command::PlaceReplica`]), not again for placed replicas; whether a replica that
    /// no longer matches should move is the scheduler's decision.
    SetNodeLabels {
        node_id: NodeId,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        remove: BTreeSet<String>,
        at_ms: u64,
    },
    /// Deletes a node that holds no work; its id can never register again.
    RemoveNode {
        node_id: NodeId,
        at_ms: u64,
    },
    /// Creates a deployment, or updates its spec and replica count (a changed spec is a
    /// new generation).
    PutDeployment {
        deployment_id: DeploymentId,
        spec: DeploymentSpec,
        replicas: u32,
        at_ms: u64,
    },
    /// Changes a deployment's desired replica count; not a new generation.
    ScaleDeployment {
        deployment_id: DeploymentId,
        replicas: u32,
        at_ms: u64,
    },
    /// Deletes a deployment; its replicas become `Stopping`, for their nodes to stop and
    /// then remove.
    DeleteDeployment {
        deployment_id: DeploymentId,
        at_ms: u64,
    },
    /// Places a new replica, `Pending`. Rejected unless the node is alive, the GPUs exist,
    /// and each GPU keeps `gpu_reserve_mib` free after the promise (SCH-1).
    PlaceReplica {
        placement: ReplicaPlacement,
        /// Memory kept free on every GPU: the scheduler's configured reserve. The state
        /// machine holds no configuration, so the proposer says it (0 when absent).
        #[serde(default)]
        gpu_reserve_mib: u64,
        at_ms: u64,
    },
    /// Records a replica's lifecycle state, as its node reports it.
    SetReplicaState {
        replica_id: ReplicaId,
        state: ReplicaState,
        at_ms: u64,
    },
    /// Deletes a replica and the memory it was promised.
    RemoveReplica {
        replica_id: ReplicaId,
        at_ms: u64,
    },
    /// Creates a training job (`Pending`) or updates one; moving it to other GPUs or
    /// another node makes it `Pending` again there. GPU memory is checked as for
    /// [`Command::PlaceReplica`].
    PutTrainingJob {
        placement: TrainingJobPlacement,
        #[serde(default)]
        gpu_reserve_mib: u64,
        at_ms: u64,
    },
    SetTrainingJobState {
        job_id: JobId,
        state: TrainingJobState,
        at_ms: u64,
    },
    RemoveTrainingJob {
        job_id: JobId,
        at_ms: u64,
    },
    /// Creates a knowledge-base shard (`Pending`) or updates one; moving it to another
    /// node makes it `Pending` again there.
    PutKbShard {
        placement: KbShardPlacement,
        at_ms: u64,
    },
    /// Places a new knowledge base's shards, all of them at once, if it has none yet: the
    /// first placement of a knowledge base wins, and a later one (another node placed it
    /// meanwhile) changes nothing.
    PlaceKbShards {
        knowledge_base_id: String,
        placements: Vec<KbShardPlacement>,
        at_ms: u64,
    },
    SetKbShardState {
        shard_id: ShardId,
        state: KbShardState,
        at_ms: u64,
    },
    RemoveKbShard {
        shard_id: ShardId,
        at_ms: u64,
    },
}

impl Command {
    /// The operation's name on the wire (`register_node`, ...).
    pub fn op(&self) -> &'static str {
        match self {
            Command::RegisterNode { .. } => "register_node",
            Command::SetNodeStatus { .. } => "set_node_status",
            Command::SetNodeLabels { .. } => "set_node_labels",
            Command::RemoveNode { .. } => "remove_node",
            Command::PutDeployment { .. } => "put_deployment",
            Command::ScaleDeployment { .. } => "scale_deployment",
            Command::DeleteDeployment { .. } => "delete_deployment",
            Command::PlaceReplica { .. } => "place_replica",
            Command::SetReplicaState { .. } => "set_replica_state",
            Command::RemoveReplica { .. } => "remove_replica",
            Command::PutTrainingJob { .. } => "put_training_job",
            Command::SetTrainingJobState { .. } => "set_training_job_state",
            Command::RemoveTrainingJob { .. } => "remove_training_job",
            Command::PutKbShard { .. } => "put_kb_shard",
            Command::PlaceKbShards { .. } => "place_kb_shards",
            Command::SetKbShardState { .. } => "set_kb_shard_state",
            Command::RemoveKbShard { .. } => "remove_kb_shard",
        }
    }

    /// Encodes the command in the current format version.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command always encodes as json")
    }

    /// Decodes a command of any version this code reads.
    pub fn from_json(bytes: &[u8]) -> crate::Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|error| crate::ConsensusError::Codec { what: "control-plane command", reason: error.to_string() })
    }
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The op's fields go through a JSON value so that `v` can sit beside them; `v`
        // and `op` are written first, for whoever reads a log by eye.
        let value = Command::serialize(self, serde_json::value::Serializer).map_err(S::Error::custom)?;
        let serde_json::Value::Object(mut fields) = value else {
            return Err(S::Error::custom("a command must encode as an object"));
        };
        let op = fields.remove("op").ok_or_else(|| S::Error::custom("a command must encode with its `op`"))?;
        let mut envelope = serializer.serialize_map(Some(fields.len() + 2))?;
        envelope.serialize_entry("v", &COMMAND_FORMAT_VERSION)?;
        envelope.serialize_entry("op", &op)?;
        for (name, field) in &fields {
            envelope.serialize_entry(name, field)?;
        }
        envelope.end()
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let serde_json::Value::Object(mut fields) = value else {
            return Err(D::Error::custom("a command must be a json object with `v` and `op`"));
        };
        let version = fields.remove("v").ok_or_else(|| D::Error::custom("the command has no format version `v`"))?;
        match version.as_u64() {
            Some(1) => Command::deserialize(serde_json::Value::Object(fields)).map_err(D::Error::custom),
            Some(other) => Err(D::Error::custom(format!(
                "unknown command format version {other}: this node reads versions {COMMAND_FORMAT_VERSIONS_READ:?}; \
                 upgrade it"
            ))),
            None => Err(D::Error::custom(format!("the command format version `v` must be an integer, not {version}"))),
        }
    }
}

/// What a committed command did; the driver hands it back to the proposer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The raft index the command was committed at.
    pub index: u64,
    pub effect: Effect,
}

/// The change a command made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The command asked for what already held (a repeated registration, a status that
    /// was already set): accepted, nothing changed.
    Unchanged,
    NodeRegistered {
        node_id: NodeId,
    },
    NodeUpdated {
        node_id: NodeId,
    },
    NodeStatusChanged {
        node_id: NodeId,
        from: NodeStatus,
        to: NodeStatus,
    },
    /// A [`Command::SetNodeLabels`] added, changed or removed at least one label.
    NodeLabelsChanged {
        node_id: NodeId,
    },
    NodeRemoved {
        node_id: NodeId,
    },
    DeploymentCreated {
        deployment_id: DeploymentId,
        generation: u64,
    },
    /// The spec or the replica count changed; `generation` is the deployment's generation now.
    DeploymentUpdated {
        deployment_id: DeploymentId,
        generation: u64,
    },
    DeploymentScaled {
        deployment_id: DeploymentId,
        from: u32,
        to: u32,
    },
    /// The deployment is gone; these replicas of it became `Stopping`.
    DeploymentDeleted {
        deployment_id: DeploymentId,
        stopping_replicas: Vec<ReplicaId>,
    },
    ReplicaPlaced {
        replica_id: ReplicaId,
    },
    ReplicaStateChanged {
        replica_id: ReplicaId,
        from: ReplicaState,
        to: ReplicaState,
    },
    ReplicaRemoved {
        replica_id: ReplicaId,
    },
    TrainingJobCreated {
        job_id: JobId,
    },
    TrainingJobUpdated {
        job_id: JobId,
    },
    TrainingJobStateChanged {
        job_id: JobId,
        from: TrainingJobState,
        to: TrainingJobState,
    },
    TrainingJobRemoved {
        job_id: JobId,
    },
    KbShardCreated {
        shard_id: ShardId,
    },
    KbShardUpdated {
        shard_id: ShardId,
    },
    /// A knowledge base's first shards, in the order they were asked for.
    KbShardsPlaced {
        knowledge_base_id: String,
        shard_ids: Vec<ShardId>,
    },
    KbShardStateChanged {
        shard_id: ShardId,
        from: KbShardState,
        to: KbShardState,
    },
    KbShardRemoved {
        shard_id: ShardId,
    },
}
