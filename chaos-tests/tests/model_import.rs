//! `maas model import` on a real `maas` process: a .tar.gz (made by the system's `tar`) of
//! a model whose config has a catalogue model's values is checked locally against the
//! catalogue, uploaded as one archive and unpacked by the node; files that do not match a
//! catalogue name fail before anything is uploaded; a .zip of a tiny model imports and its
//! deployment answers a chat completion.

use std::process::{Command, Output};
use std::time::Duration;

use maas_chaos_tests::{MaasProcess, maas_binary, one_gpu_node_config, tiny_model, wait_until};
use serde_json::{Value, json};

const COOKIE: &str = "model-import-test-cookie";

fn maas(node: &MaasProcess, args: &[&str]) -> Output {
    Command::new(maas_binary()).args(args).args(["--cookie", COOKIE, "--server", &node.base_url]).output().unwrap()
}

/// Files in the node's blob store.
fn blob_count(node: &MaasProcess) -> usize {
    let root = node.data_dir.join("blobs/sha256");
    std::fs::read_dir(&root)
        .map_or(0, |shards| shards.map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap().count()).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_and_catalogue_names_import_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = MaasProcess::start_with_config(&one_gpu_node_config(COOKIE, "")).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();

    // A tiny Qwen2 whose config.json has Qwen2.5-0.5B-Instruct's identifying values, packed
    // as users pack a downloaded folder.
    let qwen = dir.path().join("Qwen2.5-0.5B-Instruct");
    tiny_model("qwen2", &qwen);
    let config_path = qwen.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    for (key, value) in [
        ("hidden_size", 896),
        ("num_hidden_layers", 24),
        ("num_attention_heads", 14),
        ("num_key_value_heads", 2),
        ("vocab_size", 151_936),
    ] {
        config[key] = value.into();
    }
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let archive = dir.path().join("qwen.tar.gz");
    let packed = Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.path())
        .arg("Qwen2.5-0.5B-Instruct")
        .output()
        .unwrap();
    assert!(packed.status.success(), "{}", String::from_utf8_lossy(&packed.stderr));

    let output =
        maas(&node, &["model", "import", archive.to_str().unwrap(), "--name", "qwen2.5-0.5b-instruct", "--quiet"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("the files match catalogue entry qwen2.5-0.5b-instruct"), "{stdout}");
    assert!(stdout.contains("imported qwen2.5-0.5b-instruct:v1 (Qwen2ForCausalLM"), "{stdout}");

    // A mismatch fails here, before any upload.
    let llama = dir.path().join("llama");
    tiny_model("llama", &llama);
    let blobs_before = blob_count(&node);
    let output =
        maas(&node, &["model", "import", llama.to_str().unwrap(), "--name", "llama-3.2-1b-instruct", "--quiet"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.json hidden_size is 64, llama-3.2-1b-instruct has 2048"), "{stderr}");
    assert_eq!(blob_count(&node), blobs_before, "nothing was uploaded");

    // A zip of the tiny Llama imports under its own name and serves.
    let zip_path = dir.path().join("tiny.zip");
    let mut writer = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for entry in std::fs::read_dir(&llama).unwrap() {
        let path = entry.unwrap().path();
        writer.start_file(format!("tiny/{}", path.file_name().unwrap().to_str().unwrap()), options).unwrap();
        std::io::Write::write_all(&mut writer, &std::fs::read(&path).unwrap()).unwrap();
    }
    writer.finish().unwrap();
    let output = maas(&node, &["model", "import", zip_path.to_str().unwrap(), "--name", "tiny", "--quiet"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let listed: Value = serde_json::from_slice(
        &Command::new(maas_binary())
            .args(["model", "list", "--json", "--server", &node.base_url])
            .env("MAAS_CLUSTER__COOKIE", COOKIE)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let names: Vec<&str> = listed["versions"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["qwen2.5-0.5b-instruct", "tiny"]);
    let catalog: Value =
        maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/registry/catalog", node.base_url)).await;
    let entry = catalog["models"].as_array().unwrap().iter().find(|m| m["name"] == "qwen2.5-0.5b-instruct").unwrap();
    assert_eq!(entry["imported_versions"], json!(["v1"]));

    let output = maas(&node, &["deploy", "tiny", "--name", "chat", "--context", "256", "--sequences", "2"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wait_until("the deployment serves", Duration::from_secs(60), || async {
        let models: Value = maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/models", node.base_url)).await;
        models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "chat"))
    })
    .await
    .unwrap();
    let answer = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{}/v1/chat/completions", node.base_url))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}
