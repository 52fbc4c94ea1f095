//! Layer (b): three raft nodes in one process, each on its own thread with fsynced disk
//! storage, connected by the in-process network. Ticks are 10 ms, so elections take
//! 100-200 ms and the tests stay fast.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Journal, REFUSED_FROM};
use maas_consensus::local::LocalNetwork;
use maas_consensus::storage::DiskStorage;
use maas_consensus::{ConsensusError, DriverConfig, RaftHandle, RaftSettings};

struct Cluster {
    network: Arc<LocalNetwork<Journal>>,
    root: tempfile::TempDir,
    handles: BTreeMap<u64, RaftHandle<Journal>>,
}

fn config(id: u64, bootstrap: Option<Vec<u64>>) -> DriverConfig {
    DriverConfig {
        tick: Duration::from_millis(10),
        settings: RaftSettings { snapshot_interval_entries: 100, ..RaftSettings::default() },
        bootstrap_voters: bootstrap,
        request_timeout: Duration::from_secs(5),
        ..DriverConfig::new(id)
    }
}

impl Cluster {
    fn start(size: u64) -> Self {
        let mut cluster =
            Cluster { network: LocalNetwork::new(), root: tempfile::tempdir().unwrap(), handles: BTreeMap::new() };
        let voters: Vec<u64> = (1..=size).collect();
        for id in 1..=size {
            cluster.start_node(id, Some(voters.clone()));
        }
        cluster
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    fn start_node(&mut self, id: u64, bootstrap: Option<Vec<u64>>) {
        let storage = DiskStorage::open(&self.dir(id)).unwrap();
        let handle = maas_consensus::driver::start(
            &config(id, bootstrap),
            storage,
            Journal::default(),
            self.network.transport(id),
        )
        .unwrap();
        self.network.attach(id, handle.clone());
        self.handles.insert(id, handle);
    }

    fn stop_node(&mut self, id: u64) {
        self.network.detach(id);
        if let Some(handle) = self.handles.remove(&id) {
            handle.stop();
        }
    }

    /// Waits until the running nodes agree on one leader, and returns it.
    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let statuses: Vec<_> = self.handles.values().map(RaftHandle::status).collect();
            let leaders: Vec<u64> = statuses.iter().filter(|s| s.role == "Leader").map(|s| s.id).collect();
            if let [leader] = leaders.as_slice()
                && statuses.iter().filter(|s| s.leader_id == *leader).count() * 2 > statuses.len()
            {
                return *leader;
            }
            assert!(Instant::now() < deadline, "no single leader: {statuses:#?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn handle(&self, id: u64) -> &RaftHandle<Journal> {
        &self.handles[&id]
    }

    /// Writes `commands` through the leader, retrying across leader changes, and returns
    /// the index each was acknowledged at.
    async fn write_all(&self, commands: impl IntoIterator<Item = u64>) -> BTreeMap<u64, u64> {
        let mut acknowledged = BTreeMap::new();
        for command in commands {
            let index = loop {
                let leader = self.leader().await;
                match self.handle(leader).propose(command).await {
                    Ok(Ok(index)) => break index,
                    Ok(Err(refused)) => panic!("{refused}"),
                    Err(
                        ConsensusError::NotLeader { .. }
                        | ConsensusError::Dropped
                        | ConsensusError::LeaderChanged
                        | ConsensusError::Timeout(_),
                    ) => {}
                    Err(other) => panic!("{other}"),
                }
            };
            acknowledged.insert(command, index);
        }
        acknowledged
    }

    /// Every running node's journal, read after a linearizable read on it.
    async fn journals(&self) -> BTreeMap<u64, Journal> {
        let mut journals = BTreeMap::new();
        for (id, handle) in &self.handles {
            journals.insert(*id, handle.read(Clone::clone).await.unwrap());
        }
        journals
    }
}

fn assert_contains_all(journal: &Journal, acknowledged: &BTreeMap<u64, u64>) {
    for (command, index) in acknowledged {
        assert!(
            journal.applied.contains(&(*index, *command)),
            "acknowledged command {command} at index {index} is in the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_commit_through_the_leader_and_through_followers() {
    let cluster = Cluster::start(3);
    let leader = cluster.leader().await;
    let acknowledged = cluster.write_all(1..=20).await;
    assert_eq!(acknowledged.len(), 20);

    // A follower forwards a proposal to the leader and answers when it applies locally.
    let follower = *cluster.handles.keys().find(|id| **id != leader).unwrap();
    let index = cluster.handle(follower).propose(21).await.unwrap().unwrap();
    assert!(index > acknowledged[&20]);
    let refused = cluster.handle(follower).propose(REFUSED_FROM).await.unwrap();
    assert!(refused.is_err(), "the state machine's rejection comes back to the follower too");

    for journal in cluster.journals().await.values() {
        assert_eq!(journal.commands(), (1..=21).collect::<Vec<_>>(), "a rejected command changes nothing");
    }
    let status = cluster.handle(leader).status();
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert!(status.matched.values().all(|m| *m > 0), "the leader tracks each member's progress: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_elects_another_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3);
    let mut acknowledged = cluster.write_all(1..=50).await;
    let old_leader = cluster.leader().await;
    cluster.stop_node(old_leader);
    let stopped = Instant::now();
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, old_leader);
    acknowledged.extend(cluster.write_all(51..=100).await);
    eprintln!("failover to the first accepted write took {:?}", stopped.elapsed());
    for journal in cluster.journals().await.values() {
        assert_contains_all(journal, &acknowledged);
    }
    // The old leader comes back from its disk and catches up.
    cluster.start_node(old_leader, None);
    acknowledged.extend(cluster.write_all(101..=110).await);
    let journals = cluster.journals().await;
    for journal in journals.values() {
        assert_contains_all(journal, &acknowledged);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_brings_the_state_back_from_disk() {
    let mut cluster = Cluster::start(3);
    // More entries than the snapshot interval, so the logs are compacted before the stop.
    let acknowledged = cluster.write_all(1..=250).await;
    let before = cluster.journals().await;
    for id in 1..=3 {
        cluster.stop_node(id);
    }
    for id in 1..=3 {
        cluster.start_node(id, None);
    }
    cluster.leader().await;
    let after = cluster.journals().await;
    assert_eq!(after, before);
    for journal in after.values() {
        assert_contains_all(journal, &acknowledged);
    }
    let status = cluster.handle(1).status();
    assert!(status.snapshot_index >= 100, "the log was compacted: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_catches_up_by_snapshot_and_can_be_removed() {
    let mut cluster = Cluster::start(3);
    let acknowledged = cluster.write_all(1..=230).await;
    cluster.start_node(4, None);
    let leader = cluster.leader().await;
    let mut voters = cluster.handle(leader).add_voter(4).await.unwrap().voters;
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 3, 4]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.handle(4).status().applied_index < cluster.handle(leader).status().commit_index {
        assert!(Instant::now() < deadline, "node 4 catches up: {:?}", cluster.handle(4).status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_contains_all(&cluster.handle(4).read(Clone::clone).await.unwrap(), &acknowledged);

    let leader = cluster.leader().await;
    let mut voters = cluster.handle(leader).remove_member(4).await.unwrap().voters;
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 3]);
    cluster.stop_node(4);
    cluster.write_all(231..=240).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_commits_nothing_and_the_majority_moves_on() {
    let cluster = Cluster::start(3);
    let acknowledged = cluster.write_all(1..=10).await;
    let old_leader = cluster.leader().await;
    cluster.network.isolate(old_leader);
    let outcome = cluster.handle(old_leader).propose(1000).await;
    assert!(outcome.is_err(), "an isolated leader cannot commit: {outcome:?}");
    // Once it has stepped down and knows no leader, it says so at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cluster.handle(old_leader).propose(1001).await {
            Err(ConsensusError::NotLeader { leader_id: None, .. }) => break,
            other => assert!(Instant::now() < deadline, "an isolated node ends up knowing no leader: {other:?}"),
        }
    }

    // The majority elects a new leader and keeps writing.
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_leader = loop {
        let leaders: Vec<u64> = cluster
            .handles
            .values()
            .map(RaftHandle::status)
            .filter(|s| s.role == "Leader" && s.id != old_leader)
            .map(|s| s.id)
            .collect();
        if let Some(leader) = leaders.first() {
            break *leader;
        }
        assert!(Instant::now() < deadline, "the majority elects a leader");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(cluster.handle(new_leader).propose(2000).await.unwrap().is_ok());
    cluster.network.heal();
    cluster.leader().await;
    for journal in cluster.journals().await.values() {
        assert_contains_all(journal, &acknowledged);
        assert!(!journal.commands().contains(&1000), "the isolated leader's write never committed");
        assert!(!journal.commands().contains(&1001));
        assert!(journal.commands().contains(&2000));
    }
}
