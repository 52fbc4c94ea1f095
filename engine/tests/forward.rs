//! The candle forward pass against an independent plain-loop f32 reference that reads the
//! safetensors itself; the KV cache against full forwards; batched decode against one
//! sequence at a time; GGUF (F32 and quantised) against safetensors.

// The reference and the fixtures convert small counts and ids; exact float results are intended.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::many_single_char_names)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use maas_engine::model::CausalLm;
use maas_engine::tiny::{GgufWeights, TinyShape, write_gguf_llama, write_llama, write_qwen2};
use maas_engine::tokenizer::ModelTokenizer;

/// A straightforward Llama/Qwen2 forward over `Vec<f32>`s: one position at a time, every
/// head by hand.
struct Reference {
    tensors: HashMap<String, Vec<f32>>,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    eps: f32,
    theta: f64,
    tied: bool,
    biases: bool,
}

impl Reference {
    fn load(dir: &Path) -> Reference {
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            tensors.insert(name, values);
        }
        let number = |key: &str| config[key].as_u64().unwrap() as usize;
        Reference {
            hidden: number("hidden_size"),
            layers: number("num_hidden_layers"),
            heads: number("num_attention_heads"),
            kv_heads: number("num_key_value_heads"),
            intermediate: number("intermediate_size"),
            vocab: number("vocab_size"),
            eps: config["rms_norm_eps"].as_f64().unwrap() as f32,
            theta: config["rope_theta"].as_f64().unwrap(),
            tied: config["tie_word_embeddings"].as_bool().unwrap(),
            biases: config["model_type"] == "qwen2",
            tensors,
        }
    }

    fn t(&self, name: &str) -> &[f32] {
        self.tensors.get(name).unwrap_or_else(|| panic!("{name}"))
    }

    /// `w` is `[out, in]` row-major.
    fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
        w.chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
    }

    fn rms_norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let scale = 1.0 / (mean + self.eps).sqrt();
        x.iter().zip(w).map(|(v, g)| v * scale * g).collect()
    }

    /// Rotates each head's halves (Hugging Face's rotate_half).
    fn rope(&self, x: &mut [f32], position: usize, head_dim: usize) {
        let half = head_dim / 2;
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let frequency = (1.0 / self.theta.powf((2 * i) as f64 / head_dim as f64)) as f32;
                let angle = position as f32 * frequency;
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * angle.cos() - b * angle.sin();
                head[i + half] = b * angle.cos() + a * angle.sin();
            }
        }
    }

    /// Logits for every position of `tokens`.
    fn logits(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let head_dim = self.hidden / self.heads;
        let group = self.heads / self.kv_heads;
        let mut keys: Vec<Vec<Vec<f32>>> = vec![Vec::new(); self.layers];
        let mut values: Vec<Vec<Vec<f32>>> = vec![Vec::new(); self.layers];
        let embed = self.t("model.embed_tokens.weight");
        let mut out = Vec::new();
        for (position, &token) in tokens.iter().enumerate() {
            let mut x = embed[token as usize * self.hidden..(token as usize + 1) * self.hidden].to_vec();
            for layer in 0..self.layers {
                let p = format!("model.layers.{layer}");
                let h = self.rms_norm(&x, self.t(&format!("{p}.input_layernorm.weight")));
                let mut q = Self::matvec(self.t(&format!("{p}.self_attn.q_proj.weight")), &h);
                let mut k = Self::matvec(self.t(&format!("{p}.self_attn.k_proj.weight")), &h);
                let mut v = Self::matvec(self.t(&format!("{p}.self_attn.v_proj.weight")), &h);
                if self.biases {
                    for (out, name) in [(&mut q, "q"), (&mut k, "k"), (&mut v, "v")] {
                        for (o, b) in out.iter_mut().zip(self.t(&format!("{p}.self_attn.{name}_proj.bias"))) {
                            *o += b;
                        }
                    }
                }
                self.rope(&mut q, position, head_dim);
                self.rope(&mut k, position, head_dim);
                keys[layer].push(k);
                values[layer].push(v);
                let mut attended = vec![0.0f32; self.hidden];
                for head in 0..self.heads {
                    let kv = head / group;
                    let qh = &q[head * head_dim..(head + 1) * head_dim];
                    let scores: Vec<f32> = keys[layer]
                        .iter()
                        .map(|k| {
                            qh.iter().zip(&k[kv * head_dim..(kv + 1) * head_dim]).map(|(a, b)| a * b).sum::<f32>()
                                / (head_dim as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f32 = weights.iter().sum();
                    for (weight, v) in weights.iter().zip(&values[layer]) {
                        for d in 0..head_dim {
                            attended[head * head_dim + d] += weight / total * v[kv * head_dim + d];
                        }
                    }
                }
                let o = Self::matvec(self.t(&format!("{p}.self_attn.o_proj.weight")), &attended);
                x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                let h = self.rms_norm(&x, self.t(&format!("{p}.post_attention_layernorm.weight")));
                let gate = Self::matvec(self.t(&format!("{p}.mlp.gate_proj.weight")), &h);
                let up = Self::matvec(self.t(&format!("{p}.mlp.up_proj.weight")), &h);
                let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                assert_eq!(act.len(), self.intermediate);
                let down = Self::matvec(self.t(&format!("{p}.mlp.down_proj.weight")), &act);
                x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
            }
            let h = self.rms_norm(&x, self.t("model.norm.weight"));
            let head = if self.tied { embed } else { self.t("lm_head.weight") };
            let logits = Self::matvec(head, &h);
            assert_eq!(logits.len(), self.vocab);
            out.push(logits);
        }
        out
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
    tensor.to_vec2::<f32>().unwrap()
}

/// Larger weights than the writer's default would make the logits tiny; these shapes
/// give logits of a useful size, and the GQA group is 2 (llama) or 3 (qwen2).
const TOKENS: &[u32] = &[1, 17, 200, 45, 301, 7, 99, 150, 3, 260, 11, 42];

fn check_against_reference(dir: &Path) {
    let reference = Reference::load(dir);
    let expected = reference.logits(TOKENS);
    let model = CausalLm::load(dir, &Device::Cpu).unwrap();

    // A full forward of the whole sequence.
    let mut cache = model.new_cache();
    let full = rows(&model.forward(TOKENS, &mut cache, true).unwrap());
    assert_eq!(cache.len(), TOKENS.len());
    let scale = expected.iter().flatten().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "the logits are not degenerate: {scale}");
    for (position, (got, want)) in full.iter().zip(&expected).enumerate() {
        let diff = max_abs_diff(got, want);
        assert!(diff < 1e-4, "position {position}: max abs diff {diff}");
    }

    // Incremental: a prompt of 5, then one token at a time through the KV cache.
    let mut cache = model.new_cache();
    let mut incremental = rows(&model.forward(&TOKENS[..5], &mut cache, true).unwrap());
    for &token in &TOKENS[5..] {
        incremental.extend(rows(&model.decode(&[token], &mut [&mut cache]).unwrap()));
    }
    for (position, (got, want)) in incremental.iter().zip(&full).enumerate() {
        let diff = max_abs_diff(got, want);
        assert!(diff < 1e-5, "position {position}: cached decode differs from the full forward by {diff}");
    }

    // Chunked prefill without logits, then the last token.
    let mut cache = model.new_cache();
    model.extend(&TOKENS[..4], &mut cache).unwrap();
    model.extend(&TOKENS[4..9], &mut cache).unwrap();
    let last = rows(&model.forward(&TOKENS[9..], &mut cache, false).unwrap());
    assert!(max_abs_diff(&last[0], full.last().unwrap()) < 1e-5);
}

fn shape() -> TinyShape {
    TinyShape { hidden: 48, layers: 2, heads: 6, kv_heads: 2, intermediate: 96, context: 256 }
}

#[test]
fn tiny_llama_logits_match_a_plain_reference_and_the_cache_matches_full_forwards() {
    let dir = tempfile::tempdir().unwrap();
    write_llama(dir.path(), TinyShape { heads: 4, kv_heads: 2, ..shape() }, 11).unwrap();
    check_against_reference(dir.path());
}

#[test]
fn tiny_qwen2_logits_match_a_plain_reference_with_biases_and_tied_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    write_qwen2(dir.path(), shape(), 12).unwrap();
    let model = CausalLm::load(dir.path(), &Device::Cpu).unwrap();
    assert!(model.config().attention_bias && model.config().tie_word_embeddings);
    check_against_reference(dir.path());
}

fn check_batched_decode(shape: TinyShape, sequences: usize) {
    let dir = tempfile::tempdir().unwrap();
    write_qwen2(dir.path(), shape, 13).unwrap();
    let model = CausalLm::load(dir.path(), &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> =
        (0..sequences).map(|i| (0..=(i * 3 % 7) as u32).map(|t| 5 + t * 31 + i as u32).collect()).collect();
    let next: Vec<u32> = (0..sequences as u32).map(|i| 9 + i).collect();
    let mut alone = Vec::new();
    for (prompt, &token) in prompts.iter().zip(&next) {
        let mut cache = model.new_cache();
        model.extend(prompt, &mut cache).unwrap();
        alone.push(rows(&model.decode(&[token], &mut [&mut cache]).unwrap()).remove(0));
    }
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let mut cache = model.new_cache();
            model.extend(prompt, &mut cache).unwrap();
            cache
        })
        .collect();
    let mut refs: Vec<&mut _> = caches.iter_mut().collect();
    let together = rows(&model.decode(&next, &mut refs).unwrap());
    for (index, (a, b)) in alone.iter().zip(&together).enumerate() {
        let diff = max_abs_diff(a, b);
        assert!(diff < 1e-5, "sequence {index}: {diff}");
    }
    let lengths: Vec<usize> = caches.iter().map(maas_engine::model::KvCache::len).collect();
    let expected: Vec<usize> = prompts.iter().map(|prompt| prompt.len() + 1).collect();
    assert_eq!(lengths, expected);
}

