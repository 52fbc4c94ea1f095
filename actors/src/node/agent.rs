//! `NodeAgent`: watches the committed cluster state and reconciles this node's local
//! actors with it. Today those are the `GpuActor`s: one per GPU the node is registered
//! with, holding a lease for every replica and training job placed on that GPU. A GPU
//! actor that fails is restarted (and its leases re-issued from the committed state) at
//! most `max_restarts` times per `restart_window`; after that it stays down and its
//! failure shows in [`AgentStatus`], which the API serves.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use maas_consensus::RaftHandle;
use maas_consensus::state::{ClusterState, NodeId};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;
use serde::Serialize;

use super::gpu::{GpuActor, GpuMsg, GpuSpec};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: u64,
    /// Memory kept free on every GPU (`node.gpu_memory_reserve_mib`).
    pub gpu_reserve_mib: u64,
    pub reconcile_every: Duration,
    pub max_restarts: usize,
    pub restart_window: Duration,
}

impl AgentConfig {
    pub fn new(node_id: u64, gpu_reserve_mib: u64) -> Self {
        AgentConfig {
            node_id,
            gpu_reserve_mib,
            reconcile_every: Duration::from_millis(500),
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
        }
    }
}

/// What the agent runs, as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentStatus {
    pub node_id: u64,
    pub gpus: Vec<GpuActorStatus>,
    /// Reconciliations done so far.
    pub reconciliations: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuActorStatus {
    pub index: u32,
    pub model: String,
    pub simulated: bool,
    pub memory_total_mib: u64,
    pub reserve_mib: u64,
    pub leased_mib: u64,
    pub free_mib: u64,
    /// Holder → MiB.
    pub leases: BTreeMap<String, u64>,
    pub restarts: usize,
    /// Why the actor is down for good (its restart budget is spent), if it is.
    pub failed: Option<String>,
}

#[derive(RactorMessage)]
pub enum AgentMsg {
    Reconcile,
}

pub struct NodeAgent;

pub struct AgentState {
    config: AgentConfig,
    control: RaftHandle<ClusterState>,
    status: Arc<RwLock<AgentStatus>>,
    gpus: BTreeMap<u32, ActorRef<GpuMsg>>,
    by_actor: HashMap<ActorId, u32>,
    restarts: BTreeMap<u32, Vec<Instant>>,
    failed: BTreeMap<u32, String>,
}

impl Actor for NodeAgent {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = (AgentConfig, RaftHandle<ClusterState>, Arc<RwLock<AgentStatus>>);

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        (config, control, status): Self::Arguments,
    ) -> Result<AgentState, ActorProcessingErr> {
        myself.send_interval(config.reconcile_every, || AgentMsg::Reconcile);
        let _ = myself.cast(AgentMsg::Reconcile);
        Ok(AgentState {
            config,
            control,
            status,
            gpus: BTreeMap::new(),
            by_actor: HashMap::new(),
            restarts: BTreeMap::new(),
            failed: BTreeMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        message: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentMsg::Reconcile => state.reconcile(&myself).await,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<AgentMsg>,
        event: SupervisionEvent,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, how) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped ({})", reason.as_deref().unwrap_or("no reason given")))
            }
            _ => return Ok(()),
        };
        let Some(index) = state.by_actor.remove(&cell.get_id()) else { return Ok(()) };
        state.gpus.remove(&index);
        let now = Instant::now();
        let window = state.config.restart_window;
        let recent = state.restarts.entry(index).or_default();
        recent.retain(|at| now.duration_since(*at) < window);
        recent.push(now);
        if recent.len() > state.config.max_restarts {
            let reason =
                format!("gpu actor {index} {how}; {} restarts within {window:?}, so it stays down", recent.len() - 1);
            tracing::error!(node_id = state.config.node_id, gpu = index, "{reason}");
            state.failed.insert(index, reason);
        } else {
            // The next reconciliation starts it again and re-issues its leases.
            tracing::error!(node_id = state.config.node_id, gpu = index, "gpu actor {how}; restarting it");
        }
        Ok(())
    }
}

