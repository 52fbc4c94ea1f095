//! Raft over the cluster transport: several nodes in one process, each with its own
//! ractor_cluster node server on a loopback port, its own raft driver and disk storage.
//!
//! ractor's actor registry is per process, so each test uses its own node ids (the raft
//! endpoint of node N is registered as `maas.raft.N`). Waits poll a condition under a
//! deadline; nothing sleeps for a fixed time to let something happen.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use maas_actors::transport::raft_actor_name;
use maas_actors::{ClusterConfig, ClusterTransport, PeerState};
use maas_consensus::storage::DiskStorage;
use maas_consensus::{ConsensusError, DriverConfig, RaftHandle, RaftSettings, StateMachine, Transport};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

// ---- a test state machine (consensus/tests/common's Journal, with ballast) ----

/// Records every applied command with its index, in order. `ballast` is carried in
/// every snapshot, to make snapshots as large as a test needs.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Journal {
    applied: Vec<(u64, u64)>,
    ballast: String,
}

#[derive(Debug, thiserror::Error)]
#[error("command {0} is refused by the journal")]
struct Refused(u64);

impl StateMachine for Journal {
    type Command = u64;
    type Response = u64;
    type Rejection = Refused;

    fn apply(&mut self, index: u64, command: u64) -> Result<u64, Refused> {
        self.applied.push((index, command));
        Ok(index)
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("journal serialises")
    }

    fn restore(&mut self, snapshot: &[u8]) -> maas_consensus::Result<()> {
        *self = serde_json::from_slice(snapshot)
            .map_err(|e| ConsensusError::Codec { what: "journal snapshot", reason: e.to_string() })?;
        Ok(())
    }
}

impl Journal {
    fn commands(&self) -> BTreeSet<u64> {
        self.applied.iter().map(|(_, command)| *command).collect()
    }
}

// ---- captured logs ----

/// Every log line of the process, kept for assertions and echoed to stderr (which the
/// test harness shows for failing tests).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn,maas_actors=info"))
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&writer)))
            .try_init();
        buffer
    }))
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        eprint!("{}", String::from_utf8_lossy(bytes));
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_containing(needles: &[&str]) -> Vec<String> {
    let logs = logs();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    text.lines().filter(|line| needles.iter().all(|n| line.contains(n))).map(str::to_owned).collect()
}

// ---- a cluster of nodes in this process ----

const WAIT: Duration = Duration::from_secs(15);

fn api_addr(id: u64) -> String {
    format!("10.0.0.{id}:8080")
}

struct Node {
    transport: ClusterTransport,
    handle: RaftHandle<Journal>,
}

struct Cluster {
    root: tempfile::TempDir,
    settings: RaftSettings,
    ballast_bytes: usize,
    /// Every member's cluster address, kept across restarts.
    addrs: BTreeMap<u64, SocketAddr>,
    cookies: BTreeMap<u64, String>,
    /// Overrides the transports' frame limit.
    max_frame_bytes: Option<u64>,
    nodes: BTreeMap<u64, Node>,
}

impl Cluster {
    fn new(settings: RaftSettings, ballast_bytes: usize) -> Self {
        logs();
        Cluster {
            root: tempfile::tempdir().unwrap(),
            settings,
            ballast_bytes,
            addrs: BTreeMap::new(),
            cookies: BTreeMap::new(),
            max_frame_bytes: None,
            nodes: BTreeMap::new(),
        }
    }

    /// Starts `ids` as a fresh cluster bootstrapped with all of them as voters.
    async fn start(ids: &[u64], cookie_of: impl Fn(u64) -> &'static str) -> Self {
        let mut cluster = Cluster::new(RaftSettings::default(), 0);
        cluster.start_members(ids, cookie_of).await;
        cluster
    }

