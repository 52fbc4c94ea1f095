//! The failure detector (REC-1): the pure decision table, then three control planes in
//! one process where one node is cut off and comes back.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use maas_consensus::StateMachine;
use maas_consensus::control::ControlPlane;
use maas_consensus::liveness::{LivenessSettings, LivenessTracker, Observation};
use maas_consensus::state::{ClusterState, Command, NodeId, NodeStatus};

const SETTINGS: LivenessSettings = LivenessSettings {
    suspect_after_ms: 1000,
    dead_after_ms: 3000,
    rejoin_stable_ms: 2000,
    max_rejoin_stable_ms: 10_000,
};

fn three_nodes() -> ClusterState {
    let mut state = ClusterState::default();
    for id in 1..=3 {
        state.apply(id, Command::RegisterNode { node: common::node_spec(id, 0), at_ms: 0 }).unwrap();
    }
    state
}

/// Runs one round as node 1 (the leader) and applies what it decides.
fn round(
    tracker: &mut LivenessTracker,
    state: &mut ClusterState,
    now_ms: u64,
    silent: &[(u64, u64)],
) -> Vec<(u64, NodeStatus)> {
    let silent_ms: BTreeMap<u64, u64> = silent.iter().copied().collect();
    let seen = Observation { now_ms, self_id: 1, is_leader: true, silent_ms: &silent_ms };
    let commands = tracker.decide(&seen, state, &SETTINGS);
    let mut changes = Vec::new();
    for command in commands {
        if let Command::SetNodeStatus { node_id, status, .. } = &command {
            changes.push((node_id.0, *status));
        }
        state.apply(1000 + now_ms, command).unwrap();
    }
    changes
}

#[test]
fn a_silent_node_is_suspect_then_dead_never_on_one_missed_heartbeat() {
    let mut state = three_nodes();
    let mut tracker = LivenessTracker::default();
    assert_eq!(round(&mut tracker, &mut state, 0, &[(2, 0), (3, 0)]), vec![]);
    assert_eq!(
        round(&mut tracker, &mut state, 400, &[(2, 0), (3, 400)]),
        vec![],
        "one missed heartbeat changes nothing"
    );
    assert_eq!(round(&mut tracker, &mut state, 1000, &[(2, 0), (3, 1000)]), vec![(3, NodeStatus::Suspect)]);
    assert_eq!(round(&mut tracker, &mut state, 2000, &[(2, 0), (3, 2000)]), vec![]);
    assert_eq!(round(&mut tracker, &mut state, 3000, &[(2, 0), (3, 3000)]), vec![(3, NodeStatus::Dead)]);
    assert_eq!(state.node(NodeId(3)).unwrap().dead_declarations, 1);
    assert_eq!(round(&mut tracker, &mut state, 4000, &[(2, 0), (3, 4000)]), vec![], "dead is declared once");
}

#[test]
fn a_suspect_node_heard_again_is_alive_at_once() {
    let mut state = three_nodes();
    let mut tracker = LivenessTracker::default();
    round(&mut tracker, &mut state, 0, &[(2, 0), (3, 1200)]);
    assert_eq!(state.node(NodeId(3)).unwrap().status, NodeStatus::Suspect);
    assert_eq!(round(&mut tracker, &mut state, 200, &[(2, 0), (3, 0)]), vec![(3, NodeStatus::Alive)]);
}

