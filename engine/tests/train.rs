//! Fine-tuning: the training forward against the serving forward, LoRA and full training
//! lowering the loss, the merged model served with the trained outputs, checkpoints that
//! resume exactly, and training files read in OpenAI's formats.

use std::path::Path;

use candle_core::{Device, Tensor};
use maas_engine::model::CausalLm;
use maas_engine::tiny::{TinyShape, write_llama, write_qwen2};
use maas_engine::tokenizer::ModelTokenizer;
use maas_engine::train::{Example, Method, TrainSettings, Trainer, example_from_json};
use serde_json::json;

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn serving_logits(dir: &Path, tokens: &[u32]) -> Tensor {
    let model = CausalLm::load(dir, &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    model.forward(tokens, &mut cache, true).unwrap()
}

fn lora(rank: usize) -> TrainSettings {
    TrainSettings { method: Method::Lora { rank, alpha: 16.0 }, learning_rate: 1e-2, seed: 7 }
}

fn examples(tokenizer: &ModelTokenizer) -> Vec<Example> {
    let lines = [
        json!({"messages": [
            {"role": "user", "content": "what is maas"},
            {"role": "assistant", "content": "maas is the answer"}
        ]}),
        json!({"messages": [
            {"role": "system", "content": "you answer yes"},
            {"role": "user", "content": "is it a tiny model"},
            {"role": "assistant", "content": "yes it is a tiny random model"}
        ]}),
        json!({"prompt": "hello", "completion": " world of the model"}),
    ];
    lines.iter().map(|line| example_from_json(tokenizer, line, 256).unwrap()).collect()
}

#[test]
fn the_training_forward_equals_the_serving_forward() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = vec![1, 17, 33, 40, 5, 9, 60, 61, 62, 3];
    for (name, write) in [("llama", write_llama as fn(&Path, TinyShape, u64) -> _), ("qwen2", write_qwen2)] {
        let model_dir = dir.path().join(name);
        write(&model_dir, TinyShape::default(), 11).unwrap();
        let trainer = Trainer::load(&model_dir, lora(4), &Device::Cpu).unwrap();
        let difference = max_difference(&trainer.logits(&tokens).unwrap(), &serving_logits(&model_dir, &tokens));
        assert!(difference < 1e-4, "{name}: training and serving logits differ by {difference}");
    }
}

#[test]
fn lora_lowers_the_loss_and_the_merged_model_serves_what_was_learned() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_llama(&base, TinyShape::default(), 3).unwrap();
    let tokenizer = ModelTokenizer::load(&base).unwrap();
    let data = examples(&tokenizer);
    let mut trainer = Trainer::load(&base, lora(8), &Device::Cpu).unwrap();
    let first = trainer.evaluate(&data).unwrap().unwrap();
    let mut losses = Vec::new();
    for _ in 0..40 {
        losses.push(trainer.step(&data).unwrap().loss);
    }
    let last = trainer.evaluate(&data).unwrap().unwrap();
    assert_eq!(trainer.steps(), 40);
    assert!((losses[0] - first).abs() < 1e-4, "the first step's loss {} is the base's {first}", losses[0]);
    // The tiny model's random, frozen LM head bounds how sharp its predictions can get; the
    // adapters still take more than a quarter off the loss.
    assert!(last < first * 0.75, "the loss went from {first} to {last} only: {losses:?}");

    let tuned = dir.path().join("tuned");
    let files = trainer.write_model(&tuned).unwrap();
    assert!(files.contains(&"model.safetensors".to_owned()) && files.contains(&"tokenizer.json".to_owned()));
    let tokens = &data[0].tokens;
    let served = serving_logits(&tuned, tokens);
    let difference = max_difference(&trainer.logits(tokens).unwrap(), &served);
    assert!(difference < 1e-3, "the merged model's logits differ from the trainer's by {difference}");
    let moved = max_difference(&serving_logits(&base, tokens), &served);
    assert!(moved > 1e-2, "fine-tuning left the logits where they were ({moved})");
}

#[test]
fn full_training_checkpoints_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_qwen2(&base, TinyShape::default(), 5).unwrap();
    let tokenizer = ModelTokenizer::load(&base).unwrap();
    let data = examples(&tokenizer);
    let settings = TrainSettings { method: Method::Full, learning_rate: 1e-3, seed: 1 };
    let mut trainer = Trainer::load(&base, settings, &Device::Cpu).unwrap();
    let first = trainer.step(&data).unwrap().loss;
    for _ in 0..9 {
        trainer.step(&data).unwrap();
    }
    assert!(trainer.evaluate(&data).unwrap().unwrap() < first);
    let checkpoint = dir.path().join("checkpoint.safetensors");
    trainer.save_checkpoint(&checkpoint).unwrap();

    let mut resumed = Trainer::load(&base, settings, &Device::Cpu).unwrap();
    resumed.load_checkpoint(&checkpoint).unwrap();
    assert_eq!(resumed.steps(), 10);
    let tokens = &data[1].tokens;
    assert!(max_difference(&resumed.logits(tokens).unwrap(), &trainer.logits(tokens).unwrap()) < 1e-6);

    // A LoRA checkpoint does not fit a full trainer, and the reason says so.
    let mut adapters = Trainer::load(&base, lora(2), &Device::Cpu).unwrap();
    let err = adapters.load_checkpoint(&checkpoint).unwrap_err().to_string();
    assert!(err.contains("other tensors"), "{err}");
}

#[test]
fn training_lines_are_read_in_openai_formats_and_bad_ones_say_why() {
    let dir = tempfile::tempdir().unwrap();
    write_llama(dir.path(), TinyShape::default(), 1).unwrap();
    let tokenizer = ModelTokenizer::load(dir.path()).unwrap();

    let chat = json!({"messages": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world", "weight": 0},
        {"role": "user", "content": "what"},
        {"role": "assistant", "content": "the answer"}
    ]});
    let example = example_from_json(&tokenizer, &chat, 512).unwrap();
    let learned: Vec<u32> =
        example.tokens.iter().zip(&example.targets).filter(|(_, t)| **t).map(|(token, _)| *token).collect();
    let text = tokenizer.decode(&learned).unwrap();
    assert!(text.contains("the answer") && !text.contains("world"), "learned {text:?}");

    let completion = example_from_json(&tokenizer, &json!({"prompt": "hello", "completion": " world"}), 512).unwrap();
    assert_eq!(completion.targets.last(), Some(&true));
    assert!(!completion.targets[0]);

    for (line, reason) in [
        (json!([1, 2]), "JSON object"),
        (json!({"text": "hi"}), "needs \"messages\""),
        (json!({"messages": [{"role": "user", "content": "hi"}]}), "at least one assistant"),
        (json!({"messages": [{"role": "tool", "content": "hi"}]}), "role \"tool\""),
        (json!({"messages": [{"role": "user"}]}), "no \"content\""),
        (json!({"prompt": 3, "completion": "x"}), "must be a string"),
    ] {
        let err = example_from_json(&tokenizer, &line, 512).unwrap_err().to_string();
        assert!(err.contains(reason), "{line}: {err}");
    }
    // Cut before the reply starts: nothing is left to learn.
    let err = example_from_json(&tokenizer, &chat, 2).unwrap_err().to_string();
    assert!(err.contains("no token left"), "{err}");
}
