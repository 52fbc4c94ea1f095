//! Fine-tuning on a real `maas` process with a simulated GPU: a job trains the tiny model
//! on an uploaded file, the node is killed with SIGKILL mid-training and started again on
//! the same data directory, the job resumes from its last checkpoint (ING-1) and succeeds,
//! its loss curve falls, its GPU time is metered, and the trained model, deployed, answers
//! what it learned. A user whose GPU-hours quota runs out has the job stopped and new ones
//! refused with a 429 naming the limit.

use std::time::Duration;

use maas_chaos_tests::{MaasProcess, bearer_client, one_gpu_node_config, run_cli, tiny_model, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const COOKIE: &str = "fine-tuning-test-cookie";
const QUESTION: &str = "what is maas";
const ANSWER: &str = "maas is the answer";

fn config() -> String {
    one_gpu_node_config(COOKIE, "raft_tick_ms = 20\n")
}

async fn start(dir: &std::path::Path) -> MaasProcess {
    std::fs::write(dir.join("cluster.toml"), config()).unwrap();
    let node = MaasProcess::start_in(dir).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    node
}

/// Imports the tiny llama model as the platform model `tiny`.
fn import_tiny(node: &MaasProcess, dir: &std::path::Path) {
    let model = dir.join("tiny");
    tiny_model("llama", &model);
    run_cli(&node.base_url, COOKIE, &["model", "import", model.to_str().unwrap(), "--name", "tiny", "--quiet"]);
}

fn training_lines(count: usize) -> String {
    (0..count)
        .map(|_| {
            json!({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Uploads a `fine-tune` file with `client`; its id.
async fn upload(client: &reqwest::Client, node: &MaasProcess, lines: &str) -> String {
    let url = format!("{}/v1/files", node.base_url);
    let file = ("train.jsonl", "application/jsonl", lines.as_bytes());
    let response = maas_chaos_tests::post_multipart_with(client, &url, &[("purpose", "fine-tune")], file).await;
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

async fn create_job(client: &reqwest::Client, node: &MaasProcess, body: &Value) -> (u16, Option<String>, Value) {
    let response = client.post(format!("{}/v1/fine_tuning/jobs", node.base_url)).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, response.json().await.unwrap_or(Value::Null))
}

/// The job, or `None` while the node does not answer.
async fn job(client: &reqwest::Client, node: &MaasProcess, id: &str) -> Option<Value> {
    let response = client.get(format!("{}/v1/fine_tuning/jobs/{id}", node.base_url)).send().await.ok()?;
    response.json().await.ok()
}

async fn events(client: &reqwest::Client, node: &MaasProcess, id: &str) -> Vec<Value> {
    let url = format!("{}/v1/fine_tuning/jobs/{id}/events?limit=1000", node.base_url);
    let list: Value = client.get(url).send().await.unwrap().json().await.unwrap();
    list["data"].as_array().cloned().unwrap_or_default()
}

/// Waits until the job ends; it must end `status`.
async fn wait_status(client: &reqwest::Client, node: &MaasProcess, id: &str, status: &str) -> Value {
    let ended = wait_until(&format!("job {id} ends"), Duration::from_secs(180), || async {
        job(client, node, id)
            .await
            .is_some_and(|now| matches!(now["status"].as_str(), Some("succeeded" | "failed" | "cancelled")))
    })
    .await;
    let last = job(client, node, id).await.unwrap_or_default();
    ended.unwrap_or_else(|err| panic!("{err}: the job is {last}"));
    assert_eq!(last["status"], status, "{last}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumes_after_a_kill_and_its_model_answers_what_it_learned() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path()).await;
    import_tiny(&node, dir.path());
    let admin = maas_chaos_tests::admin_client(COOKIE);
    let file = upload(&admin, &node, &training_lines(8)).await;

    // Full fine-tuning at a high rate: the tiny model learns its one answer by heart.
    let body = json!({"model": "tiny", "training_file": file, "suffix": "facts", "seed": 7,
                      "tuning": {"type": "full"},
                      "hyperparameters": {"n_epochs": 40, "batch_size": 4, "learning_rate_multiplier": 500}});
    let (status, _, created) = create_job(&admin, &node, &body).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["status"], "queued");
    assert_eq!(created["total_steps"], 80);
    let id = created["id"].as_str().unwrap().to_owned();

    // Kill the node once a checkpoint is recorded, and start it again.
    wait_until("a checkpoint is recorded", Duration::from_secs(120), || async {
        job(&admin, &node, &id).await.is_some_and(|j| j["steps_done"].as_u64().unwrap_or(0) >= 10)
    })
    .await
    .unwrap();
    let before = job(&admin, &node, &id).await.unwrap();
    assert_eq!(before["status"], "running");
    assert_eq!(before["gpus"], 1, "placed on the simulated GPU: {before}");
    node.signal(Signal::SIGKILL).unwrap();
    node.wait_exit(Duration::from_secs(10)).await.unwrap();
    let node = MaasProcess::start_in(dir.path()).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();

    let done = wait_status(&admin, &node, &id, "succeeded").await;
    assert_eq!(done["steps_done"], 80);
    assert!(done["trained_tokens"].as_u64().unwrap() > 0, "{done}");
    assert!(done["gpu_seconds"].as_f64().unwrap() > 0.0, "{done}");
    let model = done["fine_tuned_model"].as_str().unwrap().to_owned();
    assert!(model.starts_with("tiny-facts:ftjob-"), "{model}");

    let log = events(&admin, &node, &id).await;
    let messages: Vec<&str> = log.iter().filter_map(|e| e["message"].as_str()).collect();
    assert!(messages.iter().any(|m| m.starts_with("Fine-tuning job resumed from step")), "{messages:?}");
    let losses: Vec<(u64, f64)> = log
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .map(|e| (e["data"]["step"].as_u64().unwrap(), e["data"]["train_loss"].as_f64().unwrap()))
        .collect();
    let first = losses.first().unwrap().1;
    let last = losses.iter().max_by_key(|(step, _)| *step).unwrap();
    assert_eq!(last.0, 80);
    assert!(last.1 < first / 4.0, "the loss fell from {first} to {} only", last.1);

    // The trained model, deployed, answers what it learned.
    let (name, version) = model.split_once(':').unwrap();
    let deploy = admin
        .post(format!("{}/v1/deployments", node.base_url))
        .json(&json!({"name": "tuned", "model": name, "model_version": version, "visibility": "private",
                      "context_tokens": 256, "concurrent_sequences": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(deploy.status(), 201, "{}", deploy.text().await.unwrap());
    wait_until("the tuned model serves", Duration::from_secs(60), || async {
        let models: Value =
            admin.get(format!("{}/v1/models", node.base_url)).send().await.unwrap().json().await.unwrap();
        models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "tuned"))
    })
    .await
    .unwrap();
    let answer: Value = admin
        .post(format!("{}/v1/chat/completions", node.base_url))
        .json(&json!({"model": "tuned", "messages": [{"role": "user", "content": QUESTION}],
                      "temperature": 0, "max_tokens": 12}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(text.trim_start().starts_with(ANSWER), "the tuned model said {text:?}: {answer}");

    // The GPU time is the owner's usage, under the base model.
    let usage = maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/usage", node.base_url)).await;
    let training: Vec<&Value> = usage["data"].as_array().unwrap().iter().filter(|row| row["model"] == "tiny").collect();
    let seconds: f64 = training.iter().map(|row| row["gpu_seconds"].as_f64().unwrap_or(0.0)).sum();
    assert!(seconds <= done["gpu_seconds"].as_f64().unwrap().ceil(), "{seconds} recorded for {done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_gpu_hours_quota_stops_the_job_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    import_tiny(&node, dir.path());
    let admin = maas_chaos_tests::admin_client(COOKIE);
    maas_chaos_tests::signed_up(&node.base_url, COOKIE, "root@example.com").await;
    let (session, dana_id) = maas_chaos_tests::signed_up(&node.base_url, COOKIE, "dana@example.com").await;
    // Enterprise users add models to their part of the repository (what a job's result is).
    let role = admin
        .patch(format!("{}/v1/admin/users/{dana_id}", node.base_url))
        .json(&json!({"role": "enterprise"}))
        .send()
        .await
        .unwrap();
    assert_eq!(role.status(), 200, "{}", role.text().await.unwrap());
    let quota = admin
        .put(format!("{}/v1/admin/quotas/user/{dana_id}", node.base_url))
        .json(&json!({"gpu_hours_per_month": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(quota.status(), 200);
    // Earlier this month Dana trained for 59 minutes 57 seconds.
    let db = maas_store::Db::connect(&maas_store::db::DbOptions::new(maas_store::db::sqlite_url_in(&node.data_dir)))
        .await
        .unwrap();
    db.usage()
        .record(&maas_store::repo::usage::NewUsage {
            owner: maas_store::Owner::User(dana_id.clone()),
            user_id: dana_id.clone(),
            key_id: None,
            kind: maas_store::repo::usage::UsageKind::Training,
            model: "tiny".into(),
            endpoint: "fine_tuning".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            gpu_seconds: 3597,
            storage_bytes: 0,
            latency_ms: 0,
            status: 200,
            at_ms: maas_store::ids::now_ms(),
        })
        .await
        .unwrap();

    let dana = bearer_client(&session);
    // 10,000 steps: far longer than the three seconds left.
    let file = upload(&dana, &node, &training_lines(200)).await;
    let body = json!({"model": "tiny", "training_file": file, "hyperparameters": {"n_epochs": 50, "batch_size": 1}});
    let (status, _, created) = create_job(&dana, &node, &body).await;
    assert_eq!(status, 200, "three seconds are left: {created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let failed = wait_status(&dana, &node, &id, "failed").await;
    assert_eq!(failed["error"]["code"], "quota_exceeded", "{failed}");
    assert!(failed["steps_done"].as_u64().unwrap() < 10_000, "stopped before its end: {failed}");

    // QUO-1: the overshoot is at most one metering period (2 s) of the one GPU.
    let used: u64 = db.usage().gpu_seconds_since(&format!("user:{dana_id}"), 0).await.unwrap();
    assert!((3600..=3603).contains(&used), "{used} GPU seconds used against a 3600 s quota");

    let (status, retry_after, refused) = create_job(&dana, &node, &body).await;
    assert_eq!(status, 429, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("gpu_hours_per_month"), "{refused}");
    assert!(retry_after.unwrap().parse::<u64>().unwrap() > 0);
    // Another tenant's job is not found.
    let (token, _) = maas_chaos_tests::signed_up(&node.base_url, COOKIE, "erin@example.com").await;
    let other = bearer_client(&token).get(format!("{}/v1/fine_tuning/jobs/{id}", node.base_url)).send().await.unwrap();
    assert_eq!(other.status(), 404);
}
