//! The engine through its public API: continuous batching gives the same greedy output as
//! one request at a time, late requests join a running batch, dropping a receiver cancels,
//! the queue bound and the context are enforced, seeds repeat, stop sequences cut, streamed
//! text is the decoded output, chat templates render.

use std::path::Path;

use maas_engine::chat::{ChatMessage, ChatTemplate};
use maas_engine::tiny::{GgufWeights, TinyShape, write_gguf_llama, write_llama, write_qwen2};
use maas_engine::{
    Engine, EngineError, EngineOptions, FinishReason, GenerationEvent, GenerationRequest, SamplingParams,
};
use tokio::sync::mpsc::Receiver;

fn shape() -> TinyShape {
    TinyShape { context: 2048, ..TinyShape::default() }
}

fn qwen2(dir: &Path, options: EngineOptions) -> Engine {
    write_qwen2(dir, shape(), 3).unwrap();
    Engine::load(dir, options).unwrap()
}

fn greedy(prompt: &str, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.into(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerationRequest::default()
    }
}

#[derive(Debug, PartialEq)]
struct Output {
    text: String,
    tokens: Vec<u32>,
    finish: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

fn collect(mut events: Receiver<GenerationEvent>) -> Output {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenerationEvent::Token { text: piece, token_id, .. } => {
                text.push_str(&piece);
                tokens.push(token_id);
            }
            GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens } => {
                return Output { text, tokens, finish: finish_reason, prompt_tokens, completion_tokens };
            }
            GenerationEvent::Failed(reason) => panic!("generation failed: {reason}"),
        }
    }
    panic!("the events ended without Done");
}

/// Waits for the first token event.
fn first_token(events: &mut Receiver<GenerationEvent>) -> u32 {
    match events.blocking_recv().expect("events") {
        GenerationEvent::Token { token_id, .. } => token_id,
        other => panic!("expected a token, got {other:?}"),
    }
}

const PROMPTS: [&str; 4] = ["hello world", "what is the answer?", "the tiny model", "où est le café 日本"];

#[test]
fn concurrent_greedy_requests_give_the_same_output_as_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions::default());
    let alone: Vec<Output> = PROMPTS.iter().map(|p| collect(engine.submit(greedy(p, 24)).unwrap())).collect();
    let receivers: Vec<_> = PROMPTS.iter().map(|p| engine.submit(greedy(p, 24)).unwrap()).collect();
    let together: Vec<Output> = receivers.into_iter().map(collect).collect();
    assert_eq!(alone, together);
    for (output, prompt) in alone.iter().zip(PROMPTS) {
        assert_eq!(output.finish, FinishReason::Length);
        assert_eq!((output.completion_tokens, output.tokens.len()), (24, 24));
        assert_eq!(output.prompt_tokens, engine.count_tokens(prompt).unwrap());
        // The streamed text is the decoded output.
        assert_eq!(output.text, engine.tokenizer().decode(&output.tokens).unwrap());
    }
    let stats = engine.stats();
    assert_eq!(stats.tokens_generated_total, 8 * 24);
    assert_eq!(stats.requests_finished_total, 8);
    assert_eq!((stats.active_sequences, stats.queue_depth), (0, 0));
    assert!(stats.tokens_per_second > 0.0);
}

#[test]
fn a_request_submitted_while_others_decode_joins_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions::default());
    let mut long = engine.submit(greedy("hello world", 2000)).unwrap();
    first_token(&mut long);
    let mut late = engine.submit(greedy("the answer", 4)).unwrap();
    first_token(&mut late);
    let rest = collect(late);
    assert_eq!(rest.completion_tokens, 4);
    // The late request finished while the long one still runs: it decoded beside it rather
    // than waiting for its 2,000 tokens. (Counting two active sequences at the late one's
    // first token raced its end: the engine can finish 4 tokens before the count is read.)
    assert_eq!(engine.stats().active_sequences, 1, "the long request still runs");
    assert!(matches!(long.blocking_recv(), Some(GenerationEvent::Token { .. })));
}

#[test]
fn dropping_the_receiver_cancels_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions::default());
    let mut cancelled = engine.submit(greedy("hello world", 2000)).unwrap();
    first_token(&mut cancelled);
    drop(cancelled);
    // A request after it completes only once the batch has moved on a few steps.
    let after = collect(engine.submit(greedy("the answer", 5)).unwrap());
    assert_eq!(after.completion_tokens, 5);
    let stats = engine.stats();
    assert_eq!(stats.requests_cancelled_total, 1);
    assert_eq!(stats.active_sequences, 0);
    assert!(stats.tokens_generated_total < 2000, "the cancelled sequence stopped early: {stats:?}");
}

