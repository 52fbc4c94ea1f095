//! Running a node: data directory, HTTP, store, signals, and an orderly stop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use maas_actors::node::{AgentConfig, AgentStatus, NodeAgent, ReplicaRuntime};
use maas_actors::transport::{ClusterConfig as TransportConfig, ClusterTransport};
use maas_consensus::RaftHandle;
use maas_consensus::control::{ControlPlane, ControlPlaneConfig};
use maas_consensus::liveness::LivenessSettings;
use maas_consensus::reconcile::ReconcileSettings;
use maas_consensus::state::{ClusterState, Command};
use maas_consensus::storage::DiskStorage;
use maas_gateway::routes::cluster::{COOKIE_HEADER, JoinReply};
use maas_gateway::{AppState, Check, GatewayOptions, HttpServer, ServeOptions, ShutdownOutcome, ShutdownTrigger};

use maas_consensus::state::{GpuRecord, NodeId, NodeResources, NodeSpec};
use maas_consensus::{DriverConfig, RaftSettings};
use maas_store::{BlobStore, Db, DbOptions};
use tokio::net::TcpListener;

use crate::config::Config;

pub async fn run_node(mut config: Config, quick_start: bool) -> Result<ExitCode> {
    std::fs::create_dir_all(&config.node.data_dir).with_context(|| {
        format!("cannot create the data directory {} (node.data_dir)", config.node.data_dir.display())
    })?;
    config.node.data_dir = config.node.data_dir.canonicalize().context("cannot resolve the data directory")?;
    let data_dir = config.node.data_dir.clone();
    let _lock = DataDirLock::acquire(&data_dir)?;

    // HTTP comes up first, so /healthz answers and /readyz says what the node waits for.
    let listener = TcpListener::bind(config.listen.api)
        .await
        .with_context(|| format!("cannot listen on {} (listen.api)", config.listen.api))?;
    let state = Arc::new(AppState::new(config.node.name.clone(), gateway_options(&config)));
    state.readiness.set("store", Check::Pending("migrating the database".into()));
    state.readiness.set("cluster", Check::Pending("starting the control plane".into()));
    let tls = if config.tls.cert_path.is_empty() {
        None
    } else {
        Some(maas_gateway::tls::server_config(Path::new(&config.tls.cert_path), Path::new(&config.tls.key_path))?)
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: config.gateway.max_body_bytes,
            max_upload_bytes: config.gateway.max_upload_bytes,
            drain_timeout: Duration::from_secs(config.gateway.drain_timeout_secs),
            tls,
            cors: maas_gateway::middleware::CorsPolicy::new(config.gateway.cors_allowed_origins.clone()),
        },
    );
    let api_addr = server.local_addr()?;
    log_outside_services(&config);
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(forward_stop_signals(trigger.clone()));
    let server = tokio::spawn(server.run(shutdown));

    let api_url = format!("{scheme}://{api_addr}");
    let started = async {
        let (db, blobs) = open_stores(&config).await.inspect_err(|err| {
            state.readiness.set("store", Check::Failed(format!("{err:#}")));
        })?;
        let stores_blobs = blobs.clone();
        let _ = state.stores.set(maas_gateway::state::Stores {
            db: db.clone(),
            blobs,
            data_dir: config.node.data_dir.clone(),
        });
        connect_limiter(&config, &state).await?;
        state.readiness.set("store", Check::Ready);
        start_workers(&config, &state);
        let cluster = start_cluster(&config, &data_dir, &api_url).await.inspect_err(|err| {
            state.readiness.set("cluster", Check::Failed(format!("{err:#}")));
        })?;
        let agent = start_agent(&config, &cluster, &state, &db, &stores_blobs).await?;
        let sessions = start_sessions(&config, &state, &db).await?;
        anyhow::Ok((db, cluster, agent, sessions))
    }
    .await;
    let (db, cluster, agent, sessions) = match started {
        Ok(parts) => parts,
        Err(err) => {
            // Stop serving at once: nothing is in flight that could finish.
            trigger.request();
            trigger.request();
            let _ = server.await;
            return Err(err);
        }
    };
    let _ = state.cluster.set(cluster.control.handle().clone());
    let _ = state.cluster_cookie.set(config.cluster.cookie.clone());
    let _ = state.gpu_reserve_mib.set(config.node.gpu_memory_reserve_mib);
    let transport = cluster.transport.clone();
    let _ = state.peer_health.set(Arc::new(move || {
        transport.peer_states().into_iter().map(|(id, peer)| (id, peer.name().to_owned())).collect()
    }));
    tokio::spawn(register(cluster.control.handle().clone(), cluster.node.clone(), Arc::clone(&state)));
    spawn_housekeeping(&state);
    if quick_start && let Some(stores) = state.stores.get().cloned() {
        tokio::spawn(deploy_tiny_model(cluster.control.handle().clone(), stores, data_dir.clone()));
    }
    print_banner(&config, &api_url, &data_dir, &cluster.node);

    let outcome = server.await.context("the HTTP server task failed")?;
    sessions.stop();
    agent.stop(None);
    cluster.stop().await;
    db.close().await;
    Ok(match outcome {
        ShutdownOutcome::Drained => {
            tracing::info!("stopped after draining every request");
            ExitCode::SUCCESS
        }
        ShutdownOutcome::DrainTimedOut { in_flight } => {
            tracing::warn!(in_flight, "stopped at the drain bound (gateway.drain_timeout_secs), cutting requests");
            ExitCode::SUCCESS
        }
        ShutdownOutcome::Forced { in_flight } => {
            tracing::warn!(in_flight, "stopped by a second signal, cutting requests");
            ExitCode::from(130)
        }
    })
}

