//! The transport's supervisor: it owns the cluster listener and supervises the node
//! server, the raft endpoint and the link manager.
//!
//! **Restart policy:** a child that fails or stops unasked is logged as an error and
//! restarted, at most [`MAX_RESTARTS`] times in [`RESTART_WINDOW`] per child; one more
//! and the supervisor gives up: it records the failure (see
//! [`super::ClusterTransport::failure`]), logs it, and stops with its children, which
//! escalates to whoever supervises the transport.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{NetworkStream, NodeServer, NodeServerMessage, RactorMessage};
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};

use super::inbound::RaftPeerActor;
use super::links::{EventForwarder, LinkManager, LinkMsg};
use super::shared::Shared;
use super::{NODE_NAME, node_hostname, raft_actor_name};

pub(crate) const MAX_RESTARTS: usize = 5;
pub(crate) const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// How long each child may take to stop when the transport shuts down.
const STOP_BOUND: Duration = Duration::from_secs(3);

#[derive(RactorMessage)]
pub(crate) enum SupervisorMsg {
    /// The accept loop ended, which it does only by panicking.
    ListenerDied(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Child {
    RaftEndpoint,
    NodeServer,
    Links,
}

impl Child {
    fn describe(self) -> &'static str {
        match self {
            Child::RaftEndpoint => "raft endpoint actor",
            Child::NodeServer => "ractor_cluster node server",
            Child::Links => "link manager",
        }
    }
}

pub(crate) struct TransportSupervisor {
    pub shared: Arc<Shared>,
}

pub(crate) struct SupervisorState {
    children: HashMap<ActorId, (Child, ActorCell)>,
    restarts: HashMap<Child, VecDeque<Instant>>,
    accept: AbortHandle,
    accept_watcher: Option<JoinHandle<()>>,
}

impl TransportSupervisor {
    async fn spawn_child(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        child: Child,
    ) -> Result<ActorCell, ActorProcessingErr> {
        let shared = &self.shared;
        let supervisor = myself.get_cell();
        let cell = match child {
            Child::RaftEndpoint => {
                let actor = RaftPeerActor { shared: Arc::clone(shared) };
                let name = raft_actor_name(shared.node_id());
                Actor::spawn_linked(Some(name), actor, (), supervisor).await?.0.get_cell()
            }
            Child::NodeServer => {
                // ractor_cluster's NodeServer always runs a listener of its own; ours does
                // the accepting (it was bound by the caller), so that one idles on an
                // ephemeral loopback port.
                let server = NodeServer::new(
                    0,
                    shared.config.cookie.clone(),
                    NODE_NAME.to_owned(),
                    node_hostname(shared.node_id()),
                    None,
                    Some(NodeConnectionMode::Isolated),
                )
                .with_listen_addr(Ipv4Addr::LOCALHOST.into())
                .with_max_inbound_frame_size(shared.config.max_frame_bytes);
                let (node_server, _) = Actor::spawn_linked(None, server, (), supervisor).await?;
                node_server
                    .cast(NodeServerMessage::SubscribeToEvents {
                        id: "maas.transport".to_owned(),
                        subscription: Box::new(EventForwarder { shared: Arc::clone(shared) }),
                    })
                    .map_err(|_| "the node server stopped as soon as it started")?;
                shared.set_node_server(Some(node_server.clone()));
                node_server.get_cell()
            }
            Child::Links => {
                let actor = LinkManager { shared: Arc::clone(shared) };
                let (links, _) = Actor::spawn_linked(None, actor, (), supervisor).await?;
                shared.set_links(Some(links.clone()));
                links.get_cell()
            }
        };
        Ok(cell)
    }

