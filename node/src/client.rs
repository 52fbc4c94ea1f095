//! Admin commands that talk to a running node over its HTTP API and print tables (or
//! JSON with `--json`).

use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use maas_engine::model_files::SkippedFile;
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

/// The credential of admin commands: an API key (`MAAS_API_KEY`) when set, else the
/// cluster cookie (`MAAS_CLUSTER__COOKIE`, or the default of `maas up`).
pub(crate) fn with_credentials(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    let cookie = std::env::var("MAAS_CLUSTER__COOKIE").unwrap_or_else(|_| crate::config::DEFAULT_COOKIE.to_owned());
    authorised(request, &cookie)
}

/// `request` with an API key (`MAAS_API_KEY`) when set, so a tenant's own key acts for
/// them (an enterprise user importing a model of their own), else with `cookie`.
fn authorised(request: reqwest::RequestBuilder, cookie: &str) -> reqwest::RequestBuilder {
    match std::env::var("MAAS_API_KEY") {
        Ok(key) if !key.is_empty() => request.bearer_auth(key),
        _ => request.header("x-maas-cluster-cookie", cookie),
    }
}

async fn get(server: &str, path: &str) -> Result<Value> {
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let response = with_credentials(reqwest::Client::new().get(&url))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the maas node at {server}: is it running? (set --server or MAAS_SERVER)")
        })?;
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
                format!("{} MiB", text(&gpu["memory_used_mib"])),
                format!("{} MiB", text(&gpu["memory_reserved_mib"])),
                format!("{} MiB", text(&gpu["memory_free_mib"])),
                text(&gpu["node_status"]),
            ]
        })
        .collect();
    Ok(table(&["NODE", "GPU", "MODEL", "TOTAL", "USED", "RESERVED", "FREE", "NODE STATUS"], &rows))
}

/// Sends `body` (if any) with `method` and the cluster cookie (or `MAAS_API_KEY`); returns
/// the JSON answer or the API's error message.
async fn send(
    target: &Target,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
    body: Option<&Value>,
) -> Result<Value> {
    send_within(target, method, path, cookie, body, std::time::Duration::from_secs(60)).await
}

/// As [`send`], waiting up to `timeout` for the answer.
async fn send_within(
    target: &Target,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
    body: Option<&Value>,
    timeout: std::time::Duration,
) -> Result<Value> {
    let url = format!("{}{path}", target.server.trim_end_matches('/'));
    let mut request = authorised(reqwest::Client::new().request(method, &url), cookie).timeout(timeout);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.with_context(|| {
        format!("cannot reach the maas node at {}: is it running? (set --server or MAAS_SERVER)", target.server)
    })?;
    let status = response.status();
    let body: Value =
        response.json().await.with_context(|| format!("{url} answered {status} with a body that is not JSON"))?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("{message} ({status})");
    }
    Ok(body)
}

/// What `maas deploy` asks for.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The model's name.
    pub model: String,
    /// The deployment's name (default: the model's name, lowercased).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "latest")]
    pub model_version: String,
    /// Where the model's files are on the nodes (a Hugging Face folder or a .gguf file).
    #[arg(long, value_name = "PATH")]
    pub model_path: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// GPUs per replica, on one node; 0 runs on CPU.
    #[arg(long, default_value_t = 1)]
    pub gpus: u32,
    /// Memory per GPU in MiB, instead of the estimate.
    #[arg(long, value_name = "MIB")]
    pub memory_mib: Option<u64>,
    /// Context length per sequence the KV cache is sized for.
    #[arg(long, default_value_t = 4096)]
    pub context: u32,
    /// Sequences decoded at once.
    #[arg(long, default_value_t = 4)]
    pub sequences: u32,
    /// binpack (fill used GPUs first) or spread (different nodes first).
    #[arg(long, default_value = "binpack", value_parser = ["binpack", "spread"])]
    pub strategy: String,
    /// Only nodes with this label (KEY=VALUE; repeat for several).
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    pub selectors: Vec<String>,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Let higher-priority deployments stop these replicas.
    #[arg(long)]
    pub preemptible: bool,
    /// Run on CPU when no GPU fits.
    #[arg(long)]
    pub cpu_fallback: bool,
    /// Show the estimate and where a replica would go, and deploy nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace the spec of an existing deployment of this name (a rolling update).
    #[arg(long)]
    pub update: bool,
    #[command(flatten)]
    pub cookie: Cookie,
    #[command(flatten)]
    pub target: Target,
}