#[test]
fn the_queue_bound_is_enforced_and_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions { max_batch: 1, max_queue: 1, ..EngineOptions::default() };
    let engine = qwen2(dir.path(), options);
    let mut running = engine.submit(greedy("hello", 2000)).unwrap();
    first_token(&mut running);
    let queued = engine.submit(greedy("world", 3)).unwrap();
    assert_eq!(engine.stats().queue_depth, 1);
    let refused = engine.submit(greedy("again", 3)).unwrap_err();
    assert!(matches!(refused, EngineError::QueueFull { max_queue: 1 }), "{refused}");
    assert!(refused.to_string().contains("retry later"));
    for (request, reason) in [
        (greedy("hi", 0), "max_tokens"),
        (GenerationRequest { logprobs: Some(50), ..greedy("hi", 1) }, "logprobs"),
        (
            GenerationRequest {
                sampling: SamplingParams { top_p: 2.0, ..SamplingParams::default() },
                ..greedy("hi", 1)
            },
            "top_p",
        ),
        (GenerationRequest { add_special_tokens: false, ..greedy("", 1) }, "empty"),
    ] {
        let error = engine.submit(request).unwrap_err();
        assert!(matches!(&error, EngineError::BadRequest(m) if m.contains(reason)), "{error}");
    }
    assert_eq!(engine.stats().queue_depth, 1, "refused requests change nothing");
    // Cancelling the running request lets the queued one in.
    drop(running);
    assert_eq!(collect(queued).completion_tokens, 3);
}

#[test]
fn the_context_bounds_prompts_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions { max_context_tokens: Some(64), ..EngineOptions::default() });
    assert_eq!(engine.context_length(), 64);
    let long_prompt = "hello world ".repeat(40);
    let prompt_tokens = engine.count_tokens(&long_prompt).unwrap();
    let error = engine.submit(greedy(&long_prompt, 1)).unwrap_err();
    assert!(
        matches!(error, EngineError::PromptTooLong { prompt_tokens: p, context_length: 64 } if p == prompt_tokens),
        "{error}"
    );
    assert!(error.to_string().contains("at most 63 tokens"), "{error}");
    let output = collect(engine.submit(greedy("hello", 60)).unwrap());
    assert_eq!((output.finish, output.prompt_tokens, output.completion_tokens), (FinishReason::Length, 1, 60));
    // A request that would run past the context stops where it ends.
    let prompt = "hello world ".repeat(29);
    let prompt_tokens = engine.count_tokens(&prompt).unwrap();
    assert!(prompt_tokens > 44 && prompt_tokens < 63);
    let near_full = collect(engine.submit(greedy(&prompt, 20)).unwrap());
    assert_eq!((near_full.finish, near_full.completion_tokens), (FinishReason::Length, 64 - prompt_tokens));
}

#[test]
fn the_kv_budget_bounds_the_batch_and_caps_the_context() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    // Room for two sequences of a 1-token prompt and 40 output tokens (41 positions
    // each), not three, although the batch could take eight.
    let options = EngineOptions { max_kv_tokens: Some(100), max_batch: 8, ..EngineOptions::default() };
    let engine = Arc::new(qwen2(dir.path(), options));
    assert_eq!(engine.context_length(), 100, "the context is capped so that one sequence alone always fits");
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (engine, watching) = (Arc::clone(&engine), Arc::clone(&watching));
        std::thread::spawn(move || {
            let mut most = 0;
            while watching.load(Ordering::Relaxed) {
                most = most.max(engine.stats().active_sequences);
                std::thread::yield_now();
            }
            most
        })
    };
    let receivers: Vec<_> = (0..6).map(|_| engine.submit(greedy("hello", 40)).unwrap()).collect();
    let outputs: Vec<Output> = receivers.into_iter().map(collect).collect();
    watching.store(false, Ordering::Relaxed);
    let most = watcher.join().unwrap();
    assert!((1..=2).contains(&most), "at most two sequences ran at once, saw {most}");
    assert!(outputs.iter().all(|output| output.completion_tokens == 40 && output.text == outputs[0].text));
    // A request as long as the whole budget still runs (alone).
    let whole = collect(engine.submit(greedy("hello", 99)).unwrap());
    assert_eq!((whole.finish, whole.completion_tokens), (FinishReason::Length, 99));
}

