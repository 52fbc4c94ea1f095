//! Three real `maas` processes on 127.0.0.1-3 forming one cluster over the network
//! transport (tenant data in a fresh PostgreSQL database of their own):
//!
//! - `kill -9` the leader during a stream of writes: a new leader accepts writes and no
//!   acknowledged write is lost (RAFT-1);
//! - stop all three and start them again: the full state is back from disk;
//! - with simulated GPUs and the default timing, `kill -9` a node that runs a replica of a
//!   deployment: its replica is placed again and Ready on a survivor (REC-1), timed.
//!
//! The writes are node-label changes (`PATCH /v1/nodes/{id}/labels`), committed through raft.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use maas_chaos_tests::{MaasProcess, maas_binary};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const COOKIE: &str = "chaos-cookie-0123";

/// A fresh PostgreSQL database for one test, dropped at the end.
struct Database {
    name: String,
}

impl Database {
    fn create() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("maas_chaos_{}_{nanos}", std::process::id());
        psql(&format!("CREATE DATABASE {name}"));
        Database { name }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        psql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

fn psql(sql: &str) {
    let status = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc", sql])
        .status()
        .unwrap();
    assert!(status.success(), "psql {sql}");
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// One member: its fixed addresses (kept across restarts) and its process.
struct Member {
    id: u64,
    config_path: std::path::PathBuf,
    data_dir: std::path::PathBuf,
    api_url: String,
    process: Option<MaasProcess>,
}

struct Cluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    _database: Database,
}

/// The failure detector's timing of a test cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Timing {
    /// 50 ms raft ticks, suspect after 0.5 s, dead after 2 s: quick tests.
    Fast,
    /// The shipped defaults (cluster.toml), for figures users will see.
    Defaults,
}

impl Cluster {
    fn create(size: u64) -> Self {
        Self::create_with(size, Timing::Fast, "")
    }

    /// `node_extra` goes into each node's `[node]` table (simulated GPUs, say).
    fn create_with(size: u64, timing: Timing, node_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::create();
        let members = (1..=size)
            .map(|id| {
                let ip = format!("127.0.0.{id}");
                let (api_port, cluster_port) = (free_port(&ip), free_port(&ip));
                let config_path = dir.path().join(format!("node-{id}.toml"));
                std::fs::write(
                    &config_path,
                    format!(
                        "[node]\nid = {id}\nname = \"node-{id}\"\n{node_extra}\n\
                         [listen]\napi = \"{ip}:{api_port}\"\ncluster = \"{ip}:{cluster_port}\"\n\
                         [database]\nurl = \"{}\"\n\
                         [cluster]\ncookie = \"{COOKIE}\"\n{}",
                        database.url(),
                        match timing {
                            Timing::Fast => "raft_tick_ms = 50\nsuspect_after_ms = 500\ndead_after_ms = 2000\n",
                            Timing::Defaults => "",
                        }
                    ),
                )
                .unwrap();
                Member {
                    id,
                    config_path,
                    data_dir: dir.path().join(format!("data-{id}")),
                    api_url: format!("http://{ip}:{api_port}"),
                    process: None,
                }
            })
            .collect();
        Cluster { members, dir, _database: database }
    }

    fn start(&mut self, index: usize, join: Option<&str>) {
        let member = &mut self.members[index];
        let mut command = Command::new(maas_binary());
        command.args(["node", "start", "--config"]).arg(&member.config_path).env("MAAS_DATA", &member.data_dir);
        if let Some(url) = join {
            command.args(["--join", url]);
        }
        member.process = Some(MaasProcess::spawn(command, member.data_dir.clone()).unwrap());
    }

    fn live_urls(&self) -> Vec<String> {
        self.members.iter().filter(|m| m.process.is_some()).map(|m| m.api_url.clone()).collect()
    }

    /// Kills (SIGKILL) a member of three that is not the leader; returns its id.
    async fn kill_a_follower(&mut self) -> u64 {
        let leader = self.leader(3).await;
        let victim = self.members.iter_mut().find(|m| m.id != leader && m.process.is_some()).unwrap();
        victim.process.take().unwrap().signal(Signal::SIGKILL).unwrap();
        victim.id
    }

