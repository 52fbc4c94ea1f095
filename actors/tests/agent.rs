//! The node agent over a real one-node control plane: it starts a GPU actor per
//! registered GPU, leases each placement's memory, restarts a killed GPU actor with its
//! leases, and gives up (visibly) after its restart budget.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use maas_actors::node::agent::gpu_actor_name;
use maas_actors::node::{
    AgentConfig, AgentStatus, GpuMsg, LoadFuture, LoadedReplica, LocalReplicaState, LogLevel, ModelPathRuntime,
    NodeAgent, ReplicaRuntime, ServingModel,
};
use maas_consensus::control::NoPeers;
use maas_consensus::state::{
    ClusterState, Command, DeploymentId, DeploymentSpec, GpuRecord, NodeId, NodeResources, NodeSpec, PlacementStrategy,
    ReplicaId, ReplicaPlacement, ReplicaRequest, ReplicaState,
};
use maas_consensus::storage::DiskStorage;
use maas_consensus::{DriverConfig, RaftHandle};
use ractor::{Actor, ActorRef};

async fn control_plane(dir: &std::path::Path) -> RaftHandle<ClusterState> {
    let config =
        DriverConfig { tick: Duration::from_millis(10), bootstrap_voters: Some(vec![1]), ..DriverConfig::new(1) };
    let handle = maas_consensus::driver::start(
        &config,
        DiskStorage::open(dir).unwrap(),
        ClusterState::default(),
        Arc::new(NoPeers),
    )
    .unwrap();
    handle.campaign();
    let gpu = |index| GpuRecord { index, model: "H100".into(), memory_total_mib: 81920, simulated: true };
    let node = NodeSpec {
        id: NodeId(1),
        name: "node-1".into(),
        api_addr: "http://127.0.0.1:8080".into(),
        cluster_addr: "127.0.0.1:7070".into(),
        labels: BTreeMap::new(),
        resources: NodeResources { cpu_cores: 8, memory_mib: 65536, gpus: vec![gpu(0), gpu(1)] },
    };
    propose(&handle, Command::RegisterNode { node, at_ms: 1 }).await;
    let spec = DeploymentSpec {
        serving: None,
        model_name: "llama".into(),
        model_version: "1".into(),
        model_path: None,
        request: ReplicaRequest { gpus_per_replica: 1, memory_per_gpu_mib: 30000, cpu_fallback_allowed: false },
        strategy: PlacementStrategy::Binpack,
        node_selector: BTreeMap::new(),
        priority: 0,
        allow_preemption: false,
        owner: None,
        tenant_model: false,
    };
    propose(&handle, Command::PutDeployment { deployment_id: DeploymentId("d1".into()), spec, replicas: 1, at_ms: 2 })
        .await;
    handle
}

