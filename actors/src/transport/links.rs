//! The link manager: one session per peer, and raft's outbound messages over them.
//!
//! For every peer in the address book it keeps an attempt going until an authenticated
//! session exists: dial (`client_connect`), then wait for the session to become ready,
//! both within the handshake bound, else the peer is unreachable. ractor_cluster's
//! `client_connect` returns `Ok` as soon as the TCP connection is up, whatever the
//! cookie; a peer with another cookie closes the session after the challenge, which
//! shows here as a session that learnt the peer's name and closed without
//! authenticating: a cookie mismatch, reported as soon as it is seen (in practice one
//! round trip), both by the node that dialled and by the node that was dialled. Either
//! way the link retries with backoff (the longest wait for a cookie mismatch).
//!
//! Sends go to the peer's `RaftPeerActor` through the `RemoteActor` ractor_cluster
//! spawns for it under the session: found by name among that session's children, so a
//! process holding several nodes (the tests) never takes a shortcut to another node's
//! local actor.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, ActorStatus};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{ClientConnectErr, NodeServerMessage, NodeSessionMessage, RactorMessage};
use raft::prelude::{Message, MessageType};

use super::shared::{Shared, Stats};
use super::wire::{self, RaftWire};
use super::{PeerState, node_id_from_name, raft_actor_name};

/// A node-server event, forwarded by [`EventForwarder`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum SessionEvent {
    Opened,
    Authenticated,
    Ready,
    Disconnected,
}

#[derive(RactorMessage)]
pub(crate) enum LinkMsg {
    /// Outbound raft messages, from the raft thread.
    Send(Vec<Message>),
    /// The address book changed for this peer.
    PeerChanged(u64),
    Session(SessionEvent, NodeServerSessionInformation),
    ConnectFinished {
        peer: u64,
        attempt: u64,
        error: Option<String>,
    },
    HandshakeDeadline {
        peer: u64,
        attempt: u64,
    },
    Retry {
        peer: u64,
        attempt: u64,
    },
    /// The node server was replaced: every session is gone.
    NodeServerRestarted,
}

/// Forwards the node server's events to whichever link manager is current.
pub(crate) struct EventForwarder {
    pub shared: Arc<Shared>,
}

impl EventForwarder {
    fn forward(&self, event: SessionEvent, session: NodeServerSessionInformation) {
        if let Some(links) = self.shared.links() {
            let _ = links.cast(LinkMsg::Session(event, session));
        }
    }
}

impl ractor_cluster::NodeEventSubscription for EventForwarder {
    fn node_session_opened(&self, session: NodeServerSessionInformation) {
        self.forward(SessionEvent::Opened, session);
    }

    fn node_session_disconnected(&self, session: NodeServerSessionInformation) {
        self.forward(SessionEvent::Disconnected, session);
    }

    fn node_session_authenticated(&self, session: NodeServerSessionInformation) {
        self.forward(SessionEvent::Authenticated, session);
    }

    fn node_session_ready(&self, session: NodeServerSessionInformation) {
        self.forward(SessionEvent::Ready, session);
    }
}

pub(crate) struct LinkManager {
    pub shared: Arc<Shared>,
}

/// One peer: from the address book, or one that connected to us.
#[derive(Default)]
struct PeerLink {
    /// `None` for a peer outside the address book: never dialled.
    cluster_addr: Option<String>,
    state: Option<PeerState>,
    /// Numbers attempts, so a late answer to an old one is ignored.
    attempt: u64,
    in_flight: bool,
    backoff: Duration,
    /// The elected, ready session.
    session: Option<ActorRef<NodeSessionMessage>>,
    /// The peer's `RaftPeerActor`, as seen through `session`.
    remote: Option<ActorRef<RaftWire>>,
    /// A cookie refusal of an unlisted peer was logged already.
    refusal_logged: bool,
}

struct TrackedSession {
    actor: ActorRef<NodeSessionMessage>,
    peer: Option<u64>,
    authenticated: bool,
}

pub(crate) struct LinkState {
    shared: Arc<Shared>,
    peers: BTreeMap<u64, PeerLink>,
    sessions: HashMap<ActorId, TrackedSession>,
    /// When a message too large to send was last logged as an error, per peer: raft
    /// retries a snapshot every few heartbeats, and one error a minute says enough.
    too_large_logged: HashMap<u64, Instant>,
}

fn peer_of(session: &NodeServerSessionInformation) -> Option<u64> {
    session.peer_name.as_ref().and_then(|name| node_id_from_name(&name.name))
}