#[test]
fn a_dead_node_must_be_stable_before_it_is_alive_and_flapping_makes_that_longer() {
    let mut state = three_nodes();
    let mut tracker = LivenessTracker::default();
    round(&mut tracker, &mut state, 0, &[(2, 0), (3, 1500)]);
    round(&mut tracker, &mut state, 2000, &[(2, 0), (3, 3500)]);
    assert_eq!(state.node(NodeId(3)).unwrap().status, NodeStatus::Dead);
    // Heard again: not alive until it has been heard for rejoin_stable_ms (2 s).
    assert_eq!(round(&mut tracker, &mut state, 10_000, &[(2, 0), (3, 0)]), vec![]);
    assert_eq!(round(&mut tracker, &mut state, 11_000, &[(2, 0), (3, 100)]), vec![]);
    assert_eq!(round(&mut tracker, &mut state, 12_000, &[(2, 0), (3, 100)]), vec![(3, NodeStatus::Alive)]);
    // It flaps: dead a second time, it now needs twice as long.
    round(&mut tracker, &mut state, 13_000, &[(2, 0), (3, 1500)]);
    round(&mut tracker, &mut state, 15_000, &[(2, 0), (3, 3500)]);
    assert_eq!(state.node(NodeId(3)).unwrap().dead_declarations, 2);
    assert_eq!(round(&mut tracker, &mut state, 20_000, &[(2, 0), (3, 0)]), vec![]);
    assert_eq!(round(&mut tracker, &mut state, 22_000, &[(2, 0), (3, 0)]), vec![], "2 s is not enough the second time");
    // A break in hearing it starts the wait over.
    assert_eq!(round(&mut tracker, &mut state, 23_000, &[(2, 0), (3, 1200)]), vec![]);
    assert_eq!(round(&mut tracker, &mut state, 24_000, &[(2, 0), (3, 0)]), vec![]);
    assert_eq!(round(&mut tracker, &mut state, 27_000, &[(2, 0), (3, 0)]), vec![]);
    assert_eq!(round(&mut tracker, &mut state, 28_000, &[(2, 0), (3, 0)]), vec![(3, NodeStatus::Alive)]);
    assert_eq!(SETTINGS.rejoin_stable_for(10), 10_000, "capped");
}

#[test]
fn a_leader_without_a_quorum_evicts_nobody_and_followers_decide_nothing() {
    let mut state = three_nodes();
    let mut tracker = LivenessTracker::default();
    // Node 1 hears neither peer: it may be the one cut off.
    assert_eq!(round(&mut tracker, &mut state, 0, &[(2, 9000), (3, 9000)]), vec![]);
    assert!(state.nodes().values().all(|n| n.status == NodeStatus::Alive));
    let silent_ms: BTreeMap<u64, u64> = [(2, 9000), (3, 9000)].into_iter().collect();
    let follower = Observation { now_ms: 0, self_id: 1, is_leader: false, silent_ms: &silent_ms };
    assert!(tracker.decide(&follower, &state, &SETTINGS).is_empty());
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn status_on(plane: &ControlPlane, id: u64) -> Option<NodeStatus> {
    plane.handle().read_local(|state| state.node(NodeId(id)).map(|n| n.status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_is_declared_dead_by_the_majority_and_alive_when_it_returns() {
    let cluster = common::start_planes(0);
    for plane in cluster.planes.values() {
        plane.register_self(0, Duration::from_secs(10)).await.unwrap();
    }
    let leader = loop {
        if let Some((id, _)) = cluster.planes.iter().find(|(_, p)| p.handle().status().is_leader()) {
            break *id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let victim = *cluster.planes.keys().find(|id| **id != leader).unwrap();
    let observer = &cluster.planes[&leader];
    let own_view = &cluster.planes[&victim];
    until("every node is registered alive, in the leader's and the victim's view", || {
        (1..=3).all(|id| {
            status_on(observer, id) == Some(NodeStatus::Alive) && status_on(own_view, id) == Some(NodeStatus::Alive)
        })
    })
    .await;

    cluster.network.isolate(victim);
    let cut = Instant::now();
    until("the cut-off node is dead", || status_on(observer, victim) == Some(NodeStatus::Dead)).await;
    let declared_after = cut.elapsed();
    // Dead comes `dead_after_ms` (400) after the last message heard; the victim was still
    // alive at the cut, so heard within `suspect_after_ms` (150) before it.
    assert!(declared_after >= Duration::from_millis(250), "not before the grace period: {declared_after:?}");
    // The isolated node cannot commit anything: from its own (stale) view nobody died.

    assert!((1..=3).filter(|id| *id != victim).all(|id| status_on(own_view, id) == Some(NodeStatus::Alive)));

    cluster.network.heal();
    until("the node is alive again after a stable period", || status_on(observer, victim) == Some(NodeStatus::Alive))
        .await;
    until("the returned node learns it was dead and is alive", || {
        status_on(own_view, victim) == Some(NodeStatus::Alive)
    })
    .await;
    let record = observer.handle().read_local(|state| state.node(NodeId(victim)).cloned()).unwrap();
    assert_eq!(record.dead_declarations, 1);
    for plane in cluster.planes.values() {
        plane.stop();
    }
}
