//! The serving engine: a loaded model, a bounded queue of requests and one batching loop
//! on its own OS thread (never on the async runtime).
//!
//! Each turn of the loop: admit waiting requests while the batch has room; drop
//! sequences whose receiver is gone (cancelled); prefill admitted prompts up to a token
//! budget (long prompts in chunks, so running sequences keep decoding between chunks);
//! then one decode step for every sequence past its prefill, all of them through the
//! projections as one `[B, hidden]` matrix. Finished sequences leave the batch.
//!
//! Events go out through a `tokio::sync::mpsc` channel with room for every event a
//! request can produce, so the loop never waits on a slow reader.
//!
//! **Deployment:** set `RAYON_NUM_THREADS` to the number of cores in the serving process's
//! environment. candle 0.11 otherwise re-reads `/proc/cpuinfo` on every matmul, which costs
//! about 10% of single-stream decode and a quarter of batched decode (BENCHMARKS.md).

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc;

use crate::chat::ChatMessage;
use crate::error::{EngineError, Result};
use crate::model::{CausalLm, KvCache};
use crate::sampling::{SamplingParams, TokenHistory, sample};
use crate::stream::{CompiledFilter, Detokenizer, OutputFilter};
use crate::tokenizer::ModelTokenizer;

/// The most top alternatives a request may ask for per token.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Tokens per second are averaged over this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How long a dropped engine's loop goes on finishing the requests it holds; what is
/// unfinished then ends `Cancelled`.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch at most; more are refused (QueueFull).
    pub max_queue: usize,
    /// Caps the model's context length (prompt and output tokens of one sequence).
    pub max_context_tokens: Option<usize>,
    /// KV-cache positions the running sequences may hold together: the memory a replica's
    /// placement reserved (a deployment's `context_tokens x concurrent_sequences`). A
    /// request joins the batch when its prompt and `max_tokens` fit beside the others'
    /// (one alone always does: the context is capped to this); until then it waits in the
    /// queue. None: only `max_batch` bounds the batch.
    pub max_kv_tokens: Option<usize>,
    /// Prompt tokens prefilled per turn of the loop, across sequences; a longer prompt is
    /// prefilled in chunks with decode steps between them.
    pub prefill_chunk_tokens: usize,
    /// Runs on this CUDA device (needs the `cuda` feature); None is the CPU.
    pub cuda_device: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 16,
            max_queue: 64,
            max_context_tokens: None,
            max_kv_tokens: None,
            prefill_chunk_tokens: 512,
            cuda_device: None,
        }
    }
}

/// One completion to generate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenerationRequest {
    pub prompt: String,
    /// Generated tokens at most (the end-of-sequence token included).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Text that ends the output; it is not part of the output.
    pub stop: Vec<String>,
    /// Asks for each token's log-probability and this many top alternatives (at most
    /// [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Lets the tokenizer add its special tokens (a BOS). A rendered chat template already
    /// holds them: submit it with false.
    pub add_special_tokens: bool,
    /// Keeps generating past end-of-sequence tokens (benchmarks, tests).
    pub ignore_eos: bool,
    /// Text the output must not contain: generation ends before it with
    /// [`FinishReason::ContentFilter`].
    pub filter: OutputFilter,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        GenerationRequest {
            prompt: String::new(),
            max_tokens: 16,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            logprobs: None,
            add_special_tokens: true,
            ignore_eos: false,
            filter: OutputFilter::default(),
        }
    }
}

/// An alternative token and its log-probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TopLogprob {
    pub token_id: u32,
    /// The token's own text (lossy where it is part of a character).
    pub token: String,
    pub logprob: f32,
}