#[test]
fn seeded_sampling_repeats_and_stop_sequences_cut_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions::default());
    let sampled = |seed: u64| GenerationRequest {
        sampling: SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(seed), ..SamplingParams::default() },
        ..greedy("hello world", 40)
    };
    let first = collect(engine.submit(sampled(5)).unwrap());
    let again = collect(engine.submit(sampled(5)).unwrap());
    let other = collect(engine.submit(sampled(6)).unwrap());
    assert_eq!(first.tokens, again.tokens);
    assert_ne!(first.tokens, other.tokens);

    // A stop sequence taken from the middle of the greedy output ends it just before.
    let plain = collect(engine.submit(greedy("the model", 40)).unwrap());
    let chars: Vec<char> = plain.text.chars().collect();
    assert!(chars.len() > 20, "{:?}", plain.text);
    let stop: String = chars[12..15].iter().collect();
    let cut = plain.text.find(&stop).unwrap();
    let stopped =
        collect(engine.submit(GenerationRequest { stop: vec![stop.clone()], ..greedy("the model", 40) }).unwrap());
    assert_eq!(stopped.finish, FinishReason::Stop);
    assert_eq!(stopped.text, plain.text[..cut], "stop {stop:?}");
    assert!(stopped.completion_tokens < 40);
}

#[test]
fn a_gguf_with_rope_scaling_it_cannot_compute_serves_its_original_context() {
    use candle_core::quantized::gguf_file::{self, Value};
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("tiny.gguf");
    write_gguf_llama(&source, shape(), 5, GgufWeights::F32).unwrap();
    // The tiny GGUF again, with more metadata.
    let with = |name: &str, extra: Vec<(&str, Value)>| {
        let mut file = std::fs::File::open(&source).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut metadata: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
        metadata.extend(extra.into_iter().map(|(key, value)| (key.to_owned(), value)));
        let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
            .tensor_infos
            .keys()
            .map(|name| (name.clone(), content.tensor(&mut file, name, &candle_core::Device::Cpu).unwrap()))
            .collect();
        let path = dir.path().join(name);
        let mut out = std::fs::File::create(&path).unwrap();
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(key, value)| (key.as_str(), value)).collect();
        let tensors: Vec<(&str, &candle_core::quantized::QTensor)> =
            tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)).collect();
        gguf_file::write(&mut out, &metadata, &tensors).unwrap();
        path
    };
    let yarn = with(
        "yarn.gguf",
        vec![
            ("llama.rope.scaling.type", Value::String("yarn".into())),
            ("llama.rope.scaling.original_context_length", Value::U32(128)),
        ],
    );
    let engine = Engine::load(&yarn, EngineOptions::default()).unwrap();
    assert_eq!(engine.context_length(), 128, "YaRN is not computed: only the original context is served");
    let unnamed = with("unnamed.gguf", vec![("llama.rope.scaling.type", Value::String("yarn".into()))]);
    let error = Engine::load(&unnamed, EngineOptions::default()).unwrap_err().to_string();
    assert!(error.contains("names no original context length"), "{error}");
    let none = with("none.gguf", vec![("llama.rope.scaling.type", Value::String("none".into()))]);
    assert_eq!(Engine::load(&none, EngineOptions::default()).unwrap().context_length(), 2048);
}

#[test]
fn dropping_the_engine_finishes_the_requests_it_holds() {
    // A replica stopped by a rolling update drains: what is running and what waits in the
    // queue still end normally; an abandoned request does not hold the loop.
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions { max_batch: 1, ..EngineOptions::default() });
    let running = engine.submit(greedy("hello", 50)).unwrap();
    let queued = engine.submit(greedy("hello", 5)).unwrap();
    let abandoned = engine.submit(greedy("hello", 500)).unwrap();
    drop(abandoned);
    drop(engine);
    let (running, queued) = (collect(running), collect(queued));
    assert_eq!((running.finish, running.completion_tokens), (FinishReason::Length, 50));
    assert_eq!((queued.finish, queued.completion_tokens), (FinishReason::Length, 5));
}

#[test]
fn an_end_of_sequence_token_stops_without_being_emitted() {
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions::default());
    let plain = collect(engine.submit(greedy("hello", 12)).unwrap());
    drop(engine);
    // Make the fifth generated token an end of sequence.
    let eos = plain.tokens[4];
    let position = plain.tokens.iter().position(|&t| t == eos).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), format!("{{\"eos_token_id\": [{eos}]}}")).unwrap();
    let engine = Engine::load(dir.path(), EngineOptions::default()).unwrap();
    let request = GenerationRequest { ignore_eos: false, ..greedy("hello", 12) };
    let stopped = collect(engine.submit(request).unwrap());
    assert_eq!(stopped.finish, FinishReason::Stop);
    assert_eq!(stopped.tokens, plain.tokens[..position], "the end token itself is not streamed");
    assert_eq!(stopped.completion_tokens, position + 1, "but it is counted");
}

