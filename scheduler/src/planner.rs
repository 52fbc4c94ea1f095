//! The planner: `(ClusterSnapshot, Demand) -> Plan`.
//!
//! The plan is built in two passes over a working copy of the cluster:
//!
//! 1. Stops, for every deployment: replicas on unhealthy or unknown nodes (they are
//!    replaced in pass 2), then extras beyond the desired count, most loaded node first.
//! 2. Places, deployment by deployment in priority order (highest first, then id): each
//!    missing replica goes to the best candidate of the deployment's strategy; when none
//!    fits and the deployment allows it, lower-priority preemptible replicas are stopped to
//!    make room (fewest stops first). The first replica that cannot be placed ends the
//!    deployment's turn, and the rest are reported as one [`Unplaceable`] with the reason
//!    and the closest miss.
//!
//! The best candidate is the least `(replicas of the deployment on the node if it spreads,
//! node is empty, free memory of the GPUs it would get, node id)`. Rather than scanning
//! every node for every replica, the working copy keeps every GPU of every healthy node in
//! one ordered index by `(node is empty, free MiB, node, GPU)`: a search walks it upwards
//! from the requested memory and stops as soon as no later GPU can beat the best node
//! found (an N-GPU replica gets at least N times the smallest fitting free memory of its
//! node). A spreading deployment is searched level by level, fewest of its replicas first.
//! CPU placements, preemption and explanations still look at every eligible node; they are
//! rare next to GPU places. `planner/reference.rs` keeps the plain scan as the test oracle
//! that every plan must equal.
//!
//! Every map is a `BTreeMap` and every tie is broken by ids, so the plan depends only on
//! the content of the input, not on the order of its vectors (SCH-3).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Result, ScheduleError};
use crate::invariants::sch1_holds;
use crate::types::{
    Action, Closest, ClusterSnapshot, Demand, DeploymentDemand, NodeView, PlacedReplica, Plan, ReplicaRequest,
    Strategy, Unplaceable,
};

#[cfg(test)]
mod equivalence;
#[cfg(test)]
mod reference;

/// Above this many preemption candidates on one node, victims are chosen greedily
/// (largest first, then pruned) instead of by exhaustive search for the fewest stops.
const EXHAUSTIVE_VICTIMS_MAX: usize = 12;

/// A spread level (the nodes holding the same number of the deployment's replicas) with at
/// most this many nodes is scanned node by node; a larger one is searched in the index.
const LEVEL_SCAN_MAX: usize = 64;

/// Checks that the input is well formed: node, replica and deployment ids are unique.
///
/// [`plan`] still returns a plan for malformed input (the first node or replica with a
/// duplicated id in the vector wins, and duplicated deployments are reported
/// unplaceable), but SCH-3's independence of input order only holds for valid input.
pub fn validate(snapshot: &ClusterSnapshot, demand: &Demand) -> Result<()> {
    let mut node_ids = BTreeSet::new();
    for node in &snapshot.nodes {
        if !node_ids.insert(node.id) {
            return Err(ScheduleError::DuplicateNode(node.id));
        }
    }
    let mut replica_ids = BTreeSet::new();
    for replica in &snapshot.replicas {
        if !replica_ids.insert(replica.replica_id.as_str()) {
            return Err(ScheduleError::DuplicateReplica(replica.replica_id.clone()));
        }
    }
    let mut deployment_ids = BTreeSet::new();
    for deployment in &demand.deployments {
        if !deployment_ids.insert(deployment.id.as_str()) {
            return Err(ScheduleError::DuplicateDeployment(deployment.id.clone()));
        }
    }
    Ok(())
}

/// Plans the actions that move `snapshot` towards `demand`.
///
/// Deterministic (SCH-3), never promises a GPU more than `total - reserve` (SCH-1), and
/// gives an N-GPU replica N distinct GPUs of one node (SCH-2). See the module
/// documentation for the order of work and [`crate::Strategy`] for the strategies.
pub fn plan(snapshot: &ClusterSnapshot, demand: &Demand) -> Plan {
    let mut deployments: Vec<&DeploymentDemand> = demand.deployments.iter().collect();
    deployments.sort_by(|a, b| (Reverse(a.priority), &a.id, *a).cmp(&(Reverse(b.priority), &b.id, *b)));
    let mut unplaceable = Vec::new();
    let mut unique: Vec<&DeploymentDemand> = Vec::with_capacity(deployments.len());
    for deployment in deployments {
        if unique.last().is_some_and(|last| last.id == deployment.id) {
            unplaceable.push(Unplaceable {
                deployment_id: deployment.id.clone(),
                missing_replicas: deployment.replicas,
                reason: ScheduleError::DuplicateDeployment(deployment.id.clone()).to_string(),
                closest: None,
            });
        } else {
            unique.push(deployment);
        }
    }

    let mut state = State::new(snapshot);
    state.demand_priority = unique.iter().map(|deployment| (deployment.id.as_str(), deployment.priority)).collect();
    for deployment in &unique {
        state.stop_unhealthy_and_extra(deployment);
    }
    for deployment in &unique {
        if let Some(short) = state.place_missing(deployment) {
            unplaceable.push(short);
        }
    }
    unplaceable.sort_by(|a, b| a.deployment_id.cmp(&b.deployment_id));
    let plan = Plan { actions: state.actions, unplaceable };
    debug_assert!(sch1_holds(snapshot, &plan), "SCH-1 broken by the planner");
    plan
}

