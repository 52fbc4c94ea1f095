//! `maas bench gateway`: what the HTTP gateway adds to a request, and how many streams one
//! node holds. In this process: a one-node control plane with a tiny model deployed and its
//! replica Ready, the real gateway (routes, middleware, routing) on a loopback port, and the
//! replica's engine. A 1-token completion is timed straight on the engine and through
//! `POST /v1/completions` at several concurrencies; the difference of the medians and of
//! the 99th percentiles is the gateway's overhead. Then `streams` SSE chat streams are held
//! open at once and every one must end in `data: [DONE]`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use maas_actors::node::{ServingModel, ServingTable};
use maas_consensus::control::NoPeers;
use maas_consensus::state::{
    ClusterState, Command, DeploymentId, DeploymentSpec, NodeId, NodeResources, NodeSpec, PlacementStrategy, ReplicaId,
    ReplicaPlacement, ReplicaRequest, ReplicaState,
};
use maas_consensus::{DriverConfig, RaftHandle};
use maas_engine::{Engine, EngineOptions, GenerationEvent, GenerationRequest, SamplingParams};

#[derive(Debug, clap::Args)]
pub struct GatewayBench {
    /// Seconds of load at each concurrency.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients, comma-separated.
    #[arg(long, default_value = "1,64,512", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Streaming connections held open at once.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
}

