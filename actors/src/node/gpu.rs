//! `GpuActor`: one per GPU of this node. It owns the GPU's memory leases (what the
//! replicas and jobs placed on it hold) and its latest telemetry. Its rules are in
//! [`GpuState`], a plain struct; the actor only dispatches.

use std::collections::BTreeMap;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use serde::Serialize;

/// What a GPU actor starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuSpec {
    pub index: u32,
    pub model: String,
    pub memory_total_mib: u64,
    /// Kept free for the CUDA context and fragmentation (`node.gpu_memory_reserve_mib`).
    pub reserve_mib: u64,
    pub simulated: bool,
}

/// A GPU's measured state, when the driver reports one (never for a simulated GPU).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuTelemetry {
    pub memory_used_mib: u64,
    pub utilization_percent: Option<u32>,
    pub temperature_celsius: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuState {
    pub spec: GpuSpec,
    /// Holder (a replica or job id) → MiB leased.
    pub leases: BTreeMap<String, u64>,
    pub telemetry: Option<GpuTelemetry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error(
        "gpu {index} has {free_mib} MiB free after its {reserve_mib} MiB reserve; {need_mib} MiB were asked for {holder}"
    )]
    InsufficientMemory { index: u32, holder: String, need_mib: u64, free_mib: u64, reserve_mib: u64 },
    #[error("{holder} already holds {held_mib} MiB on gpu {index}; release it first")]
    AlreadyLeased { index: u32, holder: String, held_mib: u64 },
}

impl GpuState {
    pub fn new(spec: GpuSpec) -> Self {
        GpuState { spec, leases: BTreeMap::new(), telemetry: None }
    }

    pub fn leased_mib(&self) -> u64 {
        self.leases.values().sum()
    }

    /// Memory that can still be leased: total less the reserve less the leases (SCH-1).
    pub fn free_mib(&self) -> u64 {
        self.spec.memory_total_mib.saturating_sub(self.spec.reserve_mib).saturating_sub(self.leased_mib())
    }

    /// Leases `mib` to `holder`, or refuses (changing nothing) past the free memory.
    pub fn reserve(&mut self, holder: &str, mib: u64) -> Result<(), GpuError> {
        if let Some(held_mib) = self.leases.get(holder) {
            return Err(GpuError::AlreadyLeased {
                index: self.spec.index,
                holder: holder.to_owned(),
                held_mib: *held_mib,
            });
        }
        let free_mib = self.free_mib();
        if mib > free_mib {
            return Err(GpuError::InsufficientMemory {
                index: self.spec.index,
                holder: holder.to_owned(),
                need_mib: mib,
                free_mib,
                reserve_mib: self.spec.reserve_mib,
            });
        }
        self.leases.insert(holder.to_owned(), mib);
        Ok(())
    }

    /// Ends `holder`'s lease; returns whether it had one.
    pub fn release(&mut self, holder: &str) -> bool {
        self.leases.remove(holder).is_some()
    }
}

#[derive(RactorMessage)]
pub enum GpuMsg {
    Reserve { holder: String, mib: u64, reply: RpcReplyPort<Result<(), GpuError>> },
    Release { holder: String },
    Telemetry(GpuTelemetry),
    Snapshot(RpcReplyPort<GpuState>),
}

pub struct GpuActor;

impl Actor for GpuActor {
    type Msg = GpuMsg;
    type State = GpuState;
    type Arguments = GpuSpec;

    async fn pre_start(&self, _myself: ActorRef<GpuMsg>, spec: GpuSpec) -> Result<GpuState, ActorProcessingErr> {
        Ok(GpuState::new(spec))
    }

    async fn handle(
        &self,
        _myself: ActorRef<GpuMsg>,
        message: GpuMsg,
        state: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GpuMsg::Reserve { holder, mib, reply } => {
                let _ = reply.send(state.reserve(&holder, mib));
            }
            GpuMsg::Release { holder } => {
                state.release(&holder);
            }
            GpuMsg::Telemetry(telemetry) => state.telemetry = Some(telemetry),
            GpuMsg::Snapshot(reply) => {
                let _ = reply.send(state.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu() -> GpuState {
        GpuState::new(GpuSpec {
            index: 0,
            model: "H100".into(),
            memory_total_mib: 81920,
            reserve_mib: 1024,
            simulated: true,
        })
    }

    #[test]
    fn leases_never_exceed_total_less_reserve() {
        let mut state = gpu();
        state.reserve("a", 40000).unwrap();
        state.reserve("b", 40896).unwrap();
        assert_eq!(state.free_mib(), 0);
        let before = state.clone();
        assert!(matches!(state.reserve("c", 1), Err(GpuError::InsufficientMemory { free_mib: 0, need_mib: 1, .. })));
        assert!(matches!(state.reserve("a", 1), Err(GpuError::AlreadyLeased { held_mib: 40000, .. })));
        assert_eq!(state, before, "a refused lease changes nothing");
        assert!(state.release("a"));
        assert!(!state.release("a"));
        assert_eq!(state.free_mib(), 40000);
    }
}
