//! Fine-tuning throughput and memory on this machine's CPU, against the placement estimate.
//!
//! ```sh
//! cargo run --release -p maas-engine --example train_bench                     # Qwen2.5-0.5B-shaped, LoRA and full
//! cargo run --release -p maas-engine --example train_bench -- --model DIR --method lora
//! ```
//!
//! Trains `--steps` steps (after one warm-up step) on batches of `--batch` random sequences
//! of `--tokens` tokens, every token a target, and reports seconds per step, trained tokens
//! per second, the achieved FLOP rate (a step is about 2x (LoRA) or 3x (full) the forward's
//! 2 x parameters x tokens), the process's peak resident memory, and `memory_estimate_mib`, which placement
//! reserves on a GPU. Each method runs in its own process (`--method`), so peaks do not mix.

// The `maas` binary's allocator, so the peaks are the node's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use maas_engine::Device;
use maas_engine::tiny::{TinyShape, write_qwen2_with_vocab};
use maas_engine::train::{Example, Method, TrainSettings, Trainer, memory_estimate_mib};
use rand::{Rng, SeedableRng, rngs::StdRng};

struct Args {
    model: Option<PathBuf>,
    method: Option<String>,
    steps: usize,
    batch: usize,
    tokens: usize,
    vocab: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { model: None, method: None, steps: 3, batch: 4, tokens: 128, vocab: 151_936 };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--model" => args.model = Some(PathBuf::from(value()?)),
            "--method" => args.method = Some(value()?),
            "--steps" => args.steps = value()?.parse()?,
            "--batch" => args.batch = value()?.parse()?,
            "--tokens" => args.tokens = value()?.parse()?,
            "--vocab" => args.vocab = value()?.parse()?,
            other => {
                anyhow::bail!("unknown argument {other}: use --model, --method, --steps, --batch, --tokens, --vocab")
            }
        }
    }
    Ok(args)
}

/// The process's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

#[allow(clippy::cast_precision_loss)]
fn run(model: &std::path::Path, method_name: &str, args: &Args) -> anyhow::Result<()> {
    let method = match method_name {
        "lora" => Method::Lora { rank: 8, alpha: 16.0 },
        "full" => Method::Full,
        other => anyhow::bail!("--method {other}: use lora or full"),
    };
    let settings = TrainSettings { method, learning_rate: 1e-4, seed: 1 };
    let start = Instant::now();
    let mut trainer = Trainer::load(model, settings, &Device::Cpu)?;
    let loaded = start.elapsed().as_secs_f64();
    let config = trainer.config().clone();
    let mut rng = StdRng::seed_from_u64(7);
    let vocab = u32::try_from(config.vocab)?;
    let batch: Vec<Example> = (0..args.batch)
        .map(|_| {
            let tokens: Vec<u32> = (0..args.tokens).map(|_| rng.random_range(3..vocab)).collect();
            Example { targets: vec![true; tokens.len()], tokens }
        })
        .collect();
    trainer.step(&batch)?;
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..args.steps {
        loss = trainer.step(&batch)?.loss;
    }
    let per_step = start.elapsed().as_secs_f64() / args.steps as f64;
    let tokens = (args.batch * args.tokens) as f64;
    // Forward 2 x parameters x tokens; the backward pass as much again for the inputs'
    // gradients, and once more for the weights' when they are trained.
    let passes = if matches!(method, Method::Full) { 6.0 } else { 4.0 };
    let flop = passes * config.parameters() as f64 * tokens;
    let estimate = memory_estimate_mib(&config, matches!(method, Method::Full), args.tokens);
    println!(
        "| {method_name} | {} trained values | {loaded:.1} s | {per_step:.2} s | {:.0} | {:.0} GFLOP/s | {} MiB | {estimate} MiB | {loss:.3} |",
        trainer.trained_parameters(),
        tokens / per_step,
        flop / per_step / 1e9,
        peak_rss_mib(),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let scratch = tempfile::tempdir()?;
    let model = if let Some(path) = &args.model {
        path.clone()
    } else {
        let dir = scratch.path().join("qwen2.5-0.5b");
        let shape = TinyShape { hidden: 896, layers: 24, heads: 14, kv_heads: 2, intermediate: 4864, context: 4096 };
        write_qwen2_with_vocab(&dir, shape, args.vocab, 1)?;
        dir
    };
    if let Some(method) = &args.method {
        return run(&model, method, &args);
    }
    println!("batch {} x {} tokens, {} steps timed after one warm-up", args.batch, args.tokens, args.steps);
    println!("| method | trained | load | per step | tokens/s | compute | peak RSS | estimate | loss |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // Each method in its own process: the peak resident memory is then its own.
    let exe = std::env::current_exe()?;
    for method in ["lora", "full"] {
        let status = std::process::Command::new(&exe)
            .args(["--model", model.to_str().unwrap_or_default(), "--method", method])
            .args(["--steps", &args.steps.to_string(), "--batch", &args.batch.to_string()])
            .args(["--tokens", &args.tokens.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "the {method} run failed");
    }
    Ok(())
}
