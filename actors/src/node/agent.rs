//! `NodeAgent`: watches the committed cluster state and reconciles this node's local
//! actors with it:
//!
//! - a `GpuActor` per GPU the node is registered with, holding a lease for every replica
//!   and training job placed on that GPU. A GPU actor that fails is restarted (and its
//!   leases re-issued from the committed state) at most `max_restarts` times per
//!   `restart_window`; after that it stays down and its failure shows in [`AgentStatus`],
//!   which the API serves.
//! - a `ReplicaActor` per replica placed on the node. The agent commits what its replicas
//!   report (`loading`, `ready`, `failed`) as their replica state; it stops a replica the
//!   leader marked `stopping` and then removes it from the state; it stops a replica the
//!   state no longer holds (its node was declared dead and it was placed elsewhere, REC-1).
//!   A replica that fails to load is started again after a back-off, at most `max_restarts`
//!   times per `restart_window`; then it stays `failed`.
//! - a `KbShardActor` per knowledge-base shard placed on the node (see [`super::kb_shard`]).
//!   The agent commits `loading` once the shard is open and `serving` once the gateway has
//!   caught it up with SQL; a shard the state no longer places here (moved after this node
//!   was declared dead, or drained) is retired and its files removed; a `stopping` shard
//!   (its knowledge base was deleted) is retired and then removed from the state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use maas_consensus::RaftHandle;
use maas_consensus::state::{
    ClusterState, Command, DeploymentOwner, KbShardRecord, KbShardState, NodeId, ReplicaId, ReplicaState, ShardId,
};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;
use serde::Serialize;

use super::gpu::{GpuActor, GpuMsg, GpuSpec};
use super::kb_shard::{KbShardActor, KbShardArgs, KbShardMsg, KbShardTable, kb_shard_actor_name};
use super::replica::{
    LocalReplicaState, ReplicaActor, ReplicaArgs, ReplicaMsg, ReplicaRuntime, ReplicaSpec, replica_actor_name,
};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: u64,
    /// Memory kept free on every GPU (`node.gpu_memory_reserve_mib`).
    pub gpu_reserve_mib: u64,
    pub reconcile_every: Duration,
    pub max_restarts: usize,
    pub restart_window: Duration,
    /// The wait before a failed replica is started again, times its recent failures.
    pub replica_backoff: Duration,
    /// Where Ready replicas put their loaded models for the gateway.
    pub serving: super::ServingTable,
    /// The deployments' logs on this node.
    pub journal: super::Journal,
    /// Where shard actors put their open indexes for the gateway.
    pub kb_shards: KbShardTable,
    /// The folder of this node's knowledge-base shards (`<data>/knowledge/shards`);
    /// `None`: this agent runs no shards.
    pub shard_root: Option<std::path::PathBuf>,
}

impl AgentConfig {
    pub fn new(node_id: u64, gpu_reserve_mib: u64) -> Self {
        AgentConfig {
            node_id,
            gpu_reserve_mib,
            reconcile_every: Duration::from_millis(500),
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            replica_backoff: Duration::from_secs(1),
            serving: super::ServingTable::default(),
            journal: super::Journal::new(node_id),
            kb_shards: KbShardTable::default(),
            shard_root: None,
        }
    }
}

/// What the agent runs, as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentStatus {
    pub node_id: u64,
    pub gpus: Vec<GpuActorStatus>,
    pub replicas: Vec<LocalReplicaStatus>,
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
    /// Held by replicas that are loading or loaded (a simulated GPU's use; a real GPU's
    /// driver-measured use comes with its telemetry).
    pub used_mib: u64,
    pub free_mib: u64,
    /// The driver's measure of how busy the GPU is (real GPUs with telemetry only).
    pub utilization_percent: Option<u32>,
    /// Holder → MiB.
    pub leases: BTreeMap<String, u64>,
    pub restarts: usize,
    /// Why the actor is down for good (its restart budget is spent), if it is.
    pub failed: Option<String>,
}

