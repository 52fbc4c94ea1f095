//! Data-driven placement decisions: each case is a snapshot, a demand, and the exact plan.

use std::collections::BTreeMap;

use maas_scheduler::{
    Action, Closest, ClusterSnapshot, Demand, DeploymentDemand, GpuView, NodeView, PlacedReplica, ReplicaRequest,
    Strategy, plan, sch1_holds, sch2_holds, validate,
};

/// A healthy node with plenty of host resources and GPUs of the given total memory.
fn node(id: u64, gpu_totals_mib: &[u64]) -> NodeView {
    NodeView {
        id,
        labels: BTreeMap::new(),
        healthy: true,
        cpu_free_cores: 64,
        memory_free_mib: 512_000,
        gpus: gpu_totals_mib
            .iter()
            .zip(0u32..)
            .map(|(total, index)| GpuView {
                index,
                model: "H100".into(),
                memory_total_mib: *total,
                reserve_mib: 0,
                load: 0.0,
            })
            .collect(),
    }
}

fn labelled(mut view: NodeView, key: &str, value: &str) -> NodeView {
    view.labels.insert(key.into(), value.into());
    view
}

fn unhealthy(mut view: NodeView) -> NodeView {
    view.healthy = false;
    view
}

fn loaded(mut view: NodeView, load: f32) -> NodeView {
    for gpu in &mut view.gpus {
        gpu.load = load;
    }
    view
}

fn replica(id: &str, deployment: &str, node_id: u64, gpus: &[u32], mib: u64) -> PlacedReplica {
    PlacedReplica {
        replica_id: id.into(),
        deployment_id: deployment.into(),
        node_id,
        gpu_indices: gpus.to_vec(),
        memory_per_gpu_mib: mib,
        priority: 0,
        preemptible: false,
    }
}

fn preemptible(mut placed: PlacedReplica, priority: i32) -> PlacedReplica {
    placed.preemptible = true;
    placed.priority = priority;
    placed
}

fn deployment(id: &str, replicas: u32, gpus: u32, mib: u64) -> DeploymentDemand {
    DeploymentDemand {
        id: id.into(),
        replicas,
        request: ReplicaRequest {
            gpus,
            memory_per_gpu_mib: mib,
            cpu_cores: 1,
            memory_mib: 1_000,
            allow_cpu_fallback: false,
            allow_multi_node: false,
        },
        strategy: Strategy::Binpack,
        node_selector: BTreeMap::new(),
        priority: 0,
        allow_preemption: false,
    }
}

fn place(deployment: &str, node_id: u64, gpus: &[u32], mib: u64) -> Action {
    Action::Place { deployment_id: deployment.into(), node_id, gpu_indices: gpus.to_vec(), memory_per_gpu_mib: mib }
}

/// What an unplaceable entry must say.
struct Short {
    deployment_id: &'static str,
    missing: u32,
    reason_contains: &'static str,
    closest: Option<Closest>,
}

struct Case {
    name: &'static str,
    nodes: Vec<NodeView>,
    replicas: Vec<PlacedReplica>,
    deployments: Vec<DeploymentDemand>,
    places: Vec<Action>,
    /// Replica ids stopped, in order.
    stops: Vec<&'static str>,
    short: Vec<Short>,
}

