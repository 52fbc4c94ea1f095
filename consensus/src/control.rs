//! A node's control plane: its raft log on disk, the replicated [`ClusterState`], and
//! the node's own registration in it.

use std::collections::BTreeMap;

use std::sync::Arc;
use std::time::Duration;

use crate::driver::{self, DriverConfig, RaftHandle, Transport};
use crate::error::{ConsensusError, Result};
use crate::liveness::{LivenessSettings, LivenessTracker, Observation};
use crate::reconcile::{ReconcileSettings, reconcile};

use crate::state::{ClusterState, Command, NodeSpec, NodeStatus};

use crate::storage::DiskStorage;

#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// This node as it registers itself (id, name, addresses, labels, resources).
    pub node: NodeSpec,
    /// The raft log and snapshots (`<data_dir>/raft`), opened.
    pub storage: DiskStorage,
    pub driver: DriverConfig,
    /// The voters to start a new cluster with when the log is empty (`[own id]` for the
    /// first node); `None` to wait to be added by a leader.
    pub bootstrap_voters: Option<Vec<u64>>,
    pub liveness: LivenessSettings,
    /// How the leader turns desired deployments into placements.
    pub reconcile: ReconcileSettings,
}

pub struct ControlPlane {
    handle: RaftHandle<ClusterState>,
    node: NodeSpec,
    liveness: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    /// Opens the raft log and starts the raft thread. A node that is the only voter
    /// campaigns at once rather than waiting out an election timeout.
    pub fn start(config: ControlPlaneConfig, transport: &Arc<dyn Transport>) -> Result<Self> {
        let storage = config.storage.clone();
        let id = config.node.id.0;
        let mut driver_config = config.driver.clone();
        driver_config.id = id;
        driver_config.bootstrap_voters.clone_from(&config.bootstrap_voters);
        let voters =
            if storage.is_initialized() { Some(storage.conf_state().voters) } else { config.bootstrap_voters.clone() };
        let sole_voter = voters.is_some_and(|voters| voters == [id]);

        let handle = driver::start(&driver_config, storage, ClusterState::default(), Arc::clone(transport))?;
        if sole_voter {
            handle.campaign();
        }
        let liveness = tokio::spawn(maintain(
            handle.clone(),
            Arc::clone(transport),
            id,
            driver_config.tick,
            config.liveness,
            config.reconcile,
        ));
        Ok(ControlPlane { handle, node: config.node, liveness })
    }

    pub fn handle(&self) -> &RaftHandle<ClusterState> {
        &self.handle
    }

    /// Registers (or re-registers, after a restart) this node in the cluster state,
    /// retrying through elections until `within` passes.
    pub async fn register_self(&self, at_ms: u64, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let command = Command::RegisterNode { node: self.node.clone(), at_ms };
            match self.handle.propose(command).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(rejection)) => return Err(ConsensusError::Rejected(rejection.to_string())),
                Err(
                    err @ (ConsensusError::NotLeader { .. }
                    | ConsensusError::Dropped
                    | ConsensusError::LeaderChanged
                    | ConsensusError::Timeout(_)),
                ) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(err);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Stops the failure detector and the raft thread (blocking until it ends).
    pub fn stop(&self) {
        self.liveness.abort();
        self.handle.stop();
    }
}

/// A few times a second, on every node: keep the transport's address book in step with
/// the committed members; and on the leader, commit the liveness changes the failure
/// detector decides ([`crate::liveness`]).
async fn maintain(
    handle: RaftHandle<ClusterState>,
    transport: Arc<dyn Transport>,
    self_id: u64,
    tick: Duration,
    settings: LivenessSettings,
    reconcile_settings: ReconcileSettings,
) {
    let tick_ms = u64::try_from(tick.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut tracker = LivenessTracker::default();
    let mut known_peers: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let mut last_unplaceable = Vec::new();
    let mut interval = tokio::time::interval(Duration::from_millis((settings.suspect_after_ms / 4).clamp(20, 250)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        sync_peers(&handle, &*transport, self_id, &mut known_peers);
        let status = handle.status();
        let silent_ms = status.silent_ticks.iter().map(|(id, ticks)| (*id, ticks.saturating_mul(tick_ms))).collect();
        let seen =
            Observation { now_ms: wall_clock_ms(), self_id, is_leader: status.is_leader(), silent_ms: &silent_ms };
        let mut commands = handle.read_local(|state| tracker.decide(&seen, state, &settings));
        if seen.is_leader && commands.is_empty() {
            // Placements follow the committed liveness: reconcile once it is settled.
            let round = handle.read_local(|state| reconcile(state, &reconcile_settings, seen.now_ms));
            if !round.unplaceable.is_empty() && round.unplaceable != last_unplaceable {
                for short in &round.unplaceable {
                    tracing::warn!(deployment = %short.deployment_id, missing = short.missing_replicas, reason = %short.reason, "cannot place every replica");
                }
            }
            last_unplaceable = round.unplaceable;
            commands = round.commands;
        }
        for command in commands {
            let described = format!("{command:?}");
            match handle.propose(command).await {
                Ok(Ok(_)) => tracing::info!(change = %described, "control-plane change committed"),
                Ok(Err(rejection)) => tracing::debug!(change = %described, %rejection, "control-plane change rejected"),
                Err(err) => tracing::debug!(change = %described, error = %err, "control-plane change not committed"),
            }
        }
    }
}

/// Tells the transport about members added, moved or removed in the committed state.
fn sync_peers(
    handle: &RaftHandle<ClusterState>,
    transport: &dyn Transport,
    self_id: u64,
    known: &mut BTreeMap<u64, (String, String)>,
) {
    let (members, removed): (BTreeMap<u64, (String, String)>, Vec<u64>) = handle.read_local(|state| {
        let members = state
            .nodes()
            .values()
            .filter(|node| node.id.0 != self_id && node.status != NodeStatus::Left)
            .map(|node| (node.id.0, (node.cluster_addr.clone(), node.api_addr.clone())))
            .collect();
        let removed = state.removed_node_ids().iter().map(|id| id.0).collect();
        (members, removed)
    });
    for (id, addresses) in &members {
        if known.get(id) != Some(addresses) {
            transport.update_peer(*id, &addresses.0, &addresses.1);
            known.insert(*id, addresses.clone());
        }
    }
    for id in removed {
        if known.remove(&id).is_some() {
            transport.forget_peer(id);
        }
    }
}

fn wall_clock_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The transport of a cluster of one: there is no peer to send to.
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, messages: Vec<raft::prelude::Message>) {
        if !messages.is_empty() {
            tracing::warn!(count = messages.len(), "a single-node control plane dropped messages addressed to peers");
        }
    }

    fn peer_address(&self, _id: u64) -> Option<String> {
        None
    }
}
