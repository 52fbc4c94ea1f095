//! The control plane of a real `maas` process: it bootstraps a cluster of one, registers
//! itself with its resources (simulated GPUs included), answers `maas cluster status` and
//! `maas node list`, keeps its state across a restart, and refuses a data directory that
//! belongs to another node id.

use std::process::Command;
use std::time::Duration;

use maas_chaos_tests::{MaasProcess, maas_binary};
use nix::sys::signal::Signal;
use serde_json::Value;

const CONFIG: &str = "[node]\nname = \"gpu-a\"\n\
    [[node.simulated_gpus]]\nmodel = \"H100\"\nmemory_mib = 81920\ncount = 2\n\
    [listen]\napi = \"127.0.0.1:0\"\ncluster = \"127.0.0.1:0\"\n\
    [cluster]\nraft_tick_ms = 20\n";

fn cli(args: &[&str], server: &str) -> (i32, String, String) {
    let output = Command::new(maas_binary()).args(args).args(["--server", server]).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_cluster_registers_itself_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("cluster.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let start = || {
        let mut command = Command::new(maas_binary());
        command.args(["node", "start", "--config"]).arg(&config_path).env("MAAS_DATA", dir.path().join("data"));
        MaasProcess::spawn(command, dir.path().join("data")).unwrap()
    };

    let mut node = start();
    node.wait_ready(Duration::from_secs(20)).await.unwrap();
    let ready: Value =
        maas_chaos_tests::admin_get_json(maas_chaos_tests::DEFAULT_COOKIE, format!("{}/readyz", node.base_url)).await;
    assert_eq!(ready["checks"]["cluster"], "ready", "{ready}");

    let (code, table, stderr) = cli(&["cluster", "status"], &node.base_url);
    assert_eq!(code, 0, "{stderr}");
    assert!(table.contains("leader: node 1"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("1 ") && l.contains("gpu-a") && l.contains("leader") && l.contains("alive")),
        "{table}"
    );

    let (code, json, _) = cli(&["node", "list", "--json"], &node.base_url);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&json).unwrap();
    let gpus = list["nodes"][0]["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    assert!(gpus.iter().all(|g| g["simulated"] == true && g["memory_total_mib"] == 81920 && g["model"] == "H100"));
    let (_, table, _) = cli(&["node", "list"], &node.base_url);
    assert!(table.contains("2x H100, 163840 MiB (simulated)"), "{table}");

    let (code, table, stderr) = cli(&["gpu", "list"], &node.base_url);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<&str> = table.lines().filter(|l| l.contains("H100 (simulated)")).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows.iter().all(|r| r.contains("81920 MiB") && r.contains("0 MiB") && r.contains("alive")), "{table}");
    let (_, json, _) = cli(&["gpu", "list", "--json"], &node.base_url);
    let gpus: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(gpus["gpus"][1]["index"], 1);
    assert_eq!(gpus["gpus"][1]["memory_free_mib"], 81920);

    // The node agent runs a GPU actor for each registered GPU.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let agent: Value = maas_chaos_tests::admin_get_json(
            maas_chaos_tests::DEFAULT_COOKIE,
            format!("{}/v1/node/agent", node.base_url),
        )
        .await;
        let gpus = agent["gpus"].as_array().cloned().unwrap_or_default();
        if gpus.len() == 2 {
            assert!(gpus.iter().all(|g| g["failed"].is_null() && g["free_mib"] == 81920 - 1024), "{agent}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the agent starts a GPU actor per GPU: {agent}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let before: Value = maas_chaos_tests::admin_get_json(
        maas_chaos_tests::DEFAULT_COOKIE,
        format!("{}/v1/cluster/status", node.base_url),
    )
    .await;
    node.signal(Signal::SIGTERM).unwrap();
    assert!(node.wait_exit(Duration::from_secs(20)).await.unwrap().success());

    // The raft log and the cluster state come back from disk.
    let node = start();
    node.wait_ready(Duration::from_secs(20)).await.unwrap();

    let after: Value = maas_chaos_tests::admin_get_json(
        maas_chaos_tests::DEFAULT_COOKIE,
        format!("{}/v1/cluster/status", node.base_url),
    )
    .await;
    assert_eq!(after["leader_id"], 1);
    assert!(after["term"].as_u64() > before["term"].as_u64(), "a new election after the restart: {before} {after}");
    assert!(after["commit_index"].as_u64() > before["commit_index"].as_u64(), "the log continued: {before} {after}");
    let list: Value =
        maas_chaos_tests::admin_get_json(maas_chaos_tests::DEFAULT_COOKIE, format!("{}/v1/nodes", node.base_url)).await;
    assert_eq!(list["nodes"].as_array().unwrap().len(), 1, "re-registration updated the same node: {list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_keeps_its_node_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config_path = dir.path().join("cluster.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let mut command = Command::new(maas_binary());
    command.args(["node", "start", "--config"]).arg(&config_path).env("MAAS_DATA", &data);
    let mut node = MaasProcess::spawn(command, data.clone()).unwrap();
    node.signal(Signal::SIGTERM).unwrap();
    node.wait_exit(Duration::from_secs(20)).await.unwrap();

    let output = Command::new(maas_binary())
        .args(["node", "start", "--config"])
        .arg(&config_path)
        .env("MAAS_DATA", &data)
        .env("MAAS_NODE__ID", "7")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("belongs to node 1, but node.id is 7"), "{stderr}");
}