    async fn start_members(&mut self, ids: &[u64], cookie_of: impl Fn(u64) -> &'static str) {
        let mut listeners = Vec::new();
        for id in ids {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            self.addrs.insert(*id, listener.local_addr().unwrap());
            self.cookies.insert(*id, cookie_of(*id).to_owned());
            listeners.push((*id, listener));
        }
        for (id, listener) in listeners {
            self.start_node(id, listener, Some(ids.to_vec())).await;
        }
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    async fn start_node(&mut self, id: u64, listener: TcpListener, bootstrap: Option<Vec<u64>>) {
        let mut transport_config = ClusterConfig::new(id, self.cookies[&id].clone());
        transport_config.max_frame_bytes = self.max_frame_bytes.unwrap_or(transport_config.max_frame_bytes);
        let transport = ClusterTransport::start(listener, transport_config).await.unwrap();
        for (peer, addr) in &self.addrs {
            transport.set_peer(*peer, addr.to_string(), api_addr(*peer));
        }
        let config = DriverConfig {
            tick: Duration::from_millis(10),
            // Differs between runs of a node, as the proposals' identity requires.
            settings: RaftSettings { incarnation: incarnation(), ..self.settings.clone() },
            bootstrap_voters: bootstrap,
            request_timeout: Duration::from_secs(5),
            ..DriverConfig::new(id)
        };
        let storage = DiskStorage::open(&self.dir(id)).unwrap();
        let journal = Journal { applied: Vec::new(), ballast: "x".repeat(self.ballast_bytes) };
        let handle = maas_consensus::driver::start(&config, storage, journal, Arc::new(transport.clone())).unwrap();
        transport.attach(Arc::new(handle.clone()));
        self.nodes.insert(id, Node { transport, handle });
    }

    /// Adds a new, empty member's address to every running node (and theirs to it).
    async fn start_new_member(&mut self, id: u64, cookie: &str) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for node in self.nodes.values() {
            node.transport.set_peer(id, addr.to_string(), api_addr(id));
        }
        self.addrs.insert(id, addr);
        self.cookies.insert(id, cookie.to_owned());
        self.start_node(id, listener, None).await;
    }

    async fn stop_node(&mut self, id: u64) {
        let node = self.nodes.remove(&id).expect("a running node");
        node.handle.stop();
        node.transport.shutdown().await;
    }

    /// Starts a stopped node again from its disk, on the same cluster address.
    async fn restart_node(&mut self, id: u64) {
        let listener = TcpListener::bind(self.addrs[&id]).await.unwrap();
        self.start_node(id, listener, None).await;
    }

    async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    fn handles(&self, ids: &[u64]) -> Vec<RaftHandle<Journal>> {
        ids.iter().map(|id| self.node(*id).handle.clone()).collect()
    }

    /// Waits until `ids` agree on one leader among them, and returns it.
    async fn leader_among(&self, ids: &[u64]) -> u64 {
        wait_for("a single leader", || {
            let statuses: Vec<_> = ids.iter().map(|id| self.node(*id).handle.status()).collect();
            let leaders: Vec<u64> = statuses.iter().filter(|s| s.role == "Leader").map(|s| s.id).collect();
            match leaders.as_slice() {
                [leader] if statuses.iter().filter(|s| s.leader_id == *leader).count() * 2 > statuses.len() => {
                    Some(*leader)
                }
                _ => None,
            }
        })
        .await
    }

    async fn leader(&self) -> u64 {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        self.leader_among(&ids).await
    }

    /// Waits until `id` sees every other listed node in `state`.
    async fn wait_peer_states(&self, id: u64, peers: &[u64], state: PeerState) {
        wait_for(&format!("node {id} sees {peers:?} {state}"), || {
            let states = self.node(id).transport.peer_states();
            peers.iter().all(|peer| states.get(peer) == Some(&state)).then_some(())
        })
        .await;
    }

    /// Proposes every command at once through whichever of `ids` leads, retrying across
    /// leader changes; returns the index each was acknowledged at.
    async fn write_all(&self, ids: &[u64], commands: impl IntoIterator<Item = u64>) -> BTreeMap<u64, u64> {
        let mut tasks = tokio::task::JoinSet::new();
        for command in commands {
            let handles = self.handles(ids);
            tasks.spawn(async move { (command, propose(&handles, command).await) });
        }
        let mut acknowledged = BTreeMap::new();
        while let Some(result) = tasks.join_next().await {
            let (command, index) = result.unwrap();
            acknowledged.insert(command, index);
        }
        acknowledged
    }

