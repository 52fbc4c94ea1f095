//! The node's own actors: the `NodeAgent`, which reconciles local actors with the
//! committed cluster state, and the `GpuActor`s it supervises.

pub mod agent;
pub mod gpu;

pub use agent::{AgentConfig, AgentMsg, AgentStatus, GpuActorStatus, NodeAgent};
pub use gpu::{GpuActor, GpuError, GpuMsg, GpuSpec, GpuState, GpuTelemetry};
