//! `maas model import` against a real node's HTTP API (the gateway in this process, with a
//! real store and blob store): of a folder as `huggingface-cli download` leaves it, only the
//! files the model needs are uploaded and registered, and the CLI says what it left out and
//! why; a consolidated copy of the weights above the upload limit no longer fails the import.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use maas_gateway::{AppState, GatewayOptions, HttpServer, ServeOptions};
use serde_json::Value;
use tokio::net::TcpListener;

const COOKIE: &str = "model-import-cli-test-cookie";
/// The upload limit: every file the model needs fits, the decoy copy of the weights does not.
const MAX_UPLOAD_BYTES: u64 = 4 << 20;

struct Node {
    base: String,
    dir: tempfile::TempDir,
    /// Held so the server runs for the whole test.
    _serving: maas_gateway::ShutdownTrigger,
}

async fn start() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(AppState::new(
        "test-node",
        GatewayOptions { max_upload_bytes: MAX_UPLOAD_BYTES, ..GatewayOptions::default() },
    ));
    let db =
        maas_store::Db::connect(&maas_store::DbOptions::new(maas_store::db::sqlite_url_in(dir.path()))).await.unwrap();
    db.migrate().await.unwrap();
    let blobs = maas_store::BlobStore::open(dir.path().join("blobs")).await.unwrap();
    let _ = state.stores.set(maas_gateway::state::Stores { db, blobs, data_dir: dir.path().to_owned() });
    let _ = state.cluster_cookie.set(COOKIE.to_owned());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: 1 << 20,
            max_upload_bytes: MAX_UPLOAD_BYTES,
            drain_timeout: Duration::from_secs(1),
            tls: None,
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let base = format!("http://{}", server.local_addr().unwrap());
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    Node { base, dir, _serving: trigger }
}

/// Files in the node's blob store.
fn blob_count(node: &Node) -> usize {
    let root = node.dir.path().join("blobs/sha256");
    std::fs::read_dir(&root)
        .map_or(0, |shards| shards.map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap().count()).sum())
}

async fn maas(node: &Node, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_maas"))
        .args(args)
        .args(["--cookie", COOKIE, "--server", &node.base])
        .env_remove("MAAS_API_KEY")
        .output()
        .await
        .unwrap()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_download_uploads_only_what_the_model_needs_and_says_what_it_left_out() {
    let node = start().await;
    let model = node.dir.path().join("download");
    let mut needed = maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 6).unwrap();
    // What a full download holds besides: a consolidated copy above the upload limit,
    // Meta's original checkpoint, PyTorch weights, remote code, the sentence-transformers
    // pooling and a licence (both kept), and the hub's hidden cache (never looked at).
    write(&model.join("consolidated.safetensors"), &vec![1u8; 5 << 20]);
    write(&model.join("original/consolidated.00.pth"), &[2u8; 4096]);
    write(&model.join("original/params.json"), b"{}");
    write(&model.join("pytorch_model.bin"), &[3u8; 2048]);
    write(&model.join("modeling_custom.py"), b"import torch\n");
    write(&model.join("1_Pooling/config.json"), br#"{"word_embedding_dimension": 64, "pooling_mode_cls_token": true}"#);
    write(&model.join("LICENSE"), b"terms");
    write(&model.join(".cache/huggingface/download/model.safetensors.metadata"), b"etag");
    needed.extend(["1_Pooling/config.json".to_owned(), "LICENSE".to_owned()]);
    needed.sort();

    let output = maas(&node, &["model", "import", model.to_str().unwrap(), "--name", "tiny", "--quiet"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("left out 5 file(s)"), "{stdout}");
    for (shown, says) in [
        ("consolidated.safetensors (5.2 MB)", "a consolidated copy of the weights"),
        ("original/ (2 files, ", "the publisher's original checkpoint"),
        ("pytorch_model.bin", "a PyTorch pickle"),
        ("modeling_custom.py", "remote code"),
    ] {
        let line = stdout.lines().find(|line| line.contains(shown)).unwrap_or_else(|| panic!("{shown}: {stdout}"));
        assert!(line.contains(says), "{line}");
    }
    assert!(!stdout.contains(".cache"), "hidden files are not reported: {stdout}");
    assert!(stdout.contains("imported tiny:v1 (LlamaForCausalLM"), "{stdout}");
    assert!(stdout.contains(&format!(": {} files,", needed.len())), "{stdout}");

    // The version holds exactly the needed files, and the node holds no other blob.
    let listed: Value = reqwest::Client::new()
        .get(format!("{}/v1/registry/models", node.base))
        .header("x-maas-cluster-cookie", COOKIE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let version = &listed["versions"][0];
    let mut registered: Vec<String> =
        version["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap().to_owned()).collect();
    registered.sort();
    assert_eq!(registered, needed);
    assert_eq!(blob_count(&node), needed.len(), "nothing else was uploaded");

    // With --json, stdout is the answer alone and the report goes to stderr.
    let output =
        maas(&node, &["model", "import", model.to_str().unwrap(), "--name", "tiny", "--quiet", "--json"]).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let record: Value = serde_json::from_slice(&output.stdout).expect("stdout is the JSON answer");
    assert_eq!(record["version"], "v2");
    assert_eq!(record["skipped_files"], serde_json::json!([]), "the node had nothing left to leave out");
    assert!(String::from_utf8_lossy(&output.stderr).contains("left out 5 file(s)"));
}