    /// Adds `id` as a voter through whichever of `ids` leads; returns the voters.
    async fn add_voter(&self, ids: &[u64], id: u64) -> Vec<u64> {
        // Writing multi-megabyte snapshots with fsync can stall a raft thread past the
        // 100 ms election timeout, so the change may be dropped by an election: retry.
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = self.leader_among(ids).await;
            match self.node(leader).handle.add_voter(id).await {
                Ok(conf) => return conf.voters,
                Err(
                    ConsensusError::NotLeader { .. }
                    | ConsensusError::Dropped
                    | ConsensusError::LeaderChanged
                    | ConsensusError::Timeout(_),
                ) => {
                    let status = self.node(self.leader_among(ids).await).handle.status();
                    if status.voters.contains(&id) {
                        return status.voters;
                    }
                }
                Err(other) => panic!("adding node {id}: {other}"),
            }
            assert!(Instant::now() < deadline, "node {id} was not added");
        }
    }

    /// Waits until node `id` has applied every command in `commands`.
    async fn wait_applied(&self, id: u64, commands: &BTreeMap<u64, u64>) {
        let handle = &self.node(id).handle;
        wait_for(&format!("node {id} applies {} commands", commands.len()), || {
            handle.read_local(|journal| {
                let applied: BTreeMap<u64, u64> =
                    journal.applied.iter().map(|(index, command)| (*command, *index)).collect();
                commands.iter().all(|(command, index)| applied.get(command) == Some(index)).then_some(())
            })
        })
        .await;
    }
}

