//! The network transport of the control plane: raft messages between maas nodes over
//! ractor_cluster.
//!
//! Each node runs, under one [`supervisor::TransportSupervisor`]:
//!
//! - a ractor_cluster `NodeServer`, fed the connections our own listener accepts on the
//!   node's cluster address (`listen.cluster`), authenticating peers with the cluster
//!   cookie;
//! - a `RaftPeerActor` named `maas.raft.<id>` ([`raft_actor_name`]), which peers send
//!   [`wire::RaftWire`] messages to and which steps them into the local raft node;
//! - a link manager, which keeps a session open to every peer in the address book
//!   (reconnecting with backoff), classifies peers as connected, unreachable or refused
//!   for a different cookie, and sends raft's outbound messages, batched per peer.
//!
//! The raft thread calls [`Transport::send`], which only casts into the link manager's
//! mailbox (an unbounded channel: it never blocks and needs no runtime context).
//!
//! Wiring on a node: bind `listen.cluster`, [`ClusterTransport::start`], `set_peer` for
//! every known member, start the raft driver with the transport, [`ClusterTransport::attach`]
//! its handle; at shutdown stop the raft node, then [`ClusterTransport::shutdown`].

mod inbound;
mod links;
mod shared;
mod supervisor;
mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use maas_consensus::{RaftHandle, StateMachine, Transport};
use ractor::{Actor, ActorRef, MessagingErr};
use raft::prelude::Message;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::error::{ActorsError, Result};
use links::LinkMsg;
use shared::{PeerAddresses, Shared};
use supervisor::{SupervisorMsg, TransportSupervisor};

/// The name a node's raft endpoint actor is registered under, on every node.
pub fn raft_actor_name(node_id: u64) -> String {
    format!("maas.raft.{node_id}")
}

/// Where inbound raft messages and the fate of outbound ones go: the local raft node.
/// [`RaftHandle`] implements it; tests may supply their own.
pub trait RaftSink: Send + Sync + 'static {
    /// A raft message from a peer, addressed to this node.
    fn step(&self, message: Message);
    /// Messages to `peer_id` could not be sent.
    fn report_unreachable(&self, peer_id: u64);
    /// Whether a `MsgSnapshot` to `peer_id` reached it. Reported for every snapshot sent
    /// or dropped: raft sends that follower nothing more until it hears.
    fn report_snapshot(&self, peer_id: u64, delivered: bool);
}

impl<S: StateMachine> RaftSink for RaftHandle<S> {
    fn step(&self, message: Message) {
        RaftHandle::step(self, message);
    }

    fn report_unreachable(&self, peer_id: u64) {
        RaftHandle::report_unreachable(self, peer_id);
    }

    fn report_snapshot(&self, peer_id: u64, delivered: bool) {
        RaftHandle::report_snapshot(self, peer_id, delivered);
    }
}

/// The transport's settings. `node_id` and `cookie` come from `node.id` and
/// `cluster.cookie`; the rest have defaults that suit a LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub node_id: u64,
    /// The shared secret every node of a cluster must have; a peer with another cookie
    /// is refused and reported as [`PeerState::CookieMismatch`].
    pub cookie: String,
    /// How long a connection attempt may take, from dialling to an authenticated
    /// session, before the peer is reported unreachable (or refused, for a cookie).
    pub handshake_timeout: Duration,
    /// The first and the longest wait between connection attempts to a peer.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long a snapshot may take to reach a peer before it is reported not delivered.
    pub snapshot_timeout: Duration,
    /// The largest cluster frame this node accepts and sends, in bytes. Every node must
    /// have the same value; a raft message (in practice, a snapshot) larger than this is
    /// not sent, and an error says so.
    pub max_frame_bytes: u64,
}

