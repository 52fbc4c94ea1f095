//! The raft driver: a [`RaftCore`] on its own thread, ticked by the wall clock, fed by a
//! channel, sending through a [`Transport`]; and [`RaftHandle`], its async front.
//!
//! The thread drains every waiting request before handling a `Ready`, so proposals that
//! arrive together share one append, one fsync and one round of replication (group
//! commit). Blocking disk IO stays off the async runtime.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use raft::prelude::{ConfChange, ConfChangeType, ConfState, Message};
use tokio::sync::oneshot;

use crate::StateMachine;
use crate::core::{ProposalOutcome, RaftCore, RaftSettings, RaftStatus};
use crate::error::{ConsensusError, Result};
use crate::storage::DiskStorage;

/// Carries raft messages between nodes. `send` must not block: it queues or drops (raft
/// retries), reports peers it cannot reach through [`RaftHandle::report_unreachable`],
/// and reports the fate of every snapshot message (`MsgSnapshot`) through
/// [`RaftHandle::report_snapshot`], or raft stops sending to that follower.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, messages: Vec<Message>);
    /// The client-facing address of a member, for "not the leader: the leader is at ...".
    fn peer_address(&self, id: u64) -> Option<String>;

    /// Learns (or updates) a member's addresses, from the committed cluster state or a
    /// join. Transports without an address book ignore it.
    fn update_peer(&self, _id: u64, _cluster_addr: &str, _api_addr: &str) {}

    /// Forgets a member that left the cluster.
    fn forget_peer(&self, _id: u64) {}
}

#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub id: u64,
    /// The wall-clock length of one raft tick.
    pub tick: Duration,
    pub settings: RaftSettings,
    /// Voters to bootstrap a fresh log with (the first node of a cluster); `None` to wait
    /// to be added by a leader.
    pub bootstrap_voters: Option<Vec<u64>>,
    /// How long a proposal or read may wait before failing with a timeout.
    pub request_timeout: Duration,
}