/// The control plane and the transport it talks to its peers through.
struct Cluster {
    control: ControlPlane,
    transport: ClusterTransport,
    /// This node as it registers itself.
    node: NodeSpec,
}

/// Starts this node's raft control plane and its cluster transport: a new cluster of one,
/// a restart of a member (its raft log is on disk), or a join through `cluster.join`.
/// Then registers the node in the replicated cluster state.
async fn start_cluster(config: &Config, data_dir: &Path, api_url: &str) -> Result<Cluster> {
    check_node_identity(data_dir, config.node.id)?;
    let storage = DiskStorage::open(&data_dir.join("raft")).context("cannot open the raft log")?;
    let joining = !storage.is_initialized() && !config.cluster.join.is_empty();
    let sqlite = config.database.url.is_empty() || config.database.url.starts_with("sqlite:");
    let multi_node = joining || storage.conf_state().voters.len() > 1;
    if multi_node && sqlite {
        anyhow::bail!(
            "a cluster of more than one node keeps its tenant data in PostgreSQL, but database.url is SQLite: \
             set database.url = \"postgres://USER@HOST:PORT/DB\" on every node"
        );
    }
    if !storage.is_initialized() && !joining {
        tracing::info!("starting a new cluster with this node as its first member");
    }
    if multi_node && config.cluster.cookie == crate::config::DEFAULT_COOKIE {
        tracing::warn!("cluster.cookie is the default one: set a secret of your own on every node of this cluster");
    }
    let transport =
        ClusterTransport::bind(config.listen.cluster, TransportConfig::new(config.node.id, &config.cluster.cookie))
            .await
            .with_context(|| {
                format!("cannot start the cluster transport on {} (listen.cluster)", config.listen.cluster)
            })?;
    let node = NodeSpec {
        id: NodeId(config.node.id),
        name: config.node.name.clone(),
        api_addr: api_url.to_owned(),
        cluster_addr: transport.local_addr().to_string(),
        labels: config.node.labels.clone(),
        resources: local_resources(config),
    };
    let mut driver = DriverConfig::new(config.node.id);
    driver.tick = Duration::from_millis(config.cluster.raft_tick_ms);
    driver.settings = RaftSettings {
        election_ticks: usize::try_from(config.cluster.election_ticks)
            .context("cluster.election_ticks is too large")?,
        heartbeat_ticks: usize::try_from(config.cluster.heartbeat_ticks)
            .context("cluster.heartbeat_ticks is too large")?,
        snapshot_interval_entries: config.cluster.snapshot_interval_entries,
        ..RaftSettings::default()
    };
    let liveness = LivenessSettings {
        suspect_after_ms: config.cluster.suspect_after_ms,
        dead_after_ms: config.cluster.dead_after_ms,
        rejoin_stable_ms: config.cluster.rejoin_stable_ms,
        ..LivenessSettings::default()
    };
    let control = ControlPlane::start(
        ControlPlaneConfig {
            node: node.clone(),
            storage,
            driver,
            bootstrap_voters: (!joining).then(|| vec![config.node.id]),
            liveness,
            reconcile: ReconcileSettings { gpu_reserve_mib: config.node.gpu_memory_reserve_mib },
        },
        &(Arc::new(transport.clone()) as Arc<dyn maas_consensus::Transport>),
    )
    .context("cannot start the control plane")?;
    transport.attach(Arc::new(control.handle().clone()));
    let cluster = Cluster { control, transport, node: node.clone() };
    if joining && let Err(err) = join(&config.cluster.join, &config.cluster.cookie, &node, &cluster.transport).await {
        cluster.stop().await;
        return Err(err);
    }
    Ok(cluster)
}