/// One GPU in the working copy.
struct GpuState {
    index: u32,
    promisable_mib: u64,
    used_mib: u64,
}

impl GpuState {
    fn free_mib(&self) -> u64 {
        self.promisable_mib.saturating_sub(self.used_mib)
    }
}

/// A GPU in the free-memory index: (its node is empty, its free MiB, the node's slot, the
/// GPU's position on the node). Slots follow node ids and positions follow GPU indices, so
/// the index's order breaks ties as the candidate key does.
type FreeKey = (bool, u64, usize, usize);

/// One node in the working copy.
struct NodeState<'a> {
    view: &'a NodeView,
    cpu_free_cores: u32,
    memory_free_mib: u64,
    /// The node's GPUs by index; the first GPU of a duplicated index wins.
    gpus: Vec<GpuState>,
    /// Live and planned replicas of any deployment on this node.
    occupants: u32,
    /// Mean GPU utilisation in millionths, for choosing scale-down victims.
    load_millionths: u64,
}

impl NodeState<'_> {
    fn host_fits(&self, request: &ReplicaRequest) -> bool {
        self.cpu_free_cores >= request.cpu_cores && self.memory_free_mib >= request.memory_mib
    }

    fn is_empty(&self) -> bool {
        self.occupants == 0
    }

    fn gpu_position(&self, index: u32) -> Option<usize> {
        self.gpus.binary_search_by_key(&index, |gpu| gpu.index).ok()
    }

    fn free_by_gpu(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.gpus.iter().map(|gpu| (gpu.index, gpu.free_mib()))
    }

    /// The position of the GPU with the least free memory that still fits `need_mib`
    /// (then the lowest index): the node's first entry when the index is walked upwards.
    fn first_fitting(&self, need_mib: u64) -> Option<usize> {
        self.gpus
            .iter()
            .enumerate()
            .filter(|(_, gpu)| gpu.free_mib() >= need_mib)
            .min_by_key(|(position, gpu)| (gpu.free_mib(), *position))
            .map(|(position, _)| position)
    }

    fn free_keys(&self, slot: usize) -> impl Iterator<Item = FreeKey> + '_ {
        let empty = self.is_empty();
        self.gpus.iter().enumerate().map(move |(position, gpu)| (empty, gpu.free_mib(), slot, position))
    }

    /// Adds (`true`) or removes (`false`) a live replica's GPU memory and occupancy.
    fn hold(&mut self, replica: &PlacedReplica, add: bool) {
        for (n, index) in replica.gpu_indices.iter().enumerate() {
            // A GPU named twice holds the memory once.
            if replica.gpu_indices[..n].contains(index) {
                continue;
            }
            if let Some(position) = self.gpu_position(*index) {
                let gpu = &mut self.gpus[position];
                gpu.used_mib = if add {
                    gpu.used_mib.saturating_add(replica.memory_per_gpu_mib)
                } else {
                    gpu.used_mib.saturating_sub(replica.memory_per_gpu_mib)
                };
            }
        }
        self.occupants = if add { self.occupants.saturating_add(1) } else { self.occupants.saturating_sub(1) };
    }
}

/// A preemption option: its ordering key, the victims, and the GPUs the replica gets.
type Preemption<'a, K> = (K, Vec<&'a PlacedReplica>, Vec<u32>);

/// A place the planner could put one replica.
struct Candidate {
    node_id: u64,
    gpu_indices: Vec<u32>,
}

/// Live replicas by id.
type Live<'a> = BTreeMap<&'a str, &'a PlacedReplica>;

