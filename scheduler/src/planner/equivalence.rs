//! The indexed planner against the plain scan it replaced (`reference.rs`): for any
//! snapshot and demand the two plans must be equal, action for action and reason for
//! reason. Inputs include duplicated node ids, GPU indices and deployment ids, unknown
//! nodes and over-promised GPUs; replica ids stay unique, since with duplicated ones both
//! planners break the debug check of SCH-1 (`validate` rejects such input).

use std::collections::BTreeMap;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{plan, reference};
use crate::types::{
    ClusterSnapshot, Demand, DeploymentDemand, GpuView, NodeView, PlacedReplica, ReplicaRequest, Strategy as Layout,
};

const ZONES: [&str; 3] = ["a", "b", "c"];

fn gpu() -> impl Strategy<Value = GpuView> {
    (1u64..=8, 0u64..3, 0u8..4).prop_map(|(total, reserve, load)| GpuView {
        index: 0,
        model: "test".into(),
        memory_total_mib: total * 10_000,
        reserve_mib: reserve * 1_000,
        load: f32::from(load) / 3.0,
    })
}

fn node() -> impl Strategy<Value = NodeView> {
    (
        1u64..=14,
        prop::bool::weighted(0.85),
        0..ZONES.len(),
        any::<bool>(),
        0u32..16,
        0u64..64,
        prop::collection::vec(gpu(), 0..=8),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(id, healthy, zone, spot, cpu, memory, mut gpus, odd_indices)| {
            for (position, gpu) in gpus.iter_mut().enumerate() {
                let position = u32::try_from(position).unwrap();
                // Now and then a gap or a duplicated index, which the planners must treat alike.
                gpu.index = if odd_indices { position * 7 % 5 } else { position };
            }
            let mut labels = BTreeMap::from([("zone".to_owned(), ZONES[zone].to_owned())]);
            if spot {
                labels.insert("tier".to_owned(), "spot".to_owned());
            }
            NodeView { id, labels, healthy, cpu_free_cores: cpu, memory_free_mib: memory * 1_000, gpus }
        })
}

fn replica() -> impl Strategy<Value = PlacedReplica> {
    (0usize..7, 1u64..=15, 0u32..8, 0u32..=4, 1u64..8, -1i32..3, any::<bool>()).prop_map(
        |(deployment, node_id, first_gpu, gpus, memory, priority, preemptible)| PlacedReplica {
            replica_id: String::new(),
            deployment_id: format!("d{deployment}"),
            node_id,
            gpu_indices: (first_gpu..first_gpu + gpus).map(|index| index % 8).collect(),
            memory_per_gpu_mib: memory * 5_000,
            priority,
            preemptible,
        },
    )
}

fn deployment() -> impl Strategy<Value = DeploymentDemand> {
    (
        0usize..7,
        0u32..=12,
        (0u32..=4, 0u64..9, 0u32..4, 0u64..20, any::<bool>(), any::<bool>()),
        any::<bool>(),
        0u8..5,
        -1i32..3,
        any::<bool>(),
    )
        .prop_map(
            |(
                id,
                replicas,
                (gpus, memory, cpu, host_memory, fallback, multi_node),
                spread,
                selector,
                priority,
                allow_preemption,
            )| {
                let node_selector = match selector {
                    0 => [("zone".to_owned(), "a".to_owned())].into(),
                    1 => [("zone".to_owned(), "b".to_owned()), ("tier".to_owned(), "spot".to_owned())].into(),
                    2 => [("tier".to_owned(), "spot".to_owned())].into(),
                    _ => BTreeMap::new(),
                };
                DeploymentDemand {
                    id: format!("d{id}"),
                    replicas,
                    request: ReplicaRequest {
                        gpus,
                        memory_per_gpu_mib: memory * 5_000,
                        cpu_cores: cpu,
                        memory_mib: host_memory * 1_000,
                        allow_cpu_fallback: fallback,
                        allow_multi_node: multi_node,
                    },
                    strategy: if spread { Layout::Spread } else { Layout::Binpack },
                    node_selector,
                    priority,
                    allow_preemption,
                }
            },
        )
}

