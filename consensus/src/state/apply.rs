//! `apply`: one function per command. Each checks everything first and only then
//! changes the state, so every `return Err` happens before the first mutation.

use std::collections::{BTreeMap, BTreeSet};

use super::ClusterState;
use super::command::{Command, Effect};
use super::ids::{DeploymentId, JobId, NodeId, ReplicaId, ShardId};
use super::records::{
    DeploymentRecord, DeploymentSpec, KbShardPlacement, KbShardRecord, KbShardState, LABEL_VALUE_MAX_CHARS, NodeRecord,
    NodeSpec, NodeStatus, ReplicaPlacement, ReplicaRecord, ReplicaState, TrainingJobPlacement, TrainingJobRecord,
    TrainingJobState, label_key_is_valid,
};
use super::rejection::Rejection;

impl ClusterState {
    pub(super) fn apply_command(&mut self, command: Command) -> Result<Effect, Rejection> {
        match command {
            Command::RegisterNode { node, at_ms } => self.register_node(node, at_ms),
            Command::SetNodeStatus { node_id, status, at_ms } => self.set_node_status(node_id, status, at_ms),
            Command::SetNodeLabels { node_id, set, remove, at_ms: _ } => self.set_node_labels(node_id, set, &remove),
            Command::RemoveNode { node_id, at_ms: _ } => self.remove_node(node_id),
            Command::PutDeployment { deployment_id, spec, replicas, at_ms } => {
                self.put_deployment(deployment_id, spec, replicas, at_ms)
            }
            Command::ScaleDeployment { deployment_id, replicas, at_ms } => {
                self.scale_deployment(&deployment_id, replicas, at_ms)
            }
            Command::DeleteDeployment { deployment_id, at_ms } => self.delete_deployment(&deployment_id, at_ms),
            Command::PlaceReplica { placement, gpu_reserve_mib, at_ms } => {
                self.place_replica(placement, gpu_reserve_mib, at_ms)
            }
            Command::SetReplicaState { replica_id, state, at_ms } => self.set_replica_state(&replica_id, state, at_ms),
            Command::RemoveReplica { replica_id, at_ms: _ } => self.remove_replica(replica_id),
            Command::PutTrainingJob { placement, gpu_reserve_mib, at_ms } => {
                self.put_training_job(placement, gpu_reserve_mib, at_ms)
            }
            Command::SetTrainingJobState { job_id, state, at_ms } => self.set_training_job_state(&job_id, state, at_ms),
            Command::RemoveTrainingJob { job_id, at_ms: _ } => self.remove_training_job(job_id),
            Command::PutKbShard { placement, at_ms } => self.put_kb_shard(placement, at_ms),
            Command::PlaceKbShards { knowledge_base_id, placements, at_ms } => {
                self.place_kb_shards(knowledge_base_id, placements, at_ms)
            }
            Command::SetKbShardState { shard_id, state, at_ms } => self.set_kb_shard_state(&shard_id, state, at_ms),
            Command::RemoveKbShard { shard_id, at_ms: _ } => self.remove_kb_shard(shard_id),
        }
    }

    // Nodes.

