//! The Batch API on a real `maas` process: a JSONL file of chat requests is uploaded, a
//! batch of it runs in the background on a tiny model deployed on a simulated GPU, the
//! node is killed with SIGKILL while the batch is half done and started again on the same
//! data directory, and the batch completes with every request answered exactly once and
//! its output file downloadable.

use std::collections::BTreeMap;
use std::time::Duration;

use maas_chaos_tests::{MaasProcess, one_gpu_node_config, run_cli, tiny_model, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const COOKIE: &str = "batches-test-cookie";
const LINES: usize = 24;

fn config() -> String {
    one_gpu_node_config(COOKIE, "raft_tick_ms = 20\n")
}

fn cli(node: &MaasProcess, args: &[&str]) {
    run_cli(&node.base_url, COOKIE, args);
}

async fn get(node: &MaasProcess, path: &str) -> Value {
    maas_chaos_tests::admin_get_json(COOKIE, format!("{}{path}", node.base_url)).await
}

/// The batch, or `None` while the node does not answer.
async fn batch(node: &MaasProcess, id: &str) -> Option<Value> {
    let response = maas_chaos_tests::admin_get(COOKIE, format!("{}/v1/batches/{id}", node.base_url)).await.ok()?;
    response.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_survives_a_killed_node_and_answers_every_line_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.toml"), config()).unwrap();
    let mut node = MaasProcess::start_in(dir.path()).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let model = dir.path().join("tiny");
    tiny_model("llama", &model);
    cli(&node, &["model", "import", model.to_str().unwrap(), "--name", "tiny", "--quiet"]);
    cli(&node, &["deploy", "tiny", "--name", "chat", "--context", "256", "--sequences", "4"]);
    wait_until("the deployment serves", Duration::from_secs(60), || async {
        get(&node, "/v1/models").await["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "chat"))
    })
    .await
    .unwrap();

    // Requests long enough that the batch takes a while, short enough for seconds.
    let lines: Vec<String> = (0..LINES)
        .map(|i| {
            json!({"custom_id": format!("request-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "chat", "messages": [{"role": "user", "content": format!("tell me about {i}")}],
                            "max_tokens": 48, "seed": i}})
            .to_string()
        })
        .collect();
    // The form as the OpenAI SDK sends it: `purpose`, then `file`.
    let jsonl = lines.join("\n");
    let url = format!("{}/v1/files", node.base_url);
    let file_part = ("requests.jsonl", "application/jsonl", jsonl.as_bytes());
    let response = maas_chaos_tests::post_multipart(COOKIE, &url, &[("purpose", "batch")], file_part).await;
    assert_eq!(response.status(), 200);
    let file: Value = response.json().await.unwrap();
    let response = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{}/v1/batches", node.base_url))
        .json(&json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();

    // Kill the node while the batch is half done.
    wait_until("the batch is partly answered", Duration::from_secs(60), || async {
        let Some(now) = batch(&node, &id).await else { return false };
        let completed = now["request_counts"]["completed"].as_u64().unwrap_or(0);
        assert_ne!(now["status"], "completed", "the batch finished before the node could be killed: {now}");
        completed > 0 && completed < LINES as u64
    })
    .await
    .unwrap();
    node.signal(Signal::SIGKILL).unwrap();
    node.wait_exit(Duration::from_secs(10)).await.unwrap();

    let node = MaasProcess::start_in(dir.path()).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let resumed = batch(&node, &id).await.unwrap();
    let answered_before_restart = resumed["request_counts"]["completed"].as_u64().unwrap();
    assert!(answered_before_restart > 0, "answers committed before the kill survive it: {resumed}");
    eprintln!("{answered_before_restart} of {LINES} lines were answered when the node was killed");
    wait_until("the batch completes after the restart", Duration::from_secs(120), || async {
        let now = batch(&node, &id).await.unwrap_or(Value::Null);
        assert_ne!(now["status"], "failed", "{now}");
        now["status"] == "completed"
    })
    .await
    .unwrap();
    let done = batch(&node, &id).await.unwrap();
    assert_eq!(done["request_counts"], json!({"total": LINES, "completed": LINES, "failed": 0}), "{done}");
    assert!(done["error_file_id"].is_null(), "{done}");
    assert!(done["in_progress_at"].is_i64() && done["completed_at"].is_i64(), "{done}");

    let output_id = done["output_file_id"].as_str().unwrap();
    let output =
        maas_chaos_tests::admin_get(COOKIE, format!("{}/v1/files/{output_id}/content", node.base_url)).await.unwrap();
    assert_eq!(output.status(), 200);
    let output = output.text().await.unwrap();
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for line in output.lines() {
        let answer: Value = serde_json::from_str(line).unwrap();
        assert_eq!(answer["response"]["status_code"], 200, "{answer}");
        assert_eq!(answer["response"]["body"]["object"], "chat.completion", "{answer}");
        assert!(answer["error"].is_null(), "{answer}");
        let custom_id = answer["custom_id"].as_str().unwrap().to_owned();
        order.push(custom_id.clone());
        *answers.entry(custom_id).or_default() += 1;
    }
    assert_eq!(answers.len(), LINES, "every request is answered: {answers:?}");
    assert!(answers.values().all(|&count| count == 1), "each request exactly once: {answers:?}");
    let input_order: Vec<String> = (0..LINES).map(|i| format!("request-{i}")).collect();
    assert_eq!(order, input_order, "the output follows the input's order");
}