/// A replica actor on this node, as the agent last heard from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalReplicaStatus {
    pub replica_id: String,
    pub deployment_id: String,
    pub running: bool,
    pub local: Option<LocalReplicaState>,
    pub committed: String,
    /// Starts after a failure within the restart window.
    pub restarts: usize,
}

#[derive(RactorMessage)]
pub enum AgentMsg {
    Reconcile,
    /// A replica actor's news.
    ReplicaReport {
        replica_id: String,
        state: LocalReplicaState,
    },
    /// A shard actor opened its shard, or could not (`failed`).
    ShardReport {
        shard_id: String,
        failed: Option<String>,
    },
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
    runtime: Arc<dyn ReplicaRuntime>,
    replicas: BTreeMap<String, ActorRef<ReplicaMsg>>,
    /// Replica actor → (replica, deployment).
    replica_by_actor: HashMap<ActorId, (String, String)>,
    /// What each replica actor last reported; kept after it stops (a failure).
    local: BTreeMap<String, LocalReplicaState>,
    replica_starts: BTreeMap<String, Vec<Instant>>,
    /// Replicas whose restart budget is spent.
    given_up: BTreeSet<String>,
    /// When a change of each replica or shard was last proposed, so a slow commit is not
    /// flooded.
    proposed_at: BTreeMap<String, Instant>,
    shards: BTreeMap<String, ActorRef<KbShardMsg>>,
    shard_by_actor: HashMap<ActorId, String>,
    /// Shards that failed to open or whose actor failed: why, and when (a retry waits).
    shard_failed: BTreeMap<String, (String, Instant)>,
    /// Whether the shard folders left from before a restart were looked through.
    shards_swept: bool,
}

