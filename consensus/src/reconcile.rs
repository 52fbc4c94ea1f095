//! The leader's reconcile loop, as a pure function: the committed desired state goes
//! through the scheduler ([`maas_scheduler::plan`]) and comes back as commands to propose.
//! Running it again on the state those commands produce proposes nothing new.
//!
//! A replica's life as the loop sees it:
//!
//! - **current**: it belongs to a deployment, runs the deployment's generation and sits on
//!   a node that takes work (alive or suspect). The scheduler counts it towards the
//!   deployment's desired replicas.
//! - **outgoing**: it runs an older generation (the spec changed: a rolling update) or its
//!   node is draining. It keeps serving and keeps its memory, but no longer counts; the
//!   scheduler places current replicas for the deployment beside it (a surge). An outgoing
//!   replica is stopped only when enough current replicas are `Ready` to keep the desired
//!   count serving (the new version is Ready before the old one stops). When no room for
//!   a new replica exists and none is on its way, one outgoing replica of an update (not
//!   of a drain: its memory is on the draining node) is stopped to make room.
//! - **stopping**: [`ReplicaState::Stopping`]; its node's agent stops it and then removes
//!   it. It keeps its memory until removed.
//!
//! Replicas on dead, departed or unknown nodes are removed at once and placed again on the
//! survivors (REC-1): nothing on such a node can stop them in an orderly way, and the node
//! agent of a node that comes back stops the replicas it no longer finds in the state.

use std::collections::{BTreeMap, BTreeSet};

use maas_scheduler::{
    Action, ClusterSnapshot, Demand, DeploymentDemand, GpuView, NodeView, PlacedReplica, Plan, ReplicaRequest,
    Strategy, Unplaceable,
};

use crate::state::{
    ClusterState, Command, DeploymentRecord, KbShardPlacement, KbShardState, NodeId, NodeStatus, PlacementStrategy,
    ReplicaId, ReplicaPlacement, ReplicaRecord, ReplicaState,
};

/// Deployment id under which outgoing and stopping replicas enter the scheduler: they
/// hold memory but belong to no demand.
const NOT_COUNTED: &str = "\u{0}not-counted";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileSettings {
    /// Memory kept free on every GPU (`node.gpu_memory_reserve_mib` of the leader).
    pub gpu_reserve_mib: u64,
}

/// What one round decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconciliation {
    pub commands: Vec<Command>,
    /// Deployments left short, each with the scheduler's reason and closest miss.
    pub unplaceable: Vec<Unplaceable>,
}

/// How the loop classes a replica (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaRole {
    Current,
    Outgoing,
    Stopping,
    /// On a dead, departed or unknown node.
    Lost,
}

/// The role of `replica` in the committed `state`.
pub fn replica_role(state: &ClusterState, replica: &ReplicaRecord) -> ReplicaRole {
    let node_status = state.node(replica.node_id).map(|node| node.status);
    match node_status {
        None | Some(NodeStatus::Dead | NodeStatus::Left) => return ReplicaRole::Lost,
        Some(_) => {}
    }
    let Some(deployment) = state.deployment(&replica.deployment_id) else { return ReplicaRole::Stopping };
    if replica.state == ReplicaState::Stopping {
        ReplicaRole::Stopping
    } else if replica.deployment_generation != deployment.generation || node_status == Some(NodeStatus::Draining) {
        ReplicaRole::Outgoing
    } else {
        ReplicaRole::Current
    }
}