    fn register_node(&mut self, spec: NodeSpec, at_ms: u64) -> Result<Effect, Rejection> {
        let node_id = spec.id;
        if self.removed_node_ids.contains(&node_id) {
            return Err(Rejection::NodeRemoved(node_id));
        }
        let existing = self.nodes.get(&node_id);
        if existing.is_some_and(|node| node.status == NodeStatus::Left) {
            return Err(Rejection::NodeLeft(node_id));
        }
        if spec.name.trim().is_empty() {
            return Err(Rejection::EmptyNodeName { node_id });
        }
        first_duplicate(spec.resources.gpus.iter().map(|gpu| gpu.index))
            .map_or(Ok(()), |gpu_index| Err(Rejection::DuplicateNodeGpu { node_id, gpu_index }))?;
        // A node that left gives its name up; the others keep theirs.
        if let Some(other) = self
            .nodes
            .values()
            .find(|other| other.id != node_id && other.status != NodeStatus::Left && other.name == spec.name)
        {
            return Err(Rejection::NodeNameTaken { name: spec.name, taken_by: other.id });
        }
        let Some(existing) = existing else {
            let NodeSpec { id, name, api_addr, cluster_addr, labels, resources } = spec;
            let record = NodeRecord {
                id,
                name,
                api_addr,
                cluster_addr,
                labels,
                resources,
                status: NodeStatus::Alive,
                status_since_ms: at_ms,
                joined_at_ms: at_ms,
                dead_declarations: 0,
            };
            self.nodes.insert(node_id, record);
            return Ok(Effect::NodeRegistered { node_id });
        };
        // The work placed on a GPU stays promised; the GPU must stay, and stay big enough.
        for (gpu_index, placed_mib) in self.gpu_memory_placed_by_gpu(node_id) {
            match spec.resources.gpu(gpu_index) {
                None => return Err(Rejection::GpuInUseWouldVanish { node_id, gpu_index, placed_mib }),
                Some(gpu) if gpu.memory_total_mib < placed_mib => {
                    return Err(Rejection::GpuInUseWouldShrink {
                        node_id,
                        gpu_index,
                        memory_total_mib: gpu.memory_total_mib,
                        placed_mib,
                    });
                }
                Some(_) => {}
            }
        }
        // A node's own labels (from its configuration) are merged in, so labels an
        // operator set with `SetNodeLabels` survive the node's restarts.
        let mut labels = existing.labels.clone();
        labels.extend(spec.labels);
        let unchanged = existing.name == spec.name
            && existing.api_addr == spec.api_addr
            && existing.cluster_addr == spec.cluster_addr
            && existing.labels == labels
            && existing.resources == spec.resources;
        if unchanged {
            return Ok(Effect::Unchanged);
        }
        let node = self.nodes.get_mut(&node_id).expect("checked above");
        node.name = spec.name;
        node.api_addr = spec.api_addr;
        node.cluster_addr = spec.cluster_addr;
        node.labels = labels;

        node.resources = spec.resources;
        Ok(Effect::NodeUpdated { node_id })
    }

    fn set_node_status(&mut self, node_id: NodeId, status: NodeStatus, at_ms: u64) -> Result<Effect, Rejection> {
        let node = self.existing_node(node_id)?;
        let from = node.status;
        if from == status {
            return Ok(Effect::Unchanged);
        }
        if from == NodeStatus::Left {
            return Err(Rejection::NodeStatusFinal(node_id));
        }
        let node = self.nodes.get_mut(&node_id).expect("checked above");
        node.status = status;
        node.status_since_ms = at_ms;
        if status == NodeStatus::Dead {
            node.dead_declarations = node.dead_declarations.saturating_add(1);
        }
        Ok(Effect::NodeStatusChanged { node_id, from, to: status })
    }

    fn set_node_labels(
        &mut self,
        node_id: NodeId,
        set: BTreeMap<String, String>,
        remove: &BTreeSet<String>,
    ) -> Result<Effect, Rejection> {
        let node = self.existing_node(node_id)?;
        if node.status == NodeStatus::Left {
            return Err(Rejection::NodeLabelsFinal(node_id));
        }
        if let Some(key) = set.keys().find(|key| remove.contains(*key)) {
            return Err(Rejection::LabelSetAndRemoved { node_id, key: key.clone() });
        }
        for (key, value) in &set {
            if !label_key_is_valid(key) {
                return Err(Rejection::InvalidLabelKey { node_id, key: key.clone() });
            }
            let chars = value.chars().count();
            if chars > LABEL_VALUE_MAX_CHARS {
                return Err(Rejection::LabelValueTooLong { node_id, key: key.clone(), chars });
            }
        }
        // A key the node carries may always go: `RegisterNode` does not check label keys,
        // so a node may hold one that this command could not set.
        if let Some(key) = remove.iter().find(|key| !label_key_is_valid(key) && !node.labels.contains_key(*key)) {
            return Err(Rejection::InvalidLabelKey { node_id, key: key.clone() });
        }
        let changes = set.iter().any(|(key, value)| node.labels.get(key) != Some(value))
            || remove.iter().any(|key| node.labels.contains_key(key));
        if !changes {
            return Ok(Effect::Unchanged);
        }
        let labels = &mut self.nodes.get_mut(&node_id).expect("checked above").labels;
        for key in remove {
            labels.remove(key);
        }
        labels.extend(set);
        Ok(Effect::NodeLabelsChanged { node_id })
    }

