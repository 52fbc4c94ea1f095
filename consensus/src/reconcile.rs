//! The leader's reconcile loop, as a pure function: the committed desired state goes
//! through the scheduler ([`maas_scheduler::plan`]) and comes back as commands to propose
//! (place missing replicas, remove extra ones and those on nodes that are no longer
//! alive). Running it again on the state those commands produce proposes nothing.
//!
//! For now a stop is a removal: no local replica runtime exists yet to drain a replica
//! through `Stopping` (it comes with the inference work). Replicas already `Stopping`
//! keep their memory until removed but no longer count as the deployment's.

use std::collections::{BTreeMap, BTreeSet};

use maas_scheduler::{
    Action, ClusterSnapshot, Demand, DeploymentDemand, GpuView, NodeView, PlacedReplica, Plan, ReplicaRequest,
    Strategy, Unplaceable,
};

use crate::state::{ClusterState, Command, NodeStatus, PlacementStrategy, ReplicaId, ReplicaPlacement, ReplicaState};

/// Deployment id under which `Stopping` replicas enter the scheduler: they hold memory
/// but belong to no demand.
const STOPPING: &str = "\u{0}stopping";

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

/// The scheduler's view of the committed state.
pub fn snapshot(state: &ClusterState, settings: &ReconcileSettings) -> ClusterSnapshot {
    // A suspect node keeps its replicas (it is not dead yet, REC-1) but takes no new work:
    // it enters the scheduler healthy, with no free memory anywhere.
    let nodes = state
        .nodes()
        .values()
        .filter(|node| node.status != NodeStatus::Left)
        .map(|node| {
            let suspect = node.status == NodeStatus::Suspect;
            NodeView {
                id: node.id.0,
                labels: node.labels.clone(),
                healthy: matches!(node.status, NodeStatus::Alive | NodeStatus::Suspect),
                cpu_free_cores: if suspect { 0 } else { node.resources.cpu_cores },
                memory_free_mib: if suspect { 0 } else { node.resources.memory_mib },
                gpus: node
                    .resources
                    .gpus
                    .iter()
                    .map(|gpu| GpuView {
                        index: gpu.index,
                        model: gpu.model.clone(),
                        memory_total_mib: gpu.memory_total_mib,
                        reserve_mib: if suspect { gpu.memory_total_mib } else { settings.gpu_reserve_mib },
                        load: 0.0,
                    })
                    .collect(),
            }
        })
        .collect();
    let replicas = state
        .replicas()
        .values()
        .map(|replica| {
            let deployment = state.deployment(&replica.deployment_id);
            let stopping = replica.state == ReplicaState::Stopping || deployment.is_none();
            PlacedReplica {
                replica_id: replica.id.0.clone(),
                deployment_id: if stopping { STOPPING.to_owned() } else { replica.deployment_id.0.clone() },
                node_id: replica.node_id.0,
                gpu_indices: replica.gpu_indices.clone(),
                memory_per_gpu_mib: replica.memory_per_gpu_mib,
                priority: deployment.map_or(0, |d| d.spec.priority),
                preemptible: deployment.is_some_and(|d| d.spec.allow_preemption),
            }
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
    let plan: Plan = maas_scheduler::plan(&snapshot(state, settings), &demand(state));
    let mut taken: BTreeSet<String> = state.replicas().keys().map(|id| id.0.clone()).collect();
    let mut next_number: BTreeMap<String, u64> = BTreeMap::new();
    let mut commands = Vec::new();
    for action in plan.actions {
        match action {
            Action::Stop { replica_id, .. } => {
                commands.push(Command::RemoveReplica { replica_id: ReplicaId(replica_id), at_ms: now_ms });
            }
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
    Reconciliation { commands, unplaceable: plan.unplaceable }
}