#[test]
fn a_batched_decode_step_equals_each_sequence_alone() {
    check_batched_decode(shape(), 3);
    // A wide MLP, whose activation a decode step computes in pieces.
    check_batched_decode(TinyShape { intermediate: 8192, ..shape() }, 9);
}

#[test]
fn the_kv_cache_grows_past_its_first_allocation_and_stops_at_the_context() {
    let dir = tempfile::tempdir().unwrap();
    write_llama(dir.path(), TinyShape { context: 300, ..TinyShape::default() }, 3).unwrap();
    let model = CausalLm::load(dir.path(), &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..290u32).map(|i| i * 7 % 300).collect();
    let mut cache = model.new_cache();
    let full = rows(&model.forward(&tokens, &mut cache, true).unwrap());
    let mut cache = model.new_cache();
    model.extend(&tokens[..100], &mut cache).unwrap();
    let mut last = Vec::new();
    for &token in &tokens[100..] {
        last = rows(&model.decode(&[token], &mut [&mut cache]).unwrap()).remove(0);
    }
    assert!(max_abs_diff(&last, full.last().unwrap()) < 1e-4);
    let error = model.forward(&tokens[..20], &mut cache, false).unwrap_err().to_string();
    assert!(error.contains("context length 300"), "{error}");
}

