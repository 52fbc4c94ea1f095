//! Decode throughput of the engine on this machine's CPU, against its memory bandwidth.
//!
//! ```sh
//! cargo run --release -p maas-engine --example decode_bench              # a random Qwen2.5-0.5B-shaped model
//! cargo run --release -p maas-engine --example decode_bench -- --model DIR_OR_GGUF
//! cargo run --release -p maas-engine --example decode_bench -- --write-model /tmp/q05   # keep the random model
//! cargo run --release -p maas-engine --example decode_bench -- --gguf q8_0   # the layers as a Q8_0 GGUF
//! cargo run --release -p maas-engine --example decode_bench -- --model /tmp/q05 --ttft-only
//! ```
//!
//! Reports: the memory bandwidth (summing a 1 GiB buffer, one thread and all threads), the
//! rate of an f32 matrix product and the cores' peak FMA rate; single-stream decode
//! tokens/s against the bound that bandwidth sets (bandwidth divided by the weight bytes
//! one decode step reads; the bandwidth read again before each round); the total
//! tokens/s of 16 concurrent streams; the time to the first token of a 512-token prompt
//! beside the time its layer products take at that rate.

// The `maas` binary's allocator, so the figures are the node's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use maas_engine::tiny::{GgufWeights, TinyShape, write_gguf_llama, write_qwen2_with_vocab};
use maas_engine::{Engine, EngineOptions, GenerationEvent, GenerationRequest, SamplingParams};
use tokio::sync::mpsc::Receiver;

const GIB: usize = 1 << 30;

struct Args {
    model: Option<PathBuf>,
    /// Where to write (and keep) the random model; a temporary folder by default.
    write_model: Option<PathBuf>,
    /// Writes the model's layers as a GGUF llama in this type instead (a small vocabulary).
    gguf: Option<GgufWeights>,
    tokens: usize,
    streams: usize,
    prompt_tokens: usize,
    /// Measures only the time to first token (while tuning prefill).
    ttft_only: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        model: None,
        write_model: None,
        gguf: None,
        tokens: 64,
        streams: 16,
        prompt_tokens: 512,
        ttft_only: false,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--model" => args.model = Some(PathBuf::from(value()?)),
            "--write-model" => args.write_model = Some(PathBuf::from(value()?)),
            "--gguf" => {
                args.gguf = Some(match value()?.as_str() {
                    "f32" => GgufWeights::F32,
                    "q8_0" => GgufWeights::Q8_0,
                    "q4_0" => GgufWeights::Q4_0,
                    other => anyhow::bail!("--gguf {other}: use f32, q8_0 or q4_0"),
                });
            }
            "--tokens" => args.tokens = value()?.parse()?,
            "--streams" => args.streams = value()?.parse()?,
            "--prompt-tokens" => args.prompt_tokens = value()?.parse()?,
            "--ttft-only" => args.ttft_only = true,
            other => anyhow::bail!(
                "unknown argument {other}: use --model, --write-model, --gguf, --tokens, --streams, --prompt-tokens, --ttft-only"
            ),
        }
    }
    Ok(args)
}

/// Reads `buffer` once with `threads` threads; returns bytes per second.
#[allow(clippy::cast_precision_loss)]
fn read_bandwidth(buffer: &[f32], threads: usize) -> f64 {
    let chunk = buffer.len().div_ceil(threads);
    let start = Instant::now();
    let total: f32 = std::thread::scope(|scope| {
        let handles: Vec<_> = buffer.chunks(chunk).map(|part| scope.spawn(move || sum(part))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    });
    let elapsed = start.elapsed().as_secs_f64();
    std::hint::black_box(total);
    std::mem::size_of_val(buffer) as f64 / elapsed
}

/// The sum of `values` in the widest vectors the CPU has: compiled for SSE2 only, the
/// loop's adds, not memory, limit two threads on a Zen 5 (39 against 62 GB/s).
fn sum(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn wide(values: &[f32]) -> f32 {
            sum_lanes(values)
        }
        #[target_feature(enable = "avx2")]
        fn half_wide(values: &[f32]) -> f32 {
            sum_lanes(values)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked on the line above).
            #[allow(unsafe_code)]
            return unsafe { wide(values) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked on the line above).
            #[allow(unsafe_code)]
            return unsafe { half_wide(values) };
        }
    }
    sum_lanes(values)
}