fn connect_error(err: &ClientConnectErr) -> String {
    match err {
        ClientConnectErr::Socket(err) | ClientConnectErr::Encryption(err) => err.to_string(),
        ClientConnectErr::Messaging(err) => format!("the local node server is not running ({err})"),
    }
}

impl Actor for LinkManager {
    type Msg = LinkMsg;
    type State = LinkState;
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<LinkMsg>, (): ()) -> Result<LinkState, ActorProcessingErr> {
        let mut state = LinkState {
            shared: Arc::clone(&self.shared),
            peers: BTreeMap::new(),
            sessions: HashMap::new(),
            too_large_logged: HashMap::new(),
        };
        // After a restart, pick up the sessions the node server already has.
        if let Some(node_server) = self.shared.node_server()
            && let Ok(sessions) = ractor::call_t!(node_server, NodeServerMessage::GetSessions, 1000)
        {
            for session in sessions.into_values() {
                state.on_session(&myself, SessionEvent::Ready, &session);
            }
        }
        for id in self.shared.book().into_keys() {
            state.on_peer_changed(&myself, id);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<LinkMsg>,
        message: LinkMsg,
        state: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LinkMsg::Send(messages) => state.send(messages),
            LinkMsg::PeerChanged(peer) => state.on_peer_changed(&myself, peer),
            LinkMsg::Session(event, session) => state.on_session(&myself, event, &session),
            LinkMsg::ConnectFinished { peer, attempt, error } => {
                state.on_connect_finished(&myself, peer, attempt, error);
            }
            LinkMsg::HandshakeDeadline { peer, attempt } => state.on_deadline(&myself, peer, attempt),
            LinkMsg::Retry { peer, attempt } => state.on_retry(&myself, peer, attempt),
            LinkMsg::NodeServerRestarted => state.on_node_server_restarted(&myself),
        }
        Ok(())
    }
}

impl LinkState {
    // ---- the address book ----

    fn on_peer_changed(&mut self, myself: &ActorRef<LinkMsg>, peer: u64) {
        match self.shared.peer(peer) {
            Some(addresses) => {
                let link = self.peers.entry(peer).or_default();
                if link.cluster_addr.as_deref() != Some(addresses.cluster_addr.as_str()) {
                    link.cluster_addr = Some(addresses.cluster_addr);
                    // A new address: forget the old attempt and dial now.
                    link.attempt += 1;
                    link.in_flight = false;
                    link.backoff = Duration::ZERO;
                }
                let state = link.state.unwrap_or(PeerState::Connecting);
                self.shared.set_state(peer, state);
                self.start_attempt(myself, peer);
            }
            None => {
                if let Some(link) = self.peers.get_mut(&peer) {
                    link.cluster_addr = None;
                    link.attempt += 1;
                    link.in_flight = false;
                    if link.session.is_none() {
                        self.peers.remove(&peer);
                    }
                }
            }
        }
    }

    // ---- connection attempts ----

    fn start_attempt(&mut self, myself: &ActorRef<LinkMsg>, peer: u64) {
        let Some(link) = self.peers.get_mut(&peer) else { return };
        let Some(cluster_addr) = link.cluster_addr.clone() else { return };
        if link.session.is_some() || link.in_flight {
            return;
        }
        let Some(node_server) = self.shared.node_server() else { return };
        link.attempt += 1;
        link.in_flight = true;
        let attempt = link.attempt;
        let bound = self.shared.config.handshake_timeout;
        let links = myself.clone();
        tokio::spawn(async move {
            let error =
                match tokio::time::timeout(bound, ractor_cluster::client_connect(&node_server, cluster_addr.as_str()))
                    .await
                {
                    Ok(Ok(())) => None,
                    Ok(Err(err)) => Some(connect_error(&err)),
                    Err(_) => Some(format!("no TCP connection within {bound:?}")),
                };
            let _ = links.cast(LinkMsg::ConnectFinished { peer, attempt, error });
        });
        myself.send_after(bound, move || LinkMsg::HandshakeDeadline { peer, attempt });
    }

    fn on_connect_finished(&mut self, myself: &ActorRef<LinkMsg>, peer: u64, attempt: u64, error: Option<String>) {
        let Some(link) = self.peers.get_mut(&peer) else { return };
        if link.attempt != attempt || !link.in_flight || link.session.is_some() {
            return;
        }
        // Success means only that TCP is up; the session's events or the deadline decide.
        if let Some(error) = error {
            link.in_flight = false;
            self.set_state(peer, PeerState::Unreachable, &error);
            self.schedule_retry(myself, peer);
        }
    }

