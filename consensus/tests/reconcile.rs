//! The leader's reconcile loop (issue 4, REC-1): desired deployments become placements,
//! a stable state proposes nothing, and a dead node's replicas are placed again on the
//! survivors, in a pure round and across three control planes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use maas_consensus::StateMachine;
use maas_consensus::control::ControlPlane;
use maas_consensus::reconcile::{ReconcileSettings, reconcile};
use maas_consensus::state::{
    ClusterState, Command, DeploymentId, DeploymentSpec, NodeId, NodeStatus, PlacementStrategy, ReplicaRequest,
    sch1_holds,
};

const SETTINGS: ReconcileSettings = ReconcileSettings { gpu_reserve_mib: 1024 };

fn deployment(replicas: u32, strategy: PlacementStrategy) -> Command {
    Command::PutDeployment {
        deployment_id: DeploymentId("llama".into()),
        spec: DeploymentSpec {
            model_name: "llama".into(),
            model_version: "1".into(),
            request: ReplicaRequest { gpus_per_replica: 1, memory_per_gpu_mib: 30000, cpu_fallback_allowed: false },
            strategy,
            node_selector: BTreeMap::new(),
            priority: 0,
            allow_preemption: false,
        },
        replicas,
        at_ms: 1,
    }
}

/// Applies every command of one round; returns how many there were.
fn run_round(state: &mut ClusterState, index: &mut u64) -> usize {
    let round = reconcile(state, &SETTINGS, 100);
    let count = round.commands.len();
    for command in round.commands {
        *index += 1;
        state.apply(*index, command).expect("the reconcile loop proposes only valid commands");
    }
    assert!(sch1_holds(state));
    count
}

#[test]
fn placements_follow_the_desired_state_and_a_dead_node_is_replaced() {
    let mut state = ClusterState::default();
    let mut index = 0;
    for id in 1..=3 {
        index += 1;
        state.apply(index, Command::RegisterNode { node: common::node_spec(id, 1), at_ms: 0 }).unwrap();
    }
    index += 1;
    state.apply(index, deployment(2, PlacementStrategy::Spread)).unwrap();

    assert_eq!(run_round(&mut state, &mut index), 2);
    assert_eq!(run_round(&mut state, &mut index), 0, "a stable state proposes nothing");
    let nodes: Vec<u64> = state.replicas().values().map(|r| r.node_id.0).collect();
    assert_eq!(nodes.len(), 2);
    assert_ne!(nodes[0], nodes[1], "spread puts the replicas on different nodes");

    // A suspect node keeps its replica and takes no new one.
    let suspect = nodes[0];
    index += 1;
    state
        .apply(index, Command::SetNodeStatus { node_id: NodeId(suspect), status: NodeStatus::Suspect, at_ms: 2 })
        .unwrap();
    assert_eq!(run_round(&mut state, &mut index), 0, "one missed heartbeat window moves nothing");

    // The first replica's node dies: its replica is removed and placed on the survivor left.
    let dead = nodes[0];
    index += 1;
    state.apply(index, Command::SetNodeStatus { node_id: NodeId(dead), status: NodeStatus::Dead, at_ms: 2 }).unwrap();
    assert_eq!(run_round(&mut state, &mut index), 2, "one removal and one placement");
    let nodes: Vec<u64> = state.replicas().values().map(|r| r.node_id.0).collect();
    assert_eq!(nodes.len(), 2);
    assert!(!nodes.contains(&dead));
    assert_eq!(run_round(&mut state, &mut index), 0);

    // Scaling down removes a replica; scaling up beyond room reports why.
    index += 1;
    state
        .apply(index, Command::ScaleDeployment { deployment_id: DeploymentId("llama".into()), replicas: 1, at_ms: 3 })
        .unwrap();
    run_round(&mut state, &mut index);
    assert_eq!(state.replicas().len(), 1);
    index += 1;
    state
        .apply(index, Command::ScaleDeployment { deployment_id: DeploymentId("llama".into()), replicas: 9, at_ms: 4 })
        .unwrap();
    run_round(&mut state, &mut index);
    // Two alive nodes, each 81920 - 1024 MiB: two 30000 MiB replicas per GPU.
    assert_eq!(state.replicas().len(), 4);
    let round = reconcile(&state, &SETTINGS, 100);
    assert!(round.commands.is_empty());
    assert_eq!(round.unplaceable.len(), 1);
    assert_eq!(round.unplaceable[0].missing_replicas, 5);
    assert!(round.unplaceable[0].reason.contains("30000"), "{}", round.unplaceable[0].reason);
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_places_replicas_and_moves_them_off_a_dead_node() {
    let common::LocalCluster { network, planes, .. } = &common::start_planes(1);
    for plane in planes.values() {
        plane.register_self(0, Duration::from_secs(10)).await.unwrap();
    }
    let any = planes[&1].handle().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if matches!(any.propose(deployment(2, PlacementStrategy::Spread)).await, Ok(Ok(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "the deployment is committed");
    }
    let placed = |plane: &ControlPlane| {
        plane.handle().read_local(|s| s.replicas().values().map(|r| r.node_id.0).collect::<Vec<_>>())
    };
    until("both replicas are placed", || placed(&planes[&1]).len() == 2).await;

    let leader = planes.iter().find(|(_, p)| p.handle().status().is_leader()).map(|(id, _)| *id).unwrap();
    let victim = placed(&planes[&1]).into_iter().find(|node| *node != leader).expect("spread uses a follower");
    network.isolate(victim);
    let cut = Instant::now();
    let observer = &planes[&leader];
    until("the dead node's replica runs elsewhere", || {
        let nodes = placed(observer);
        nodes.len() == 2 && !nodes.contains(&victim)
    })
    .await;
    let moved_after = cut.elapsed();
    eprintln!("node {victim} cut off; its replica placed elsewhere {moved_after:?} later (400 ms grace)");
    // Dead comes 400 ms after the last message heard, which was at most 150 ms before the
    // cut (the node was alive): a suspect node's replica is never moved before that.
    assert!(moved_after >= Duration::from_millis(250), "moved before the grace period: {moved_after:?}");
    assert!(observer.handle().read_local(sch1_holds));
    for plane in planes.values() {
        plane.stop();
    }
}