/// Sixty-four independent lanes, so the sum vectorises and memory is the limit.
#[inline(always)]
#[allow(clippy::inline_always)]
fn sum_lanes(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 64];
    for block in values.chunks_exact(64) {
        for (lane, value) in lanes.iter_mut().zip(block) {
            *lane += value;
        }
    }
    lanes.iter().sum::<f32>()
}

/// A 1 GiB buffer to read for the bandwidth.
#[allow(clippy::cast_precision_loss)]
fn bandwidth_buffer() -> Vec<f32> {
    (0..GIB / 4).map(|i| (i % 7) as f32).collect()
}

/// Read bandwidth of `threads` threads, bytes per second, best of `tries`.
fn memory_bandwidth(buffer: &[f32], threads: usize, tries: usize) -> f64 {
    (0..tries).map(|_| read_bandwidth(buffer, threads)).fold(0.0, f64::max)
}

/// FLOP/s of an f32 2048 x 2048 matrix product through candle (best of 3): what this
/// machine's cores do at their best, the bound of a prefill.
#[allow(clippy::cast_precision_loss)]
fn product_rate() -> anyhow::Result<f64> {
    const SIDE: usize = 2048;
    let a = candle_core::Tensor::randn(0f32, 1.0, (SIDE, SIDE), &candle_core::Device::Cpu)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (SIDE, SIDE), &candle_core::Device::Cpu)?;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let product = a.matmul(&b)?;
        let seconds = start.elapsed().as_secs_f64();
        drop(product);
        best = best.max(2.0 * (SIDE * SIDE * SIDE) as f64 / seconds);
    }
    Ok(best)
}

/// The cores' peak f32 multiply-add rate, FLOP/s over `threads` threads: ten independent
/// chains of 16-lane fused multiply-adds per thread (AVX-512; None on other CPUs), best
/// of 3. No f32 product on this machine can go faster.
#[allow(clippy::cast_precision_loss)]
fn fma_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        const ITERATIONS: u64 = 100_000_000;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return None;
        }
        let mut best = 0.0f64;
        for _ in 0..3 {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    // SAFETY: the CPU has AVX-512 (checked above).
                    #[allow(unsafe_code)]
                    scope.spawn(|| std::hint::black_box(unsafe { fma_chains(ITERATIONS) }));
                }
            });
            let flop = (threads as u64 * ITERATIONS * 10 * 16 * 2) as f64;
            best = best.max(flop / start.elapsed().as_secs_f64());
        }
        Some(best)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// `iterations` rounds of ten independent 16-lane fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_chains(iterations: u64) -> f32 {
    use std::arch::x86_64::{__m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps, _mm512_set1_ps};
    let x = _mm512_set1_ps(std::hint::black_box(1.000_000_1));
    let y = _mm512_set1_ps(std::hint::black_box(-0.000_000_1));
    let mut chains: [__m512; 10] =
        std::array::from_fn(|index| _mm512_set1_ps(f32::from(u8::try_from(index).unwrap_or(0))));
    for _ in 0..iterations {
        // Separate registers: each chain waits only for itself.
        let [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9] = chains;
        chains = [
            _mm512_fmadd_ps(c0, x, y),
            _mm512_fmadd_ps(c1, x, y),
            _mm512_fmadd_ps(c2, x, y),
            _mm512_fmadd_ps(c3, x, y),
            _mm512_fmadd_ps(c4, x, y),
            _mm512_fmadd_ps(c5, x, y),
            _mm512_fmadd_ps(c6, x, y),
            _mm512_fmadd_ps(c7, x, y),
            _mm512_fmadd_ps(c8, x, y),
            _mm512_fmadd_ps(c9, x, y),
        ];
    }
    _mm512_reduce_add_ps(chains.into_iter().fold(_mm512_set1_ps(0.0), |sum, chain| _mm512_add_ps(sum, chain)))
}

fn request(prompt: &str, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.into(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        add_special_tokens: false,
        ..GenerationRequest::default()
    }
}

/// Waits for the next token; returns false at the end of the stream.
fn next_token(events: &mut Receiver<GenerationEvent>) -> anyhow::Result<bool> {
    match events.blocking_recv() {
        Some(GenerationEvent::Token { .. }) => Ok(true),
        Some(GenerationEvent::Done { .. }) | None => Ok(false),
        Some(GenerationEvent::Failed(reason)) => anyhow::bail!("generation failed: {reason}"),
    }
}