    /// Waits until a live member reports being the leader of `voters` voters, and
    /// returns its id.
    async fn leader(&self, voters: usize) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for url in self.live_urls() {
                if let Ok(status) = get(&format!("{url}/v1/cluster/status")).await
                    && status["role"] == "leader"
                    && status["members"]
                        .as_array()
                        .is_some_and(|m| m.iter().filter(|m| m["voter"] == true).count() == voters)
                    && let Some(id) = status["leader_id"].as_u64()
                {
                    return id;
                }
            }
            assert!(Instant::now() < deadline, "no leader of {voters} voters within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn get(url: &str) -> Result<Value, reqwest::Error> {
    maas_chaos_tests::admin_client(COOKIE).get(url).timeout(Duration::from_secs(2)).send().await?.json().await
}

/// Sets one label on node 1 through any live member; true once acknowledged.
async fn write_label(urls: &[String], key: &str) -> bool {
    let client = maas_chaos_tests::admin_client(COOKIE);
    for url in urls {
        let response = client
            .patch(format!("{url}/v1/nodes/1/labels"))
            .header("x-maas-cluster-cookie", COOKIE)
            .json(&json!({ "set": { key: "1" } }))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        if response.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
    }
    false
}

async fn labels_on(url: &str) -> BTreeSet<String> {
    let nodes = get(&format!("{url}/v1/nodes")).await.unwrap();
    let node_1 = nodes["nodes"].as_array().unwrap().iter().find(|n| n["id"] == 1).unwrap().clone();
    node_1["labels"].as_object().unwrap().keys().cloned().collect()
}

async fn start_three() -> Cluster {
    start_three_with(Cluster::create(3)).await
}

async fn start_three_with(mut cluster: Cluster) -> Cluster {
    cluster.start(0, None);
    let first = cluster.members[0].api_url.clone();
    cluster.start(1, Some(&first));
    cluster.start(2, Some(&first));
    cluster.leader(3).await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_during_writes_loses_no_acknowledged_write() {
    let mut cluster = start_three().await;
    let mut acknowledged = BTreeSet::new();
    for i in 0..60 {
        let key = format!("before-{i}");
        if write_label(&cluster.live_urls(), &key).await {
            acknowledged.insert(key);
        }
    }
    assert_eq!(acknowledged.len(), 60, "a healthy cluster acknowledges every write");

    let leader = cluster.leader(3).await;
    let victim = cluster.members.iter_mut().find(|m| m.id == leader).unwrap();
    victim.process.as_ref().unwrap().signal(Signal::SIGKILL).unwrap();
    victim.process.take();
    let killed = Instant::now();

    let mut first_after_kill = None;
    for i in 0..60 {
        let key = format!("after-{i}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if write_label(&cluster.live_urls(), &key).await {
                first_after_kill.get_or_insert(killed.elapsed());
                acknowledged.insert(key);
                break;
            }
        }
    }
    let failover = first_after_kill.expect("a new leader accepts writes");
    eprintln!("leader {leader} killed with SIGKILL; first write accepted {failover:?} later");
    assert!(acknowledged.len() >= 110, "the survivors keep accepting writes: {}", acknowledged.len());

    let new_leader = cluster.leader(3).await;
    assert_ne!(new_leader, leader);
    for url in cluster.live_urls() {
        let labels = labels_on(&url).await;
        let missing: Vec<&String> = acknowledged.iter().filter(|k| !labels.contains(*k)).collect();
        assert!(missing.is_empty(), "{url} lost acknowledged writes: {missing:?}");
    }
    // The new leader's failure detector starts afresh when it is elected: the killed node
    // is suspect once it has been silent for suspect_after_ms (0.5 s) under that leader.
    let url = format!("{}/v1/cluster/status", cluster.live_urls()[0]);
    maas_chaos_tests::wait_until("the killed node is detected", Duration::from_secs(10), || async {
        let Ok(status) = get(&url).await else { return false };
        status["members"]
            .as_array()
            .and_then(|members| members.iter().find(|m| m["id"] == leader))
            .is_some_and(|m| m["status"] == "suspect" || m["status"] == "dead")
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_all_three_and_starting_them_again_restores_the_state() {
    let mut cluster = start_three().await;
    let mut written = BTreeSet::new();
    for i in 0..40 {
        let key = format!("kept-{i}");
        assert!(write_label(&cluster.live_urls(), &key).await);
        written.insert(key);
    }
    for member in &mut cluster.members {
        let mut process = member.process.take().unwrap();
        process.signal(Signal::SIGTERM).unwrap();
        assert!(process.wait_exit(Duration::from_secs(30)).await.unwrap().success());
    }
    for index in 0..3 {
        cluster.start(index, None);
    }
    cluster.leader(3).await;
    for url in cluster.live_urls() {
        let labels = labels_on(&url).await;
        assert!(written.iter().all(|k| labels.contains(k)), "{url} has every label back: {labels:?}");
        let nodes = get(&format!("{url}/v1/nodes")).await.unwrap();
        assert_eq!(nodes["nodes"].as_array().unwrap().len(), 3);
    }
    assert!(write_label(&cluster.live_urls(), "after-restart").await, "the restarted cluster accepts writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_member_shrinks_the_cluster_and_writes_go_on() {
    let mut cluster = start_three().await;
    let leader_url = cluster.members[0].api_url.clone();
    let output = Command::new(maas_binary())
        .args(["node", "remove", "3", "--cookie", COOKIE, "--server", &leader_url])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8(output.stdout).unwrap().trim(), "node 3 removed from the cluster");
    let mut removed = cluster.members.remove(2);
    if let Some(process) = removed.process.take() {
        process.signal(Signal::SIGTERM).unwrap();
    }
    cluster.leader(2).await;
    let nodes = get(&format!("{leader_url}/v1/nodes")).await.unwrap();
    let ids: Vec<u64> = nodes["nodes"].as_array().unwrap().iter().filter_map(|n| n["id"].as_u64()).collect();
    assert_eq!(ids, vec![1, 2]);
    assert!(write_label(&cluster.live_urls(), "after-removal").await, "two members still commit");

    let wrong = Command::new(maas_binary())
        .args(["node", "remove", "2", "--cookie", "not-the-cookie", "--server", &leader_url])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("does not match this cluster's cookie"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_cookie_cannot_join() {
    let mut cluster = Cluster::create(2);
    cluster.start(0, None);
    let first = cluster.members[0].api_url.clone();
    let member = &cluster.members[1];
    let text = std::fs::read_to_string(&member.config_path).unwrap().replace(COOKIE, "another-cookie-42");
    std::fs::write(&member.config_path, text).unwrap();
    let output = Command::new(maas_binary())
        .args(["node", "start", "--config"])
        .arg(&member.config_path)
        .args(["--join", &first])
        .env("MAAS_DATA", &member.data_dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refused to add this node (403 Forbidden)") && stderr.contains("cookie"), "{stderr}");
    let status = get(&format!("{first}/v1/cluster/status")).await.unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 1, "the refused node was not added: {status}");
}

/// The deployment `name` as a live member reports it.
async fn deployment(urls: &[String], name: &str) -> Option<Value> {
    for url in urls {
        if let Ok(found) = get(&format!("{url}/v1/deployments/{name}")).await
            && found["id"] == name
        {
            return Some(found);
        }
    }
    None
}

/// The nodes of the deployment's current Ready replicas.
fn ready_nodes(deployment: &Value) -> Vec<u64> {
    deployment["replicas"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|r| r["state"] == "ready" && r["role"] == "current")
        .filter_map(|r| r["node_id"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_replicas_are_ready_elsewhere_with_the_default_timing() {
    let gpus = "[[node.simulated_gpus]]\nmodel = \"H100\"\nmemory_mib = 81920\ncount = 2\n";
    let mut cluster = start_three_with(Cluster::create_with(3, Timing::Defaults, gpus)).await;
    let model = cluster.dir.path().join("tiny-llama");
    let made = Command::new(maas_binary()).args(["dev", "tiny-model"]).arg(&model).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));

    // Imported into the repository through node 1 (its blobs are there only), then three
    // replicas, one per node (spread): nodes 2 and 3 fetch the files from node 1.
    let first = cluster.members[0].api_url.clone();
    let imported = Command::new(maas_binary())
        .args(["model", "import", "--name", "tiny", "--quiet", "--cookie", COOKIE, "--server", &first])
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&imported.stdout);
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
    assert!(stdout.contains("imported tiny:v1 (LlamaForCausalLM"), "{stdout}");
    let deployed = Command::new(maas_binary())
        .args(["deploy", "tiny", "--replicas", "3", "--strategy", "spread", "--cookie", COOKIE, "--server", &first])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&deployed.stdout);
    assert!(deployed.status.success(), "{}", String::from_utf8_lossy(&deployed.stderr));
    assert!(stdout.contains("deployment tiny created") && stdout.contains("tiny:v1"), "{stdout}");
    maas_chaos_tests::wait_until("three replicas are ready, one per node", Duration::from_secs(60), || async {
        deployment(&cluster.live_urls(), "tiny").await.is_some_and(|d| {
            let mut nodes = ready_nodes(&d);
            nodes.sort_unstable();
            nodes == [1, 2, 3]
        })
    })
    .await
    .unwrap();

    // Kill a node that is not the leader (the leader's loss adds an election; the raft
    // failover test measures that).
    let victim_id = cluster.kill_a_follower().await;
    let killed = Instant::now();

    let mut declared_dead = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let urls = cluster.live_urls();
        if declared_dead.is_none()
            && let Ok(status) = get(&format!("{}/v1/cluster/status", urls[0])).await
            && status["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["id"] == victim_id && m["status"] == "dead"))
        {
            declared_dead = Some(killed.elapsed());
        }
        if let Some(d) = deployment(&urls, "tiny").await {
            let nodes = ready_nodes(&d);
            if nodes.len() == 3 && !nodes.contains(&victim_id) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the killed node's replica is not ready elsewhere within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = killed.elapsed();
    eprintln!(
        "node {victim_id} killed with SIGKILL; declared dead after {:?}; its replica ready elsewhere after {recovered:?} \
         (defaults: suspect after 1.5 s, dead after 5 s)",
        declared_dead.unwrap_or(recovered)
    );
    // REC-1: never on one missed heartbeat: not before the 5 s grace period.
    assert!(recovered >= Duration::from_millis(4500), "moved before the grace period: {recovered:?}");
    let gpus = get(&format!("{}/v1/gpus", cluster.live_urls()[0])).await.unwrap();
    let reserved: u64 = gpus["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["node_id"] != victim_id)
        .filter_map(|g| g["memory_reserved_mib"].as_u64())
        .sum();
    let used: u64 = gpus["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["node_id"] != victim_id)
        .filter_map(|g| g["memory_used_mib"].as_u64())
        .sum();
    let per_replica = deployment(&cluster.live_urls(), "tiny").await.unwrap()["memory_per_gpu_mib"].as_u64().unwrap();
    assert_eq!(reserved, 3 * per_replica, "the survivors hold exactly the three replicas");
    assert_eq!(used, 3 * per_replica, "and all three are loaded: {gpus}");

    the_log_tells_where_the_replicas_ran(&cluster.live_urls(), victim_id).await;
}

/// The deployment's log, asked of one survivor, has both survivors' lines: the files
/// fetched from a peer, and three replicas ready (two from the start, one moved); the CLI
/// prints the same.
async fn the_log_tells_where_the_replicas_ran(live_urls: &[String], victim_id: u64) {
    let mut survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != victim_id).collect();
    survivors.sort_unstable();
    let logs = get(&format!("{}/v1/deployments/tiny/logs", live_urls[0])).await.unwrap();
    assert_eq!(logs["nodes"], json!(survivors), "{logs}");
    assert_eq!(logs["nodes_missing"], json!([]), "{logs}");
    let lines = logs["lines"].as_array().unwrap();
    let said = |start: &str| lines.iter().filter(|l| l["message"].as_str().unwrap().starts_with(start)).count();
    assert_eq!(said("ready in "), 3, "{logs}");
    assert!(said("starting on node ") >= 3 && said("fetched ") >= 1, "{logs}");
    assert!(lines.iter().all(|l| survivors.contains(&l["node_id"].as_u64().unwrap())), "{logs}");
    let times: Vec<u64> = lines.iter().map(|l| l["at_ms"].as_u64().unwrap()).collect();
    assert!(times.is_sorted(), "oldest first: {logs}");
    let printed = Command::new(maas_binary())
        .args(["deployment", "logs", "tiny", "--level", "info", "--server", &live_urls[0]])
        .env("MAAS_CLUSTER__COOKIE", COOKIE)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    assert_eq!(stdout.lines().filter(|l| l.contains(" INFO  ready in ")).count(), 3, "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_a_model_whose_replica_runs_on_another() {
    let gpus = "[[node.simulated_gpus]]\nmodel = \"H100\"\nmemory_mib = 81920\ncount = 1\n";
    let cluster = start_three_with(Cluster::create_with(3, Timing::Fast, gpus)).await;
    let model = cluster.dir.path().join("tiny-llama");
    assert!(Command::new(maas_binary()).args(["dev", "tiny-model"]).arg(&model).status().unwrap().success());
    let first = cluster.members[0].api_url.clone();
    let cli = |args: &[&str]| {
        let output =
            Command::new(maas_binary()).args(args).args(["--cookie", COOKIE, "--server", &first]).output().unwrap();
        assert!(output.status.success(), "maas {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    cli(&["model", "import", model.to_str().unwrap(), "--name", "tiny", "--quiet"]);
    cli(&["deploy", "tiny", "--name", "solo", "--replicas", "1", "--context", "256", "--sequences", "2"]);
    maas_chaos_tests::wait_until("the replica is ready", Duration::from_secs(60), || async {
        deployment(&cluster.live_urls(), "solo").await.is_some_and(|d| ready_nodes(&d).len() == 1)
    })
    .await
    .unwrap();
    let host = ready_nodes(&deployment(&cluster.live_urls(), "solo").await.unwrap())[0];
    // Every node answers, two of them through the replica's node; streamed answers too.
    for member in &cluster.members {
        for stream in [false, true] {
            let response = maas_chaos_tests::admin_client(COOKIE)
                .post(format!("{}/v1/chat/completions", member.api_url))
                .json(&json!({"model": "solo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0, "stream": stream}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "node {} (replica on node {host})", member.id);
            let body = response.text().await.unwrap();
            if stream {
                assert!(
                    body.trim_end().ends_with("data:[DONE]") || body.trim_end().ends_with("data: [DONE]"),
                    "{body}"
                );
            } else {
                assert!(body.contains("chat.completion"), "{body}");
            }
        }
    }
}

/// Sends `body` as JSON to `url` with the admin cookie.
async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let response = maas_chaos_tests::admin_client(COOKIE).post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Uploads a text file into knowledge base `kb` through `url`.
async fn upload_text(url: &str, kb: &str, filename: &str, text: &str) -> Value {
    let url = format!("{url}/v1/knowledge_bases/{kb}/documents");
    let response = maas_chaos_tests::post_multipart(COOKIE, &url, &[], (filename, "text/plain", text.as_bytes())).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The best full-text hit of `query` in `kb`, asked of `url`, with the shards it missed.
async fn best_hit(url: &str, kb: &str, query: &str, mode: &str) -> (String, Value) {
    let (status, found) = post_json(
        &format!("{url}/v1/knowledge_bases/{kb}/retrieve"),
        &json!({"query": query, "mode": mode, "top_k": 1, "include_parent": false}),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    (found["data"][0]["text"].as_str().unwrap_or_default().to_owned(), found["incomplete_shards"].clone())
}

/// Knowledge-base shards across the cluster (issue 7): a knowledge base of three shards is
/// spread one per node; a document ingested through one node is found the same through
/// every node (searches fan out to the three shards); `kill -9` a node: once it is
/// declared dead its shard moves to a survivor, which rebuilds it from the chunks in SQL
/// (texts indexed again, vectors embedded again), and every paragraph is found again.
/// The nodes of a knowledge base's serving shards, sorted.
fn shard_nodes(summary: &Value) -> Vec<u64> {
    let mut nodes: Vec<u64> = summary["stats"]["shards"]
        .as_array()
        .map(|s| s.iter().filter(|s| s["state"] == "serving").filter_map(|s| s["node_id"].as_u64()).collect())
        .unwrap_or_default();
    nodes.sort_unstable();
    nodes
}

/// A tiny BERT deployed on every node (CPU) and a knowledge base of three shards of small
/// chunks on it, one shard per node; returns its id.
async fn sharded_knowledge_base(cluster: &Cluster) -> String {
    let first = cluster.members[0].api_url.clone();
    let bert = cluster.dir.path().join("bert");
    let made = Command::new(maas_binary()).args(["dev", "tiny-model", "--arch", "bert"]).arg(&bert).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    for args in [
        vec!["model", "import", bert.to_str().unwrap(), "--name", "bert", "--quiet"],
        vec![
            "deploy",
            "bert",
            "--name",
            "bert",
            "--gpus",
            "0",
            "--cpu-fallback",
            "--replicas",
            "3",
            "--strategy",
            "spread",
        ],
    ] {
        let out =
            Command::new(maas_binary()).args(&args).args(["--cookie", COOKIE, "--server", &first]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (code, kb) = post_json(
        &format!("{first}/v1/knowledge_bases"),
        &json!({"name": "fleet", "embedding_model": "bert", "shards": 3,
            "chunking": {"max_tokens": 32, "overlap_tokens": 4, "parent_max_tokens": 128}}),
    )
    .await;
    assert_eq!(code, 200, "{kb}");
    let kb_id = kb["id"].as_str().unwrap().to_owned();
    maas_chaos_tests::wait_until("three shards serve, one per node", Duration::from_secs(30), || async {
        let summary = get(&format!("{first}/v1/knowledge_bases/{kb_id}")).await.unwrap_or(Value::Null);
        shard_nodes(&summary) == [1, 2, 3]
    })
    .await
    .unwrap();

    kb_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowledge_base_shards_spread_over_the_nodes_and_move_off_a_dead_one() {
    let mut cluster = start_three().await;
    let first = cluster.members[0].api_url.clone();
    let kb_id = sharded_knowledge_base(&cluster).await;
    let summary = |url: String| {
        let path = format!("{url}/v1/knowledge_bases/{kb_id}");
        async move { get(&path).await.unwrap_or(Value::Null) }
    };

    let paragraphs = 40;
    let text = (0..paragraphs).fold(String::new(), |mut text, i| {
        let _ = write!(text, "Paragraph {i} records beacon number{i} and the tides at its harbour.\n\n");
        text
    });
    let document = upload_text(&first, &kb_id, "beacons.txt", &text).await;
    let document_path = format!("{first}/v1/knowledge_bases/{kb_id}/documents/{}", document["id"].as_str().unwrap());
    maas_chaos_tests::wait_until("the document is indexed", Duration::from_secs(120), || async {
        let now = get(&document_path).await.unwrap_or(Value::Null);
        assert_ne!(now["state"], "failed", "{now}");
        now["state"] == "indexed"
    })
    .await
    .unwrap();
    let chunks = summary(first.clone()).await["stats"]["chunks"].as_u64().unwrap();
    assert!(chunks >= 3, "enough chunks to land on every shard: {chunks}");

    // Every node answers the same, from all three shards.
    for url in cluster.live_urls() {
        let stats = summary(url.clone()).await["stats"].clone();
        assert_eq!(
            (stats["vectors"].as_u64(), stats["fulltext_entries"].as_u64()),
            (Some(chunks), Some(chunks)),
            "{stats}"
        );
        for i in [0, paragraphs / 2, paragraphs - 1] {
            let (hit, incomplete) = best_hit(&url, &kb_id, &format!("number{i}"), "fulltext").await;
            assert!(hit.contains(&format!("number{i} ")), "{url}: number{i} -> {hit}");
            assert!(incomplete.is_null(), "{incomplete}");
        }
        let (hit, _) = best_hit(&url, &kb_id, "beacon tides harbour", "vector").await;
        assert!(hit.contains("beacon"), "{hit}");
    }

    // Kill a node that is not the leader; its shard moves to a survivor and is rebuilt.
    let victim_id = cluster.kill_a_follower().await;
    let killed = Instant::now();
    let survivor = cluster.live_urls()[0].clone();
    maas_chaos_tests::wait_until(
        "the dead node's shard serves elsewhere, rebuilt",
        Duration::from_secs(60),
        || async {
            let now = summary(survivor.clone()).await;
            let nodes = shard_nodes(&now);
            let stats = &now["stats"];
            nodes.len() == 3
                && !nodes.contains(&victim_id)
                && stats["vectors"].as_u64() == Some(chunks)
                && stats["fulltext_entries"].as_u64() == Some(chunks)
        },
    )
    .await
    .unwrap();
    eprintln!("node {victim_id} killed; its knowledge-base shard served again, rebuilt, after {:?}", killed.elapsed());
    for url in cluster.live_urls() {
        for i in 0..paragraphs {
            let (hit, incomplete) = best_hit(&url, &kb_id, &format!("number{i}"), "fulltext").await;
            assert!(hit.contains(&format!("number{i} ")), "{url}: number{i} -> {hit}");
            assert!(incomplete.is_null(), "{incomplete}");
        }
    }
    let (hit, _) = best_hit(&survivor, &kb_id, "beacon tides harbour", "hybrid").await;
    assert!(hit.contains("beacon"), "{hit}");
}
