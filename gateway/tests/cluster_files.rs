//! Files and batches on a cluster of two nodes in one process. Each node has its own
//! gateway on a loopback port, its own control plane (which lists both nodes, so each
//! finds the other as a peer) and its own blob store, as on its own disk; they share the
//! database, as a real cluster's nodes share PostgreSQL. A file uploaded to node A is read,
//! made a batch of and run through node B, and the batch's output, written on B, is read
//! through A: every read fetches the bytes from the peer that has them.
//!
//! Also the limits of batch files (line length, requests per file) through the upload,
//! and the tenant's input safety rules on `/v1/embeddings`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use maas_consensus::control::NoPeers;
use maas_consensus::state::{ClusterState, Command, GpuRecord, NodeId, NodeResources, NodeSpec};
use maas_consensus::storage::DiskStorage;
use maas_consensus::{DriverConfig, RaftHandle};
use maas_gateway::{AppState, GatewayOptions};
use serde_json::{Value, json};
use tokio::net::TcpListener;

mod common;

const COOKIE: &str = "cluster-files-test-cookie";

/// The upload limit of these nodes: room for a batch line over its 4 MiB limit.
const UPLOAD_LIMIT: u64 = 16 * 1024 * 1024;

struct Node {
    base: String,
    state: Arc<AppState>,
    _control: RaftHandle<ClusterState>,
    _serving: maas_gateway::ShutdownTrigger,
}

impl Node {
    fn blobs(&self) -> &maas_store::BlobStore {
        &self.state.stores.get().expect("the stores are open").blobs
    }
}

struct Cluster {
    a: Node,
    b: Node,
    dir: tempfile::TempDir,
}