    fn remove_node(&mut self, node_id: NodeId) -> Result<Effect, Rejection> {
        self.existing_node(node_id)?;
        let replicas: Vec<ReplicaId> = self.replicas_on_node(node_id).map(|replica| replica.id.clone()).collect();
        let training_jobs: Vec<JobId> = self.training_jobs_on_node(node_id).map(|job| job.id.clone()).collect();
        let kb_shards: Vec<ShardId> = self.kb_shards_on_node(node_id).map(|shard| shard.id.clone()).collect();
        if !(replicas.is_empty() && training_jobs.is_empty() && kb_shards.is_empty()) {
            return Err(Rejection::NodeHoldsWork { node_id, replicas, training_jobs, kb_shards });
        }
        self.nodes.remove(&node_id);
        self.removed_node_ids.insert(node_id);
        Ok(Effect::NodeRemoved { node_id })
    }

    // Deployments.

    fn put_deployment(
        &mut self,
        deployment_id: DeploymentId,
        spec: DeploymentSpec,
        replicas: u32,
        at_ms: u64,
    ) -> Result<Effect, Rejection> {
        if deployment_id.as_str().is_empty() {
            return Err(Rejection::EmptyId { what: "deployment" });
        }
        validate_deployment_spec(&deployment_id, &spec)?;
        if let Some(existing) = self.deployments.get_mut(&deployment_id) {
            if existing.spec == spec && existing.replicas_desired == replicas {
                return Ok(Effect::Unchanged);
            }
            if existing.spec != spec {
                existing.spec = spec;
                existing.generation += 1;
            }
            existing.replicas_desired = replicas;
            existing.updated_at_ms = at_ms;
            return Ok(Effect::DeploymentUpdated { deployment_id, generation: existing.generation });
        }
        // Replicas of a deleted deployment of the same id may still be stopping; the new
        // deployment's generations start above theirs, so they never look current.
        let lingering_generation =
            self.replicas_of_deployment(&deployment_id).map(|replica| replica.deployment_generation).max().unwrap_or(0);
        let generation = lingering_generation + 1;
        let record = DeploymentRecord {
            id: deployment_id.clone(),
            spec,
            replicas_desired: replicas,
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            generation,
        };
        self.deployments.insert(deployment_id.clone(), record);
        Ok(Effect::DeploymentCreated { deployment_id, generation })
    }

    fn scale_deployment(
        &mut self,
        deployment_id: &DeploymentId,
        replicas: u32,
        at_ms: u64,
    ) -> Result<Effect, Rejection> {
        let deployment = self
            .deployments
            .get_mut(deployment_id)
            .ok_or_else(|| Rejection::UnknownDeployment(deployment_id.clone()))?;
        let from = deployment.replicas_desired;
        if from == replicas {
            return Ok(Effect::Unchanged);
        }
        deployment.replicas_desired = replicas;
        deployment.updated_at_ms = at_ms;
        Ok(Effect::DeploymentScaled { deployment_id: deployment_id.clone(), from, to: replicas })
    }

    fn delete_deployment(&mut self, deployment_id: &DeploymentId, at_ms: u64) -> Result<Effect, Rejection> {
        if self.deployments.remove(deployment_id).is_none() {
            return Err(Rejection::UnknownDeployment(deployment_id.clone()));
        }
        let mut stopping_replicas = Vec::new();
        for replica in self.replicas.values_mut() {
            if &replica.deployment_id == deployment_id && replica.state != ReplicaState::Stopping {
                replica.state = ReplicaState::Stopping;
                replica.state_since_ms = at_ms;
                stopping_replicas.push(replica.id.clone());
            }
        }
        Ok(Effect::DeploymentDeleted { deployment_id: deployment_id.clone(), stopping_replicas })
    }