impl ClusterConfig {
    pub fn new(node_id: u64, cookie: impl Into<String>) -> Self {
        ClusterConfig {
            node_id,
            cookie: cookie.into(),
            handshake_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            snapshot_timeout: Duration::from_secs(60),
            max_frame_bytes: 64 * 1024 * 1024,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |key, reason: &str| Err(ActorsError::InvalidConfig { key, reason: reason.to_owned() });
        if self.node_id == 0 {
            return bad("node.id", "must be 1 or more");
        }
        if self.cookie.is_empty() {
            return bad("cluster.cookie", "must not be empty: set the same secret on every node");
        }
        if self.handshake_timeout.is_zero() || self.snapshot_timeout.is_zero() {
            return bad("cluster timeouts", "must be more than zero");
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return bad("cluster reconnect backoff", "the minimum must be more than zero and at most the maximum");
        }
        if self.max_frame_bytes < 1024 * 1024 || usize::try_from(self.max_frame_bytes).is_err() {
            return bad("cluster max frame bytes", "must be at least 1 MiB");
        }
        Ok(())
    }
}

/// How this node stands with one peer of its address book.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// No session yet; the first attempt is under way.
    Connecting,
    /// An authenticated session is open.
    Connected,
    /// The last attempt could not open a session (refused, timed out, closed); retrying.
    Unreachable,
    /// The peer refused this node at the cookie challenge: the cluster cookies differ.
    /// Retrying, slowly, in case the configuration is fixed.
    CookieMismatch,
}

impl PeerState {
    /// The state as the API names it: `connecting`, `connected`, `unreachable`,
    /// `cookie_mismatch`.
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Connecting => "connecting",
            PeerState::Connected => "connected",
            PeerState::Unreachable => "unreachable",
            PeerState::CookieMismatch => "cookie_mismatch",
        }
    }
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerState::Connecting => "connecting",
            PeerState::Connected => "connected",
            PeerState::Unreachable => "unreachable",
            PeerState::CookieMismatch => "cookie mismatch",
        })
    }
}

/// Counters since the transport started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TransportStats {
    /// Raft messages handed to a session for sending.
    pub messages_sent: u64,
    pub batches_sent: u64,
    /// Raft messages received and handed to the local raft node.
    pub messages_received: u64,
    /// Raft messages not sent (no session, too large) or not delivered (no raft node
    /// attached, wrong address, undecodable).
    pub messages_dropped: u64,
    pub snapshots_sent: u64,
    /// Snapshots the receiving node acknowledged.
    pub snapshots_delivered: u64,
    pub snapshots_failed: u64,
    /// The largest batch or snapshot frame sent, in bytes.
    pub largest_frame_bytes: u64,
}

/// The cluster transport of one node; cheap to clone. Implements raft's [`Transport`].
#[derive(Clone)]
pub struct ClusterTransport {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    supervisor: ActorRef<SupervisorMsg>,
    local_addr: SocketAddr,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Best effort for a transport dropped without `shutdown`: stop the actors.
        self.shared.set_stopping();
        self.supervisor.stop(None);
    }
}

