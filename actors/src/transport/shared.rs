//! State shared by the transport's handle and its actors: the address book, the peers'
//! connection states, the inbound sink and counters. Every lock here is held for a few
//! map operations and never across an await.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ractor::ActorRef;
use ractor_cluster::NodeServerMessage;
use raft::prelude::{Message, MessageType};

use super::links::LinkMsg;
use super::wire;
use super::{ClusterConfig, PeerState, RaftSink, TransportStats};

/// Where a peer is reached: its cluster address (ractor_cluster) and its client-facing
/// API address (for "not the leader: the leader is at ...").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerAddresses {
    pub cluster_addr: String,
    pub api_addr: String,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub messages_sent: AtomicU64,
    pub batches_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_dropped: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub snapshots_delivered: AtomicU64,
    pub snapshots_failed: AtomicU64,
    pub largest_frame_bytes: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn frame(&self, bytes: usize) {
        self.largest_frame_bytes.fetch_max(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn snapshot(&self) -> TransportStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TransportStats {
            messages_sent: read(&self.messages_sent),
            batches_sent: read(&self.batches_sent),
            messages_received: read(&self.messages_received),
            messages_dropped: read(&self.messages_dropped),
            snapshots_sent: read(&self.snapshots_sent),
            snapshots_delivered: read(&self.snapshots_delivered),
            snapshots_failed: read(&self.snapshots_failed),
            largest_frame_bytes: read(&self.largest_frame_bytes),
        }
    }
}

pub(crate) struct Shared {
    pub config: ClusterConfig,
    book: RwLock<BTreeMap<u64, PeerAddresses>>,
    states: RwLock<BTreeMap<u64, PeerState>>,
    sink: RwLock<Option<Arc<dyn RaftSink>>>,
    links: RwLock<Option<ActorRef<LinkMsg>>>,
    node_server: RwLock<Option<ActorRef<NodeServerMessage>>>,
    failure: RwLock<Option<String>>,
    stopping: AtomicBool,
    pub stats: Stats,
}

impl Shared {
    pub fn new(config: ClusterConfig) -> Self {
        Shared {
            config,
            book: RwLock::default(),
            states: RwLock::default(),
            sink: RwLock::default(),
            links: RwLock::default(),
            node_server: RwLock::default(),
            failure: RwLock::default(),
            stopping: AtomicBool::new(false),
            stats: Stats::default(),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    // ---- the address book ----

    /// Records a peer's addresses; returns whether they changed.
    pub fn set_peer(&self, id: u64, addresses: PeerAddresses) -> bool {
        let mut book = self.book.write().expect("book lock");
        book.insert(id, addresses.clone()) != Some(addresses)
    }

    pub fn remove_peer(&self, id: u64) -> bool {
        self.states.write().expect("states lock").remove(&id);
        self.book.write().expect("book lock").remove(&id).is_some()
    }

    pub fn peer(&self, id: u64) -> Option<PeerAddresses> {
        self.book.read().expect("book lock").get(&id).cloned()
    }

    pub fn book(&self) -> BTreeMap<u64, PeerAddresses> {
        self.book.read().expect("book lock").clone()
    }

    // ---- connection states, written by the link manager ----

    pub fn set_state(&self, id: u64, state: PeerState) {
        if self.book.read().expect("book lock").contains_key(&id) {
            self.states.write().expect("states lock").insert(id, state);
        }
    }

    pub fn peer_states(&self) -> BTreeMap<u64, PeerState> {
        let book = self.book.read().expect("book lock");
        let states = self.states.read().expect("states lock");
        book.keys().map(|id| (*id, states.get(id).copied().unwrap_or(PeerState::Connecting))).collect()
    }

    pub fn stats(&self) -> TransportStats {
        self.stats.snapshot()
    }

    // ---- the actors' current references (they change when an actor is restarted) ----

    pub fn links(&self) -> Option<ActorRef<LinkMsg>> {
        self.links.read().expect("links lock").clone()
    }

    pub fn set_links(&self, links: Option<ActorRef<LinkMsg>>) {
        *self.links.write().expect("links lock") = links;
    }

    pub fn node_server(&self) -> Option<ActorRef<NodeServerMessage>> {
        self.node_server.read().expect("node server lock").clone()
    }

    pub fn set_node_server(&self, node_server: Option<ActorRef<NodeServerMessage>>) {
        *self.node_server.write().expect("node server lock") = node_server;
    }

    // ---- lifecycle ----

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.read().expect("failure lock").clone()
    }

    pub fn set_failure(&self, reason: String) {
        self.failure.write().expect("failure lock").get_or_insert(reason);
    }

    // ---- the local raft node ----

    pub fn sink(&self) -> Option<Arc<dyn RaftSink>> {
        self.sink.read().expect("sink lock").clone()
    }

    pub fn set_sink(&self, sink: Option<Arc<dyn RaftSink>>) {
        *self.sink.write().expect("sink lock") = sink;
    }

    /// Hands the raft messages of a received batch to the local raft node; returns how
    /// many it took.
    pub fn deliver(&self, from_peer_batch: &[u8]) -> usize {
        let messages = match wire::decode(from_peer_batch) {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(error = %err, "dropping a raft batch from a peer");
                return 0;
            }
        };
        let Some(sink) = self.sink() else {
            tracing::debug!(count = messages.len(), "no raft node is attached yet; dropping inbound raft messages");
            Stats::add(&self.stats.messages_dropped, messages.len() as u64);
            return 0;
        };
        let mut delivered = 0;
        for message in messages {
            if message.to == self.node_id() {
                sink.step(message);
                delivered += 1;
            } else {
                tracing::warn!(
                    to = message.to,
                    from = message.from,
                    "dropping a raft message addressed to another node"
                );
                Stats::add(&self.stats.messages_dropped, 1);
            }
        }
        Stats::add(&self.stats.messages_received, delivered as u64);
        delivered
    }

    /// Tells the local raft node that `messages` were not sent: each snapshot is reported
    /// as not delivered, and each peer that had other messages as unreachable.
    pub fn undeliverable(&self, messages: &[Message]) {
        Stats::add(&self.stats.messages_dropped, messages.len() as u64);
        let Some(sink) = self.sink() else { return };
        let mut unreachable = BTreeSet::new();
        for message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                Stats::add(&self.stats.snapshots_failed, 1);
                sink.report_snapshot(message.to, false);
            } else {
                unreachable.insert(message.to);
            }
        }
        for peer in unreachable {
            sink.report_unreachable(peer);
        }
    }
}