/// The working copy of the cluster, updated as actions are planned.
struct State<'a> {
    /// Every node in id order; a node's position here is its slot. The first node of a
    /// duplicated id wins.
    nodes: Vec<NodeState<'a>>,
    slots: BTreeMap<u64, usize>,
    /// Every GPU of every healthy node, kept in step with `nodes`.
    free_index: BTreeSet<FreeKey>,
    /// Live replicas by id; the first replica of a duplicated id wins.
    live: Live<'a>,
    /// The same, per deployment and per node id.
    live_by_deployment: BTreeMap<&'a str, Live<'a>>,
    live_by_node: BTreeMap<u64, Live<'a>>,
    /// Planned replicas per deployment and slot. A deployment has one turn unless its id is
    /// duplicated at different priorities; a later turn counts what earlier ones planned.
    planned: BTreeMap<&'a str, BTreeMap<usize, u32>>,
    /// The demanded priority of each deployment; it overrides the priority recorded on its
    /// replicas, which may be stale.
    demand_priority: BTreeMap<&'a str, i32>,
    /// Per distinct node selector, whether each slot is healthy and matches it.
    eligible_by_selector: BTreeMap<&'a BTreeMap<String, String>, Vec<bool>>,
    /// While a spreading deployment is placed: its live and planned replicas per slot, and
    /// the slots holding at least one, by that count.
    spread_counts: Vec<u32>,
    spread_levels: BTreeMap<u32, BTreeSet<usize>>,
    actions: Vec<Action>,
}