/// The scheduler's view of the committed state. Replicas on lost nodes are left out (the
/// round removes them).
pub fn snapshot(state: &ClusterState, settings: &ReconcileSettings) -> ClusterSnapshot {
    // Suspect and draining nodes keep their replicas (a suspect one is not dead yet,
    // REC-1) but take no new work: they enter the scheduler healthy, with no free memory.
    let nodes = state
        .nodes()
        .values()
        .filter(|node| !matches!(node.status, NodeStatus::Left | NodeStatus::Dead))
        .map(|node| {
            let closed = matches!(node.status, NodeStatus::Suspect | NodeStatus::Draining);
            NodeView {
                id: node.id.0,
                labels: node.labels.clone(),
                healthy: true,
                cpu_free_cores: if closed { 0 } else { node.resources.cpu_cores },
                memory_free_mib: if closed { 0 } else { node.resources.memory_mib },
                gpus: node
                    .resources
                    .gpus
                    .iter()
                    .map(|gpu| GpuView {
                        index: gpu.index,
                        model: gpu.model.clone(),
                        memory_total_mib: gpu.memory_total_mib,
                        reserve_mib: if closed { gpu.memory_total_mib } else { settings.gpu_reserve_mib },
                        load: 0.0,
                    })
                    .collect(),
            }
        })
        .collect();
    let replicas = state
        .replicas()
        .values()
        .filter_map(|replica| {
            let role = replica_role(state, replica);
            if role == ReplicaRole::Lost {
                return None;
            }
            let deployment = state.deployment(&replica.deployment_id);
            Some(PlacedReplica {
                replica_id: replica.id.0.clone(),
                deployment_id: if role == ReplicaRole::Current {
                    replica.deployment_id.0.clone()
                } else {
                    NOT_COUNTED.to_owned()
                },
                node_id: replica.node_id.0,
                gpu_indices: replica.gpu_indices.clone(),
                memory_per_gpu_mib: replica.memory_per_gpu_mib,
                priority: deployment.map_or(0, |d| d.spec.priority),
                preemptible: role == ReplicaRole::Current && deployment.is_some_and(|d| d.spec.allow_preemption),
            })
        })
        .collect();
    ClusterSnapshot { nodes, replicas }
}

/// The scheduler's demand: every deployment's desired replicas.
pub fn demand(state: &ClusterState) -> Demand {
    let deployments = state
        .deployments()
        .values()
        .map(|deployment| DeploymentDemand {
            id: deployment.id.0.clone(),
            replicas: deployment.replicas_desired,
            request: ReplicaRequest {
                gpus: deployment.spec.request.gpus_per_replica,
                memory_per_gpu_mib: deployment.spec.request.memory_per_gpu_mib,
                cpu_cores: 0,
                memory_mib: 0,
                allow_cpu_fallback: deployment.spec.request.cpu_fallback_allowed,
                allow_multi_node: false,
            },
            strategy: match deployment.spec.strategy {
                PlacementStrategy::Binpack => Strategy::Binpack,
                PlacementStrategy::Spread => Strategy::Spread,
            },
            node_selector: deployment.spec.node_selector.clone(),
            priority: deployment.spec.priority,
            // A deployment's `allow_preemption` says its replicas may be preempted; which
            // deployments may preempt others is not in the desired state yet.
            allow_preemption: false,
        })
        .collect();
    Demand { deployments }
}

/// One round: the commands that bring placements in line with the desired state.
pub fn reconcile(state: &ClusterState, settings: &ReconcileSettings, now_ms: u64) -> Reconciliation {
    let mut commands = Vec::new();
    let stop =
        |replica_id: ReplicaId| Command::SetReplicaState { replica_id, state: ReplicaState::Stopping, at_ms: now_ms };

    // Lost replicas go at once; the scheduler places their replacements below.
    for replica in state.replicas().values() {
        if replica_role(state, replica) == ReplicaRole::Lost {
            commands.push(Command::RemoveReplica { replica_id: replica.id.clone(), at_ms: now_ms });
        }
    }

    let plan: Plan = maas_scheduler::plan(&snapshot(state, settings), &demand(state));
    let mut taken: BTreeSet<String> = state.replicas().keys().map(|id| id.0.clone()).collect();
    let mut next_number: BTreeMap<String, u64> = BTreeMap::new();
    for action in plan.actions {
        match action {
            Action::Stop { replica_id, .. } => commands.push(stop(ReplicaId(replica_id))),
            Action::Place { deployment_id, node_id, gpu_indices, memory_per_gpu_mib } => {
                let Some(deployment) = state.deployments().values().find(|d| d.id.0 == deployment_id) else { continue };
                // Ids are `<deployment>-<generation>-<n>`, the lowest n not in use.
                let number = next_number.entry(deployment_id.clone()).or_insert(1);
                let replica_id = loop {
                    let candidate = format!("{deployment_id}-{}-{number}", deployment.generation);
                    *number += 1;
                    if taken.insert(candidate.clone()) {
                        break candidate;
                    }
                };
                commands.push(Command::PlaceReplica {
                    placement: ReplicaPlacement {
                        replica_id: ReplicaId(replica_id),
                        deployment_id: deployment.id.clone(),
                        deployment_generation: deployment.generation,
                        node_id: crate::state::NodeId(node_id),
                        gpu_indices,
                        memory_per_gpu_mib,
                    },
                    gpu_reserve_mib: settings.gpu_reserve_mib,
                    at_ms: now_ms,
                });
            }
        }
    }

    let short: BTreeSet<&str> = plan.unplaceable.iter().map(|u| u.deployment_id.as_str()).collect();
    for deployment in state.deployments().values() {
        for replica_id in outgoing_to_stop(state, deployment, short.contains(deployment.id.as_str())) {
            commands.push(stop(replica_id));
        }
    }
    commands.extend(shard_moves(state, now_ms));
    Reconciliation { commands, unplaceable: plan.unplaceable }
}