impl Actor for NodeAgent {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = (AgentConfig, RaftHandle<ClusterState>, Arc<RwLock<AgentStatus>>, Arc<dyn ReplicaRuntime>);

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        (config, control, status, runtime): Self::Arguments,
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
            runtime,
            replicas: BTreeMap::new(),
            replica_by_actor: HashMap::new(),
            local: BTreeMap::new(),
            replica_starts: BTreeMap::new(),
            given_up: BTreeSet::new(),
            proposed_at: BTreeMap::new(),
            shards: BTreeMap::new(),
            shard_by_actor: HashMap::new(),
            shard_failed: BTreeMap::new(),
            shards_swept: false,
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
            AgentMsg::ReplicaReport { replica_id, state: local } => {
                // A failing actor stops itself right after its report, and its stop may be
                // handled first: a report of a replica still placed here counts either way.
                if let Some(known) = state.local.get_mut(&replica_id) {
                    *known = local;
                    state.reconcile(&myself).await;
                }
            }
            AgentMsg::ShardReport { shard_id, failed } => {
                if let Some(reason) = failed {
                    state.shard_failed.insert(shard_id, (reason, Instant::now()));
                }
                state.reconcile_shards(&myself).await;
            }
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
        if let Some(shard_id) = state.shard_by_actor.remove(&cell.get_id()) {
            state.shards.remove(&shard_id);
            if how.starts_with("failed") {
                tracing::error!(shard = %shard_id, "the shard actor {how}");
                state.shard_failed.insert(shard_id, (format!("the shard actor {how}"), Instant::now()));
            }
            return Ok(());
        }
        if let Some((replica_id, deployment_id)) = state.replica_by_actor.remove(&cell.get_id()) {
            state.replicas.remove(&replica_id);
            if !matches!(state.local.get(&replica_id), Some(LocalReplicaState::Failed(_))) && how.starts_with("failed")
            {
                state.config.journal.error(&deployment_id, &replica_id, format!("the replica actor {how}"));
                state.local.insert(replica_id.clone(), LocalReplicaState::Failed(format!("the replica actor {how}")));
            }
            return Ok(());
        }
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
    /// Brings the running GPU actors, their leases and the replica actors in line with the
    /// committed state.
    async fn reconcile(&mut self, myself: &ActorRef<AgentMsg>) {
        let (desired, holders, placed) = self.committed();
        self.reconcile_replicas(myself, &placed).await;
        self.reconcile_shards(myself).await;

        // Stop actors of GPUs the node no longer has.
        let gone: Vec<u32> = self.gpus.keys().copied().filter(|index| !desired.contains_key(index)).collect();
        for index in gone {
            if let Some(actor) = self.gpus.remove(&index) {
                self.by_actor.remove(&actor.get_id());
                actor.stop(Some("the gpu is no longer registered".into()));
            }
        }
        let mut status = AgentStatus { node_id: self.config.node_id, ..AgentStatus::default() };
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
            let used_mib = placed
                .values()
                .filter(|(spec, _)| spec.gpu_indices.contains(index))
                .filter(|(spec, _)| {
                    matches!(
                        self.local.get(&spec.replica_id),
                        Some(LocalReplicaState::Loading | LocalReplicaState::Ready(_))
                    ) && self.replicas.contains_key(&spec.replica_id)
                })
                .map(|(spec, _)| spec.memory_per_gpu_mib)
                .sum();
            status.gpus.push(GpuActorStatus {
                index: *index,
                model: spec.model.clone(),
                simulated: spec.simulated,
                memory_total_mib: spec.memory_total_mib,
                reserve_mib: spec.reserve_mib,
                leased_mib: snapshot.as_ref().map_or(0, super::gpu::GpuState::leased_mib),
                used_mib,
                free_mib: snapshot.as_ref().map_or(0, super::gpu::GpuState::free_mib),
                utilization_percent: snapshot.as_ref().and_then(|s| s.telemetry.as_ref()?.utilization_percent),
                leases: snapshot.map(|s| s.leases).unwrap_or_default(),
                restarts: self.restarts.get(index).map_or(0, Vec::len),
                failed: self.failed.get(index).cloned(),
            });
        }
        status.replicas = placed
            .values()
            .map(|(spec, committed)| LocalReplicaStatus {
                replica_id: spec.replica_id.clone(),
                deployment_id: spec.deployment_id.clone(),
                running: self.replicas.contains_key(&spec.replica_id),
                local: self.local.get(&spec.replica_id).cloned(),
                committed: committed.to_string(),
                restarts: self.replica_starts.get(&spec.replica_id).map_or(0, |starts| starts.len().saturating_sub(1)),
            })
            .collect();
        let mut shared = self.status.write().expect("agent status lock");
        status.reconciliations = shared.reconciliations + 1;
        *shared = status;
    }

    /// This node's GPUs, the memory each holder is promised on each, and the replicas
    /// placed here with their committed states.
    #[allow(clippy::type_complexity)]
    fn committed(
        &self,
    ) -> (BTreeMap<u32, GpuSpec>, BTreeMap<u32, BTreeMap<String, u64>>, BTreeMap<String, (ReplicaSpec, ReplicaState)>)
    {
        let node_id = NodeId(self.config.node_id);
        self.control.read_local(|cluster| {
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
            let mut placed: BTreeMap<String, (ReplicaSpec, ReplicaState)> = BTreeMap::new();
            for replica in cluster.replicas_on_node(node_id) {
                for index in &replica.gpu_indices {
                    holders.entry(*index).or_default().insert(replica.id.0.clone(), replica.memory_per_gpu_mib);
                }
                let deployment = cluster.deployment(&replica.deployment_id);
                let spec = ReplicaSpec {
                    replica_id: replica.id.0.clone(),
                    deployment_id: replica.deployment_id.0.clone(),
                    model_name: deployment.map(|d| d.spec.model_name.clone()).unwrap_or_default(),
                    model_version: deployment.map(|d| d.spec.model_version.clone()).unwrap_or_default(),
                    model_path: deployment.and_then(|d| d.spec.model_path.clone()),
                    model_owner: deployment.filter(|d| d.spec.tenant_model).and_then(|d| d.spec.owner.as_ref()).map(
                        |owner| match owner {
                            DeploymentOwner::User(id) => maas_store::Owner::User(id.clone()),
                            DeploymentOwner::Org(id) => maas_store::Owner::Org(id.clone()),
                        },
                    ),
                    gpu_indices: replica.gpu_indices.clone(),
                    memory_per_gpu_mib: replica.memory_per_gpu_mib,
                    serving: deployment.and_then(|d| d.spec.serving),
                };
                placed.insert(replica.id.0.clone(), (spec, replica.state.clone()));
            }
            for job in cluster.training_jobs_on_node(node_id) {
                for index in &job.gpu_indices {
                    holders.entry(*index).or_default().insert(job.id.0.clone(), job.memory_per_gpu_mib);
                }
            }
            (gpus, holders, placed)
        })
    }

    /// Starts, stops and reports the replica actors of this node.
    async fn reconcile_replicas(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        placed: &BTreeMap<String, (ReplicaSpec, ReplicaState)>,
    ) {
        // Replicas the state no longer places here stop (REC-1: the node was declared
        // dead and they run elsewhere now).
        let stale: Vec<String> = self.replicas.keys().filter(|id| !placed.contains_key(*id)).cloned().collect();
        for replica_id in stale {
            self.stop_replica(&replica_id, "it is no longer placed on this node");
        }
        self.local.retain(|id, _| placed.contains_key(id));
        self.replica_starts.retain(|id, _| placed.contains_key(id));
        self.given_up.retain(|id| placed.contains_key(id));
        self.proposed_at.retain(|id, _| placed.contains_key(id) || id.starts_with(SHARD_KEY));

        let now = Instant::now();
        for (replica_id, (spec, committed)) in placed {
            if *committed == ReplicaState::Stopping {
                self.stop_replica(replica_id, "the deployment was scaled down, changed or deleted");
                let id = ReplicaId(replica_id.clone());
                self.propose(replica_id, Command::RemoveReplica { replica_id: id, at_ms: wall_clock_ms() });
                continue;
            }
            // A failure is committed before the replica starts again, so that it shows in the
            // state (and counts as a restart) even when no back-off holds the start.
            let failure_uncommitted = matches!(self.local.get(replica_id), Some(LocalReplicaState::Failed(_)))
                && !matches!(committed, ReplicaState::Failed { .. });
            if !self.replicas.contains_key(replica_id) && !self.given_up.contains(replica_id) && !failure_uncommitted {
                self.start_replica(myself, spec, now).await;
            }
            let wanted = match self.local.get(replica_id) {
                Some(LocalReplicaState::Loading) => ReplicaState::Loading,
                Some(LocalReplicaState::Ready(_)) => ReplicaState::Ready,
                Some(LocalReplicaState::Failed(reason)) => ReplicaState::Failed { reason: reason.clone() },
                None => continue,
            };
            if *committed != wanted {
                let id = ReplicaId(replica_id.clone());
                self.propose(
                    replica_id,
                    Command::SetReplicaState { replica_id: id, state: wanted, at_ms: wall_clock_ms() },
                );
            }
        }
    }

    /// Starts, retires and reports the shard actors of this node.
    async fn reconcile_shards(&mut self, myself: &ActorRef<AgentMsg>) {
        let Some(root) = self.config.shard_root.clone() else { return };
        let node_id = NodeId(self.config.node_id);
        let placed: BTreeMap<String, KbShardRecord> = self.control.read_local(|cluster| {
            cluster.kb_shards_on_node(node_id).map(|shard| (shard.id.0.clone(), shard.clone())).collect()
        });
        if !self.shards_swept {
            self.shards_swept = true;
            let elsewhere: BTreeSet<String> = self.control.read_local(|cluster| {
                cluster.kb_shards().values().filter(|s| s.node_id != node_id).map(|s| s.id.0.clone()).collect()
            });
            sweep_shard_folders(&root, &elsewhere).await;
        }
        // Shards moved away or gone are retired: their files go with them.
        let gone: Vec<String> = self.shards.keys().filter(|id| !placed.contains_key(*id)).cloned().collect();
        for shard_id in gone {
            if let Some(actor) = self.shards.remove(&shard_id) {
                let _ = actor.cast(KbShardMsg::Retire);
            }
        }
        self.shard_failed.retain(|id, _| placed.contains_key(id));
        self.proposed_at.retain(|key, _| key.strip_prefix(SHARD_KEY).is_none_or(|id| placed.contains_key(id)));
        let now = Instant::now();
        for (shard_id, shard) in &placed {
            if shard.state == KbShardState::Stopping {
                if let Some(actor) = self.shards.remove(shard_id) {
                    let _ = actor.cast(KbShardMsg::Retire);
                } else {
                    let id = ShardId(shard_id.clone());
                    self.propose(&shard_key(shard_id), Command::RemoveKbShard { shard_id: id, at_ms: wall_clock_ms() });
                }
                continue;
            }
            let waiting = self.shard_failed.get(shard_id).is_some_and(|(_, at)| now.duration_since(*at) < SHARD_RETRY);
            if !self.shards.contains_key(shard_id) && !waiting {
                self.start_shard(myself, &root, shard).await;
            }
            let open = self.config.kb_shards.get(shard_id);
            let wanted = match (&open, self.shard_failed.get(shard_id)) {
                (Some(local), _) if local.caught_up() => KbShardState::Serving,
                (Some(_), _) => KbShardState::Loading,
                (None, Some((reason, _))) => KbShardState::Failed { reason: reason.clone() },
                (None, None) => continue,
            };
            if shard.state != wanted {
                let id = ShardId(shard_id.clone());
                let change = Command::SetKbShardState { shard_id: id, state: wanted, at_ms: wall_clock_ms() };
                self.propose(&shard_key(shard_id), change);
            }
        }
    }

    async fn start_shard(&mut self, myself: &ActorRef<AgentMsg>, root: &std::path::Path, shard: &KbShardRecord) {
        let range = shard.hash_range.start..=shard.hash_range.end_inclusive;
        let arguments = KbShardArgs {
            shard_id: shard.id.0.clone(),
            knowledge_base_id: shard.knowledge_base_id.clone(),
            hash_range: range,
            dir: root.join(&shard.id.0),
            table: self.config.kb_shards.clone(),
            agent: myself.clone(),
        };
        let name = kb_shard_actor_name(self.config.node_id, &shard.id.0);
        match Actor::spawn_linked(Some(name), KbShardActor, arguments, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.shard_by_actor.insert(actor.get_id(), shard.id.0.clone());
                self.shards.insert(shard.id.0.clone(), actor);
            }
            Err(err) => {
                let reason = format!("cannot start the shard actor: {err}");
                tracing::error!(shard = %shard.id, "{reason}");
                self.shard_failed.insert(shard.id.0.clone(), (reason, Instant::now()));
            }
        }
    }

    /// Starts a replica's actor, unless it is in its back-off after a failure or its
    /// restart budget is spent.
    async fn start_replica(&mut self, myself: &ActorRef<AgentMsg>, spec: &ReplicaSpec, now: Instant) {
        let replica_id = &spec.replica_id;
        let starts = self.replica_starts.entry(replica_id.clone()).or_default();
        starts.retain(|at| now.duration_since(*at) < self.config.restart_window);
        let failures = u32::try_from(starts.len()).unwrap_or(u32::MAX);
        let journal = &self.config.journal;
        if starts.len() > self.config.max_restarts {
            journal.error(
                &spec.deployment_id,
                replica_id,
                format!(
                    "failed {} times within {} s; it stays failed until the deployment changes",
                    starts.len(),
                    self.config.restart_window.as_secs()
                ),
            );
            self.given_up.insert(replica_id.clone());
            return;
        }
        if starts.last().is_some_and(|last| now.duration_since(*last) < self.config.replica_backoff * failures) {
            return;
        }
        starts.push(now);
        let place = if spec.gpu_indices.is_empty() {
            "on the CPU".to_owned()
        } else {
            format!("on GPU(s) {:?} with {} MiB each", spec.gpu_indices, spec.memory_per_gpu_mib)
        };
        let message = if failures == 0 {
            format!("starting on node {} {place}", self.config.node_id)
        } else {
            format!(
                "restarting on node {} {place} (failure {failures} of at most {})",
                self.config.node_id, self.config.max_restarts
            )
        };
        if failures == 0 {
            journal.info(&spec.deployment_id, replica_id, message);
        } else {
            journal.warn(&spec.deployment_id, replica_id, message);
        }
        let arguments = ReplicaArgs {
            spec: spec.clone(),
            runtime: Arc::clone(&self.runtime),
            agent: myself.clone(),
            serving: self.config.serving.clone(),
            journal: journal.clone(),
        };
        let name = replica_actor_name(replica_id);
        match Actor::spawn_linked(Some(name), ReplicaActor, arguments, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.replica_by_actor.insert(actor.get_id(), (replica_id.clone(), spec.deployment_id.clone()));
                self.replicas.insert(replica_id.clone(), actor);
                self.local.insert(replica_id.clone(), LocalReplicaState::Loading);
            }
            Err(err) => {
                journal.error(&spec.deployment_id, replica_id, format!("cannot start the replica actor: {err}"));
            }
        }
    }

    fn stop_replica(&mut self, replica_id: &str, why: &str) {
        if let Some(actor) = self.replicas.remove(replica_id) {
            if let Some((_, deployment_id)) = self.replica_by_actor.remove(&actor.get_id()) {
                self.config.journal.info(&deployment_id, replica_id, format!("stopping: {why}"));
            }
            actor.stop(Some("the replica is no longer wanted here".into()));
        }
    }

    /// Proposes a change of one replica or shard in the background, at most once a second
    /// per replica or shard; the next reconciliation proposes again what did not commit.
    fn propose(&mut self, what: &str, command: Command) {
        let now = Instant::now();
        if self.proposed_at.get(what).is_some_and(|at| now.duration_since(*at) < Duration::from_secs(1)) {
            return;
        }
        self.proposed_at.insert(what.to_owned(), now);
        let control = self.control.clone();
        let agent_name = self.config.node_id;
        tokio::spawn(async move {
            let described = format!("{command:?}");
            match control.propose(command).await {
                Ok(Ok(_)) => tracing::debug!(node_id = agent_name, change = %described, "replica change committed"),
                Ok(Err(rejection)) => {
                    tracing::debug!(node_id = agent_name, change = %described, %rejection, "replica change rejected");
                }
                Err(err) => {
                    tracing::debug!(node_id = agent_name, change = %described, error = %err, "replica change not committed");
                }
            }
        });
    }
}

/// Removes, once after a start, the folders of shards that moved to another node while
/// this one was down (declared dead). Only a placement elsewhere counts: the state right
/// after a start may lag behind the log, so a shard it does not know yet is left alone.
async fn sweep_shard_folders(root: &std::path::Path, elsewhere: &BTreeSet<String>) {
    let Ok(mut entries) = tokio::fs::read_dir(root).await else { return };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !elsewhere.contains(&name) {
            continue;
        }
        match tokio::fs::remove_dir_all(entry.path()).await {
            Ok(()) => tracing::info!(shard = %name, "removed a shard no longer placed on this node"),
            Err(err) => tracing::warn!(shard = %name, error = %err, "cannot remove a shard no longer placed here"),
        }
    }
}

/// Shards' keys in `proposed_at` start with this (replica ids cannot).
const SHARD_KEY: &str = "kb_shard/";

fn shard_key(shard_id: &str) -> String {
    format!("{SHARD_KEY}{shard_id}")
}

/// The wait before a shard that failed to open is tried again.
const SHARD_RETRY: Duration = Duration::from_secs(5);

fn wall_clock_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
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
