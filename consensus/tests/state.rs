//! The control-plane state machine through its public API: a table of commands with the
//! outcome each must have (every rejection path, each leaving the state untouched),
//! lifecycle rules, proptests over random command sequences (determinism, rejections
//! change nothing, snapshots round-trip, SCH-1 after every step), and golden v1 fixtures
//! of the persisted command and snapshot formats.

use std::collections::{BTreeMap, BTreeSet};

use maas_consensus::StateMachine;
use maas_consensus::state::{
    Applied, COMMAND_FORMAT_VERSION, ClusterState, Command, DeploymentId, DeploymentSpec, Effect, GpuRecord, HashRange,
    JobId, KbShardPlacement, KbShardState, LABEL_KEY_MAX_CHARS, LABEL_VALUE_MAX_CHARS, NodeId, NodeResources, NodeSpec,
    NodeStatus, PlacementStrategy, Rejection, ReplicaId, ReplicaPlacement, ReplicaRequest, ReplicaState,
    SNAPSHOT_FORMAT_VERSION, ShardId, TrainingJobPlacement, TrainingJobState, label_key_is_valid, sch1_holds,
    sch1_violations,
};
use proptest::prelude::*;

// Builders.

fn gpu(index: u32, memory_total_mib: u64) -> GpuRecord {
    GpuRecord { index, model: "NVIDIA A100".to_owned(), memory_total_mib, simulated: true }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
}

fn node_spec(id: u64, name: &str, gpus: Vec<GpuRecord>) -> NodeSpec {
    NodeSpec {
        id: NodeId(id),
        name: name.to_owned(),
        api_addr: format!("10.0.0.{id}:8080"),
        cluster_addr: format!("10.0.0.{id}:7070"),
        labels: BTreeMap::new(),
        resources: NodeResources { cpu_cores: 32, memory_mib: 256_000, gpus },
    }
}

fn register(node: NodeSpec) -> Command {
    Command::RegisterNode { node, at_ms: 1_000 }
}

fn set_status(node_id: u64, status: NodeStatus) -> Command {
    Command::SetNodeStatus { node_id: NodeId(node_id), status, at_ms: 2_000 }
}

fn set_labels(node_id: u64, set: &[(&str, &str)], remove: &[&str]) -> Command {
    Command::SetNodeLabels {
        node_id: NodeId(node_id),
        set: labels(set),
        remove: remove.iter().map(|key| (*key).to_owned()).collect(),
        at_ms: 2_500,
    }
}

fn deployment_spec(gpus_per_replica: u32, memory_per_gpu_mib: u64, cpu_fallback_allowed: bool) -> DeploymentSpec {
    DeploymentSpec {
        serving: None,
        model_name: "llama-3-8b".to_owned(),
        model_version: "v1".to_owned(),
        model_path: None,
        request: ReplicaRequest { gpus_per_replica, memory_per_gpu_mib, cpu_fallback_allowed },
        strategy: PlacementStrategy::Binpack,
        node_selector: BTreeMap::new(),
        priority: 0,
        allow_preemption: false,
        owner: None,
        tenant_model: false,
    }
}

fn put_deployment(id: &str, spec: DeploymentSpec, replicas: u32) -> Command {
    Command::PutDeployment { deployment_id: DeploymentId::from(id), spec, replicas, at_ms: 3_000 }
}

fn place(
    replica: &str,
    deployment: &str,
    generation: u64,
    node: u64,
    gpus: &[u32],
    memory_per_gpu_mib: u64,
) -> Command {
    place_with_reserve(replica, deployment, generation, node, gpus, memory_per_gpu_mib, 0)
}

fn place_with_reserve(
    replica: &str,
    deployment: &str,
    generation: u64,
    node: u64,
    gpus: &[u32],
    memory_per_gpu_mib: u64,
    gpu_reserve_mib: u64,
) -> Command {
    Command::PlaceReplica {
        placement: ReplicaPlacement {
            replica_id: ReplicaId::from(replica),
            deployment_id: DeploymentId::from(deployment),
            deployment_generation: generation,
            node_id: NodeId(node),
            gpu_indices: gpus.to_vec(),
            memory_per_gpu_mib,
        },
        gpu_reserve_mib,
        at_ms: 4_000,
    }
}

fn set_replica(replica: &str, state: ReplicaState) -> Command {
    Command::SetReplicaState { replica_id: ReplicaId::from(replica), state, at_ms: 5_000 }
}

fn put_job(job: &str, node: u64, gpus: &[u32], memory_per_gpu_mib: u64) -> Command {
    Command::PutTrainingJob {
        placement: TrainingJobPlacement {
            job_id: JobId::from(job),
            base_model: "llama-3-8b@v1".to_owned(),
            node_id: NodeId(node),
            gpu_indices: gpus.to_vec(),
            memory_per_gpu_mib,
        },
        gpu_reserve_mib: 0,
        at_ms: 6_000,
    }
}

fn set_job(job: &str, state: TrainingJobState) -> Command {
    Command::SetTrainingJobState { job_id: JobId::from(job), state, at_ms: 7_000 }
}

fn put_shard(shard: &str, knowledge_base: &str, start: u64, end_inclusive: u64, node: u64) -> Command {
    Command::PutKbShard {
        placement: KbShardPlacement {
            shard_id: ShardId::from(shard),
            knowledge_base_id: knowledge_base.to_owned(),
            hash_range: HashRange { start, end_inclusive },
            node_id: NodeId(node),
        },
        at_ms: 8_000,
    }
}

fn place_shards(knowledge_base: &str, shards: &[(&str, u64, u64, u64)]) -> Command {
    Command::PlaceKbShards {
        knowledge_base_id: knowledge_base.to_owned(),
        placements: shards
            .iter()
            .map(|&(shard, start, end_inclusive, node)| KbShardPlacement {
                shard_id: ShardId::from(shard),
                knowledge_base_id: knowledge_base.to_owned(),
                hash_range: HashRange { start, end_inclusive },
                node_id: NodeId(node),
            })
            .collect(),
        at_ms: 8_000,
    }
}

fn set_shard(shard: &str, state: KbShardState) -> Command {
    Command::SetKbShardState { shard_id: ShardId::from(shard), state, at_ms: 9_000 }
}

/// Applies commands that must all be accepted, at indices 1, 2, ...
fn build(commands: Vec<Command>) -> ClusterState {
    let mut state = ClusterState::default();
    for (position, command) in commands.into_iter().enumerate() {
        let description = format!("{command:?}");
        if let Err(rejection) = state.apply(position as u64 + 1, command) {
            panic!("setup command {description} was rejected: {rejection}");
        }
    }
    state
}

/// The state every table case starts from:
/// - node 1 `gpu-a` (zone=a): gpu 0 and gpu 1, 24000 MiB each; replica `chat-0` holds
///   16000 MiB of gpu 0; shard `kb1-0` serves there;
/// - node 2 `gpu-b`: gpu 0, 80000 MiB; replica `chat-1` (stopping) holds 16000 MiB and
///   job `ft-1` (running) 40000 MiB of it; job `ft-done` (succeeded, on cpu) and shard
///   `kb1-old` (stopping) live there too;
/// - node 3 `cpu-c`: no gpus, suspect; node 4 `left-d`: left; node 5: removed;
/// - deployment `chat` (1 gpu x 16000 MiB, cpu fallback, generation 1) and `pair`
///   (2 gpus x 8000 MiB, selects zone=a, generation 1).
fn base_state() -> ClusterState {
    let mut node_a = node_spec(1, "gpu-a", vec![gpu(0, 24_000), gpu(1, 24_000)]);
    node_a.labels = labels(&[("zone", "a")]);
    let mut pair = deployment_spec(2, 8_000, false);
    pair.node_selector = labels(&[("zone", "a")]);
    build(vec![
        register(node_a),
        register(node_spec(2, "gpu-b", vec![gpu(0, 80_000)])),
        register(node_spec(3, "cpu-c", vec![])),
        set_status(3, NodeStatus::Suspect),
        register(node_spec(4, "left-d", vec![])),
        set_status(4, NodeStatus::Left),
        register(node_spec(5, "gone-e", vec![])),
        Command::RemoveNode { node_id: NodeId(5), at_ms: 1_500 },
        put_deployment("chat", deployment_spec(1, 16_000, true), 2),
        put_deployment("pair", pair, 1),
        place("chat-0", "chat", 1, 1, &[0], 16_000),
        set_replica("chat-0", ReplicaState::Ready),
        place("chat-1", "chat", 1, 2, &[0], 16_000),
        set_replica("chat-1", ReplicaState::Stopping),
        put_job("ft-1", 2, &[0], 40_000),
        set_job("ft-1", TrainingJobState::Running),
        put_job("ft-done", 2, &[], 0),
        set_job("ft-done", TrainingJobState::Succeeded),
        put_shard("kb1-0", "kb1", 0, u64::MAX, 1),
        set_shard("kb1-0", KbShardState::Serving),
        put_shard("kb1-old", "kb1", 0, u64::MAX / 2, 2),
        set_shard("kb1-old", KbShardState::Stopping),
    ])
}

// The table.