    // Replicas.

    fn place_replica(
        &mut self,
        placement: ReplicaPlacement,
        reserve_mib: u64,
        at_ms: u64,
    ) -> Result<Effect, Rejection> {
        let ReplicaPlacement {
            replica_id,
            deployment_id,
            deployment_generation,
            node_id,
            gpu_indices,
            memory_per_gpu_mib,
        } = placement;
        if replica_id.as_str().is_empty() {
            return Err(Rejection::EmptyId { what: "replica" });
        }
        if self.replicas.contains_key(&replica_id) {
            return Err(Rejection::ReplicaExists(replica_id));
        }
        let deployment =
            self.deployments.get(&deployment_id).ok_or_else(|| Rejection::UnknownDeployment(deployment_id.clone()))?;
        if deployment_generation != deployment.generation {
            return Err(Rejection::StaleGeneration {
                replica_id,
                deployment_id,
                placed: deployment_generation,
                current: deployment.generation,
            });
        }
        let node = self.alive_node(node_id)?;
        if let Some((key, value)) =
            deployment.spec.node_selector.iter().find(|(key, value)| node.labels.get(*key) != Some(*value))
        {
            return Err(Rejection::NodeSelectorMismatch {
                node_id,
                deployment_id,
                key: key.clone(),
                value: value.clone(),
            });
        }
        let request = &deployment.spec.request;
        let gpu_count_ok = u32::try_from(gpu_indices.len()).is_ok_and(|given| given == request.gpus_per_replica)
            || (gpu_indices.is_empty() && request.cpu_fallback_allowed);
        if !gpu_count_ok {
            return Err(Rejection::WrongGpuCount {
                deployment_id,
                needed: request.gpus_per_replica,
                cpu_fallback_allowed: request.cpu_fallback_allowed,
                given: gpu_indices.len(),
            });
        }
        self.check_gpu_promise(node, &gpu_indices, memory_per_gpu_mib, reserve_mib, &BTreeMap::new())?;
        let record = ReplicaRecord {
            id: replica_id.clone(),
            deployment_id,
            deployment_generation,
            node_id,
            gpu_indices,
            memory_per_gpu_mib,
            state: ReplicaState::Pending,
            state_since_ms: at_ms,
            placed_at_ms: at_ms,
            restarts: 0,
        };
        self.replicas.insert(replica_id.clone(), record);
        Ok(Effect::ReplicaPlaced { replica_id })
    }

    fn set_replica_state(&mut self, replica_id: &ReplicaId, to: ReplicaState, at_ms: u64) -> Result<Effect, Rejection> {
        let replica = self.replicas.get_mut(replica_id).ok_or_else(|| Rejection::UnknownReplica(replica_id.clone()))?;
        if replica.state == to {
            return Ok(Effect::Unchanged);
        }
        if replica.state == ReplicaState::Stopping {
            return Err(Rejection::ReplicaStopping { replica_id: replica_id.clone(), to });
        }
        // A failed replica leaves `failed` only by starting again; a quick load can reach
        // `ready` before `loading` is committed.
        let restarted = matches!(replica.state, ReplicaState::Failed { .. })
            && matches!(to, ReplicaState::Pending | ReplicaState::Loading | ReplicaState::Ready);
        if restarted {
            replica.restarts = replica.restarts.saturating_add(1);
        }
        let from = std::mem::replace(&mut replica.state, to.clone());
        replica.state_since_ms = at_ms;
        Ok(Effect::ReplicaStateChanged { replica_id: replica_id.clone(), from, to })
    }

    fn remove_replica(&mut self, replica_id: ReplicaId) -> Result<Effect, Rejection> {
        if self.replicas.remove(&replica_id).is_none() {
            return Err(Rejection::UnknownReplica(replica_id));
        }
        Ok(Effect::ReplicaRemoved { replica_id })
    }

    // Training jobs.