#[test]
fn gguf_f32_gives_the_safetensors_logits_and_quantised_ones_come_close() {
    let dir = tempfile::tempdir().unwrap();
    let shape = TinyShape { hidden: 64, layers: 2, heads: 4, kv_heads: 2, intermediate: 128, context: 256 };
    write_llama(&dir.path().join("hf"), shape, 21).unwrap();
    let hf = CausalLm::load(&dir.path().join("hf"), &Device::Cpu).unwrap();
    let expected = rows(&hf.forward(TOKENS, &mut hf.new_cache(), true).unwrap());

    let f32_path = dir.path().join("tiny-f32.gguf");
    write_gguf_llama(&f32_path, shape, 21, GgufWeights::F32).unwrap();
    let gguf = CausalLm::load(&f32_path, &Device::Cpu).unwrap();
    assert!(gguf.config().rope_interleaved && gguf.config().tiny_random);
    assert_eq!(gguf.summary().quantization, None);
    let got = rows(&gguf.forward(TOKENS, &mut gguf.new_cache(), true).unwrap());
    for (position, (a, b)) in got.iter().zip(&expected).enumerate() {
        let diff = max_abs_diff(a, b);
        assert!(diff < 1e-5, "position {position}: {diff}");
    }

    // Quantised: Q8_0 keeps about 2-3 significant digits per weight, Q4_0 about one.
    let scale = expected.iter().flatten().fold(0.0f32, |m, v| m.max(v.abs()));
    for (weights, tolerance) in [(GgufWeights::Q8_0, 0.02), (GgufWeights::Q4_0, 0.25)] {
        let path = dir.path().join(format!("tiny-{weights:?}.gguf"));
        write_gguf_llama(&path, shape, 21, weights).unwrap();
        let quantized = CausalLm::load(&path, &Device::Cpu).unwrap();
        assert_eq!(quantized.summary().quantization.as_deref(), Some(format!("{weights:?}").to_lowercase().as_str()));
        let got = rows(&quantized.forward(TOKENS, &mut quantized.new_cache(), true).unwrap());
        let diff = got.iter().zip(&expected).map(|(a, b)| max_abs_diff(a, b)).fold(0.0, f32::max);
        println!("{weights:?}: max abs logit diff {diff} (largest logit {scale})");
        assert!(diff < tolerance * scale, "{weights:?}: {diff} against logits up to {scale}");
        // A long prefill (dequantised matrices) agrees with the same tokens in short chunks
        // (candle's quantised kernels).
        let long: Vec<u32> = (0..80u32).map(|i| (i * 37 + 5) % 300).collect();
        let whole = rows(&quantized.forward(&long, &mut quantized.new_cache(), false).unwrap());
        let mut cache = quantized.new_cache();
        quantized.extend(&long[..40], &mut cache).unwrap();
        let chunked = rows(&quantized.forward(&long[40..], &mut cache, false).unwrap());
        let diff = max_abs_diff(&whole[0], &chunked[0]);
        assert!(diff < tolerance * scale, "{weights:?}: long prefill differs from chunks by {diff}");
        // Cached decode works on quantised weights too.
        let mut cache = quantized.new_cache();
        quantized.extend(&TOKENS[..6], &mut cache).unwrap();
        let step = rows(&quantized.decode(&[TOKENS[6]], &mut [&mut cache]).unwrap());
        assert!(max_abs_diff(&step[0], &got[6]) < 1e-4);
    }
}

