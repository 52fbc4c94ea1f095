//! Real `maas` processes: start on embedded defaults, serve, and stop on signals:
//! SIGTERM drains in-flight requests, a second SIGTERM or the drain bound ends the process.

use std::process::Command;
use std::time::{Duration, Instant};

use maas_chaos_tests::{MaasProcess, maas_binary, refuses_connections, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

fn node_config(drain_timeout_secs: u64) -> String {
    format!(
        "[listen]\napi = \"127.0.0.1:0\"\ncluster = \"127.0.0.1:0\"\n\
         [gateway]\ndebug_routes = true\ndrain_timeout_secs = {drain_timeout_secs}\n"
    )
}

async fn in_flight(base_url: &str) -> f64 {
    let Ok(response) =
        maas_chaos_tests::admin_get(maas_chaos_tests::DEFAULT_COOKIE, format!("{base_url}/metrics")).await
    else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("maas_http_requests_in_flight "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Waits until a slow request is being handled: the `/metrics` request itself counts one.
async fn wait_for_slow_request(node: &MaasProcess) {
    wait_until("the slow request is in flight", Duration::from_secs(20), || async {
        in_flight(&node.base_url).await >= 2.0
    })
    .await
    .unwrap();
}

async fn wait_for_closed_listener(node: &MaasProcess) {
    wait_until("the listener is closed", Duration::from_secs(10), || refuses_connections(node.api_addr()))
        .await
        .unwrap();
}

fn slow_request(node: &MaasProcess, ms: u64) -> tokio::task::JoinHandle<Result<(u16, String), String>> {
    let url = format!("{}/debug/delay?ms={ms}", node.base_url);
    tokio::spawn(async move {
        let response =
            maas_chaos_tests::admin_get(maas_chaos_tests::DEFAULT_COOKIE, url).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        Ok((status, response.text().await.map_err(|e| e.to_string())?))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_health_metrics_and_openapi_then_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(maas_binary());
    command.args(["up", "--listen", "127.0.0.1:0"]).arg("--data").arg(dir.path().join("data"));
    let mut node = MaasProcess::spawn(command, dir.path().join("data")).unwrap();
    node.wait_ready(Duration::from_secs(20)).await.unwrap();

    let client = maas_chaos_tests::admin_client(maas_chaos_tests::DEFAULT_COOKIE);

    for _ in 0..2 {
        let health = client.get(format!("{}/healthz", node.base_url)).send().await.unwrap();
        assert_eq!(health.status(), 200);
    }
    let ready = client.get(format!("{}/readyz", node.base_url)).send().await.unwrap();
    assert_eq!(ready.status(), 200, "ready once the store is migrated");
    let metrics = client.get(format!("{}/metrics", node.base_url)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("maas_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 2"),
        "{metrics}"
    );
    let openapi: Value =
        client.get(format!("{}/openapi.json", node.base_url)).send().await.unwrap().json().await.unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
    assert!(dir.path().join("data/maas.db").exists(), "the SQLite database is in the data directory");
    assert!(dir.path().join("data/blobs").is_dir());

    node.signal(Signal::SIGTERM).unwrap();
    let status = node.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_and_refuses_new_connections() {
    let mut node = MaasProcess::start_with_config(&node_config(30)).unwrap();
    let slow = slow_request(&node, 1500);
    wait_for_slow_request(&node).await;
    node.signal(Signal::SIGTERM).unwrap();
    wait_for_closed_listener(&node).await;

    let (status, body) = slow.await.unwrap().expect("the in-flight request completes");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"delayed_ms\":1500"), "{body}");
    let exit = node.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(exit.success(), "a drained stop exits 0: {exit:?}");
    let stderr = node.stderr_so_far().join("\n");
    assert!(stderr.contains("stopped after draining every request"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_at_once() {
    let mut node = MaasProcess::start_with_config(&node_config(300)).unwrap();
    let slow = slow_request(&node, 60_000);
    wait_for_slow_request(&node).await;
    node.signal(Signal::SIGTERM).unwrap();
    wait_for_closed_listener(&node).await;
    let second = Instant::now();
    node.signal(Signal::SIGTERM).unwrap();
    let exit = node.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(second.elapsed() < Duration::from_secs(20));
    assert_eq!(exit.code(), Some(130), "{exit:?}");
    assert!(slow.await.unwrap().is_err(), "the cut request fails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_bound_ends_the_process() {
    let mut node = MaasProcess::start_with_config(&node_config(1)).unwrap();
    let slow = slow_request(&node, 60_000);
    wait_for_slow_request(&node).await;
    let stop = Instant::now();
    node.signal(Signal::SIGTERM).unwrap();
    let exit = node.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(stop.elapsed() < Duration::from_secs(20), "ended by the 1 s bound, not the 60 s request");
    assert!(exit.success(), "{exit:?}");
    assert!(slow.await.unwrap().is_err(), "the cut request fails");
    let stderr = node.stderr_so_far().join("\n");
    assert!(stderr.contains("drain bound"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_cannot_share_a_data_directory() {
    let first = MaasProcess::start_with_config(&node_config(5)).unwrap();
    let output = Command::new(maas_binary())
        .args(["up", "--listen", "127.0.0.1:0", "--data"])
        .arg(&first.data_dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("another maas process is using the data directory"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id_of_each_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(maas_binary());
    command.args(["up", "--log-format", "json", "--listen", "127.0.0.1:0"]).arg("--data").arg(dir.path().join("data"));
    let mut node = MaasProcess::spawn(command, dir.path().join("data")).unwrap();
    let response = maas_chaos_tests::admin_get(maas_chaos_tests::DEFAULT_COOKIE, format!("{}/healthz", node.base_url))
        .await
        .unwrap();
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    node.signal(Signal::SIGTERM).unwrap();
    node.wait_exit(Duration::from_secs(20)).await.unwrap();

    let lines = node.stderr_so_far();
    assert!(!lines.is_empty());
    let records: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}")))
        .collect();
    let request_log = records
        .iter()
        .find(|record| record["message"] == "request")
        .unwrap_or_else(|| panic!("a request log line: {lines:?}"));
    assert_eq!(request_log["span"]["request_id"], request_id.as_str());
    assert_eq!(request_log["span"]["route"], "/healthz");
    assert_eq!(request_log["status"], 200);
}