async fn propose(handle: &RaftHandle<ClusterState>, command: Command) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match handle.propose(command.clone()).await {
            Ok(Ok(_)) => return,
            Ok(Err(rejection)) => panic!("{rejection}"),
            Err(err) => assert!(Instant::now() < deadline, "{err}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn place(replica: &str, gpu: u32) -> Command {
    Command::PlaceReplica {
        placement: ReplicaPlacement {
            replica_id: ReplicaId(replica.into()),
            deployment_id: DeploymentId("d1".into()),
            deployment_generation: 1,
            node_id: NodeId(1),
            gpu_indices: vec![gpu],
            memory_per_gpu_mib: 30000,
        },
        gpu_reserve_mib: 1024,
        at_ms: 3,
    }
}

fn runtime() -> Arc<dyn ReplicaRuntime> {
    Arc::new(ModelPathRuntime)
}

/// A deployment `id` of the model at `path`, one 30000 MiB GPU per replica.
fn deployment(id: &str, path: &std::path::Path) -> Command {
    let spec = DeploymentSpec {
        serving: None,
        model_name: "tiny".into(),
        model_version: "1".into(),
        model_path: Some(path.display().to_string()),
        request: ReplicaRequest { gpus_per_replica: 1, memory_per_gpu_mib: 30000, cpu_fallback_allowed: false },
        strategy: PlacementStrategy::Binpack,
        node_selector: BTreeMap::new(),
        priority: 0,
        owner: None,
        tenant_model: false,
        allow_preemption: false,
    };
    Command::PutDeployment { deployment_id: DeploymentId(id.into()), spec, replicas: 1, at_ms: 2 }
}

fn place_for(deployment: &str, replica: &str, gpu: u32) -> Command {
    match place(replica, gpu) {
        Command::PlaceReplica { mut placement, gpu_reserve_mib, at_ms } => {
            placement.deployment_id = DeploymentId(deployment.into());
            Command::PlaceReplica { placement, gpu_reserve_mib, at_ms }
        }
        _ => unreachable!(),
    }
}

fn committed(control: &RaftHandle<ClusterState>, replica: &str) -> Option<ReplicaState> {
    control.read_local(|state| state.replica(&ReplicaId(replica.into())).map(|r| r.state.clone()))
}

async fn until_committed(
    control: &RaftHandle<ClusterState>,
    replica: &str,
    what: &str,
    condition: impl Fn(Option<ReplicaState>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = committed(control, replica);
        if condition(state.clone()) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}: {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn until(status: &RwLock<AgentStatus>, what: &str, condition: impl Fn(&AgentStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition(&status.read().unwrap()) {
        assert!(Instant::now() < deadline, "timed out waiting until {what}: {:#?}", status.read().unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconciles_gpu_actors_and_leases_with_the_committed_state() {
    let dir = tempfile::tempdir().unwrap();
    let control = control_plane(dir.path()).await;
    propose(&control, place("r1", 0)).await;
    let status = Arc::new(RwLock::new(AgentStatus::default()));
    let config =
        AgentConfig { reconcile_every: Duration::from_millis(20), max_restarts: 2, ..AgentConfig::new(1, 1024) };
    let (agent, _) =
        Actor::spawn(None, NodeAgent, (config, control.clone(), Arc::clone(&status), runtime())).await.unwrap();

    until(&status, "both GPUs run and r1 holds its lease", |s| {
        s.gpus.len() == 2 && s.gpus[0].leases.get("r1") == Some(&30000) && s.gpus[1].leases.is_empty()
    })
    .await;
    assert_eq!(status.read().unwrap().gpus[0].free_mib, 81920 - 1024 - 30000);

    // A new placement is leased; a removed one is released.
    propose(&control, place("r2", 1)).await;
    until(&status, "r2 is leased on gpu 1", |s| s.gpus[1].leases.get("r2") == Some(&30000)).await;
    propose(&control, Command::RemoveReplica { replica_id: ReplicaId("r2".into()), at_ms: 4 }).await;
    until(&status, "r2's lease is released", |s| s.gpus[1].leases.is_empty()).await;

    // A killed GPU actor is restarted and gets its leases back from the committed state.
    let gpu0: ActorRef<GpuMsg> = ractor::registry::where_is(gpu_actor_name(1, 0)).unwrap().into();
    gpu0.kill();
    until(&status, "gpu 0 is restarted with r1's lease", |s| {
        s.gpus[0].restarts == 1 && s.gpus[0].leases.get("r1") == Some(&30000)
    })
    .await;

    // Past its restart budget it stays down, and says why.
    for expected in [2, 3] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let actor = loop {
            if let Some(cell) = ractor::registry::where_is(gpu_actor_name(1, 0)) {
                break cell;
            }
            assert!(Instant::now() < deadline, "gpu 0 comes back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        actor.kill();
        until(&status, "the kill is counted", |s| s.gpus[0].restarts == expected).await;
    }
    until(&status, "gpu 0 is reported failed", |s| {
        s.gpus[0].failed.as_deref().is_some_and(|f| f.contains("stays down"))
    })
    .await;
    assert!(status.read().unwrap().gpus[1].failed.is_none(), "the other GPU is unaffected");

    agent.stop(None);
    control.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_load_their_model_files_report_ready_and_stop_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 7).unwrap();
    let control = control_plane(&dir.path().join("raft")).await;
    propose(&control, deployment("good", &model)).await;
    let status = Arc::new(RwLock::new(AgentStatus::default()));
    let config = AgentConfig { reconcile_every: Duration::from_millis(20), ..AgentConfig::new(1, 1024) };
    let journal = config.journal.clone();
    let (agent, _) =
        Actor::spawn(None, NodeAgent, (config, control.clone(), Arc::clone(&status), runtime())).await.unwrap();

    // Placed → loading → ready, committed by the agent; the GPU shows the memory used.
    propose(&control, place_for("good", "g1", 0)).await;
    until_committed(&control, "g1", "g1 is ready", |state| state == Some(ReplicaState::Ready)).await;
    until(&status, "gpu 0 shows g1's memory in use", |s| s.gpus.first().is_some_and(|g| g.used_mib == 30000)).await;
    let local = status.read().unwrap().replicas[0].local.clone();
    assert!(
        matches!(&local, Some(LocalReplicaState::Ready(summary)) if summary.contains("LlamaForCausalLM")),
        "{local:?}"
    );

    // Stopping: the agent stops the actor and removes the replica.
    propose(
        &control,
        Command::SetReplicaState { replica_id: ReplicaId("g1".into()), state: ReplicaState::Stopping, at_ms: 5 },
    )
    .await;
    until_committed(&control, "g1", "g1 is removed", |state| state.is_none()).await;
    until(&status, "no replica runs", |s| s.replicas.is_empty() && s.gpus[0].used_mib == 0).await;
    // The deployment's log tells the story, in order.
    let told: Vec<String> = journal.lines("good", LogLevel::Info, 100).into_iter().map(|line| line.message).collect();
    let expected =
        ["starting on node 1 on GPU(s) [0] with 30000 MiB each", "checking the files at", "ready in ", "stopping: "];
    assert_eq!(told.len(), expected.len(), "{told:#?}");
    for (line, start) in told.iter().zip(expected) {
        assert!(line.starts_with(start), "{line:?} should start with {start:?}: {told:#?}");
    }
    assert!(told[2].contains("LlamaForCausalLM"), "{told:#?}");

    // A corrupt model fails with the reason, is retried, and its restarts are counted.
    let broken = dir.path().join("broken");
    maas_engine::tiny::write_llama(&broken, maas_engine::tiny::TinyShape::default(), 7).unwrap();
    let weights = broken.join("model.safetensors");
    let length = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(length / 2).unwrap();
    propose(&control, deployment("bad", &broken)).await;
    propose(&control, place_for("bad", "b1", 1)).await;
    until_committed(
        &control,
        "b1",
        "b1 failed, saying why",
        |state| matches!(state, Some(ReplicaState::Failed { reason }) if reason.contains("truncated")),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while control.read_local(|s| s.replica(&ReplicaId("b1".into())).map_or(0, |r| r.restarts)) == 0 {
        assert!(Instant::now() < deadline, "b1 is started again after its back-off");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let problems = journal.lines("bad", LogLevel::Warn, 100);
        let failed = problems.iter().any(|l| {
            l.level == LogLevel::Error && l.message.starts_with("failed to load:") && l.message.contains("truncated")
        });
        let restarted =
            problems.iter().any(|l| l.level == LogLevel::Warn && l.message.starts_with("restarting on node 1"));
        if failed && restarted {
            assert!(problems.iter().all(|l| l.replica_id == "b1" && l.node_id == 1), "{problems:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "the log says b1 failed to load and was restarted: {problems:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A replica the state no longer holds (placed elsewhere after a dead verdict) stops.
    propose(&control, Command::RemoveReplica { replica_id: ReplicaId("b1".into()), at_ms: 9 }).await;
    until(&status, "b1 is gone from the agent", |s| s.replicas.is_empty()).await;
    assert!(ractor::registry::where_is("maas.replica.b1").is_none());

    agent.stop(None);
    control.stop();
}

/// Loads the model at the deployment's `model_path` into a real engine that serves, and
/// keeps each engine it loads so that the test can break it.
#[derive(Clone, Default)]
struct EngineRuntime {
    loaded: Arc<std::sync::Mutex<Vec<Arc<maas_engine::Engine>>>>,
}

impl ReplicaRuntime for EngineRuntime {
    fn load(&self, spec: maas_actors::node::ReplicaSpec, _log: maas_actors::node::ReplicaLog) -> LoadFuture {
        let runtime = self.clone();
        Box::pin(async move {
            let path = std::path::PathBuf::from(spec.model_path.expect("a model_path"));
            let engine = tokio::task::spawn_blocking(move || {
                maas_engine::Engine::load(&path, maas_engine::EngineOptions::default())
            })
            .await
            .unwrap()
            .map_err(|err| err.to_string())?;
            let engine = Arc::new(engine);
            runtime.loaded.lock().unwrap().push(Arc::clone(&engine));
            Ok(LoadedReplica {
                summary: "a tiny engine".into(),
                serving: Some(ServingModel::Generator(engine)),
                model: Box::new(()),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_engine_dies_fails_visibly_and_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 7).unwrap();
    let control = control_plane(&dir.path().join("raft")).await;
    propose(&control, deployment("live", &model)).await;
    let status = Arc::new(RwLock::new(AgentStatus::default()));
    let config = AgentConfig {
        reconcile_every: Duration::from_millis(20),
        replica_backoff: Duration::from_millis(50),
        ..AgentConfig::new(1, 1024)
    };
    let (journal, serving) = (config.journal.clone(), config.serving.clone());
    let runtime = EngineRuntime::default();
    let (agent, _) = Actor::spawn(
        None,
        NodeAgent,
        (config, control.clone(), Arc::clone(&status), Arc::new(runtime.clone()) as Arc<dyn ReplicaRuntime>),
    )
    .await
    .unwrap();
    propose(&control, place_for("live", "e1", 0)).await;
    until_committed(&control, "e1", "e1 is ready", |state| state == Some(ReplicaState::Ready)).await;
    assert!(serving.get("e1").is_some(), "a ready replica serves");

    // The engine's batching loop panics: requests are refused, and within a check the
    // replica leaves the serving table, its failure is committed with the reason, and the
    // agent loads it again.
    let first = Arc::clone(&runtime.loaded.lock().unwrap()[0]);
    first.fail_point_panic();
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.failure().is_none() {
        assert!(Instant::now() < deadline, "the engine reports its failure");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = first.submit(maas_engine::GenerationRequest { prompt: "hello".into(), ..Default::default() });
    assert!(matches!(refused, Err(maas_engine::EngineError::Failed(ref reason)) if reason.contains("fail point")));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let problems = journal.lines("live", LogLevel::Warn, 100);
        let failed = problems.iter().any(|l| {
            l.level == LogLevel::Error && l.message.starts_with("stopped serving:") && l.message.contains("fail point")
        });
        let restarts = control.read_local(|s| s.replica(&ReplicaId("e1".into())).map_or(0, |r| r.restarts));
        if failed && restarts > 0 && runtime.loaded.lock().unwrap().len() == 2 {
            break;
        }
        let loads = runtime.loaded.lock().unwrap().len();
        assert!(
            Instant::now() < deadline,
            "e1's failure is logged ({failed}), counted ({restarts}) and it is loaded again ({loads}): {problems:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    until_committed(&control, "e1", "e1 is ready again", |state| state == Some(ReplicaState::Ready)).await;
    let second = Arc::clone(&runtime.loaded.lock().unwrap()[1]);
    let mut events =
        second.submit(maas_engine::GenerationRequest { prompt: "hello".into(), ..Default::default() }).unwrap();
    let mut finished = false;
    while let Some(event) = events.recv().await {
        finished |= matches!(event, maas_engine::GenerationEvent::Done { .. });
    }
    assert!(finished, "the restarted replica's engine serves");

    agent.stop(None);
    control.stop();
}