/// The cluster cookie, the credential of cluster operations until accounts exist.
#[derive(Debug, clap::Args)]
pub struct Cookie {
    /// The cluster cookie (cluster.cookie); `maas up` uses the default.
    #[arg(long, env = "MAAS_CLUSTER__COOKIE", hide_env_values = true, default_value = crate::config::DEFAULT_COOKIE)]
    pub cookie: String,
}

fn absolute(path: &std::path::Path) -> Result<String> {
    let path = std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    Ok(path.display().to_string())
}

pub async fn deploy(args: &DeployArgs) -> Result<String> {
    let mut out = String::new();
    let model_path = args.model_path.as_deref().map(absolute).transpose()?;
    if args.gpus > 0 {
        // The estimate, before anything is deployed.
        let mut request = serde_json::json!({
            "gpus_per_replica": args.gpus.max(1),
            "context_tokens": args.context, "concurrent_sequences": args.sequences,
        });
        if let Some(path) = &model_path {
            request["model_path"] = Value::String(path.clone());
        } else {
            request["model"] = Value::String(args.model.clone());
            request["model_version"] = Value::String(args.model_version.clone());
        }
        let path = model_path.clone().unwrap_or_else(|| format!("{}:{}", args.model, args.model_version));
        let estimate =
            send(&args.target, reqwest::Method::POST, "/v1/deployments/estimate", &args.cookie.cookie, Some(&request))
                .await?;
        let e = &estimate["model"]["estimate"];
        let _ = writeln!(
            out,
            "estimate for {} ({}, {} bytes of weights and files; context {} x {} sequences):\n  {} parameters: {} MiB weights + {} MiB KV cache + {} MiB overhead = {} MiB per replica, {} MiB on each of {} GPU(s)",
            path,
            text(&estimate["model"]["architecture"]),
            text(&estimate["model"]["total_bytes"]),
            args.context,
            args.sequences,
            text(&e["parameters"]),
            text(&e["weights_mib"]),
            text(&e["kv_cache_mib"]),
            text(&e["overhead_mib"]),
            text(&e["total_mib"]),
            text(&estimate["memory_per_gpu_mib"]),
            text(&estimate["gpus_per_replica"]),
        );
        match estimate["fits_on_node"].as_u64() {
            Some(node) => {
                let _ = writeln!(out, "  a replica fits now on node {node}, GPU(s) {}", estimate["fits_on_gpus"]);
            }
            None => {
                let _ = writeln!(out, "  no GPU has room now: {}", text(&estimate["shortfall"]["reason"]));
            }
        }
        if args.memory_mib.is_some() {
            let _ = writeln!(out, "  (--memory-mib overrides it)");
        }
    }
    if args.dry_run {
        return Ok(out);
    }
    let mut selector = serde_json::Map::new();
    for pair in &args.selectors {
        let (key, value) = pair.split_once('=').with_context(|| format!("--selector {pair}: expected KEY=VALUE"))?;
        selector.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    let name = args.name.clone().unwrap_or_else(|| {
        args.model.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect()
    });
    let mut body = serde_json::json!({
        "name": name, "model": args.model, "model_version": args.model_version,
        "replicas": args.replicas, "gpus_per_replica": args.gpus,
        "context_tokens": args.context, "concurrent_sequences": args.sequences,
        "strategy": args.strategy, "node_selector": selector, "priority": args.priority,
        "allow_preemption": args.preemptible, "cpu_fallback": args.cpu_fallback,
    });
    if let Some(path) = model_path {
        body["model_path"] = Value::String(path);
    }
    if let Some(mib) = args.memory_mib {
        body["memory_per_gpu_mib"] = mib.into();
    }
    let deployment = if args.update {
        send(&args.target, reqwest::Method::PUT, &format!("/v1/deployments/{name}"), &args.cookie.cookie, Some(&body))
            .await?
    } else {
        send(&args.target, reqwest::Method::POST, "/v1/deployments", &args.cookie.cookie, Some(&body)).await?
    };
    if args.target.json {
        return Ok(format!("{deployment:#}\n"));
    }
    let _ = writeln!(
        out,
        "deployment {} {} (generation {}): {} replica(s) of {}:{}, {} MiB on each of {} GPU(s); `maas deployment list` shows their progress",
        name,
        if args.update { "updated" } else { "created" },
        text(&deployment["generation"]),
        text(&deployment["replicas_desired"]),
        text(&deployment["model"]),
        text(&deployment["model_version"]),
        text(&deployment["memory_per_gpu_mib"]),
        text(&deployment["gpus_per_replica"]),
    );
    Ok(out)
}

pub async fn deployment_list(target: &Target) -> Result<String> {
    let list = get(&target.server, "/v1/deployments").await?;
    if target.json {
        return Ok(format!("{list:#}\n"));
    }
    let deployments = list["deployments"].as_array().map(Vec::as_slice).unwrap_or_default();
    if deployments.is_empty() {
        return Ok("no deployments (create one with `maas deploy`)\n".to_owned());
    }
    let mut out = String::new();
    let rows: Vec<Vec<String>> = deployments
        .iter()
        .map(|d| {
            vec![
                text(&d["id"]),
                format!("{}:{}", text(&d["model"]), text(&d["model_version"])),
                format!("{}/{}", text(&d["replicas_ready"]), text(&d["replicas_desired"])),
                text(&d["generation"]),
                format!("{} x {} MiB", text(&d["gpus_per_replica"]), text(&d["memory_per_gpu_mib"])),
                text(&d["strategy"]),
            ]
        })
        .collect();
    out.push_str(&table(&["NAME", "MODEL", "READY", "GEN", "GPUS x MEMORY", "STRATEGY"], &rows));
    let mut replicas = Vec::new();
    for d in deployments {
        for r in d["replicas"].as_array().map(Vec::as_slice).unwrap_or_default() {
            replicas.push(vec![
                text(&r["id"]),
                text(&r["node_id"]),
                text(&r["gpu_indices"]),
                match r["reason"].as_str() {
                    Some(reason) => format!("{} ({reason})", text(&r["state"])),
                    None => text(&r["state"]),
                },
                text(&r["role"]),
                text(&r["restarts"]),
            ]);
        }
        if let Some(reason) = d["shortfall"]["reason"].as_str() {
            let _ = writeln!(
                out,
                "\n{}: {} replica(s) not placed: {reason}",
                text(&d["id"]),
                text(&d["shortfall"]["missing_replicas"])
            );
        }
    }
    if !replicas.is_empty() {
        out.push('\n');
        out.push_str(&table(&["REPLICA", "NODE", "GPUS", "STATE", "ROLE", "RESTARTS"], &replicas));
    }
    Ok(out)
}

/// The last lines of a deployment's log from every node, oldest first.
pub async fn deployment_logs(target: &Target, name: &str, limit: u32, level: &str) -> Result<String> {
    let logs = get(&target.server, &format!("/v1/deployments/{name}/logs?limit={limit}&level={level}")).await?;
    if target.json {
        return Ok(format!("{logs:#}\n"));
    }
    let mut out = String::new();
    for line in logs["lines"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let at = utc_time(line["at_ms"].as_i64().unwrap_or(0));
        let _ = writeln!(
            out,
            "{at} node {} {} {:<5} {}",
            text(&line["node_id"]),
            text(&line["replica_id"]),
            text(&line["level"]).to_uppercase(),
            text(&line["message"])
        );
    }
    if out.is_empty() {
        out.push_str("nothing logged yet\n");
    }
    if let Some(missing) = logs["nodes_missing"].as_array().filter(|m| !m.is_empty()) {
        let nodes: Vec<String> = missing.iter().map(text).collect();
        let _ = writeln!(out, "nodes {} did not answer: their lines are missing", nodes.join(", "));
    }
    Ok(out)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of milliseconds since the Unix epoch.
fn utc_time(at_ms: i64) -> String {
    let day = maas_store::repo::usage::day_name(at_ms.div_euclid(86_400_000));
    let in_day = at_ms.rem_euclid(86_400_000);
    let (hours, minutes, seconds, millis) =
        (in_day / 3_600_000, in_day / 60_000 % 60, in_day / 1000 % 60, in_day % 1000);
    format!("{day}T{hours:02}:{minutes:02}:{seconds:02}.{millis:03}Z")
}

pub async fn deployment_scale(target: &Target, cookie: &str, name: &str, replicas: u32) -> Result<String> {
    let body = serde_json::json!({ "replicas": replicas });
    let answer = send(target, reqwest::Method::PATCH, &format!("/v1/deployments/{name}"), cookie, Some(&body)).await?;
    if target.json {
        return Ok(format!("{answer:#}\n"));
    }
    Ok(format!("deployment {name} scaled to {replicas} replica(s)\n"))
}

pub async fn deployment_delete(target: &Target, cookie: &str, name: &str) -> Result<String> {
    let answer = send(target, reqwest::Method::DELETE, &format!("/v1/deployments/{name}"), cookie, None).await?;
    if target.json {
        return Ok(format!("{answer:#}\n"));
    }
    Ok(format!("deployment {name} deleted; its replicas are stopping\n"))
}

pub async fn node_drain(target: &Target, cookie: &str, id: u64, undo: bool) -> Result<String> {
    let method = if undo { reqwest::Method::DELETE } else { reqwest::Method::POST };
    let answer = send(target, method, &format!("/v1/nodes/{id}/drain"), cookie, None).await?;
    if target.json {
        return Ok(format!("{answer:#}\n"));
    }
    Ok(if undo {
        format!("node {id} takes work again\n")
    } else {
        format!(
            "node {id} is draining: its replicas move to other nodes as room allows (`maas deployment list` shows them)\n"
        )
    })
}

/// What `maas model import` uploads.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json, ...), a
    /// .gguf file, or a .tar, .tar.gz (.tgz) or .zip archive of either. Of a folder only
    /// the files the model needs are uploaded; the others (PyTorch, TensorFlow, Flax and
    /// ONNX copies of the weights, the original checkpoint, remote code) are listed.
    pub path: PathBuf,
    /// The model's name in the repository (letters, digits, `.`, `-`, `_`, `/`). A
    /// catalogue name (`maas model catalog`) has the files checked against the catalogue
    /// first.
    #[arg(long)]
    pub name: String,
    /// The version (default: the next vN). Versions are immutable.
    #[arg(long)]
    pub version: Option<String>,
    /// Default: the catalogue entry's description, for a catalogue name.
    #[arg(long, default_value = "")]
    pub description: String,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub cookie: Cookie,
    #[command(flatten)]
    pub target: Target,
}

/// A file to upload: its path in the model, where it is, its size.
type UploadFile = (String, PathBuf, u64);
/// The files of an upload, and those left out with their sizes.
type UploadPlan = (Vec<UploadFile>, Vec<(SkippedFile, u64)>);

/// What `maas model import` uploads of `root`: a single file as it is; of a folder only the
/// files the model needs ([`maas_engine::model_files::select_model_files`], the rule the
/// node registers by), with the files left out, why, and their sizes. Hidden files are
/// never uploaded.
fn upload_plan(root: &std::path::Path) -> Result<UploadPlan> {
    let meta = std::fs::metadata(root).with_context(|| format!("cannot read {}", root.display()))?;
    if meta.is_file() {
        let name = root.file_name().context("the path has no file name")?.to_string_lossy().into_owned();
        return Ok((vec![(name, root.to_owned(), meta.len())], Vec::new()));
    }
    let sizes: std::collections::BTreeMap<String, u64> =
        maas_engine::model_files::folder_files(root).map_err(|e| anyhow::anyhow!("{e}"))?.into_iter().collect();
    let selection = maas_engine::model_files::select_folder(root).map_err(|e| anyhow::anyhow!("{e}"))?;
    let size_of = |path: &str| sizes.get(path).copied().unwrap_or(0);
    let needed = selection.needed.iter().map(|path| (path.clone(), root.join(path), size_of(path))).collect();
    let skipped = selection
        .skipped
        .into_iter()
        .map(|file| {
            let size = size_of(&file.path);
            (file, size)
        })
        .collect();
    Ok((needed, skipped))
}

/// The files an import leaves out, one line each, or one line for a folder whose files are
/// all left out for one reason (`original/`, `onnx/`).
fn skipped_report(skipped: &[(SkippedFile, u64)]) -> String {
    let mut groups: std::collections::BTreeMap<(String, &str), (u64, u64)> = std::collections::BTreeMap::new();
    for (file, size) in skipped {
        let shown = match file.path.split_once('/') {
            Some((folder, _)) => format!("{folder}/"),
            None => file.path.clone(),
        };
        let group = groups.entry((shown, file.reason)).or_default();
        group.0 += 1;
        group.1 += size;
    }
    let files: u64 = groups.values().map(|(count, _)| count).sum();
    let bytes: u64 = groups.values().map(|(_, size)| size).sum();
    let mut out = format!("left out {files} file(s) ({}) the model does not need:\n", human_bytes(bytes));
    for ((shown, reason), (count, size)) in &groups {
        let count = if *count > 1 { format!("{count} files, ") } else { String::new() };
        let _ = writeln!(out, "  {shown} ({count}{}): {reason}", human_bytes(*size));
    }
    out
}

/// Bytes in the largest unit that keeps a whole number in front: `14.5 GB`, `312 B`.
fn human_bytes(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let value = bytes as f64;
    if value >= 1e9 {
        format!("{:.1} GB", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.1} MB", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1} kB", value / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// An archive unpacked next to itself (or in the temporary folder) for the local checks;
/// the folder goes when this is dropped.
struct LocalUnpack {
    _dir: tempfile::TempDir,
    /// The model folder, or its one .gguf file.
    model: PathBuf,
}

/// Unpacks the archive at `path` with the node's rules (no links, no `..`, a single top
/// folder stripped), bounded by 20 times its size (at least 1 GiB) against a bomb.
fn unpack_locally(path: &std::path::Path) -> Result<LocalUnpack> {
    use maas_engine::archive::{ArchiveLimits, MAX_ENTRIES, unpack};
    let archive_bytes = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    let dir = path
        .parent()
        .and_then(|parent| tempfile::Builder::new().prefix(".maas-import-").tempdir_in(parent).ok())
        .map_or_else(|| tempfile::Builder::new().prefix("maas-import-").tempdir(), Ok)
        .context("cannot make a folder to check the archive in")?;
    let root = dir.path().to_owned();
    let limits =
        ArchiveLimits { max_total_bytes: archive_bytes.saturating_mul(20).max(1 << 30), max_entries: MAX_ENTRIES };
    let unpacked = unpack(path, limits, |relative, reader| {
        let target = root.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::File::create_new(&target)?;
        std::io::copy(reader, &mut file)
    })
    .with_context(|| format!("{}", path.display()))?;
    let base = match &unpacked.top_folder {
        Some(top) => root.join(top),
        None => root.clone(),
    };
    let model = match unpacked.files.as_slice() {
        [(single, _)] if single.to_ascii_lowercase().ends_with(".gguf") => base.join(single),
        _ => base,
    };
    Ok(LocalUnpack { _dir: dir, model })
}

fn progress_bar(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    )
}

/// Streams one file to `POST /v1/blobs`, advancing `progress`; returns its sha256.
async fn upload_blob(
    args: &ImportArgs,
    client: &reqwest::Client,
    (relative, path, size): (&str, &std::path::Path, u64),
    progress: &indicatif::ProgressBar,
) -> Result<Value> {
    let base = args.target.server.trim_end_matches('/');
    progress.set_message(relative.to_owned());
    let file = tokio::fs::File::open(path).await.with_context(|| format!("cannot open {}", path.display()))?;
    let counted = progress.clone();
    let stream =
        futures_util::StreamExt::map(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20), move |chunk| {
            if let Ok(bytes) = &chunk {
                counted.inc(bytes.len() as u64);
            }
            chunk
        });
    let response = authorised(client.post(format!("{base}/v1/blobs")), &args.cookie.cookie)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the maas node at {base}: is it running? (set --server or MAAS_SERVER)")
        })?;
    let status = response.status();
    let body: Value =
        response.json().await.with_context(|| format!("uploading {relative}: answer {status} is not JSON"))?;
    if !status.is_success() {
        bail!("uploading {relative}: {} ({status})", body["error"]["message"].as_str().unwrap_or("no message"));
    }
    Ok(body["sha256"].clone())
}

