//! A test state machine that journals every applied command.

#![allow(dead_code)]

use maas_consensus::StateMachine;
use serde::{Deserialize, Serialize};

/// Records every applied command with its index, in order.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub applied: Vec<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
#[error("command {0} is refused by the journal")]
pub struct Refused(pub u64);

/// Commands at or above this value are refused, to exercise the rejection path.
pub const REFUSED_FROM: u64 = 1 << 62;

impl StateMachine for Journal {
    type Command = u64;
    type Response = u64;
    type Rejection = Refused;

    fn apply(&mut self, index: u64, command: u64) -> Result<u64, Refused> {
        if command >= REFUSED_FROM {
            return Err(Refused(command));
        }
        self.applied.push((index, command));
        Ok(index)
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("journal serialises")
    }

    fn restore(&mut self, snapshot: &[u8]) -> maas_consensus::Result<()> {
        *self = serde_json::from_slice(snapshot)
            .map_err(|e| maas_consensus::ConsensusError::Codec { what: "journal snapshot", reason: e.to_string() })?;
        Ok(())
    }
}

impl Journal {
    pub fn commands(&self) -> Vec<u64> {
        self.applied.iter().map(|(_, command)| *command).collect()
    }
}

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use maas_consensus::control::{ControlPlane, ControlPlaneConfig};
use maas_consensus::liveness::LivenessSettings;
use maas_consensus::local::LocalNetwork;
use maas_consensus::reconcile::ReconcileSettings;
use maas_consensus::state::{ClusterState, GpuRecord, NodeId, NodeResources, NodeSpec};
use maas_consensus::storage::DiskStorage;
use maas_consensus::{DriverConfig, RaftSettings};

/// A node as it registers in tests: addresses from its id, and `gpus` simulated 80 GiB GPUs.
pub fn node_spec(id: u64, gpus: u32) -> NodeSpec {
    NodeSpec {
        id: NodeId(id),
        name: format!("node-{id}"),
        api_addr: format!("http://127.0.0.1:{}", 8000 + id),
        cluster_addr: format!("127.0.0.1:{}", 7000 + id),
        labels: BTreeMap::new(),
        resources: NodeResources {
            cpu_cores: 8,
            memory_mib: 65536,
            gpus: (0..gpus)
                .map(|index| GpuRecord { index, model: "H100".into(), memory_total_mib: 81920, simulated: true })
                .collect(),
        },
    }
}

/// Three control planes over the in-process network: 10 ms ticks, a failure detector
/// that suspects after 150 ms and declares dead after 400 ms, a 1024 MiB GPU reserve.
pub struct LocalCluster {
    pub network: Arc<LocalNetwork<ClusterState>>,
    pub planes: BTreeMap<u64, ControlPlane>,
    _root: tempfile::TempDir,
}

pub fn start_planes(gpus_per_node: u32) -> LocalCluster {
    let root = tempfile::tempdir().unwrap();
    let network = LocalNetwork::new();
    let mut planes = BTreeMap::new();
    for id in 1..=3 {
        let config = ControlPlaneConfig {
            node: node_spec(id, gpus_per_node),
            storage: DiskStorage::open(&root.path().join(format!("node-{id}"))).unwrap(),
            driver: DriverConfig {
                tick: Duration::from_millis(10),
                settings: RaftSettings { snapshot_interval_entries: 1000, ..RaftSettings::default() },
                ..DriverConfig::new(id)
            },
            bootstrap_voters: Some(vec![1, 2, 3]),
            liveness: LivenessSettings {
                suspect_after_ms: 150,
                dead_after_ms: 400,
                rejoin_stable_ms: 300,
                max_rejoin_stable_ms: 5000,
            },
            reconcile: ReconcileSettings { gpu_reserve_mib: 1024 },
        };
        let plane = ControlPlane::start(config, &network.transport(id)).unwrap();
        network.attach(id, plane.handle().clone());
        planes.insert(id, plane);
    }
    LocalCluster { network, planes, _root: root }
}
