//! Placement throughput of the pure scheduler, the figures in BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release -p maas-scheduler --example plan_bench            # 11 and 31 runs
//! cargo run --release -p maas-scheduler --example plan_bench -- 3 5     # fewer runs
//! ```
//!
//! A seeded cluster of 1,000 nodes with 8 GPUs of 80 GiB each (zones and tiers as labels)
//! and a seeded demand of 10,000 replicas over several hundred deployments: 1-GPU replicas
//! with small and large memory requests, 2- and 4-GPU tensor-parallel replicas, binpack
//! and spread, some with node selectors. It measures (a) one `plan` from an empty cluster
//! that places every replica and (b) the re-plan after one node is lost, as the control
//! plane presents it (the node and its replicas left out of the snapshot), so that only
//! that node's replicas are placed again. Every plan is checked with SCH-1 and SCH-2, and
//! repeated plans must be equal (SCH-3), so the figures are for correct plans.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use maas_scheduler::{
    ClusterSnapshot, Demand, DeploymentDemand, GpuView, NodeView, Plan, ReplicaRequest, Strategy, apply, plan,
    sch1_holds, sch2_holds,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NODES: u64 = 1_000;
const GPUS_PER_NODE: u32 = 8;
const GPU_MEMORY_MIB: u64 = 80 * 1024;
const GPU_RESERVE_MIB: u64 = 512;
const NODE_CPU_CORES: u32 = 192;
const NODE_MEMORY_MIB: u64 = 2 * 1024 * 1024;
const REPLICAS: u32 = 10_000;
const SEED: u64 = 20_261_126;
const ZONES: [&str; 4] = ["zone-a", "zone-b", "zone-c", "zone-d"];

fn cluster() -> ClusterSnapshot {
    let nodes = (1..=NODES)
        .map(|id| {
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_owned(), ZONES[usize::try_from(id % 4).unwrap()].to_owned());
            labels.insert("tier".to_owned(), if id % 10 == 0 { "spot" } else { "reserved" }.to_owned());
            labels.insert("gpu".to_owned(), "a100-80g".to_owned());
            NodeView {
                id,
                labels,
                healthy: true,
                cpu_free_cores: NODE_CPU_CORES,
                memory_free_mib: NODE_MEMORY_MIB,
                gpus: (0..GPUS_PER_NODE)
                    .map(|index| GpuView {
                        index,
                        model: "A100 80GB".to_owned(),
                        memory_total_mib: GPU_MEMORY_MIB,
                        reserve_mib: GPU_RESERVE_MIB,
                        load: f32::from(u8::try_from((id + u64::from(index)) % 10).unwrap()) / 10.0,
                    })
                    .collect(),
            }
        })
        .collect();
    ClusterSnapshot { nodes, replicas: Vec::new() }
}

/// The kinds of deployment in the demand, with their share of deployments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Small,
    Large,
    TensorParallel2,
    TensorParallel4,
}

fn demand() -> (Demand, BTreeMap<Kind, u32>) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut deployments = Vec::new();
    let mut replicas_by_kind = BTreeMap::new();
    let mut total = 0;
    while total < REPLICAS {
        let roll = rng.random_range(0..100);
        let (kind, gpus, memory_per_gpu_mib, most_replicas) = match roll {
            0..50 => (Kind::Small, 1, rng.random_range(4..=24) * 1024, 24),
            50..75 => (Kind::Large, 1, rng.random_range(40..=72) * 1024, 16),
            75..90 => (Kind::TensorParallel2, 2, rng.random_range(30..=70) * 1024, 12),
            _ => (Kind::TensorParallel4, 4, rng.random_range(40..=70) * 1024, 8),
        };
        let replicas = rng.random_range(1..=most_replicas).min(REPLICAS - total);
        total += replicas;
        *replicas_by_kind.entry(kind).or_insert(0) += replicas;
        let node_selector = match rng.random_range(0..100) {
            0..15 => [("zone".to_owned(), ZONES[rng.random_range(0..ZONES.len())].to_owned())].into(),
            15..20 => [("tier".to_owned(), "reserved".to_owned())].into(),
            20..23 => [("tier".to_owned(), "reserved".to_owned()), ("gpu".to_owned(), "a100-80g".to_owned())].into(),
            _ => BTreeMap::new(),
        };
        deployments.push(DeploymentDemand {
            id: format!("d{:04}-{kind:?}", deployments.len()).to_lowercase(),
            replicas,
            request: ReplicaRequest {
                gpus,
                memory_per_gpu_mib,
                cpu_cores: 4 * gpus,
                memory_mib: 32 * 1024 * u64::from(gpus),
                allow_cpu_fallback: false,
                allow_multi_node: false,
            },
            strategy: if rng.random_bool(0.3) { Strategy::Spread } else { Strategy::Binpack },
            node_selector,
            priority: if rng.random_bool(0.1) { 10 } else { 0 },
            allow_preemption: false,
        });
    }
    (Demand { deployments }, replicas_by_kind)
}

