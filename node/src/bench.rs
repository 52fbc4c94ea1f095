//! `maas bench raft`: a 3-node raft cluster in this process, fsync on, each node's log in
//! its own directory, measuring committed proposals/s with 1 and 64 concurrent proposers,
//! commit latency p50/p99, and leader failover (stop the leader → first accepted write).
//! `--network loopback` connects the nodes through the real cluster transport
//! (ractor_cluster over TCP on 127.0.0.1); `--network local` through the in-process
//! network, which measures the raft driver and storage alone.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use maas_actors::transport::{ClusterConfig, ClusterTransport};
use maas_consensus::local::LocalNetwork;
use maas_consensus::reconcile::{ReconcileSettings, reconcile};
use maas_consensus::state::{
    ClusterState, Command, DeploymentId, DeploymentSpec, GpuRecord, NodeId, NodeResources, NodeSpec, PlacementStrategy,
    ReplicaRequest, sch1_holds,
};
use maas_consensus::storage::DiskStorage;
use maas_consensus::{ConsensusError, DriverConfig, RaftHandle, RaftStatus, StateMachine, Transport};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Network {
    /// ractor_cluster over TCP on 127.0.0.1, as between machines.
    Loopback,
    /// The in-process network: the driver and the storage alone.
    Local,
}

#[derive(Debug, clap::Args)]
pub struct RaftBench {
    /// Seconds of load for each proposer count.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Where the three raft logs go (default: a temporary directory, removed after).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Network::Loopback)]
    network: Network,
    /// The raft tick in milliseconds (elections take 10 to 20 ticks).
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
}

/// The benchmark's state machine: a sum of the committed commands.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Counter {
    total: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl StateMachine for Counter {
    type Command = u64;
    type Response = u64;
    type Rejection = Never;

    fn apply(&mut self, _index: u64, command: u64) -> Result<u64, Never> {
        self.total += command;
        Ok(self.total)
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the counter serialises")
    }

    fn restore(&mut self, snapshot: &[u8]) -> maas_consensus::Result<()> {
        *self = serde_json::from_slice(snapshot)
            .map_err(|e| ConsensusError::Codec { what: "counter snapshot", reason: e.to_string() })?;
        Ok(())
    }
}

struct Member<S: StateMachine> {
    handle: RaftHandle<S>,
    transport: Option<ClusterTransport>,
}

/// Three raft members in this process, each with its own log directory, starting from
/// `S::default()`.
struct BenchCluster<S: StateMachine> {
    members: BTreeMap<u64, Member<S>>,
    local: Option<Arc<LocalNetwork<S>>>,
}

impl<S: StateMachine + Default> BenchCluster<S> {
    async fn start(root: &std::path::Path, network: Network, tick: Duration) -> Result<Self> {
        let voters = vec![1, 2, 3];
        let mut members = BTreeMap::new();
        let local = matches!(network, Network::Local).then(LocalNetwork::new);
        let mut transports = BTreeMap::new();
        if matches!(network, Network::Loopback) {
            for id in &voters {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let transport = ClusterTransport::start(listener, ClusterConfig::new(*id, "maas-bench-cookie")).await?;
                transports.insert(*id, transport);
            }
            for transport in transports.values() {
                for (peer, other) in &transports {
                    if *peer != transport.node_id() {
                        transport.set_peer(*peer, other.local_addr().to_string(), format!("bench-node-{peer}"));
                    }
                }
            }
        }
        for id in &voters {
            let storage = DiskStorage::open(&root.join(format!("node-{id}")))?;
            let config = DriverConfig { tick, bootstrap_voters: Some(voters.clone()), ..DriverConfig::new(*id) };
            let transport: Arc<dyn Transport> = match (&local, transports.get(id)) {
                (Some(network), _) => network.transport(*id),
                (None, Some(transport)) => Arc::new(transport.clone()),
                (None, None) => unreachable!("every member has a transport"),
            };
            let handle = maas_consensus::driver::start(&config, storage, S::default(), transport)?;
            if let Some(network) = &local {
                network.attach(*id, handle.clone());
            }
            if let Some(transport) = transports.get(id) {
                transport.attach(Arc::new(handle.clone()));
            }
            members.insert(*id, Member { handle, transport: transports.get(id).cloned() });
        }
        Ok(BenchCluster { members, local })
    }