async fn propose(handles: &[RaftHandle<Journal>], command: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let leader = handles.iter().find(|h| h.status().role == "Leader");
        if let Some(leader) = leader {
            match leader.propose(command).await {
                Ok(Ok(index)) => return index,
                Ok(Err(refused)) => panic!("{refused}"),
                Err(
                    ConsensusError::NotLeader { .. }
                    | ConsensusError::Dropped
                    | ConsensusError::LeaderChanged
                    | ConsensusError::Timeout(_),
                ) => {}
                Err(other) => panic!("proposing {command}: {other}"),
            }
        }
        assert!(Instant::now() < deadline, "command {command} was not committed within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn incarnation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    u64::try_from(nanos).unwrap_or(u64::MAX) ^ NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Polls `check` until it returns a value, failing after [`WAIT`].
async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_commit_over_the_network_and_a_restarted_follower_catches_up() {
    let ids = [1, 2, 3];
    let mut cluster = Cluster::start(&ids, |_| "secret").await;
    for id in ids {
        let others: Vec<u64> = ids.iter().copied().filter(|p| *p != id).collect();
        cluster.wait_peer_states(id, &others, PeerState::Connected).await;
    }
    let leader = cluster.leader().await;

    let started = Instant::now();
    let acknowledged = cluster.write_all(&ids, 1..=200).await;
    eprintln!("200 proposals committed in {:?}", started.elapsed());
    assert_eq!(acknowledged.len(), 200);
    let mut journals = Vec::new();
    for id in ids {
        let journal = cluster.node(id).handle.read(Clone::clone).await.unwrap();
        assert_eq!(journal.commands(), (1..=200).collect(), "node {id} applied every write");
        journals.push(journal);
    }
    assert!(journals.windows(2).all(|pair| pair[0] == pair[1]), "every node applied the same log");
    let stats = cluster.node(leader).transport.stats();
    assert!(stats.messages_sent > 0 && stats.batches_sent > 0 && stats.messages_received > 0, "{stats:?}");

    // A follower stops (raft node and transport): the other two go on committing.
    let follower = *ids.iter().find(|id| **id != leader).unwrap();
    let survivors: Vec<u64> = ids.iter().copied().filter(|id| *id != follower).collect();
    cluster.stop_node(follower).await;
    for id in &survivors {
        wait_for(&format!("node {id} notices node {follower} is gone"), || {
            (cluster.node(*id).transport.peer_states()[&follower] != PeerState::Connected).then_some(())
        })
        .await;
    }
    let more = cluster.write_all(&survivors, 201..=250).await;
    assert_eq!(more.len(), 50);

    // It comes back on the same address, reconnects, and catches up.
    cluster.restart_node(follower).await;
    for id in ids {
        let others: Vec<u64> = ids.iter().copied().filter(|p| *p != id).collect();
        cluster.wait_peer_states(id, &others, PeerState::Connected).await;
    }
    let mut all = acknowledged;
    all.extend(more);
    cluster.wait_applied(follower, &all).await;
    let last = cluster.write_all(&ids, 251..=260).await;
    let journal = cluster.node(follower).handle.read(Clone::clone).await.unwrap();
    assert_eq!(journal.commands(), (1..=260).collect());
    assert_eq!(journal, cluster.node(cluster.leader().await).handle.read(Clone::clone).await.unwrap());
    assert_eq!(last.len(), 10);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_api_addresses_come_from_the_address_book_and_followers_forward_proposals() {
    let ids = [11, 12, 13];
    let cluster = Cluster::start(&ids, |_| "secret").await;
    for id in ids {
        let transport = &cluster.node(id).transport;
        for peer in ids.iter().filter(|p| **p != id) {
            assert_eq!(transport.peer_address(*peer), Some(api_addr(*peer)), "what the driver puts in NotLeader");
        }
        assert_eq!(transport.peer_address(99), None, "an unknown member has no address");
    }

    // A follower's proposal travels to the leader as a forwarded raft message, and its
    // answer comes back once the entry is applied on the follower.
    let leader = cluster.leader().await;
    let follower = *ids.iter().find(|id| **id != leader).unwrap();
    let index = cluster.node(follower).handle.propose(7).await.unwrap().unwrap();
    let journal = cluster.node(leader).handle.read(Clone::clone).await.unwrap();
    assert!(journal.applied.contains(&(index, 7)), "the leader applied the forwarded proposal at {index}");

    // A peer taken out of the address book has no address and no state.
    let transport = &cluster.node(follower).transport;
    transport.remove_peer(leader);
    assert_eq!(transport.peer_address(leader), None);
    assert!(!transport.peer_states().contains_key(&leader));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cookie_is_refused_and_reported() {
    let ids = [21, 22, 23];
    let started = Instant::now();
    let cluster = Cluster::start(&ids, |id| if id == 23 { "another secret" } else { "secret" }).await;
    let odd_addr = cluster.addrs[&23].to_string();

    // Both sides say so as soon as the challenge fails, well within the 3 s handshake bound.
    let bound = ClusterConfig::new(1, "x").handshake_timeout + Duration::from_secs(2);
    for (id, peers) in [(21, vec![23]), (22, vec![23]), (23, vec![21, 22])] {
        cluster.wait_peer_states(id, &peers, PeerState::CookieMismatch).await;
    }
    let reported_after = started.elapsed();
    eprintln!("cookie mismatch reported after {reported_after:?}");
    assert!(reported_after < bound, "reported after {reported_after:?}, over the bound {bound:?}");
    cluster.wait_peer_states(21, &[22], PeerState::Connected).await;
    let lines = log_lines_containing(&["ERROR", "the cluster cookies differ", "node 23", &odd_addr]);
    assert!(!lines.is_empty(), "an error names node 23 at {odd_addr} and the cookie");

    // The two that agree make a quorum; nothing reaches or leaves the third.
    let leader = cluster.leader_among(&[21, 22]).await;
    assert_ne!(leader, 23);
    let acknowledged = cluster.write_all(&[21, 22], 1..=10).await;
    assert_eq!(acknowledged.len(), 10);
    let odd = cluster.node(23);
    // Node 23 campaigns, but its messages never leave it.
    let stats = wait_for("node 23 tries to send", || {
        let stats = odd.transport.stats();
        (stats.messages_dropped > 0).then_some(stats)
    })
    .await;
    assert_eq!((stats.messages_received, stats.messages_sent), (0, 0), "{stats:?}");
    assert_eq!(odd.handle.status().leader_id, 0, "node 23 never heard from a leader");
    assert!(odd.handle.read_local(|journal| journal.applied.is_empty()));
    assert_eq!(cluster.node(21).transport.peer_states()[&23], PeerState::CookieMismatch, "and it stays refused");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_catches_up_by_a_multi_megabyte_snapshot() {
    const BALLAST_BYTES: usize = 6 * 1024 * 1024;
    let settings = RaftSettings { snapshot_interval_entries: 50, ..RaftSettings::default() };
    let mut cluster = Cluster::new(settings, BALLAST_BYTES);
    let ids = [31, 32, 33];
    cluster.start_members(&ids, |_| "secret").await;
    let acknowledged = cluster.write_all(&ids, 1..=120).await;
    wait_for("every node compacts its log", || {
        ids.iter().all(|id| cluster.node(*id).handle.status().snapshot_index > 0).then_some(())
    })
    .await;

    // An empty node joins; the entries it needs are compacted, so it gets a snapshot.
    cluster.start_new_member(34, "secret").await;
    cluster.wait_peer_states(34, &ids, PeerState::Connected).await;
    let started = Instant::now();
    let voters = cluster.add_voter(&ids, 34).await;
    assert_eq!(voters.iter().copied().collect::<BTreeSet<u64>>(), BTreeSet::from([31, 32, 33, 34]));
    cluster.wait_applied(34, &acknowledged).await;
    eprintln!("node 34 caught up in {:?}", started.elapsed());
    wait_for("node 34 reports the snapshot it installed", || {
        (cluster.node(34).handle.status().snapshot_index > 0).then_some(())
    })
    .await;

    let sent: u64 = ids.iter().map(|id| cluster.node(*id).transport.stats().snapshots_delivered).sum();
    let largest = ids.iter().map(|id| cluster.node(*id).transport.stats().largest_frame_bytes).max().unwrap();
    assert!(sent >= 1, "a snapshot went through the transport and was acknowledged");
    assert!(largest >= BALLAST_BYTES as u64, "the snapshot frame was {largest} bytes");

    // It is a full member now: it takes part in later writes.
    let all: Vec<u64> = cluster.nodes.keys().copied().collect();
    let later = cluster.write_all(&all, 121..=130).await;
    let journal = cluster.node(34).handle.read(Clone::clone).await.unwrap();
    assert!(later.keys().all(|command| journal.commands().contains(command)));
    assert_eq!(journal.commands(), (1..=130).collect());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_raft_endpoint_is_restarted_and_logged() {
    let ids = [41, 42, 43];
    let cluster = Cluster::start(&ids, |_| "secret").await;
    let leader = cluster.leader().await;
    let follower = *ids.iter().find(|id| **id != leader).unwrap();
    let before = cluster.write_all(&ids, 1..=5).await;
    cluster.wait_applied(follower, &before).await;

    let endpoint = local_endpoint(follower).expect("the endpoint is running");
    endpoint.kill();
    wait_for("a restarted endpoint", || local_endpoint(follower).filter(|cell| cell.get_id() != endpoint.get_id()))
        .await;
    let restarted =
        log_lines_containing(&["ERROR", "raft endpoint actor", "restarting it", &format!("node_id={follower}")]);
    assert!(!restarted.is_empty(), "the crash is logged");

    // Peers find the new endpoint and the follower keeps applying.
    let after = cluster.write_all(&ids, 6..=15).await;
    cluster.wait_applied(follower, &after).await;
    assert_eq!(cluster.node(follower).transport.failure(), None);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_over_the_frame_limit_is_refused_clearly_and_reported_to_raft() {
    const BALLAST_BYTES: usize = 2 * 1024 * 1024;
    let settings = RaftSettings { snapshot_interval_entries: 20, ..RaftSettings::default() };
    let mut cluster = Cluster::new(settings, BALLAST_BYTES);
    cluster.max_frame_bytes = Some(1024 * 1024);
    let ids = [51, 52, 53];
    cluster.start_members(&ids, |_| "secret").await;
    cluster.write_all(&ids, 1..=30).await;
    wait_for("every node compacts its log", || {
        ids.iter()
            .all(|id| {
                cluster.node(*id).transport.stats().messages_sent > 0
                    && cluster.node(*id).handle.status().snapshot_index > 0
            })
            .then_some(())
    })
    .await;
    cluster.start_new_member(54, "secret").await;
    cluster.wait_peer_states(54, &ids, PeerState::Connected).await;
    cluster.add_voter(&ids, 54).await;

    // Raft hears "not delivered" and tries again, so the refusals add up; each time the
    // sessions stay up (nothing oversized was put on the wire).
    wait_for("repeated snapshot refusals", || {
        let failed: u64 = ids.iter().map(|id| cluster.node(*id).transport.stats().snapshots_failed).sum();
        (failed >= 2).then_some(())
    })
    .await;
    let lines = log_lines_containing(&["ERROR", "a raft snapshot for node 54", "over the cluster frame limit"]);
    assert!(!lines.is_empty(), "the refusal is logged as an error");
    assert!(lines.len() <= 3, "at most once a minute per sending node: {lines:#?}");
    assert!(ids.iter().all(|id| cluster.node(*id).transport.peer_states()[&54] == PeerState::Connected));
    assert!(cluster.node(54).handle.read_local(|journal| journal.applied.is_empty()), "node 54 got no snapshot");

    // The three others still make a quorum of four.
    assert_eq!(cluster.write_all(&ids, 31..=35).await.len(), 5);
    cluster.shutdown().await;
}

/// A node's raft endpoint, found through ractor's pid registry. (Not through the name
/// registry: in ractor 0.16.5 a stopping `RemoteActor` unregisters its name, and in a
/// process holding several nodes that is the name of another node's local endpoint.)
fn local_endpoint(node_id: u64) -> Option<ractor::ActorCell> {
    let name = raft_actor_name(node_id);
    ractor::registry::get_all_pids()
        .into_iter()
        .find(|cell| cell.get_id().is_local() && cell.get_name().as_deref() == Some(name.as_str()))
}
