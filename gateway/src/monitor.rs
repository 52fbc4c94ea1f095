//! Deployment monitoring: for each deployment, ten-second buckets over the last hour of
//! what this node's gateway answered (requests, errors, tokens, a latency histogram) and of
//! the load of this node's replicas (generated tokens per second, queue depth, active
//! sequences, sampled every [`SAMPLE_EVERY`]). Each node keeps its own; `GET
//! /v1/deployments/{id}/metrics` asks every live node for its buckets (`GET
//! /internal/monitor/{id}`) and adds them up, so the charts cover the whole cluster: each
//! request is counted by the node that answered it, each replica's load by the node that
//! runs it. Kept in memory: a restarted node starts its hour again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The width of one bucket.
pub const BUCKET_MS: u64 = 10_000;
/// Buckets kept: one hour.
pub const BUCKETS: usize = 360;
/// How often this node's replicas' load is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Upper bounds of the latency histogram's buckets, in milliseconds (the last one is open).
pub const LATENCY_BOUNDS_MS: [u64; 16] =
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, u64::MAX];

/// What one node gathers for one deployment over one bucket.
#[derive(Debug, Clone, Default)]
struct Accumulator {
    start_ms: u64,
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    latency: [u64; LATENCY_BOUNDS_MS.len()],
    samples: u64,
    tokens_per_second: f64,
    queue_depth: u64,
    active_sequences: u64,
    gpu_memory_mib: u64,
    /// Utilization summed over the replica-samples that had a measure, and their count.
    gpu_utilization_sum: f64,
    gpu_utilization_count: u64,
}

/// One node's figures for one bucket, as nodes send them to each other; buckets of the
/// same start from several nodes add up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeBucket {
    pub start_ms: u64,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Requests per latency bucket (see [`LATENCY_BOUNDS_MS`]).
    pub latency: Vec<u64>,
    /// Averages over the bucket's samples, summed over the node's replicas.
    pub tokens_per_second: f64,
    pub queue_depth: f64,
    pub active_sequences: f64,
    /// GPU memory the node's replicas hold (an average over the samples, summed).
    #[serde(default)]
    pub gpu_memory_mib: f64,
    /// The GPUs' utilization, summed over the replica-samples that had a measure, and
    /// their count (so nodes' figures average correctly).
    #[serde(default)]
    pub gpu_utilization_sum: f64,
    #[serde(default)]
    pub gpu_utilization_count: u64,
}

impl From<&Accumulator> for NodeBucket {
    fn from(a: &Accumulator) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let average = |sum: f64| if a.samples == 0 { 0.0 } else { sum / a.samples as f64 };
        #[allow(clippy::cast_precision_loss)]
        NodeBucket {
            start_ms: a.start_ms,
            requests: a.requests,
            errors: a.errors,
            prompt_tokens: a.prompt_tokens,
            completion_tokens: a.completion_tokens,
            latency: a.latency.to_vec(),
            tokens_per_second: average(a.tokens_per_second),
            queue_depth: average(a.queue_depth as f64),
            active_sequences: average(a.active_sequences as f64),
            gpu_memory_mib: average(a.gpu_memory_mib as f64),
            gpu_utilization_sum: a.gpu_utilization_sum,
            gpu_utilization_count: a.gpu_utilization_count,
        }
    }
}

impl NodeBucket {
    fn add(&mut self, other: &NodeBucket) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            *mine += theirs;
        }
        self.tokens_per_second += other.tokens_per_second;
        self.queue_depth += other.queue_depth;
        self.active_sequences += other.active_sequences;
        self.gpu_memory_mib += other.gpu_memory_mib;
        self.gpu_utilization_sum += other.gpu_utilization_sum;
        self.gpu_utilization_count += other.gpu_utilization_count;
    }
}