/// The log-probability of a generated token under the model (before penalties and
/// temperature), and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// max_tokens, or the context is full.
    Length,
    /// The engine stopped before the sequence finished.
    Cancelled,
    /// The output filter matched; the output ends before the match.
    ContentFilter,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// A generated token and the text it settles (possibly empty: text that could begin a
    /// stop sequence or ends inside a character waits for later tokens).
    Token {
        text: String,
        token_id: u32,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    pub queue_depth: usize,
    pub active_sequences: usize,
    pub tokens_generated_total: u64,
    pub prompt_tokens_total: u64,
    pub requests_finished_total: u64,
    pub requests_cancelled_total: u64,
    /// Generated tokens per second over the last 10 s.
    pub tokens_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    /// `safetensors` or `gguf`.
    pub format: String,
    pub parameters: u64,
    /// The stored weights' type (`f32`, `bf16`, `q8_0`, ...); computation is in f32.
    pub dtype: String,
    /// The GGUF quantisation of most matrices, if any.
    pub quantization: Option<String>,
    /// The context this engine serves (the model's, capped by the options).
    pub context_length: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    /// Bytes of weights one decode step reads (every matrix, the LM head included): memory
    /// bandwidth divided by this bounds single-stream decoding.
    pub decode_bytes_per_token: u64,
    /// Random weights written by [`crate::tiny`] (`maas_tiny_random`): not a real model.
    pub tiny_random: bool,
}

struct Pending {
    prompt: Vec<u32>,
    request: GenerationRequest,
    filter: Option<CompiledFilter>,
    events: mpsc::Sender<GenerationEvent>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Pending>,
    shutdown: bool,
    /// Why the batching loop died (it panicked), when it did: the engine serves nothing more.
    failure: Option<String>,
    /// A test's request that the batching loop panic at its next turn (only ever set with
    /// the `fail-points` feature).
    panic_next_turn: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    active: AtomicUsize,
    tokens_total: AtomicU64,
    prompt_tokens_total: AtomicU64,
    finished_total: AtomicU64,
    cancelled_total: AtomicU64,
    recent: Mutex<VecDeque<(Instant, usize)>>,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The batching loop died: refuse new requests and fail the waiting ones.
    fn fail_all(&self, reason: &str) {
        let mut queue = self.queue();
        queue.shutdown = true;
        queue.failure = Some(reason.to_owned());
        let waiting: Vec<Pending> = queue.waiting.drain(..).collect();
        drop(queue);
        for pending in waiting {
            let _ = pending.events.try_send(GenerationEvent::Failed(format!("the engine stopped: {reason}")));
        }
        self.active.store(0, Ordering::Relaxed);
    }

    fn record_tokens(&self, count: usize) {
        self.tokens_total.fetch_add(count as u64, Ordering::Relaxed);
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        recent.push_back((now, count));
        while recent.front().is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW) {
            recent.pop_front();
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let in_window: Vec<&(Instant, usize)> =
            recent.iter().filter(|(at, _)| now.duration_since(*at) <= RATE_WINDOW).collect();
        let Some(first) = in_window.first() else { return 0.0 };
        let tokens: usize = in_window.iter().map(|(_, count)| count).sum();
        let span = now.duration_since(first.0).as_secs_f64().max(1.0);
        tokens as f64 / span
    }
}

/// A loaded model serving generation requests. `Send + Sync`; share it through an `Arc`.
/// Dropping it (a replica stopped by a rolling update or a scale-down) drains: the
/// batching loop finishes the requests it holds whose receivers are still there, for at
/// most [`DRAIN_LIMIT`] (then they end `Cancelled`), and its thread frees the model when
/// it ends.
pub struct Engine {
    shared: Arc<Shared>,
    tokenizer: Arc<ModelTokenizer>,
    info: ModelInfo,
    options: EngineOptions,
    vocab: usize,
    seeds: std::collections::hash_map::RandomState,
    seed_counter: AtomicU64,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).field("options", &self.options).finish_non_exhaustive()
    }
}

/// The device the options ask for.
fn device(options: &EngineOptions) -> Result<Device> {
    match options.cuda_device {
        None => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        Some(ordinal) => Ok(Device::new_cuda(ordinal)?),
        #[cfg(not(feature = "cuda"))]
        Some(_) => Err(EngineError::BadRequest(
            "this build has no CUDA support: rebuild maas-engine with the cuda feature or run on the CPU".into(),
        )),
    }
}