#[test]
fn the_gguf_tokenizer_encodes_like_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    write_llama(&dir.path().join("hf"), TinyShape::default(), 1).unwrap();
    let path = dir.path().join("gguf/tiny.gguf");
    write_gguf_llama(&path, TinyShape::default(), 1, GgufWeights::Q8_0).unwrap();
    let from_json = ModelTokenizer::load(&dir.path().join("hf")).unwrap();
    let from_gguf = ModelTokenizer::load(&path).unwrap();
    for text in ["hello world", "What is the answer? 123 café 日本", "<s>user: hi</s>\n\n  x"] {
        assert_eq!(from_json.encode(text, true).unwrap(), from_gguf.encode(text, true).unwrap(), "{text:?}");
        let ids = from_json.encode(text, false).unwrap();
        assert_eq!(from_gguf.decode(&ids).unwrap(), from_json.decode(&ids).unwrap());
    }
    assert_eq!(from_json.encode("hello world", true).unwrap()[0], 1, "llama adds <s>");
    assert_eq!(from_gguf.eos_ids().iter().copied().collect::<Vec<_>>(), [2]);
}

#[test]
fn broken_models_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_llama(&model, TinyShape::default(), 1).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    config["num_attention_heads"] = 3.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let error = CausalLm::load(&model, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("do not split"), "{error}");

    config["num_attention_heads"] = 4.into();
    config["model_type"] = "gpt_neox".into();
    config["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let error = CausalLm::load(&model, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("not supported"), "{error}");

    config["model_type"] = "llama".into();
    config["intermediate_size"] = 100.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let error = CausalLm::load(&model, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("gate_proj") && error.contains("config implies"), "{error}");
}

