//! A seeded simulation of 3 and 5 raft nodes over a lossy in-memory network with a fake
//! clock: message loss, delay, reordering, duplication, partitions and crash-restarts,
//! with client proposals throughout. Checks, for every seed:
//!
//! - RAFT-2: at most one leader per term;
//! - RAFT-1: every acknowledged proposal is in the final log of every node, at the index
//!   it was acknowledged at, and all nodes applied the same commands in the same order
//!   (state-machine safety, Raft paper §5.4.3);
//! - liveness once the network heals: a leader is elected and every node catches up.
//!
//! A failure names its seed: `MAAS_SIM_SEED=<seed> cargo test -p maas-consensus --test sim`
//! replays it. `MAAS_SIM_SEEDS=<n>` runs more seeds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use maas_consensus::storage::DiskStorage;
use maas_consensus::{RaftCore, RaftSettings};
use raft::prelude::{Message, MessageType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

mod common;
use common::Journal;

struct InFlight {
    deliver_at: u64,
    to: u64,
    message: Message,
}

struct SimNode {
    core: Option<RaftCore<Journal>>,
    dir: PathBuf,
}

type Waiting = (u64, oneshot::Receiver<maas_consensus::core::ProposalOutcome<Journal>>);

struct Sim {
    rng: StdRng,
    seed: u64,
    nodes: BTreeMap<u64, SimNode>,
    network: Vec<InFlight>,
    now: u64,
    /// Nodes that cannot reach each other: messages between the two sides are dropped.
    partition: Option<BTreeSet<u64>>,
    leaders_by_term: BTreeMap<u64, u64>,
    next_command: u64,
    waiting: Vec<Waiting>,
    /// Acknowledged proposals: command -> index it was applied at.
    acknowledged: BTreeMap<u64, u64>,
    settings: RaftSettings,
    _root: tempfile::TempDir,
}

fn temp_root() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() { tempfile::tempdir_in(shm).unwrap() } else { tempfile::tempdir().unwrap() }
}

impl Sim {
    fn new(seed: u64, size: u64) -> Self {
        let root = temp_root();
        let voters: Vec<u64> = (1..=size).collect();
        let settings = RaftSettings {
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 40,
            election_jitter: false,
            ..RaftSettings::default()
        };
        let mut nodes = BTreeMap::new();
        for id in &voters {
            let dir = root.path().join(format!("node-{id}"));
            let storage = DiskStorage::open(&dir).unwrap();
            let node_settings = RaftSettings { incarnation: *id, ..settings.clone() };
            let core = RaftCore::new(*id, storage, Journal::default(), node_settings, Some(voters.clone()), &discard())
                .unwrap();

            nodes.insert(*id, SimNode { core: Some(core), dir });
        }
        Sim {
            rng: StdRng::seed_from_u64(seed),
            seed,
            nodes,
            network: Vec::new(),
            now: 0,
            partition: None,
            leaders_by_term: BTreeMap::new(),
            next_command: 1,
            waiting: Vec::new(),
            acknowledged: BTreeMap::new(),
            settings,
            _root: root,
        }
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        match &self.partition {
            Some(side) => side.contains(&a) == side.contains(&b),
            None => true,
        }
    }