/// Decode tokens/s of one stream: from its first event to its end, counted by the engine
/// (events may come in bursts where text waits to settle).
#[allow(clippy::cast_precision_loss)]
fn single_stream(engine: &Engine, tokens: usize) -> anyhow::Result<f64> {
    let mut events = engine.submit(request("hello world", tokens))?;
    next_token(&mut events)?;
    let start = Instant::now();
    let generated_before = engine.stats().tokens_generated_total;
    while next_token(&mut events)? {}
    let generated = engine.stats().tokens_generated_total - generated_before;
    Ok(generated as f64 / start.elapsed().as_secs_f64())
}

/// Total decode tokens/s of `streams` concurrent streams, once all have started.
#[allow(clippy::cast_precision_loss)]
fn concurrent_streams(engine: &Engine, streams: usize, tokens: usize) -> anyhow::Result<f64> {
    let prompts = ["hello world", "what is the answer", "the tiny model", "why and how", "yes no maybe"];
    let mut receivers = Vec::new();
    for index in 0..streams {
        receivers.push(engine.submit(request(prompts[index % prompts.len()], tokens))?);
    }
    for events in &mut receivers {
        next_token(events)?;
    }
    let start = Instant::now();
    let generated_before = engine.stats().tokens_generated_total;
    // Until the first stream ends, all of them decode together.
    let mut finished = false;
    while !finished {
        for events in &mut receivers {
            if !next_token(events)? {
                finished = true;
                break;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let generated = engine.stats().tokens_generated_total - generated_before;
    for mut events in receivers {
        while next_token(&mut events)? {}
    }
    Ok(generated as f64 / elapsed)
}

/// A prompt of exactly `tokens` tokens.
fn prompt_of(engine: &Engine, tokens: usize) -> anyhow::Result<String> {
    let words = ["hello", "world", "the", "answer", "model", "question", "tiny", "random"];
    let mut prompt = String::new();
    let mut index = 0;
    while engine.count_tokens(&prompt)? < tokens {
        prompt.push_str(words[index % words.len()]);
        prompt.push(' ');
        index += 1;
    }
    while engine.count_tokens(&prompt)? > tokens {
        prompt.pop();
    }
    anyhow::ensure!(engine.count_tokens(&prompt)? == tokens, "cannot build a prompt of exactly {tokens} tokens");
    Ok(prompt)
}

fn time_to_first_token(engine: &Engine, prompt: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut events = engine.submit(request(prompt, 1))?;
    next_token(&mut events)?;
    let elapsed = start.elapsed();
    while next_token(&mut events)? {}
    Ok(elapsed)
}

#[allow(clippy::cast_precision_loss)]
fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!("machine: {threads} threads, load average {}", load_average());
    let buffer = bandwidth_buffer();
    let one_thread = memory_bandwidth(&buffer, 1, 5);
    let all_threads = memory_bandwidth(&buffer, threads, 5);
    println!(
        "memory bandwidth (sum of a 1 GiB f32 buffer, best of 5): {:.1} GB/s on 1 thread, {:.1} GB/s on {threads}",
        one_thread / 1e9,
        all_threads / 1e9
    );

    let rate = product_rate()?;
    let peak = fma_peak(threads);
    println!(
        "f32: {:.0} GFLOP/s in a 2048 x 2048 product through candle (best of 3); the cores' FMA peak {}",
        rate / 1e9,
        peak.map_or_else(|| "unknown (no AVX-512)".to_owned(), |peak| format!("{:.0} GFLOP/s", peak / 1e9))
    );

    let scratch = tempfile::tempdir()?;
    let shape = TinyShape { hidden: 896, layers: 24, heads: 14, kv_heads: 2, intermediate: 4864, context: 4096 };
    let model = if let Some(path) = args.model.clone() {
        path
    } else if let Some(weights) = args.gguf {
        let path = args.write_model.clone().unwrap_or_else(|| scratch.path().join("qwen2.5-0.5b-layers.gguf"));
        if !path.is_file() {
            write_gguf_llama(&path, shape, 1, weights)?;
            println!("wrote the Qwen2.5-0.5B-shaped layers as a {weights:?} GGUF llama (a tiny vocabulary)");
        }
        path
    } else {
        let dir = args.write_model.clone().unwrap_or_else(|| scratch.path().join("qwen2.5-0.5b-shaped"));
        let start = Instant::now();
        if !dir.join("config.json").is_file() {
            write_qwen2_with_vocab(&dir, shape, 151_936, 1)?;
            println!("wrote a random Qwen2.5-0.5B-shaped f32 model in {:.1} s", start.elapsed().as_secs_f64());
        }
        dir
    };
    let start = Instant::now();
    let engine = Engine::load(&model, EngineOptions { max_batch: args.streams.max(1), ..EngineOptions::default() })?;
    let info = engine.info();
    println!(
        "loaded {} ({}, {} parameters, {} weights) in {:.1} s",
        info.architecture,
        info.format,
        info.parameters,
        info.dtype,
        start.elapsed().as_secs_f64()
    );
    let bytes_per_token = info.decode_bytes_per_token as f64;
    let bound = all_threads / bytes_per_token;
    println!("weights read per decode step: {:.2} GB → bandwidth bound {bound:.2} tokens/s", bytes_per_token / 1e9);

    // Warm up: first allocations, page faults of the weights.
    single_stream(&engine, 8)?;
    if !args.ttft_only {
        decode_rounds(&engine, &args, (&buffer, threads, bytes_per_token))?;
    }
    let prompt = prompt_of(&engine, args.prompt_tokens)?;
    // An f32 model's layers are its decode bytes less the LM head; a prefill multiplies
    // every prompt token through them (attention's products come on top).
    let layer_parameters = info.decode_bytes_per_token as f64 / 4.0 - (info.vocab_size * info.hidden_size) as f64;
    let prefill_flop = 2.0 * args.prompt_tokens as f64 * layer_parameters;
    let dense = info.dtype == "f32" && info.quantization.is_none();
    if dense {
        println!(
            "a {}-token prefill: {:.0} GFLOP of layer products: {:.2} s at candle's product rate{}",
            args.prompt_tokens,
            prefill_flop / 1e9,
            prefill_flop / rate,
            peak.map_or_else(String::new, |peak| format!(", {:.2} s at the FMA peak", prefill_flop / peak))
        );
    }
    let mut firsts: Vec<Duration> =
        (0..3).map(|_| time_to_first_token(&engine, &prompt)).collect::<anyhow::Result<_>>()?;
    firsts.sort();
    let median = firsts[1].as_secs_f64();
    println!(
        "time to first token, {}-token prompt: {median:.2} s (median of 3; best {:.2} s){}",
        args.prompt_tokens,
        firsts[0].as_secs_f64(),
        match (dense, peak) {
            (true, Some(peak)) => format!(
                ", {:.0} GFLOP/s ({:.0}% of the FMA peak)",
                prefill_flop / median / 1e9,
                100.0 * prefill_flop / median / peak
            ),
            (true, None) => format!(", {:.0} GFLOP/s", prefill_flop / median / 1e9),
            (false, _) => String::new(),
        }
    );
    println!("load average at the end: {}", load_average());
    Ok(())
}

/// Single-stream and concurrent decode rounds, printed beside the bandwidth bound.
///
/// This VM's bandwidth moves a lot from minute to minute (two threads: 40 to 78 GB/s
/// within the hour on 2026-12-05), so each single-stream round is measured against the
/// bandwidth read just before it, and the rounds' shares of their bounds are reported.
#[allow(clippy::cast_precision_loss)]
fn decode_rounds(
    engine: &Engine,
    args: &Args,
    (buffer, threads, bytes_per_token): (&[f32], usize, f64),
) -> anyhow::Result<()> {
    let mut single = 0.0f64;
    let mut shares = Vec::new();
    for round in 1..=3 {
        let bound = memory_bandwidth(buffer, threads, 2) / bytes_per_token;
        let rate = single_stream(engine, args.tokens)?;
        println!(
            "single stream, round {round}: {rate:.2} tokens/s ({:.1} ms/token) against a bound of {bound:.2} read just before: {:.0}%",
            1000.0 / rate,
            100.0 * rate / bound
        );
        single = single.max(rate);
        shares.push(rate / bound);
    }
    shares.sort_by(f64::total_cmp);
    println!(
        "single stream: {single:.2} tokens/s (best of 3); {:.0}% of the bandwidth bound (median of the rounds' shares)",
        100.0 * shares[1]
    );
    let mut concurrent = 0.0f64;
    for _ in 0..2 {
        concurrent = concurrent.max(concurrent_streams(engine, args.streams, args.tokens)?);
    }
    println!(
        "{} concurrent streams: {concurrent:.2} tokens/s in total ({:.1}x single; best of 2)",
        args.streams,
        concurrent / single
    );
    Ok(())
}

/// The 1-minute load average: other processes' work shows in the figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}
