//! An in-process network for running several raft nodes in one process: tests of a
//! whole cluster without sockets, and benchmarks of the driver and storage alone. Links
//! can be cut and mended to make partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use raft::prelude::{Message, MessageType};

use crate::StateMachine;
use crate::driver::{RaftHandle, Transport};

/// The shared switchboard: which nodes exist and which links are cut.
pub struct LocalNetwork<S: StateMachine> {
    nodes: RwLock<BTreeMap<u64, RaftHandle<S>>>,
    cut: RwLock<BTreeSet<(u64, u64)>>,
}

impl<S: StateMachine> Default for LocalNetwork<S> {
    fn default() -> Self {
        LocalNetwork { nodes: RwLock::new(BTreeMap::new()), cut: RwLock::new(BTreeSet::new()) }
    }
}

impl<S: StateMachine> LocalNetwork<S> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The transport node `id` sends through.
    pub fn transport(self: &Arc<Self>, id: u64) -> Arc<dyn Transport> {
        Arc::new(LocalTransport { network: Arc::clone(self), from: id })
    }

    /// Connects a started node, so messages to `id` reach it.
    pub fn attach(&self, id: u64, handle: RaftHandle<S>) {
        self.nodes.write().expect("nodes lock").insert(id, handle);
    }

    /// Disconnects a node (it crashed or stopped): messages to it are lost.
    pub fn detach(&self, id: u64) -> Option<RaftHandle<S>> {
        self.nodes.write().expect("nodes lock").remove(&id)
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut(&self, a: u64, b: u64) {
        let mut cut = self.cut.write().expect("cut lock");
        cut.insert((a, b));
        cut.insert((b, a));
    }

    /// Cuts `id` off from every other node.
    pub fn isolate(&self, id: u64) {
        let others: Vec<u64> = self.nodes.read().expect("nodes lock").keys().copied().filter(|o| *o != id).collect();
        for other in others {
            self.cut(id, other);
        }
    }

    /// Mends every cut link.
    pub fn heal(&self) {
        self.cut.write().expect("cut lock").clear();
    }
}

struct LocalTransport<S: StateMachine> {
    network: Arc<LocalNetwork<S>>,
    from: u64,
}

impl<S: StateMachine> Transport for LocalTransport<S> {
    fn send(&self, messages: Vec<Message>) {
        let nodes = self.network.nodes.read().expect("nodes lock");
        let cut = self.network.cut.read().expect("cut lock");
        for message in messages {
            let to = message.to;
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let delivered = match nodes.get(&to) {
                Some(node) if !cut.contains(&(self.from, to)) => {
                    node.step(message);
                    true
                }
                _ => false,
            };
            if let Some(sender) = nodes.get(&self.from) {
                if is_snapshot {
                    sender.report_snapshot(to, delivered);
                } else if !delivered {
                    sender.report_unreachable(to);
                }
            }
        }
    }

    fn peer_address(&self, id: u64) -> Option<String> {
        Some(format!("local-node-{id}"))
    }
}