    /// One step of simulated time: every live node ticks, due messages are delivered,
    /// readies are processed, and chaos strikes with some probability.
    fn step(&mut self, chaos: bool) {
        self.now += 1;
        if chaos {
            self.chaos();
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in &ids {
            // Seeded jitter in place of raft's own: a node sometimes misses a tick.
            let ticks = self.rng.random_bool(0.85);
            if let Some(core) = self.nodes.get_mut(id).unwrap().core.as_mut()
                && ticks
            {
                core.tick();
            }
        }
        self.deliver();
        if self.rng.random_bool(0.3) {
            self.propose();
        }
        for id in &ids {
            self.process(*id);
        }
        self.observe();
    }

    fn chaos(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let roll: f64 = self.rng.random();
        if roll < 0.004 {
            // Crash a live node: everything not yet handed to storage is lost.
            let id = ids[self.rng.random_range(0..ids.len())];
            self.nodes.get_mut(&id).unwrap().core = None;
            self.network.retain(|m| m.to != id);
        } else if roll < 0.012 {
            // Restart a crashed node from its directory.
            let crashed: Vec<u64> = ids.iter().copied().filter(|id| self.nodes[id].core.is_none()).collect();
            if let Some(id) = crashed.first() {
                self.restart(*id);
            }
        } else if roll < 0.016 && self.partition.is_none() {
            let side: BTreeSet<u64> = ids.iter().copied().filter(|_| self.rng.random_bool(0.5)).collect();
            self.partition = Some(side);
        } else if roll < 0.024 {
            self.partition = None;
        }
    }

    fn restart(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        let storage =
            DiskStorage::open(&node.dir).unwrap_or_else(|e| panic!("seed {}: node {id} reopens: {e}", self.seed));
        let settings = RaftSettings { incarnation: self.rng.random_range(1..u64::MAX), ..self.settings.clone() };
        let core = RaftCore::new(id, storage, Journal::default(), settings, None, &discard())
            .unwrap_or_else(|e| panic!("seed {}: node {id} restarts: {e}", self.seed));
        node.core = Some(core);
    }

    fn deliver(&mut self) {
        let now = self.now;
        let (due, later): (Vec<InFlight>, Vec<InFlight>) =
            std::mem::take(&mut self.network).into_iter().partition(|m| m.deliver_at <= now);
        self.network = later;
        for in_flight in due {
            let from = in_flight.message.from;
            if !self.connected(from, in_flight.to) {
                continue;
            }
            if let Some(core) = self.nodes.get_mut(&in_flight.to).and_then(|n| n.core.as_mut()) {
                core.step(in_flight.message).unwrap_or_else(|e| panic!("seed {}: step failed: {e}", self.seed));
            }
        }
    }

    fn process(&mut self, id: u64) {
        let Some(core) = self.nodes.get_mut(&id).unwrap().core.as_mut() else { return };
        let mut outbox = Vec::new();
        core.process_ready(&mut outbox).unwrap_or_else(|e| panic!("seed {}: node {id} ready failed: {e}", self.seed));
        for message in outbox {
            // Loss, delay (and so reordering) and duplication. A snapshot's fate is
            // reported to its sender as a real transport would.
            let lost = self.rng.random_bool(0.05);
            if message.get_msg_type() == MessageType::MsgSnapshot {
                let core = self.nodes.get_mut(&id).unwrap().core.as_mut().unwrap();
                core.report_snapshot(message.to, !lost);
            }
            if lost {
                continue;
            }
            let copies = if self.rng.random_bool(0.02) { 2 } else { 1 };
            for _ in 0..copies {
                let delay = self.rng.random_range(1..=4);
                self.network.push(InFlight { deliver_at: self.now + delay, to: message.to, message: message.clone() });
            }
        }
    }

    fn propose(&mut self) {
        let live: Vec<u64> = self.nodes.iter().filter(|(_, n)| n.core.is_some()).map(|(id, _)| *id).collect();
        if live.is_empty() {
            return;
        }
        let id = live[self.rng.random_range(0..live.len())];
        let command = self.next_command;
        self.next_command += 1;
        let (reply, receiver) = oneshot::channel();
        self.nodes.get_mut(&id).unwrap().core.as_mut().unwrap().propose(&command, reply);
        self.waiting.push((command, receiver));
    }

    fn observe(&mut self) {
        for (id, node) in &self.nodes {
            let Some(core) = &node.core else { continue };
            if core.is_leader() {
                let term = core.term();
                let previous = self.leaders_by_term.insert(term, *id);
                assert!(
                    previous.is_none_or(|p| p == *id),
                    "seed {}: RAFT-2 violated: nodes {previous:?} and {id} both led term {term}",
                    self.seed
                );
            }
        }
        let mut still_waiting = Vec::new();
        for (command, mut receiver) in std::mem::take(&mut self.waiting) {
            match receiver.try_recv() {
                Ok(Ok(Ok(index))) => {
                    self.acknowledged.insert(command, index);
                }
                Ok(_) | Err(oneshot::error::TryRecvError::Closed) => {}
                Err(oneshot::error::TryRecvError::Empty) => still_waiting.push((command, receiver)),
            }
        }
        self.waiting = still_waiting;
    }

    /// Heals everything and runs until every node has applied the same, complete log.
    fn converge(&mut self) {
        self.partition = None;
        let crashed: Vec<u64> = self.nodes.iter().filter(|(_, n)| n.core.is_none()).map(|(id, _)| *id).collect();
        for id in crashed {
            self.restart(id);
        }
        for _ in 0..3000 {
            self.step(false);
            if self.converged() {
                return;
            }
        }
        let statuses: Vec<_> = self.nodes.values().map(|n| n.core.as_ref().unwrap().status()).collect();
        panic!("seed {}: no convergence after healing: {statuses:#?}", self.seed);
    }

    fn converged(&self) -> bool {
        let cores: Vec<&RaftCore<Journal>> = self.nodes.values().map(|n| n.core.as_ref().unwrap()).collect();
        let Some(leader) = cores.iter().find(|c| c.is_leader()) else { return false };
        let last = leader.status().last_index;
        // Proposals lost on the way to a leader are never answered (their callers time
        // out), so convergence is about the logs, not about every proposal.
        cores.iter().all(|c| c.applied_index() == last)
    }

    fn check_safety(&self) {
        let journals: Vec<(u64, Journal)> =
            self.nodes.iter().map(|(id, n)| (*id, n.core.as_ref().unwrap().state().read().unwrap().clone())).collect();
        let (first_id, reference) = &journals[0];
        for (id, journal) in &journals[1..] {
            assert_eq!(journal, reference, "seed {}: nodes {first_id} and {id} applied different logs", self.seed);
        }
        // A forwarded proposal can be appended twice when the network duplicates it; what
        // must hold is that the acknowledged (index, command) pair is in the log.
        let applied: BTreeSet<(u64, u64)> = reference.applied.iter().copied().collect();
        for (command, index) in &self.acknowledged {
            assert!(
                applied.contains(&(*index, *command)),
                "seed {}: RAFT-1 violated: acknowledged command {command} at index {index} is not in the final log",
                self.seed
            );
        }
        let mut indexes: Vec<u64> = reference.applied.iter().map(|(index, _)| *index).collect();
        let sorted = indexes.windows(2).all(|w| w[0] < w[1]);
        indexes.dedup();
        assert!(sorted, "seed {}: applied indexes go backwards", self.seed);
    }
}

fn discard() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn run_seed(seed: u64, size: u64, steps: u64) -> usize {
    let mut sim = Sim::new(seed, size);
    for _ in 0..steps {
        sim.step(true);
    }
    sim.converge();
    sim.check_safety();
    sim.acknowledged.len()
}

fn seeds(default_count: u64, offset: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("MAAS_SIM_SEED") {
        return vec![seed.parse().expect("MAAS_SIM_SEED is a number")];
    }
    let count = std::env::var("MAAS_SIM_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(default_count);
    (offset..offset + count).collect()
}

#[test]
fn three_nodes_keep_raft_1_and_raft_2_under_chaos() {
    let mut acknowledged = 0;
    for seed in seeds(2000, 0) {
        acknowledged += run_seed(seed, 3, 600);
    }
    assert!(acknowledged > 0, "the simulation acknowledged writes");
}

#[test]
fn five_nodes_keep_raft_1_and_raft_2_under_chaos() {
    let mut acknowledged = 0;
    for seed in seeds(800, 1_000_000) {
        acknowledged += run_seed(seed, 5, 600);
    }
    assert!(acknowledged > 0, "the simulation acknowledged writes");
}