    fn on_deadline(&mut self, myself: &ActorRef<LinkMsg>, peer: u64, attempt: u64) {
        let Some(link) = self.peers.get_mut(&peer) else { return };
        if link.attempt != attempt || !link.in_flight || link.session.is_some() {
            return;
        }
        link.in_flight = false;
        let bound = self.shared.config.handshake_timeout;
        self.set_state(peer, PeerState::Unreachable, &format!("no cluster session formed within {bound:?}"));
        self.schedule_retry(myself, peer);
    }

    fn on_retry(&mut self, myself: &ActorRef<LinkMsg>, peer: u64, attempt: u64) {
        if self.peers.get(&peer).is_some_and(|link| link.attempt == attempt) {
            self.start_attempt(myself, peer);
        }
    }

    fn schedule_retry(&mut self, myself: &ActorRef<LinkMsg>, peer: u64) {
        let config = &self.shared.config;
        let Some(link) = self.peers.get_mut(&peer) else { return };
        link.backoff = if link.state == Some(PeerState::CookieMismatch) {
            config.reconnect_max
        } else if link.backoff.is_zero() {
            config.reconnect_min
        } else {
            (link.backoff * 2).min(config.reconnect_max)
        };
        let attempt = link.attempt;
        myself.send_after(link.backoff, move || LinkMsg::Retry { peer, attempt });
    }

    fn on_node_server_restarted(&mut self, myself: &ActorRef<LinkMsg>) {
        self.sessions.clear();
        let peers: Vec<u64> = self.peers.keys().copied().collect();
        for peer in peers {
            let link = self.peers.get_mut(&peer).expect("listed above");
            link.session = None;
            link.remote = None;
            link.in_flight = false;
            link.attempt += 1;
            self.set_state(peer, PeerState::Connecting, "the node server restarted");
            self.start_attempt(myself, peer);
        }
    }

    // ---- sessions ----

    fn on_session(&mut self, myself: &ActorRef<LinkMsg>, event: SessionEvent, session: &NodeServerSessionInformation) {
        let id = session.actor.get_id();
        match event {
            SessionEvent::Opened => {
                let tracked =
                    TrackedSession { actor: session.actor.clone(), peer: peer_of(session), authenticated: false };
                self.sessions.insert(id, tracked);
            }
            SessionEvent::Authenticated | SessionEvent::Ready => {
                let peer = peer_of(session);
                let tracked = self.sessions.entry(id).or_insert_with(|| TrackedSession {
                    actor: session.actor.clone(),
                    peer,
                    authenticated: true,
                });
                tracked.authenticated = true;
                tracked.peer = peer.or(tracked.peer);
                if let (SessionEvent::Ready, Some(peer)) = (event, tracked.peer) {
                    self.connected(peer, session.actor.clone(), &session.peer_addr);
                }
            }
            SessionEvent::Disconnected => {
                let tracked = self.sessions.remove(&id);
                let authenticated = tracked.as_ref().is_some_and(|t| t.authenticated);
                let Some(peer) = peer_of(session).or(tracked.and_then(|t| t.peer)) else { return };
                if !authenticated && session.peer_name.is_some() {
                    self.refused(myself, peer, &session.peer_addr);
                }
                self.disconnected(myself, peer, id);
            }
        }
    }

    fn connected(&mut self, peer: u64, session: ActorRef<NodeSessionMessage>, peer_addr: &str) {
        let link = self.peers.entry(peer).or_default();
        link.session = Some(session);
        link.remote = None;
        link.in_flight = false;
        link.backoff = Duration::ZERO;
        self.set_state(peer, PeerState::Connected, peer_addr);
    }

    /// A session with `peer` closed after learning its name and before authenticating:
    /// the mark of a failed cookie challenge, unless another session with the peer is
    /// authenticated (then this one lost ractor_cluster's duplicate-connection election).
    fn refused(&mut self, myself: &ActorRef<LinkMsg>, peer: u64, peer_addr: &str) {
        let authenticated_elsewhere = self.sessions.values().any(|s| s.peer == Some(peer) && s.authenticated);
        let link = self.peers.entry(peer).or_default();
        if authenticated_elsewhere || link.session.is_some() {
            return;
        }
        if link.cluster_addr.is_none() {
            // Not in the address book, so there is no state to show: say it once.
            if !link.refusal_logged {
                link.refusal_logged = true;
                tracing::error!(
                    peer_id = peer,
                    peer_addr,
                    "node {peer} at {peer_addr} failed the cluster cookie challenge: the cluster cookies differ; \
                     set the same cluster.cookie on every node"
                );
            }
            return;
        }
        // Decided now, not at the attempt's deadline; the attempt (if any) is over.
        let was_in_flight = std::mem::replace(&mut link.in_flight, false);
        self.set_state(peer, PeerState::CookieMismatch, "");
        if was_in_flight {
            self.schedule_retry(myself, peer);
        }
    }