/// A bucket as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MetricsPoint {
    /// The bucket's start (Unix milliseconds).
    pub at_ms: u64,
    pub requests: u64,
    /// Answers with a status of 400 or more (499: the client went away).
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The median and 99th percentile latency, as the upper bound of the histogram bucket
    /// they fall in (1-2-5 steps from 1 ms to 60 s); none without requests.
    pub latency_p50_ms: Option<u64>,
    pub latency_p99_ms: Option<u64>,
    /// Generated tokens per second, queued requests and active sequences over all the
    /// deployment's replicas (averages over the bucket).
    pub tokens_per_second: f64,
    pub queue_depth: f64,
    pub active_sequences: f64,
    /// GPU memory held by the deployment's replicas, MiB (0 for replicas on CPU).
    pub gpu_memory_mib: f64,
    /// The average utilization of the GPUs its replicas run on, where the driver measures
    /// it (none for simulated GPUs and replicas on CPU).
    pub gpu_utilization_percent: Option<f64>,
}

/// The upper bound of the histogram bucket that holds quantile `q` of `counts`.
pub fn quantile_ms(counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (count, bound) in counts.iter().zip(LATENCY_BOUNDS_MS) {
        seen += count;
        if seen >= rank {
            // The open last bucket reports the last finite bound.
            return Some(if bound == u64::MAX { LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 2] } else { bound });
        }
    }
    None
}

/// Every node's buckets of one deployment added up, one point per bucket from `since_ms`
/// to `now_ms` (empty buckets included, so a chart's time axis is continuous).
pub fn merge(nodes: &[Vec<NodeBucket>], since_ms: u64, now_ms: u64) -> Vec<MetricsPoint> {
    let first = since_ms - since_ms % BUCKET_MS;
    let mut merged: BTreeMap<u64, NodeBucket> = BTreeMap::new();
    let mut start = first;
    while start <= now_ms {
        merged.insert(start, NodeBucket { start_ms: start, ..NodeBucket::default() });
        start += BUCKET_MS;
    }
    for bucket in nodes.iter().flatten() {
        if let Some(into) = merged.get_mut(&bucket.start_ms) {
            into.add(bucket);
        }
    }
    merged
        .into_values()
        .map(|b| MetricsPoint {
            at_ms: b.start_ms,
            requests: b.requests,
            errors: b.errors,
            prompt_tokens: b.prompt_tokens,
            completion_tokens: b.completion_tokens,
            latency_p50_ms: quantile_ms(&b.latency, 0.5),
            latency_p99_ms: quantile_ms(&b.latency, 0.99),
            tokens_per_second: b.tokens_per_second,
            queue_depth: b.queue_depth,
            active_sequences: b.active_sequences,
            gpu_memory_mib: b.gpu_memory_mib,
            #[allow(clippy::cast_precision_loss)]
            gpu_utilization_percent: (b.gpu_utilization_count > 0)
                .then(|| b.gpu_utilization_sum / b.gpu_utilization_count as f64),
        })
        .collect()
}

/// This node's buckets, per deployment.
#[derive(Debug, Default)]
pub struct Monitor(Mutex<HashMap<String, VecDeque<Accumulator>>>);

/// One replica's load at a sample.
#[derive(Debug, Clone, Copy)]
pub struct LoadSample {
    pub tokens_per_second: f64,
    pub queue_depth: usize,
    pub active_sequences: usize,
    /// What the replica holds on its GPUs, in all.
    pub gpu_memory_mib: u64,
    /// The average utilization of its GPUs, where measured.
    pub gpu_utilization_percent: Option<f64>,
}

impl Monitor {
    /// The bucket of deployment `deployment` that holds `at_ms`, made when missing; buckets
    /// older than an hour go.
    fn with_bucket(&self, deployment: &str, at_ms: u64, update: impl FnOnce(&mut Accumulator)) {
        let start_ms = at_ms - at_ms % BUCKET_MS;
        let mut all = self.0.lock().expect("monitor lock");
        // The key is allocated once per deployment, not once per request.
        if !all.contains_key(deployment) {
            all.insert(deployment.to_owned(), VecDeque::new());
        }
        let Some(buckets) = all.get_mut(deployment) else { return };
        // Records arrive in time order but for a few (a request is stamped when it ends):
        // look for the bucket from the newest back.
        let position = buckets.iter().rposition(|b| b.start_ms <= start_ms);
        match position {
            Some(at) if buckets[at].start_ms == start_ms => update(&mut buckets[at]),
            _ => {
                let mut bucket = Accumulator { start_ms, ..Accumulator::default() };
                update(&mut bucket);
                buckets.insert(position.map_or(0, |at| at + 1), bucket);
                let newest = buckets.back().map_or(start_ms, |b| b.start_ms);
                let oldest = newest.saturating_sub(BUCKET_MS * BUCKETS as u64);
                while buckets.front().is_some_and(|b| b.start_ms <= oldest) {
                    buckets.pop_front();
                }
            }
        }
    }