pub async fn model_import(args: &ImportArgs) -> Result<String> {
    let archive_name = args.path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let is_archive = args.path.is_file() && maas_engine::archive::ArchiveKind::from_file_name(&archive_name).is_some();
    // An archive is unpacked here for the checks (and by the node again on import).
    let unpacked = if is_archive { Some(unpack_locally(&args.path)?) } else { None };
    let model_path = unpacked.as_ref().map_or(args.path.as_path(), |u| u.model.as_path());
    // Check it is a model, and the catalogue's model when the name is a catalogue name,
    // here first: bad files fail before anything is uploaded.
    let checked = maas_engine::model_files::inspect_headers(model_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(entry) = maas_engine::catalog::find(&args.name) {
        maas_engine::catalog::check(entry, &checked).map_err(|reason| anyhow::anyhow!("{reason}"))?;
        if !args.target.json {
            println!(
                "the files match catalogue entry {} ({}, from {})",
                entry.name, entry.display_name, entry.source_repo
            );
            if let Some(reason) = entry.not_servable_reason {
                println!("note: this build cannot serve it yet: {reason}");
            }
        }
    }
    // What the upload leaves out, said before it starts. An archive goes up whole: the node
    // leaves those files out when it registers the version.
    let (files, skipped) = if is_archive { (Vec::new(), Vec::new()) } else { upload_plan(&args.path)? };
    let archive_extras = match &unpacked {
        Some(unpacked) if unpacked.model.is_dir() => upload_plan(&unpacked.model)?.1,
        _ => Vec::new(),
    };
    let report = match (skipped.is_empty(), archive_extras.is_empty()) {
        (false, _) => skipped_report(&skipped),
        (true, false) => format!(
            "{}the archive is uploaded whole and the node leaves these out; import the unpacked folder to upload only what the model needs\n",
            skipped_report(&archive_extras)
        ),
        (true, true) => String::new(),
    };
    if !report.is_empty() {
        // With --json, stdout holds only the answer.
        if args.target.json {
            eprint!("{report}");
        } else {
            print!("{report}");
        }
    }
    let client = reqwest::Client::new();
    let mut request = serde_json::json!({"name": args.name, "description": args.description});
    let (count, total) = if is_archive {
        let size = std::fs::metadata(&args.path).with_context(|| format!("cannot read {}", args.path.display()))?.len();
        let progress = progress_bar(size, args.quiet);
        let sha256 = upload_blob(args, &client, (&archive_name, &args.path, size), &progress).await?;
        progress.finish_and_clear();
        request["archive_sha256"] = sha256;
        (checked.files.len(), checked.total_bytes)
    } else {
        let total: u64 = files.iter().map(|(_, _, size)| size).sum();
        let progress = progress_bar(total, args.quiet);
        let mut manifest = Vec::new();
        for (relative, path, size) in &files {
            let sha256 = upload_blob(args, &client, (relative, path, *size), &progress).await?;
            manifest.push(serde_json::json!({"path": relative, "sha256": sha256, "size_bytes": size}));
        }
        progress.finish_and_clear();
        request["files"] = Value::Array(manifest);
        (files.len(), total)
    };
    if let Some(version) = &args.version {
        request["version"] = Value::String(version.clone());
    }
    // The node unpacks an archive before it answers: allow for a large one.
    let record = send_within(
        &args.target,
        reqwest::Method::POST,
        "/v1/registry/models",
        &args.cookie.cookie,
        Some(&request),
        std::time::Duration::from_secs(if is_archive { 4 * 3600 } else { 600 }),
    )
    .await?;
    if args.target.json {
        return Ok(format!("{record:#}\n"));
    }
    Ok(format!(
        "imported {}:{} ({}, {} parameters, context {}, {}, tasks {}): {} files, {} bytes, {} tensors checked\n",
        text(&record["name"]),
        text(&record["version"]),
        text(&record["architecture"]),
        text(&record["parameters"]),
        text(&record["context_length"]),
        text(&record["dtype"]),
        record["tasks"].as_array().map(|t| t.iter().map(text).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        count,
        total,
        checked.tensors,
    ))
}

/// `maas model catalog`: the built-in catalogue, from this binary (no node needed).
pub fn model_catalog(json: bool) -> String {
    let entries = maas_engine::catalog::entries();
    if json {
        let models: Vec<Value> = entries
            .iter()
            .map(|entry| {
                let mut value = serde_json::to_value(entry).unwrap_or_default();
                value["description"] = Value::String(entry.description());
                value
            })
            .collect();
        return format!("{:#}\n", serde_json::json!({ "models": models }));
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|entry| {
            vec![
                entry.name.to_owned(),
                entry.family.to_owned(),
                human_count(entry.parameters),
                entry.context_length.to_string(),
                entry.tasks.join(","),
                if entry.servable { "yes".to_owned() } else { "no".to_owned() },
                match entry.source_file {
                    Some(file) => format!("{} ({file})", entry.source_repo),
                    None => entry.source_repo.to_owned(),
                },
            ]
        })
        .collect();
    let mut out = table(&["NAME", "FAMILY", "PARAMETERS", "CONTEXT", "TASKS", "SERVABLE", "SOURCE"], &rows);
    out.push_str(
        "\nImport one with the files on disk: maas model import PATH --name NAME (the files are checked against the entry).\n",
    );
    out
}

/// 494032768 → `494M`, 7615616512 → `7.6B`.
fn human_count(count: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let value = count as f64;
    if value >= 1e9 {
        format!("{:.1}B", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.0}M", value / 1e6)
    } else {
        count.to_string()
    }
}

pub async fn model_list(target: &Target) -> Result<String> {
    let list = get(&target.server, "/v1/registry/models").await?;
    if target.json {
        return Ok(format!("{list:#}\n"));
    }
    let versions = list["versions"].as_array().map(Vec::as_slice).unwrap_or_default();
    if versions.is_empty() {
        return Ok("no models in the repository (import one with `maas model import PATH --name NAME`)\n".to_owned());
    }
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                text(&v["name"]),
                text(&v["version"]),
                text(&v["architecture"]),
                text(&v["parameters"]),
                text(&v["context_length"]),
                format!("{}/{}", text(&v["dtype"]), text(&v["quantization"])),
                v["tasks"].as_array().map(|t| t.iter().map(text).collect::<Vec<_>>().join(",")).unwrap_or_default(),
                format!("{} MiB", v["total_bytes"].as_u64().unwrap_or(0).div_ceil(1024 * 1024)),
            ]
        })
        .collect();
    Ok(table(&["NAME", "VERSION", "ARCHITECTURE", "PARAMETERS", "CONTEXT", "DTYPE/QUANT", "TASKS", "SIZE"], &rows))
}

