//! The raft core of one node: `RawNode` plus the durable storage, the state machine, and
//! the proposals and reads waiting for their entries to apply.
//!
//! It is clock-free and does no networking: the caller ticks it, steps it with inbound
//! messages, and collects its outbound messages from [`RaftCore::process_ready`]. The
//! threaded driver ([`crate::driver`]) runs it against the wall clock and a transport; the
//! simulation tests run many cores against a fake clock and a lossy in-memory network.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::StateRole;
use raft::prelude::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, Storage as _};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::StateMachine;
use crate::error::{ConsensusError, Result};
use crate::storage::DiskStorage;

/// Raft timing and batching settings, in ticks of the caller's clock.
/// How many snapshot intervals a follower may lag and still hold back a leader's snapshot
/// (see `RaftCore::a_follower_needs_the_log`).
const CATCH_UP_INTERVALS: u64 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftSettings {
    /// Ticks without hearing from a leader before a follower campaigns (randomised by raft
    /// between this and twice this).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between state-machine snapshots (which compact the log).
    pub snapshot_interval_entries: u64,
    /// The largest append message, in bytes.
    pub max_message_bytes: u64,
    /// Append messages in flight to one follower.
    pub max_inflight_messages: usize,
    /// Whether raft randomises each election timeout (between `election_ticks` and twice
    /// that). Simulations turn it off and jitter their ticks from a seeded generator, so a
    /// seed replays exactly (raft-rs draws its jitter from an unseeded generator).
    pub election_jitter: bool,
    /// A number that differs between runs of the same node (the driver uses the start
    /// time); part of every proposal's identity.
    pub incarnation: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 10_000,
            max_message_bytes: 1024 * 1024,
            max_inflight_messages: 256,
            election_jitter: true,
            incarnation: 0,
        }
    }
}

/// What a command proposal resolves to: the state machine's verdict, or a consensus
/// failure (not the leader, dropped by a leadership change, stopped).
pub type ProposalOutcome<S> =
    Result<std::result::Result<<S as StateMachine>::Response, <S as StateMachine>::Rejection>>;

enum Waiter<S: StateMachine> {
    Command(oneshot::Sender<ProposalOutcome<S>>),
    Membership(oneshot::Sender<Result<ConfState>>),
}

impl<S: StateMachine> Waiter<S> {
    fn abandoned(&self) -> bool {
        match self {
            Waiter::Command(reply) => reply.is_closed(),
            Waiter::Membership(reply) => reply.is_closed(),
        }
    }