    fn put_training_job(
        &mut self,
        placement: TrainingJobPlacement,
        reserve_mib: u64,
        at_ms: u64,
    ) -> Result<Effect, Rejection> {
        let TrainingJobPlacement { job_id, base_model, node_id, gpu_indices, memory_per_gpu_mib } = placement;
        if job_id.as_str().is_empty() {
            return Err(Rejection::EmptyId { what: "training job" });
        }
        if base_model.trim().is_empty() {
            return Err(Rejection::EmptyBaseModel { job_id });
        }
        let existing = self.training_jobs.get(&job_id);
        if let Some(job) = existing.filter(|job| job.state.is_terminal()) {
            return Err(Rejection::TrainingJobFinished { job_id, state: job.state.clone() });
        }
        let moved = existing.is_none_or(|job| {
            job.node_id != node_id || job.gpu_indices != gpu_indices || job.memory_per_gpu_mib != memory_per_gpu_mib
        });
        let node = if moved { self.alive_node(node_id)? } else { self.existing_node(node_id)? };
        // The job's own promise is replaced, so it does not count against itself.
        let mut own_promise = BTreeMap::new();
        if let Some(job) = existing.filter(|job| job.node_id == node_id) {
            for gpu_index in &job.gpu_indices {
                *own_promise.entry(*gpu_index).or_insert(0) += u128::from(job.memory_per_gpu_mib);
            }
        }
        self.check_gpu_promise(node, &gpu_indices, memory_per_gpu_mib, reserve_mib, &own_promise)?;

        let Some(job) = self.training_jobs.get_mut(&job_id) else {
            let record = TrainingJobRecord {
                id: job_id.clone(),
                base_model,
                node_id,
                gpu_indices,
                memory_per_gpu_mib,
                state: TrainingJobState::Pending,
                state_since_ms: at_ms,
                created_at_ms: at_ms,
            };
            self.training_jobs.insert(job_id.clone(), record);
            return Ok(Effect::TrainingJobCreated { job_id });
        };
        if !moved && job.base_model == base_model {
            return Ok(Effect::Unchanged);
        }
        job.base_model = base_model;
        if moved {
            job.node_id = node_id;
            job.gpu_indices = gpu_indices;
            job.memory_per_gpu_mib = memory_per_gpu_mib;
            if job.state != TrainingJobState::Pending {
                job.state = TrainingJobState::Pending;
                job.state_since_ms = at_ms;
            }
        }
        Ok(Effect::TrainingJobUpdated { job_id })
    }

    fn set_training_job_state(
        &mut self,
        job_id: &JobId,
        to: TrainingJobState,
        at_ms: u64,
    ) -> Result<Effect, Rejection> {
        let job = self.training_jobs.get_mut(job_id).ok_or_else(|| Rejection::UnknownTrainingJob(job_id.clone()))?;
        if job.state == to {
            return Ok(Effect::Unchanged);
        }
        if job.state.is_terminal() {
            return Err(Rejection::TrainingJobFinished { job_id: job_id.clone(), state: job.state.clone() });
        }
        let from = std::mem::replace(&mut job.state, to.clone());
        job.state_since_ms = at_ms;
        Ok(Effect::TrainingJobStateChanged { job_id: job_id.clone(), from, to })
    }

    fn remove_training_job(&mut self, job_id: JobId) -> Result<Effect, Rejection> {
        if self.training_jobs.remove(&job_id).is_none() {
            return Err(Rejection::UnknownTrainingJob(job_id));
        }
        Ok(Effect::TrainingJobRemoved { job_id })
    }

    // Knowledge-base shards.

