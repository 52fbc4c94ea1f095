//! The supervised actors of a node: a `GpuActor` per GPU, `ReplicaActor`s, training-job
//! actors, knowledge-base shard actors and session actors, under a `NodeSupervisor`
//! (see ARCHITECTURE.md).
//!
//! What runs today is the cluster transport ([`transport`]): raft messages between nodes
//! over ractor_cluster, under its own supervisor; the node agent ([`node`]) with its GPU
//! and replica actors; and the chat sessions ([`session`]) under their supervisor.
//!
//! **Boundary:** actors translate between the world and pure cores; they never decide
//! placement (that is `maas-scheduler`'s).

pub mod error;
pub mod models;
pub mod node;
pub mod session;
pub mod transport;

pub use error::{ActorsError, Result};
pub use transport::{ClusterConfig, ClusterTransport, PeerState, RaftSink, TransportStats};
