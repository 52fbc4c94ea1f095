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
    ReplicaState, sch1_holds,
};

const SETTINGS: ReconcileSettings = ReconcileSettings { gpu_reserve_mib: 1024 };

fn deployment(replicas: u32, strategy: PlacementStrategy) -> Command {
    Command::PutDeployment {
        deployment_id: DeploymentId("llama".into()),
        spec: DeploymentSpec {
            serving: None,
            model_name: "llama".into(),
            model_version: "1".into(),
            model_path: None,
            request: ReplicaRequest { gpus_per_replica: 1, memory_per_gpu_mib: 30000, cpu_fallback_allowed: false },
            strategy,
            node_selector: BTreeMap::new(),
            priority: 0,
            allow_preemption: false,
            owner: None,
            tenant_model: false,
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

    // Scaling down stops a replica (its node's agent then removes it); scaling up beyond
    // room reports why.
    index += 1;
    state
        .apply(index, Command::ScaleDeployment { deployment_id: DeploymentId("llama".into()), replicas: 1, at_ms: 3 })
        .unwrap();
    run_round(&mut state, &mut index);
    assert_eq!(stopped(&mut state, &mut index), 1);
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

/// Registers nodes 1..=count with one 80 GiB GPU each, and the deployment.
fn cluster_with(count: u64, deployment_command: Command) -> (ClusterState, u64) {
    let mut state = ClusterState::default();
    let mut index = 0;
    for id in 1..=count {
        index += 1;
        state.apply(index, Command::RegisterNode { node: common::node_spec(id, 1), at_ms: 0 }).unwrap();
    }
    index += 1;
    state.apply(index, deployment_command).unwrap();
    (state, index)
}

/// Marks every pending or loading replica Ready, as node agents would.
fn all_ready(state: &mut ClusterState, index: &mut u64) {
    let starting: Vec<_> = state
        .replicas()
        .values()
        .filter(|r| matches!(r.state, ReplicaState::Pending | ReplicaState::Loading))
        .map(|r| r.id.clone())
        .collect();
    for replica_id in starting {
        *index += 1;
        state.apply(*index, Command::SetReplicaState { replica_id, state: ReplicaState::Ready, at_ms: 5 }).unwrap();
    }
}

/// Removes every stopping replica, as node agents would once they stopped them.
fn stopped(state: &mut ClusterState, index: &mut u64) -> usize {
    let stopping: Vec<_> =
        state.replicas().values().filter(|r| r.state == ReplicaState::Stopping).map(|r| r.id.clone()).collect();
    for replica_id in &stopping {
        *index += 1;
        state.apply(*index, Command::RemoveReplica { replica_id: replica_id.clone(), at_ms: 6 }).unwrap();
    }
    stopping.len()
}

fn ready_of_generation(state: &ClusterState, generation: u64) -> usize {
    state
        .replicas()
        .values()
        .filter(|r| r.deployment_generation == generation && r.state == ReplicaState::Ready)
        .count()
}

#[test]
fn a_rolling_update_keeps_the_desired_count_ready_throughout() {
    // Three nodes, room for two 30000 MiB replicas per GPU: 6 slots, 2 replicas.
    let (mut state, mut index) = cluster_with(3, deployment(2, PlacementStrategy::Spread));
    run_round(&mut state, &mut index);
    all_ready(&mut state, &mut index);
    assert_eq!(ready_of_generation(&state, 1), 2);

    // A new spec is a new generation.
    index += 1;
    let Command::PutDeployment { deployment_id, mut spec, .. } = deployment(2, PlacementStrategy::Spread) else {
        unreachable!()
    };
    spec.model_version = "2".into();
    state.apply(index, Command::PutDeployment { deployment_id, spec, replicas: 2, at_ms: 7 }).unwrap();

    // Until the new ones are Ready, the old ones serve.
    run_round(&mut state, &mut index);
    assert_eq!(ready_of_generation(&state, 1), 2, "no old replica stops before a new one is ready");
    assert_eq!(state.replicas().values().filter(|r| r.deployment_generation == 2).count(), 2, "a surge of two");
    assert_eq!(run_round(&mut state, &mut index), 0, "nothing more while the new ones load");
    all_ready(&mut state, &mut index);
    run_round(&mut state, &mut index);
    assert_eq!(stopped(&mut state, &mut index), 2, "both old replicas stop once the new ones are ready");
    assert_eq!(ready_of_generation(&state, 2), 2);
    assert_eq!(state.replicas().len(), 2);
    assert_eq!(run_round(&mut state, &mut index), 0);
}

#[test]
fn a_rolling_update_without_room_for_a_surge_replaces_one_replica_at_a_time() {
    // One node, room for two replicas, both taken.
    let (mut state, mut index) = cluster_with(1, deployment(2, PlacementStrategy::Binpack));
    run_round(&mut state, &mut index);
    all_ready(&mut state, &mut index);
    index += 1;
    let Command::PutDeployment { deployment_id, mut spec, .. } = deployment(2, PlacementStrategy::Binpack) else {
        unreachable!()
    };
    spec.model_version = "2".into();
    state.apply(index, Command::PutDeployment { deployment_id, spec, replicas: 2, at_ms: 7 }).unwrap();

    for step in 1..=2 {
        run_round(&mut state, &mut index);
        assert_eq!(stopped(&mut state, &mut index), 1, "step {step}: one old replica makes room");
        assert_eq!(ready_of_generation(&state, 1), 2 - step, "step {step}: the other keeps serving");
        run_round(&mut state, &mut index);
        all_ready(&mut state, &mut index);
        assert_eq!(ready_of_generation(&state, 2), step);
    }
    assert_eq!(run_round(&mut state, &mut index), 0);
    assert_eq!(state.replicas().len(), 2);
}

#[test]
fn a_drained_node_hands_its_replicas_over_before_they_stop() {
    let (mut state, mut index) = cluster_with(3, deployment(2, PlacementStrategy::Spread));
    run_round(&mut state, &mut index);
    all_ready(&mut state, &mut index);
    let drained = state.replicas().values().next().unwrap().node_id;
    index += 1;
    state.apply(index, Command::SetNodeStatus { node_id: drained, status: NodeStatus::Draining, at_ms: 8 }).unwrap();

    run_round(&mut state, &mut index);
    assert_eq!(stopped(&mut state, &mut index), 0, "the drained replica serves until its replacement is ready");
    let replacement: Vec<_> = state.replicas().values().filter(|r| r.state == ReplicaState::Pending).collect();
    assert_eq!(replacement.len(), 1);
    assert_ne!(replacement[0].node_id, drained, "no new work on a draining node");
    all_ready(&mut state, &mut index);
    run_round(&mut state, &mut index);
    assert_eq!(stopped(&mut state, &mut index), 1);
    assert!(state.replicas().values().all(|r| r.node_id != drained && r.state == ReplicaState::Ready));
    assert_eq!(state.replicas().len(), 2);
    assert_eq!(run_round(&mut state, &mut index), 0);
}

#[test]
fn a_drain_without_room_elsewhere_stops_nothing_and_says_why() {
    let (mut state, mut index) = cluster_with(1, deployment(1, PlacementStrategy::Binpack));
    run_round(&mut state, &mut index);
    all_ready(&mut state, &mut index);
    index += 1;
    state.apply(index, Command::SetNodeStatus { node_id: NodeId(1), status: NodeStatus::Draining, at_ms: 8 }).unwrap();
    let round = reconcile(&state, &SETTINGS, 100);
    assert!(round.commands.is_empty(), "{:?}", round.commands);
    assert_eq!(round.unplaceable.len(), 1, "the missing replacement is explained");
}

#[test]
fn knowledge_base_shards_leave_dead_and_draining_nodes_for_the_least_loaded() {
    use maas_consensus::state::{HashRange, KbShardPlacement, KbShardState, ShardId};
    let mut state = ClusterState::default();
    let mut index = 0;
    for id in 1..=3 {
        index += 1;
        state.apply(index, Command::RegisterNode { node: common::node_spec(id, 1), at_ms: 0 }).unwrap();
    }
    // Shards 0..4 on nodes 1, 2, 3, 1; shard 4 on node 3, stopping.
    for (shard, node) in [(0, 1), (1, 2), (2, 3), (3, 1), (4, 3)] {
        index += 1;
        let placement = KbShardPlacement {
            shard_id: ShardId(format!("kb.{shard}")),
            knowledge_base_id: "kb".into(),
            hash_range: HashRange { start: shard, end_inclusive: shard },
            node_id: NodeId(node),
        };
        state.apply(index, Command::PutKbShard { placement, at_ms: 1 }).unwrap();
    }
    index += 1;
    let stopping =
        Command::SetKbShardState { shard_id: ShardId("kb.4".into()), state: KbShardState::Stopping, at_ms: 2 };
    state.apply(index, stopping).unwrap();
    assert_eq!(run_round(&mut state, &mut index), 0, "shards on live nodes stay");

    // Node 1 dies: its two shards go to the node holding fewest (node 2 holds one, node 3
    // two, its stopping shard counted: it still holds its files), Pending there.
    index += 1;
    state.apply(index, Command::SetNodeStatus { node_id: NodeId(1), status: NodeStatus::Dead, at_ms: 3 }).unwrap();
    assert_eq!(run_round(&mut state, &mut index), 2);
    let on = |shard: &str| state.kb_shard(&ShardId(shard.into())).map(|s| (s.node_id.0, s.state.clone()));
    assert_eq!(on("kb.0"), Some((2, KbShardState::Pending)));
    assert_eq!(on("kb.3"), Some((2, KbShardState::Pending)), "a tie goes to the lower node id");
    assert_eq!(on("kb.1").unwrap().0, 2);
    assert_eq!(run_round(&mut state, &mut index), 0);

    // Node 3 drains: its live shard moves to node 2, the only node taking work; when node
    // 3 then dies, its stopping shard is removed (nothing there can drop it).
    index += 1;
    state.apply(index, Command::SetNodeStatus { node_id: NodeId(3), status: NodeStatus::Draining, at_ms: 4 }).unwrap();
    assert_eq!(run_round(&mut state, &mut index), 1);
    assert!(state.kb_shards().values().filter(|s| s.state != KbShardState::Stopping).all(|s| s.node_id.0 == 2));
    index += 1;
    state.apply(index, Command::SetNodeStatus { node_id: NodeId(3), status: NodeStatus::Dead, at_ms: 5 }).unwrap();
    assert_eq!(run_round(&mut state, &mut index), 1);
    assert_eq!(state.kb_shards().len(), 4);
}