/// A deployment that outranks every replica's own and may preempt them.
fn preempting() -> impl Strategy<Value = DeploymentDemand> {
    deployment().prop_map(|wanted| DeploymentDemand {
        id: wanted.id.replace('d', "p"),
        priority: wanted.priority + 3,
        allow_preemption: true,
        ..wanted
    })
}

fn snapshot_of(nodes: Vec<NodeView>, replicas: Vec<PlacedReplica>) -> ClusterSnapshot {
    let replicas = replicas
        .into_iter()
        .enumerate()
        .map(|(n, replica)| PlacedReplica { replica_id: format!("r{n:02}"), ..replica })
        .collect();
    ClusterSnapshot { nodes, replicas }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn indexed_planner_equals_the_scan(
        nodes in prop::collection::vec(node(), 0..=12),
        replicas in prop::collection::vec(replica(), 0..=40),
        deployments in prop::collection::vec(deployment(), 0..=6),
    ) {
        let snapshot = snapshot_of(nodes, replicas);
        let demand = Demand { deployments };
        prop_assert_eq!(plan(&snapshot, &demand), reference::plan(&snapshot, &demand));
    }

    /// Crowded clusters and deployments that preempt, for the preemption paths.
    #[test]
    fn indexed_planner_equals_the_scan_when_preempting(
        nodes in prop::collection::vec(node(), 1..=6),
        replicas in prop::collection::vec(replica(), 10..=60),
        deployments in prop::collection::vec(deployment(), 0..=3),
        preempting in prop::collection::vec(preempting(), 1..=3),
    ) {
        // Every replica on one of the nodes, so that they are crowded.
        let ids: Vec<u64> = nodes.iter().map(|node| node.id).collect();
        let replicas = replicas
            .into_iter()
            .map(|replica| PlacedReplica { node_id: ids[usize::try_from(replica.node_id).unwrap() % ids.len()], ..replica })
            .collect();
        let snapshot = snapshot_of(nodes, replicas);
        let demand = Demand { deployments: deployments.into_iter().chain(preempting).collect() };
        prop_assert_eq!(plan(&snapshot, &demand), reference::plan(&snapshot, &demand));
    }
}

/// A seeded cluster like the benchmark's, small enough for the scan: `nodes` nodes of 8
/// GPUs, deployments of every kind totalling `replicas`.
fn seeded(seed: u64, nodes: u64, replicas: u32, spread_replicas_most: u32) -> (ClusterSnapshot, Demand) {
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = (1..=nodes)
        .map(|id| NodeView {
            id,
            labels: [("zone".to_owned(), ZONES[usize::try_from(id % 3).unwrap()].to_owned())].into(),
            healthy: true,
            cpu_free_cores: 96,
            memory_free_mib: 1_000_000,
            gpus: (0..8)
                .map(|index| GpuView {
                    index,
                    model: "test".into(),
                    memory_total_mib: 81_920,
                    reserve_mib: 512,
                    load: f32::from(u8::try_from((id + u64::from(index)) % 10).unwrap()) / 10.0,
                })
                .collect(),
        })
        .collect();
    let mut deployments = Vec::new();
    let mut total = 0;
    while total < replicas {
        let (gpus, memory_per_gpu_mib) = match rng.random_range(0..100) {
            0..50 => (1, rng.random_range(4..=24) * 1024),
            50..75 => (1, rng.random_range(40..=72) * 1024),
            75..90 => (2, rng.random_range(30..=70) * 1024),
            _ => (4, rng.random_range(40..=70) * 1024),
        };
        let spread = rng.random_bool(0.3);
        let count = rng.random_range(1..=if spread { spread_replicas_most } else { 16 }).min(replicas - total);
        total += count;
        deployments.push(DeploymentDemand {
            id: format!("d{:03}", deployments.len()),
            replicas: count,
            request: ReplicaRequest {
                gpus,
                memory_per_gpu_mib,
                cpu_cores: 2 * gpus,
                memory_mib: 16_000 * u64::from(gpus),
                allow_cpu_fallback: rng.random_bool(0.05),
                allow_multi_node: false,
            },
            strategy: if spread { Layout::Spread } else { Layout::Binpack },
            node_selector: if rng.random_bool(0.2) {
                [("zone".to_owned(), ZONES[rng.random_range(0..ZONES.len())].to_owned())].into()
            } else {
                BTreeMap::new()
            },
            priority: rng.random_range(0..3),
            allow_preemption: rng.random_bool(0.3),
        });
    }
    (ClusterSnapshot { nodes, replicas: Vec::new() }, Demand { deployments })
}