    /// A request that this node answered, when it ended.
    pub fn record_request(&self, deployment: &str, at_ms: u64, status: u16, latency_ms: u64, tokens: (u64, u64)) {
        self.with_bucket(deployment, at_ms, |bucket| {
            bucket.requests += 1;
            if status >= 400 {
                bucket.errors += 1;
            }
            bucket.prompt_tokens += tokens.0;
            bucket.completion_tokens += tokens.1;
            let slot = LATENCY_BOUNDS_MS.iter().position(|&bound| latency_ms <= bound).unwrap_or(0);
            bucket.latency[slot] += 1;
        });
    }

    /// One sample of this node's replicas' load, per deployment (every deployment with a
    /// replica here gets a sample, an idle one too).
    pub fn record_load(&self, at_ms: u64, loads: &HashMap<String, Vec<LoadSample>>) {
        for (deployment, replicas) in loads {
            self.with_bucket(deployment, at_ms, |bucket| {
                bucket.samples += 1;
                for load in replicas {
                    bucket.tokens_per_second += load.tokens_per_second;
                    bucket.queue_depth += load.queue_depth as u64;
                    bucket.active_sequences += load.active_sequences as u64;
                    bucket.gpu_memory_mib += load.gpu_memory_mib;
                    if let Some(percent) = load.gpu_utilization_percent {
                        bucket.gpu_utilization_sum += percent;
                        bucket.gpu_utilization_count += 1;
                    }
                }
            });
        }
    }

    /// This node's buckets of `deployment` from `since_ms` on.
    pub fn buckets(&self, deployment: &str, since_ms: u64) -> Vec<NodeBucket> {
        let all = self.0.lock().expect("monitor lock");
        all.get(deployment)
            .map(|buckets| buckets.iter().filter(|b| b.start_ms + BUCKET_MS > since_ms).map(NodeBucket::from).collect())
            .unwrap_or_default()
    }
}