#[test]
fn sharded_bf16_weights_load_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("f32");
    write_llama(&source, TinyShape::default(), 5).unwrap();
    let reference = CausalLm::load(&source, &Device::Cpu).unwrap();
    let expected = rows(&reference.forward(TOKENS, &mut reference.new_cache(), true).unwrap());

    // Re-save as two bf16 shards with an index, as large checkpoints come.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(source.join(file), sharded.join(file)).unwrap();
    }
    let tensors = candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let subset: HashMap<String, Tensor> = part
            .iter()
            .map(|name| ((*name).clone(), tensors[*name].to_dtype(candle_core::DType::BF16).unwrap()))
            .collect();
        candle_core::safetensors::save(&subset, sharded.join(shard)).unwrap();
        for name in part {
            weight_map.insert((*name).clone(), shard.into());
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let model = CausalLm::load(&sharded, &Device::Cpu).unwrap();
    assert_eq!(model.summary().stored_dtype, "bf16");
    let got = rows(&model.forward(TOKENS, &mut model.new_cache(), true).unwrap());
    let scale = expected.iter().flatten().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(&expected).map(|(a, b)| max_abs_diff(a, b)).fold(0.0, f32::max);
    // bf16 keeps 8 bits of mantissa: about 0.4% per weight.
    assert!(diff < 0.05 * scale, "bf16 logits differ by {diff} (scale {scale})");
}

/// Bytes of one GGUF metadata value: (type, payload).
fn gguf_value(kind: u32, payload: Vec<u8>) -> (u32, Vec<u8>) {
    (kind, payload)
}

fn gguf_str(text: &str) -> Vec<u8> {
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text.as_bytes());
    bytes
}

fn gguf_array(kind: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = kind.to_le_bytes().to_vec();
    bytes.extend((items.len() as u64).to_le_bytes());
    for item in items {
        bytes.extend(item);
    }
    bytes
}

#[test]
fn a_sentencepiece_gguf_vocabulary_becomes_a_tokenizer() {
    // A Llama-2-style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces whose
    // scores make "▁hello" and "▁world" single tokens.
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(str::to_owned).to_vec();
    let mut types = vec![2i32, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (piece, score) in [
        ("▁", -1.0f32),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("he", -3.0),
        ("ll", -3.1),
        ("llo", -3.2),
        ("hello", -3.3),
        ("▁hello", -3.4),
        ("or", -3.5),
        ("ld", -3.6),
        ("orld", -3.7),
        ("world", -3.8),
        ("▁world", -3.9),
    ] {
        tokens.push(piece.to_owned());
        types.push(1);
        scores.push(score);
    }
    let id = |piece: &str| tokens.iter().position(|t| t == piece).unwrap() as u32;
    let metadata: Vec<(&str, (u32, Vec<u8>))> = vec![
        ("general.architecture", gguf_value(8, gguf_str("llama"))),
        ("tokenizer.ggml.model", gguf_value(8, gguf_str("llama"))),
        (
            "tokenizer.ggml.tokens",
            gguf_value(9, gguf_array(8, &tokens.iter().map(|t| gguf_str(t)).collect::<Vec<_>>())),
        ),
        (
            "tokenizer.ggml.scores",
            gguf_value(9, gguf_array(6, &scores.iter().map(|s| s.to_le_bytes().to_vec()).collect::<Vec<_>>())),
        ),
        (
            "tokenizer.ggml.token_type",
            gguf_value(9, gguf_array(5, &types.iter().map(|t| t.to_le_bytes().to_vec()).collect::<Vec<_>>())),
        ),
        ("tokenizer.ggml.bos_token_id", gguf_value(4, 1u32.to_le_bytes().to_vec())),
        ("tokenizer.ggml.eos_token_id", gguf_value(4, 2u32.to_le_bytes().to_vec())),
        ("tokenizer.ggml.unknown_token_id", gguf_value(4, 0u32.to_le_bytes().to_vec())),
    ];
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((metadata.len() as u64).to_le_bytes());
    for (key, (kind, payload)) in &metadata {
        bytes.extend(gguf_str(key));
        bytes.extend(kind.to_le_bytes());
        bytes.extend(payload);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    std::fs::write(&path, bytes).unwrap();

    let tokenizer = ModelTokenizer::load(&path).unwrap();
    assert_eq!(tokenizer.encode("hello world", true).unwrap(), [1, id("▁hello"), id("▁world")]);
    assert_eq!(tokenizer.decode(&[1, id("▁hello"), id("▁world")]).unwrap(), "hello world");
    // Characters outside the vocabulary fall back to their bytes, and decode back.
    let ids = tokenizer.encode("hé", false).unwrap();
    assert_eq!(ids, [id("▁"), id("h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tokenizer.decode(&ids).unwrap(), "hé");
    assert_eq!(tokenizer.eos_ids().iter().copied().collect::<Vec<_>>(), [2]);
}
