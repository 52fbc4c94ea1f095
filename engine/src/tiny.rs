//! Tiny random-weight checkpoints in the real formats, so that loading code runs on
//! machines that cannot download weights: a Hugging Face folder with `config.json`,
//! `model.safetensors` (the Llama family's tensor names and shapes), `tokenizer.json`,
//! `tokenizer_config.json` and `generation_config.json`. Weights come from a seeded
//! generator: the same seed writes the same bytes. The model is labelled as tiny and
//! random in its config (`maas_tiny_random`), so nobody mistakes its output for a model's.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The shape of a tiny Llama-family model.
#[derive(Debug, Clone, Copy)]
pub struct TinyShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub context: usize,
}

impl Default for TinyShape {
    fn default() -> Self {
        TinyShape { hidden: 64, layers: 2, heads: 4, kv_heads: 2, intermediate: 128, context: 512 }
    }
}

/// The words of the tiny tokenizer's vocabulary (after its special tokens).
const WORDS: &[&str] = &[
    "the", "a", "is", "of", "and", "to", "in", "it", "you", "that", "hello", "world", "model", "tiny", "random",
    "maas", "answer", "question", "yes", "no", "what", "how", "why", "when", "where", "who", ".", ",", "?", "!",
];

const SPECIAL: &[&str] = &["<unk>", "<s>", "</s>"];

/// Writes a tiny Llama model into `dir` (created if needed) and returns the files written.
pub fn write_llama(dir: &Path, shape: TinyShape, seed: u64) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let vocab = SPECIAL.len() + WORDS.len();
    let head_dim = shape.hidden / shape.heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": shape.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "maas_tiny_random": true,
    });
    write_json(&dir.join("config.json"), &config)?;

    let mut tensors: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, shape.hidden])];
    for layer in 0..shape.layers {
        let p = format!("model.layers.{layer}");
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![shape.hidden, shape.hidden]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![shape.kv_heads * head_dim, shape.hidden]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![shape.kv_heads * head_dim, shape.hidden]));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![shape.hidden, shape.hidden]));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![shape.intermediate, shape.hidden]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![shape.intermediate, shape.hidden]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![shape.hidden, shape.intermediate]));
        tensors.push((format!("{p}.input_layernorm.weight"), vec![shape.hidden]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![shape.hidden]));
    }
    tensors.push(("model.norm.weight".into(), vec![shape.hidden]));
    tensors.push(("lm_head.weight".into(), vec![vocab, shape.hidden]));
    write_safetensors(&dir.join("model.safetensors"), &tensors, seed)?;

    let mut vocabulary = serde_json::Map::new();
    for (id, token) in SPECIAL.iter().chain(WORDS).enumerate() {
        vocabulary.insert((*token).to_owned(), id.into());
    }
    let added: Vec<serde_json::Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(id, token)| {
            serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": vocabulary, "unk_token": "<unk>"},
    });
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    let tokenizer_config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": shape.context,
        "chat_template": "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    });
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&dir.join("generation_config.json"), &serde_json::json!({"bos_token_id": 1, "eos_token_id": 2}))?;
    Ok(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
        .map(str::to_owned)
        .to_vec())
}

/// Writes f32 tensors with seeded small random values (norm weights are ones).
// 24 random bits convert to f32 exactly.
#[allow(clippy::cast_precision_loss)]
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>)], seed: u64) -> std::io::Result<()> {
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    // The data starts 8-byte aligned, as the format recommends.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (name, shape) in tensors {
        let count: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        for _ in 0..count {
            let value = if norm {
                1.0f32
            } else {
                // xorshift64*, scaled to about [-0.05, 0.05).
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let unit = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
                (unit - 0.5) * 0.1
            };
            file.write_all(&value.to_le_bytes())?;
        }
    }
    file.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()
}

fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)
}
