//! The planner as it was before the free-memory index: every node is scanned for every
//! replica. It is kept as the oracle that the indexed planner in `planner.rs` must agree
//! with action for action (see `planner/equivalence.rs`), unchanged apart from this header
//! and without `validate`, which did not change and lives on in `planner.rs`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::error::ScheduleError;
use crate::invariants::sch1_holds;
use crate::types::{
    Action, Closest, ClusterSnapshot, Demand, DeploymentDemand, NodeView, PlacedReplica, Plan, Strategy, Unplaceable,
};

/// Above this many preemption candidates on one node, victims are chosen greedily
/// (largest first, then pruned) instead of by exhaustive search for the fewest stops.
const EXHAUSTIVE_VICTIMS_MAX: usize = 12;

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
    state.demand_priority = unique.iter().map(|deployment| (deployment.id.clone(), deployment.priority)).collect();
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
    promisable_mib: u64,
    used_mib: u64,
}

impl GpuState {
    fn free_mib(&self) -> u64 {
        self.promisable_mib.saturating_sub(self.used_mib)
    }
}

/// One node in the working copy.
struct NodeState<'a> {
    view: &'a NodeView,
    cpu_free_cores: u32,
    memory_free_mib: u64,
    gpus: BTreeMap<u32, GpuState>,
    /// Live and planned replicas of any deployment on this node.
    occupants: u32,
    /// Mean GPU utilisation in millionths, for choosing scale-down victims.
    load_millionths: u64,
}

impl NodeState<'_> {
    fn matches(&self, deployment: &DeploymentDemand) -> bool {
        self.view.healthy
            && deployment.node_selector.iter().all(|(key, value)| self.view.labels.get(key) == Some(value))
    }

    fn host_fits(&self, deployment: &DeploymentDemand) -> bool {
        self.cpu_free_cores >= deployment.request.cpu_cores && self.memory_free_mib >= deployment.request.memory_mib
    }

    fn free_by_gpu(&self) -> BTreeMap<u32, u64> {
        self.gpus.iter().map(|(index, gpu)| (*index, gpu.free_mib())).collect()
    }
}

/// A preemption option: its ordering key, the victims, and the GPUs the replica gets.
type Preemption<'a, K> = (K, Vec<&'a PlacedReplica>, Vec<u32>);

/// A place the planner could put one replica.
struct Candidate {
    node_id: u64,
    gpu_indices: Vec<u32>,
}

/// The working copy of the cluster, updated as actions are planned.
struct State<'a> {
    nodes: BTreeMap<u64, NodeState<'a>>,
    live: BTreeMap<&'a str, &'a PlacedReplica>,
    /// Planned replicas per deployment and node.
    planned: BTreeMap<String, BTreeMap<u64, u32>>,
    /// The demanded priority of each deployment; it overrides the priority recorded on its
    /// replicas, which may be stale.
    demand_priority: BTreeMap<String, i32>,
    actions: Vec<Action>,
}

impl<'a> State<'a> {
    fn new(snapshot: &'a ClusterSnapshot) -> Self {
        let mut nodes = BTreeMap::new();
        for view in &snapshot.nodes {
            nodes.entry(view.id).or_insert_with(|| {
                let mut gpus = BTreeMap::new();
                for gpu in &view.gpus {
                    gpus.entry(gpu.index).or_insert(GpuState { promisable_mib: gpu.promisable_mib(), used_mib: 0 });
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
                NodeState {
                    view,
                    cpu_free_cores: view.cpu_free_cores,
                    memory_free_mib: view.memory_free_mib,
                    gpus,
                    occupants: 0,
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    load_millionths: (load_mean * 1e6).round() as u64,
                }
            });
        }
        let mut state = State {
            nodes,
            live: BTreeMap::new(),
            planned: BTreeMap::new(),
            demand_priority: BTreeMap::new(),
            actions: Vec::new(),
        };
        for replica in &snapshot.replicas {
            if state.live.contains_key(replica.replica_id.as_str()) {
                continue;
            }
            state.live.insert(&replica.replica_id, replica);
            state.hold(replica, true);
        }
        state
    }

    /// Adds (`true`) or removes (`false`) a live replica's GPU memory and occupancy.
    fn hold(&mut self, replica: &PlacedReplica, add: bool) {
        let Some(node) = self.nodes.get_mut(&replica.node_id) else {
            return;
        };
        let gpu_indices: BTreeSet<u32> = replica.gpu_indices.iter().copied().collect();
        for index in gpu_indices {
            if let Some(gpu) = node.gpus.get_mut(&index) {
                gpu.used_mib = if add {
                    gpu.used_mib.saturating_add(replica.memory_per_gpu_mib)
                } else {
                    gpu.used_mib.saturating_sub(replica.memory_per_gpu_mib)
                };
            }
        }
        node.occupants = if add { node.occupants.saturating_add(1) } else { node.occupants.saturating_sub(1) };
    }

    /// A replica's priority for preemption: its deployment's demanded priority when the
    /// deployment is in the demand, else the priority recorded on the replica.
    fn effective_priority(&self, replica: &PlacedReplica) -> i32 {
        self.demand_priority.get(&replica.deployment_id).copied().unwrap_or(replica.priority)
    }

    fn stop(&mut self, replica_id: &str, reason: String) {
        if let Some(replica) = self.live.remove(replica_id) {
            self.hold(replica, false);
            self.actions.push(Action::Stop { replica_id: replica.replica_id.clone(), reason });
        }
    }

    fn node_is_healthy(&self, node_id: u64) -> bool {
        self.nodes.get(&node_id).is_some_and(|node| node.view.healthy)
    }

    /// Live replicas of a deployment on healthy nodes, by id.
    fn running(&self, deployment_id: &str) -> Vec<&'a PlacedReplica> {
        self.live
            .values()
            .filter(|replica| replica.deployment_id == deployment_id && self.node_is_healthy(replica.node_id))
            .copied()
            .collect()
    }