impl ClusterTransport {
    /// Binds the node's cluster address and starts the transport on it.
    pub async fn bind(addr: SocketAddr, config: ClusterConfig) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ActorsError::ClusterListen { addr: addr.to_string(), source })?;
        Self::start(listener, config).await
    }

    /// Starts the transport on a bound listener (tests bind port 0). Must be called
    /// within a tokio runtime; the actors run on it.
    pub async fn start(listener: TcpListener, config: ClusterConfig) -> Result<Self> {
        config.validate()?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ActorsError::ClusterListen { addr: "the given listener".into(), source })?;
        let shared = Arc::new(Shared::new(config));
        let (supervisor, _) = Actor::spawn(None, TransportSupervisor { shared: Arc::clone(&shared) }, listener)
            .await
            .map_err(|err| ActorsError::Spawn { actor: "supervisor", reason: err.to_string() })?;
        tracing::info!(node_id = shared.node_id(), cluster_addr = %local_addr, "cluster transport listening");
        Ok(ClusterTransport { handle: Arc::new(Handle { shared, supervisor, local_addr }) })
    }

    /// The address this node accepts cluster connections on.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }

    pub fn node_id(&self) -> u64 {
        self.handle.shared.node_id()
    }

    /// Connects inbound raft messages and outbound reports to the local raft node. Until
    /// then inbound messages are dropped (raft retries).
    pub fn attach(&self, sink: Arc<dyn RaftSink>) {
        self.handle.shared.set_sink(Some(sink));
    }

    /// Adds or updates a peer: `cluster_addr` is its `listen.cluster`, `api_addr` its
    /// client-facing address. A session is opened at once, without blocking.
    pub fn set_peer(&self, id: u64, cluster_addr: impl Into<String>, api_addr: impl Into<String>) {
        if id == self.node_id() {
            return;
        }
        let addresses = PeerAddresses { cluster_addr: cluster_addr.into(), api_addr: api_addr.into() };
        if self.handle.shared.set_peer(id, addresses) {
            self.notify_links(id);
        }
    }

    /// Forgets a peer: no more connection attempts, no state to show. An open session
    /// stays until it closes.
    pub fn remove_peer(&self, id: u64) {
        if self.handle.shared.remove_peer(id) {
            self.notify_links(id);
        }
    }

    fn notify_links(&self, id: u64) {
        if let Some(links) = self.handle.shared.links() {
            let _ = links.cast(LinkMsg::PeerChanged(id));
        }
    }

    /// Each address-book peer's connection state, for `maas cluster status`.
    pub fn peer_states(&self) -> BTreeMap<u64, PeerState> {
        self.handle.shared.peer_states()
    }

    pub fn stats(&self) -> TransportStats {
        self.handle.shared.stats()
    }

    /// Why the transport stopped working, if it did: a child actor crashed more often
    /// than its restart policy allows, or the listener died.
    pub fn failure(&self) -> Option<String> {
        let shared = &self.handle.shared;
        shared.failure().or_else(|| {
            (!shared.stopping() && self.handle.supervisor.get_status() >= ractor::ActorStatus::Stopping)
                .then(|| "the cluster transport's supervisor stopped".to_owned())
        })
    }

    /// Closes every session and the listener, and waits until the actors have stopped
    /// and the cluster port is free again. Stop the raft node first.
    pub async fn shutdown(&self) {
        let shared = &self.handle.shared;
        shared.set_stopping();
        if let Err(err) = self.handle.supervisor.stop_and_wait(None, Some(Duration::from_secs(10))).await {
            tracing::warn!(error = %err, "the cluster transport did not stop cleanly");
        }
        // Breaks the cycle transport -> raft handle -> transport.
        shared.set_sink(None);
    }
}

impl Transport for ClusterTransport {
    fn send(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let shared = &self.handle.shared;
        let Some(links) = shared.links() else {
            shared.undeliverable(&messages);
            return;
        };
        if let Err(MessagingErr::SendErr(LinkMsg::Send(messages))) = links.cast(LinkMsg::Send(messages)) {
            // The link manager is restarting or stopped: drop, and tell raft.
            shared.undeliverable(&messages);
        }
    }

    fn peer_address(&self, id: u64) -> Option<String> {
        self.handle.shared.peer(id).map(|peer| peer.api_addr)
    }

    fn update_peer(&self, id: u64, cluster_addr: &str, api_addr: &str) {
        if id != self.node_id() {
            self.set_peer(id, cluster_addr, api_addr);
        }
    }

    fn forget_peer(&self, id: u64) {
        self.remove_peer(id);
    }
}

/// The node name ractor_cluster knows a node by: `maas@node-<id>`. Its uniqueness is what
/// ractor_cluster's self-connection and duplicate-session checks rely on.
pub(crate) const NODE_NAME: &str = "maas";

pub(crate) fn node_hostname(node_id: u64) -> String {
    format!("node-{node_id}")
}

/// The raft id in a ractor_cluster node name made by [`node_hostname`].
pub(crate) fn node_id_from_name(name: &str) -> Option<u64> {
    name.strip_prefix(NODE_NAME)?.strip_prefix("@node-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_carry_the_raft_id() {
        assert_eq!(node_id_from_name(&format!("{NODE_NAME}@{}", node_hostname(42))), Some(42));
        assert_eq!(node_id_from_name("maas@node-"), None);
        assert_eq!(node_id_from_name("other@node-3"), None);
    }

    #[test]
    fn config_is_checked() {
        assert!(ClusterConfig::new(1, "secret").validate().is_ok());
        for (config, key) in [
            (ClusterConfig::new(0, "secret"), "node.id"),
            (ClusterConfig::new(1, ""), "cluster.cookie"),
            (ClusterConfig { max_frame_bytes: 10, ..ClusterConfig::new(1, "secret") }, "cluster max frame bytes"),
        ] {
            match config.validate() {
                Err(ActorsError::InvalidConfig { key: found, .. }) => assert_eq!(found, key),
                other => panic!("{key}: {other:?}"),
            }
        }
    }
}