/// `maas admin create`: an active account with a role, made through the node's API.
#[derive(Debug, clap::Args)]
pub struct AdminCreateArgs {
    /// The account's email address (or give --phone).
    #[arg(long)]
    pub email: Option<String>,
    #[arg(long)]
    pub phone: Option<String>,
    /// The password (checked for strength); read from MAAS_ADMIN_PASSWORD when not given.
    #[arg(long, env = "MAAS_ADMIN_PASSWORD", hide_env_values = true)]
    pub password: String,
    #[arg(long)]
    pub name: Option<String>,
    /// admin, enterprise or user.
    #[arg(long, default_value = "admin", value_parser = ["admin", "enterprise", "user"])]
    pub role: String,
    #[command(flatten)]
    pub cookie: Cookie,
    #[command(flatten)]
    pub target: Target,
}

pub async fn admin_create(args: &AdminCreateArgs) -> Result<String> {
    let body = serde_json::json!({
        "email": args.email, "phone": args.phone, "password": args.password,
        "display_name": args.name, "role": args.role,
    });
    let user = send(&args.target, reqwest::Method::POST, "/v1/admin/users", &args.cookie.cookie, Some(&body)).await?;
    if args.target.json {
        return Ok(format!("{user:#}\n"));
    }
    Ok(format!(
        "account {} ({}) created with role {}; it signs in at once (POST /v1/auth/login)\n",
        text(&user["id"]),
        text(if user["email"].is_null() { &user["phone"] } else { &user["email"] }),
        text(&user["role"])
    ))
}