    async fn child_exited(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        cell: &ActorCell,
        how: &str,
    ) {
        if self.shared.stopping() {
            return;
        }
        let Some((child, _)) = state.children.remove(&cell.get_id()) else { return };
        let node_id = self.shared.node_id();
        tracing::error!(
            node_id,
            child = child.describe(),
            "the cluster transport's {} {how}; restarting it",
            child.describe()
        );
        let now = Instant::now();
        let recent = state.restarts.entry(child).or_default();
        recent.retain(|at| now.duration_since(*at) < RESTART_WINDOW);
        recent.push_back(now);
        if recent.len() > MAX_RESTARTS {
            self.give_up(
                myself,
                format!("its {} failed {} times within {RESTART_WINDOW:?}", child.describe(), recent.len()),
            );
            return;
        }
        if child == Child::NodeServer {
            self.shared.set_node_server(None);
        }
        match self.spawn_child(myself, child).await {
            Ok(cell) => {
                state.children.insert(cell.get_id(), (child, cell));
                if child == Child::NodeServer
                    && let Some(links) = self.shared.links()
                {
                    let _ = links.cast(LinkMsg::NodeServerRestarted);
                }
            }
            Err(err) => self.give_up(myself, format!("its {} could not be restarted: {err}", child.describe())),
        }
    }

    fn give_up(&self, myself: &ActorRef<SupervisorMsg>, reason: String) {
        tracing::error!(node_id = self.shared.node_id(), "the cluster transport is stopping: {reason}");
        self.shared.set_failure(reason.clone());
        self.shared.set_stopping();
        myself.stop(Some(reason));
    }
}

impl Actor for TransportSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = TcpListener;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        listener: TcpListener,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut children = HashMap::new();
        // The endpoint first, so the first session already advertises it; the links
        // before the listener, so no session event is missed.
        for child in [Child::RaftEndpoint, Child::NodeServer, Child::Links] {
            let cell = self.spawn_child(&myself, child).await?;
            children.insert(cell.get_id(), (child, cell));
        }
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&self.shared)));
        let abort = accept.abort_handle();
        let supervisor = myself.clone();
        let accept_watcher = tokio::spawn(async move {
            if let Err(err) = accept.await
                && err.is_panic()
            {
                let _ = supervisor.cast(SupervisorMsg::ListenerDied(err.to_string()));
            }
        });
        Ok(SupervisorState { children, restarts: HashMap::new(), accept: abort, accept_watcher: Some(accept_watcher) })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        _state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::ListenerDied(reason) => {
                self.give_up(&myself, format!("its cluster listener died: {reason}"));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                self.child_exited(&myself, state, &cell, &format!("failed: {err}")).await;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let how = format!("stopped unasked ({})", reason.as_deref().unwrap_or("no reason given"));
                self.child_exited(&myself, state, &cell, &how).await;
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        self.shared.set_stopping();
        // Close the listener first (and wait, so the port is free when shutdown returns),
        // then the sessions, then the endpoint.
        state.accept.abort();
        if let Some(watcher) = state.accept_watcher.take() {
            let _ = watcher.await;
        }
        self.shared.set_links(None);
        self.shared.set_node_server(None);
        for wanted in [Child::Links, Child::NodeServer, Child::RaftEndpoint] {
            for (child, cell) in state.children.values() {
                if *child == wanted {
                    let _ = cell.stop_and_wait(None, Some(STOP_BOUND)).await;
                }
            }
        }
        Ok(())
    }
}

/// Accepts cluster connections and hands them to the current node server, as
/// ractor_cluster's own listener would.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer_addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %err, "cannot accept a cluster connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let local_addr = match stream.set_nodelay(true).and_then(|()| stream.local_addr()) {
            Ok(local_addr) => local_addr,
            Err(err) => {
                tracing::warn!(error = %err, %peer_addr, "dropping a cluster connection");
                continue;
            }
        };
        let Some(node_server) = shared.node_server() else {
            tracing::debug!(%peer_addr, "no node server is running; dropping a cluster connection");
            continue;
        };
        let stream = Box::new(NetworkStream::Raw { peer_addr, local_addr, stream });
        if node_server.cast(NodeServerMessage::ConnectionOpened { stream, is_server: true }).is_err() {
            tracing::debug!(%peer_addr, "the node server is stopping; dropping a cluster connection");
        }
    }
}
