//! Pure placement: `(ClusterSnapshot, Demand) -> Plan`, VRAM estimation, strategies
//! (binpack, spread) and constraints (node selectors, health, multi-GPU, CPU fallback,
//! preemption).
//!
//! **Boundary:** no IO, no async, no clocks, no unseeded randomness: plain data in, plain
//! data out. The control plane converts its state into a [`ClusterSnapshot`] and a
//! [`Demand`], calls [`plan`], and proposes the resulting [`Plan`].
//!
//! **Invariants** (DESIGN.md), each with one predicate here:
//! - SCH-1, no GPU is promised more than `total - reserve`: [`sch1_holds`].
//! - SCH-2, an N-GPU replica gets N distinct GPUs of one node: [`sch2_holds`].
//! - SCH-3, the same snapshot and demand give the same plan, whatever the order of the
//!   input vectors: the planner only iterates sorted maps and breaks ties by ids.

mod error;
pub mod estimate;
mod invariants;
mod planner;
mod shards;
mod types;

pub use error::{Result, ScheduleError};
pub use estimate::{EstimateError, GgufValue, VramEstimate, estimate_from_gguf_metadata, estimate_from_hf_config};
pub use invariants::{apply, sch1_holds, sch2_holds};
pub use planner::{plan, validate};
pub use shards::place_shards;
pub use types::{
    Action, Closest, ClusterSnapshot, Demand, DeploymentDemand, GpuView, NodeView, PlacedReplica, Plan, ReplicaRequest,
    Strategy, Unplaceable,
};
