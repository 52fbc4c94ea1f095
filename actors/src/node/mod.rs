//! The node's own actors: the `NodeAgent`, which reconciles local actors with the
//! committed cluster state, and the `GpuActor`s, `ReplicaActor`s and `KbShardActor`s it
//! supervises.

pub mod agent;
pub mod estimate;
pub mod gpu;
pub mod journal;
pub mod kb_shard;
pub mod replica;
pub mod serving;

pub use agent::{AgentConfig, AgentMsg, AgentStatus, GpuActorStatus, LocalReplicaStatus, NodeAgent};
pub use gpu::{GpuActor, GpuError, GpuMsg, GpuSpec, GpuState, GpuTelemetry};
pub use journal::{Journal, LogLevel, LogLine, ReplicaLog};
pub use kb_shard::{KbShardActor, KbShardTable, LocalShard, ShardCounts};
pub use replica::{
    LoadFuture, LoadedReplica, LocalReplicaState, ModelPathRuntime, ReplicaActor, ReplicaRuntime, ReplicaSpec,
};
pub use serving::{ServingModel, ServingTable};