/// Registers this node in the cluster state once a leader can commit it: at once on a
/// new cluster, or when enough members are back after a restart of the whole cluster.
/// Readiness says `pending` until then, and `failed` if the cluster refuses the node or
/// this node's raft stops on a failure (also later).
async fn register(handle: RaftHandle<ClusterState>, node: NodeSpec, state: Arc<AppState>) {
    for attempt in 0u64.. {
        if let Some(reason) = handle.status().failed {
            state.readiness.set("cluster", Check::Failed(reason));
            return;
        }
        let at_ms = u64::try_from(maas_store::ids::now_ms()).unwrap_or(0);
        match handle.propose(Command::RegisterNode { node: node.clone(), at_ms }).await {
            Ok(Ok(_)) => {
                state.readiness.set("cluster", Check::Ready);
                let status = handle.status();
                tracing::info!(node_id = node.id.0, term = status.term, leader = status.leader_id, voters = ?status.voters, "registered in the cluster");
                break;
            }
            Ok(Err(rejection)) => {
                tracing::error!(%rejection, "the cluster refused this node's registration");
                state.readiness.set("cluster", Check::Failed(format!("the cluster refused this node: {rejection}")));
                return;
            }
            Err(err) => {
                if attempt % 20 == 0 {
                    tracing::info!(error = %err, "waiting for a leader to register this node (a quorum of members must be up)");
                }
                state
                    .readiness
                    .set("cluster", Check::Pending(format!("waiting for a leader to register this node: {err}")));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    // Registered: from now on readiness follows the raft node's health.
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(reason) = handle.status().failed {
            state.readiness.set("cluster", Check::Failed(reason));
            return;
        }
    }
}

impl Cluster {
    async fn stop(self) {
        let Cluster { control, transport, .. } = self;
        tokio::task::spawn_blocking(move || control.stop()).await.ok();
        transport.shutdown().await;
    }
}

/// Asks a running member (trying each address in turn, through elections, for up to a
/// minute) to add this node, and learns where every member is.
async fn join(urls: &[String], cookie: &str, node: &NodeSpec, transport: &ClusterTransport) -> Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut last_error = String::new();
        for url in urls {
            let endpoint = format!("{}/v1/cluster/members", url.trim_end_matches('/'));
            match client.post(&endpoint).header(COOKIE_HEADER, cookie).json(node).send().await {
                Ok(response) if response.status().is_success() => {
                    let reply: JoinReply = response
                        .json()
                        .await
                        .with_context(|| format!("{endpoint} answered with an unexpected body"))?;
                    for member in reply.members.iter().filter(|m| m.id != node.id.0) {
                        transport.set_peer(member.id, member.cluster_addr.clone(), member.api_addr.clone());
                    }
                    tracing::info!(through = %url, voters = ?reply.voters, "joined the cluster");
                    return Ok(());
                }
                Ok(response) => {
                    let status = response.status();
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    let message = body["error"]["message"].as_str().unwrap_or("no message").to_owned();
                    if status == reqwest::StatusCode::FORBIDDEN
                        || status == reqwest::StatusCode::CONFLICT
                        || status == reqwest::StatusCode::BAD_REQUEST
                    {
                        anyhow::bail!("{url} refused to add this node ({status}): {message}");
                    }
                    last_error = format!("{url} answered {status}: {message}");
                }
                Err(err) => last_error = format!("cannot reach {url}: {err}"),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("could not join the cluster through {}: {last_error}", urls.join(", "));
        }
        tracing::info!(%last_error, "joining: retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The machine's CPUs and memory, its GPUs (from the NVIDIA driver, if any), and the
/// GPUs configured as simulated, numbered after the real ones.
fn local_resources(config: &Config) -> NodeResources {
    let cpu_cores = std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024);
    let discovery = maas_engine::gpu::discover();
    tracing::info!(gpus = %discovery.summary(), "GPU discovery");
    let mut gpus: Vec<GpuRecord> = discovery
        .gpus
        .iter()
        .map(|gpu| GpuRecord {
            index: gpu.index,
            model: gpu.name.clone(),
            memory_total_mib: gpu.memory_total_mib,
            simulated: false,
        })
        .collect();
    for simulated in &config.node.simulated_gpus {
        for _ in 0..simulated.count {
            let index = gpus.iter().map(|gpu| gpu.index + 1).max().unwrap_or(0);
            gpus.push(GpuRecord {
                index,
                model: simulated.model.clone(),
                memory_total_mib: simulated.memory_mib,
                simulated: true,
            });
        }
    }
    NodeResources { cpu_cores, memory_mib, gpus }
}

/// A data directory belongs to one node id for life: its raft log is that member's log.
/// The first start records the id; a later start with another `node.id` is refused.
fn check_node_identity(data_dir: &Path, node_id: u64) -> Result<()> {
    let path = data_dir.join("NODE_ID");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let recorded: u64 = text
                .trim()
                .parse()
                .with_context(|| format!("{} is damaged: it should hold a node id", path.display()))?;
            if recorded != node_id {
                anyhow::bail!(
                    "the data directory {} belongs to node {recorded}, but node.id is {node_id}: set node.id = {recorded}, or use another node.data_dir",
                    data_dir.display()
                );
            }
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let temporary = data_dir.join("NODE_ID.tmp");
            std::fs::write(&temporary, format!("{node_id}\n"))
                .with_context(|| format!("cannot write {}", temporary.display()))?;
            File::open(&temporary)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot sync {}", temporary.display()))?;
            std::fs::rename(&temporary, &path).with_context(|| format!("cannot write {}", path.display()))?;
            File::open(data_dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync {}", data_dir.display()))?;
            Ok(())
        }
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Starts the supervisor of this node's chat sessions (their actors hold conversations;
/// the gateway drives them).
async fn start_sessions(config: &Config, state: &AppState, db: &Db) -> Result<maas_actors::session::Sessions> {
    let idle_timeout = Duration::from_secs(config.gateway.session_idle_secs);
    let session_config = maas_actors::session::SessionConfig::new(config.node.id, idle_timeout);
    let sessions = maas_actors::session::Sessions::start(db.clone(), session_config).await?;
    let _ = state.sessions.set(sessions.clone());
    Ok(sessions)
}

/// Starts the node agent, which runs this node's GPU and replica actors.
async fn start_agent(
    config: &Config,
    cluster: &Cluster,
    state: &Arc<AppState>,
    db: &Db,
    blobs: &BlobStore,
) -> Result<ractor::ActorRef<maas_actors::node::AgentMsg>> {
    let handle = cluster.control.handle().clone();
    let own_id = config.node.id;
    let peers: maas_actors::models::PeerList = Arc::new(move || {
        handle.read_local(|state| {
            state
                .nodes()
                .values()
                .filter(|node| node.id.0 != own_id && node.status == maas_consensus::state::NodeStatus::Alive)
                .map(|node| node.api_addr.clone())
                .collect()
        })
    });
    let runtime = maas_actors::models::NodeRuntime {
        engine: maas_engine::EngineOptions { max_batch: 32, max_queue: 4096, ..maas_engine::EngineOptions::default() },
        cuda_gpus: if cfg!(feature = "cuda") {
            maas_engine::gpu::discover().gpus.iter().map(|gpu| gpu.index).collect()
        } else {
            Vec::new()
        },
        db: db.clone(),
        blobs: blobs.clone(),
        data_dir: config.node.data_dir.clone(),
        peers,
        cookie: config.cluster.cookie.clone(),
    };
    let agent_status = Arc::new(std::sync::RwLock::new(AgentStatus::default()));
    let mut agent_config = AgentConfig::new(config.node.id, config.node.gpu_memory_reserve_mib);
    agent_config.shard_root = Some(config.node.data_dir.join("knowledge").join("shards"));
    let serving = agent_config.serving.clone();
    let _ = state.journal.set(agent_config.journal.clone());
    let _ = state.kb_shards.set(agent_config.kb_shards.clone());
    let (agent, _) = ractor::Actor::spawn(
        None,
        NodeAgent,
        (
            agent_config,
            cluster.control.handle().clone(),
            Arc::clone(&agent_status),
            Arc::new(runtime) as Arc<dyn ReplicaRuntime>,
        ),
    )
    .await
    .context("cannot start the node agent")?;
    let _ = state.agent.set(agent_status);
    let _ = state.serving.set(serving);
    Ok(agent)
}

async fn open_stores(config: &Config) -> Result<(Db, BlobStore)> {
    let url = config.database_url();
    let mut options = DbOptions::new(url);
    options.max_connections = config.database.max_connections;
    let db = Db::connect(&options).await?;
    db.migrate().await?;
    tracing::info!(backend = db.backend().as_str(), migration = db.latest_migration(), "database ready");
    let blobs = BlobStore::open(config.node.data_dir.join("blobs")).await?;
    Ok((db, blobs))
}

/// SIGTERM or Ctrl-C: the first starts a graceful stop, the second ends it at once.
async fn forward_stop_signals(trigger: ShutdownTrigger) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot listen for stop signals");
        return;
    };
    loop {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        trigger.request();
        if trigger.requests() == 1 {
            tracing::info!(
                signal = name,
                "stopping: no new connections, finishing in-flight requests (signal again to stop at once)"
            );
        } else {
            tracing::warn!(signal = name, "stopping at once");
        }
    }
}

fn print_banner(config: &Config, base: &str, data_dir: &Path, node: &NodeSpec) {
    let database = if config.database.url.is_empty() {
        format!("SQLite {}", data_dir.join("maas.db").display())
    } else {
        maas_store::db::redact(&config.database.url)
    };
    let gpus = if node.resources.gpus.is_empty() {
        "none: CPU-only (no NVIDIA driver found, and no node.simulated_gpus)".to_owned()
    } else {
        let described: Vec<String> = node
            .resources
            .gpus
            .iter()
            .map(|g| format!("{} {}{}", g.index, g.model, if g.simulated { " (simulated)" } else { "" }))
            .collect();
        described.join(", ")
    };
    println!("maas {}: node `{}` (id {}) is up", env!("CARGO_PKG_VERSION"), config.node.name, config.node.id);
    println!("  console   {base}/");
    println!("  api       {base}  (every route: {base}/openapi.json)");
    println!("  health    {base}/healthz  {base}/readyz  {base}/metrics");
    println!("  cluster   {}  (maas cluster status; maas node list)", node.cluster_addr);
    println!("  gpus      {gpus}");
    println!("  data      {}  (database: {database}; blobs: {})", data_dir.display(), data_dir.join("blobs").display());
    println!("Stop with Ctrl-C (twice to stop at once).");
}

/// Says in the log which outside services the node uses, so an operator sees at start
/// what its settings put in force.
fn log_outside_services(config: &Config) {
    if !config.redis.url.is_empty() {
        tracing::info!("redis.url is set: quota counters and the response cache are kept in Redis");
    }
    if !config.milvus.url.is_empty() {
        tracing::info!(url = %config.milvus.url, "milvus.url is set: knowledge bases may keep their vectors in Milvus");
    }
}

/// An exclusive lock on the data directory, so two nodes never share one.
struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    fn acquire(data_dir: &Path) -> Result<Self> {
        let path: PathBuf = data_dir.join("LOCK");
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                anyhow::bail!(
                    "another maas process is using the data directory {}: stop it, or pick another node.data_dir",
                    data_dir.display()
                )
            }
            Err(std::fs::TryLockError::Error(err)) => {
                Err(err).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// The quick start's model: when the repository is empty, a tiny random-weight Llama is
/// written, imported as `tiny-llama` and deployed (one replica, on CPU) as `tiny-llama`.
/// Its answers are noise; it shows the whole path from a request to a replica working.
async fn deploy_tiny_model(
    handle: maas_consensus::RaftHandle<maas_consensus::state::ClusterState>,
    stores: maas_gateway::state::Stores,
    data_dir: PathBuf,
) {
    if let Err(err) = import_and_deploy_tiny(&handle, &stores, &data_dir).await {
        tracing::warn!(error = format!("{err:#}"), "cannot deploy the quick start's tiny model");
    }
}

async fn import_and_deploy_tiny(
    handle: &maas_consensus::RaftHandle<maas_consensus::state::ClusterState>,
    stores: &maas_gateway::state::Stores,
    data_dir: &Path,
) -> Result<()> {
    use maas_consensus::state::{Command, DeploymentId, DeploymentSpec, PlacementStrategy, ReplicaRequest};
    if !stores.db.models().list_platform().await?.is_empty() {
        return Ok(());
    }
    let dir = data_dir.join("tiny-llama");
    let shape = maas_engine::tiny::TinyShape::default();
    let written = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || maas_engine::tiny::write_llama(&dir, shape, 1)
    })
    .await??;
    let mut files = Vec::new();
    for name in written {
        let file = tokio::fs::File::open(dir.join(&name)).await?;
        let info = stores.blobs.put(file, None).await?;
        files.push(maas_store::repo::models::ModelFile {
            path: name,
            sha256: info.digest.to_hex(),
            size_bytes: info.size_bytes,
        });
    }
    let checked = maas_actors::models::check_model(dir.clone()).await.map_err(anyhow::Error::msg)?;
    let record = stores
        .db
        .models()
        .register_platform(maas_store::repo::models::NewModelVersion {
            name: "tiny-llama".into(),
            version: None,
            description: "a tiny random-weight Llama written by `maas up`: its output is noise".into(),
            metadata: maas_actors::models::metadata_of(&checked),
            files,
        })
        .await?;
    let spec = DeploymentSpec {
        serving: None,
        model_name: record.name.clone(),
        model_version: record.version.clone(),
        model_path: None,
        request: ReplicaRequest { gpus_per_replica: 0, memory_per_gpu_mib: 0, cpu_fallback_allowed: true },
        strategy: PlacementStrategy::Binpack,
        node_selector: std::collections::BTreeMap::new(),
        priority: 0,
        allow_preemption: false,
        owner: None,
        tenant_model: false,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let command = Command::PutDeployment {
            deployment_id: DeploymentId("tiny-llama".into()),
            spec: spec.clone(),
            replicas: 1,
            at_ms: u64::try_from(maas_store::ids::now_ms()).unwrap_or(0),
        };
        match handle.propose(command).await {
            Ok(Ok(_)) => break,
            Ok(Err(rejection)) => anyhow::bail!("the deployment was refused: {rejection}"),
            Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(err) => return Err(err.into()),
        }
    }
    tracing::info!("quick start: a tiny random-weight model is deployed as `tiny-llama` (its output is noise)");
    Ok(())
}

/// Quota counters in Redis when `redis.url` is set. Quotas must count the same on every
/// node: with Redis configured and not reachable, the node does not start rather than
/// count alone.
async fn connect_limiter(config: &Config, state: &AppState) -> Result<()> {
    if config.redis.url.is_empty() {
        return Ok(());
    }
    let limiter = maas_store::quota::Limiter::redis(&config.redis.url, "maas:quota:")
        .await
        .context("quota and rate-limit counters live in redis (redis.url)")
        .inspect_err(|err| state.readiness.set("store", Check::Failed(format!("{err:#}"))))?;
    let _ = state.limiter_backend.set(limiter);
    Ok(())
}

/// The background workers of batches, fine-tuning and knowledge-base ingestion. They start working
/// once the node is ready; the node id names this node in their leases, so a restarted
/// node takes its own work back at once.
fn start_workers(config: &Config, state: &Arc<AppState>) {
    maas_gateway::routes::batches::spawn_worker(Arc::clone(state), format!("node-{}", config.node.id));
    maas_gateway::routes::fine_tuning::spawn_trainer(Arc::clone(state), format!("node-{}", config.node.id));
    let knowledge = &config.knowledge;
    let options = maas_gateway::knowledge::KnowledgeOptions {
        default_backend: knowledge.default_backend.clone(),
        milvus_url: config.milvus.url.clone(),
        default_shards: u32::try_from(knowledge.default_shards).unwrap_or(2),
        default_embedding_model: knowledge.default_embedding_model.clone(),
        parse_limits: maas_knowledge::parse::ParseLimits {
            max_bytes: usize::try_from(knowledge.max_document_bytes).unwrap_or(usize::MAX),
            max_pages: usize::try_from(knowledge.max_pdf_pages).unwrap_or(usize::MAX),
            ..maas_knowledge::parse::ParseLimits::default()
        },
        lease_ms: i64::try_from(knowledge.lease_secs.saturating_mul(1000)).unwrap_or(30_000),
        embed_batch: usize::try_from(knowledge.embed_batch).unwrap_or(64),
    };
    let _ = state.knowledge.set(Arc::new(maas_gateway::knowledge::KnowledgeService::new(options)));
    maas_gateway::knowledge::shards::spawn_catch_up(Arc::clone(state));
    for worker in 0..knowledge.workers {
        maas_gateway::knowledge::ingest::spawn_worker(Arc::clone(state), format!("node-{}/{worker}", config.node.id));
    }
}

/// The node's periodic work: peers' load, storage samples, blob garbage collection.
fn spawn_housekeeping(state: &Arc<AppState>) {
    tokio::spawn(maas_gateway::load::poll_peers(Arc::clone(state)));
    tokio::spawn(maas_gateway::monitor::sample_loads(Arc::clone(state)));
    tokio::spawn(maas_gateway::metering::sample_storage(Arc::clone(state), Duration::from_secs(3600)));
    tokio::spawn(collect_blobs(Arc::clone(state)));
}

/// How long a blob nothing refers to is kept (a large import writes its blobs well before
/// the model version that refers to them).
const BLOB_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Removes this node's blobs that nothing refers to, hourly (`maas_store::gc`).
async fn collect_blobs(state: Arc<AppState>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(3600));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let Ok(stores) = state.stores() else { continue };
        match maas_store::gc::collect_garbage(&stores.db, &stores.blobs, BLOB_GRACE).await {
            Ok(report) if report.removed > 0 => {
                tracing::info!(removed = report.removed, bytes = report.removed_bytes, "blob garbage collected");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "blob garbage collection failed"),
        }
    }
}