    fn disconnected(&mut self, myself: &ActorRef<LinkMsg>, peer: u64, session: ActorId) {
        let Some(link) = self.peers.get_mut(&peer) else { return };
        if link.session.as_ref().map(|s| s.get_id()) != Some(session) {
            return;
        }
        link.session = None;
        link.remote = None;
        // Another authenticated session with the peer (a simultaneous connection) takes over.
        if let Some(other) = self.sessions.values().find(|s| s.peer == Some(peer) && s.authenticated) {
            link.session = Some(other.actor.clone());
            return;
        }
        link.attempt += 1;
        link.in_flight = false;
        link.backoff = Duration::ZERO;
        self.set_state(peer, PeerState::Connecting, &format!("lost the session with node {peer}; reconnecting"));
        self.start_attempt(myself, peer);
    }

    fn set_state(&mut self, peer: u64, state: PeerState, detail: &str) {
        let Some(link) = self.peers.get_mut(&peer) else { return };
        let previous = link.state.replace(state);
        self.shared.set_state(peer, state);
        if previous == Some(state) {
            return;
        }
        let addr = link.cluster_addr.clone().unwrap_or_else(|| "an address not in the book".to_owned());
        match state {
            PeerState::Connected => {
                // `detail` is the session's socket address; the book's is the one to show.
                let addr = link.cluster_addr.as_deref().unwrap_or(detail);
                tracing::info!(peer_id = peer, peer_addr = %addr, "connected to node {peer}");
            }
            PeerState::Connecting => tracing::info!(peer_id = peer, peer_addr = %addr, "{detail}"),
            PeerState::Unreachable => {
                tracing::warn!(peer_id = peer, peer_addr = %addr, "node {peer} at {addr} is unreachable: {detail}; retrying");
            }
            PeerState::CookieMismatch => tracing::error!(
                peer_id = peer,
                peer_addr = %addr,
                "node {peer} at {addr} refused this node at the cookie challenge: the cluster cookies differ; \
                 set the same cluster.cookie on every node"
            ),
        }
    }

    // ---- sending ----

    /// The peer's raft endpoint, through its ready session.
    fn remote(&mut self, peer: u64) -> Option<ActorRef<RaftWire>> {
        let link = self.peers.get_mut(&peer)?;
        if let Some(remote) = &link.remote
            && remote.get_status() < ActorStatus::Stopping
        {
            return Some(remote.clone());
        }
        let session = link.session.as_ref()?;
        let name = raft_actor_name(peer);
        // A session lists every remotable actor the peer's process has; in one process
        // holding several nodes that includes other nodes' endpoints, hence the name.
        let cell = session
            .get_cell()
            .get_children()
            .into_iter()
            .filter(|cell| {
                !cell.get_id().is_local()
                    && cell.get_status() < ActorStatus::Stopping
                    && cell.get_name().as_deref() == Some(name.as_str())
            })
            .max_by_key(|cell| cell.get_id().pid())?;
        let remote = ActorRef::<RaftWire>::from(cell);
        link.remote = Some(remote.clone());
        Some(remote)
    }

    fn send(&mut self, messages: Vec<Message>) {
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for message in messages {
            by_peer.entry(message.to).or_default().push(message);
        }
        for (peer, messages) in by_peer {
            match self.remote(peer) {
                Some(remote) => self.send_to(peer, &remote, messages),
                None => self.shared.undeliverable(&messages),
            }
        }
    }