/// Messages to users (verification and reset codes) that no SMTP server or SMS provider
/// sent: an administrator passes them on.
pub async fn admin_outbox(target: &Target, recipient: Option<&str>) -> Result<String> {
    let path = match recipient {
        Some(recipient) => format!("/v1/admin/outbox?recipient={}", recipient.trim()),
        None => "/v1/admin/outbox".to_owned(),
    };
    let list = get(&target.server, &path).await?;
    if target.json {
        return Ok(format!("{list:#}\n"));
    }
    let messages = list["data"].as_array().map(Vec::as_slice).unwrap_or_default();
    if messages.is_empty() {
        return Ok("the outbox is empty\n".to_owned());
    }
    let rows: Vec<Vec<String>> = messages
        .iter()
        .map(|m| {
            let state = if m["sent_at_ms"].is_null() { "not sent" } else { "sent" };
            vec![text(&m["channel"]), text(&m["recipient"]), text(&m["subject"]), text(&m["body"]), state.to_owned()]
        })
        .collect();
    Ok(table(&["CHANNEL", "TO", "SUBJECT", "MESSAGE", "STATE"], &rows))
}

/// `maas key create`: an API key of the node's administrator (or of the account whose
/// key is in MAAS_API_KEY), shown once.
#[derive(Debug, clap::Args)]
pub struct KeyCreateArgs {
    #[arg(long)]
    pub name: String,
    /// inference (the default), read_only or admin; repeat for several.
    #[arg(long = "scope", value_parser = ["inference", "read_only", "admin"])]
    pub scopes: Vec<String>,
    /// Models the key may call; repeat for several (default: every model).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Days until the key stops working (default: never).
    #[arg(long)]
    pub expires_in_days: Option<u32>,
    #[command(flatten)]
    pub cookie: Cookie,
    #[command(flatten)]
    pub target: Target,
}