/// Fills the cluster, then loses a node, scales every deployment by a seeded factor and
/// makes the replicas preemptible, so that scale-down, re-placement, spread levels larger
/// than the scan limit, preemption and shortfalls all happen at scale.
#[test]
fn indexed_planner_equals_the_scan_on_seeded_clusters() {
    for seed in 0..4 {
        let (empty, demand) = seeded(seed, 90, 1_000, 240);
        let first = plan(&empty, &demand);
        assert_eq!(first, reference::plan(&empty, &demand), "seed {seed}: from empty");

        let mut running = crate::apply(&empty, &first);
        let priorities: BTreeMap<&str, i32> = demand.deployments.iter().map(|d| (d.id.as_str(), d.priority)).collect();
        for replica in &mut running.replicas {
            replica.priority = priorities[replica.deployment_id.as_str()];
            replica.preemptible = true;
        }
        let lost = running.replicas.first().map_or(1, |replica| replica.node_id);
        running.nodes.iter_mut().filter(|node| node.id == lost).for_each(|node| node.healthy = false);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut changed = demand.clone();
        for deployment in &mut changed.deployments {
            deployment.replicas = deployment.replicas * rng.random_range(0..=3) / 2;
            deployment.priority = rng.random_range(0..4);
        }
        assert_eq!(plan(&running, &changed), reference::plan(&running, &changed), "seed {seed}: after changes");
    }
}

/// A deployment id given twice at different priorities, with another deployment sorted
/// between them, gets two turns, and the second counts (and spreads around) what the
/// first planned. Found by the proptest above.
#[test]
fn a_duplicated_deployment_counts_its_earlier_turn() {
    let node = |id| NodeView {
        id,
        labels: BTreeMap::new(),
        healthy: true,
        cpu_free_cores: 8,
        memory_free_mib: 64_000,
        gpus: vec![GpuView { index: 0, model: "test".into(), memory_total_mib: 80_000, reserve_mib: 0, load: 0.0 }],
    };
    let deployment = |id: &str, priority, replicas, strategy| DeploymentDemand {
        id: id.into(),
        replicas,
        request: ReplicaRequest { gpus: 1, memory_per_gpu_mib: 10_000, ..ReplicaRequest::default() },
        strategy,
        priority,
        ..DeploymentDemand::default()
    };
    let snapshot = ClusterSnapshot { nodes: vec![node(1), node(2), node(3)], replicas: Vec::new() };
    let demand = Demand {
        deployments: vec![
            deployment("d", 1, 1, Layout::Binpack),
            deployment("c", 0, 0, Layout::Binpack),
            deployment("d", 0, 3, Layout::Spread),
        ],
    };
    let planned = plan(&snapshot, &demand);
    let nodes: Vec<u64> = planned.places().map(|(_, node_id, _, _)| node_id).collect();
    assert_eq!(nodes, [1, 2, 3]);
    assert_eq!(planned, reference::plan(&snapshot, &demand));
}