    async fn leader(&self) -> u64 {
        loop {
            let leaders: Vec<u64> =
                self.members.values().map(|m| m.handle.status()).filter(RaftStatus::is_leader).map(|s| s.id).collect();
            if let [leader] = leaders.as_slice() {
                return *leader;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn stop_member(&mut self, id: u64) {
        if let Some(network) = &self.local {
            network.detach(id);
        }
        if let Some(member) = self.members.remove(&id) {
            let handle = member.handle.clone();
            tokio::task::spawn_blocking(move || handle.stop()).await.ok();
            if let Some(transport) = member.transport {
                transport.shutdown().await;
            }
        }
    }
}

/// Proposes from `proposers` concurrent tasks for `duration`; returns committed/s, p50, p99.
async fn load(leader: &RaftHandle<Counter>, proposers: usize, duration: Duration) -> (f64, Duration, Duration) {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..proposers {
        let leader = leader.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                if matches!(leader.propose(1).await, Ok(Ok(_))) {
                    latencies.push(started.elapsed());
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap_or_default());
    }
    latencies.sort();
    if latencies.is_empty() {
        return (0.0, Duration::ZERO, Duration::ZERO);
    }
    let committed = f64::from(u32::try_from(latencies.len()).unwrap_or(u32::MAX));
    (committed / duration.as_secs_f64(), latencies[latencies.len() / 2], latencies[latencies.len() * 99 / 100])
}

pub async fn raft(args: &RaftBench) -> Result<String> {
    let temporary = std::env::temp_dir().join(format!("maas-bench-{}", std::process::id()));
    let root = args.dir.clone().unwrap_or_else(|| temporary.clone());
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let tick = Duration::from_millis(args.tick_ms.max(1));
    let mut cluster = BenchCluster::<Counter>::start(&root, args.network, tick).await?;
    let mut report = format!(
        "3-node raft cluster, {} network, fsync on, {} ms ticks, logs under {}\n",
        match args.network {
            Network::Loopback => "ractor_cluster over TCP loopback",
            Network::Local => "in-process",
        },
        args.tick_ms,
        root.display()
    );
    let leader = cluster.leader().await;
    for proposers in [1, 64] {
        let (per_second, p50, p99) =
            load(&cluster.members[&leader].handle, proposers, Duration::from_secs(args.seconds)).await;
        let line = format!(
            "{proposers:>3} proposers: {per_second:>9.0} committed proposals/s, commit latency p50 {p50:.2?} p99 {p99:.2?}\n"
        );
        eprint!("{line}");
        report.push_str(&line);
    }
    let leader = cluster.leader().await;
    let stopped = Instant::now();
    cluster.stop_member(leader).await;
    'accepted: loop {
        for member in cluster.members.values() {
            if member.handle.status().is_leader() && matches!(member.handle.propose(1).await, Ok(Ok(_))) {
                break 'accepted;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = writeln!(report, "leader failover (stop the leader → first accepted write): {:.2?}", stopped.elapsed());
    let ids: Vec<u64> = cluster.members.keys().copied().collect();
    for id in ids {
        cluster.stop_member(id).await;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&temporary);
    }
    Ok(report)
}

#[derive(Debug, clap::Args)]
pub struct PlacementsBench {
    #[arg(long, default_value_t = 1000)]
    nodes: u64,
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
    #[arg(long, default_value_t = 10_000)]
    replicas: u32,
    /// Concurrent proposers of the placements.
    #[arg(long, default_value_t = 64)]
    proposers: usize,
    /// Where the three raft logs go (default: a temporary directory, removed after).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Network::Loopback)]
    network: Network,
}

/// Proposes `commands` from `proposers` tasks, each a slice; returns how many committed.
async fn propose_all(leader: &RaftHandle<ClusterState>, commands: Vec<Command>, proposers: usize) -> usize {
    let chunk = commands.len().div_ceil(proposers.max(1)).max(1);
    let mut tasks = Vec::new();
    for part in commands.chunks(chunk) {
        let (leader, part) = (leader.clone(), part.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut committed = 0;
            for command in part {
                if matches!(leader.propose(command).await, Ok(Ok(_))) {
                    committed += 1;
                }
            }
            committed
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap_or(0);
    }
    committed
}

/// `maas bench placements`: the leader's reconcile path end to end on a 3-node cluster
/// with fsync: `nodes` nodes with `gpus_per_node` simulated 80 GiB GPUs registered, then
/// deployments totalling `replicas` replicas; one reconcile round plans every placement
/// (timed), and the placements are proposed and committed through raft (timed).
pub async fn placements(args: &PlacementsBench) -> Result<String> {
    let temporary = std::env::temp_dir().join(format!("maas-bench-placements-{}", std::process::id()));
    let root = args.dir.clone().unwrap_or_else(|| temporary.clone());
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let cluster = BenchCluster::<ClusterState>::start(&root, args.network, Duration::from_millis(100)).await?;
    let leader = cluster.members[&cluster.leader().await].handle.clone();

    let gpus: Vec<GpuRecord> = (0..args.gpus_per_node)
        .map(|index| GpuRecord { index, model: "H100".into(), memory_total_mib: 81920, simulated: true })
        .collect();
    let registrations: Vec<Command> = (1..=args.nodes)
        .map(|id| Command::RegisterNode {
            node: NodeSpec {
                id: NodeId(id),
                name: format!("bench-{id}"),
                api_addr: format!("http://10.0.{}.{}:8080", id / 256, id % 256),
                cluster_addr: format!("10.0.{}.{}:7070", id / 256, id % 256),
                labels: BTreeMap::from([("zone".to_owned(), format!("z{}", id % 4))]),
                resources: NodeResources { cpu_cores: 64, memory_mib: 1 << 20, gpus: gpus.clone() },
            },
            at_ms: 1,
        })
        .collect();
    let registered = propose_all(&leader, registrations, args.proposers).await;
    // Deployments of 100 replicas each, 1 GPU and 18 GiB per replica (four per GPU).
    let deployments: Vec<Command> = (0..args.replicas.div_ceil(100))
        .map(|n| Command::PutDeployment {
            deployment_id: DeploymentId(format!("model-{n}")),
            spec: DeploymentSpec {
                serving: None,
                model_name: format!("model-{n}"),
                model_version: "1".into(),
                model_path: None,
                request: ReplicaRequest { gpus_per_replica: 1, memory_per_gpu_mib: 18432, cpu_fallback_allowed: false },
                strategy: if n % 2 == 0 { PlacementStrategy::Binpack } else { PlacementStrategy::Spread },
                node_selector: BTreeMap::new(),
                priority: 0,
                allow_preemption: false,
                owner: None,
                tenant_model: false,
            },
            replicas: (args.replicas - n * 100).min(100),
            at_ms: 2,
        })
        .collect();
    propose_all(&leader, deployments, args.proposers).await;

    let settings = ReconcileSettings { gpu_reserve_mib: 1024 };
    let planned = Instant::now();
    let round = leader.read_local(|state| reconcile(state, &settings, 3));
    let plan_time = planned.elapsed();
    let placements = round.commands.len();
    let proposed = Instant::now();
    let committed = propose_all(&leader, round.commands, args.proposers).await;
    let commit_time = proposed.elapsed();
    let (replicas, sch1) = leader.read_local(|state| (state.replicas().len(), sch1_holds(state)));
    let again = leader.read_local(|state| reconcile(state, &settings, 4)).commands.len();

    let mut report = format!(
        "3-node raft cluster ({}), fsync on; {registered} nodes x {} simulated GPUs registered; {} replicas wanted\n",
        match args.network {
            Network::Loopback => "ractor_cluster over TCP loopback",
            Network::Local => "in-process",
        },
        args.gpus_per_node,
        args.replicas
    );
    let _ = writeln!(
        report,
        "reconcile round (scheduler plan + commands): {placements} placements in {plan_time:.2?} = {:.0} placements/s",
        f64::from(u32::try_from(placements).unwrap_or(u32::MAX)) / plan_time.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "through raft with {} proposers: {committed} placements committed in {commit_time:.2?} = {:.0} committed placements/s",
        args.proposers,
        f64::from(u32::try_from(committed).unwrap_or(u32::MAX)) / commit_time.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "after: {replicas} replicas in the state, SCH-1 {}, a second round proposes {again} commands",
        if sch1 { "holds" } else { "BROKEN" }
    );
    let ids: Vec<u64> = cluster.members.keys().copied().collect();
    let mut cluster = cluster;
    for id in ids {
        cluster.stop_member(id).await;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&temporary);
    }
    Ok(report)
}
