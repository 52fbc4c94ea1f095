//! The deployments API over HTTP against a real one-node control plane: each change is
//! committed through raft; bad input, a missing cookie and unknown names get clear 4xx
//! answers and change nothing; the estimate reads a real (tiny) model's files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use maas_consensus::control::NoPeers;
use maas_consensus::state::{ClusterState, Command, GpuRecord, NodeId, NodeResources, NodeSpec};
use maas_consensus::storage::DiskStorage;
use maas_consensus::{DriverConfig, RaftHandle};
use maas_gateway::{AppState, GatewayOptions, HttpServer, ServeOptions};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const COOKIE: &str = "deployments-test-cookie";

struct Setup {
    base: String,
    control: RaftHandle<ClusterState>,
    dir: tempfile::TempDir,
    /// Held so the server runs for the whole test.
    _serving: maas_gateway::ShutdownTrigger,
}

async fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config =
        DriverConfig { tick: Duration::from_millis(10), bootstrap_voters: Some(vec![1]), ..DriverConfig::new(1) };
    let control = maas_consensus::driver::start(
        &config,
        DiskStorage::open(&dir.path().join("raft")).unwrap(),
        ClusterState::default(),
        Arc::new(NoPeers),
    )
    .unwrap();
    control.campaign();
    let gpu = |index| GpuRecord { index, model: "H100".into(), memory_total_mib: 81920, simulated: true };
    let node = NodeSpec {
        id: NodeId(1),
        name: "node-1".into(),
        api_addr: "http://127.0.0.1:1".into(),
        cluster_addr: "127.0.0.1:2".into(),
        labels: BTreeMap::new(),
        resources: NodeResources { cpu_cores: 8, memory_mib: 65536, gpus: vec![gpu(0), gpu(1)] },
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(control.propose(Command::RegisterNode { node: node.clone(), at_ms: 1 }).await, Ok(Ok(_))) {
        assert!(Instant::now() < deadline, "the node registers");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let state = Arc::new(AppState::new("test-node", GatewayOptions::default()));
    let db =
        maas_store::Db::connect(&maas_store::DbOptions::new(maas_store::db::sqlite_url_in(dir.path()))).await.unwrap();
    db.migrate().await.unwrap();
    let blobs = maas_store::BlobStore::open(dir.path().join("blobs")).await.unwrap();
    let _ = state.stores.set(maas_gateway::state::Stores { db, blobs, data_dir: dir.path().to_owned() });
    let _ = state.cluster.set(control.clone());
    let _ = state.cluster_cookie.set(COOKIE.to_owned());
    let _ = state.gpu_reserve_mib.set(1024);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: 1 << 20,
            max_upload_bytes: 0,
            drain_timeout: Duration::from_secs(1),
            tls: None,
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let base = format!("http://{}", server.local_addr().unwrap());
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    Setup { base, control, dir, _serving: trigger }
}

async fn call(
    setup: &Setup,
    method: reqwest::Method,
    path: &str,
    cookie: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", setup.base));
    if let Some(cookie) = cookie {
        request = request.header("x-maas-cluster-cookie", cookie);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn deployments_in_state(setup: &Setup) -> usize {
    setup.control.read_local(|state| state.deployments().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deployment_requests_get_a_clear_4xx_and_change_nothing() {
    let setup = start().await;
    let post = reqwest::Method::POST;
    let ok = json!({"name": "chat", "model": "llama", "memory_per_gpu_mib": 30000});
    let cases: Vec<(Option<&str>, Value, u16, &str)> = vec![
        (None, ok.clone(), 401, "api key"),
        (Some("wrong-cookie-000"), ok.clone(), 401, "cookie"),
        (
            Some(COOKIE),
            json!({"name": "chat", "model": "llama", "memory_per_gpu_mib": 30000, "colour": "red"}),
            400,
            "colour",
        ),
        (
            Some(COOKIE),
            json!({"name": "chat", "model": "llama", "replicas": "two", "memory_per_gpu_mib": 1}),
            400,
            "replicas",
        ),
        (Some(COOKIE), json!({"name": "Chat!", "model": "llama", "memory_per_gpu_mib": 30000}), 400, "lowercase"),
        (Some(COOKIE), json!({"name": "chat", "model": "llama"}), 400, "not in the repository"),
        (Some(COOKIE), json!({"name": "chat", "model": "llama", "memory_per_gpu_mib": 100}), 400, "maas model import"),
        (Some(COOKIE), json!({"name": "chat", "model": "llama", "model_path": "relative/dir"}), 400, "absolute"),
        (Some(COOKIE), json!({"name": "chat", "model": "llama", "model_path": "/nonexistent/model"}), 400, "estimate"),
        (
            Some(COOKIE),
            json!({"name": "chat", "model": "llama", "replicas": 5000, "memory_per_gpu_mib": 1}),
            400,
            "at most",
        ),
        (Some(COOKIE), json!({"name": "chat", "model": "llama", "memory_per_gpu_mib": 0}), 400, "above 0"),
    ];
    for (cookie, body, status, mention) in cases {
        let (got, answer) = call(&setup, post.clone(), "/v1/deployments", cookie, Some(body.clone())).await;
        assert_eq!(got, status, "{body} → {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mention), "{body}: {message:?} should mention {mention}");
    }
    assert_eq!(deployments_in_state(&setup), 0, "nothing was committed");

    let missing = [
        (reqwest::Method::GET, "/v1/deployments/ghost", None),
        (reqwest::Method::PATCH, "/v1/deployments/ghost", Some(json!({"replicas": 2}))),
        (reqwest::Method::DELETE, "/v1/deployments/ghost", None),
        (reqwest::Method::POST, "/v1/nodes/9/drain", None),
    ];
    for (method, path, body) in missing {
        let (got, answer) = call(&setup, method.clone(), path, Some(COOKIE), body).await;
        assert_eq!(got, 404, "{method} {path} → {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_estimated_created_scaled_explained_and_deleted() {
    let setup = start().await;
    let model = setup.dir.path().join("tiny");
    maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 3).unwrap();
    let path = model.display().to_string();

    // The estimate, before deploying: the model's own figures, and where it would go.
    let (status, estimate) = call(
        &setup,
        reqwest::Method::POST,
        "/v1/deployments/estimate",
        Some(COOKIE),
        Some(json!({"model_path": path, "context_tokens": 512, "concurrent_sequences": 2})),
    )
    .await;
    assert_eq!(status, 200, "{estimate}");
    assert_eq!(estimate["model"]["architecture"], "LlamaForCausalLM");
    let total = estimate["model"]["estimate"]["total_mib"].as_u64().unwrap();
    assert_eq!(estimate["memory_per_gpu_mib"].as_u64(), Some(total));
    assert_eq!(estimate["fits_on_node"], 1);

    let body = json!({"name": "tiny", "model": "tiny", "model_path": path, "replicas": 2, "context_tokens": 512, "concurrent_sequences": 2});
    let (status, created) =
        call(&setup, reqwest::Method::POST, "/v1/deployments", Some(COOKIE), Some(body.clone())).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["memory_per_gpu_mib"].as_u64(), Some(total), "the estimate sized the replicas");
    assert_eq!(created["generation"], 1);
    let (status, again) = call(&setup, reqwest::Method::POST, "/v1/deployments", Some(COOKIE), Some(body)).await;
    assert_eq!(status, 409, "{again}");

    // Scaling past the room left is explained: which GPU came closest, by how much.
    import(&setup, &model, "big").await;
    let huge = json!({"model": "big", "memory_per_gpu_mib": 60000, "replicas": 3});
    let (status, updated) = call(&setup, reqwest::Method::PUT, "/v1/deployments/tiny", Some(COOKIE), Some(huge)).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["generation"], 2, "a new spec is a new generation");
    assert_eq!(updated["model_version"], "v1", "the version is pinned, not `latest`");
    let (_, listed) = call(&setup, reqwest::Method::GET, "/v1/deployments", Some(COOKIE), None).await;
    let shortfall = &listed["deployments"][0]["shortfall"];
    assert_eq!(shortfall["missing_replicas"], 1, "two GPUs hold two 60000 MiB replicas: {listed}");
    assert!(shortfall["reason"].as_str().unwrap().contains("60000"), "{shortfall}");
    assert!(shortfall["short_by_mib"].as_u64().is_some_and(|mib| mib > 0), "{shortfall}");

    let (status, scaled) =
        call(&setup, reqwest::Method::PATCH, "/v1/deployments/tiny", Some(COOKIE), Some(json!({"replicas": 1}))).await;
    assert_eq!(status, 200, "{scaled}");
    assert_eq!(scaled["replicas_desired"], 1);
    assert_eq!(scaled["generation"], 2, "scaling is not a new generation");

    // Drain and undrain the node.
    let (status, drained) = call(&setup, reqwest::Method::POST, "/v1/nodes/1/drain", Some(COOKIE), None).await;
    assert_eq!((status, drained["status"].as_str()), (200, Some("draining")), "{drained}");
    let (status, back) = call(&setup, reqwest::Method::DELETE, "/v1/nodes/1/drain", Some(COOKIE), None).await;
    assert_eq!((status, back["status"].as_str()), (200, Some("alive")), "{back}");

    let (status, _) = call(&setup, reqwest::Method::DELETE, "/v1/deployments/tiny", Some(COOKIE), None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&setup, reqwest::Method::GET, "/v1/deployments/tiny", Some(COOKIE), None).await;
    assert_eq!(status, 404);
    assert_eq!(deployments_in_state(&setup), 0);

    // Every change is in the audit log, with what it was on.
    let (status, audit) = call(&setup, reqwest::Method::GET, "/v1/admin/audit?limit=100", Some(COOKIE), None).await;
    assert_eq!(status, 200, "{audit}");
    let entries: Vec<(&str, &str)> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    for expected in [
        ("model.register", "big:v1"),
        ("deployment.create", "tiny"),
        ("deployment.update", "tiny"),
        ("deployment.scale", "tiny"),
        ("node.drain", "1"),
        ("node.undrain", "1"),
        ("deployment.delete", "tiny"),
    ] {
        assert!(entries.contains(&expected), "{expected:?} is audited: {entries:?}");
    }
    assert_eq!(entries.iter().filter(|(action, _)| action.starts_with("deployment.")).count(), 4, "refusals are not");
    setup.control.stop();
}

/// Uploads the model folder's files as blobs and registers them as model `name`.
async fn import(setup: &Setup, dir: &std::path::Path, name: &str) -> Value {
    let client = reqwest::Client::new();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let size = bytes.len();
        let reply: Value = client
            .post(format!("{}/v1/blobs", setup.base))
            .header("x-maas-cluster-cookie", COOKIE)
            .body(bytes)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        files.push(
            json!({"path": path.file_name().unwrap().to_str().unwrap(), "sha256": reply["sha256"], "size_bytes": size}),
        );
    }
    let (status, record) = call(
        setup,
        reqwest::Method::POST,
        "/v1/registry/models",
        Some(COOKIE),
        Some(json!({"name": name, "files": files})),
    )
    .await;
    assert_eq!(status, 201, "{record}");
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_uploaded_checked_registered_and_served_to_peers() {
    let setup = start().await;
    let model = setup.dir.path().join("tiny");
    maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 5).unwrap();
    let record = import(&setup, &model, "org/tiny-llama").await;
    assert_eq!(record["version"], "v1");
    assert_eq!(record["architecture"], "LlamaForCausalLM");
    assert_eq!(record["format"], "safetensors");
    assert_eq!(record["context_length"], 512);
    assert!(record["parameters"].as_u64().is_some_and(|p| p > 50_000), "{record}");
    assert_eq!(record["tasks"], json!(["chat", "completion"]));
    let again = import(&setup, &model, "org/tiny-llama").await;
    assert_eq!(again["version"], "v2", "the same files again are a new version");

    let (_, listed) = call(&setup, reqwest::Method::GET, "/v1/registry/models", Some(COOKIE), None).await;
    assert_eq!(listed["versions"].as_array().unwrap().len(), 2);

    // A blob served to a peer, whole and from an offset (a resumed download).
    let weights =
        record["files"].as_array().unwrap().iter().find(|f| f["path"] == "model.safetensors").unwrap().clone();
    let sha = weights["sha256"].as_str().unwrap();
    let expected = std::fs::read(model.join("model.safetensors")).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/blobs/{sha}", setup.base);
    let whole = client.get(&url).header("x-maas-cluster-cookie", COOKIE).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.bytes().await.unwrap().as_ref(), expected.as_slice());
    let tail =
        client.get(&url).header("x-maas-cluster-cookie", COOKIE).header("range", "bytes=1000-").send().await.unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap().as_ref(), &expected[1000..]);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 403, "peers present the cookie");
    let missing = format!("{}/v1/blobs/{}", setup.base, "0".repeat(64));
    assert_eq!(client.get(&missing).header("x-maas-cluster-cookie", COOKIE).send().await.unwrap().status(), 404);

    // Registration refuses blobs never uploaded and files that are not a model.
    let (status, answer) = call(
        &setup,
        reqwest::Method::POST,
        "/v1/registry/models",
        Some(COOKIE),
        Some(json!({"name": "ghost", "files": [{"path": "config.json", "sha256": "1".repeat(64), "size_bytes": 3}]})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("was not uploaded"), "{answer}");
    let note: Value = client
        .post(format!("{}/v1/blobs", setup.base))
        .header("x-maas-cluster-cookie", COOKIE)
        .body("just some notes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (status, answer) = call(
        &setup,
        reqwest::Method::POST,
        "/v1/registry/models",
        Some(COOKIE),
        Some(json!({"name": "notes", "files": [{"path": "notes.txt", "sha256": note["sha256"], "size_bytes": 15}]})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("config.json"), "{answer}");
    let (status, answer) = call(
        &setup,
        reqwest::Method::POST,
        "/v1/registry/models",
        Some(COOKIE),
        Some(json!({"name": "evil", "files": [{"path": "../../etc/x", "sha256": note["sha256"], "size_bytes": 15}]})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let (_, listed) = call(&setup, reqwest::Method::GET, "/v1/registry/models", Some(COOKIE), None).await;
    assert_eq!(listed["versions"].as_array().unwrap().len(), 2, "refused registrations add nothing");

    // A deployment of the repository's model pins the newest version and is estimated
    // from its recorded config.
    let (status, created) = call(
        &setup,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(COOKIE),
        Some(json!({"name": "tiny", "model": "org/tiny-llama", "context_tokens": 512})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["model_version"], "v2");
    assert!(created["estimate"]["estimate"]["total_mib"].as_u64().is_some_and(|mib| mib > 512), "{created}");
    setup.control.stop();
}

/// A tiny Llama's files under `dir` with its config.json's `model_type` and
/// `architectures` replaced: what another architecture's registration records.
fn tiny_as(dir: &std::path::Path, model_type: &str, architecture: &str) {
    maas_engine::tiny::write_llama(dir, maas_engine::tiny::TinyShape::default(), 7).unwrap();
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["model_type"] = model_type.into();
    config["architectures"] = json!([architecture]);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_the_engine_cannot_run_are_refused_before_they_are_deployed() {
    let setup = start().await;
    let tiny = setup.dir.path().join("tiny");
    maas_engine::tiny::write_llama(&tiny, maas_engine::tiny::TinyShape::default(), 7).unwrap();
    import(&setup, &tiny, "tiny").await;
    for (name, model_type, architecture) in [
        ("glm", "chatglm", "ChatGLMModel"),
        ("glm-hf", "glm", "GlmForCausalLM"),
        ("phi", "phi3", "Phi3ForCausalLM"),
        ("mamba", "mamba", "MambaForCausalLM"),
    ] {
        let dir = setup.dir.path().join(name);
        tiny_as(&dir, model_type, architecture);
        import(&setup, &dir, name).await;
        // With memory given and without (the estimate): refused before either.
        for body in [
            json!({"name": name, "model": name, "memory_per_gpu_mib": 1000}),
            json!({"name": name, "model": name, "context_tokens": 512}),
        ] {
            let (status, answer) =
                call(&setup, reqwest::Method::POST, "/v1/deployments", Some(COOKIE), Some(body)).await;
            assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("model_not_servable")), "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(&format!("{architecture} (model_type {model_type})")), "{message}");
            assert!(message.contains("llama, mistral and qwen2") && message.contains("bert"), "{message}");
            assert_eq!(answer["error"]["param"], "model", "{answer}");
        }
    }
    assert_eq!(deployments_in_state(&setup), 0, "refused deployments change nothing");

    // An update onto such a model is refused and leaves the deployment as it was; an update
    // keeping the model is not checked again.
    let body = json!({"name": "chat", "model": "tiny", "memory_per_gpu_mib": 1000});
    let (status, created) = call(&setup, reqwest::Method::POST, "/v1/deployments", Some(COOKIE), Some(body)).await;
    assert_eq!(status, 201, "{created}");
    let onto_glm = json!({"model": "glm", "memory_per_gpu_mib": 1000});
    let (status, answer) =
        call(&setup, reqwest::Method::PUT, "/v1/deployments/chat", Some(COOKIE), Some(onto_glm)).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("model_not_servable")), "{answer}");
    let (_, unchanged) = call(&setup, reqwest::Method::GET, "/v1/deployments/chat", Some(COOKIE), None).await;
    assert_eq!((unchanged["model"].as_str(), unchanged["generation"].as_u64()), (Some("tiny"), Some(1)), "{unchanged}");
    let same = json!({"model": "tiny", "model_version": "v1", "memory_per_gpu_mib": 2000});
    let (status, updated) = call(&setup, reqwest::Method::PUT, "/v1/deployments/chat", Some(COOKIE), Some(same)).await;
    assert_eq!(status, 200, "{updated}");
    setup.control.stop();
}
