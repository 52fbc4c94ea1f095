//! The node agent over a real one-node control plane: it starts a GPU actor per
//! registered GPU, leases each placement's memory, restarts a killed GPU actor with its
//! leases, and gives up (visibly) after its restart budget.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use maas_actors::node::agent::gpu_actor_name;
use maas_actors::node::{AgentConfig, AgentStatus, GpuMsg, NodeAgent};
use maas_consensus::control::NoPeers;
use maas_consensus::state::{
    ClusterState, Command, DeploymentId, DeploymentSpec, GpuRecord, NodeId, NodeResources, NodeSpec, PlacementStrategy,
    ReplicaId, ReplicaPlacement, ReplicaRequest,
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
        model_name: "llama".into(),
        model_version: "1".into(),
        request: ReplicaRequest { gpus_per_replica: 1, memory_per_gpu_mib: 30000, cpu_fallback_allowed: false },
        strategy: PlacementStrategy::Binpack,
        node_selector: BTreeMap::new(),
        priority: 0,
        allow_preemption: false,
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
    let (agent, _) = Actor::spawn(None, NodeAgent, (config, control.clone(), Arc::clone(&status))).await.unwrap();

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