#[test]
fn the_cli_says_when_no_node_answers() {
    let (code, _, stderr) = cli(&["cluster", "status"], "http://127.0.0.1:9");
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot reach the maas node at http://127.0.0.1:9"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_label_routes_refuse_bad_input_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("cluster.toml");
    std::fs::write(&config_path, format!("{CONFIG}cookie = \"secret-cookie-1\"\n")).unwrap();
    let mut command = Command::new(maas_binary());
    command.args(["node", "start", "--config"]).arg(&config_path).env("MAAS_DATA", dir.path().join("data"));
    let node = MaasProcess::spawn(command, dir.path().join("data")).unwrap();
    node.wait_ready(Duration::from_secs(20)).await.unwrap();
    let client = reqwest::Client::new();
    let labels = format!("{}/v1/nodes/1/labels", node.base_url);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (client.patch(&labels).json(&serde_json::json!({"set": {"a": "b"}})), 403, "cluster_cookie_mismatch"),
        (
            client.patch(&labels).header("x-maas-cluster-cookie", "wrong-cookie-1").json(&serde_json::json!({})),
            403,
            "cluster_cookie_mismatch",
        ),
        (
            client.patch(&labels).header("x-maas-cluster-cookie", "secret-cookie-1").body("{not json"),
            400,
            "invalid_json",
        ),
        (
            client
                .patch(&labels)
                .header("x-maas-cluster-cookie", "secret-cookie-1")
                .json(&serde_json::json!({"sett": {}})),
            400,
            "invalid_request",
        ),
        (
            client
                .patch(&labels)
                .header("x-maas-cluster-cookie", "secret-cookie-1")
                .json(&serde_json::json!({"set": {"bad key": "x"}})),
            400,
            "invalid_labels",
        ),
        (
            client
                .patch(format!("{}/v1/nodes/99/labels", node.base_url))
                .header("x-maas-cluster-cookie", "secret-cookie-1")
                .json(&serde_json::json!({"set": {"a": "b"}})),
            404,
            "not_found",
        ),
        (
            client
                .delete(format!("{}/v1/cluster/members/99", node.base_url))
                .header("x-maas-cluster-cookie", "secret-cookie-1"),
            404,
            "not_found",
        ),
        (
            client
                .post(format!("{}/v1/cluster/members", node.base_url))
                .header("x-maas-cluster-cookie", "secret-cookie-1")
                .json(&serde_json::json!({"id": "two"})),
            400,
            "invalid_request",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.unwrap();
        let got = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!((got, body["error"]["code"].as_str().unwrap_or_default()), (status, code), "{body}");
        assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty(), "{body}");
    }
    // Nothing changed: the node has no labels.
    let nodes: Value = maas_chaos_tests::admin_get_json("secret-cookie-1", format!("{}/v1/nodes", node.base_url)).await;
    assert_eq!(nodes["nodes"][0]["labels"], serde_json::json!({}));
}