impl DriverConfig {
    pub fn new(id: u64) -> Self {
        DriverConfig {
            id,
            tick: Duration::from_millis(100),
            settings: RaftSettings::default(),
            bootstrap_voters: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

enum Request<S: StateMachine> {
    Propose(S::Command, oneshot::Sender<ProposalOutcome<S>>),
    ChangeMembership(ConfChange, oneshot::Sender<Result<ConfState>>),
    ReadIndex(oneshot::Sender<Result<u64>>),
    Step(Message),
    Unreachable(u64),
    SnapshotReport(u64, bool),
    Campaign,
    Stop,
}

/// The async front of a running raft node. Cheap to clone.
pub struct RaftHandle<S: StateMachine> {
    requests: mpsc::Sender<Request<S>>,
    state: Arc<RwLock<S>>,
    status: Arc<RwLock<RaftStatus>>,
    transport: Arc<dyn Transport>,
    request_timeout: Duration,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl<S: StateMachine> Clone for RaftHandle<S> {
    fn clone(&self) -> Self {
        RaftHandle {
            requests: self.requests.clone(),
            state: Arc::clone(&self.state),
            status: Arc::clone(&self.status),
            transport: Arc::clone(&self.transport),
            request_timeout: self.request_timeout,
            thread: Arc::clone(&self.thread),
        }
    }
}

/// Starts a raft node on its own thread.
pub fn start<S: StateMachine>(
    config: &DriverConfig,
    storage: DiskStorage,
    state: S,
    transport: Arc<dyn Transport>,
) -> Result<RaftHandle<S>> {
    let logger = crate::logger::raft_logger(config.id);
    let mut settings = config.settings.clone();
    if settings.incarnation == 0 {
        // The start time tells this run's proposals from an earlier run's.
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        settings.incarnation = u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX).max(1);
    }
    let core = RaftCore::new(config.id, storage, state, settings, config.bootstrap_voters.clone(), &logger)?;

    let (sender, receiver) = mpsc::channel();
    let status = Arc::new(RwLock::new(core.status()));
    let handle = RaftHandle {
        requests: sender,
        state: core.state(),
        status: Arc::clone(&status),
        transport: Arc::clone(&transport),
        request_timeout: config.request_timeout,
        thread: Arc::new(Mutex::new(None)),
    };
    let tick = config.tick;
    let thread = std::thread::Builder::new()
        .name(format!("raft-{}", config.id))
        .spawn(move || run(core, &receiver, &*transport, &status, tick))
        .map_err(|e| ConsensusError::Io { path: "raft thread".into(), source: e })?;
    *handle.thread.lock().expect("thread lock") = Some(thread);
    Ok(handle)
}

fn run<S: StateMachine>(
    mut core: RaftCore<S>,
    requests: &mpsc::Receiver<Request<S>>,
    transport: &dyn Transport,
    status: &RwLock<RaftStatus>,
    tick: Duration,
) {
    let mut next_tick = Instant::now() + tick;
    let mut outbox = Vec::new();
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let first = match requests.recv_timeout(wait) {
            Ok(request) => Some(request),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut stop = false;
        for request in first.into_iter().chain(std::iter::from_fn(|| requests.try_recv().ok())).take(8192) {
            match request {
                Request::Propose(command, reply) => core.propose(&command, reply),
                Request::ChangeMembership(change, reply) => core.propose_conf_change(change, reply),
                Request::ReadIndex(reply) => core.read_index(reply),
                Request::Step(message) => {
                    if let Err(err) = core.step(message) {
                        tracing::debug!(error = %err, "raft rejected a message");
                    }
                }
                Request::Unreachable(id) => core.report_unreachable(id),
                Request::SnapshotReport(id, delivered) => core.report_snapshot(id, delivered),
                Request::Campaign => {
                    if let Err(err) = core.campaign() {
                        tracing::warn!(error = %err, "campaign failed");
                    }
                }
                Request::Stop => stop = true,
            }
        }
        if stop {
            break;
        }
        if Instant::now() >= next_tick {
            core.tick();
            next_tick += tick;
            if next_tick < Instant::now() {
                // The thread fell behind (a long fsync): skip the missed ticks.
                next_tick = Instant::now() + tick;
            }
        }
        if let Err(err) = core.process_ready(&mut outbox) {
            // Storage failed: this node can no longer promise durability. Stop it, and
            // say so in its status (the API and readiness show it).
            tracing::error!(error = %err, "raft storage failed; stopping this raft node");
            let mut stopped = core.status();
            stopped.failed = Some(format!("the raft log failed: {err}; restart the node once the disk is fixed"));
            *status.write().expect("status lock") = stopped;
            break;
        }
        if !outbox.is_empty() {
            transport.send(std::mem::take(&mut outbox));
        }
        *status.write().expect("status lock") = core.status();
    }
    core.fail_all(|| ConsensusError::Stopped);
}

impl<S: StateMachine> RaftHandle<S> {
    fn send(&self, request: Request<S>) -> Result<()> {
        self.requests.send(request).map_err(|_| ConsensusError::Stopped)
    }

    async fn wait<T>(&self, reply: oneshot::Receiver<Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.request_timeout, reply).await {
            Ok(Ok(outcome)) => outcome.map_err(|err| self.with_leader_address(err)),
            Ok(Err(_)) => Err(ConsensusError::Stopped),
            Err(_) => Err(ConsensusError::Timeout(self.request_timeout)),
        }
    }

    fn with_leader_address(&self, err: ConsensusError) -> ConsensusError {
        match err {
            ConsensusError::NotLeader { leader_id: Some(id), leader_addr: None } => {
                ConsensusError::NotLeader { leader_id: Some(id), leader_addr: self.transport.peer_address(id) }
            }
            other => other,
        }
    }

    /// Proposes a command and waits until it is applied here. On a follower the proposal
    /// is forwarded to the leader. The outer error is the consensus's (no leader known,
    /// dropped, timed out); the inner one the state machine's verdict.
    pub async fn propose(&self, command: S::Command) -> ProposalOutcome<S> {
        let (reply, receiver) = oneshot::channel();
        self.send(Request::Propose(command, reply))?;
        self.wait(receiver).await
    }

    /// Adds a voting member (its address must be known to the transport).
    pub async fn add_voter(&self, id: u64) -> Result<ConfState> {
        self.change_membership(id, ConfChangeType::AddNode).await
    }

    /// Removes a member.
    pub async fn remove_member(&self, id: u64) -> Result<ConfState> {
        self.change_membership(id, ConfChangeType::RemoveNode).await
    }

    async fn change_membership(&self, id: u64, change_type: ConfChangeType) -> Result<ConfState> {
        let mut change = ConfChange::default();
        change.set_change_type(change_type);
        change.node_id = id;
        let (reply, receiver) = oneshot::channel();
        self.send(Request::ChangeMembership(change, reply))?;
        self.wait(receiver).await
    }

    /// A linearizable read: waits until this node has applied everything committed when
    /// it was asked, then reads the state.
    /// While no leader is known (an election is on) it retries until the request timeout.
    pub async fn read<R>(&self, read: impl FnOnce(&S) -> R) -> Result<R> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        loop {
            let (reply, receiver) = oneshot::channel();
            self.send(Request::ReadIndex(reply))?;
            match self.wait(receiver).await {
                Ok(_) => return Ok(self.read_local(read)),
                Err(ConsensusError::NotLeader { leader_id: None, .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// A local read of this node's applied state: fast, possibly stale.
    pub fn read_local<R>(&self, read: impl FnOnce(&S) -> R) -> R {
        read(&self.state.read().expect("state lock"))
    }

    pub fn status(&self) -> RaftStatus {
        self.status.read().expect("status lock").clone()
    }

    /// This node's raft id, without copying the whole status (for hot paths).
    pub fn id(&self) -> u64 {
        self.status.read().expect("status lock").id
    }

    /// Feeds a message received from a peer.
    pub fn step(&self, message: Message) {
        let _ = self.send(Request::Step(message));
    }

    pub fn report_unreachable(&self, id: u64) {
        let _ = self.send(Request::Unreachable(id));
    }

    /// Reports whether a snapshot message this node sent reached `id`.
    pub fn report_snapshot(&self, id: u64, delivered: bool) {
        let _ = self.send(Request::SnapshotReport(id, delivered));
    }

    /// Starts an election on this node now.
    pub fn campaign(&self) {
        let _ = self.send(Request::Campaign);
    }

    /// Stops the raft thread and waits for it; waiting requests fail with `Stopped`.
    pub fn stop(&self) {
        let _ = self.send(Request::Stop);
        if let Some(thread) = self.thread.lock().expect("thread lock").take() {
            let _ = thread.join();
        }
    }
}