impl<'a> State<'a> {
    fn new(snapshot: &'a ClusterSnapshot) -> Self {
        let mut views: BTreeMap<u64, &'a NodeView> = BTreeMap::new();
        for view in &snapshot.nodes {
            views.entry(view.id).or_insert(view);
        }
        let mut nodes = Vec::with_capacity(views.len());
        let mut slots = BTreeMap::new();
        for (slot, view) in views.into_values().enumerate() {
            let mut gpus = BTreeMap::new();
            for gpu in &view.gpus {
                gpus.entry(gpu.index).or_insert(GpuState {
                    index: gpu.index,
                    promisable_mib: gpu.promisable_mib(),
                    used_mib: 0,
                });
            }
            let load_sum: f64 = view
                .gpus
                .iter()
                .map(|gpu| if gpu.load.is_finite() { f64::from(gpu.load.clamp(0.0, 1.0)) } else { 0.0 })
                .sum();
            let load_mean = if view.gpus.is_empty() {
                0.0
            } else {
                load_sum / f64::from(u32::try_from(view.gpus.len()).unwrap_or(u32::MAX))
            };
            slots.insert(view.id, slot);
            nodes.push(NodeState {
                view,
                cpu_free_cores: view.cpu_free_cores,
                memory_free_mib: view.memory_free_mib,
                gpus: gpus.into_values().collect(),
                occupants: 0,
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                load_millionths: (load_mean * 1e6).round() as u64,
            });
        }
        // Sorted and deduplicated up front, so that the maps are built in bulk; the sort is
        // stable, so the first replica of a duplicated id stays first and wins.
        let mut replicas: Vec<&'a PlacedReplica> = snapshot.replicas.iter().collect();
        replicas.sort_by_key(|replica| replica.replica_id.as_str());
        replicas.dedup_by_key(|replica| replica.replica_id.as_str());
        for replica in &replicas {
            if let Some(slot) = slots.get(&replica.node_id) {
                nodes[*slot].hold(replica, true);
            }
        }
        let live: Live<'a> = replicas.iter().map(|replica| (replica.replica_id.as_str(), *replica)).collect();
        replicas.sort_by_key(|replica| (replica.deployment_id.as_str(), replica.replica_id.as_str()));
        let live_by_deployment = replicas
            .chunk_by(|a, b| a.deployment_id == b.deployment_id)
            .map(|chunk| {
                (
                    chunk[0].deployment_id.as_str(),
                    chunk.iter().map(|replica| (replica.replica_id.as_str(), *replica)).collect(),
                )
            })
            .collect();
        replicas.sort_by_key(|replica| (replica.node_id, replica.replica_id.as_str()));
        let live_by_node = replicas
            .chunk_by(|a, b| a.node_id == b.node_id)
            .map(|chunk| {
                (chunk[0].node_id, chunk.iter().map(|replica| (replica.replica_id.as_str(), *replica)).collect())
            })
            .collect();
        let free_index = nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.view.healthy)
            .flat_map(|(slot, node)| node.free_keys(slot))
            .collect();
        let node_count = nodes.len();
        State {
            nodes,
            slots,
            free_index,
            live,
            live_by_deployment,
            live_by_node,
            planned: BTreeMap::new(),
            demand_priority: BTreeMap::new(),
            eligible_by_selector: BTreeMap::new(),
            spread_counts: vec![0; node_count],
            spread_levels: BTreeMap::new(),
            actions: Vec::new(),
        }
    }

    /// Changes a node and moves its GPUs in the free-memory index to match.
    fn update_node(&mut self, slot: usize, change: impl FnOnce(&mut NodeState<'a>)) {
        let node = &mut self.nodes[slot];
        if !node.view.healthy {
            change(node);
            return;
        }
        let before: Vec<FreeKey> = node.free_keys(slot).collect();
        change(node);
        for (old, new) in before.into_iter().zip(node.free_keys(slot)) {
            if old != new {
                self.free_index.remove(&old);
                self.free_index.insert(new);
            }
        }
    }

    fn node(&self, node_id: u64) -> Option<&NodeState<'a>> {
        self.slots.get(&node_id).map(|slot| &self.nodes[*slot])
    }

    /// A replica's priority for preemption: its deployment's demanded priority when the
    /// deployment is in the demand, else the priority recorded on the replica.
    fn effective_priority(&self, replica: &PlacedReplica) -> i32 {
        self.demand_priority.get(replica.deployment_id.as_str()).copied().unwrap_or(replica.priority)
    }

    fn stop(&mut self, replica_id: &str, reason: String) {
        let Some(replica) = self.live.remove(replica_id) else {
            return;
        };
        if let Some(of_deployment) = self.live_by_deployment.get_mut(replica.deployment_id.as_str()) {
            of_deployment.remove(replica_id);
        }
        if let Some(on_node) = self.live_by_node.get_mut(&replica.node_id) {
            on_node.remove(replica_id);
        }
        if let Some(slot) = self.slots.get(&replica.node_id).copied() {
            self.update_node(slot, |node| node.hold(replica, false));
        }
        self.actions.push(Action::Stop { replica_id: replica.replica_id.clone(), reason });
    }

    fn node_is_healthy(&self, node_id: u64) -> bool {
        self.node(node_id).is_some_and(|node| node.view.healthy)
    }

    /// Live replicas of a deployment, by id.
    fn live_of(&self, deployment_id: &str) -> impl Iterator<Item = &'a PlacedReplica> + '_ {
        self.live_by_deployment.get(deployment_id).into_iter().flat_map(BTreeMap::values).copied()
    }

    /// Live replicas of a deployment on healthy nodes, by id.
    fn running(&self, deployment_id: &str) -> Vec<&'a PlacedReplica> {
        self.live_of(deployment_id).filter(|replica| self.node_is_healthy(replica.node_id)).collect()
    }

    /// Pass 1 for one deployment: stop replicas on unhealthy nodes and scale down.
    fn stop_unhealthy_and_extra(&mut self, deployment: &DeploymentDemand) {
        let unhealthy: Vec<&'a PlacedReplica> =
            self.live_of(&deployment.id).filter(|replica| !self.node_is_healthy(replica.node_id)).collect();
        for replica in unhealthy {
            self.stop(
                &replica.replica_id,
                format!("node {} is unhealthy or gone; the replica is replaced elsewhere", replica.node_id),
            );
        }
        let mut running = self.running(&deployment.id);
        let desired = deployment.replicas as usize;
        if running.len() <= desired {
            return;
        }
        // Most loaded node first; then the node with the lowest id; then the highest
        // replica id, so the oldest-named replicas tend to survive.
        running.sort_by_key(|replica| {
            let load = self.node(replica.node_id).map_or(0, |node| node.load_millionths);
            (Reverse(load), replica.node_id, Reverse(replica.replica_id.as_str()))
        });
        let running_count = running.len();
        for replica in running.into_iter().take(running_count - desired) {
            self.stop(
                &replica.replica_id,
                format!("scale down {}: {running_count} running, {desired} desired", deployment.id),
            );
        }
    }

    /// Whether each slot is healthy and matches the selector, computed once per selector.
    /// The caller hands it back with [`State::return_eligible`].
    fn take_eligible(&mut self, selector: &'a BTreeMap<String, String>) -> Vec<bool> {
        self.eligible_by_selector.remove(selector).unwrap_or_else(|| {
            self.nodes
                .iter()
                .map(|node| {
                    node.view.healthy && selector.iter().all(|(key, value)| node.view.labels.get(key) == Some(value))
                })
                .collect()
        })
    }

    fn return_eligible(&mut self, selector: &'a BTreeMap<String, String>, eligible: Vec<bool>) {
        self.eligible_by_selector.insert(selector, eligible);
    }

    fn planned_total(&self, deployment_id: &str) -> usize {
        self.planned.get(deployment_id).map_or(0, |per_slot| per_slot.values().map(|n| *n as usize).sum())
    }

    /// Pass 2 for one deployment: place its missing replicas, preempting where allowed.
    fn place_missing(&mut self, deployment: &'a DeploymentDemand) -> Option<Unplaceable> {
        let have = self.running(&deployment.id).len() + self.planned_total(&deployment.id);
        let desired = deployment.replicas as usize;
        let missing = desired.saturating_sub(have);
        if missing == 0 {
            return None;
        }
        let eligible = self.take_eligible(&deployment.node_selector);
        let spread = deployment.strategy == Strategy::Spread;
        if spread {
            self.begin_spread(&deployment.id);
        }
        let short = self.place_replicas(deployment, &eligible, missing);
        if spread {
            self.end_spread();
        }
        self.return_eligible(&deployment.node_selector, eligible);
        short
    }

    fn place_replicas(
        &mut self,
        deployment: &'a DeploymentDemand,
        eligible: &[bool],
        missing: usize,
    ) -> Option<Unplaceable> {
        for placed in 0..missing {
            if let Some(candidate) = self.best_candidate(deployment, eligible) {
                self.commit(deployment, candidate);
                continue;
            }
            if deployment.allow_preemption
                && let Some((victims, candidate)) = self.best_preemption(deployment, eligible)
            {
                for victim in victims {
                    let reason = format!(
                        "preempted by {} (priority {} over {})",
                        deployment.id,
                        deployment.priority,
                        self.effective_priority(victim)
                    );
                    self.stop(&victim.replica_id, reason);
                }
                self.commit(deployment, candidate);
                continue;
            }
            let (error, closest) = self.explain(deployment, eligible);
            return Some(Unplaceable {
                deployment_id: deployment.id.clone(),
                missing_replicas: u32::try_from(missing - placed).unwrap_or(u32::MAX),
                reason: error.to_string(),
                closest,
            });
        }
        None
    }

    /// Counts a spreading deployment's live and planned replicas per slot. Preemption
    /// never stops a replica of the deployment being placed, so only its own places change
    /// the counts during its turn.
    fn begin_spread(&mut self, deployment_id: &str) {
        let mut counts: Vec<(usize, u32)> = self
            .live_of(deployment_id)
            .filter_map(|replica| self.slots.get(&replica.node_id).map(|slot| (*slot, 1)))
            .collect();
        counts.extend(self.planned.get(deployment_id).into_iter().flatten().map(|(slot, n)| (*slot, *n)));
        let mut touched = BTreeSet::new();
        for (slot, n) in counts {
            self.spread_counts[slot] += n;
            touched.insert(slot);
        }
        for slot in touched {
            self.spread_levels.entry(self.spread_counts[slot]).or_default().insert(slot);
        }
    }

    fn end_spread(&mut self) {
        for slots in std::mem::take(&mut self.spread_levels).into_values() {
            for slot in slots {
                self.spread_counts[slot] = 0;
            }
        }
    }

    fn count_spread(&mut self, slot: usize) {
        let count = self.spread_counts[slot];
        if count > 0
            && let Some(level) = self.spread_levels.get_mut(&count)
        {
            level.remove(&slot);
            if level.is_empty() {
                self.spread_levels.remove(&count);
            }
        }
        self.spread_counts[slot] = count + 1;
        self.spread_levels.entry(count + 1).or_default().insert(slot);
    }

    fn commit(&mut self, deployment: &'a DeploymentDemand, candidate: Candidate) {
        let request = &deployment.request;
        let memory_per_gpu_mib = if candidate.gpu_indices.is_empty() { 0 } else { request.memory_per_gpu_mib };
        if let Some(slot) = self.slots.get(&candidate.node_id).copied() {
            self.update_node(slot, |node| {
                node.cpu_free_cores = node.cpu_free_cores.saturating_sub(request.cpu_cores);
                node.memory_free_mib = node.memory_free_mib.saturating_sub(request.memory_mib);
                node.occupants = node.occupants.saturating_add(1);
                for index in &candidate.gpu_indices {
                    if let Some(position) = node.gpu_position(*index) {
                        let gpu = &mut node.gpus[position];
                        gpu.used_mib = gpu.used_mib.saturating_add(memory_per_gpu_mib);
                    }
                }
            });
            *self.planned.entry(&deployment.id).or_default().entry(slot).or_insert(0) += 1;
            if deployment.strategy == Strategy::Spread {
                self.count_spread(slot);
            }
        }
        self.actions.push(Action::Place {
            deployment_id: deployment.id.clone(),
            node_id: candidate.node_id,
            gpu_indices: candidate.gpu_indices,
            memory_per_gpu_mib,
        });
    }

    /// The best place for one more replica without stopping anything.
    fn best_candidate(&self, deployment: &DeploymentDemand, eligible: &[bool]) -> Option<Candidate> {
        let request = &deployment.request;
        if request.gpus > 0 {
            let best = match deployment.strategy {
                Strategy::Binpack => self.search_index(request, eligible, |_| true),
                Strategy::Spread => self.search_spread(request, eligible),
            };
            if best.is_some() || !request.allow_cpu_fallback {
                return best;
            }
        }
        // CPU placement: best fit on host memory.
        let spread = deployment.strategy == Strategy::Spread;
        self.nodes
            .iter()
            .enumerate()
            .filter(|(slot, node)| eligible[*slot] && node.host_fits(request))
            .map(|(slot, node)| {
                let count = if spread { self.spread_counts[slot] } else { 0 };
                (count, node.is_empty(), node.memory_free_mib, slot)
            })
            .min()
            .map(|(_, _, _, slot)| Candidate { node_id: self.nodes[slot].view.id, gpu_indices: Vec::new() })
    }

    /// The best GPU place for a spreading deployment: the first level (nodes holding the
    /// same number of its replicas, fewest first) with any place at all.
    fn search_spread(&self, request: &ReplicaRequest, eligible: &[bool]) -> Option<Candidate> {
        let counted: usize = self.spread_levels.values().map(BTreeSet::len).sum();
        if counted < self.nodes.len()
            && let Some(best) = self.search_index(request, eligible, |slot| self.spread_counts[slot] == 0)
        {
            return Some(best);
        }
        self.spread_levels.iter().find_map(|(count, slots)| {
            if slots.len() <= LEVEL_SCAN_MAX {
                self.search_slots(request, eligible, slots)
            } else {
                self.search_index(request, eligible, |slot| self.spread_counts[slot] == *count)
            }
        })
    }

    /// The best GPU place among the eligible nodes that `admit` accepts, by walking the
    /// free-memory index: occupied nodes first, then empty ones, each from the requested
    /// memory upwards.
    fn search_index(
        &self,
        request: &ReplicaRequest,
        eligible: &[bool],
        admit: impl Fn(usize) -> bool,
    ) -> Option<Candidate> {
        let need_mib = request.memory_per_gpu_mib;
        let gpus = u64::from(request.gpus);
        for empty in [false, true] {
            let mut best: Option<(u64, usize, Vec<u32>)> = None;
            for &(_, free_mib, slot, position) in
                self.free_index.range((empty, need_mib, 0, 0)..=(empty, u64::MAX, usize::MAX, usize::MAX))
            {
                // This node, and every node first met after it, gives the replica at least
                // `gpus` times `free_mib`, and later nodes with as much have higher ids.
                if let Some((best_fit_mib, best_slot, _)) = &best
                    && let Some(bound_mib) = gpus.checked_mul(free_mib)
                    && (bound_mib, slot) > (*best_fit_mib, *best_slot)
                {
                    break;
                }
                let node = &self.nodes[slot];
                // A node is looked at once, at its first entry in this walk.
                if !eligible[slot]
                    || !node.host_fits(request)
                    || node.first_fitting(need_mib) != Some(position)
                    || !admit(slot)
                {
                    continue;
                }
                if let Some((gpu_indices, fit_mib)) = choose_gpus(node.free_by_gpu(), request.gpus, need_mib)
                    && best
                        .as_ref()
                        .is_none_or(|(best_fit_mib, best_slot, _)| (fit_mib, slot) < (*best_fit_mib, *best_slot))
                {
                    best = Some((fit_mib, slot, gpu_indices));
                }
            }
            if let Some((_, slot, gpu_indices)) = best {
                return Some(Candidate { node_id: self.nodes[slot].view.id, gpu_indices });
            }
        }
        None
    }

    /// The best GPU place among a few nodes, looking at each.
    fn search_slots(&self, request: &ReplicaRequest, eligible: &[bool], slots: &BTreeSet<usize>) -> Option<Candidate> {
        slots
            .iter()
            .filter(|slot| eligible[**slot] && self.nodes[**slot].host_fits(request))
            .filter_map(|slot| {
                let node = &self.nodes[*slot];
                let (gpu_indices, fit_mib) = choose_gpus(node.free_by_gpu(), request.gpus, request.memory_per_gpu_mib)?;
                Some(((node.is_empty(), fit_mib, *slot), gpu_indices))
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|((_, _, slot), gpu_indices)| Candidate { node_id: self.nodes[slot].view.id, gpu_indices })
    }

    /// The cheapest preemption that makes room for one GPU replica: the fewest victims,
    /// then the lowest sum of their priorities, then the lowest node id. CPU replicas never
    /// preempt, since the snapshot does not say how much host capacity a replica holds.
    fn best_preemption(
        &self,
        deployment: &DeploymentDemand,
        eligible: &[bool],
    ) -> Option<(Vec<&'a PlacedReplica>, Candidate)> {
        let request = &deployment.request;
        if request.gpus == 0 {
            return None;
        }
        let mut best: Option<Preemption<'a, (usize, i64, u64)>> = None;
        for (slot, node) in self.nodes.iter().enumerate() {
            if !eligible[slot] || !node.host_fits(request) {
                continue;
            }
            let candidates: Vec<&'a PlacedReplica> = self
                .live_by_node
                .get(&node.view.id)
                .into_iter()
                .flat_map(BTreeMap::values)
                .copied()
                .filter(|replica| {
                    replica.deployment_id != deployment.id
                        && replica.preemptible
                        && self.effective_priority(replica) < deployment.priority
                        && !replica.gpu_indices.is_empty()
                })
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let free: BTreeMap<u32, u64> = node.free_by_gpu().collect();
            let priorities: BTreeMap<&str, i32> =
                candidates.iter().map(|victim| (victim.replica_id.as_str(), self.effective_priority(victim))).collect();
            let Some((victims, gpu_indices)) = cheapest_victims(&free, &candidates, &priorities, request) else {
                continue;
            };
            let priority_sum = victims.iter().map(|v| i64::from(priorities[v.replica_id.as_str()])).sum();
            let key = (victims.len(), priority_sum, node.view.id);
            if best.as_ref().is_none_or(|(best_key, _, _)| key < *best_key) {
                best = Some((key, victims, gpu_indices));
            }
        }
        best.map(|((_, _, node_id), victims, gpu_indices)| (victims, Candidate { node_id, gpu_indices }))
    }

    /// Why one more replica of the deployment cannot be placed, and the closest miss.
    #[allow(clippy::too_many_lines)]
    fn explain(&self, deployment: &DeploymentDemand, eligible: &[bool]) -> (ScheduleError, Option<Closest>) {
        let request = &deployment.request;
        let deployment_id = deployment.id.clone();
        let matching: Vec<&NodeState<'_>> =
            self.nodes.iter().enumerate().filter(|(slot, _)| eligible[*slot]).map(|(_, node)| node).collect();
        if matching.is_empty() {
            let selector = if deployment.node_selector.is_empty() {
                "no selector".to_owned()
            } else {
                deployment
                    .node_selector
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            return (ScheduleError::NoEligibleNode { deployment_id, selector }, None);
        }
        let host_ok: Vec<&NodeState<'_>> = matching.iter().copied().filter(|node| node.host_fits(request)).collect();
        if host_ok.is_empty() || request.gpus == 0 {
            let closest_node = matching
                .iter()
                .min_by_key(|node| {
                    (
                        request.memory_mib.saturating_sub(node.memory_free_mib),
                        request.cpu_cores.saturating_sub(node.cpu_free_cores),
                        node.view.id,
                    )
                })
                .expect("matching is not empty");
            return (
                ScheduleError::HostResourcesShort {
                    deployment_id,
                    cpu_cores: request.cpu_cores,
                    memory_mib: request.memory_mib,
                    node_id: closest_node.view.id,
                    cpu_free_cores: closest_node.cpu_free_cores,
                    memory_free_mib: closest_node.memory_free_mib,
                },
                Some(Closest {
                    node_id: closest_node.view.id,
                    gpu_index: None,
                    free_mib: closest_node.memory_free_mib,
                    short_by_mib: request.memory_mib.saturating_sub(closest_node.memory_free_mib),
                }),
            );
        }
        let need = request.gpus as usize;
        // On each node, the limiting GPU is the one with the N-th most free memory.
        let closest = host_ok
            .iter()
            .filter_map(|node| {
                let mut free: Vec<(u64, u32)> = node.gpus.iter().map(|gpu| (gpu.free_mib(), gpu.index)).collect();
                free.sort_by_key(|(free_mib, index)| (Reverse(*free_mib), *index));
                let (free_mib, gpu_index) = *free.get(need - 1)?;
                Some(Closest {
                    node_id: node.view.id,
                    gpu_index: Some(gpu_index),
                    free_mib,
                    short_by_mib: request.memory_per_gpu_mib.saturating_sub(free_mib),
                })
            })
            .min_by_key(|closest| (closest.short_by_mib, closest.node_id));
        if request.allow_multi_node {
            return (
                ScheduleError::MultiNodeUnsupported {
                    deployment_id,
                    gpus: request.gpus,
                    need_mib: request.memory_per_gpu_mib,
                },
                closest,
            );
        }
        let Some(closest) = closest else {
            let most = host_ok.iter().map(|node| u32::try_from(node.gpus.len()).unwrap_or(u32::MAX)).max().unwrap_or(0);
            return (ScheduleError::NotEnoughGpus { deployment_id, gpus: request.gpus, most }, None);
        };
        (
            ScheduleError::NoGpuFits {
                deployment_id,
                need_mib: request.memory_per_gpu_mib,
                gpus: request.gpus,
                node_id: closest.node_id,
                gpu_index: closest.gpu_index.unwrap_or(0),
                free_mib: closest.free_mib,
                short_mib: closest.short_by_mib,
            },
            Some(closest),
        )
    }
}

/// Chooses `count` distinct GPUs with at least `need_mib` free each, from `(index, free
/// MiB)` pairs in index order; returns their indices, sorted, and their free memory summed.
///
/// One GPU: best fit (the least free memory that fits, then the lowest index). Several
/// GPUs: those that could hold the most further replicas of this size first (then the
/// least free memory, then the lowest index); plain best fit would strand capacity, e.g.
/// with room for 1, 1 and 2 replicas it would pair the two small GPUs and fit one
/// 2-GPU replica instead of two.
fn choose_gpus(free_by_gpu: impl Iterator<Item = (u32, u64)>, count: u32, need_mib: u64) -> Option<(Vec<u32>, u64)> {
    let fitting = free_by_gpu.filter(|(_, free)| *free >= need_mib);
    if count == 1 {
        // The same choice as sorting by (free, index), without the allocation.
        let (index, free) = fitting.min_by_key(|(index, free)| (*free, *index))?;
        return Some((vec![index], free));
    }
    let mut fitting: Vec<(u32, u64)> = fitting.collect();
    if fitting.len() < count as usize || count == 0 {
        return None;
    }
    let units = |free: u64| free.checked_div(need_mib).unwrap_or(u64::MAX);
    fitting.sort_by_key(|(index, free)| (Reverse(units(*free)), *free, *index));
    fitting.truncate(count as usize);
    let fit_mib = fitting.iter().map(|(_, free)| *free).sum();
    let mut chosen: Vec<u32> = fitting.into_iter().map(|(index, _)| index).collect();
    chosen.sort_unstable();
    Some((chosen, fit_mib))
}

/// The fewest victims (then the lowest sum of priorities, then the first by replica id)
/// whose memory, once freed, makes room for the request on this node.
fn cheapest_victims<'a>(
    free_by_gpu: &BTreeMap<u32, u64>,
    candidates: &[&'a PlacedReplica],
    priorities: &BTreeMap<&str, i32>,
    request: &ReplicaRequest,
) -> Option<(Vec<&'a PlacedReplica>, Vec<u32>)> {
    let fits_without = |victims: &[&PlacedReplica]| {
        let mut free = free_by_gpu.clone();
        for victim in victims {
            let gpu_indices: BTreeSet<u32> = victim.gpu_indices.iter().copied().collect();
            for index in gpu_indices {
                if let Some(free_mib) = free.get_mut(&index) {
                    *free_mib = free_mib.saturating_add(victim.memory_per_gpu_mib);
                }
            }
        }
        choose_gpus(free.into_iter(), request.gpus, request.memory_per_gpu_mib).map(|(gpu_indices, _)| gpu_indices)
    };
    if candidates.len() <= EXHAUSTIVE_VICTIMS_MAX {
        let mut best: Option<Preemption<'a, (u32, i64, Reverse<u32>)>> = None;
        for mask in 1u32..(1 << candidates.len()) {
            let victims: Vec<&'a PlacedReplica> = candidates
                .iter()
                .enumerate()
                .filter(|(bit, _)| mask & (1 << bit) != 0)
                .map(|(_, victim)| *victim)
                .collect();
            let priority_sum: i64 = victims.iter().map(|v| i64::from(priorities[v.replica_id.as_str()])).sum();
            // With the bits reversed, the first replica id is the highest bit; `Reverse`
            // then makes sets naming earlier replica ids sort first.
            let key = (mask.count_ones(), priority_sum, Reverse(mask.reverse_bits()));
            if best.as_ref().is_some_and(|(best_key, _, _)| *best_key <= key) {
                continue;
            }
            if let Some(gpu_indices) = fits_without(&victims) {
                best = Some((key, victims, gpu_indices));
            }
        }
        return best.map(|(_, victims, gpu_indices)| (victims, gpu_indices));
    }
    // Greedy: the lowest priority and largest memory first, then drop any victim that
    // turns out not to be needed.
    let mut ordered = candidates.to_vec();
    ordered.sort_by_key(|victim| {
        (priorities[victim.replica_id.as_str()], Reverse(victim.memory_per_gpu_mib), victim.replica_id.as_str())
    });
    let mut victims = Vec::new();
    for victim in ordered {
        victims.push(victim);
        if fits_without(&victims).is_some() {
            break;
        }
    }
    fits_without(&victims)?;
    let mut index = victims.len();
    while index > 0 {
        index -= 1;
        let mut without = victims.clone();
        without.remove(index);
        if fits_without(&without).is_some() {
            victims = without;
        }
    }
    let gpu_indices = fits_without(&victims)?;
    Some((victims, gpu_indices))
}