#[test]
fn logprobs_come_with_each_token() {
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions::default());
    let mut events = engine.submit(GenerationRequest { logprobs: Some(3), ..greedy("hello", 5) }).unwrap();
    let mut seen = 0;
    while let Some(event) = events.blocking_recv() {
        if let GenerationEvent::Token { token_id, logprob, .. } = event {
            let logprob = logprob.expect("asked for logprobs");
            assert_eq!(logprob.top.len(), 3);
            assert_eq!(logprob.top[0].token_id, token_id, "greedy takes the most likely");
            assert!((logprob.top[0].logprob - logprob.logprob).abs() < 1e-6 && logprob.logprob < 0.0);
            assert!(logprob.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
            seen += 1;
        }
    }
    assert_eq!(seen, 5);
}

#[test]
fn gguf_models_serve_through_the_engine_and_report_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf_llama(&path, TinyShape::default(), 4, GgufWeights::Q8_0).unwrap();
    let engine = Engine::load(&path, EngineOptions::default()).unwrap();
    let info = engine.info();
    assert_eq!((info.architecture.as_str(), info.format.as_str()), ("llama", "gguf"));
    assert_eq!(info.quantization.as_deref(), Some("q8_0"));
    assert!(info.tiny_random);
    assert_eq!(info.context_length, 512);
    let output = collect(engine.submit(greedy("hello world", 8)).unwrap());
    assert_eq!((output.prompt_tokens, output.completion_tokens), (3, 8), "<s> hello world");

    write_llama(&dir.path().join("hf"), TinyShape::default(), 4).unwrap();
    let hf = Engine::load(&dir.path().join("hf"), EngineOptions::default()).unwrap();
    let info = hf.info();
    assert_eq!((info.architecture.as_str(), info.dtype.as_str(), info.quantization), ("llama", "f32", None));
    // Embeddings and head, then per layer q and o (64x64), k and v (32x64), the MLP
    // (3 of 64x128) and two norms, then the final norm.
    let per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64;
    assert_eq!(info.parameters, 2 * 64 * info.vocab_size as u64 + 2 * per_layer + 64);
}

#[test]
fn chat_templates_render_like_hugging_face() {
    let dir = tempfile::tempdir().unwrap();
    let engine = qwen2(dir.path(), EngineOptions::default());
    let messages =
        [ChatMessage::new("user", "hello"), ChatMessage::new("assistant", "hi"), ChatMessage::new("user", "why?")];
    assert_eq!(
        engine.render_chat(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n\
         <|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n"
    );
    let prompt = engine.render_chat(&messages[..1], true).unwrap();
    assert_eq!(engine.tokenizer().encode(&prompt, false).unwrap()[0], 3, "<|im_start|> is one special token");

    // Llama 3's template: bos_token, trim, raise_exception, loop controls.
    let llama3 = "{{- bos_token }}\n{%- for message in messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";
    let template = ChatTemplate::new(Some(llama3), Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap();
    assert_eq!(
        template.render(&[ChatMessage::new("user", "  hello  ")], true).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let error = template.render(&[ChatMessage::new("assistant", "first")], false).unwrap_err();
    assert!(matches!(&error, EngineError::BadRequest(m) if m.contains("must alternate")), "{error}");

    // Python string methods (pycompat) and tojson as Python's json.dumps writes it.
    let pythonic = "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m | tojson }}|{{ [1, none, true] | tojson(indent=2) }}{% endfor %}";
    let template = ChatTemplate::new(Some(pythonic), None, None).unwrap();
    assert_eq!(
        template.render(&[ChatMessage::new("user", " <hi> é ")], false).unwrap(),
        "<HI> É|{\"role\": \"user\", \"content\": \" <hi> é \"}|[\n  1,\n  null,\n  true\n]"
    );

    // Without a template: the BOS token (if the model has one), then role: content lines.
    let plain = ChatTemplate::new(None, None, None).unwrap();
    assert_eq!(plain.render(&messages[..2], true).unwrap(), "user: hello\nassistant: hi\nassistant:");
    let plain = ChatTemplate::new(None, Some("<s>"), Some("</s>")).unwrap();
    assert_eq!(plain.render(&messages[..1], true).unwrap(), "<s>user: hello\nassistant:");
    assert!(ChatTemplate::new(Some("{% for %}"), None, None).is_err());
}

#[test]
fn the_engine_is_shareable_and_bad_paths_say_what_is_wrong() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Engine>();
    let dir = tempfile::tempdir().unwrap();
    let error = Engine::load(&dir.path().join("missing"), EngineOptions::default()).unwrap_err().to_string();
    assert!(error.contains("expected a folder"), "{error}");
    let options = EngineOptions { cuda_device: Some(0), ..EngineOptions::default() };
    if !cfg!(feature = "cuda") {
        write_qwen2(dir.path(), TinyShape::default(), 1).unwrap();
        let error = Engine::load(dir.path(), options).unwrap_err().to_string();
        assert!(error.contains("no CUDA support"), "{error}");
    }
}
