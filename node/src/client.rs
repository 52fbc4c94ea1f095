//! Admin commands that talk to a running node over its HTTP API and print tables (or
//! JSON with `--json`).

use std::fmt::Write as _;
use std::future::Future;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Which node to ask, and how to print.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The node's API address.
    #[arg(long, env = "MAAS_SERVER", default_value = "http://127.0.0.1:8080", value_name = "URL")]
    server: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs one admin command on a small runtime; errors print as one line and exit 1.
pub fn run(command: impl Future<Output = Result<String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn get(server: &str, path: &str) -> Result<Value> {
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let response =
        reqwest::Client::new().get(&url).timeout(std::time::Duration::from_secs(10)).send().await.with_context(
            || format!("cannot reach the maas node at {server}: is it running? (set --server or MAAS_SERVER)"),
        )?;
    let status = response.status();
    let body: Value =
        response.json().await.with_context(|| format!("{url} answered {status} with a body that is not JSON"))?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("{url} answered {status}: {message}");
    }
    Ok(body)
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect(), &mut out);
    for row in rows {
        line(row.clone(), &mut out);
    }
    out
}

pub async fn cluster_status(target: &Target) -> Result<String> {
    {
        let mut status = get(&target.server, "/v1/cluster/status").await?;
        // Lag is known on the leader: ask it when another node answered.
        if status["role"] != "leader"
            && let Some(leader) = status["leader_api_addr"].as_str()
            && let Ok(from_leader) = get(leader, "/v1/cluster/status").await
        {
            status = from_leader;
        }
        if target.json {
            return Ok(format!("{status:#}\n"));
        }
        let mut out = String::new();
        let leader = match status["leader_id"].as_u64() {
            Some(0) | None => "none (an election is on)".to_owned(),
            Some(id) => format!("node {id}"),
        };
        let _ = writeln!(
            out,
            "leader: {leader}   term: {}   commit index: {}   applied: {}   answered by: node {} ({})\n",
            text(&status["term"]),
            text(&status["commit_index"]),
            text(&status["applied_index"]),
            text(&status["node_id"]),
            text(&status["role"]),
        );
        let rows: Vec<Vec<String>> = status["members"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|member| {
                vec![
                    text(&member["id"]),
                    text(&member["name"]),
                    if member["leader"] == true {
                        "leader".into()
                    } else if member["voter"] == true {
                        "voter".into()
                    } else {
                        "-".into()
                    },
                    text(&member["status"]),
                    text(&member["connection"]),
                    text(&member["lag"]),
                    text(&member["api_addr"]),
                ]
            })
            .collect();
        if let Some(failed) = status["failed"].as_str() {
            let _ = writeln!(out, "this node's raft has stopped: {failed}\n");
        }
        out.push_str(&table(&["ID", "NAME", "ROLE", "HEALTH", "CONNECTION", "LAG", "API"], &rows));
        Ok(out)
    }
}

pub async fn node_list(target: &Target) -> Result<String> {
    {
        let list = get(&target.server, "/v1/nodes").await?;
        if target.json {
            return Ok(format!("{list:#}\n"));
        }
        let rows: Vec<Vec<String>> = list["nodes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|node| {
                let gpus = node["gpus"].as_array().map(Vec::as_slice).unwrap_or_default();
                let gpu_text = if gpus.is_empty() {
                    "-".to_owned()
                } else {
                    let simulated = gpus.iter().any(|g| g["simulated"] == true);
                    let total: u64 = gpus.iter().filter_map(|g| g["memory_total_mib"].as_u64()).sum();
                    format!(
                        "{}x {}, {} MiB{}",
                        gpus.len(),
                        text(&gpus[0]["model"]),
                        total,
                        if simulated { " (simulated)" } else { "" }
                    )
                };
                vec![
                    text(&node["id"]),
                    text(&node["name"]),
                    text(&node["status"]),
                    text(&node["cpu_cores"]),
                    format!("{} MiB", text(&node["memory_mib"])),
                    gpu_text,
                    text(&node["api_addr"]),
                ]
            })
            .collect();
        Ok(table(&["ID", "NAME", "STATUS", "CPUS", "MEMORY", "GPUS", "API"], &rows))
    }
}

pub async fn node_remove(target: &Target, id: u64, cookie: &str) -> Result<String> {
    let url = format!("{}/v1/cluster/members/{id}", target.server.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .delete(&url)
        .header("x-maas-cluster-cookie", cookie)
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .with_context(|| format!("cannot reach the maas node at {}: is it running?", target.server))?;
    let status = response.status();
    let body: Value =
        response.json().await.with_context(|| format!("{url} answered {status} with a body that is not JSON"))?;
    if !status.is_success() {
        bail!("{url} answered {status}: {}", body["error"]["message"].as_str().unwrap_or("no message"));
    }
    if target.json {
        return Ok(format!("{body:#}\n"));
    }
    Ok(format!("node {id} removed from the cluster\n"))
}

pub async fn gpu_list(target: &Target) -> Result<String> {
    let list = get(&target.server, "/v1/gpus").await?;
    if target.json {
        return Ok(format!("{list:#}\n"));
    }
    let gpus = list["gpus"].as_array().map(Vec::as_slice).unwrap_or_default();
    if gpus.is_empty() {
        return Ok("no GPUs in the cluster (nodes without an NVIDIA driver are CPU-only; see node.simulated_gpus)\n"
            .to_owned());
    }
    let rows: Vec<Vec<String>> = gpus
        .iter()
        .map(|gpu| {
            vec![
                format!("{} ({})", text(&gpu["node_name"]), text(&gpu["node_id"])),
                text(&gpu["index"]),
                format!("{}{}", text(&gpu["model"]), if gpu["simulated"] == true { " (simulated)" } else { "" }),
                format!("{} MiB", text(&gpu["memory_total_mib"])),
                format!("{} MiB", text(&gpu["memory_reserved_mib"])),
                format!("{} MiB", text(&gpu["memory_free_mib"])),
                text(&gpu["node_status"]),
            ]
        })
        .collect();
    Ok(table(&["NODE", "GPU", "MODEL", "TOTAL", "RESERVED", "FREE", "NODE STATUS"], &rows))
}