/// The snapshot after the plan, as the control plane would present it: the plan's
/// replicas placed, and their host CPU and memory taken from their nodes.
fn placed(snapshot: &ClusterSnapshot, demand: &Demand, planned: &Plan) -> ClusterSnapshot {
    let mut after = apply(snapshot, planned);
    let requests: BTreeMap<&str, &ReplicaRequest> =
        demand.deployments.iter().map(|deployment| (deployment.id.as_str(), &deployment.request)).collect();
    let mut nodes: BTreeMap<u64, &mut NodeView> = after.nodes.iter_mut().map(|node| (node.id, node)).collect();
    for replica in &after.replicas {
        let request = requests[replica.deployment_id.as_str()];
        let node = nodes.get_mut(&replica.node_id).expect("placed on a known node");
        node.cpu_free_cores -= request.cpu_cores;
        node.memory_free_mib -= request.memory_mib;
    }
    after
}

/// Runs `plan` `runs` times, checks every plan equals the first (SCH-3), and returns the
/// plan with the sorted durations.
fn measure(snapshot: &ClusterSnapshot, demand: &Demand, runs: usize) -> (Plan, Vec<Duration>) {
    let mut first: Option<Plan> = None;
    let mut durations = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let planned = black_box(plan(black_box(snapshot), black_box(demand)));
        durations.push(started.elapsed());
        match &first {
            Some(first) => assert_eq!(first, &planned, "SCH-3: repeated plans differ"),
            None => first = Some(planned),
        }
    }
    durations.sort();
    (first.expect("at least one run"), durations)
}

fn check(label: &str, snapshot: &ClusterSnapshot, demand: &Demand, planned: &Plan) {
    assert!(sch1_holds(snapshot, planned), "{label}: SCH-1 broken");
    assert!(sch2_holds(demand, planned), "{label}: SCH-2 broken");
    assert!(planned.unplaceable.is_empty(), "{label}: left short: {:?}", planned.unplaceable);
}

fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn per_second(count: usize, duration: Duration) -> String {
    let rate = (count as f64 / duration.as_secs_f64()).round() as u64;
    // Thousands separators, as in BENCHMARKS.md.
    let digits = rate.to_string();
    let mut grouped = String::new();
    for (position, digit) in digits.chars().enumerate() {
        if position > 0 && (digits.len() - position).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn row(measure: &str, places: usize, durations: &[Duration]) {
    let median = durations[durations.len() / 2];
    let best = durations[0];
    println!(
        "| {measure} | {} | {} | {} | {} | {} |",
        durations.len(),
        millis(median),
        millis(best),
        per_second(places, median),
        per_second(places, best)
    );
}

fn main() {
    let mut args = std::env::args().skip(1).map(|arg| arg.parse::<usize>().expect("runs are whole numbers"));
    let full_runs = args.next().unwrap_or(11).max(1);
    let replan_runs = args.next().unwrap_or(31).max(1);

    let empty = cluster();
    let (demand, replicas_by_kind) = demand();
    let spread = demand.deployments.iter().filter(|d| d.strategy == Strategy::Spread).count();
    let selected = demand.deployments.iter().filter(|d| !d.node_selector.is_empty()).count();
    println!(
        "cluster: {NODES} nodes x {GPUS_PER_NODE} GPUs of {} GiB; demand: {REPLICAS} replicas in {} deployments \
         ({spread} spread, {selected} with a node selector); replicas by kind: {replicas_by_kind:?}",
        GPU_MEMORY_MIB / 1024,
        demand.deployments.len()
    );

    // (a) Everything from an empty cluster.
    let (full_plan, full_durations) = measure(&empty, &demand, full_runs);
    check("full plan", &empty, &demand, &full_plan);
    let full_places = full_plan.places().count();
    assert_eq!(full_places, REPLICAS as usize, "every replica is placed");

    // (b) The busiest node is lost: the control plane leaves it and its replicas out.
    let running = placed(&empty, &demand, &full_plan);
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for replica in &running.replicas {
        *per_node.entry(replica.node_id).or_insert(0) += 1;
    }
    let (lost_node, lost_replicas) =
        per_node.iter().max_by_key(|(node_id, count)| (**count, std::cmp::Reverse(**node_id))).expect("a busy node");
    let mut after_loss = running.clone();
    after_loss.nodes.retain(|node| node.id != *lost_node);
    after_loss.replicas.retain(|replica| replica.node_id != *lost_node);
    let (replan, replan_durations) = measure(&after_loss, &demand, replan_runs);
    check("re-plan", &after_loss, &demand, &replan);
    let replan_places = replan.places().count();
    assert_eq!(replan_places, *lost_replicas, "exactly the lost replicas are placed again");
    assert_eq!(replan.stops().count(), 0, "nothing else is stopped");

    println!();
    println!("| measure | runs | median | best | placements/s (median) | placements/s (best) |");
    println!("|---|---|---|---|---|---|");
    row(&format!("(a) plan from an empty cluster, {full_places} places"), full_places, &full_durations);
    row(
        &format!(
            "(b) re-plan after losing node {lost_node}, {replan_places} places, {} running",
            after_loss.replicas.len()
        ),
        replan_places,
        &replan_durations,
    );
    println!();
    println!("SCH-1 and SCH-2 hold for both plans; repeated plans are identical (SCH-3); nothing left unplaced.");
}