enum Expect {
    Accepted(Effect),
    Rejected(&'static str),
}

struct Case {
    name: &'static str,
    command: Command,
    expect: Expect,
}

fn case(name: &'static str, command: Command, expect: Expect) -> Case {
    Case { name, command, expect }
}

use Expect::{Accepted, Rejected};

#[allow(clippy::too_many_lines, reason = "a table: one entry per case reads best in one place")]
fn cases() -> Vec<Case> {
    let node_id = NodeId;
    let replica_id = ReplicaId::from;
    let deployment_id = DeploymentId::from;
    let job_id = JobId::from;
    let shard_id = ShardId::from;
    let node_a_gpus = || vec![gpu(0, 24_000), gpu(1, 24_000)];
    let relabelled_a = NodeSpec { labels: labels(&[("zone", "b")]), ..node_spec(1, "gpu-a", node_a_gpus()) };
    let same_a = NodeSpec { labels: labels(&[("zone", "a")]), ..node_spec(1, "gpu-a", node_a_gpus()) };
    let chat_spec = || deployment_spec(1, 16_000, true);
    let chat_v2 = DeploymentSpec { model_version: "v2".to_owned(), ..chat_spec() };
    let no_model = DeploymentSpec { model_name: String::new(), ..chat_spec() };
    let no_version = DeploymentSpec { model_version: " ".to_owned(), ..chat_spec() };
    let failed = || ReplicaState::Failed { reason: "cuda out of memory".to_owned() };
    // Label limits at and just past their bounds; a value counts characters, not bytes.
    let longest_key = "k".repeat(LABEL_KEY_MAX_CHARS);
    let too_long_key = "k".repeat(LABEL_KEY_MAX_CHARS + 1);
    let too_long_key_message: &'static str =
        format!("label key {too_long_key:?} for node 1 must be 1 to 63 ascii letters, digits, `-`, `_`, `.` or `/`")
            .leak();
    let longest_value = "é".repeat(LABEL_VALUE_MAX_CHARS);
    let too_long_value = "v".repeat(LABEL_VALUE_MAX_CHARS + 1);
    let mut empty_base_model = put_job("ft-2", 1, &[1], 1_000);
    if let Command::PutTrainingJob { placement, .. } = &mut empty_base_model {
        placement.base_model = String::new();
    }

    vec![
        // RegisterNode.
        case(
            "a new node registers alive",
            register(node_spec(6, "gpu-f", vec![gpu(0, 48_000)])),
            Accepted(Effect::NodeRegistered { node_id: node_id(6) }),
        ),
        case("registering the same description again changes nothing", register(same_a), Accepted(Effect::Unchanged)),
        case(
            "a restarted node updates its description",
            register(relabelled_a),
            Accepted(Effect::NodeUpdated { node_id: node_id(1) }),
        ),
        case(
            "the name of a node that left is free again",
            register(node_spec(7, "left-d", vec![])),
            Accepted(Effect::NodeRegistered { node_id: node_id(7) }),
        ),
        case(
            "a removed node cannot rejoin with its id",
            register(node_spec(5, "gone-e", vec![])),
            Rejected(
                "node 5 was removed from the cluster; its id cannot be used again, so register the node under a new id",
            ),
        ),
        case(
            "a node that left cannot rejoin with its id",
            register(node_spec(4, "left-d", vec![])),
            Rejected("node 4 has left the cluster and cannot rejoin with the same id; register it under a new id"),
        ),
        case("a node needs a name", register(node_spec(6, " ", vec![])), Rejected("node 6 must have a name")),
        case(
            "a node lists each gpu once",
            register(node_spec(6, "gpu-f", vec![gpu(0, 1_000), gpu(0, 1_000)])),
            Rejected("node 6 lists gpu 0 more than once"),
        ),
        case(
            "another node cannot take a name in use",
            register(node_spec(6, "gpu-b", vec![])),
            Rejected("node name \"gpu-b\" is already taken by node 2"),
        ),
        case(
            "a registration cannot drop a gpu that holds work",
            register(node_spec(1, "gpu-a", vec![gpu(1, 24_000)])),
            Rejected(
                "registering node 1 again would drop gpu 0, which holds 16000 MiB of placed work; move that work first",
            ),
        ),
        case(
            "a registration cannot shrink a gpu below its placed work",
            register(node_spec(2, "gpu-b", vec![gpu(0, 50_000)])),
            Rejected(
                "registering node 2 again would shrink gpu 0 to 50000 MiB, below the 56000 MiB placed on it; move \
                 that work first",
            ),
        ),
        // SetNodeStatus.
        case(
            "an alive node is declared dead",
            set_status(1, NodeStatus::Dead),
            Accepted(Effect::NodeStatusChanged { node_id: node_id(1), from: NodeStatus::Alive, to: NodeStatus::Dead }),
        ),
        case(
            "setting the status a node has changes nothing",
            set_status(3, NodeStatus::Suspect),
            Accepted(Effect::Unchanged),
        ),
        case(
            "a node that left may be said to have left again",
            set_status(4, NodeStatus::Left),
            Accepted(Effect::Unchanged),
        ),
        case(
            "status of an unknown node",
            set_status(9, NodeStatus::Dead),
            Rejected("node 9 is not a member of the cluster"),
        ),
        case(
            "status of a removed node",
            set_status(5, NodeStatus::Alive),
            Rejected(
                "node 5 was removed from the cluster; its id cannot be used again, so register the node under a new id",
            ),
        ),
        case(
            "a node that left stays left",
            set_status(4, NodeStatus::Alive),
            Rejected("node 4 has left the cluster; its status cannot change"),
        ),
        // SetNodeLabels.
        case(
            "labels are set and removed in one step",
            set_labels(1, &[("gpu", "a100"), ("example.com/rack_2", "r-2.b")], &["zone"]),
            Accepted(Effect::NodeLabelsChanged { node_id: node_id(1) }),
        ),
        case(
            "a label changes its value",
            set_labels(1, &[("zone", "b")], &[]),
            Accepted(Effect::NodeLabelsChanged { node_id: node_id(1) }),
        ),
        case(
            "a node that is not alive may be labelled",
            set_labels(3, &[("zone", "c")], &[]),
            Accepted(Effect::NodeLabelsChanged { node_id: node_id(3) }),
        ),
        case(
            "a key of the longest length and a value of the longest length in characters",
            set_labels(2, &[(longest_key.as_str(), longest_value.as_str())], &[]),
            Accepted(Effect::NodeLabelsChanged { node_id: node_id(2) }),
        ),
        case(
            "labels the node already has, and removing one it lacks, change nothing",
            set_labels(1, &[("zone", "a")], &["rack"]),
            Accepted(Effect::Unchanged),
        ),
        case("an empty relabel changes nothing", set_labels(2, &[], &[]), Accepted(Effect::Unchanged)),
        case(
            "labels of an unknown node",
            set_labels(9, &[("zone", "a")], &[]),
            Rejected("node 9 is not a member of the cluster"),
        ),
        case(
            "labels of a removed node",
            set_labels(5, &[("zone", "a")], &[]),
            Rejected(
                "node 5 was removed from the cluster; its id cannot be used again, so register the node under a new id",
            ),
        ),
        case(
            "a node that left keeps its labels",
            set_labels(4, &[], &["zone"]),
            Rejected("node 4 has left the cluster; its labels cannot change"),
        ),
        case(
            "a label is either set or removed",
            set_labels(1, &[("gpu", "a100"), ("zone", "b")], &["rack", "zone"]),
            Rejected("label \"zone\" is both set and removed on node 1; send it in one of `set` or `remove`"),
        ),
        case(
            "a label key must not be empty",
            set_labels(1, &[("", "x")], &[]),
            Rejected("label key \"\" for node 1 must be 1 to 63 ascii letters, digits, `-`, `_`, `.` or `/`"),
        ),
        case(
            "a label key is one word",
            set_labels(1, &[("gpu type", "a100")], &[]),
            Rejected("label key \"gpu type\" for node 1 must be 1 to 63 ascii letters, digits, `-`, `_`, `.` or `/`"),
        ),
        case(
            "a label key is ascii",
            set_labels(1, &[("zoné", "a")], &[]),
            Rejected("label key \"zoné\" for node 1 must be 1 to 63 ascii letters, digits, `-`, `_`, `.` or `/`"),
        ),
        case(
            "a label key is at most 63 characters",
            set_labels(1, &[(too_long_key.as_str(), "x")], &[]),
            Rejected(too_long_key_message),
        ),
        case(
            "a label key to remove must be well formed too",
            set_labels(1, &[], &["no such key"]),
            Rejected(
                "label key \"no such key\" for node 1 must be 1 to 63 ascii letters, digits, `-`, `_`, `.` or `/`",
            ),
        ),
        case(
            "a label value is at most 253 characters",
            set_labels(1, &[("note", too_long_value.as_str())], &[]),
            Rejected("the value of label \"note\" for node 1 is 254 characters long; at most 253 are allowed"),
        ),
        // RemoveNode.
        case(
            "a node without work is removed",
            Command::RemoveNode { node_id: node_id(3), at_ms: 9_500 },
            Accepted(Effect::NodeRemoved { node_id: node_id(3) }),
        ),
        case(
            "removing an unknown node",
            Command::RemoveNode { node_id: node_id(9), at_ms: 9_500 },
            Rejected("node 9 is not a member of the cluster"),
        ),
        case(
            "removing a node twice",
            Command::RemoveNode { node_id: node_id(5), at_ms: 9_500 },
            Rejected(
                "node 5 was removed from the cluster; its id cannot be used again, so register the node under a new id",
            ),
        ),
        case(
            "a node that holds work is not removed",
            Command::RemoveNode { node_id: node_id(2), at_ms: 9_500 },
            Rejected(
                "node 2 still holds work (replicas chat-1; training jobs ft-1, ft-done; kb shards kb1-old); move it to \
                 other nodes first",
            ),
        ),
        // PutDeployment.
        case(
            "a new deployment starts at generation 1",
            put_deployment("embed", deployment_spec(0, 0, false), 1),
            Accepted(Effect::DeploymentCreated { deployment_id: deployment_id("embed"), generation: 1 }),
        ),
        case(
            "putting the same deployment again changes nothing",
            put_deployment("chat", deployment_spec(1, 16_000, true), 2),
            Accepted(Effect::Unchanged),
        ),
        case(
            "a new spec is a new generation",
            put_deployment("chat", chat_v2, 2),
            Accepted(Effect::DeploymentUpdated { deployment_id: deployment_id("chat"), generation: 2 }),
        ),
        case(
            "a new replica count through put keeps the generation",
            put_deployment("chat", deployment_spec(1, 16_000, true), 5),
            Accepted(Effect::DeploymentUpdated { deployment_id: deployment_id("chat"), generation: 1 }),
        ),
        case(
            "a deployment needs an id",
            put_deployment("", deployment_spec(1, 16_000, true), 1),
            Rejected("deployment id must not be empty"),
        ),
        case(
            "a deployment needs a model name",
            put_deployment("chat", no_model, 1),
            Rejected("deployment chat is invalid: the model name is empty"),
        ),
        case(
            "a deployment needs a model version",
            put_deployment("chat", no_version, 1),
            Rejected("deployment chat is invalid: the model version is empty"),
        ),
        case(
            "a gpu deployment needs gpu memory",
            put_deployment("chat", deployment_spec(2, 0, false), 1),
            Rejected(
                "deployment chat is invalid: it asks for 2 gpus per replica and 0 MiB on each; set memory_per_gpu_mib",
            ),
        ),
        // ScaleDeployment and DeleteDeployment.
        case(
            "scaling changes the replica count",
            Command::ScaleDeployment { deployment_id: deployment_id("chat"), replicas: 4, at_ms: 9_600 },
            Accepted(Effect::DeploymentScaled { deployment_id: deployment_id("chat"), from: 2, to: 4 }),
        ),
        case(
            "scaling to the same count changes nothing",
            Command::ScaleDeployment { deployment_id: deployment_id("chat"), replicas: 2, at_ms: 9_600 },
            Accepted(Effect::Unchanged),
        ),
        case(
            "scaling an unknown deployment",
            Command::ScaleDeployment { deployment_id: deployment_id("nope"), replicas: 1, at_ms: 9_600 },
            Rejected("deployment nope does not exist"),
        ),
        case(
            "deleting a deployment stops its replicas",
            Command::DeleteDeployment { deployment_id: deployment_id("chat"), at_ms: 9_700 },
            Accepted(Effect::DeploymentDeleted {
                deployment_id: deployment_id("chat"),
                stopping_replicas: vec![replica_id("chat-0")],
            }),
        ),
        case(
            "deleting an unknown deployment",
            Command::DeleteDeployment { deployment_id: deployment_id("nope"), at_ms: 9_700 },
            Rejected("deployment nope does not exist"),
        ),
        // PlaceReplica.
        case(
            "a replica is placed on a gpu with room",
            place("chat-2", "chat", 1, 1, &[1], 16_000),
            Accepted(Effect::ReplicaPlaced { replica_id: replica_id("chat-2") }),
        ),
        case(
            "a replica fills a gpu exactly",
            place_with_reserve("chat-2", "chat", 1, 1, &[0], 6_000, 2_000),
            Accepted(Effect::ReplicaPlaced { replica_id: replica_id("chat-2") }),
        ),
        case(
            "a replica falls back to cpu where its deployment allows it",
            place("chat-2", "chat", 1, 1, &[], 16_000),
            Accepted(Effect::ReplicaPlaced { replica_id: replica_id("chat-2") }),
        ),
        case(
            "a replica takes all its gpus on one node",
            place("pair-0", "pair", 1, 1, &[0, 1], 8_000),
            Accepted(Effect::ReplicaPlaced { replica_id: replica_id("pair-0") }),
        ),
        case("a replica needs an id", place("", "chat", 1, 1, &[1], 16_000), Rejected("replica id must not be empty")),
        case(
            "a replica id is used once",
            place("chat-0", "chat", 1, 1, &[1], 16_000),
            Rejected("replica chat-0 already exists"),
        ),
        case(
            "a replica of an unknown deployment",
            place("x-0", "nope", 1, 1, &[1], 16_000),
            Rejected("deployment nope does not exist"),
        ),
        case(
            "a replica for an old generation",
            place("chat-2", "chat", 0, 1, &[1], 16_000),
            Rejected("replica chat-2 is for generation 0 of deployment chat, which is at generation 1; plan it again"),
        ),
        case(
            "a replica on an unknown node",
            place("chat-2", "chat", 1, 9, &[0], 16_000),
            Rejected("node 9 is not a member of the cluster"),
        ),
        case(
            "a replica on a removed node",
            place("chat-2", "chat", 1, 5, &[], 16_000),
            Rejected(
                "node 5 was removed from the cluster; its id cannot be used again, so register the node under a new id",
            ),
        ),
        case(
            "a replica on a suspect node",
            place("chat-2", "chat", 1, 3, &[], 16_000),
            Rejected("node 3 is suspect; only an alive node takes new work"),
        ),
        case(
            "a replica on a node that left",
            place("chat-2", "chat", 1, 4, &[], 16_000),
            Rejected("node 4 is left; only an alive node takes new work"),
        ),
        case(
            "a replica on a node its deployment does not select",
            place("pair-0", "pair", 1, 2, &[0, 0], 8_000),
            Rejected("node 2 lacks the label zone=a that deployment pair selects"),
        ),
        case(
            "a replica short of gpus",
            place("pair-0", "pair", 1, 1, &[0], 8_000),
            Rejected("deployment pair needs 2 gpus per replica on one node, the placement gives 1"),
        ),
        case(
            "a replica with too many gpus",
            place("chat-2", "chat", 1, 1, &[0, 1], 8_000),
            Rejected("deployment chat needs 1 gpus per replica on one node (or none, on cpu), the placement gives 2"),
        ),
        case(
            "a replica names a gpu twice",
            place("pair-0", "pair", 1, 1, &[1, 1], 8_000),
            Rejected("the placement lists gpu 1 more than once"),
        ),
        case(
            "a replica on a gpu the node lacks",
            place("chat-2", "chat", 1, 1, &[7], 16_000),
            Rejected("node 1 has no gpu 7"),
        ),
        case(
            "a replica beyond a gpu's free memory (SCH-1)",
            place("chat-2", "chat", 1, 1, &[0], 16_000),
            Rejected("gpu 0 on node 1 has 8000 MiB free after the 0 MiB reserve; the placement needs 16000 MiB"),
        ),
        case(
            "a replica that would eat into the reserve (SCH-1)",
            place_with_reserve("chat-2", "chat", 1, 1, &[1], 16_000, 10_000),
            Rejected("gpu 1 on node 1 has 14000 MiB free after the 10000 MiB reserve; the placement needs 16000 MiB"),
        ),
        case(
            "a reserve larger than the gpu leaves nothing free",
            place_with_reserve("chat-2", "chat", 1, 1, &[1], 1, 30_000),
            Rejected("gpu 1 on node 1 has 0 MiB free after the 30000 MiB reserve; the placement needs 1 MiB"),
        ),
        // SetReplicaState and RemoveReplica.
        case(
            "a ready replica fails",
            set_replica("chat-0", failed()),
            Accepted(Effect::ReplicaStateChanged {
                replica_id: replica_id("chat-0"),
                from: ReplicaState::Ready,
                to: failed(),
            }),
        ),
        case(
            "a stopping replica may be told to stop again",
            set_replica("chat-1", ReplicaState::Stopping),
            Accepted(Effect::Unchanged),
        ),
        case(
            "state of an unknown replica",
            set_replica("nope", ReplicaState::Ready),
            Rejected("replica nope does not exist"),
        ),
        case(
            "a stopping replica does not come back",
            set_replica("chat-1", ReplicaState::Ready),
            Rejected("replica chat-1 is stopping and cannot become ready; it can only be removed"),
        ),
        case(
            "a replica is removed in any state",
            Command::RemoveReplica { replica_id: replica_id("chat-0"), at_ms: 9_800 },
            Accepted(Effect::ReplicaRemoved { replica_id: replica_id("chat-0") }),
        ),
        case(
            "removing an unknown replica",
            Command::RemoveReplica { replica_id: replica_id("nope"), at_ms: 9_800 },
            Rejected("replica nope does not exist"),
        ),
        // Training jobs.
        case(
            "a training job is placed",
            put_job("ft-2", 1, &[1], 24_000),
            Accepted(Effect::TrainingJobCreated { job_id: job_id("ft-2") }),
        ),
        case(
            "putting the same job again changes nothing",
            put_job("ft-1", 2, &[0], 40_000),
            Accepted(Effect::Unchanged),
        ),
        case(
            "a job grows into the memory it already holds plus what is free",
            put_job("ft-1", 2, &[0], 64_000),
            Accepted(Effect::TrainingJobUpdated { job_id: job_id("ft-1") }),
        ),
        case("a training job needs an id", put_job("", 1, &[1], 1_000), Rejected("training job id must not be empty")),
        case(
            "a training job needs a base model",
            empty_base_model,
            Rejected("training job ft-2 must name its base model"),
        ),
        case(
            "a finished job is not placed again",
            put_job("ft-done", 1, &[1], 1_000),
            Rejected("training job ft-done has finished (succeeded) and cannot change; start a new job under a new id"),
        ),
        case("a job on an unknown node", put_job("ft-2", 9, &[], 0), Rejected("node 9 is not a member of the cluster")),
        case(
            "a job on a suspect node",
            put_job("ft-2", 3, &[], 0),
            Rejected("node 3 is suspect; only an alive node takes new work"),
        ),
        case("a job on a gpu the node lacks", put_job("ft-2", 1, &[3], 1_000), Rejected("node 1 has no gpu 3")),
        case(
            "a job names a gpu twice",
            put_job("ft-2", 1, &[1, 1], 1_000),
            Rejected("the placement lists gpu 1 more than once"),
        ),
        case(
            "a job beyond a gpu's free memory (SCH-1)",
            put_job("ft-2", 2, &[0], 30_000),
            Rejected("gpu 0 on node 2 has 24000 MiB free after the 0 MiB reserve; the placement needs 30000 MiB"),
        ),
        case(
            "a job grows beyond what it holds plus what is free (SCH-1)",
            put_job("ft-1", 2, &[0], 64_001),
            Rejected("gpu 0 on node 2 has 64000 MiB free after the 0 MiB reserve; the placement needs 64001 MiB"),
        ),
        case(
            "a running job fails",
            set_job("ft-1", TrainingJobState::Failed { reason: "nan loss".to_owned() }),
            Accepted(Effect::TrainingJobStateChanged {
                job_id: job_id("ft-1"),
                from: TrainingJobState::Running,
                to: TrainingJobState::Failed { reason: "nan loss".to_owned() },
            }),
        ),
        case(
            "state of an unknown job",
            set_job("nope", TrainingJobState::Running),
            Rejected("training job nope does not exist"),
        ),
        case(
            "a finished job stays finished",
            set_job("ft-done", TrainingJobState::Running),
            Rejected("training job ft-done has finished (succeeded) and cannot change; start a new job under a new id"),
        ),
        case(
            "a job is removed",
            Command::RemoveTrainingJob { job_id: job_id("ft-done"), at_ms: 9_900 },
            Accepted(Effect::TrainingJobRemoved { job_id: job_id("ft-done") }),
        ),
        case(
            "removing an unknown job",
            Command::RemoveTrainingJob { job_id: job_id("nope"), at_ms: 9_900 },
            Rejected("training job nope does not exist"),
        ),
        // Knowledge-base shards.
        case(
            "a shard is placed",
            put_shard("kb2-0", "kb2", 0, 99, 1),
            Accepted(Effect::KbShardCreated { shard_id: shard_id("kb2-0") }),
        ),
        case(
            "putting the same shard again changes nothing",
            put_shard("kb1-0", "kb1", 0, u64::MAX, 1),
            Accepted(Effect::Unchanged),
        ),
        case(
            "a shard moves to another node",
            put_shard("kb1-0", "kb1", 0, u64::MAX, 2),
            Accepted(Effect::KbShardUpdated { shard_id: shard_id("kb1-0") }),
        ),
        case(
            "a new knowledge base's shards are placed at once",
            place_shards("kb3", &[("kb3.0", 0, 9, 1), ("kb3.1", 10, u64::MAX, 2)]),
            Accepted(Effect::KbShardsPlaced {
                knowledge_base_id: "kb3".to_owned(),
                shard_ids: vec![shard_id("kb3.0"), shard_id("kb3.1")],
            }),
        ),
        case(
            "a knowledge base placed already keeps its first placement",
            place_shards("kb1", &[("kb1.9", 0, u64::MAX, 2)]),
            Accepted(Effect::Unchanged),
        ),
        case(
            "a placement needs a shard",
            place_shards("kb3", &[]),
            Rejected("knowledge base \"kb3\" must be placed with at least one shard"),
        ),
        case(
            "a placement names each shard once",
            place_shards("kb3", &[("kb3.0", 0, 9, 1), ("kb3.0", 10, 19, 2)]),
            Rejected("kb shard kb3.0 is named twice in one placement"),
        ),
        case(
            "a placement is of one knowledge base",
            Command::PlaceKbShards {
                knowledge_base_id: "kb3".to_owned(),
                placements: vec![KbShardPlacement {
                    shard_id: ShardId::from("kb4.0"),
                    knowledge_base_id: "kb4".to_owned(),
                    hash_range: HashRange { start: 0, end_inclusive: 1 },
                    node_id: NodeId(1),
                }],
                at_ms: 8_000,
            },
            Rejected("kb shard kb4.0 belongs to knowledge base \"kb3\", not \"kb4\""),
        ),
        case(
            "a placement is all or nothing: one bad shard places none",
            place_shards("kb3", &[("kb3.0", 0, 9, 1), ("kb3.1", 20, 10, 2)]),
            Rejected("kb shard kb3.1 has an empty hash range: start 0x14 is after end 0xa"),
        ),
        case("a shard needs an id", put_shard("", "kb2", 0, 1, 1), Rejected("kb shard id must not be empty")),
        case(
            "a shard needs a knowledge base",
            put_shard("kb2-0", "", 0, 1, 1),
            Rejected("kb shard kb2-0 must name its knowledge base"),
        ),
        case(
            "a shard needs a hash range",
            put_shard("kb2-0", "kb2", 10, 9, 1),
            Rejected("kb shard kb2-0 has an empty hash range: start 0xa is after end 0x9"),
        ),
        case(
            "a shard keeps its knowledge base",
            put_shard("kb1-0", "kb2", 0, u64::MAX, 1),
            Rejected("kb shard kb1-0 belongs to knowledge base \"kb1\", not \"kb2\""),
        ),
        case(
            "a stopping shard does not move",
            put_shard("kb1-old", "kb1", 0, u64::MAX / 2, 1),
            Rejected("kb shard kb1-old is stopping and cannot become pending; it can only be removed"),
        ),
        case(
            "a shard on an unknown node",
            put_shard("kb2-0", "kb2", 0, 1, 9),
            Rejected("node 9 is not a member of the cluster"),
        ),
        case(
            "a shard on a suspect node",
            put_shard("kb2-0", "kb2", 0, 1, 3),
            Rejected("node 3 is suspect; only an alive node takes new work"),
        ),
        case(
            "a serving shard fails",
            set_shard("kb1-0", KbShardState::Failed { reason: "index corrupt".to_owned() }),
            Accepted(Effect::KbShardStateChanged {
                shard_id: shard_id("kb1-0"),
                from: KbShardState::Serving,
                to: KbShardState::Failed { reason: "index corrupt".to_owned() },
            }),
        ),
        case(
            "state of an unknown shard",
            set_shard("nope", KbShardState::Serving),
            Rejected("kb shard nope does not exist"),
        ),
        case(
            "a stopping shard does not come back",
            set_shard("kb1-old", KbShardState::Serving),
            Rejected("kb shard kb1-old is stopping and cannot become serving; it can only be removed"),
        ),
        case(
            "a shard is removed",
            Command::RemoveKbShard { shard_id: shard_id("kb1-old"), at_ms: 9_950 },
            Accepted(Effect::KbShardRemoved { shard_id: shard_id("kb1-old") }),
        ),
        case(
            "removing an unknown shard",
            Command::RemoveKbShard { shard_id: shard_id("nope"), at_ms: 9_950 },
            Rejected("kb shard nope does not exist"),
        ),
    ]
}

fn at_ms_mut(command: &mut Command) -> &mut u64 {
    match command {
        Command::RegisterNode { at_ms, .. }
        | Command::SetNodeStatus { at_ms, .. }
        | Command::SetNodeLabels { at_ms, .. }
        | Command::RemoveNode { at_ms, .. }
        | Command::PutDeployment { at_ms, .. }
        | Command::ScaleDeployment { at_ms, .. }
        | Command::DeleteDeployment { at_ms, .. }
        | Command::PlaceReplica { at_ms, .. }
        | Command::SetReplicaState { at_ms, .. }
        | Command::RemoveReplica { at_ms, .. }
        | Command::PutTrainingJob { at_ms, .. }
        | Command::SetTrainingJobState { at_ms, .. }
        | Command::RemoveTrainingJob { at_ms, .. }
        | Command::PutKbShard { at_ms, .. }
        | Command::PlaceKbShards { at_ms, .. }
        | Command::SetKbShardState { at_ms, .. }
        | Command::RemoveKbShard { at_ms, .. } => at_ms,
    }
}

#[test]
fn each_command_in_the_table_is_accepted_or_rejected_as_written() {
    let base = base_state();
    assert!(sch1_holds(&base), "the base state breaks SCH-1: {:?}", sch1_violations(&base));
    let mut failures = Vec::new();
    for Case { name, mut command, expect } in cases() {
        // A time no setup command used, so a rejection that stamped one would show.
        *at_ms_mut(&mut command) = 99_999;
        let mut state = base.clone();
        let outcome = state.apply(100, command);
        match (expect, outcome) {
            (Accepted(effect), Ok(applied)) => {
                if applied != (Applied { index: 100, effect: effect.clone() }) {
                    failures.push(format!("{name}: expected {effect:?}, got {:?}", applied.effect));
                }
                if effect == Effect::Unchanged && state != base {
                    failures.push(format!("{name}: reported no change but the state changed"));
                }
                if effect != Effect::Unchanged && state == base {
                    failures.push(format!("{name}: reported {effect:?} but the state did not change"));
                }
            }
            (Accepted(effect), Err(rejection)) => {
                failures.push(format!("{name}: expected {effect:?}, was rejected: {rejection}"));
            }
            (Rejected(message), Ok(applied)) => {
                failures.push(format!("{name}: expected rejection {message:?}, got {:?}", applied.effect));
            }
            (Rejected(message), Err(rejection)) => {
                if rejection.to_string() != message {
                    failures.push(format!("{name}: expected rejection {message:?}, got {:?}", rejection.to_string()));
                }
                if state != base {
                    failures.push(format!("{name}: the rejected command changed the state"));
                }
            }
        }
        if !sch1_holds(&state) {
            failures.push(format!("{name}: SCH-1 broken: {:?}", sch1_violations(&state)));
        }
    }
    assert!(failures.is_empty(), "{} table cases failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_rejection_kind_has_a_table_case() {
    // Each variant's message starts differently enough that a missing case shows here;
    // this keeps the table honest as rejections are added.
    let rejected: Vec<&str> = cases()
        .iter()
        .filter_map(|case| if let Rejected(message) = case.expect { Some(message) } else { None })
        .collect();
    let fragments = [
        "id must not be empty",
        "is not a member of the cluster",
        "was removed from the cluster",
        "has left the cluster and cannot rejoin",
        "its status cannot change",
        "its labels cannot change",
        "is both set and removed",
        "label key \"\" for node 1 must be",
        "characters long; at most",
        "must have a name",
        "is already taken by node",
        "lists gpu 0 more than once",
        "would drop gpu",
        "would shrink gpu",
        "still holds work",
        "only an alive node takes new work",
        "lacks the label",
        "has no gpu",
        "the placement lists gpu",
        "MiB free after the",
        "deployment nope does not exist",
        "is invalid",
        "for generation",
        "gpus per replica on one node",
        "already exists",
        "replica nope does not exist",
        "replica chat-1 is stopping",
        "training job nope does not exist",
        "has finished",
        "must name its base model",
        "kb shard nope does not exist",
        "kb shard kb1-old is stopping",
        "belongs to knowledge base",
        "must name its knowledge base",
        "empty hash range",
        "must be placed with at least one shard",
        "is named twice in one placement",
    ];
    for fragment in fragments {
        assert!(rejected.iter().any(|message| message.contains(fragment)), "no table case rejects with {fragment:?}");
    }
}

// Lifecycle rules that take more than one command.

fn apply_ok(state: &mut ClusterState, command: Command) -> Effect {
    let description = format!("{command:?}");
    match state.apply(1_000, command) {
        Ok(applied) => applied.effect,
        Err(rejection) => panic!("{description} was rejected: {rejection}"),
    }
}

#[test]
fn each_entry_into_dead_counts_once_and_records_when() {
    let mut state = base_state();
    apply_ok(&mut state, Command::SetNodeStatus { node_id: NodeId(1), status: NodeStatus::Dead, at_ms: 10_000 });
    assert_eq!(apply_ok(&mut state, set_status(1, NodeStatus::Dead)), Effect::Unchanged);
    apply_ok(&mut state, set_status(1, NodeStatus::Alive));
    apply_ok(&mut state, Command::SetNodeStatus { node_id: NodeId(1), status: NodeStatus::Dead, at_ms: 12_000 });
    let node = state.node(NodeId(1)).unwrap();
    assert_eq!((node.status, node.status_since_ms, node.dead_declarations), (NodeStatus::Dead, 12_000, 2));
    assert_eq!(node.joined_at_ms, 1_000);
    assert!(state.alive_nodes().all(|node| node.id != NodeId(1)));
}

#[test]
fn re_registration_keeps_liveness_and_history() {
    let mut state = base_state();
    apply_ok(&mut state, set_status(2, NodeStatus::Dead));
    let mut restarted = node_spec(2, "gpu-b", vec![gpu(0, 80_000), gpu(1, 80_000)]);
    restarted.api_addr = "10.0.1.2:8080".to_owned();
    apply_ok(&mut state, Command::RegisterNode { node: restarted, at_ms: 50_000 });
    let node = state.node(NodeId(2)).unwrap();
    assert_eq!(node.api_addr, "10.0.1.2:8080");
    assert_eq!(node.resources.gpus.len(), 2);
    assert_eq!((node.status, node.dead_declarations, node.joined_at_ms), (NodeStatus::Dead, 1, 1_000));
}

#[test]
fn a_node_that_leaves_keeps_its_record_until_removed_and_never_returns() {
    let mut state = base_state();
    apply_ok(&mut state, set_status(3, NodeStatus::Left));
    apply_ok(&mut state, Command::RemoveNode { node_id: NodeId(3), at_ms: 1 });
    assert!(state.node(NodeId(3)).is_none());
    assert!(state.removed_node_ids().contains(&NodeId(3)));
    let rejection = state.apply(1, register(node_spec(3, "cpu-c", vec![]))).unwrap_err();
    assert_eq!(rejection, Rejection::NodeRemoved(NodeId(3)));
}

#[test]
fn a_spec_change_makes_running_replicas_outdated_and_scaling_does_not() {
    let mut state = base_state();
    let generation = |state: &ClusterState| state.deployment(&DeploymentId::from("chat")).unwrap().generation;
    apply_ok(&mut state, Command::ScaleDeployment { deployment_id: DeploymentId::from("chat"), replicas: 9, at_ms: 1 });
    assert_eq!(generation(&state), 1);
    let mut v2 = deployment_spec(1, 16_000, true);
    v2.model_version = "v2".to_owned();
    apply_ok(&mut state, put_deployment("chat", v2.clone(), 9));
    assert_eq!(generation(&state), 2);
    let deployment = state.deployment(&DeploymentId::from("chat")).unwrap();
    assert_eq!((deployment.created_at_ms, deployment.updated_at_ms, deployment.replicas_desired), (3_000, 3_000, 9));
    let outdated: Vec<_> = state
        .replicas_of_deployment(&DeploymentId::from("chat"))
        .filter(|replica| replica.deployment_generation < generation(&state))
        .map(|replica| replica.id.as_str().to_owned())
        .collect();
    assert_eq!(outdated, ["chat-0", "chat-1"]);
    assert!(state.apply(1, place("chat-2", "chat", 1, 1, &[1], 16_000)).is_err());
    apply_ok(&mut state, place("chat-2", "chat", 2, 1, &[1], 16_000));
}

#[test]
fn a_deleted_deployment_leaves_stopping_replicas_that_a_new_one_of_its_name_does_not_adopt() {
    let mut state = base_state();
    apply_ok(&mut state, Command::DeleteDeployment { deployment_id: DeploymentId::from("chat"), at_ms: 20_000 });
    assert!(state.deployment(&DeploymentId::from("chat")).is_none());
    let chat = DeploymentId::from("chat");
    for replica in state.replicas_of_deployment(&chat) {
        assert_eq!(replica.state, ReplicaState::Stopping, "{}", replica.id);
    }
    assert_eq!(state.replica(&ReplicaId::from("chat-0")).unwrap().state_since_ms, 20_000);
    // The memory stays promised until the node removes the replica.
    assert_eq!(state.gpu_memory_placed_mib(NodeId(1), 0), 16_000);
    let effect = apply_ok(&mut state, put_deployment("chat", deployment_spec(1, 16_000, true), 1));
    assert_eq!(effect, Effect::DeploymentCreated { deployment_id: chat.clone(), generation: 2 });
    apply_ok(&mut state, Command::RemoveReplica { replica_id: ReplicaId::from("chat-0"), at_ms: 1 });
    assert_eq!(state.gpu_memory_placed_mib(NodeId(1), 0), 0);
    assert_eq!(state.free_gpu_memory_mib(NodeId(1), 0), Some(24_000));
}

#[test]
fn a_replica_counts_restarts_from_failure() {
    let mut state = base_state();
    let failed = ReplicaState::Failed { reason: "oom".to_owned() };
    // Failed → ready counts too: a quick load reaches ready before loading is committed.
    for next in [
        failed.clone(),
        ReplicaState::Loading,
        ReplicaState::Ready,
        failed.clone(),
        ReplicaState::Pending,
        ReplicaState::Ready,
        failed.clone(),
        ReplicaState::Ready,
    ] {
        apply_ok(&mut state, set_replica("chat-0", next));
    }
    apply_ok(&mut state, set_replica("chat-0", ReplicaState::Stopping));
    let replica = state.replica(&ReplicaId::from("chat-0")).unwrap();
    assert_eq!((replica.restarts, &replica.state, replica.state_since_ms), (3, &ReplicaState::Stopping, 5_000));
}

#[test]
fn a_moved_job_or_shard_starts_over_as_pending() {
    let mut state = base_state();
    apply_ok(&mut state, put_job("ft-1", 1, &[1], 20_000));
    let job = state.training_job(&JobId::from("ft-1")).unwrap();
    assert_eq!((job.node_id, &job.state), (NodeId(1), &TrainingJobState::Pending));
    assert_eq!(state.gpu_memory_placed_mib(NodeId(2), 0), 16_000);
    assert_eq!(state.gpu_memory_placed_mib(NodeId(1), 1), 20_000);
    apply_ok(&mut state, put_shard("kb1-0", "kb1", 0, u64::MAX, 2));
    let shard = state.kb_shard(&ShardId::from("kb1-0")).unwrap();
    assert_eq!((shard.node_id, &shard.state, shard.state_since_ms), (NodeId(2), &KbShardState::Pending, 8_000));
    // A failed job may resume; an update that does not move it keeps its state, even on
    // a node that no longer takes new work.
    apply_ok(&mut state, set_job("ft-1", TrainingJobState::Running));
    apply_ok(&mut state, set_status(1, NodeStatus::Suspect));
    let mut renamed = put_job("ft-1", 1, &[1], 20_000);
    if let Command::PutTrainingJob { placement, .. } = &mut renamed {
        placement.base_model = "llama-3-8b@v2".to_owned();
    }
    assert_eq!(apply_ok(&mut state, renamed), Effect::TrainingJobUpdated { job_id: JobId::from("ft-1") });
    assert_eq!(state.training_job(&JobId::from("ft-1")).unwrap().state, TrainingJobState::Running);
}

#[test]
fn a_relabel_changes_only_labels_and_moves_no_placed_work() {
    let mut state = base_state();
    apply_ok(&mut state, place("pair-0", "pair", 1, 1, &[0, 1], 8_000));
    let before = state.clone();
    let effect = apply_ok(&mut state, set_labels(1, &[("zone", "b"), ("gpu", "a100")], &[]));
    assert_eq!(effect, Effect::NodeLabelsChanged { node_id: NodeId(1) });
    let (node, node_before) = (state.node(NodeId(1)).unwrap(), before.node(NodeId(1)).unwrap());
    assert_eq!(node.labels, labels(&[("gpu", "a100"), ("zone", "b")]));
    let mut node_but_labels = node.clone();
    node_but_labels.labels.clone_from(&node_before.labels);
    assert_eq!(&node_but_labels, node_before, "a relabel touched more than the labels");
    // `pair` selects zone=a, which node 1 no longer has: its replica stays where it was
    // placed, for the scheduler to decide about, and only new placements are refused.
    assert_eq!(state.replicas(), before.replicas());
    assert_eq!(
        (state.deployments(), state.training_jobs(), state.kb_shards()),
        (before.deployments(), before.training_jobs(), before.kb_shards())
    );
    let rejection = state.apply(1, place("pair-1", "pair", 1, 1, &[0, 1], 1)).unwrap_err();
    assert_eq!(
        rejection,
        Rejection::NodeSelectorMismatch {
            node_id: NodeId(1),
            deployment_id: DeploymentId::from("pair"),
            key: "zone".to_owned(),
            value: "a".to_owned(),
        }
    );
}

#[test]
fn a_label_the_node_registered_with_may_be_removed_whatever_its_key() {
    // `RegisterNode` takes any labels, so a node may carry a key `SetNodeLabels` could not
    // set; it must still be able to drop it.
    let mut state = base_state();
    let legacy = NodeSpec { labels: labels(&[("legacy key", "x"), ("zone", "a")]), ..node_spec(6, "gpu-f", vec![]) };
    apply_ok(&mut state, register(legacy));
    let effect = apply_ok(&mut state, set_labels(6, &[], &["legacy key"]));
    assert_eq!(effect, Effect::NodeLabelsChanged { node_id: NodeId(6) });
    assert_eq!(state.node(NodeId(6)).unwrap().labels, labels(&[("zone", "a")]));
    assert!(!label_key_is_valid("legacy key"));
    assert!(label_key_is_valid("example.com/gpu-type_2"));
}

#[test]
fn queries_answer_from_the_committed_state() {
    let state = base_state();
    let alive: Vec<u64> = state.alive_nodes().map(|node| node.id.0).collect();
    assert_eq!(alive, [1, 2]);
    let on_two: Vec<&str> = state.replicas_on_node(NodeId(2)).map(|replica| replica.id.as_str()).collect();
    assert_eq!(on_two, ["chat-1"]);
    let chat = DeploymentId::from("chat");
    assert_eq!(state.replicas_of_deployment(&chat).count(), 2);
    assert_eq!(state.gpu_memory_placed_mib(NodeId(2), 0), 56_000);
    assert_eq!(state.free_gpu_memory_mib(NodeId(2), 0), Some(24_000));
    assert_eq!(state.free_gpu_memory_mib(NodeId(1), 1), Some(24_000));
    assert_eq!(state.free_gpu_memory_mib(NodeId(1), 7), None);
    assert_eq!(state.free_gpu_memory_mib(NodeId(9), 0), None);
    assert_eq!(state.training_jobs_on_node(NodeId(2)).count(), 2);
    assert_eq!(state.kb_shards_on_node(NodeId(1)).count(), 1);
}

#[test]
fn sch1_violations_name_the_gpu() {
    // A state that breaks SCH-1 cannot be made through commands, so it comes from a
    // snapshot, as a corrupt one might.
    let state = base_state();
    let mut value: serde_json::Value = serde_json::from_slice(&state.snapshot()).unwrap();
    value["state"]["nodes"]["1"]["resources"]["gpus"][0]["memory_total_mib"] = 10_000.into();
    value["state"]["nodes"]["2"]["resources"]["gpus"] = serde_json::json!([]);
    let mut broken = ClusterState::default();
    broken.restore(&serde_json::to_vec(&value).unwrap()).unwrap();
    let violations: Vec<String> = sch1_violations(&broken).iter().map(ToString::to_string).collect();
    assert_eq!(
        violations,
        [
            "SCH-1: gpu 0 on node 1 is promised 16000 MiB of its 10000 MiB",
            "SCH-1: 56000 MiB promised on gpu 0 of node 2, which does not exist",
        ]
    );
    assert!(!sch1_holds(&broken));
}

// Snapshots and the wire format.

#[test]
fn a_snapshot_restores_to_an_equal_state() {
    let state = base_state();
    let mut restored = ClusterState::default();
    restored.restore(&state.snapshot()).unwrap();
    assert_eq!(restored, state);
    assert_eq!(restored.snapshot(), state.snapshot());
}

#[test]
fn a_bad_snapshot_is_refused_and_changes_nothing() {
    let cases: [(&str, &[u8]); 6] = [
        ("not json", b"{\"version\":1,"),
        ("no version", br#"{"state":{}}"#),
        ("a future version", br#"{"version":2,"state":{"nodes":{}}}"#),
        ("a version that is not a number", br#"{"version":"1","state":{}}"#),
        ("an unknown field in v1", br#"{"version":1,"state":{"nodes":{},"removed_node_ids":[],"deployments":{},"replicas":{},"training_jobs":{},"kb_shards":{},"quotas":{}}}"#),
        ("a v1 state missing a map", br#"{"version":1,"state":{"nodes":{}}}"#),
    ];
    let expected = [
        "EOF while parsing",
        "the snapshot has no format `version`",
        "unknown snapshot format version 2: this node reads versions [1]; upgrade it",
        "the snapshot format `version` must be an integer, not \"1\"",
        "unknown field `quotas`",
        "missing field `removed_node_ids`",
    ];
    for ((name, bytes), reason) in cases.into_iter().zip(expected) {
        let mut state = base_state();
        let error = state.restore(bytes).expect_err(name);
        assert!(
            matches!(error, maas_consensus::ConsensusError::Codec { what: "cluster state snapshot", .. }),
            "{name}: {error:?}"
        );
        let message = error.to_string();
        let prefix = "cannot decode cluster state snapshot: ";
        assert!(message.starts_with(prefix) && message.contains(reason), "{name}: got {message:?}, wanted {reason:?}");
        assert_eq!(state, base_state(), "{name}: a refused snapshot changed the state");
    }
}

#[test]
fn a_bad_command_is_refused_with_a_clear_reason() {
    let cases = [
        (
            r#"{"v":2,"op":"remove_node","node_id":1,"at_ms":0}"#,
            "unknown command format version 2: this node reads versions [1]; upgrade it",
        ),
        (r#"{"op":"remove_node","node_id":1,"at_ms":0}"#, "the command has no format version `v`"),
        (
            r#"{"v":"1","op":"remove_node","node_id":1,"at_ms":0}"#,
            "the command format version `v` must be an integer, not \"1\"",
        ),
        (r#"[1,"remove_node"]"#, "a command must be a json object with `v` and `op`"),
        (r#"{"v":1,"op":"launch_rockets","at_ms":0}"#, "unknown variant `launch_rockets`, expected one of"),
        (r#"{"v":1,"node_id":1,"at_ms":0}"#, "missing field `op`"),
        (r#"{"v":1,"op":"remove_node","node_id":1}"#, "missing field `at_ms`"),
        (r#"{"v":1,"op":"remove_node","node_id":1,"at_ms":0,"force":true}"#, "unknown field `force`"),
        (r#"{"v":1,"op":"set_node_status","node_id":1,"status":"sleeping","at_ms":0}"#, "unknown variant `sleeping`"),
    ];
    for (json, reason) in cases {
        let error = Command::from_json(json.as_bytes()).expect_err(json).to_string();
        let prefix = "cannot decode control-plane command: ";
        assert!(error.starts_with(prefix) && error.contains(reason), "{json}: got {error:?}, wanted {reason:?}");
    }
}

/// One command of each op as version 1 writes it. These strings are the persisted format:
/// if a change to `Command` breaks one, it needs a new format version and a migration,
/// not an edit here.
const GOLDEN_V1_COMMANDS: &[&str] = &[
    r#"{"v":1,"op":"register_node","node":{"id":1,"name":"gpu-a","api_addr":"10.0.0.1:8080","cluster_addr":"10.0.0.1:7070","labels":{"zone":"a"},"resources":{"cpu_cores":32,"memory_mib":256000,"gpus":[{"index":0,"model":"NVIDIA A100","memory_total_mib":24000,"simulated":true}]}},"at_ms":1000}"#,
    r#"{"v":1,"op":"set_node_status","node_id":1,"status":"dead","at_ms":2000}"#,
    r#"{"v":1,"op":"set_node_labels","node_id":1,"set":{"gpu":"a100","zone":"b"},"remove":["rack"],"at_ms":2500}"#,
    r#"{"v":1,"op":"remove_node","node_id":5,"at_ms":1500}"#,
    r#"{"v":1,"op":"put_deployment","deployment_id":"chat","spec":{"model_name":"llama-3-8b","model_version":"v1","request":{"gpus_per_replica":1,"memory_per_gpu_mib":16000,"cpu_fallback_allowed":true},"strategy":"spread","node_selector":{"zone":"a"},"priority":-3,"allow_preemption":true},"replicas":2,"at_ms":3000}"#,
    r#"{"v":1,"op":"scale_deployment","deployment_id":"chat","replicas":4,"at_ms":3500}"#,
    r#"{"v":1,"op":"delete_deployment","deployment_id":"chat","at_ms":3600}"#,
    r#"{"v":1,"op":"place_replica","placement":{"replica_id":"chat-0","deployment_id":"chat","deployment_generation":1,"node_id":1,"gpu_indices":[0],"memory_per_gpu_mib":16000},"gpu_reserve_mib":1024,"at_ms":4000}"#,
    r#"{"v":1,"op":"set_replica_state","replica_id":"chat-0","state":{"failed":{"reason":"oom"}},"at_ms":5000}"#,
    r#"{"v":1,"op":"set_replica_state","replica_id":"chat-0","state":"ready","at_ms":5000}"#,
    r#"{"v":1,"op":"remove_replica","replica_id":"chat-0","at_ms":5500}"#,
    r#"{"v":1,"op":"put_training_job","placement":{"job_id":"ft-1","base_model":"llama-3-8b@v1","node_id":2,"gpu_indices":[0,1],"memory_per_gpu_mib":40000},"gpu_reserve_mib":0,"at_ms":6000}"#,
    r#"{"v":1,"op":"set_training_job_state","job_id":"ft-1","state":"succeeded","at_ms":7000}"#,
    r#"{"v":1,"op":"remove_training_job","job_id":"ft-1","at_ms":7500}"#,
    r#"{"v":1,"op":"put_kb_shard","placement":{"shard_id":"kb1-0","knowledge_base_id":"kb1","hash_range":{"start":0,"end_inclusive":18446744073709551615},"node_id":1},"at_ms":8000}"#,
    r#"{"v":1,"op":"set_kb_shard_state","shard_id":"kb1-0","state":"serving","at_ms":9000}"#,
    r#"{"v":1,"op":"remove_kb_shard","shard_id":"kb1-0","at_ms":9500}"#,
];

fn golden_v1_commands_decoded() -> Vec<Command> {
    let mut node = node_spec(1, "gpu-a", vec![gpu(0, 24_000)]);
    node.labels = labels(&[("zone", "a")]);
    let mut spec = deployment_spec(1, 16_000, true);
    spec.strategy = PlacementStrategy::Spread;
    spec.node_selector = labels(&[("zone", "a")]);
    spec.priority = -3;
    spec.allow_preemption = true;
    vec![
        register(node),
        set_status(1, NodeStatus::Dead),
        set_labels(1, &[("zone", "b"), ("gpu", "a100")], &["rack"]),
        Command::RemoveNode { node_id: NodeId(5), at_ms: 1_500 },
        put_deployment("chat", spec, 2),
        Command::ScaleDeployment { deployment_id: DeploymentId::from("chat"), replicas: 4, at_ms: 3_500 },
        Command::DeleteDeployment { deployment_id: DeploymentId::from("chat"), at_ms: 3_600 },
        place_with_reserve("chat-0", "chat", 1, 1, &[0], 16_000, 1_024),
        set_replica("chat-0", ReplicaState::Failed { reason: "oom".to_owned() }),
        set_replica("chat-0", ReplicaState::Ready),
        Command::RemoveReplica { replica_id: ReplicaId::from("chat-0"), at_ms: 5_500 },
        Command::PutTrainingJob {
            placement: TrainingJobPlacement {
                job_id: JobId::from("ft-1"),
                base_model: "llama-3-8b@v1".to_owned(),
                node_id: NodeId(2),
                gpu_indices: vec![0, 1],
                memory_per_gpu_mib: 40_000,
            },
            gpu_reserve_mib: 0,
            at_ms: 6_000,
        },
        set_job("ft-1", TrainingJobState::Succeeded),
        Command::RemoveTrainingJob { job_id: JobId::from("ft-1"), at_ms: 7_500 },
        put_shard("kb1-0", "kb1", 0, u64::MAX, 1),
        set_shard("kb1-0", KbShardState::Serving),
        Command::RemoveKbShard { shard_id: ShardId::from("kb1-0"), at_ms: 9_500 },
    ]
}

#[test]
fn golden_v1_commands_still_decode_and_encode_the_same() {
    assert_eq!(COMMAND_FORMAT_VERSION, 1);
    let expected = golden_v1_commands_decoded();
    assert_eq!(GOLDEN_V1_COMMANDS.len(), expected.len());
    let mut ops: Vec<&str> = expected.iter().map(Command::op).collect();
    ops.dedup();
    assert_eq!(ops.len(), 16, "one golden command per op");
    for (json, command) in GOLDEN_V1_COMMANDS.iter().zip(expected) {
        let decoded = Command::from_json(json.as_bytes()).unwrap_or_else(|error| panic!("{json}: {error}"));
        assert_eq!(decoded, command, "{json}");
        let encoded: serde_json::Value = serde_json::from_slice(&command.to_json()).unwrap();
        let golden: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(encoded, golden, "the encoding of {} changed", command.op());
    }
}

#[test]
fn a_command_without_a_reserve_reads_as_no_reserve() {
    let json = r#"{"v":1,"op":"place_replica","placement":{"replica_id":"r","deployment_id":"d","deployment_generation":1,"node_id":1,"gpu_indices":[],"memory_per_gpu_mib":0},"at_ms":1}"#;
    let Command::PlaceReplica { gpu_reserve_mib, .. } = Command::from_json(json.as_bytes()).unwrap() else {
        panic!("decoded to another op");
    };
    assert_eq!(gpu_reserve_mib, 0);
}

/// A version 1 snapshot of the state [`golden_v1_state`] builds. Like the commands above,
/// this string is the persisted format and must keep decoding.
const GOLDEN_V1_SNAPSHOT: &str = r#"{"version":1,"state":{
  "nodes":{
    "1":{"id":1,"name":"gpu-a","api_addr":"10.0.0.1:8080","cluster_addr":"10.0.0.1:7070","labels":{"zone":"a"},
         "resources":{"cpu_cores":32,"memory_mib":256000,"gpus":[{"index":0,"model":"NVIDIA A100","memory_total_mib":24000,"simulated":true}]},
         "status":"dead","status_since_ms":2000,"joined_at_ms":1000,"dead_declarations":1},
    "2":{"id":2,"name":"gpu-b","api_addr":"10.0.0.2:8080","cluster_addr":"10.0.0.2:7070","labels":{},
         "resources":{"cpu_cores":32,"memory_mib":256000,"gpus":[{"index":0,"model":"NVIDIA A100","memory_total_mib":80000,"simulated":true}]},
         "status":"alive","status_since_ms":1000,"joined_at_ms":1000,"dead_declarations":0}
  },
  "removed_node_ids":[5],
  "deployments":{
    "chat":{"id":"chat","spec":{"model_name":"llama-3-8b","model_version":"v1",
            "request":{"gpus_per_replica":1,"memory_per_gpu_mib":16000,"cpu_fallback_allowed":true},
            "strategy":"binpack","node_selector":{},"priority":0,"allow_preemption":false},
            "replicas_desired":2,"created_at_ms":3000,"updated_at_ms":3000,"generation":1}
  },
  "replicas":{
    "chat-0":{"id":"chat-0","deployment_id":"chat","deployment_generation":1,"node_id":1,"gpu_indices":[0],
              "memory_per_gpu_mib":16000,"state":{"failed":{"reason":"oom"}},"state_since_ms":5000,"placed_at_ms":4000,"restarts":0},
    "chat-1":{"id":"chat-1","deployment_id":"chat","deployment_generation":1,"node_id":2,"gpu_indices":[],
              "memory_per_gpu_mib":16000,"state":"pending","state_since_ms":4000,"placed_at_ms":4000,"restarts":0}
  },
  "training_jobs":{
    "ft-1":{"id":"ft-1","base_model":"llama-3-8b@v1","node_id":2,"gpu_indices":[0],"memory_per_gpu_mib":40000,
            "state":"running","state_since_ms":7000,"created_at_ms":6000}
  },
  "kb_shards":{
    "kb1-0":{"id":"kb1-0","knowledge_base_id":"kb1","hash_range":{"start":0,"end_inclusive":18446744073709551615},
             "node_id":2,"state":"serving","state_since_ms":9000,"created_at_ms":8000}
  }
}}"#;

fn golden_v1_state() -> ClusterState {
    let mut node_a = node_spec(1, "gpu-a", vec![gpu(0, 24_000)]);
    node_a.labels = labels(&[("zone", "a")]);
    build(vec![
        register(node_a),
        register(node_spec(2, "gpu-b", vec![gpu(0, 80_000)])),
        register(node_spec(5, "gone-e", vec![])),
        Command::RemoveNode { node_id: NodeId(5), at_ms: 1_500 },
        put_deployment("chat", deployment_spec(1, 16_000, true), 2),
        place("chat-0", "chat", 1, 1, &[0], 16_000),
        place("chat-1", "chat", 1, 2, &[], 16_000),
        set_replica("chat-0", ReplicaState::Failed { reason: "oom".to_owned() }),
        set_status(1, NodeStatus::Dead),
        put_job("ft-1", 2, &[0], 40_000),
        set_job("ft-1", TrainingJobState::Running),
        put_shard("kb1-0", "kb1", 0, u64::MAX, 2),
        set_shard("kb1-0", KbShardState::Serving),
    ])
}

#[test]
fn the_golden_v1_snapshot_still_restores_and_encodes_the_same() {
    assert_eq!(SNAPSHOT_FORMAT_VERSION, 1);
    let mut restored = ClusterState::default();
    restored.restore(GOLDEN_V1_SNAPSHOT.as_bytes()).unwrap();
    assert_eq!(restored, golden_v1_state());
    let encoded: serde_json::Value = serde_json::from_slice(&golden_v1_state().snapshot()).unwrap();
    let golden: serde_json::Value = serde_json::from_str(GOLDEN_V1_SNAPSHOT).unwrap();
    assert_eq!(encoded, golden, "the snapshot encoding changed");
}

// Properties over random command sequences.

// Generators over a small id space (4 nodes, 2 deployments, 6 replicas, 2 jobs, 2
// shards, 3 GPU indices), so that many commands are accepted and many rejected.

fn arb_node_id() -> impl Strategy<Value = NodeId> + Clone {
    (1u64..=4).prop_map(NodeId)
}

fn arb_at_ms() -> impl Strategy<Value = u64> + Clone {
    0u64..10_000
}

fn arb_memory_mib() -> impl Strategy<Value = u64> + Clone {
    prop::sample::select(vec![0u64, 4_000, 8_000, 8_000, 16_000, 24_000])
}

fn arb_gpu_reserve_mib() -> impl Strategy<Value = u64> + Clone {
    prop::sample::select(vec![0u64, 2_000])
}

fn arb_gpu_indices() -> impl Strategy<Value = Vec<u32>> + Clone {
    prop::sample::select(vec![
        vec![],
        vec![0],
        vec![0],
        vec![1],
        vec![2],
        vec![0, 1],
        vec![0, 1],
        vec![1, 0],
        vec![1, 1],
    ])
}

fn arb_zone_labels() -> impl Strategy<Value = BTreeMap<String, String>> + Clone {
    prop::sample::select(vec![labels(&[]), labels(&[("zone", "a")])])
}

fn arb_deployment_id() -> impl Strategy<Value = DeploymentId> + Clone {
    prop::sample::select(vec!["d0", "d1"]).prop_map(DeploymentId::from)
}

fn arb_node_command() -> impl Strategy<Value = Command> {
    // Mostly well-formed GPU lists (indices from 0; a node registering again may grow or
    // shrink them), now and then one that lists an index twice.
    let gpus = (0u32..=2, prop::sample::select(vec![16_000u64, 24_000]), prop::bool::weighted(0.1)).prop_map(
        |(count, memory, duplicate)| {
            let mut gpus: Vec<GpuRecord> = (0..count).map(|index| gpu(index, memory)).collect();
            if duplicate {
                gpus.push(gpu(0, memory));
            }
            gpus
        },
    );
    let node = (arb_node_id(), prop::sample::select(vec!["a", "b", "c", "d", ""]), arb_zone_labels(), gpus)
        .prop_map(|(node_id, name, labels, gpus)| NodeSpec { labels, ..node_spec(node_id.0, name, gpus) });
    let status = prop::sample::select(vec![
        NodeStatus::Alive,
        NodeStatus::Alive,
        NodeStatus::Alive,
        NodeStatus::Suspect,
        NodeStatus::Dead,
        NodeStatus::Draining,
        NodeStatus::Left,
    ]);
    prop_oneof![
        2 => (node, arb_at_ms()).prop_map(|(node, at_ms)| Command::RegisterNode { node, at_ms }),
        2 => (arb_node_id(), status, arb_at_ms())
            .prop_map(|(node_id, status, at_ms)| Command::SetNodeStatus { node_id, status, at_ms }),
        2 => arb_set_node_labels(),
        1 => (arb_node_id(), arb_at_ms()).prop_map(|(node_id, at_ms)| Command::RemoveNode { node_id, at_ms }),
    ]
}

/// Relabels over a few keys, `zone` among them so that relabels change which nodes the
/// `zone=a` selector admits; now and then a malformed key, or a key both set and removed.
fn arb_set_node_labels() -> impl Strategy<Value = Command> {
    let key = prop::sample::select(vec!["zone", "zone", "gpu", "example.com/rack", "bad key"]);
    let value = prop::sample::select(vec!["a", "a", "b", ""]);
    let set = prop::collection::btree_map(key.clone().prop_map(str::to_owned), value.prop_map(str::to_owned), 0..=2);
    let remove = prop::collection::btree_set(key.prop_map(str::to_owned), 0..=1);
    (arb_node_id(), set, remove, arb_at_ms()).prop_map(|(node_id, set, remove, at_ms)| Command::SetNodeLabels {
        node_id,
        set,
        remove,
        at_ms,
    })
}

fn arb_deployment_command() -> impl Strategy<Value = Command> {
    let model_name = prop::sample::select(vec!["m", "m", "m", ""]);
    let spec = (0u32..=2, arb_memory_mib(), any::<bool>(), arb_zone_labels(), model_name).prop_map(
        |(gpus_per_replica, memory_per_gpu_mib, cpu_fallback_allowed, node_selector, model_name)| DeploymentSpec {
            node_selector,
            model_name: model_name.to_owned(),
            ..deployment_spec(gpus_per_replica, memory_per_gpu_mib, cpu_fallback_allowed)
        },
    );
    prop_oneof![
        1 => (arb_deployment_id(), spec, 0u32..4, arb_at_ms()).prop_map(|(deployment_id, spec, replicas, at_ms)| {
            Command::PutDeployment { deployment_id, spec, replicas, at_ms }
        }),
        2 => (arb_deployment_id(), 0u32..4, arb_at_ms())
            .prop_map(|(deployment_id, replicas, at_ms)| Command::ScaleDeployment { deployment_id, replicas, at_ms }),
        1 => (arb_deployment_id(), arb_at_ms())
            .prop_map(|(deployment_id, at_ms)| Command::DeleteDeployment { deployment_id, at_ms }),
    ]
}

fn arb_replica_command() -> impl Strategy<Value = Command> {
    let replica_id = prop::sample::select(vec!["r0", "r1", "r2", "r3", "r4", "r5"]).prop_map(ReplicaId::from);
    // Where a replica goes: mostly shaped like the setup's deployments (`d0` takes one gpu
    // or cpu, `d1` two gpus on a zone=a node), sometimes anything at all.
    let target = prop_oneof![
        4 => (
            Just(DeploymentId::from("d0")),
            prop::sample::select(vec![1u64, 1, 2, 2, 3]).prop_map(NodeId),
            prop::sample::select(vec![vec![0u32], vec![0], vec![1], vec![]]),
        ),
        3 => (
            Just(DeploymentId::from("d1")),
            prop::sample::select(vec![1u64, 1, 1, 2]).prop_map(NodeId),
            prop::sample::select(vec![vec![0u32, 1], vec![1, 0]]),
        ),
        1 => (arb_deployment_id(), arb_node_id(), arb_gpu_indices()),
    ];
    let generation = prop::sample::select(vec![1u64, 1, 1, 1, 1, 2]);
    let placement = (replica_id.clone(), target, generation, arb_memory_mib()).prop_map(
        |(replica_id, (deployment_id, node_id, gpu_indices), deployment_generation, memory_per_gpu_mib)| {
            ReplicaPlacement {
                replica_id,
                deployment_id,
                deployment_generation,
                node_id,
                gpu_indices,
                memory_per_gpu_mib,
            }
        },
    );
    let state = prop::sample::select(vec![
        ReplicaState::Pending,
        ReplicaState::Loading,
        ReplicaState::Ready,
        ReplicaState::Failed { reason: "oom".to_owned() },
        ReplicaState::Stopping,
    ]);
    prop_oneof![
        20 => (placement, arb_gpu_reserve_mib(), arb_at_ms()).prop_map(|(placement, gpu_reserve_mib, at_ms)| {
            Command::PlaceReplica { placement, gpu_reserve_mib, at_ms }
        }),
        8 => (replica_id.clone(), state, arb_at_ms())
            .prop_map(|(replica_id, state, at_ms)| Command::SetReplicaState { replica_id, state, at_ms }),
        4 => (replica_id, arb_at_ms()).prop_map(|(replica_id, at_ms)| Command::RemoveReplica { replica_id, at_ms }),
    ]
}

fn arb_training_job_command() -> impl Strategy<Value = Command> {
    let job_id = prop::sample::select(vec!["j0", "j1"]).prop_map(JobId::from);
    let placement = (job_id.clone(), arb_node_id(), arb_gpu_indices(), arb_memory_mib()).prop_map(
        |(job_id, node_id, gpu_indices, memory_per_gpu_mib)| TrainingJobPlacement {
            job_id,
            base_model: "m".to_owned(),
            node_id,
            gpu_indices,
            memory_per_gpu_mib,
        },
    );
    let state = prop::sample::select(vec![
        TrainingJobState::Pending,
        TrainingJobState::Running,
        TrainingJobState::Succeeded,
        TrainingJobState::Failed { reason: "nan".to_owned() },
        TrainingJobState::Cancelled,
    ]);
    prop_oneof![
        3 => (placement, arb_gpu_reserve_mib(), arb_at_ms()).prop_map(|(placement, gpu_reserve_mib, at_ms)| {
            Command::PutTrainingJob { placement, gpu_reserve_mib, at_ms }
        }),
        2 => (job_id.clone(), state, arb_at_ms())
            .prop_map(|(job_id, state, at_ms)| Command::SetTrainingJobState { job_id, state, at_ms }),
        1 => (job_id, arb_at_ms()).prop_map(|(job_id, at_ms)| Command::RemoveTrainingJob { job_id, at_ms }),
    ]
}

fn arb_kb_shard_command() -> impl Strategy<Value = Command> {
    let shard_id = prop::sample::select(vec!["s0", "s1"]).prop_map(ShardId::from);
    let placement = (shard_id.clone(), prop::sample::select(vec!["kb0", "kb1"]), 0u64..4, 0u64..4, arb_node_id())
        .prop_map(|(shard_id, knowledge_base_id, start, end_inclusive, node_id)| KbShardPlacement {
            shard_id,
            knowledge_base_id: knowledge_base_id.to_owned(),
            hash_range: HashRange { start, end_inclusive },
            node_id,
        });
    let state = prop::sample::select(vec![
        KbShardState::Pending,
        KbShardState::Loading,
        KbShardState::Serving,
        KbShardState::Failed { reason: "corrupt".to_owned() },
        KbShardState::Stopping,
    ]);
    prop_oneof![
        3 => (placement.clone(), arb_at_ms()).prop_map(|(placement, at_ms)| Command::PutKbShard { placement, at_ms }),
        1 => (prop::sample::select(vec!["kb0", "kb1"]), prop::collection::vec(placement, 0..3), arb_at_ms()).prop_map(
            |(knowledge_base_id, placements, at_ms)| Command::PlaceKbShards {
                knowledge_base_id: knowledge_base_id.to_owned(),
                placements,
                at_ms,
            }
        ),
        2 => (shard_id.clone(), state, arb_at_ms())
            .prop_map(|(shard_id, state, at_ms)| Command::SetKbShardState { shard_id, state, at_ms }),
        1 => (shard_id, arb_at_ms()).prop_map(|(shard_id, at_ms)| Command::RemoveKbShard { shard_id, at_ms }),
    ]
}

fn arb_label_key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["zone", "gpu", "rack", "example.com/tier", "a.b-c_d"]).prop_map(str::to_owned)
}

/// Which of two clients changes a key (1 or 2), and to what (`None`: removes it).
fn arb_label_change() -> impl Strategy<Value = (usize, Option<String>)> {
    (1usize..=2, prop::option::of("[ab]"))
}

/// Any command, weighted towards placements and lifecycle changes so that sequences
/// press against SCH-1 more often than they tear the cluster down.
fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        8 => arb_node_command(),
        4 => arb_deployment_command(),
        32 => arb_replica_command(),
        12 => arb_training_job_command(),
        12 => arb_kb_shard_command(),
    ]
}

/// A short setup that always applies (two alive nodes with GPUs, a node that left, two
/// deployments), then random commands, so that placements often find something to place
/// on and the rules about leaving are often tried.
fn arb_commands() -> impl Strategy<Value = Vec<Command>> {
    prop::collection::vec(arb_command(), 0..40).prop_map(|random| {
        let mut node_a = node_spec(1, "a", vec![gpu(0, 24_000), gpu(1, 24_000)]);
        node_a.labels = labels(&[("zone", "a")]);
        let mut pair = deployment_spec(2, 8_000, false);
        pair.node_selector = labels(&[("zone", "a")]);
        let mut commands = vec![
            register(node_a),
            register(node_spec(2, "b", vec![gpu(0, 16_000)])),
            register(node_spec(4, "d", vec![])),
            set_status(4, NodeStatus::Left),
            put_deployment("d0", deployment_spec(1, 8_000, true), 2),
            put_deployment("d1", pair, 1),
        ];
        commands.extend(random);
        commands
    })
}

/// The generator is only worth its cases if it reaches both outcomes of every op and
/// often presses against SCH-1: this runs 256 generated sequences from a fixed seed and
/// counts.
#[test]
fn the_generated_sequences_reach_acceptance_and_rejection_of_every_op() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]));
    let mut outcomes: BTreeMap<&'static str, (u32, u32)> = BTreeMap::new();
    let mut sch1_refusals = 0;
    for _ in 0..256 {
        let commands = arb_commands().new_tree(&mut runner).unwrap().current();
        let mut state = ClusterState::default();
        for (index, command) in (1u64..).zip(commands) {
            let op = command.op();
            let counts = outcomes.entry(op).or_default();
            match state.apply(index, command) {
                Ok(_) => counts.0 += 1,
                Err(rejection) => {
                    counts.1 += 1;
                    if matches!(rejection, Rejection::GpuMemoryExhausted { .. }) {
                        sch1_refusals += 1;
                    }
                }
            }
        }
    }
    eprintln!("{outcomes:?}; {sch1_refusals} refused by SCH-1");
    assert_eq!(outcomes.len(), 17, "ops generated: {outcomes:?}");
    assert!(sch1_refusals >= 50, "only {sch1_refusals} placements were refused for lack of gpu memory");
    for (op, (accepted, rejected)) in &outcomes {
        assert!(*accepted > 0 && *rejected > 0, "{op}: {accepted} accepted, {rejected} rejected");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_same_commands_give_the_same_state_and_results(commands in arb_commands()) {
        let mut first = ClusterState::default();
        let mut second = ClusterState::default();
        for (index, command) in (1u64..).zip(commands) {
            let first_outcome = first.apply(index, command.clone());
            let second_outcome = second.apply(index, command);
            prop_assert_eq!(first_outcome, second_outcome);
        }
        prop_assert_eq!(first.snapshot(), second.snapshot());
        prop_assert_eq!(first, second);
    }

    #[test]
    fn a_rejected_command_changes_nothing(commands in arb_commands()) {
        let mut state = ClusterState::default();
        for (index, command) in (1u64..).zip(commands) {
            let before = state.clone();
            if state.apply(index, command).is_err() {
                prop_assert_eq!(&state, &before);
            }
        }
    }

    #[test]
    fn a_snapshot_restores_to_an_equal_state_at_every_step(commands in arb_commands()) {
        let mut state = ClusterState::default();
        for (index, command) in (1u64..).zip(commands) {
            let _ = state.apply(index, command);
            let mut restored = ClusterState::default();
            restored.restore(&state.snapshot()).unwrap();
            prop_assert_eq!(&restored, &state);
        }
    }

    #[test]
    fn sch1_holds_after_every_step(commands in arb_commands()) {
        let mut state = ClusterState::default();
        for (index, command) in (1u64..).zip(commands) {
            let description = format!("{command:?}");
            let _ = state.apply(index, command);
            prop_assert!(sch1_holds(&state), "after {}: {:?}", description, sch1_violations(&state));
        }
    }

    /// Two clients relabel the same node, each touching keys the other does not: whichever
    /// commits first, every key of both ends as its client asked.
    #[test]
    fn relabels_of_different_keys_keep_each_other(
        start in prop::collection::btree_map(arb_label_key(), "[ab]", 0..=4),
        plan in prop::collection::btree_map(arb_label_key(), arb_label_change(), 0..=4),
    ) {
        let mut base = base_state();
        apply_ok(&mut base, Command::RegisterNode {
            node: NodeSpec { labels: start.clone(), ..node_spec(6, "gpu-f", vec![]) },
            at_ms: 1,
        });
        let client = |which: usize| {
            let mut set = BTreeMap::new();
            let mut remove = BTreeSet::new();
            for (key, (owner, value)) in &plan {
                match (owner == &which, value) {
                    (true, Some(value)) => { set.insert(key.clone(), value.clone()); }
                    (true, None) => { remove.insert(key.clone()); }
                    (false, _) => {}
                }
            }
            Command::SetNodeLabels { node_id: NodeId(6), set, remove, at_ms: 2 }
        };
        let mut expected = start;
        for (key, (_, value)) in &plan {
            match value {
                Some(value) => { expected.insert(key.clone(), value.clone()); }
                None => { expected.remove(key); }
            }
        }
        let mut one_then_two = base.clone();
        apply_ok(&mut one_then_two, client(1));
        apply_ok(&mut one_then_two, client(2));
        let mut two_then_one = base;
        apply_ok(&mut two_then_one, client(2));
        apply_ok(&mut two_then_one, client(1));
        prop_assert_eq!(&one_then_two.node(NodeId(6)).unwrap().labels, &expected);
        prop_assert_eq!(one_then_two, two_then_one);
    }

    #[test]
    fn every_command_survives_its_wire_format(command in arb_command()) {
        let json = command.to_json();
        let head = format!(r#"{{"v":{COMMAND_FORMAT_VERSION},"op":"{}","#, command.op());
        prop_assert!(json.starts_with(head.as_bytes()), "{}", String::from_utf8_lossy(&json));
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(&value["v"], &serde_json::Value::from(COMMAND_FORMAT_VERSION));
        prop_assert_eq!(&value["op"], &serde_json::Value::from(command.op()));
        prop_assert_eq!(Command::from_json(&json).unwrap(), command);
    }
}

#[test]
fn a_restarted_node_keeps_the_labels_an_operator_set() {
    use maas_consensus::StateMachine;
    use maas_consensus::state::{ClusterState, Command, NodeId, NodeResources, NodeSpec};
    let spec = |labels: &[(&str, &str)]| NodeSpec {
        id: NodeId(7),
        name: "gpu-7".into(),
        api_addr: "http://127.0.0.1:8080".into(),
        cluster_addr: "127.0.0.1:7070".into(),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        resources: NodeResources::default(),
    };
    let mut state = ClusterState::default();
    state.apply(1, Command::RegisterNode { node: spec(&[("zone", "a")]), at_ms: 1 }).unwrap();
    let set = [("tier".to_owned(), "gold".to_owned())].into_iter().collect();
    state
        .apply(
            2,
            Command::SetNodeLabels { node_id: NodeId(7), set, remove: std::collections::BTreeSet::new(), at_ms: 2 },
        )
        .unwrap();
    // The node restarts with a changed configuration: its own labels win, the operator's stay.
    state.apply(3, Command::RegisterNode { node: spec(&[("zone", "b")]), at_ms: 3 }).unwrap();
    let labels = &state.node(NodeId(7)).unwrap().labels;
    assert_eq!(labels.get("zone").map(String::as_str), Some("b"));
    assert_eq!(labels.get("tier").map(String::as_str), Some("gold"));
}
