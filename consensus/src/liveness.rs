//! The failure detector: which nodes the leader commits as suspect, dead, or alive again.
//!
//! A pure function of what the leader observes (how long since it heard from each
//! voter) and the committed cluster state; the control plane runs it on the leader a few
//! times a second and proposes the commands it returns. Rules (REC-1):
//!
//! - only a leader that has heard from a majority of voters recently decides anything: a
//!   leader cut off from the others may be the one at fault, so it evicts nobody;
//! - a node silent for `suspect_after_ms` becomes Suspect, and Dead after `dead_after_ms`
//!   (the grace period), never on one missed heartbeat;
//! - a Suspect node that is heard again is Alive at once; a Dead one must be heard without
//!   a break for `rejoin_stable_ms`, doubled for each earlier dead declaration (capped),
//!   so a flapping node is not given work and evicted again and again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, Command, NodeId, NodeStatus};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessSettings {
    pub suspect_after_ms: u64,
    pub dead_after_ms: u64,
    pub rejoin_stable_ms: u64,
    pub max_rejoin_stable_ms: u64,
}

impl Default for LivenessSettings {
    fn default() -> Self {
        LivenessSettings {
            suspect_after_ms: 1500,
            dead_after_ms: 5000,
            rejoin_stable_ms: 3000,
            max_rejoin_stable_ms: 60_000,
        }
    }
}

impl LivenessSettings {
    /// How long a node declared dead `dead_declarations` times must be heard without a
    /// break before it is alive again.
    pub fn rejoin_stable_for(&self, dead_declarations: u32) -> u64 {
        let doublings = dead_declarations.saturating_sub(1).min(16);
        self.rejoin_stable_ms.saturating_mul(1 << doublings).min(self.max_rejoin_stable_ms)
    }
}

/// What the leader sees this round.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub now_ms: u64,
    pub self_id: u64,
    pub is_leader: bool,
    /// Milliseconds since each other voter was last heard from.
    pub silent_ms: &'a BTreeMap<u64, u64>,
}

/// The detector's memory between rounds: since when each node has been heard without a
/// break. It is the leader's alone and starts afresh when leadership moves.
#[derive(Debug, Default, Clone)]
pub struct LivenessTracker {
    heard_since_ms: BTreeMap<u64, u64>,
}

impl LivenessTracker {
    pub fn decide(
        &mut self,
        seen: &Observation<'_>,
        state: &ClusterState,
        settings: &LivenessSettings,
    ) -> Vec<Command> {
        if !seen.is_leader {
            self.heard_since_ms.clear();
            return Vec::new();
        }
        let silence = |id: u64| if id == seen.self_id { Some(0) } else { seen.silent_ms.get(&id).copied() };
        let voters = seen.silent_ms.len() + 1;
        let heard = 1 + seen.silent_ms.values().filter(|ms| **ms < settings.suspect_after_ms).count();
        if heard * 2 <= voters {
            return Vec::new();
        }
        let mut commands = Vec::new();
        for node in state.nodes().values() {
            let id = node.id.0;
            // A registered node that is not (yet) a voter gives no signal here.
            let Some(silent_ms) = silence(id) else { continue };
            let next = if silent_ms < settings.suspect_after_ms {
                let heard_since = *self.heard_since_ms.entry(id).or_insert(seen.now_ms);
                match node.status {
                    NodeStatus::Suspect => Some(NodeStatus::Alive),
                    NodeStatus::Dead
                        if seen.now_ms.saturating_sub(heard_since)
                            >= settings.rejoin_stable_for(node.dead_declarations) =>
                    {
                        Some(NodeStatus::Alive)
                    }
                    _ => None,
                }
            } else {
                self.heard_since_ms.remove(&id);
                match node.status {
                    NodeStatus::Alive => Some(NodeStatus::Suspect),
                    NodeStatus::Suspect | NodeStatus::Draining if silent_ms >= settings.dead_after_ms => {
                        Some(NodeStatus::Dead)
                    }
                    _ => None,
                }
            };
            if let Some(status) = next {
                commands.push(Command::SetNodeStatus { node_id: NodeId(id), status, at_ms: seen.now_ms });
            }
        }
        commands
    }
}
