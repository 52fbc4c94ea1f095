//! `ReplicaActor`: one per model replica placed on this node. It loads its model through
//! the node's [`ReplicaRuntime`] (fetch and verify the model's files, load the weights)
//! and tells the agent how that went; the agent commits the replica's state. The actor
//! holds what was loaded for as long as it runs; stopping it frees that.
//!
//! The runtime is a trait so that the actor knows nothing of where model files come from
//! (the model repository and blob store, wired by the node).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use serde::Serialize;

use super::agent::AgentMsg;

/// What a replica runs: everything its node needs to load it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaSpec {
    pub replica_id: String,
    pub deployment_id: String,
    pub model_name: String,
    pub model_version: String,
    /// The deployment's `model_path`, for a model not in the repository.
    pub model_path: Option<String>,
    /// Whose model of the repository it is: a tenant's own, or (`None`) the platform's.
    pub model_owner: Option<maas_store::Owner>,
    /// GPU indices on this node; empty for a replica on CPU.
    pub gpu_indices: Vec<u32>,
    pub memory_per_gpu_mib: u64,
    /// The sequences its engine is sized for (the deployment's); `None`: the defaults.
    pub serving: Option<maas_consensus::state::ServingLimits>,
}

/// A loaded replica: a line that says what was loaded, and the loaded model itself
/// (dropped when the replica stops).
pub struct LoadedReplica {
    pub summary: String,
    /// What requests use, when the replica serves them (files-only replicas do not).
    pub serving: Option<super::ServingModel>,
    pub model: Box<dyn std::any::Any + Send + Sync>,
}

pub type LoadFuture = Pin<Box<dyn Future<Output = Result<LoadedReplica, String>> + Send>>;

/// How a node loads a replica's model. Long CPU or disk work belongs on a blocking thread
/// inside the future, never on the async workers.
/// What it does on the way goes to the deployment's log through `log`.
pub trait ReplicaRuntime: Send + Sync + 'static {
    fn load(&self, spec: ReplicaSpec, log: super::ReplicaLog) -> LoadFuture;
}

/// Loads a replica from its deployment's `model_path` on this node: the files are read
/// through and checked ([`maas_engine::model_files::inspect`]) on a blocking thread.
pub struct ModelPathRuntime;

impl ReplicaRuntime for ModelPathRuntime {
    fn load(&self, spec: ReplicaSpec, log: super::ReplicaLog) -> LoadFuture {
        Box::pin(async move {
            log.info(format!("checking the files at {}", spec.model_path.as_deref().unwrap_or("(no path)")));
            let Some(path) = spec.model_path.clone() else {
                return Err(format!(
                    "model {}:{} has no files on this node: deploy it with a model_path",
                    spec.model_name, spec.model_version
                ));
            };
            let files =
                tokio::task::spawn_blocking(move || maas_engine::model_files::inspect(std::path::Path::new(&path)))
                    .await
                    .map_err(|err| format!("the loading thread failed: {err}"))?
                    .map_err(|err| err.to_string())?;
            Ok(LoadedReplica { summary: files.summary(), serving: None, model: Box::new(files) })
        })
    }
}

/// A replica's state on its node, as its actor last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum LocalReplicaState {
    Loading,
    /// Loaded; the text says what.
    Ready(String),
    Failed(String),
}

#[derive(RactorMessage)]
pub enum ReplicaMsg {
    Load,
    /// Checks that the loaded model still serves (its batching loop has not died).
    Check,
}

/// How often a ready replica checks that its model still serves.
const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

pub struct ReplicaActor;

/// What a replica actor starts with.
pub struct ReplicaArgs {
    pub spec: ReplicaSpec,
    pub runtime: Arc<dyn ReplicaRuntime>,
    pub agent: ActorRef<AgentMsg>,
    pub serving: super::ServingTable,
    pub journal: super::Journal,
}

pub struct ReplicaActorState {
    spec: ReplicaSpec,
    runtime: Arc<dyn ReplicaRuntime>,
    agent: ActorRef<AgentMsg>,
    serving: super::ServingTable,
    log: super::ReplicaLog,
    loaded: Option<LoadedReplica>,
}

impl Actor for ReplicaActor {
    type Msg = ReplicaMsg;
    type State = ReplicaActorState;
    type Arguments = ReplicaArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ReplicaMsg>,
        ReplicaArgs { spec, runtime, agent, serving, journal }: ReplicaArgs,
    ) -> Result<ReplicaActorState, ActorProcessingErr> {
        let _ = myself.cast(ReplicaMsg::Load);
        let log = journal.replica(&spec.deployment_id, &spec.replica_id);
        Ok(ReplicaActorState { spec, runtime, agent, serving, log, loaded: None })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ReplicaMsg>,
        state: &mut ReplicaActorState,
    ) -> Result<(), ActorProcessingErr> {
        // No new request reaches it; requests in flight hold the engine until they end.
        state.serving.remove(&state.spec.replica_id);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ReplicaMsg>,
        message: ReplicaMsg,
        state: &mut ReplicaActorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ReplicaMsg::Load => state.load(&myself).await,
            ReplicaMsg::Check => state.check(&myself),
        }
        Ok(())
    }
}

impl ReplicaActorState {
    async fn load(&mut self, myself: &ActorRef<ReplicaMsg>) {
        let replica_id = self.spec.replica_id.clone();
        self.report(LocalReplicaState::Loading);
        let started = std::time::Instant::now();
        match self.runtime.load(self.spec.clone(), self.log.clone()).await {
            Ok(loaded) => {
                let seconds = started.elapsed().as_secs_f64();
                let took = if seconds < 10.0 { format!("{seconds:.2} s") } else { format!("{seconds:.0} s") };
                self.log.info(format!("ready in {took}: {}", loaded.summary));
                if let Some(model) = &loaded.serving {
                    self.serving.insert(&replica_id, model.clone());
                    myself.send_interval(CHECK_EVERY, || ReplicaMsg::Check);
                }
                self.report(LocalReplicaState::Ready(loaded.summary.clone()));
                self.loaded = Some(loaded);
            }
            Err(reason) => {
                self.log.error(format!("failed to load: {reason}"));
                self.report(LocalReplicaState::Failed(reason.clone()));
                // Stopping lets the agent decide on a restart under its budget.
                myself.stop(Some(format!("load failed: {reason}")));
            }
        }
    }

    /// A model whose engine died (its batching loop panicked) serves nothing more: the
    /// replica leaves the serving table, reports the failure and stops, and the agent
    /// restarts it under its budget, as after a failed load.
    fn check(&mut self, myself: &ActorRef<ReplicaMsg>) {
        let Some(reason) = self.loaded.as_ref().and_then(|loaded| loaded.serving.as_ref()?.failure()) else {
            return;
        };
        self.serving.remove(&self.spec.replica_id);
        self.loaded = None;
        self.log.error(format!("stopped serving: {reason}"));
        self.report(LocalReplicaState::Failed(reason.clone()));
        myself.stop(Some(format!("the model stopped serving: {reason}")));
    }

    fn report(&self, state: LocalReplicaState) {
        let _ = self.agent.cast(AgentMsg::ReplicaReport { replica_id: self.spec.replica_id.clone(), state });
    }
}

/// The registered name of a replica actor: unique in the cluster, as ractor names must be.
pub fn replica_actor_name(replica_id: &str) -> String {
    format!("maas.replica.{replica_id}")
}