    fn put_kb_shard(&mut self, placement: KbShardPlacement, at_ms: u64) -> Result<Effect, Rejection> {
        let KbShardPlacement { shard_id, knowledge_base_id, hash_range, node_id } = placement;
        if shard_id.as_str().is_empty() {
            return Err(Rejection::EmptyId { what: "kb shard" });
        }
        if knowledge_base_id.trim().is_empty() {
            return Err(Rejection::EmptyKnowledgeBase { shard_id });
        }
        if hash_range.start > hash_range.end_inclusive {
            return Err(Rejection::EmptyHashRange {
                shard_id,
                start: hash_range.start,
                end_inclusive: hash_range.end_inclusive,
            });
        }
        let existing = self.kb_shards.get(&shard_id);
        if let Some(shard) = existing.filter(|shard| shard.knowledge_base_id != knowledge_base_id) {
            return Err(Rejection::KbShardOtherKnowledgeBase {
                shard_id,
                current: shard.knowledge_base_id.clone(),
                asked: knowledge_base_id,
            });
        }
        let moved = existing.is_none_or(|shard| shard.node_id != node_id);
        if moved && existing.is_some_and(|shard| shard.state == KbShardState::Stopping) {
            return Err(Rejection::KbShardStopping { shard_id, to: KbShardState::Pending });
        }
        if moved {
            self.alive_node(node_id)?;
        } else {
            self.existing_node(node_id)?;
        }

        let Some(shard) = self.kb_shards.get_mut(&shard_id) else {
            let record = KbShardRecord {
                id: shard_id.clone(),
                knowledge_base_id,
                hash_range,
                node_id,
                state: KbShardState::Pending,
                state_since_ms: at_ms,
                created_at_ms: at_ms,
            };
            self.kb_shards.insert(shard_id.clone(), record);
            return Ok(Effect::KbShardCreated { shard_id });
        };
        if !moved && shard.hash_range == hash_range {
            return Ok(Effect::Unchanged);
        }
        shard.hash_range = hash_range;
        if moved {
            shard.node_id = node_id;
            if shard.state != KbShardState::Pending {
                shard.state = KbShardState::Pending;
                shard.state_since_ms = at_ms;
            }
        }
        Ok(Effect::KbShardUpdated { shard_id })
    }

    fn place_kb_shards(
        &mut self,
        knowledge_base_id: String,
        placements: Vec<KbShardPlacement>,
        at_ms: u64,
    ) -> Result<Effect, Rejection> {
        if placements.is_empty() {
            return Err(Rejection::NoKbShards { knowledge_base_id });
        }
        if self.kb_shards.values().any(|shard| shard.knowledge_base_id == knowledge_base_id) {
            return Ok(Effect::Unchanged);
        }
        let mut seen = BTreeSet::new();
        for placement in &placements {
            if !seen.insert(&placement.shard_id) {
                return Err(Rejection::DuplicateKbShard(placement.shard_id.clone()));
            }
            if placement.knowledge_base_id != knowledge_base_id {
                return Err(Rejection::KbShardOtherKnowledgeBase {
                    shard_id: placement.shard_id.clone(),
                    current: knowledge_base_id,
                    asked: placement.knowledge_base_id.clone(),
                });
            }
        }
        // All or nothing: each is checked as a put of it would be, on the state as it was.
        let before = self.kb_shards.clone();
        let mut shard_ids = Vec::with_capacity(placements.len());
        for placement in placements {
            shard_ids.push(placement.shard_id.clone());
            if let Err(rejection) = self.put_kb_shard(placement, at_ms) {
                self.kb_shards = before;
                return Err(rejection);
            }
        }
        Ok(Effect::KbShardsPlaced { knowledge_base_id, shard_ids })
    }

    fn set_kb_shard_state(&mut self, shard_id: &ShardId, to: KbShardState, at_ms: u64) -> Result<Effect, Rejection> {
        let shard = self.kb_shards.get_mut(shard_id).ok_or_else(|| Rejection::UnknownKbShard(shard_id.clone()))?;
        if shard.state == to {
            return Ok(Effect::Unchanged);
        }
        if shard.state == KbShardState::Stopping {
            return Err(Rejection::KbShardStopping { shard_id: shard_id.clone(), to });
        }
        let from = std::mem::replace(&mut shard.state, to.clone());
        shard.state_since_ms = at_ms;
        Ok(Effect::KbShardStateChanged { shard_id: shard_id.clone(), from, to })
    }