/// Samples this node's replicas' load into the monitor every [`SAMPLE_EVERY`] until the
/// process ends.
pub async fn sample_loads(state: std::sync::Arc<crate::state::AppState>) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(handle) = state.cluster.get() else { continue };
        let loads = crate::load::local_loads(&state);
        if loads.is_empty() {
            continue;
        }
        // How busy each of this node's GPUs is, where the driver says.
        let utilization: HashMap<u32, u32> = state
            .agent
            .get()
            .map(|status| {
                let status = status.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                status.gpus.iter().filter_map(|gpu| Some((gpu.index, gpu.utilization_percent?))).collect()
            })
            .unwrap_or_default();
        let by_deployment: HashMap<String, Vec<LoadSample>> = handle.read_local(|cluster| {
            let mut by_deployment: HashMap<String, Vec<LoadSample>> = HashMap::new();
            for (replica_id, load) in &loads {
                let replica = maas_consensus::state::ReplicaId(replica_id.clone());
                if let Some(record) = cluster.replica(&replica) {
                    let measured: Vec<f64> =
                        record.gpu_indices.iter().filter_map(|i| utilization.get(i)).map(|p| f64::from(*p)).collect();
                    #[allow(clippy::cast_precision_loss)]
                    let gpu_utilization_percent =
                        (!measured.is_empty()).then(|| measured.iter().sum::<f64>() / measured.len() as f64);
                    by_deployment.entry(record.deployment_id.0.clone()).or_default().push(LoadSample {
                        tokens_per_second: load.tokens_per_second,
                        queue_depth: load.queue_depth,
                        active_sequences: load.active_sequences,
                        gpu_memory_mib: record.memory_per_gpu_mib * record.gpu_indices.len() as u64,
                        gpu_utilization_percent,
                    });
                }
            }
            by_deployment
        });
        state.monitor.record_load(u64::try_from(maas_store::ids::now_ms()).unwrap_or(0), &by_deployment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_the_bounds_of_the_buckets_they_fall_in() {
        let mut counts = vec![0; LATENCY_BOUNDS_MS.len()];
        assert_eq!(quantile_ms(&counts, 0.5), None);
        counts[2] = 98; // <= 5 ms
        counts[6] = 1; // <= 100 ms
        counts[15] = 1; // over 60 s
        assert_eq!(quantile_ms(&counts, 0.5), Some(5));
        assert_eq!(quantile_ms(&counts, 0.99), Some(100));
        assert_eq!(quantile_ms(&counts, 1.0), Some(60_000));
    }

    #[test]
    fn requests_and_loads_land_in_their_buckets_and_nodes_add_up() {
        let start = 1_000 * BUCKET_MS;
        let a = Monitor::default();
        a.record_request("chat", start + 5, 200, 3, (10, 5));
        a.record_request("chat", start + 9_999, 500, 150, (4, 0));
        a.record_request("chat", start + BUCKET_MS, 200, 1, (1, 1));
        a.record_request("other", start, 200, 1, (1, 1));
        // Node a's replicas hold 1,000 MiB each on GPUs that report 40% and 80% busy;
        // node b's holds 500 MiB on a GPU without a measure.
        let load = |tps: f64, queue: usize, mib: u64, busy: Option<f64>| LoadSample {
            tokens_per_second: tps,
            queue_depth: queue,
            active_sequences: 1,
            gpu_memory_mib: mib,
            gpu_utilization_percent: busy,
        };
        let (x, y) = (|tps, queue| load(tps, queue, 1000, Some(40.0)), |tps, queue| load(tps, queue, 1000, Some(80.0)));
        a.record_load(start + 100, &HashMap::from([("chat".to_owned(), vec![x(10.0, 2), y(30.0, 0)])]));
        a.record_load(start + 200, &HashMap::from([("chat".to_owned(), vec![x(20.0, 0), y(20.0, 0)])]));
        let b = Monitor::default();
        b.record_request("chat", start + 1, 200, 40, (2, 2));
        b.record_load(start + 300, &HashMap::from([("chat".to_owned(), vec![load(5.0, 1, 500, None)])]));

        let points = merge(&[a.buckets("chat", start), b.buckets("chat", start)], start, start + BUCKET_MS + 1);
        assert_eq!(points.len(), 2);
        let first = &points[0];
        assert_eq!((first.at_ms, first.requests, first.errors), (start, 3, 1));
        assert_eq!((first.prompt_tokens, first.completion_tokens), (16, 7));
        assert_eq!(first.latency_p50_ms, Some(50));
        assert_eq!(first.latency_p99_ms, Some(200));
        // Node a: two samples averaging 40 tokens/s and a queue of 1; node b: 5 and 1.
        assert!((first.tokens_per_second - 45.0).abs() < 1e-9, "{first:?}");
        assert!((first.queue_depth - 2.0).abs() < 1e-9, "{first:?}");
        assert!((first.active_sequences - 3.0).abs() < 1e-9, "{first:?}");
        // 2 x 1,000 MiB on node a and 500 on node b; the measured GPUs average 60%.
        assert!((first.gpu_memory_mib - 2500.0).abs() < 1e-9, "{first:?}");
        assert!(first.gpu_utilization_percent.is_some_and(|p| (p - 60.0).abs() < 1e-9), "{first:?}");
        let second = &points[1];
        assert_eq!((second.requests, second.errors, second.latency_p50_ms), (1, 0, Some(1)));
        assert!(second.tokens_per_second.abs() < 1e-9);
        assert_eq!(second.gpu_utilization_percent, None, "no sample, no measure");
    }

    #[test]
    fn an_hour_is_kept_and_empty_buckets_are_points_too() {
        let monitor = Monitor::default();
        let start = 5_000 * BUCKET_MS;
        for i in 0..(BUCKETS as u64 + 20) {
            monitor.record_request("chat", start + i * BUCKET_MS, 200, 1, (1, 1));
        }
        let kept = monitor.buckets("chat", 0);
        assert_eq!(kept.len(), BUCKETS);
        assert_eq!(kept[0].start_ms, start + 20 * BUCKET_MS);
        let points = merge(&[Vec::new()], start, start + 3 * BUCKET_MS);
        assert_eq!(points.len(), 4);
        assert!(points.iter().all(|p| p.requests == 0 && p.latency_p50_ms.is_none()));
    }
}
