//! Property tests: SCH-1, SCH-2 and SCH-3 on small random clusters and demands, and the
//! planner's replica count checked against a brute-force oracle.

use std::collections::BTreeMap;

use maas_scheduler::{
    Action, ClusterSnapshot, Demand, DeploymentDemand, GpuView, NodeView, PlacedReplica, ReplicaRequest,
    Strategy as Layout, plan, sch1_holds, sch2_holds,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

const ZONES: [&str; 2] = ["a", "b"];

/// Raw material for one node: health, zone, host cpu and memory, GPUs (total, reserve).
type RawNode = (bool, usize, u32, u64, Vec<(u64, u64)>);
/// Raw material for one existing replica: node slot, gpu slot, gpus, memory, priority,
/// preemptible, deployment slot.
type RawReplica = (usize, u32, u32, u64, i32, bool, usize);

fn raw_node() -> impl Strategy<Value = RawNode> {
    (prop::bool::weighted(0.85), 0..ZONES.len(), 0u32..8, 0u64..40, prop::collection::vec((1u64..9, 0u64..3), 0..=2))
        .prop_map(|(healthy, zone, cpu, memory, gpus)| {
            (
                healthy,
                zone,
                cpu,
                memory * 1_000,
                gpus.into_iter().map(|(total, reserve)| (total * 10_000, reserve * 1_000)).collect(),
            )
        })
}

fn raw_replica() -> impl Strategy<Value = RawReplica> {
    (0usize..3, 0u32..2, 1u32..=2, 1u64..6, -1i32..3, any::<bool>(), 0usize..4).prop_map(
        |(node, gpu, gpus, memory, priority, preemptible, deployment)| {
            (node, gpu, gpus, memory * 10_000, priority, preemptible, deployment)
        },
    )
}

/// Builds a snapshot that satisfies SCH-1: a raw replica that would not fit is dropped.
fn snapshot_from(raw_nodes: Vec<RawNode>, raw_replicas: Vec<RawReplica>) -> ClusterSnapshot {
    let nodes: Vec<NodeView> = raw_nodes
        .into_iter()
        .zip(1u64..)
        .map(|((healthy, zone, cpu, memory, gpus), id)| NodeView {
            id,
            labels: [("zone".to_owned(), ZONES[zone].to_owned())].into(),
            healthy,
            cpu_free_cores: cpu,
            memory_free_mib: memory,
            gpus: gpus
                .into_iter()
                .zip(0u32..)
                .map(|((total, reserve), index)| GpuView {
                    index,
                    model: "test".into(),
                    memory_total_mib: total,
                    reserve_mib: reserve,
                    load: f32::from(u8::try_from(index % 3).unwrap()) / 3.0,
                })
                .collect(),
        })
        .collect();
    let mut used: BTreeMap<(u64, u32), u64> = BTreeMap::new();
    let mut replicas = Vec::new();
    for (n, (node_slot, gpu_slot, gpus, memory, priority, preemptible, deployment)) in
        raw_replicas.into_iter().enumerate()
    {
        let Some(node) = nodes.get(node_slot) else {
            continue;
        };
        let indices: Vec<u32> = (gpu_slot..gpu_slot + gpus).collect();
        let fits = indices.iter().all(|index| {
            node.gpus.iter().any(|gpu| {
                gpu.index == *index
                    && used.get(&(node.id, *index)).copied().unwrap_or(0) + memory <= gpu.promisable_mib()
            })
        });
        if !fits {
            continue;
        }
        for index in &indices {
            *used.entry((node.id, *index)).or_insert(0) += memory;
        }
        replicas.push(PlacedReplica {
            replica_id: format!("r{n}"),
            deployment_id: format!("d{deployment}"),
            node_id: node.id,
            gpu_indices: indices,
            memory_per_gpu_mib: memory,
            priority,
            preemptible,
        });
    }
    ClusterSnapshot { nodes, replicas }
}

fn request() -> impl Strategy<Value = ReplicaRequest> {
    (0u32..=2, 1u64..9, 0u32..4, 0u64..20, any::<bool>()).prop_map(|(gpus, memory, cpu, host_memory, fallback)| {
        ReplicaRequest {
            gpus,
            memory_per_gpu_mib: memory * 5_000,
            cpu_cores: cpu,
            memory_mib: host_memory * 1_000,
            allow_cpu_fallback: fallback,
            allow_multi_node: false,
        }
    })
}

fn deployment(id: usize) -> impl Strategy<Value = DeploymentDemand> {
    (0u32..=3, request(), any::<bool>(), prop::option::of(0..ZONES.len()), -1i32..3, any::<bool>()).prop_map(
        move |(replicas, request, spread, zone, priority, allow_preemption)| DeploymentDemand {
            id: format!("d{id}"),
            replicas,
            request,
            strategy: if spread { Layout::Spread } else { Layout::Binpack },
            node_selector: zone.map(|zone| [("zone".to_owned(), ZONES[zone].to_owned())].into()).unwrap_or_default(),
            priority,
            allow_preemption,
        },
    )
}

fn demand() -> impl Strategy<Value = Demand> {
    (0usize..=3)
        .prop_flat_map(|count| (0..count).map(deployment).collect::<Vec<_>>())
        .prop_map(|deployments| Demand { deployments })
}

fn cluster() -> impl Strategy<Value = ClusterSnapshot> {
    (prop::collection::vec(raw_node(), 1..=3), prop::collection::vec(raw_replica(), 0..=5))
        .prop_map(|(nodes, replicas)| snapshot_from(nodes, replicas))
}

/// The brute-force oracle: the most replicas of one fresh deployment that fit at once,
/// over every assignment of each replica to nothing, a CPU slot, or a set of GPUs of one
/// eligible node, respecting GPU memory and host CPU and memory.
fn oracle_max(snapshot: &ClusterSnapshot, deployment: &DeploymentDemand) -> u32 {
    let request = &deployment.request;
    let mut options: Vec<(usize, Vec<u32>)> = Vec::new();
    for (slot, node) in snapshot.nodes.iter().enumerate() {
        let eligible =
            node.healthy && deployment.node_selector.iter().all(|(key, value)| node.labels.get(key) == Some(value));
        if !eligible {
            continue;
        }
        if request.gpus == 0 || request.allow_cpu_fallback {
            options.push((slot, Vec::new()));
        }
        let indices: Vec<u32> = node.gpus.iter().map(|gpu| gpu.index).collect();
        match request.gpus {
            1 => options.extend(indices.iter().map(|index| (slot, vec![*index]))),
            2 if indices.len() == 2 => options.push((slot, indices.clone())),
            _ => {}
        }
    }
    let mut free: BTreeMap<(usize, u32), u64> = BTreeMap::new();
    for (slot, node) in snapshot.nodes.iter().enumerate() {
        for gpu in &node.gpus {
            let used: u64 = snapshot
                .replicas
                .iter()
                .filter(|r| r.node_id == node.id && r.gpu_indices.contains(&gpu.index))
                .map(|r| r.memory_per_gpu_mib)
                .sum();
            free.insert((slot, gpu.index), gpu.promisable_mib().saturating_sub(used));
        }
    }
    let mut best = 0;
    let mut chosen = Vec::new();
    search(snapshot, request, &options, deployment.replicas, 0, &mut chosen, &free, &mut best);
    best
}

#[allow(clippy::too_many_arguments)]
fn search(
    snapshot: &ClusterSnapshot,
    request: &ReplicaRequest,
    options: &[(usize, Vec<u32>)],
    replicas_left: u32,
    first_option: usize,
    chosen: &mut Vec<usize>,
    free: &BTreeMap<(usize, u32), u64>,
    best: &mut u32,
) {
    if !feasible(snapshot, request, options, chosen, free) {
        return;
    }
    *best = (*best).max(u32::try_from(chosen.len()).unwrap());
    if replicas_left == 0 {
        return;
    }
    // Multisets of options, in non-decreasing order, cover every assignment.
    for option in first_option..options.len() {
        chosen.push(option);
        search(snapshot, request, options, replicas_left - 1, option, chosen, free, best);
        chosen.pop();
    }
}

fn feasible(
    snapshot: &ClusterSnapshot,
    request: &ReplicaRequest,
    options: &[(usize, Vec<u32>)],
    chosen: &[usize],
    free: &BTreeMap<(usize, u32), u64>,
) -> bool {
    let mut gpu_use: BTreeMap<(usize, u32), u64> = BTreeMap::new();
    let mut host_use: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    for option in chosen {
        let (slot, gpus) = &options[*option];
        for index in gpus {
            *gpu_use.entry((*slot, *index)).or_insert(0) += request.memory_per_gpu_mib;
        }
        let host = host_use.entry(*slot).or_insert((0, 0));
        host.0 += u64::from(request.cpu_cores);
        host.1 += request.memory_mib;
    }
    gpu_use.iter().all(|(gpu, used)| *used <= free[gpu])
        && host_use.iter().all(|(slot, (cpu, memory))| {
            let node = &snapshot.nodes[*slot];
            *cpu <= u64::from(node.cpu_free_cores) && *memory <= node.memory_free_mib
        })
}

fn shuffled(snapshot: &ClusterSnapshot, demand: &Demand, seed: u64) -> (ClusterSnapshot, Demand) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut snapshot = snapshot.clone();
    let mut demand = demand.clone();
    snapshot.nodes.shuffle(&mut rng);
    snapshot.replicas.shuffle(&mut rng);
    demand.deployments.shuffle(&mut rng);
    (snapshot, demand)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn invariants_hold_for_any_plan(snapshot in cluster(), demand in demand(), seed in any::<u64>()) {
        let planned = plan(&snapshot, &demand);
        prop_assert!(sch1_holds(&snapshot, &planned), "SCH-1: {planned:?}");
        prop_assert!(sch2_holds(&demand, &planned), "SCH-2: {planned:?}");
        // SCH-3: repeatable, and independent of the order of the input vectors.
        prop_assert_eq!(&planned, &plan(&snapshot, &demand));
        let (snapshot_shuffled, demand_shuffled) = shuffled(&snapshot, &demand, seed);
        prop_assert_eq!(&planned, &plan(&snapshot_shuffled, &demand_shuffled));
        // Places go only to healthy nodes that match the selector, and only existing
        // replicas are stopped, each once.
        for action in &planned.actions {
            match action {
                Action::Place { deployment_id, node_id, .. } => {
                    let node = snapshot.nodes.iter().find(|n| n.id == *node_id).unwrap();
                    let wanted = demand.deployments.iter().find(|d| &d.id == deployment_id).unwrap();
                    prop_assert!(node.healthy);
                    prop_assert!(wanted.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v)));
                }
                Action::Stop { replica_id, .. } => {
                    prop_assert!(snapshot.replicas.iter().any(|r| &r.replica_id == replica_id));
                }
            }
        }
        let mut stops: Vec<&str> = planned.stops().collect();
        let stop_count = stops.len();
        stops.sort_unstable();
        stops.dedup();
        prop_assert_eq!(stops.len(), stop_count);
        // Preemption only takes preemptible replicas of strictly lower priority.
        for action in &planned.actions {
            if let Action::Stop { replica_id, reason } = action
                && let Some(by) = reason.strip_prefix("preempted by ")
            {
                let victim = snapshot.replicas.iter().find(|r| &r.replica_id == replica_id).unwrap();
                let preemptor = by.split(' ').next().unwrap();
                let preemptor = demand.deployments.iter().find(|d| d.id == preemptor).unwrap();
                // The victim's deployment's demanded priority overrides the recorded one.
                let victim_priority = demand.deployments.iter()
                    .find(|d| d.id == victim.deployment_id)
                    .map_or(victim.priority, |d| d.priority);
                prop_assert!(victim.preemptible && victim_priority < preemptor.priority);
                prop_assert!(preemptor.allow_preemption);
            }
        }
        // Every deployment ends with its desired count or says why not.
        for wanted in &demand.deployments {
            let after = maas_scheduler::apply(&snapshot, &planned);
            let healthy = |node_id: u64| snapshot.nodes.iter().any(|n| n.id == node_id && n.healthy);
            let running = after.replicas.iter()
                .filter(|r| r.deployment_id == wanted.id && healthy(r.node_id))
                .count();
            let missing = planned.unplaceable.iter()
                .find(|u| u.deployment_id == wanted.id)
                .map_or(0, |u| u.missing_replicas as usize);
            prop_assert_eq!(running + missing, wanted.replicas as usize, "{}", wanted.id);
        }
    }

    /// With one fresh deployment and no preemption, the planner places exactly as many
    /// replicas as fit (the oracle's maximum, capped by the desired count).
    #[test]
    fn planner_places_as_many_as_the_oracle(
        snapshot in cluster(),
        mut wanted in deployment(9),
        replicas in 1u32..=3,
    ) {
        wanted.replicas = replicas;
        wanted.allow_preemption = false;
        let demand = Demand { deployments: vec![wanted.clone()] };
        let planned = plan(&snapshot, &demand);
        let placed = u32::try_from(planned.places().count()).unwrap();
        prop_assert_eq!(placed, oracle_max(&snapshot, &wanted), "{:?}", planned);
    }
}
