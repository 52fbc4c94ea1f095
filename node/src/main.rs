//! `maas`: the daemon and admin CLI of the maas Model-as-a-Service platform.

mod bench;
mod bench_ann;
mod bench_auth;
mod bench_gateway;
mod bench_retrieval;
mod client;
mod config;
mod logging;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

/// mimalloc keeps freed memory for reuse: with glibc's allocator every large activation of
/// a prefill is a fresh mapping whose pages fault in, which cost a 512-token prefill about
/// a fifth of its time (BENCHMARKS.md, inference engine).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "maas",
    version,
    about = "Self-hosted Model-as-a-Service: one binary per GPU machine",
    long_about = "Self-hosted Model-as-a-Service: one binary per GPU machine.\n\n\
        `maas up` runs a single node on embedded defaults (SQLite, in-process cache, embedded \
        vector index). `maas node start --config cluster.toml` runs a node from a configuration \
        file. Environment variables MAAS_SECTION__KEY override keys of the file, e.g. \
        MAAS_LISTEN__API=0.0.0.0:8080."
)]
struct Cli {
    /// Log format on stderr; overrides `log.format`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `info,maas_gateway=debug`; overrides `log.level`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node on embedded defaults: data in ./maas-data (or $MAAS_DATA), SQLite,
    /// in-process cache, HTTP on 127.0.0.1:8080.
    Up {
        /// Data directory; default ./maas-data, or $MAAS_DATA.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// HTTP address; default 127.0.0.1:8080.
        #[arg(long, value_name = "IP:PORT")]
        listen: Option<String>,
    },
    /// Run and manage nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Check configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Inspect the cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Inspect the cluster's GPUs.
    Gpu {
        #[command(subcommand)]
        command: GpuCommand,
    },
    /// The model repository: import models as immutable versions, list them.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Deploy a model: replicas placed by GPU memory across the cluster. The memory is
    /// estimated from the model's files and shown first.
    Deploy(client::DeployArgs),
    /// List, scale and delete deployments.
    Deployment {
        #[command(subcommand)]
        command: DeploymentCommand,
    },
    /// Accounts: make one (the first administrator, on a node where sign-up is closed),
    /// read the outbox of codes no mail server sent.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// API keys, as OpenAI clients use them: create (shown once), list, revoke.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Tools for development: tiny random-weight models in the real formats.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Print the OpenAPI 3.1 document of the node's HTTP API (as served at /openapi.json);
    /// the web console's API types are generated from it.
    Openapi,
    /// Measure parts of maas on this machine.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum GpuCommand {
    /// Every GPU in the cluster with its model and total, reserved and free memory.
    List {
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Upload a model folder, .gguf file or an archive of either (with a progress bar) and
    /// register it as a new version; its files are checked as a model first, and against
    /// the catalogue when NAME is a catalogue name.
    Import(client::ImportArgs),
    /// The built-in catalogue of well-known models: name, family, parameters, context,
    /// tasks, whether this build serves it, and the Hugging Face repository of its files.
    Catalog {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every model version in the repository with its metadata.
    List {
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Debug, Subcommand)]
enum DeploymentCommand {
    /// Every deployment with its ready count, replicas, and why any are not placed.
    List {
        #[command(flatten)]
        target: client::Target,
    },
    /// A deployment's log from every node: where its replicas started, how they loaded or
    /// why they failed, restarts and stops.
    Logs {
        name: String,
        /// The most lines (1 to 500), newest kept.
        #[arg(long, default_value_t = 200)]
        limit: u32,
        /// The lowest level shown: info, warn or error.
        #[arg(long, default_value = "info", value_parser = ["info", "warn", "error"])]
        level: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Set a deployment's replica count.
    Scale {
        name: String,
        #[arg(long)]
        replicas: u32,
        #[command(flatten)]
        cookie: client::Cookie,
        #[command(flatten)]
        target: client::Target,
    },
    /// Delete a deployment; its replicas stop.
    Delete {
        name: String,
        #[command(flatten)]
        cookie: client::Cookie,
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Make an active account with a role (admin by default), no verification needed.
    Create(client::AdminCreateArgs),
    /// Messages to users (verification and reset codes) that were not sent by mail or
    /// SMS, newest first.
    Outbox {
        /// Only messages to this email address or phone number.
        #[arg(long)]
        recipient: Option<String>,
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a key; it is printed once.
    Create(client::KeyCreateArgs),
    /// The keys, with their prefixes, scopes and status (never the secrets).
    List {
        #[command(flatten)]
        target: client::Target,
    },
    /// Revoke a key: it stops working at once.
    Revoke {
        id: String,
        #[command(flatten)]
        cookie: client::Cookie,
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Write a tiny random-weight model (config.json, model.safetensors, tokenizer.json)
    /// into OUT. Its output is noise: it exists to exercise the real loaders.
    TinyModel {
        /// llama, qwen2 or bert (a Hugging Face folder), or llama-gguf (one Q8_0 .gguf file in OUT).
        #[arg(long, default_value = "llama", value_parser = ["llama", "qwen2", "bert", "llama-gguf"])]
        arch: String,
        /// The seed of the weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// A 3-node raft cluster with fsync: proposals/s with 1 and 64 proposers, commit
    /// latency p50/p99, and leader failover time.
    Raft(bench::RaftBench),
    /// The leader's reconcile path end to end: register nodes with simulated GPUs, plan
    /// every replica of many deployments in one round, commit the placements through a
    /// 3-node raft cluster; placements/s for each.
    Placements(bench::PlacementsBench),
    /// The gateway's overhead on a 1-token completion at several concurrencies, and how
    /// many SSE streams one node holds at once.
    Gateway(bench_gateway::GatewayBench),
    /// What authenticating an API key and checking its quotas add to a request, with the
    /// limiter in this process or in Redis.
    Auth(bench_auth::AuthBench),
    /// The embedded vector store's HNSW index at 100,000 clustered 384-dimensional
    /// vectors: build time, recall@10 against exact search, query latency; and Milvus's
    /// with `--milvus URL`.
    Ann(bench_ann::AnnBench),
    /// Knowledge-base retrieval through a running node's API on the committed corpora:
    /// recall@1/5/10 and MRR of vector, BM25 and hybrid search, retrieval latency, and
    /// ingestion throughput against the embedding model's raw throughput.
    Retrieval(bench_retrieval::RetrievalBench),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// The leader, term, commit index and every member with its health and lag.
    Status {
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Start a node from a configuration file (see cluster.toml for every key).
    Start {
        /// The node's configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Join the cluster of the running member at this API address (when this node's
        /// raft log is empty); repeat to give several.
        #[arg(long, value_name = "URL")]
        join: Vec<String>,
    },
    /// Remove a node from the cluster (it stops being a voter and its record goes).
    Remove {
        /// The id of the node to remove.
        id: u64,
        /// The cluster cookie (cluster.cookie).
        #[arg(long, env = "MAAS_CLUSTER__COOKIE", hide_env_values = true)]
        cookie: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Every registered node with its status, resources and GPUs.
    List {
        #[command(flatten)]
        target: client::Target,
    },
    /// Drain a node: it takes no new replicas and its replicas move to other nodes
    /// (each replacement is Ready before the original stops, where room exists).
    Drain {
        id: u64,
        /// End the drain: the node takes work again.
        #[arg(long)]
        undo: bool,
        #[command(flatten)]
        cookie: client::Cookie,
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate FILE (with environment overrides) and print the effective configuration.
    Check {
        /// The configuration file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    pin_compute_threads();
    // Two rustls crypto providers are linked (ring, and aws-lc-rs through ractor_cluster):
    // choose one for the process, or building a TLS client config panics.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();

    match cli.command {
        Command::Config { command: ConfigCommand::Check { ref file } } => match Config::load(file) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(err) => config_error(&err),
        },
        Command::Up { ref data, ref listen } => {
            let mut env: Vec<(String, String)> = std::env::vars().collect();
            if let Some(data) = data {
                env.push((config::DATA_DIR_ENV.into(), data.display().to_string()));
            }
            if let Some(listen) = listen {
                env.push(("MAAS_LISTEN__API".into(), listen.clone()));
            }
            match Config::from_toml("", &config::Source::Defaults, env) {
                Ok(config) => start(&cli, config, true),
                Err(err) => config_error(&err),
            }
        }
        Command::Node { command: NodeCommand::Start { ref config, ref join } } => match Config::load(config) {
            Ok(mut config) => {
                config.cluster.join.extend(join.iter().cloned());
                match config.validate() {
                    Ok(()) => start(&cli, config, false),
                    Err(err) => config_error(&err),
                }
            }
            Err(err) => config_error(&err),
        },
        Command::Node { command: NodeCommand::Remove { id, ref cookie, ref target } } => {
            client::run(client::node_remove(target, id, cookie))
        }

        Command::Node { command: NodeCommand::List { ref target } } => client::run(client::node_list(target)),
        Command::Node { command: NodeCommand::Drain { id, undo, ref cookie, ref target } } => {
            client::run(client::node_drain(target, &cookie.cookie, id, undo))
        }
        Command::Deploy(ref args) => client::run(client::deploy(args)),
        Command::Model { command: ModelCommand::Import(ref args) } => client::run(client::model_import(args)),
        Command::Model { command: ModelCommand::List { ref target } } => client::run(client::model_list(target)),
        Command::Model { command: ModelCommand::Catalog { json } } => {
            client::run(async move { Ok(client::model_catalog(json)) })
        }
        Command::Deployment { command: DeploymentCommand::List { ref target } } => {
            client::run(client::deployment_list(target))
        }
        Command::Deployment { command: DeploymentCommand::Logs { ref name, limit, ref level, ref target } } => {
            client::run(client::deployment_logs(target, name, limit, level))
        }
        Command::Deployment { command: DeploymentCommand::Scale { ref name, replicas, ref cookie, ref target } } => {
            client::run(client::deployment_scale(target, &cookie.cookie, name, replicas))
        }
        Command::Deployment { command: DeploymentCommand::Delete { ref name, ref cookie, ref target } } => {
            client::run(client::deployment_delete(target, &cookie.cookie, name))
        }
        Command::Admin { command: AdminCommand::Create(ref args) } => client::run(client::admin_create(args)),
        Command::Admin { command: AdminCommand::Outbox { ref recipient, ref target } } => {
            client::run(client::admin_outbox(target, recipient.as_deref()))
        }
        Command::Key { command: KeyCommand::Create(ref args) } => client::run(client::key_create(args)),
        Command::Key { command: KeyCommand::List { ref target } } => client::run(client::key_list(target)),
        Command::Key { command: KeyCommand::Revoke { ref id, ref cookie, ref target } } => {
            client::run(client::key_revoke(target, &cookie.cookie, id))
        }
        Command::Dev { command: DevCommand::TinyModel { ref arch, seed, ref out } } => dev_tiny_model(arch, seed, out),
        Command::Openapi => {
            println!("{}", maas_gateway::routes::openapi::document());
            ExitCode::SUCCESS
        }
        Command::Gpu { command: GpuCommand::List { ref target } } => client::run(client::gpu_list(target)),
        Command::Bench { ref command } => run_bench(command),
        Command::Cluster { command: ClusterCommand::Status { ref target } } => {
            client::run(client::cluster_status(target))
        }
    }
}

/// Tells candle's CPU kernels how many threads to use. Without `RAYON_NUM_THREADS` candle
/// counts the cores again on every matrix multiplication (it reads /proc/cpuinfo), which
/// costs single-stream decoding about 15% (BENCHMARKS.md, inference engine).
#[allow(unsafe_code)]
fn pin_compute_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        // SAFETY: this runs first in `main`, before any other thread exists, so nothing
        // reads or writes the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cores.to_string()) };
    }
}

/// `maas dev tiny-model`: a tiny random-weight model of `arch` in `out`.
fn dev_tiny_model(arch: &str, seed: u64, out: &std::path::Path) -> ExitCode {
    let shape = maas_engine::tiny::TinyShape::default();
    let written = match arch {
        "qwen2" => maas_engine::tiny::write_qwen2(out, shape, seed),
        "bert" => maas_engine::tiny::write_bert(out, maas_engine::tiny::TinyBertShape::default(), seed),
        "llama-gguf" => std::fs::create_dir_all(out)
            .and_then(|()| {
                maas_engine::tiny::write_gguf_llama(
                    &out.join("tiny-llama-q8_0.gguf"),
                    shape,
                    seed,
                    maas_engine::tiny::GgufWeights::Q8_0,
                )
            })
            .map(|()| vec!["tiny-llama-q8_0.gguf".to_owned()]),
        _ => maas_engine::tiny::write_llama(out, shape, seed),
    };
    match written {
        Ok(files) => {
            println!("a tiny random-weight {arch} model (not a real model) in {}: {}", out.display(), files.join(", "));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: cannot write the model into {}: {err}", out.display());
            ExitCode::FAILURE
        }
    }
}

fn config_error(err: &config::ConfigError) -> ExitCode {
    eprintln!("error: invalid configuration: {err}");
    ExitCode::from(2)
}

/// Runs a node; `quick_start` (`maas up`) also imports and deploys a tiny model when the
/// node has none, so a chat request is answered at once.
fn start(cli: &Cli, mut config: Config, quick_start: bool) -> ExitCode {
    if let Some(format) = cli.log_format {
        config.log.format = format;
    }
    if let Some(level) = &cli.log_level {
        config.log.level.clone_from(level);
        if let Err(err) = config.validate() {
            return config_error(&err);
        }
    }
    logging::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run_node(config, quick_start)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "node failed");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a benchmark on a multi-threaded runtime and prints its report.
fn run_bench(command: &BenchCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let report = match command {
        BenchCommand::Raft(args) => runtime.block_on(bench::raft(args)),
        BenchCommand::Placements(args) => runtime.block_on(bench::placements(args)),
        BenchCommand::Gateway(args) => runtime.block_on(bench_gateway::gateway(args)),
        BenchCommand::Auth(args) => runtime.block_on(bench_auth::auth(args)),
        BenchCommand::Ann(args) => runtime.block_on(bench_ann::ann(args)),
        BenchCommand::Retrieval(args) => runtime.block_on(bench_retrieval::retrieval(args)),
    };
    match report {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