#[allow(clippy::too_many_lines)]
fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "binpack packs replicas onto one gpu",
            nodes: vec![node(1, &[80_000]), node(2, &[80_000])],
            replicas: vec![],
            deployments: vec![deployment("a", 2, 1, 30_000)],
            places: vec![place("a", 1, &[0], 30_000), place("a", 1, &[0], 30_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "binpack takes the best fit",
            nodes: vec![node(1, &[40_000]), node(2, &[24_000])],
            replicas: vec![],
            deployments: vec![deployment("a", 1, 1, 20_000)],
            places: vec![place("a", 2, &[0], 20_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "binpack prefers a node already in use",
            nodes: vec![node(1, &[80_000]), node(2, &[24_000])],
            replicas: vec![replica("x1", "x", 1, &[0], 10_000)],
            deployments: vec![deployment("a", 1, 1, 20_000)],
            places: vec![place("a", 1, &[0], 20_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "binpack picks the fullest gpu within a node",
            nodes: vec![node(1, &[80_000, 80_000])],
            replicas: vec![replica("x1", "x", 1, &[1], 50_000)],
            deployments: vec![deployment("a", 1, 1, 20_000)],
            places: vec![place("a", 1, &[1], 20_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "spread puts replicas on different nodes",
            nodes: vec![node(1, &[80_000]), node(2, &[80_000]), node(3, &[80_000])],
            replicas: vec![],
            deployments: vec![DeploymentDemand { strategy: Strategy::Spread, ..deployment("a", 3, 1, 10_000) }],
            places: vec![place("a", 1, &[0], 10_000), place("a", 2, &[0], 10_000), place("a", 3, &[0], 10_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "spread avoids the node that already has a replica",
            nodes: vec![node(1, &[80_000]), node(2, &[80_000])],
            replicas: vec![replica("a1", "a", 1, &[0], 10_000)],
            deployments: vec![DeploymentDemand { strategy: Strategy::Spread, ..deployment("a", 2, 1, 10_000) }],
            places: vec![place("a", 2, &[0], 10_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "spread doubles up once every node has one",
            nodes: vec![node(1, &[80_000]), node(2, &[30_000])],
            replicas: vec![],
            deployments: vec![DeploymentDemand { strategy: Strategy::Spread, ..deployment("a", 3, 1, 10_000) }],
            places: vec![place("a", 2, &[0], 10_000), place("a", 1, &[0], 10_000), place("a", 2, &[0], 10_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "node selector keeps to labelled nodes",
            nodes: vec![labelled(node(1, &[80_000]), "zone", "a"), labelled(node(2, &[80_000]), "zone", "b")],
            replicas: vec![],
            deployments: vec![DeploymentDemand {
                node_selector: [("zone".to_owned(), "b".to_owned())].into(),
                ..deployment("a", 1, 1, 10_000)
            }],
            places: vec![place("a", 2, &[0], 10_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "node selector that matches nothing is explained",
            nodes: vec![labelled(node(1, &[80_000]), "zone", "a")],
            replicas: vec![],
            deployments: vec![DeploymentDemand {
                node_selector: [("zone".to_owned(), "c".to_owned())].into(),
                ..deployment("a", 2, 1, 10_000)
            }],
            places: vec![],
            stops: vec![],
            short: vec![Short {
                deployment_id: "a",
                missing: 2,
                reason_contains: "no healthy node matches the node selector of a (zone=c)",
                closest: None,
            }],
        },
        Case {
            name: "unhealthy node gets nothing",
            nodes: vec![unhealthy(node(1, &[24_000])), node(2, &[80_000])],
            replicas: vec![],
            deployments: vec![deployment("a", 1, 1, 20_000)],
            places: vec![place("a", 2, &[0], 20_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "replica on an unhealthy node is replaced",
            nodes: vec![unhealthy(node(1, &[80_000])), node(2, &[80_000])],
            replicas: vec![replica("a1", "a", 1, &[0], 20_000)],
            deployments: vec![deployment("a", 1, 1, 20_000)],
            places: vec![place("a", 2, &[0], 20_000)],
            stops: vec!["a1"],
            short: vec![],
        },
        Case {
            name: "cpu fallback when no gpu fits",
            nodes: vec![node(1, &[8_000])],
            replicas: vec![],
            deployments: vec![DeploymentDemand {
                request: ReplicaRequest { allow_cpu_fallback: true, ..deployment("a", 1, 1, 20_000).request },
                ..deployment("a", 1, 1, 20_000)
            }],
            places: vec![place("a", 1, &[], 0)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "no cpu fallback: the closest gpu and the shortfall are named",
            nodes: vec![node(1, &[8_000]), node(2, &[16_000])],
            replicas: vec![],
            deployments: vec![deployment("a", 1, 1, 20_000)],
            places: vec![],
            stops: vec![],
            short: vec![Short {
                deployment_id: "a",
                missing: 1,
                reason_contains: "closest is node 2 GPU 0 with 16000 MiB free, 4000 MiB short",
                closest: Some(Closest { node_id: 2, gpu_index: Some(0), free_mib: 16_000, short_by_mib: 4_000 }),
            }],
        },
        Case {
            name: "cpu-only replica takes the best fit on host memory",
            nodes: vec![node(1, &[]), {
                let mut small = node(2, &[]);
                small.memory_free_mib = 4_000;
                small
            }],
            replicas: vec![],
            deployments: vec![deployment("a", 1, 0, 0)],
            places: vec![place("a", 2, &[], 0)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "cpu-only replica short of host memory is explained",
            nodes: vec![{
                let mut small = node(1, &[]);
                small.memory_free_mib = 400;
                small
            }],
            replicas: vec![],
            deployments: vec![deployment("a", 1, 0, 0)],
            places: vec![],
            stops: vec![],
            short: vec![Short {
                deployment_id: "a",
                missing: 1,
                reason_contains: "no node has 1 free cpu cores and 1000 MiB free host memory",
                closest: Some(Closest { node_id: 1, gpu_index: None, free_mib: 400, short_by_mib: 600 }),
            }],
        },
        Case {
            name: "a 2-gpu replica gets 2 gpus of one node",
            nodes: vec![node(1, &[80_000]), node(2, &[40_000, 40_000])],
            replicas: vec![],
            deployments: vec![deployment("a", 1, 2, 35_000)],
            places: vec![place("a", 2, &[0, 1], 35_000)],
            stops: vec![],
            short: vec![],
        },
        Case {
            name: "a 2-gpu replica never spans nodes",
            nodes: vec![node(1, &[80_000]), node(2, &[80_000])],
            replicas: vec![],
            deployments: vec![deployment("a", 1, 2, 35_000)],
            places: vec![],
            stops: vec![],
            short: vec![Short {
                deployment_id: "a",
                missing: 1,
                reason_contains: "no eligible node of a has 2 gpus (the most is 1)",
                closest: None,
            }],
        },
        Case {
            name: "multi-gpu shortfall names the limiting gpu",
            nodes: vec![node(1, &[30_000, 30_000]), {
                let mut big = node(3, &[80_000, 40_000]);
                big.gpus[1].reserve_mib = 2_000;
                big
            }],
            replicas: vec![],
            deployments: vec![deployment("llama-70b", 1, 2, 40_000)],
            places: vec![],
            stops: vec![],
            short: vec![Short {
                deployment_id: "llama-70b",
                missing: 1,
                reason_contains: "no gpu fits llama-70b: needs 40000 MiB on each of 2 GPUs of one node; closest is node 3 GPU 1 with 38000 MiB free, 2000 MiB short",
                closest: Some(Closest { node_id: 3, gpu_index: Some(1), free_mib: 38_000, short_by_mib: 2_000 }),
            }],
        },
        Case {
            name: "multi-node allowed but unsupported is said plainly",
            nodes: vec![node(1, &[40_000]), node(2, &[40_000])],
            replicas: vec![],
            deployments: vec![DeploymentDemand {
                request: ReplicaRequest { allow_multi_node: true, ..deployment("a", 1, 2, 35_000).request },
                ..deployment("a", 1, 2, 35_000)
            }],
            places: vec![],
            stops: vec![],
            short: vec![Short {
                deployment_id: "a",
                missing: 1,
                reason_contains: "multi-node replicas but they are not supported yet",
                closest: None,
            }],
        },
        Case {
            name: "reserve is never promised",
            nodes: vec![{
                let mut one = node(1, &[24_000]);
                one.gpus[0].reserve_mib = 4_000;
                one
            }],
            replicas: vec![],
            deployments: vec![deployment("a", 1, 1, 21_000)],
            places: vec![],
            stops: vec![],
            short: vec![Short {
                deployment_id: "a",
                missing: 1,
                reason_contains: "with 20000 MiB free, 1000 MiB short",
                closest: Some(Closest { node_id: 1, gpu_index: Some(0), free_mib: 20_000, short_by_mib: 1_000 }),
            }],
        },
        Case {
            name: "preemption stops the fewest lower-priority replicas",
            nodes: vec![node(1, &[80_000])],
            replicas: vec![
                preemptible(replica("low1", "low", 1, &[0], 30_000), 0),
                preemptible(replica("low2", "low", 1, &[0], 40_000), 0),
            ],
            deployments: vec![DeploymentDemand {
                priority: 10,
                allow_preemption: true,
                ..deployment("high", 1, 1, 50_000)
            }],
            places: vec![place("high", 1, &[0], 50_000)],
            stops: vec!["low2"],
            short: vec![],
        },
        Case {
            name: "no preemption unless the deployment allows it",
            nodes: vec![node(1, &[80_000])],
            replicas: vec![preemptible(replica("low1", "low", 1, &[0], 70_000), 0)],
            deployments: vec![DeploymentDemand { priority: 10, ..deployment("high", 1, 1, 50_000) }],
            places: vec![],
            stops: vec![],
            short: vec![Short {
                deployment_id: "high",
                missing: 1,
                reason_contains: "40000 MiB short",
                closest: Some(Closest { node_id: 1, gpu_index: Some(0), free_mib: 10_000, short_by_mib: 40_000 }),
            }],
        },
        Case {
            name: "no preemption of equal priority or non-preemptible replicas",
            nodes: vec![node(1, &[80_000])],
            replicas: vec![
                preemptible(replica("same", "peer", 1, &[0], 35_000), 10),
                PlacedReplica { priority: 0, ..replica("pinned", "pinned", 1, &[0], 35_000) },
            ],
            deployments: vec![DeploymentDemand {
                priority: 10,
                allow_preemption: true,
                ..deployment("high", 1, 1, 50_000)
            }],
            places: vec![],
            stops: vec![],
            short: vec![Short { deployment_id: "high", missing: 1, reason_contains: "40000 MiB short", closest: None }],
        },
        Case {
            name: "preempted deployment is re-placed where it still fits",
            nodes: vec![node(1, &[80_000]), node(2, &[40_000])],
            replicas: vec![
                preemptible(replica("low1", "low", 1, &[0], 40_000), 0),
                replica("x1", "x", 2, &[0], 10_000),
            ],
            deployments: vec![
                DeploymentDemand { priority: 10, allow_preemption: true, ..deployment("high", 1, 1, 60_000) },
                deployment("low", 1, 1, 30_000),
            ],
            places: vec![place("high", 1, &[0], 60_000), place("low", 2, &[0], 30_000)],
            stops: vec!["low1"],
            short: vec![],
        },
        Case {
            name: "scale down stops replicas on the most loaded nodes",
            nodes: vec![
                loaded(node(1, &[80_000]), 0.2),
                loaded(node(2, &[80_000]), 0.9),
                loaded(node(3, &[80_000]), 0.5),
            ],
            replicas: vec![
                replica("a1", "a", 1, &[0], 10_000),
                replica("a2", "a", 2, &[0], 10_000),
                replica("a3", "a", 3, &[0], 10_000),
            ],
            deployments: vec![deployment("a", 1, 1, 10_000)],
            places: vec![],
            stops: vec!["a2", "a3"],
            short: vec![],
        },
        Case {
            name: "higher priority is placed first",
            nodes: vec![node(1, &[40_000])],
            replicas: vec![],
            deployments: vec![
                deployment("a", 1, 1, 30_000),
                DeploymentDemand { priority: 5, ..deployment("b", 1, 1, 30_000) },
            ],
            places: vec![place("b", 1, &[0], 30_000)],
            stops: vec![],
            short: vec![Short { deployment_id: "a", missing: 1, reason_contains: "20000 MiB short", closest: None }],
        },
        Case {
            name: "satisfied demand plans nothing",
            nodes: vec![node(1, &[40_000])],
            replicas: vec![replica("a1", "a", 1, &[0], 30_000)],
            deployments: vec![deployment("a", 1, 1, 30_000)],
            places: vec![],
            stops: vec![],
            short: vec![],
        },
    ]
}

#[test]
fn placement_decisions() {
    for case in cases() {
        let snapshot = ClusterSnapshot { nodes: case.nodes, replicas: case.replicas };
        let demand = Demand { deployments: case.deployments };
        validate(&snapshot, &demand).expect("case input is valid");
        let planned = plan(&snapshot, &demand);
        let places: Vec<Action> =
            planned.actions.iter().filter(|action| matches!(action, Action::Place { .. })).cloned().collect();
        assert_eq!(places, case.places, "{}: places", case.name);
        let stops: Vec<&str> = planned.stops().collect();
        assert_eq!(stops, case.stops, "{}: stops", case.name);
        assert_eq!(planned.unplaceable.len(), case.short.len(), "{}: unplaceable {:?}", case.name, planned.unplaceable);
        for (got, want) in planned.unplaceable.iter().zip(&case.short) {
            assert_eq!(got.deployment_id, want.deployment_id, "{}", case.name);
            assert_eq!(got.missing_replicas, want.missing, "{}", case.name);
            assert!(
                got.reason.contains(want.reason_contains),
                "{}: reason {:?} lacks {:?}",
                case.name,
                got.reason,
                want.reason_contains
            );
            if want.closest.is_some() {
                assert_eq!(got.closest, want.closest, "{}: closest", case.name);
            }
        }
        assert!(sch1_holds(&snapshot, &planned), "{}: SCH-1", case.name);
        assert!(sch2_holds(&demand, &planned), "{}: SCH-2", case.name);
        assert_eq!(planned, plan(&snapshot, &demand), "{}: SCH-3", case.name);
    }
}

#[test]
fn stops_come_before_the_place_that_needs_their_room() {
    let snapshot = ClusterSnapshot {
        nodes: vec![node(1, &[80_000])],
        replicas: vec![preemptible(replica("low1", "low", 1, &[0], 70_000), 0)],
    };
    let demand = Demand {
        deployments: vec![DeploymentDemand { priority: 1, allow_preemption: true, ..deployment("high", 1, 1, 50_000) }],
    };
    let planned = plan(&snapshot, &demand);
    assert!(matches!(planned.actions[0], Action::Stop { .. }));
    assert!(matches!(planned.actions[1], Action::Place { .. }));
    let Action::Stop { reason, .. } = &planned.actions[0] else { unreachable!() };
    assert_eq!(reason, "preempted by high (priority 1 over 0)");
}

#[test]
fn validate_names_duplicates() {
    let snapshot = ClusterSnapshot { nodes: vec![node(1, &[]), node(1, &[])], replicas: vec![] };
    let error = validate(&snapshot, &Demand::default()).unwrap_err();
    assert_eq!(error.to_string(), "node id 1 appears more than once in the snapshot; node ids must be unique");
    let demand = Demand { deployments: vec![deployment("a", 1, 0, 0), deployment("a", 2, 0, 0)] };
    let snapshot = ClusterSnapshot { nodes: vec![node(1, &[])], replicas: vec![] };
    assert!(validate(&snapshot, &demand).is_err());
    let planned = plan(&snapshot, &demand);
    assert_eq!(planned.unplaceable.len(), 1);
    assert!(planned.unplaceable[0].reason.contains("more than once"));
}