/// The nodes that take new shards (alive ones), each with the shards it holds: what
/// [`maas_scheduler::place_shards`] spreads new shards over.
pub fn shard_holdings(state: &ClusterState) -> BTreeMap<u64, usize> {
    let mut holding: BTreeMap<u64, usize> =
        state.nodes().values().filter(|node| node.status == NodeStatus::Alive).map(|node| (node.id.0, 0)).collect();
    for shard in state.kb_shards().values() {
        if let Some(held) = holding.get_mut(&shard.node_id.0) {
            *held += 1;
        }
    }
    holding
}

/// Knowledge-base shards on lost or draining nodes move to the nodes that take work,
/// spread by [`maas_scheduler::place_shards`] (the new node rebuilds a moved shard from the
/// chunks in SQL); a stopping shard on a lost node is removed, as nothing there can drop it.
pub fn shard_moves(state: &ClusterState, now_ms: u64) -> Vec<Command> {
    let mut holding = shard_holdings(state);
    let mut commands = Vec::new();
    for shard in state.kb_shards().values() {
        let status = state.node(shard.node_id).map(|node| node.status);
        let lost = matches!(status, None | Some(NodeStatus::Dead | NodeStatus::Left));
        if !lost && status != Some(NodeStatus::Draining) {
            continue;
        }
        if shard.state == KbShardState::Stopping {
            if lost {
                commands.push(Command::RemoveKbShard { shard_id: shard.id.clone(), at_ms: now_ms });
            }
            continue;
        }
        let Some(&node) = maas_scheduler::place_shards(&holding, 1).first() else { continue };
        *holding.entry(node).or_default() += 1;
        commands.push(Command::PutKbShard {
            placement: KbShardPlacement {
                shard_id: shard.id.clone(),
                knowledge_base_id: shard.knowledge_base_id.clone(),
                hash_range: shard.hash_range,
                node_id: NodeId(node),
            },
            at_ms: now_ms,
        });
    }
    commands
}

/// The outgoing replicas of `deployment` that may stop now: every one that is not
/// serving, and serving ones beyond what the desired count still needs while current
/// replicas are not Ready. `short` says the scheduler found no room for a missing current
/// replica; then one serving replica of an update is given up to make room, unless a
/// replica of the deployment is already on its way out or a new one on its way in.
fn outgoing_to_stop(state: &ClusterState, deployment: &DeploymentRecord, short: bool) -> Vec<ReplicaId> {
    let mut current_ready = 0u32;
    let mut in_motion = 0u32;
    let mut outgoing: Vec<&ReplicaRecord> = Vec::new();
    for replica in state.replicas_of_deployment(&deployment.id) {
        match replica_role(state, replica) {
            ReplicaRole::Current if replica.state == ReplicaState::Ready => current_ready += 1,
            ReplicaRole::Current | ReplicaRole::Stopping => in_motion += 1,
            ReplicaRole::Outgoing => outgoing.push(replica),
            ReplicaRole::Lost => {}
        }
    }
    let draining =
        |replica: &ReplicaRecord| state.node(replica.node_id).is_some_and(|node| node.status == NodeStatus::Draining);
    let mut keep = usize::try_from(deployment.replicas_desired.saturating_sub(current_ready)).unwrap_or(usize::MAX);
    let mut give_up_one = short && in_motion == 0 && keep > 0;
    let mut stops = Vec::new();
    for replica in outgoing {
        if replica.state != ReplicaState::Ready {
            stops.push(replica.id.clone());
        } else if give_up_one && keep > 0 && !draining(replica) {
            give_up_one = false;
            keep -= 1;
            stops.push(replica.id.clone());
        } else if keep > 0 {
            keep -= 1;
        } else {
            stops.push(replica.id.clone());
        }
    }
    stops
}