impl AgentState {
    /// Brings the running GPU actors and their leases in line with the committed state.
    async fn reconcile(&mut self, myself: &ActorRef<AgentMsg>) {
        let node_id = NodeId(self.config.node_id);
        let (desired, holders) = self.control.read_local(|cluster| {
            let gpus: BTreeMap<u32, GpuSpec> = cluster
                .node(node_id)
                .map(|node| {
                    node.resources
                        .gpus
                        .iter()
                        .map(|gpu| {
                            let spec = GpuSpec {
                                index: gpu.index,
                                model: gpu.model.clone(),
                                memory_total_mib: gpu.memory_total_mib,
                                reserve_mib: self.config.gpu_reserve_mib,
                                simulated: gpu.simulated,
                            };
                            (gpu.index, spec)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut holders: BTreeMap<u32, BTreeMap<String, u64>> = BTreeMap::new();
            for replica in cluster.replicas_on_node(node_id) {
                for index in &replica.gpu_indices {
                    holders.entry(*index).or_default().insert(replica.id.0.clone(), replica.memory_per_gpu_mib);
                }
            }
            for job in cluster.training_jobs_on_node(node_id) {
                for index in &job.gpu_indices {
                    holders.entry(*index).or_default().insert(job.id.0.clone(), job.memory_per_gpu_mib);
                }
            }
            (gpus, holders)
        });
        // Stop actors of GPUs the node no longer has.
        let gone: Vec<u32> = self.gpus.keys().copied().filter(|index| !desired.contains_key(index)).collect();
        for index in gone {
            if let Some(actor) = self.gpus.remove(&index) {
                self.by_actor.remove(&actor.get_id());
                actor.stop(Some("the gpu is no longer registered".into()));
            }
        }
        let mut status = AgentStatus { node_id: self.config.node_id, gpus: Vec::new(), reconciliations: 0 };
        for (index, spec) in &desired {
            if !self.gpus.contains_key(index) && !self.failed.contains_key(index) {
                let name = gpu_actor_name(self.config.node_id, *index);
                match Actor::spawn_linked(Some(name), GpuActor, spec.clone(), myself.get_cell()).await {
                    Ok((actor, _)) => {
                        self.by_actor.insert(actor.get_id(), *index);
                        self.gpus.insert(*index, actor);
                    }
                    Err(err) => tracing::error!(gpu = index, error = %err, "cannot start a gpu actor"),
                }
            }
            let wanted = holders.get(index).cloned().unwrap_or_default();
            let snapshot = match self.gpus.get(index) {
                Some(actor) => sync_leases(actor, &wanted).await,
                None => None,
            };
            status.gpus.push(GpuActorStatus {
                index: *index,
                model: spec.model.clone(),
                simulated: spec.simulated,
                memory_total_mib: spec.memory_total_mib,
                reserve_mib: spec.reserve_mib,
                leased_mib: snapshot.as_ref().map_or(0, super::gpu::GpuState::leased_mib),
                free_mib: snapshot.as_ref().map_or(0, super::gpu::GpuState::free_mib),
                leases: snapshot.map(|s| s.leases).unwrap_or_default(),
                restarts: self.restarts.get(index).map_or(0, Vec::len),
                failed: self.failed.get(index).cloned(),
            });
        }
        let mut shared = self.status.write().expect("agent status lock");
        status.reconciliations = shared.reconciliations + 1;
        *shared = status;
    }
}

/// The registered name of a GPU actor: unique in the cluster, as ractor names must be.
pub fn gpu_actor_name(node_id: u64, index: u32) -> String {
    format!("maas.gpu.{node_id}.{index}")
}

/// Makes one GPU actor hold exactly the `wanted` leases; returns its state after.
async fn sync_leases(actor: &ActorRef<GpuMsg>, wanted: &BTreeMap<String, u64>) -> Option<super::gpu::GpuState> {
    let held = ractor::call_t!(actor, GpuMsg::Snapshot, 2000).ok()?;
    for holder in held.leases.keys().filter(|holder| !wanted.contains_key(*holder)) {
        let _ = actor.cast(GpuMsg::Release { holder: holder.clone() });
    }
    for (holder, mib) in wanted.iter().filter(|(holder, _)| !held.leases.contains_key(*holder)) {
        let granted =
            ractor::call_t!(actor, |reply| GpuMsg::Reserve { holder: holder.clone(), mib: *mib, reply }, 2000);
        if let Ok(Err(refused)) = granted {
            // The committed state promised more than the GPU has (SCH-1 broken upstream):
            // say so loudly rather than run over.
            tracing::error!(%refused, "a placement does not fit its gpu");
        }
    }
    ractor::call_t!(actor, GpuMsg::Snapshot, 2000).ok()
}