    fn remove_kb_shard(&mut self, shard_id: ShardId) -> Result<Effect, Rejection> {
        if self.kb_shards.remove(&shard_id).is_none() {
            return Err(Rejection::UnknownKbShard(shard_id));
        }
        Ok(Effect::KbShardRemoved { shard_id })
    }

    // Checks shared by several commands.

    /// A node that is in the cluster (it may be in any status).
    fn existing_node(&self, node_id: NodeId) -> Result<&NodeRecord, Rejection> {
        match self.nodes.get(&node_id) {
            Some(node) => Ok(node),
            None if self.removed_node_ids.contains(&node_id) => Err(Rejection::NodeRemoved(node_id)),
            None => Err(Rejection::UnknownNode(node_id)),
        }
    }

    /// A node that may take new work.
    fn alive_node(&self, node_id: NodeId) -> Result<&NodeRecord, Rejection> {
        let node = self.existing_node(node_id)?;
        if node.status != NodeStatus::Alive {
            return Err(Rejection::NodeNotAlive { node_id, status: node.status });
        }
        Ok(node)
    }

    /// SCH-1 at apply time: each of `gpu_indices` exists on `node`, is listed once, and
    /// keeps `reserve_mib` free after promising `memory_per_gpu_mib` more. `released`
    /// is memory per GPU that the command gives back (a promise it replaces).
    fn check_gpu_promise(
        &self,
        node: &NodeRecord,
        gpu_indices: &[u32],
        memory_per_gpu_mib: u64,
        reserve_mib: u64,
        released: &BTreeMap<u32, u128>,
    ) -> Result<(), Rejection> {
        first_duplicate(gpu_indices.iter().copied())
            .map_or(Ok(()), |gpu_index| Err(Rejection::DuplicatePlacementGpu { gpu_index }))?;
        for &gpu_index in gpu_indices {
            let gpu = node.resources.gpu(gpu_index).ok_or(Rejection::UnknownGpu { node_id: node.id, gpu_index })?;
            let placed = self
                .gpu_memory_placed_exact_mib(node.id, gpu_index)
                .saturating_sub(released.get(&gpu_index).copied().unwrap_or(0));
            let free_mib =
                u128::from(gpu.memory_total_mib).saturating_sub(u128::from(reserve_mib)).saturating_sub(placed);
            if u128::from(memory_per_gpu_mib) > free_mib {
                return Err(Rejection::GpuMemoryExhausted {
                    node_id: node.id,
                    gpu_index,
                    need_mib: memory_per_gpu_mib,
                    free_mib: u64::try_from(free_mib).expect("free memory is at most a gpu's total"),
                    reserve_mib,
                });
            }
        }
        Ok(())
    }

    /// Memory placed on each GPU of a node that any replica or training job names.
    fn gpu_memory_placed_by_gpu(&self, node_id: NodeId) -> BTreeMap<u32, u64> {
        let mut placed: BTreeMap<u32, u64> = BTreeMap::new();
        for (gpu_index, mib) in self.gpu_holdings(node_id) {
            let sum = placed.entry(gpu_index).or_insert(0);
            *sum = sum.saturating_add(mib);
        }
        placed
    }
}

fn validate_deployment_spec(deployment_id: &DeploymentId, spec: &DeploymentSpec) -> Result<(), Rejection> {
    let invalid = |reason: String| Rejection::InvalidDeployment { deployment_id: deployment_id.clone(), reason };
    if spec.model_name.trim().is_empty() {
        return Err(invalid("the model name is empty".to_owned()));
    }
    if spec.model_version.trim().is_empty() {
        return Err(invalid("the model version is empty".to_owned()));
    }
    let request = &spec.request;
    if request.gpus_per_replica > 0 && request.memory_per_gpu_mib == 0 {
        return Err(invalid(format!(
            "it asks for {} gpus per replica and 0 MiB on each; set memory_per_gpu_mib",
            request.gpus_per_replica
        )));
    }
    Ok(())
}

/// The first value that occurs twice.
fn first_duplicate(values: impl IntoIterator<Item = u32>) -> Option<u32> {
    let mut seen = BTreeSet::new();
    values.into_iter().find(|value| !seen.insert(*value))
}