async fn propose(handle: &RaftHandle<ClusterState>, command: Command) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match handle.propose(command.clone()).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(rejection)) => anyhow::bail!("{rejection}"),
            Err(err) if Instant::now() > deadline => return Err(err.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

pub(crate) fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Runs `clients` loops of `one` for `seconds`; returns sorted latencies and errors.
async fn load<F, Fut>(clients: usize, seconds: u64, one: F) -> (Vec<Duration>, usize)
where
    F: Fn() -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = bool> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            while Instant::now() < deadline {
                let started = Instant::now();
                if one().await {
                    latencies.push(started.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (latencies, failed) = task.await.unwrap_or_default();
        all.extend(latencies);
        errors += failed;
    }
    all.sort();
    (all, errors)
}

/// A node serving the tiny model as `tiny`: its engine, control plane and gateway url.
struct Serving {
    engine: Arc<Engine>,
    control: RaftHandle<ClusterState>,
    base: String,
    trigger: maas_gateway::ShutdownTrigger,
    /// The API key requests are sent with (authentication and quotas are on the path).
    key: String,
}

pub async fn gateway(args: &GatewayBench) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("maas-bench-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let serving = serve(&dir).await?;
    let mut report = format!(
        "gateway overhead: a 1-token completion of the tiny model, straight on the engine and through POST /v1/completions (loopback, {} s per row)\n",
        args.seconds
    );
    let _ = writeln!(
        report,
        "{:>11}  {:>12}  {:>10}  {:>10}  {:>12}  {:>12}  {:>6}",
        "concurrency", "requests/s", "engine p50", "engine p99", "overhead p50", "overhead p99", "errors"
    );
    for &clients in &args.concurrency {
        report.push_str(&overhead_row(&serving, clients, args.seconds).await?);
    }
    report.push_str(&hold_streams(&serving, args.streams).await?);
    serving.trigger.request();
    serving.trigger.request();
    serving.control.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

async fn serve(dir: &std::path::Path) -> Result<Serving> {
    let model = dir.join("tiny");
    maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 1)?;
    let options = EngineOptions { max_batch: 32, max_queue: 8192, ..EngineOptions::default() };
    let engine = Arc::new(Engine::load(&model, options).context("loading the tiny model")?);

    // A one-node control plane with the model deployed and its replica Ready.
    let config =
        DriverConfig { tick: Duration::from_millis(10), bootstrap_voters: Some(vec![1]), ..DriverConfig::new(1) };
    let storage = maas_consensus::storage::DiskStorage::open(&dir.join("raft"))?;
    let control = maas_consensus::driver::start(&config, storage, ClusterState::default(), Arc::new(NoPeers))?;
    control.campaign();
    let node = NodeSpec {
        id: NodeId(1),
        name: "bench".into(),
        api_addr: "http://127.0.0.1:1".into(),
        cluster_addr: "127.0.0.1:2".into(),
        labels: BTreeMap::new(),
        resources: NodeResources { cpu_cores: 2, memory_mib: 1024, gpus: Vec::new() },
    };
    propose(&control, Command::RegisterNode { node, at_ms: 1 }).await?;
    let spec = DeploymentSpec {
        serving: None,
        model_name: "tiny".into(),
        model_version: "v1".into(),
        model_path: None,
        request: ReplicaRequest { gpus_per_replica: 0, memory_per_gpu_mib: 0, cpu_fallback_allowed: true },
        strategy: PlacementStrategy::Binpack,
        node_selector: BTreeMap::new(),
        priority: 0,
        allow_preemption: false,
        owner: None,
        tenant_model: false,
    };
    propose(
        &control,
        Command::PutDeployment { deployment_id: DeploymentId("tiny".into()), spec, replicas: 1, at_ms: 2 },
    )
    .await?;
    let placement = ReplicaPlacement {
        replica_id: ReplicaId("tiny-1-1".into()),
        deployment_id: DeploymentId("tiny".into()),
        deployment_generation: 1,
        node_id: NodeId(1),
        gpu_indices: Vec::new(),
        memory_per_gpu_mib: 0,
    };
    propose(&control, Command::PlaceReplica { placement, gpu_reserve_mib: 0, at_ms: 3 }).await?;
    let ready =
        Command::SetReplicaState { replica_id: ReplicaId("tiny-1-1".into()), state: ReplicaState::Ready, at_ms: 4 };
    propose(&control, ready).await?;

    // The response cache would answer the benchmark's greedy requests without the engine:
    // off, so every request crosses the gateway to the replica.
    let options = maas_gateway::GatewayOptions {
        response_cache: maas_gateway::response_cache::ResponseCacheOptions {
            enabled: false,
            ..maas_gateway::response_cache::ResponseCacheOptions::default()
        },
        ..maas_gateway::GatewayOptions::default()
    };
    let state = Arc::new(maas_gateway::AppState::new("bench", options));
    let serving = ServingTable::default();
    serving.insert("tiny-1-1", ServingModel::Generator(Arc::clone(&engine)));
    let _ = state.serving.set(serving);
    let _ = state.cluster.set(control.clone());
    let (stores, key) = crate::bench_auth::tenant_with_key(dir).await?;
    let _ = state.stores.set(stores);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = maas_gateway::HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &maas_gateway::ServeOptions {
            max_body_bytes: 1 << 20,
            max_upload_bytes: 1 << 20,
            drain_timeout: Duration::from_secs(1),
            tls: None,
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let base = format!("http://{}", server.local_addr()?);
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    Ok(Serving { engine, control, base, trigger, key })
}

async fn overhead_row(serving: &Serving, clients: usize, seconds: u64) -> Result<String> {
    let (engine, base) = (&serving.engine, &serving.base);
    {
        let direct = {
            let engine = Arc::clone(engine);
            move || {
                let engine = Arc::clone(&engine);
                async move {
                    let request = GenerationRequest {
                        prompt: "hello".into(),
                        max_tokens: 1,
                        sampling: SamplingParams::greedy(),
                        ignore_eos: true,
                        ..GenerationRequest::default()
                    };
                    let Ok(mut events) = engine.submit(request) else { return false };
                    while let Some(event) = events.recv().await {
                        if let GenerationEvent::Done { .. } = event {
                            return true;
                        }
                    }
                    false
                }
            }
        };
        let (engine_latencies, _) = load(clients, seconds, direct).await;
        let client = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
        let url = format!("{base}/v1/completions");
        let key = serving.key.clone();
        let through = move || {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            async move {
                let body = serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 1, "temperature": 0});
                match client.post(&url).bearer_auth(&key).json(&body).send().await {
                    Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
        };
        let (http_latencies, errors) = load(clients, seconds, through).await;
        #[allow(clippy::cast_precision_loss)]
        let per_second = http_latencies.len() as f64 / seconds as f64;
        let (e50, e99) = (percentile(&engine_latencies, 0.5), percentile(&engine_latencies, 0.99));
        let (h50, h99) = (percentile(&http_latencies, 0.5), percentile(&http_latencies, 0.99));
        let line = format!(
            "{clients:>11}  {per_second:>12.0}  {e50:>10.2?}  {e99:>10.2?}  {:>12.2?}  {:>12.2?}  {errors:>6}\n",
            h50.saturating_sub(e50),
            h99.saturating_sub(e99)
        );
        eprint!("{line}");
        Ok(line)
    }
}

/// Holds `streams` SSE chat streams of 64 tokens at once; every one must end in [DONE].
async fn hold_streams(serving: &Serving, streams: usize) -> Result<String> {
    let (engine, base) = (&serving.engine, &serving.base);
    let client = reqwest::Client::builder().pool_max_idle_per_host(streams).build()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (client, url, key) = (client.clone(), format!("{base}/v1/chat/completions"), serving.key.clone());
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64, "stream": true});
            let Ok(response) = client.post(&url).bearer_auth(&key).json(&body).send().await else { return false };
            response.status().is_success() && response.text().await.is_ok_and(|text| text.trim_end().ends_with("[DONE]"))
        }));
    }
    let mut completed = 0;
    let mut peak_active = 0;
    for task in tasks {
        peak_active = peak_active.max(engine.stats().active_sequences + engine.stats().queue_depth);
        if task.await.unwrap_or(false) {
            completed += 1;
        }
    }
    Ok(format!(
        "{streams} concurrent SSE chat streams of 64 tokens: {completed} ended in [DONE], {} errors, in {:.2?}; at most {peak_active} sequences in the engine at once (it batches 32 and queues the rest)\n",
        streams - completed,
        started.elapsed()
    ))
}