impl Engine {
    /// Loads a model (a Hugging Face folder or a `.gguf` file) and starts its batching
    /// thread.
    pub fn load(path: &Path, options: EngineOptions) -> Result<Engine> {
        if options.max_batch == 0 {
            return Err(EngineError::BadRequest("max_batch must be at least 1".into()));
        }
        let device = device(&options)?;
        let model = CausalLm::load(path, &device)?;
        let tokenizer = Arc::new(ModelTokenizer::load(path)?);
        let config = model.config();
        let context_length = [options.max_context_tokens, options.max_kv_tokens]
            .into_iter()
            .flatten()
            .fold(config.context_length, usize::min);
        if context_length < 2 {
            return Err(EngineError::BadRequest("max_context_tokens and max_kv_tokens must be at least 2".into()));
        }
        let summary = model.summary();
        let info = ModelInfo {
            architecture: config.architecture.name().to_owned(),
            format: summary.format.to_owned(),
            parameters: config.parameters(),
            dtype: summary.stored_dtype.clone(),
            quantization: summary.quantization.clone(),
            context_length,
            vocab_size: config.vocab,
            hidden_size: config.hidden,
            layers: config.layers,
            decode_bytes_per_token: model.weight_bytes_per_token() as u64,
            tiny_random: config.tiny_random,
        };
        let vocab = config.vocab;
        let shared = Arc::new(Shared::default());
        let worker = {
            let shared = Arc::clone(&shared);
            let tokenizer = Arc::clone(&tokenizer);
            let options = options.clone();
            std::thread::Builder::new()
                .name("maas-engine".into())
                .spawn(move || {
                    let batcher = Batcher {
                        model,
                        tokenizer,
                        shared: Arc::clone(&shared),
                        options,
                        context_length,
                        running: Vec::new(),
                    };
                    // A panic in the loop (a bug, or a device error candle panics on) must
                    // not leave an engine that queues requests nobody serves: the running
                    // sequences' channels close as the batch unwinds, waiting requests fail,
                    // new ones are refused, and `failure` tells the replica to restart.
                    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || batcher.run()))
                    {
                        let reason = panic_message(payload.as_ref());
                        tracing::error!(%reason, "the engine thread panicked");
                        shared.fail_all(&reason);
                    }
                })
                .map_err(|e| EngineError::load(path, format!("cannot start the engine thread: {e}")))?
        };
        Ok(Engine {
            shared,
            tokenizer,
            info,
            options,
            vocab,
            seeds: std::collections::hash_map::RandomState::new(),
            seed_counter: AtomicU64::new(0),
            worker: Some(worker),
        })
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request. Never blocks on the batch: a full queue is refused.
    pub fn submit(&self, request: GenerationRequest) -> Result<mpsc::Receiver<GenerationEvent>> {
        if request.max_tokens == 0 {
            return Err(EngineError::BadRequest("max_tokens must be at least 1".into()));
        }
        if let Some(count) = request.logprobs
            && count > MAX_TOP_LOGPROBS
        {
            return Err(EngineError::BadRequest(format!("logprobs must be at most {MAX_TOP_LOGPROBS}, got {count}")));
        }
        request.sampling.validate().map_err(EngineError::BadRequest)?;
        let filter = if request.filter.is_empty() {
            None
        } else {
            Some(CompiledFilter::new(&request.filter).map_err(EngineError::BadRequest)?)
        };
        let prompt = self.tokenizer.encode(&request.prompt, request.add_special_tokens)?;
        if prompt.is_empty() {
            return Err(EngineError::BadRequest("the prompt is empty".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(EngineError::BadRequest(format!(
                "the tokenizer gave token {bad}, outside the model's vocabulary of {}",
                self.vocab
            )));
        }
        let context_length = self.info.context_length;
        if prompt.len() >= context_length {
            return Err(EngineError::PromptTooLong { prompt_tokens: prompt.len(), context_length });
        }
        let mut request = request;
        if request.sampling.seed.is_none() {
            let counter = self.seed_counter.fetch_add(1, Ordering::Relaxed);
            request.sampling.seed = Some(self.seeds.hash_one(counter));
        }
        // Room for every event: one per token and the last one.
        let capacity = request.max_tokens.min(context_length) + 2;
        let (sender, receiver) = mpsc::channel(capacity);
        let mut queue = self.shared.queue();
        if let Some(reason) = &queue.failure {
            return Err(EngineError::Failed(reason.clone()));
        }
        if queue.shutdown {
            return Err(EngineError::Stopped);
        }
        if queue.waiting.len() >= self.options.max_queue {
            return Err(EngineError::QueueFull { max_queue: self.options.max_queue });
        }
        queue.waiting.push_back(Pending { prompt, request, filter, events: sender });
        drop(queue);
        self.shared.wake.notify_one();
        Ok(receiver)
    }

    /// Renders a conversation with the model's chat template (or `role: content` lines).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.tokenizer.render_chat(messages, add_generation_prompt)
    }

    /// Tokens of `text` without special tokens added.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.tokenizer.encode(text, false)?.len())
    }

    /// The context this engine serves: prompt and output tokens of one sequence.
    pub fn context_length(&self) -> usize {
        self.info.context_length
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            queue_depth: self.shared.queue().waiting.len(),
            active_sequences: self.shared.active.load(Ordering::Relaxed),
            tokens_generated_total: self.shared.tokens_total.load(Ordering::Relaxed),
            prompt_tokens_total: self.shared.prompt_tokens_total.load(Ordering::Relaxed),
            requests_finished_total: self.shared.finished_total.load(Ordering::Relaxed),
            requests_cancelled_total: self.shared.cancelled_total.load(Ordering::Relaxed),
            tokens_per_second: self.shared.tokens_per_second(),
        }
    }

    pub fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    /// Why the batching loop died, if it did (it panicked). Such an engine refuses every
    /// request: whoever owns it should replace it.
    pub fn failure(&self) -> Option<String> {
        self.shared.queue().failure.clone()
    }

    /// Makes the batching loop panic at its next turn, as a bug would (tests of what
    /// notices a dead engine).
    #[cfg(feature = "fail-points")]
    pub fn fail_point_panic(&self) {
        self.shared.queue().panic_next_turn = true;
        self.shared.wake.notify_all();
    }

    pub fn tokenizer(&self) -> &ModelTokenizer {
        &self.tokenizer
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let idle = {
            let mut queue = self.shared.queue();
            queue.shutdown = true;
            queue.waiting.is_empty() && self.shared.active.load(Ordering::Relaxed) == 0
        };
        self.shared.wake.notify_all();
        // An idle loop ends at once: wait for it, so the model is freed when this returns.
        // A busy one drains on its own thread; nothing here waits on generation.
        if let Some(worker) = self.worker.take()
            && idle
            && worker.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

/// What a token's event carries besides its text.
type TokenItem = (u32, Option<TokenLogprob>);

struct Sequence {
    events: mpsc::Sender<GenerationEvent>,
    prompt: Vec<u32>,
    prefilled: usize,
    cache: KvCache,
    sampling: SamplingParams,
    rng: StdRng,
    history: TokenHistory,
    detokenizer: Detokenizer<TokenItem>,
    max_tokens: usize,
    logprobs: Option<usize>,
    ignore_eos: bool,
    generated: usize,
    /// The sampled token not yet run through the model.
    next_token: Option<u32>,
    finished: bool,
    /// KV-cache positions reserved for it: its prompt and `max_tokens`.
    kv_tokens: usize,
}

impl Sequence {
    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

struct Batcher {
    model: CausalLm,
    tokenizer: Arc<ModelTokenizer>,
    shared: Arc<Shared>,
    options: EngineOptions,
    context_length: usize,
    running: Vec<Sequence>,
}

impl Batcher {
    fn run(mut self) {
        let mut draining_since = None;
        loop {
            if !self.admit(&mut draining_since) {
                break;
            }
            self.drop_cancelled();
            self.prefill();
            self.decode_step();
            self.remove_finished();
        }
        // Shutting down: whoever still waits learns that their request ended.
        let waiting: Vec<Pending> = self.shared.queue().waiting.drain(..).collect();
        for pending in waiting {
            let _ = pending.events.try_send(GenerationEvent::Done {
                finish_reason: FinishReason::Cancelled,
                prompt_tokens: pending.prompt.len(),
                completion_tokens: 0,
            });
        }
        for sequence in self.running.drain(..) {
            let _ = sequence.events.try_send(GenerationEvent::Done {
                finish_reason: FinishReason::Cancelled,
                prompt_tokens: sequence.prompt.len(),
                completion_tokens: sequence.generated,
            });
        }
        self.shared.active.store(0, Ordering::Relaxed);
    }

    /// Waits for work, then moves waiting requests into the batch while it has room.
    /// Returns false when the loop should end: shut down with nothing left to finish, or
    /// draining for longer than [`DRAIN_LIMIT`].
    fn admit(&mut self, draining_since: &mut Option<Instant>) -> bool {
        let mut queue = self.shared.queue();
        while self.running.is_empty() && queue.waiting.is_empty() && !queue.shutdown && !queue.panic_next_turn {
            queue = self.shared.wake.wait(queue).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if queue.shutdown {
            queue.waiting.retain(|pending| !pending.events.is_closed());
            let since = *draining_since.get_or_insert_with(Instant::now);
            let done = self.running.iter().all(|sequence| sequence.finished || sequence.cancelled());
            if (done && queue.waiting.is_empty()) || since.elapsed() > DRAIN_LIMIT {
                return false;
            }
        }
        #[cfg(feature = "fail-points")]
        if std::mem::take(&mut queue.panic_next_turn) {
            drop(queue);
            panic!("fail point: the batching loop panics");
        }
        let mut reserved: usize = self.running.iter().filter(|sequence| !sequence.finished).map(|s| s.kv_tokens).sum();
        while self.running.len() < self.options.max_batch {
            let Some(front) = queue.waiting.front() else { break };
            if front.events.is_closed() {
                queue.waiting.pop_front();
                self.shared.cancelled_total.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let kv_tokens = front.prompt.len() + front.request.max_tokens.min(self.context_length - front.prompt.len());
            // In order of arrival: the oldest waits for room rather than be overtaken.
            if let Some(budget) = self.options.max_kv_tokens
                && reserved + kv_tokens > budget
                && !self.running.is_empty()
            {
                break;
            }
            let Some(pending) = queue.waiting.pop_front() else { break };
            reserved += kv_tokens;
            let request = pending.request;
            let max_tokens = kv_tokens - pending.prompt.len();
            self.shared.prompt_tokens_total.fetch_add(pending.prompt.len() as u64, Ordering::Relaxed);
            self.running.push(Sequence {
                events: pending.events,
                history: TokenHistory::new(&pending.prompt),
                prompt: pending.prompt,
                prefilled: 0,
                cache: self.model.new_cache_for(kv_tokens),
                rng: StdRng::seed_from_u64(request.sampling.seed.unwrap_or(0)),
                sampling: request.sampling,
                detokenizer: Detokenizer::filtered(request.stop, pending.filter),
                max_tokens,
                logprobs: request.logprobs,
                ignore_eos: request.ignore_eos,
                generated: 0,
                next_token: None,
                finished: false,
                kv_tokens,
            });
        }
        drop(queue);
        self.shared.active.store(self.running.len(), Ordering::Relaxed);
        true
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len();
        self.running.retain(|sequence| !sequence.cancelled());
        let cancelled = before - self.running.len();
        if cancelled > 0 {
            self.shared.cancelled_total.fetch_add(cancelled as u64, Ordering::Relaxed);
            self.shared.active.store(self.running.len(), Ordering::Relaxed);
        }
    }

    /// Prefills prompts, oldest first, up to the token budget of one turn. A prompt that
    /// completes gets its first token sampled.
    fn prefill(&mut self) {
        let mut budget = self.options.prefill_chunk_tokens.max(1);
        for index in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            let sequence = &mut self.running[index];
            if sequence.finished || sequence.prefilled == sequence.prompt.len() {
                continue;
            }
            let start = sequence.prefilled;
            let count = (sequence.prompt.len() - start).min(budget);
            budget -= count;
            let chunk = &sequence.prompt[start..start + count];
            if start + count < sequence.prompt.len() {
                match self.model.extend(chunk, &mut sequence.cache) {
                    Ok(()) => sequence.prefilled += count,
                    Err(error) => self.fail(index, &error),
                }
                continue;
            }
            let logits = self
                .model
                .forward(chunk, &mut sequence.cache, false)
                .and_then(|logits| Ok(logits.squeeze(0)?.to_vec1::<f32>()?));
            match logits {
                Ok(logits) => {
                    self.running[index].prefilled += count;
                    self.take_token(index, &logits);
                }
                Err(error) => self.fail(index, &error),
            }
        }
    }

    /// One decode step for every sequence with a sampled token to run.
    fn decode_step(&mut self) {
        let mut tokens = Vec::new();
        let mut indices = Vec::new();
        let mut caches = Vec::new();
        for (index, sequence) in self.running.iter_mut().enumerate() {
            if let (false, Some(token)) = (sequence.finished, sequence.next_token) {
                tokens.push(token);
                indices.push(index);
                caches.push(&mut sequence.cache);
            }
        }
        if tokens.is_empty() {
            return;
        }
        let logits = self.model.decode(&tokens, &mut caches).and_then(|logits| Ok(logits.to_vec2::<f32>()?));
        match logits {
            Ok(rows) => {
                for (index, row) in indices.into_iter().zip(rows) {
                    self.take_token(index, &row);
                }
            }
            Err(error) => {
                for index in indices {
                    self.fail(index, &error);
                }
            }
        }
    }

    /// Samples the next token of sequence `index` from its logits and sends what it
    /// settles; finishes the sequence at a stop, its length limit or the context's end.
    fn take_token(&mut self, index: usize, logits: &[f32]) {
        let tokenizer = Arc::clone(&self.tokenizer);
        let decode = |ids: &[u32]| tokenizer.decode(ids);
        let sequence = &mut self.running[index];
        let sampled = sample(logits, &sequence.sampling, &sequence.history, &mut sequence.rng, sequence.logprobs);
        let token = sampled.token_id;
        sequence.history.push_output(token);
        sequence.generated += 1;
        sequence.next_token = Some(token);
        self.shared.record_tokens(1);
        let logprob = sampled.logprob.map(|logprob| TokenLogprob {
            token: tokenizer.decode(&[token]).unwrap_or_default(),
            logprob,
            top: sampled
                .top_logprobs
                .iter()
                .map(|&(token_id, logprob)| TopLogprob {
                    token_id,
                    token: tokenizer.decode(&[token_id]).unwrap_or_default(),
                    logprob,
                })
                .collect(),
        });
        let end_of_sequence = !sequence.ignore_eos && tokenizer.eos_ids().contains(&token);
        let released = if end_of_sequence {
            sequence.detokenizer.finish(decode)
        } else {
            sequence.detokenizer.push(token, (token, logprob), decode)
        };
        let mut released = match released {
            Ok(released) => released,
            Err(error) => return self.fail(index, &error),
        };
        // The cache holds the prompt and every generated token but this one.
        let full = sequence.cache.len() + 1 >= self.context_length;
        let finish = if released.blocked {
            Some(FinishReason::ContentFilter)
        } else if end_of_sequence || released.stopped {
            Some(FinishReason::Stop)
        } else if sequence.generated >= sequence.max_tokens || full {
            match sequence.detokenizer.finish(decode) {
                Ok(rest) => released.events.extend(rest.events),
                Err(error) => return self.fail(index, &error),
            }
            Some(FinishReason::Length)
        } else {
            None
        };
        for ((token_id, logprob), text) in released.events {
            if sequence.events.try_send(GenerationEvent::Token { text, token_id, logprob }).is_err() {
                // The receiver is gone: cancelled, dropped at the next turn.
                return;
            }
        }
        if let Some(finish_reason) = finish {
            sequence.finished = true;
            let done = GenerationEvent::Done {
                finish_reason,
                prompt_tokens: sequence.prompt.len(),
                completion_tokens: sequence.generated,
            };
            let events = sequence.events.clone();
            self.finish_now(index);
            let _ = events.try_send(done);
        }
    }

    fn fail(&mut self, index: usize, error: &EngineError) {
        tracing::warn!(%error, "a sequence failed");
        let sequence = &mut self.running[index];
        sequence.finished = true;
        let events = sequence.events.clone();
        self.finish_now(index);
        let _ = events.try_send(GenerationEvent::Failed(error.to_string()));
    }

    /// Counts a finished sequence out of the batch's statistics before its last event goes
    /// out, so that a reader who saw `Done` sees the batch without it.
    fn finish_now(&self, index: usize) {
        let _ = index;
        let active = self.running.iter().filter(|sequence| !sequence.finished).count();
        self.shared.active.store(active, Ordering::Relaxed);
        self.shared.finished_total.fetch_add(1, Ordering::Relaxed);
    }

    fn remove_finished(&mut self) {
        self.running.retain(|sequence| !sequence.finished);
        self.shared.active.store(self.running.len(), Ordering::Relaxed);
    }
}

/// The text of a panic's payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