pub async fn key_create(args: &KeyCreateArgs) -> Result<String> {
    let mut body = serde_json::json!({"name": args.name, "allowed_models": args.models});
    if !args.scopes.is_empty() {
        body["scopes"] = serde_json::json!(args.scopes);
    }
    if let Some(days) = args.expires_in_days {
        body["expires_in_days"] = serde_json::json!(days);
    }
    let key = send(&args.target, reqwest::Method::POST, "/v1/keys", &args.cookie.cookie, Some(&body)).await?;
    if args.target.json {
        return Ok(format!("{key:#}\n"));
    }
    Ok(format!(
        "{}\n\nkey {} ({}) created; it is shown once: keep it now. Use it as an OpenAI key:\n  \
         OPENAI_BASE_URL={}/v1 OPENAI_API_KEY=<the key above>\n",
        text(&key["key"]),
        text(&key["id"]),
        text(&key["name"]),
        args.target.server.trim_end_matches('/')
    ))
}

pub async fn key_list(target: &Target) -> Result<String> {
    let list = get(&target.server, "/v1/keys").await?;
    if target.json {
        return Ok(format!("{list:#}\n"));
    }
    let keys = list["data"].as_array().map(Vec::as_slice).unwrap_or_default();
    if keys.is_empty() {
        return Ok("no api keys (create one with `maas key create --name NAME`)\n".to_owned());
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let scopes: Vec<String> = k["scopes"].as_array().into_iter().flatten().map(text).collect();
            vec![
                text(&k["id"]),
                text(&k["name"]),
                format!("{}…", text(&k["prefix"])),
                scopes.join(","),
                text(&k["status"]),
            ]
        })
        .collect();
    Ok(table(&["ID", "NAME", "PREFIX", "SCOPES", "STATUS"], &rows))
}

pub async fn key_revoke(target: &Target, cookie: &str, id: &str) -> Result<String> {
    let key = send(target, reqwest::Method::DELETE, &format!("/v1/keys/{id}"), cookie, None).await?;
    if target.json {
        return Ok(format!("{key:#}\n"));
    }
    Ok(format!("key {} ({}) revoked\n", text(&key["id"]), text(&key["name"])))
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_printed_in_utc_to_the_millisecond() {
        assert_eq!(super::utc_time(1_733_390_000_123), "2024-12-05T09:13:20.123Z");
        assert_eq!(super::utc_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::utc_time(-1), "1969-12-31T23:59:59.999Z");
    }
}