/// Two nodes (ids 1 and 2) sharing one database, each with one simulated GPU.
async fn start_two() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let db =
        maas_store::Db::connect(&maas_store::DbOptions::new(maas_store::db::sqlite_url_in(dir.path()))).await.unwrap();
    db.migrate().await.unwrap();
    let listeners = [TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap()];
    let urls: Vec<String> = listeners.iter().map(|l| format!("http://{}", l.local_addr().unwrap())).collect();
    let specs: Vec<NodeSpec> = (1..=2_u64)
        .map(|id| NodeSpec {
            id: NodeId(id),
            name: format!("node-{id}"),
            api_addr: urls[usize::try_from(id).unwrap() - 1].clone(),
            cluster_addr: format!("127.0.0.1:{id}"),
            labels: BTreeMap::new(),
            resources: NodeResources {
                cpu_cores: 8,
                memory_mib: 65536,
                gpus: vec![GpuRecord { index: 0, model: "H100".into(), memory_total_mib: 81920, simulated: true }],
            },
        })
        .collect();
    let mut nodes = Vec::new();
    for (id, listener) in (1..=2_u64).zip(listeners) {
        let node_dir = dir.path().join(format!("node-{id}"));
        let config =
            DriverConfig { tick: Duration::from_millis(10), bootstrap_voters: Some(vec![id]), ..DriverConfig::new(id) };
        let control = maas_consensus::driver::start(
            &config,
            DiskStorage::open(&node_dir.join("raft")).unwrap(),
            ClusterState::default(),
            Arc::new(NoPeers),
        )
        .unwrap();
        control.campaign();
        for spec in &specs {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(control.propose(Command::RegisterNode { node: spec.clone(), at_ms: 1 }).await, Ok(Ok(_))) {
                assert!(Instant::now() < deadline, "node {id}'s control plane registers {}", spec.name);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let state = Arc::new(AppState::new(format!("node-{id}"), GatewayOptions::default()));
        let blobs = maas_store::BlobStore::open(node_dir.join("blobs")).await.unwrap();
        let _ = state.stores.set(maas_gateway::state::Stores { db: db.clone(), blobs, data_dir: node_dir });
        let _ = state.cluster.set(control.clone());
        let _ = state.cluster_cookie.set(COOKIE.to_owned());
        let _ = state.gpu_reserve_mib.set(1024);
        let (base, trigger) = common::serve_on(&state, listener, UPLOAD_LIMIT);
        nodes.push(Node { base, state, _control: control, _serving: trigger });
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    Cluster { a, b, dir }
}

/// A client acting as the nodes' built-in administrator (the cluster cookie).
fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-maas-cluster-cookie", reqwest::header::HeaderValue::from_static(COOKIE));
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

const BOUNDARY: &str = "maas-cluster-files-boundary";

/// Uploads `bytes` as a file for `purpose` to `node`, as the OpenAI SDK sends it.
async fn upload(node: &Node, purpose: &str, bytes: &[u8]) -> (u16, Value) {
    let mut body = format!(
        "--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
         content-type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let response = client()
        .post(format!("{}/v1/files", node.base))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn call(node: &Node, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client().request(method, format!("{}{path}", node.base));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `GET /v1/files/{id}/content` on `node`: the status and the bytes.
async fn content(node: &Node, id: &str) -> (u16, Vec<u8>) {
    let response = client().get(format!("{}/v1/files/{id}/content", node.base)).send().await.unwrap();
    (response.status().as_u16(), response.bytes().await.unwrap().to_vec())
}

/// A batch file of `count` chat requests to a model no node serves: each line's answer
/// is its 404, so a batch of it completes without a model.
fn batch_lines(prefix: &str, count: usize) -> Vec<u8> {
    let lines: Vec<String> = (0..count)
        .map(|i| {
            json!({"custom_id": format!("{prefix}-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "nowhere", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}})
            .to_string()
        })
        .collect();
    lines.join("\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_uploaded_to_one_node_is_read_through_the_other() {
    let cluster = start_two().await;
    // Several hundred KiB, so the fetch takes more than one chunk.
    let bytes: Vec<u8> = (0..400_000_u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
    let (status, file) = upload(&cluster.a, "user_data", &bytes).await;
    assert_eq!(status, 200, "{file}");
    let id = file["id"].as_str().unwrap();
    let digest = maas_store::Digest::of(&bytes);
    assert!(cluster.a.blobs().contains(&digest).await);
    assert!(!cluster.b.blobs().contains(&digest).await, "node B has its own disk");

    let (status, record) = call(&cluster.b, reqwest::Method::GET, &format!("/v1/files/{id}"), None).await;
    assert_eq!(status, 200, "{record}");
    let (status, read) = content(&cluster.b, id).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&read));
    assert!(read == bytes, "node B serves the bytes node A received");
    assert!(cluster.b.blobs().contains(&digest).await, "node B keeps what it fetched");
    assert!(!cluster.b.blobs().root().join("partial").join(digest.to_hex()).exists(), "no partial file is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_uploaded_to_one_node_is_created_and_run_on_the_other() {
    let cluster = start_two().await;
    // Only node B works on batches here, so every batch runs where its input was not
    // uploaded.
    let worker = maas_gateway::routes::batches::spawn_worker(Arc::clone(&cluster.b.state), "node-2".into());

    // Batch 1: uploaded to A, created through B (B reads the input to check it).
    let first_input = batch_lines("first", 3);
    let (status, first_file) = upload(&cluster.a, "batch", &first_input).await;
    assert_eq!(status, 200, "{first_file}");
    let create = |file: &Value| json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let (status, first) = call(&cluster.b, reqwest::Method::POST, "/v1/batches", Some(create(&first_file))).await;
    assert_eq!(status, 200, "creating a batch on a node that lacks its input: {first}");
    assert_eq!(first["request_counts"]["total"], 3, "{first}");

    // Batch 2: uploaded to and created through A; B's worker, which lacks the input,
    // takes it.
    let second_input = batch_lines("second", 2);
    let (status, second_file) = upload(&cluster.a, "batch", &second_input).await;
    assert_eq!(status, 200, "{second_file}");
    let (status, second) = call(&cluster.a, reqwest::Method::POST, "/v1/batches", Some(create(&second_file))).await;
    assert_eq!(status, 200, "{second}");
    assert!(!cluster.b.blobs().contains(&maas_store::Digest::of(&second_input)).await);

    for (batch, lines) in [(&first, 3), (&second, 2)] {
        let id = batch["id"].as_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let done = loop {
            let (_, now) = call(&cluster.a, reqwest::Method::GET, &format!("/v1/batches/{id}"), None).await;
            assert_ne!(now["status"], "failed", "{now}");
            if now["status"] == "completed" {
                break now;
            }
            assert!(Instant::now() < deadline, "batch {id} did not complete: {now}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(done["request_counts"], json!({"total": lines, "completed": 0, "failed": lines}), "{done}");
        // The error file was written on B; A fetches it to serve it, and B has it.
        let error_file = done["error_file_id"].as_str().unwrap();
        for node in [&cluster.a, &cluster.b] {
            let (status, bytes) = content(node, error_file).await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
            let text = String::from_utf8(bytes).unwrap();
            assert_eq!(text.lines().count(), lines, "{text}");
            for line in text.lines() {
                let answer: Value = serde_json::from_str(line).unwrap();
                assert_eq!(answer["response"]["status_code"], 404, "{answer}");
            }
        }
    }
    worker.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_files_past_the_limits_are_refused_naming_the_line() {
    let cluster = start_two().await;
    let good = String::from_utf8(batch_lines("ok", 1)).unwrap();

    // A line longer than 4 MiB: refused before it is parsed, naming its line.
    let long = json!({"custom_id": "long", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "m", "messages": [{"role": "user", "content": "x".repeat(4 * 1024 * 1024)}]}})
    .to_string();
    let (status, answer) = upload(&cluster.a, "batch", format!("{good}\n{long}\n{good}").as_bytes()).await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("line 2: the line is longer than 4194304 bytes"), "{message}");
    assert_eq!(answer["error"]["param"], "file");

    // 50,001 requests: one more than a batch holds.
    let many = batch_lines("r", 50_001);
    let (status, answer) = upload(&cluster.a, "batch", &many).await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("line 50001: a batch file holds at most 50000 requests"), "{message}");

    // Exactly 50,000 are taken, and a batch is made of them.
    let most = batch_lines("r", 50_000);
    let (status, file) = upload(&cluster.a, "batch", &most).await;
    assert_eq!(status, 200, "{file}");
    let body = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let (status, batch) = call(&cluster.b, reqwest::Method::POST, "/v1/batches", Some(body)).await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["request_counts"]["total"], 50_000);
    let (_, files) = call(&cluster.a, reqwest::Method::GET, "/v1/files", None).await;
    assert_eq!(files["data"].as_array().unwrap().len(), 1, "refused uploads are not recorded: {files}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_follow_the_callers_input_safety_rules() {
    let cluster = start_two().await;
    let model = cluster.dir.path().join("tiny");
    maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 3).unwrap();
    let deployment = json!({"name": "vectors", "model": "tiny", "model_path": model.display().to_string(),
                            "context_tokens": 256, "concurrent_sequences": 1});
    let (status, created) = call(&cluster.a, reqwest::Method::POST, "/v1/deployments", Some(deployment)).await;
    assert_eq!(status, 201, "{created}");
    let rule = json!({"direction": "input", "kind": "keyword", "pattern": "Forbidden Topic", "reason": "not here"});
    let (status, rule) = call(&cluster.a, reqwest::Method::POST, "/v1/safety/rules", Some(rule)).await;
    assert_eq!(status, 201, "{rule}");

    let embed = |input: Value| json!({"model": "vectors", "input": input});
    let (status, refused) =
        call(&cluster.a, reqwest::Method::POST, "/v1/embeddings", Some(embed(json!(["fine", "the FORBIDDEN topic"]))))
            .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["code"], "content_filter", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("not here"), "{refused}");
    // A harmless input passes the rules (and then finds no replica ready: nothing runs
    // replicas in this test).
    let (status, passed) =
        call(&cluster.a, reqwest::Method::POST, "/v1/embeddings", Some(embed(json!("a harmless text")))).await;
    assert_eq!(status, 503, "{passed}");
}