/// The gateway's options from the node's configuration.
fn gateway_options(config: &Config) -> GatewayOptions {
    GatewayOptions {
        max_body_bytes: config.gateway.max_body_bytes,
        debug_routes: config.gateway.debug_routes,
        safety_rules: config.safety.rules.clone(),
        response_cache: maas_gateway::response_cache::ResponseCacheOptions {
            enabled: config.response_cache.enabled,
            max_entries: usize::try_from(config.response_cache.max_entries).unwrap_or(usize::MAX),
            ttl: Duration::from_secs(config.response_cache.ttl_secs),
            redis_url: config.redis.url.clone(),
        },
        max_upload_bytes: config.gateway.max_upload_bytes,
        auth: maas_gateway::state::AuthOptions {
            allow_signup: config.auth.allow_signup,
            require_verification: config.auth.require_verification,
            session_ttl_secs: config.auth.session_ttl_secs,
            min_password_score: config.auth.min_password_score,
            max_sign_in_failures: config.auth.max_sign_in_failures,
            sign_in_window_secs: config.auth.sign_in_window_secs,
            secure_cookies: !config.tls.cert_path.is_empty(),
            public_url: config.auth.public_url.clone(),
            oauth: config.auth.oauth.clone(),
        },
        free_tier: config.quota.free_tier.limits(),
        notify: maas_gateway::notify::NotifyOptions {
            smtp: config.smtp.options(),
            sms_webhook_url: (!config.sms.webhook_url.is_empty()).then(|| config.sms.webhook_url.clone()),
        },
    }
}
