//! The scheduler's named invariants as predicates, and [`apply`] to see a plan's result.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{ClusterSnapshot, Demand, PlacedReplica, Plan};

/// The snapshot after the plan: stopped replicas removed, placed replicas added.
///
/// A plan does not carry priorities or replica ids, so each new replica gets the id
/// `planned-{n}-{deployment_id}` (n counts the plan's places from 0), priority 0 and is not
/// preemptible. Host CPU and memory are left as they were: a `Place` does not say how much
/// of them the replica takes.
pub fn apply(snapshot: &ClusterSnapshot, plan: &Plan) -> ClusterSnapshot {
    let stopped: BTreeSet<&str> = plan.stops().collect();
    let mut after = snapshot.clone();
    after.replicas.retain(|replica| !stopped.contains(replica.replica_id.as_str()));
    for (n, (deployment_id, node_id, gpu_indices, memory_per_gpu_mib)) in plan.places().enumerate() {
        after.replicas.push(PlacedReplica {
            replica_id: format!("planned-{n}-{deployment_id}"),
            deployment_id: deployment_id.to_owned(),
            node_id,
            gpu_indices: gpu_indices.to_vec(),
            memory_per_gpu_mib,
            priority: 0,
            preemptible: false,
        });
    }
    after
}

/// GPU memory promised per (node, GPU index) by the snapshot's replicas.
fn promised_mib(snapshot: &ClusterSnapshot) -> BTreeMap<(u64, u32), u64> {
    let mut promised = BTreeMap::new();
    for replica in &snapshot.replicas {
        let gpu_indices: BTreeSet<u32> = replica.gpu_indices.iter().copied().collect();
        for index in gpu_indices {
            let used = promised.entry((replica.node_id, index)).or_insert(0u64);
            *used = used.saturating_add(replica.memory_per_gpu_mib);
        }
    }
    promised
}

/// **SCH-1**: after the plan, no GPU is promised more than `total - reserve`.
///
/// Every `Place` must name an existing node and distinct, existing GPUs of it. A GPU that
/// the snapshot already over-promised (the planner did not cause it) passes as long as the
/// plan does not promise it more than before.
pub fn sch1_holds(snapshot: &ClusterSnapshot, plan: &Plan) -> bool {
    let mut capacity = BTreeMap::new();
    for node in &snapshot.nodes {
        for gpu in &node.gpus {
            capacity.entry((node.id, gpu.index)).or_insert(gpu.promisable_mib());
        }
    }
    let nodes: BTreeSet<u64> = snapshot.nodes.iter().map(|node| node.id).collect();
    for (_, node_id, gpu_indices, _) in plan.places() {
        let distinct: BTreeSet<u32> = gpu_indices.iter().copied().collect();
        if !nodes.contains(&node_id)
            || distinct.len() != gpu_indices.len()
            || !gpu_indices.iter().all(|index| capacity.contains_key(&(node_id, *index)))
        {
            return false;
        }
    }
    let before = promised_mib(snapshot);
    let after = promised_mib(&apply(snapshot, plan));
    after.iter().all(|(gpu, used_after)| {
        let Some(capacity_mib) = capacity.get(gpu) else {
            // A replica on a GPU the snapshot does not know: only fine if it was there before.
            return before.get(gpu).is_some_and(|used_before| used_after <= used_before);
        };
        used_after <= capacity_mib || before.get(gpu).is_some_and(|used_before| used_after <= used_before)
    })
}

/// **SCH-2**: every `Place` of an N-GPU deployment has N distinct GPUs (of its one node),
/// or no GPU at all when the deployment is CPU-only or allows CPU fallback.
pub fn sch2_holds(demand: &Demand, plan: &Plan) -> bool {
    plan.places().all(|(deployment_id, _, gpu_indices, _)| {
        let Some(deployment) = demand.deployments.iter().find(|d| d.id == deployment_id) else {
            return false;
        };
        let request = &deployment.request;
        let distinct: BTreeSet<u32> = gpu_indices.iter().copied().collect();
        if gpu_indices.is_empty() {
            request.gpus == 0 || request.allow_cpu_fallback
        } else {
            distinct.len() == gpu_indices.len() && gpu_indices.len() == request.gpus as usize
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Action, GpuView, NodeView};

    #[test]
    fn sch1_rejects_a_place_on_a_missing_gpu() {
        let snapshot = ClusterSnapshot {
            nodes: vec![NodeView {
                id: 1,
                healthy: true,
                gpus: vec![GpuView { index: 0, memory_total_mib: 1000, ..GpuView::default() }],
                ..NodeView::default()
            }],
            replicas: Vec::new(),
        };
        let plan = Plan {
            actions: vec![Action::Place {
                deployment_id: "a".into(),
                node_id: 1,
                gpu_indices: vec![7],
                memory_per_gpu_mib: 1,
            }],
            unplaceable: Vec::new(),
        };
        assert!(!sch1_holds(&snapshot, &plan));
    }
}