    fn fail(self, error: ConsensusError) {
        match self {
            Waiter::Command(reply) => {
                let _ = reply.send(Err(error));
            }
            Waiter::Membership(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A role, term and progress summary of one node, for status pages and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    pub id: u64,
    pub role: String,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: each member's matched log index (lag = last_index - matched).
    pub matched: BTreeMap<u64, u64>,
    /// Ticks since a message last arrived from each other voter (the failure detector's
    /// input; meaningful on the leader, which every follower answers).
    pub silent_ticks: BTreeMap<u64, u64>,
    /// Why the raft node stopped, when it stopped on a failure (its storage failed); it
    /// then takes no part in the cluster until restarted.
    pub failed: Option<String>,
}

impl RaftStatus {
    pub fn is_leader(&self) -> bool {
        self.role == "Leader"
    }
}

pub struct RaftCore<S: StateMachine> {
    raw: RawNode<DiskStorage>,
    storage: DiskStorage,
    state: Arc<RwLock<S>>,
    settings: RaftSettings,
    applied_index: u64,
    /// Proposals waiting for their entry to apply, by sequence number. Each entry's
    /// context names its proposer (node id, incarnation, sequence), so a proposal a
    /// follower forwarded to the leader is answered when it applies here too.
    waiting: BTreeMap<u64, Waiter<S>>,
    /// Proposals this node appended as leader: index -> (term, sequence). Another term at
    /// that index when it applies means the proposal was lost to a leadership change.
    appended: BTreeMap<u64, (u64, u64)>,
    next_sequence: u64,
    /// Distinguishes this run of the node from earlier ones, so an old run's proposal that
    /// applies late is not taken for a new one with the same sequence number.
    incarnation: u64,
    /// Linearizable reads: by request context until raft confirms the read index, then
    /// by read index until the state machine has applied it.
    reads_unconfirmed: BTreeMap<u64, oneshot::Sender<Result<u64>>>,
    reads_confirmed: VecDeque<(u64, oneshot::Sender<Result<u64>>)>,
    next_read_context: u64,
    /// A membership change was applied since the last snapshot: snapshot now, so a new
    /// member is sent a snapshot whose configuration includes it.
    membership_changed: bool,
    /// Ticks since each peer was last heard from.
    silent_ticks: BTreeMap<u64, u64>,
    /// The leader this node knew at the last `Ready`; when it changes, proposals this node
    /// forwarded to the old one are answered at once.
    known_leader: u64,
}

impl<S: StateMachine> RaftCore<S> {
    /// Opens a node over `storage`, restoring `state` from its snapshot. A fresh storage
    /// is bootstrapped with `bootstrap_voters` when given (the cluster's first node or a
    /// simulation's fixed membership); otherwise the node waits to be added by a leader.
    pub fn new(
        id: u64,
        storage: DiskStorage,
        mut state: S,
        settings: RaftSettings,
        bootstrap_voters: Option<Vec<u64>>,
        logger: &slog::Logger,
    ) -> Result<Self> {
        let settings_incarnation = settings.incarnation;
        if settings_incarnation == 0 {
            return Err(ConsensusError::InvalidConfig(
                "settings.incarnation must differ between runs of a node and not be 0 (the driver uses the start time)"
                    .into(),
            ));
        }
        if !storage.is_initialized()
            && let Some(voters) = bootstrap_voters
        {
            storage.initialize(ConfState { voters, ..ConfState::default() })?;
        }
        let snapshot_index = storage.snapshot_metadata().index;
        if snapshot_index > 0 {
            state.restore(&storage.snapshot_data())?;
        }
        let config = raft::Config {
            id,
            election_tick: settings.election_ticks,
            heartbeat_tick: settings.heartbeat_ticks,
            applied: snapshot_index,
            max_size_per_msg: settings.max_message_bytes,
            max_inflight_msgs: settings.max_inflight_messages,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        let config = if settings.election_jitter {
            config
        } else {
            raft::Config {
                min_election_tick: settings.election_ticks,
                max_election_tick: settings.election_ticks + 1,
                ..config
            }
        };
        config.validate()?;
        let raw = RawNode::new(&config, storage.clone(), logger)?;
        Ok(RaftCore {
            raw,
            storage,
            state: Arc::new(RwLock::new(state)),
            settings,
            applied_index: snapshot_index,
            waiting: BTreeMap::new(),
            appended: BTreeMap::new(),
            next_sequence: 1,
            incarnation: settings_incarnation,
            reads_unconfirmed: BTreeMap::new(),
            reads_confirmed: VecDeque::new(),
            next_read_context: 1,
            membership_changed: false,
            silent_ticks: BTreeMap::new(),
            known_leader: 0,
        })
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    /// The state machine, shared for local (stale-ok) reads.
    pub fn state(&self) -> Arc<RwLock<S>> {
        Arc::clone(&self.state)
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|id| *id != 0)
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// One tick of the logical clock.
    pub fn tick(&mut self) {
        self.raw.tick();
        let me = self.id();
        let voters = self.raw.raft.prs().conf().voters().ids();
        self.silent_ticks.retain(|id, _| voters.contains(*id));
        for id in voters.iter().filter(|id| *id != me) {
            *self.silent_ticks.entry(id).or_insert(0) += 1;
        }
    }

    /// Starts an election now (tests and leadership transfer).
    pub fn campaign(&mut self) -> Result<()> {
        Ok(self.raw.campaign()?)
    }

    /// Feeds a message from a peer. Messages from unknown peers or stale terms are
    /// handled (and ignored where raft says so) by raft itself.
    pub fn step(&mut self, message: Message) -> Result<()> {
        if let Some(silent) = self.silent_ticks.get_mut(&message.from) {
            *silent = 0;
        }
        match self.raw.step(message) {
            // A forwarded proposal that cannot reach a leader is dropped; its proposer times out.
            Ok(()) | Err(raft::Error::StepPeerNotFound | raft::Error::StepLocalMsg | raft::Error::ProposalDropped) => {
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Tells raft a peer could not be reached, so it backs off sending to it.
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Tells raft whether a snapshot message reached `id`. Until it hears, raft sends that
    /// follower nothing more, so a transport must report every snapshot it sends or drops.
    pub fn report_snapshot(&mut self, id: u64, delivered: bool) {
        let status = if delivered { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(id, status);
    }

    /// Proposes a command; `reply` receives the outcome once the entry is applied, or a
    /// not-leader error at once.
    pub fn propose(&mut self, command: &S::Command, reply: oneshot::Sender<ProposalOutcome<S>>) {
        let data = match serde_json::to_vec(command) {
            Ok(data) => data,
            Err(err) => {
                let _ = reply.send(Err(ConsensusError::Codec { what: "command", reason: err.to_string() }));
                return;
            }
        };
        self.propose_with(Waiter::Command(reply), |raw, context| raw.propose(context, data));
    }

    /// Proposes a membership change; `reply` receives the new voter set once applied.
    pub fn propose_conf_change(&mut self, change: ConfChange, reply: oneshot::Sender<Result<ConfState>>) {
        self.propose_with(Waiter::Membership(reply), |raw, context| raw.propose_conf_change(context, change));
    }

    fn propose_with(
        &mut self,
        waiter: Waiter<S>,
        propose: impl FnOnce(&mut RawNode<DiskStorage>, Vec<u8>) -> raft::Result<()>,
    ) {
        if self.leader_id().is_none() {
            waiter.fail(self.not_leader());
            return;
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let mut context = Vec::with_capacity(24);
        context.extend_from_slice(&self.id().to_be_bytes());
        context.extend_from_slice(&self.incarnation.to_be_bytes());
        context.extend_from_slice(&sequence.to_be_bytes());
        let before = self.raw.raft.raft_log.last_index();
        match propose(&mut self.raw, context) {
            Ok(()) => {
                // A leader appended it; a follower forwarded it to the leader.
                let index = self.raw.raft.raft_log.last_index();
                if self.is_leader() && index > before {
                    self.appended.insert(index, (self.raw.raft.term, sequence));
                }
                self.waiting.insert(sequence, waiter);
            }
            Err(raft::Error::ProposalDropped) => waiter.fail(self.not_leader()),
            Err(err) => waiter.fail(err.into()),
        }
        if self.waiting.len() > 4096 {
            // Forwarded proposals lost with a leader are never answered; forget those
            // whose callers gave up.
            self.waiting.retain(|_, waiter| !waiter.abandoned());
        }
    }

    /// The sequence number of a proposal this run of this node made, from an entry's context.
    fn own_sequence(&self, context: &[u8]) -> Option<u64> {
        let field = |i: usize| context.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        (field(0)? == self.id() && field(1)? == self.incarnation).then(|| field(2)).flatten()
    }

    fn not_leader(&self) -> ConsensusError {
        ConsensusError::NotLeader { leader_id: self.leader_id().filter(|id| *id != self.id()), leader_addr: None }
    }

    /// Asks for a linearizable read: `reply` receives an index once this node's state
    /// machine has applied everything committed when the read was asked for.
    pub fn read_index(&mut self, reply: oneshot::Sender<Result<u64>>) {
        if self.leader_id().is_none() {
            // raft drops a read it cannot route to a leader; say so now instead.
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let context = self.next_read_context;
        self.next_read_context += 1;
        self.raw.read_index(context.to_be_bytes().to_vec());
        self.reads_unconfirmed.insert(context, reply);
    }

    /// Fails every waiting proposal and read (the node is stopping).
    pub fn fail_all(&mut self, error: impl Fn() -> ConsensusError) {
        self.appended.clear();
        for (_, waiter) in std::mem::take(&mut self.waiting) {
            waiter.fail(error());
        }
        for (_, reply) in std::mem::take(&mut self.reads_unconfirmed) {
            let _ = reply.send(Err(error()));
        }
        for (_, reply) in std::mem::take(&mut self.reads_confirmed) {
            let _ = reply.send(Err(error()));
        }
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Handles one `Ready`: persists entries and hard state (one fsync), applies committed
    /// entries, answers proposals and reads, and appends the messages to send to `outbox`.
    pub fn process_ready(&mut self, outbox: &mut Vec<Message>) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // A leader may send before it persists (raft's thesis, 10.2.1); followers' replies
        // wait until their log is durable (persisted_messages below).
        outbox.extend(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        for read in ready.take_read_states() {
            let context = u64::from_be_bytes(read.request_ctx.as_slice().try_into().unwrap_or_default());
            if let Some(reply) = self.reads_unconfirmed.remove(&context) {
                self.reads_confirmed.push_back((read.index, reply));
            }
        }
        self.apply_committed(ready.take_committed_entries())?;
        self.storage.persist(ready.entries(), ready.hs())?;
        outbox.extend(ready.take_persisted_messages());
        // The commit index a LightReady reports needs no fsync of its own: the hard state
        // that carries it is persisted with the next Ready's entries, and a commit index
        // lost in a crash is learnt again from the leader.
        let mut light = self.raw.advance(ready);
        outbox.extend(light.take_messages());
        self.apply_committed(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.fail_truncated_proposals();
        self.fail_forwarded_on_leader_change();
        self.answer_confirmed_reads();
        self.maybe_snapshot()?;
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        let index = snapshot.get_metadata().index;
        self.state.write().expect("state lock").restore(snapshot.get_data())?;
        self.storage.apply_snapshot(snapshot)?;
        self.applied_index = index;
        // Proposals at or below the snapshot were decided elsewhere; their outcome here
        // is unknown, so their callers must check and retry.
        let decided: Vec<u64> = self.appended.range(..=index).map(|(i, _)| *i).collect();
        for i in decided {
            if let Some((_, sequence)) = self.appended.remove(&i)
                && let Some(waiter) = self.waiting.remove(&sequence)
            {
                waiter.fail(ConsensusError::Dropped);
            }
        }
        Ok(())
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut state = self.state.write().expect("state lock");
        for entry in entries {
            if let Some((term, sequence)) = self.appended.remove(&entry.index)
                && term != entry.term
                && let Some(lost) = self.waiting.remove(&sequence)
            {
                // Another leader's entry took the index: the proposal was lost.
                lost.fail(ConsensusError::Dropped);
            }
            let waiter = self.own_sequence(&entry.context).and_then(|sequence| self.waiting.remove(&sequence));
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    // A new leader's empty entry.
                    if let Some(waiter) = waiter {
                        waiter.fail(ConsensusError::Dropped);
                    }
                }
                EntryType::EntryNormal => {
                    let outcome = match serde_json::from_slice::<S::Command>(&entry.data) {
                        Ok(command) => Ok(state.apply(entry.index, command)),
                        Err(err) => {
                            tracing::error!(index = entry.index, error = %err, "a committed command does not decode; skipping it");
                            Err(ConsensusError::Codec { what: "command", reason: err.to_string() })
                        }
                    };
                    if let Some(Waiter::Command(reply)) = waiter {
                        let _ = reply.send(outcome);
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let applied = if entry.get_entry_type() == EntryType::EntryConfChange {
                        ConfChange::parse_from_bytes(&entry.data)
                            .map_err(|e| ConsensusError::Codec { what: "conf change", reason: e.to_string() })
                            .and_then(|change| Ok(self.raw.apply_conf_change(&change)?))
                    } else {
                        ConfChangeV2::parse_from_bytes(&entry.data)
                            .map_err(|e| ConsensusError::Codec { what: "conf change", reason: e.to_string() })
                            .and_then(|change| Ok(self.raw.apply_conf_change(&change)?))
                    };
                    if let Ok(conf_state) = &applied {
                        self.storage.set_conf_state(conf_state.clone())?;
                        self.membership_changed = true;
                    }
                    if let Some(Waiter::Membership(reply)) = waiter {
                        let _ = reply.send(applied);
                    }
                }
            }
            self.applied_index = entry.index;
        }
        Ok(())
    }

    /// A deposed leader's uncommitted proposals are lost once the new leader's entries
    /// overwrite or truncate them in this log (the new leader's first entry always does):
    /// answer them now rather than when, or if, their index applies.
    fn fail_truncated_proposals(&mut self) {
        if self.is_leader() || self.appended.is_empty() {
            return;
        }
        let log = &self.raw.raft.raft_log;
        let last_index = log.last_index();
        let lost: Vec<u64> = self
            .appended
            .iter()
            .filter(|(index, (term, _))| **index > last_index || log.term(**index).is_ok_and(|now| now != *term))
            .map(|(index, _)| *index)
            .collect();
        for index in lost {
            if let Some((_, sequence)) = self.appended.remove(&index)
                && let Some(waiter) = self.waiting.remove(&sequence)
            {
                waiter.fail(ConsensusError::Dropped);
            }
        }
    }

    /// Proposals forwarded to a leader that is no longer the leader may never come back:
    /// answer them with `LeaderChanged` (the outcome is unknown) instead of a timeout.
    fn fail_forwarded_on_leader_change(&mut self) {
        let leader = self.raw.raft.leader_id;
        if leader == self.known_leader {
            return;
        }
        self.known_leader = leader;
        let appended: std::collections::BTreeSet<u64> = self.appended.values().map(|(_, sequence)| *sequence).collect();
        let forwarded: Vec<u64> =
            self.waiting.keys().copied().filter(|sequence| !appended.contains(sequence)).collect();
        for sequence in forwarded {
            if let Some(waiter) = self.waiting.remove(&sequence) {
                waiter.fail(ConsensusError::LeaderChanged);
            }
        }
    }

    fn answer_confirmed_reads(&mut self) {
        while let Some((index, _)) = self.reads_confirmed.front() {
            if *index > self.applied_index {
                break;
            }
            let (index, reply) = self.reads_confirmed.pop_front().expect("front exists");
            let _ = reply.send(Ok(index));
        }
    }

    /// Whether a leader should hold its snapshot back: a follower less than
    /// [`CATCH_UP_INTERVALS`] snapshot intervals behind has not yet matched the applied
    /// index, and would need a whole snapshot (not a few entries) once the log is
    /// compacted. Like TiKV's log GC, which keeps what the slowest healthy peer lacks; a
    /// follower further behind, or gone, does not hold the leader back.
    fn a_follower_needs_the_log(&self) -> bool {
        if !self.is_leader() {
            return false;
        }
        let floor = self
            .applied_index
            .saturating_sub(CATCH_UP_INTERVALS.saturating_mul(self.settings.snapshot_interval_entries.max(1)));
        let own = self.raw.raft.id;
        self.raw
            .raft
            .prs()
            .iter()
            .any(|(id, progress)| *id != own && (floor..self.applied_index).contains(&progress.matched))
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        let snapshot_index = self.storage.snapshot_metadata().index;
        let interval = self.settings.snapshot_interval_entries;
        let due = self.applied_index >= snapshot_index + interval;
        // Held back at most one more interval, so a steadily lagging follower cannot stop
        // snapshots.
        let overdue = self.applied_index >= snapshot_index + interval.saturating_mul(2);
        let wanted = (due && (overdue || !self.a_follower_needs_the_log())) || self.membership_changed;
        if wanted && self.applied_index > snapshot_index {
            // The storage compacts only committed entries by its own record of the commit
            // index, which LightReady commits reach with the next Ready; bring it up now.
            if self.storage.hard_state().commit < self.applied_index {
                self.storage.set_commit(self.raw.raft.raft_log.committed)?;
            }
            let data = self.state.read().expect("state lock").snapshot();
            self.storage.compact_to_snapshot(self.applied_index, data)?;
            self.membership_changed = false;
        }
        Ok(())
    }

    pub fn status(&self) -> RaftStatus {
        let raft = &self.raw.raft;
        let mut conf_state = self.storage.conf_state();
        conf_state.voters.sort_unstable();
        conf_state.learners.sort_unstable();
        let matched = if self.is_leader() {
            raft.prs().iter().map(|(id, progress)| (*id, progress.matched)).collect()
        } else {
            BTreeMap::new()
        };
        RaftStatus {
            id: raft.id,
            role: format!("{:?}", raft.state),
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied_index,
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.storage.snapshot_metadata().index,
            voters: conf_state.voters,
            learners: conf_state.learners,
            matched,
            silent_ticks: self.silent_ticks.clone(),
            failed: None,
        }
    }

    /// The first and last index of the durable log (for tests).
    pub fn log_bounds(&self) -> (u64, u64) {
        (self.storage.first_index().unwrap_or(0), self.storage.last_index().unwrap_or(0))
    }
}