    /// Pass 1 for one deployment: stop replicas on unhealthy nodes and scale down.
    fn stop_unhealthy_and_extra(&mut self, deployment: &DeploymentDemand) {
        let unhealthy: Vec<&'a PlacedReplica> = self
            .live
            .values()
            .filter(|replica| replica.deployment_id == deployment.id && !self.node_is_healthy(replica.node_id))
            .copied()
            .collect();
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
            let load = self.nodes.get(&replica.node_id).map_or(0, |node| node.load_millionths);
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

    fn planned_on(&self, deployment_id: &str, node_id: u64) -> u32 {
        self.planned.get(deployment_id).and_then(|per_node| per_node.get(&node_id)).copied().unwrap_or(0)
    }

    fn planned_total(&self, deployment_id: &str) -> usize {
        self.planned.get(deployment_id).map_or(0, |per_node| per_node.values().map(|n| *n as usize).sum())
    }

    /// Replicas of the deployment (live and planned) on a node, for spreading.
    fn deployment_count_on(&self, deployment_id: &str, node_id: u64) -> u32 {
        let live = self
            .live
            .values()
            .filter(|replica| replica.deployment_id == deployment_id && replica.node_id == node_id)
            .count();
        u32::try_from(live).unwrap_or(u32::MAX).saturating_add(self.planned_on(deployment_id, node_id))
    }

    /// Pass 2 for one deployment: place its missing replicas, preempting where allowed.
    fn place_missing(&mut self, deployment: &DeploymentDemand) -> Option<Unplaceable> {
        let have = self.running(&deployment.id).len() + self.planned_total(&deployment.id);
        let desired = deployment.replicas as usize;
        let missing = desired.saturating_sub(have);
        for placed in 0..missing {
            if let Some(candidate) = self.best_candidate(deployment) {
                self.commit(deployment, candidate);
                continue;
            }
            if deployment.allow_preemption
                && let Some((victims, candidate)) = self.best_preemption(deployment)
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
            let (error, closest) = self.explain(deployment);
            return Some(Unplaceable {
                deployment_id: deployment.id.clone(),
                missing_replicas: u32::try_from(missing - placed).unwrap_or(u32::MAX),
                reason: error.to_string(),
                closest,
            });
        }
        None
    }

    fn commit(&mut self, deployment: &DeploymentDemand, candidate: Candidate) {
        let request = &deployment.request;
        let memory_per_gpu_mib = if candidate.gpu_indices.is_empty() { 0 } else { request.memory_per_gpu_mib };
        if let Some(node) = self.nodes.get_mut(&candidate.node_id) {
            node.cpu_free_cores = node.cpu_free_cores.saturating_sub(request.cpu_cores);
            node.memory_free_mib = node.memory_free_mib.saturating_sub(request.memory_mib);
            node.occupants = node.occupants.saturating_add(1);
            for index in &candidate.gpu_indices {
                if let Some(gpu) = node.gpus.get_mut(index) {
                    gpu.used_mib = gpu.used_mib.saturating_add(memory_per_gpu_mib);
                }
            }
        }
        *self.planned.entry(deployment.id.clone()).or_default().entry(candidate.node_id).or_insert(0) += 1;
        self.actions.push(Action::Place {
            deployment_id: deployment.id.clone(),
            node_id: candidate.node_id,
            gpu_indices: candidate.gpu_indices,
            memory_per_gpu_mib,
        });
    }

    /// The ordering key of a candidate on a node: smaller is better.
    fn candidate_key(
        &self,
        deployment: &DeploymentDemand,
        node: &NodeState<'_>,
        fit_free_mib: u64,
    ) -> (u32, bool, u64, u64) {
        let spread = match deployment.strategy {
            Strategy::Binpack => 0,
            Strategy::Spread => self.deployment_count_on(&deployment.id, node.view.id),
        };
        (spread, node.occupants == 0, fit_free_mib, node.view.id)
    }

    /// The best place for one more replica without stopping anything.
    fn best_candidate(&self, deployment: &DeploymentDemand) -> Option<Candidate> {
        let request = &deployment.request;
        let eligible: Vec<&NodeState<'_>> =
            self.nodes.values().filter(|node| node.matches(deployment) && node.host_fits(deployment)).collect();
        if request.gpus > 0 {
            let best = eligible
                .iter()
                .filter_map(|node| {
                    let free = node.free_by_gpu();
                    let gpu_indices = choose_gpus(&free, request.gpus, request.memory_per_gpu_mib)?;
                    let fit_free_mib = gpu_indices.iter().map(|index| free[index]).sum();
                    Some((self.candidate_key(deployment, node, fit_free_mib), gpu_indices))
                })
                .min_by(|a, b| a.0.cmp(&b.0));
            if let Some((key, gpu_indices)) = best {
                return Some(Candidate { node_id: key.3, gpu_indices });
            }
            if !request.allow_cpu_fallback {
                return None;
            }
        }
        // CPU placement: best fit on host memory.
        eligible
            .iter()
            .map(|node| self.candidate_key(deployment, node, node.memory_free_mib))
            .min()
            .map(|key| Candidate { node_id: key.3, gpu_indices: Vec::new() })
    }

    /// The cheapest preemption that makes room for one GPU replica: the fewest victims,
    /// then the lowest sum of their priorities, then the lowest node id. CPU replicas never
    /// preempt, since the snapshot does not say how much host capacity a replica holds.
    fn best_preemption(&self, deployment: &DeploymentDemand) -> Option<(Vec<&'a PlacedReplica>, Candidate)> {
        let request = &deployment.request;
        if request.gpus == 0 {
            return None;
        }
        let mut best: Option<Preemption<'a, (usize, i64, u64)>> = None;
        for node in self.nodes.values() {
            if !node.matches(deployment) || !node.host_fits(deployment) {
                continue;
            }
            let candidates: Vec<&'a PlacedReplica> = self
                .live
                .values()
                .filter(|replica| {
                    replica.node_id == node.view.id
                        && replica.deployment_id != deployment.id
                        && replica.preemptible
                        && self.effective_priority(replica) < deployment.priority
                        && !replica.gpu_indices.is_empty()
                })
                .copied()
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let free = node.free_by_gpu();
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
    fn explain(&self, deployment: &DeploymentDemand) -> (ScheduleError, Option<Closest>) {
        let request = &deployment.request;
        let deployment_id = deployment.id.clone();
        let matching: Vec<&NodeState<'_>> = self.nodes.values().filter(|node| node.matches(deployment)).collect();
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
        let host_ok: Vec<&NodeState<'_>> = matching.iter().copied().filter(|node| node.host_fits(deployment)).collect();
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
                let mut free: Vec<(u64, u32)> = node.gpus.iter().map(|(index, gpu)| (gpu.free_mib(), *index)).collect();
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

/// Chooses `count` distinct GPUs with at least `need_mib` free each, sorted by index.
///
/// One GPU: best fit (the least free memory that fits, then the lowest index). Several
/// GPUs: those that could hold the most further replicas of this size first (then the
/// least free memory, then the lowest index); plain best fit would strand capacity, e.g.
/// with room for 1, 1 and 2 replicas it would pair the two small GPUs and fit one
/// 2-GPU replica instead of two.
fn choose_gpus(free_by_gpu: &BTreeMap<u32, u64>, count: u32, need_mib: u64) -> Option<Vec<u32>> {
    let mut fitting: Vec<(u32, u64)> =
        free_by_gpu.iter().filter(|(_, free)| **free >= need_mib).map(|(index, free)| (*index, *free)).collect();
    if fitting.len() < count as usize || count == 0 {
        return None;
    }
    if count == 1 {
        fitting.sort_by_key(|(index, free)| (*free, *index));
    } else {
        let units = |free: u64| free.checked_div(need_mib).unwrap_or(u64::MAX);
        fitting.sort_by_key(|(index, free)| (Reverse(units(*free)), *free, *index));
    }
    let mut chosen: Vec<u32> = fitting.into_iter().take(count as usize).map(|(index, _)| index).collect();
    chosen.sort_unstable();
    Some(chosen)
}

/// The fewest victims (then the lowest sum of priorities, then the first by replica id)
/// whose memory, once freed, makes room for the request on this node.
fn cheapest_victims<'a>(
    free_by_gpu: &BTreeMap<u32, u64>,
    candidates: &[&'a PlacedReplica],
    priorities: &BTreeMap<&str, i32>,
    request: &crate::types::ReplicaRequest,
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
        choose_gpus(&free, request.gpus, request.memory_per_gpu_mib)
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