    fn send_to(&mut self, peer: u64, remote: &ActorRef<RaftWire>, messages: Vec<Message>) {
        let limit = usize::try_from(self.shared.config.max_frame_bytes).unwrap_or(usize::MAX) - FRAME_OVERHEAD_BYTES;
        let (snapshots, others): (Vec<Message>, Vec<Message>) =
            messages.into_iter().partition(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let encoded: Vec<Vec<u8>> = others
            .iter()
            .filter_map(|message| match wire::encode_message(message) {
                Ok(bytes) => Some(bytes),
                Err(err) => {
                    tracing::error!(peer_id = peer, error = %err, "cannot encode a raft message; dropping it");
                    None
                }
            })
            .collect();
        let count = encoded.len() as u64;
        let (batches, oversized) = wire::pack(encoded, limit);
        for message in &oversized {
            self.too_large(peer, "a raft message", message.len(), limit);
        }
        Stats::add(&self.shared.stats.messages_dropped, oversized.len() as u64);
        let stats = &self.shared.stats;
        for batch in batches {
            stats.frame(batch.len());
            if remote.cast(RaftWire::Batch(batch)).is_err() {
                // The remote actor stopped (its session closed or the peer's endpoint
                // restarted): look it up afresh next time.
                if let Some(link) = self.peers.get_mut(&peer) {
                    link.remote = None;
                }
                self.shared.undeliverable(&others);
                self.shared.undeliverable(&snapshots);
                return;
            }
            Stats::add(&stats.batches_sent, 1);
        }
        Stats::add(&stats.messages_sent, count - oversized.len() as u64);
        for snapshot in snapshots {
            self.send_snapshot(peer, remote, &snapshot, limit);
        }
    }

    /// Logs a message that cannot be sent because it is larger than a frame: as an
    /// error at most once a minute per peer, otherwise at debug level.
    fn too_large(&mut self, peer: u64, what: &str, bytes: usize, limit: usize) {
        let now = Instant::now();
        let last = self.too_large_logged.get(&peer);
        if last.is_none_or(|at| now.duration_since(*at) >= TOO_LARGE_LOG_INTERVAL) {
            self.too_large_logged.insert(peer, now);
            tracing::error!(
                peer_id = peer,
                bytes,
                limit,
                "{what} for node {peer} is {bytes} bytes, over the cluster frame limit of {limit} bytes; \
                 it is not sent: raise the frame limit, the same on every node"
            );
        } else {
            tracing::debug!(peer_id = peer, bytes, limit, "{what} for node {peer} is over the cluster frame limit");
        }
    }

    /// Sends a snapshot as a call, so its arrival can be reported to raft.
    fn send_snapshot(&mut self, peer: u64, remote: &ActorRef<RaftWire>, snapshot: &Message, limit: usize) {
        let shared = Arc::clone(&self.shared);
        let encoded = match wire::encode_message(snapshot) {
            Ok(encoded) => encoded,
            Err(err) => {
                tracing::error!(peer_id = peer, error = %err, "cannot encode a raft snapshot");
                shared.undeliverable(std::slice::from_ref(snapshot));
                return;
            }
        };
        let size = encoded.len();
        let (mut batches, _) = wire::pack(vec![encoded], limit);
        let Some(batch) = batches.pop() else {
            self.too_large(peer, "a raft snapshot", size, limit);
            shared.undeliverable(std::slice::from_ref(snapshot));
            return;
        };
        let bytes = batch.len();
        shared.stats.frame(bytes);
        Stats::add(&shared.stats.snapshots_sent, 1);
        let remote = remote.clone();
        let bound = shared.config.snapshot_timeout;
        tracing::info!(peer_id = peer, bytes, "sending a raft snapshot");
        tokio::spawn(async move {
            let outcome = remote.call(|reply| RaftWire::Snapshot(batch, reply), Some(bound)).await;
            let delivered = matches!(outcome, Ok(CallResult::Success(true)));
            if delivered {
                Stats::add(&shared.stats.snapshots_delivered, 1);
                tracing::info!(peer_id = peer, bytes, "node {peer} received the raft snapshot");
            } else {
                Stats::add(&shared.stats.snapshots_failed, 1);
                let outcome = match outcome {
                    Ok(CallResult::Success(_)) => "it was not handed to raft".to_owned(),
                    Ok(CallResult::Timeout) => format!("no answer within {bound:?}"),
                    Ok(CallResult::SenderError) => "the session closed".to_owned(),
                    Err(err) => err.to_string(),
                };
                tracing::warn!(peer_id = peer, bytes, "a raft snapshot for node {peer} was not delivered: {outcome}");
            }
            if let Some(sink) = shared.sink() {
                sink.report_snapshot(peer, delivered);
            }
        });
    }
}

/// Room left in a cluster frame for ractor_cluster's own envelope around our batch.
const FRAME_OVERHEAD_BYTES: usize = 4096;

const TOO_LARGE_LOG_INTERVAL: Duration = Duration::from_secs(60);
