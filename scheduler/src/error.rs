//! The crate's error type. Its messages double as the reasons in [`crate::Unplaceable`].

/// Why a deployment cannot be (fully) placed, or why the input is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// No healthy node carries the deployment's labels.
    #[error(
        "no healthy node matches the node selector of {deployment_id} ({selector}); label a node or relax the selector"
    )]
    NoEligibleNode { deployment_id: String, selector: String },
    /// Eligible nodes exist but none has enough GPUs for the tensor-parallel degree.
    #[error(
        "no eligible node of {deployment_id} has {gpus} gpus (the most is {most}); lower the tensor-parallel degree or add a larger node"
    )]
    NotEnoughGpus { deployment_id: String, gpus: u32, most: u32 },
    /// GPUs exist but none has enough free memory.
    #[error(
        "no gpu fits {deployment_id}: needs {need_mib} MiB on each of {gpus} GPUs of one node; closest is node {node_id} GPU {gpu_index} with {free_mib} MiB free, {short_mib} MiB short; free memory, add GPUs or allow preemption"
    )]
    NoGpuFits {
        deployment_id: String,
        need_mib: u64,
        gpus: u32,
        node_id: u64,
        gpu_index: u32,
        free_mib: u64,
        short_mib: u64,
    },
    /// The replica's host (CPU and memory) needs fit on no eligible node.
    #[error(
        "no node has {cpu_cores} free cpu cores and {memory_mib} MiB free host memory for {deployment_id}; closest is node {node_id} with {cpu_free_cores} cores and {memory_free_mib} MiB free"
    )]
    HostResourcesShort {
        deployment_id: String,
        cpu_cores: u32,
        memory_mib: u64,
        node_id: u64,
        cpu_free_cores: u32,
        memory_free_mib: u64,
    },
    /// The replica would only fit across nodes, which is not supported yet.
    #[error(
        "{deployment_id} allows multi-node replicas but they are not supported yet and no single node fits {gpus} gpus of {need_mib} MiB; free memory on one node or lower the tensor-parallel degree"
    )]
    MultiNodeUnsupported { deployment_id: String, gpus: u32, need_mib: u64 },
    /// Two deployments in the demand share an id.
    #[error("deployment id {0} appears more than once in the demand; give each deployment a unique id")]
    DuplicateDeployment(String),
    /// Two nodes in the snapshot share an id.
    #[error("node id {0} appears more than once in the snapshot; node ids must be unique")]
    DuplicateNode(u64),
    /// Two replicas in the snapshot share an id.
    #[error("replica id {0} appears more than once in the snapshot; replica ids must be unique")]
    DuplicateReplica(String),
}

/// The crate's result alias.
pub type Result<T, E = ScheduleError> = std::result::Result<T, E>;
