//! Tiny random-weight checkpoints in the real formats, so that loading code runs on
//! machines that cannot download weights: a Hugging Face folder with `config.json`,
//! `model.safetensors` (the real tensor names and shapes), `tokenizer.json`,
//! `tokenizer_config.json` and `generation_config.json`, for Llama, Qwen2 and BERT; and a
//! GGUF v3 file of the Llama, in F32 or a quantised type. Weights come from a seeded
//! generator: the same seed writes the same bytes. The model is labelled as tiny and
//! random in its config (`maas_tiny_random`, GGUF `maas.tiny_random`), so nobody mistakes
//! its output for a model's.
//!
//! The decoders share a small byte-level BPE tokenizer (Qwen2's pre-tokenizer, 256 byte
//! tokens, merges for a few English words, special tokens `<unk> <s> </s> <|im_start|>
//! <|im_end|>`), so any text encodes, and characters outside the merges stream byte by
//! byte, as in real models.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};

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

/// Words the tiny tokenizer merges into tokens, with and without a leading space.
const WORDS: &[&str] = &[
    "the",
    "a",
    "is",
    "of",
    "and",
    "to",
    "in",
    "it",
    "you",
    "that",
    "hello",
    "world",
    "model",
    "tiny",
    "random",
    "maas",
    "answer",
    "question",
    "yes",
    "no",
    "what",
    "how",
    "why",
    "when",
    "where",
    "who",
    "user",
    "assistant",
    "system",
    "café",
];

/// Special tokens, ids 0.. in this order.
pub const SPECIAL_TOKENS: &[&str] = &["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
pub const IM_END_ID: u32 = 4;

/// Qwen2's pre-tokenizer split (also what candle builds for GGUF `qwen2` tokenizers).
const SPLIT_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A Qwen2-style chat template, as Qwen2.5's tokenizer_config.json has it (without tools).
pub const QWEN2_CHAT_TEMPLATE: &str = "{%- for message in messages %}\n    {%- if loop.first and messages[0]['role'] != 'system' %}\n        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

const PLAIN_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// GPT-2's map from bytes to printable characters (byte-level BPE's alphabet).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for byte in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&byte) || (0xA1..=0xAC).contains(&byte) || byte >= 0xAE;
        map[byte as usize] = if printable {
            char::from(byte)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    map
}

/// The tiny byte-level BPE vocabulary: tokens by id and merges by rank.
fn bpe_vocabulary() -> (Vec<String>, Vec<(String, String)>) {
    let alphabet = bytes_to_unicode();
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|t| (*t).to_owned()).collect();
    tokens.extend(alphabet.iter().map(char::to_string));
    let mut merges = Vec::new();
    let mut known: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let mut merge = |left: String, right: String| {
        let joined = format!("{left}{right}");
        if known.insert(joined.clone()) {
            merges.push((left, right));
            tokens.push(joined.clone());
        }
        joined
    };
    let space = alphabet[usize::from(b' ')].to_string();
    for word in WORDS {
        // The word left to right, then the word after a space as one token.
        let mut pieces = word.bytes().map(|b| alphabet[b as usize].to_string());
        let first = pieces.next().unwrap_or_default();
        let whole = pieces.fold(first, &mut merge);
        merge(space.clone(), whole);
    }
    (tokens, merges)
}

/// The number of tokens of the tiny decoders' tokenizer.
pub fn tokenizer_vocab_size() -> usize {
    bpe_vocabulary().0.len()
}

/// tokenizer.json of the tiny decoders; `add_bos` prepends `<s>` (Llama), else nothing
/// is added (Qwen2).
fn bpe_tokenizer_json(add_bos: bool) -> serde_json::Value {
    let (tokens, merges) = bpe_vocabulary();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(id, token)| (token.clone(), id.into())).collect();
    let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, token)| {
            serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let post_processor = if add_bos {
        serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}},
        })
    } else {
        byte_level.clone()
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    Llama,
    Qwen2,
}

/// The tensors of a decoder in Hugging Face naming, in file order.
fn decoder_tensors(decoder: Decoder, shape: TinyShape, vocab: usize) -> Vec<(String, Vec<usize>)> {
    let head_dim = shape.hidden / shape.heads;
    let kv = shape.kv_heads * head_dim;
    let mut tensors: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, shape.hidden])];
    for layer in 0..shape.layers {
        let p = format!("model.layers.{layer}");
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![shape.hidden, shape.hidden]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, shape.hidden]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, shape.hidden]));
        if decoder == Decoder::Qwen2 {
            tensors.push((format!("{p}.self_attn.q_proj.bias"), vec![shape.hidden]));
            tensors.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            tensors.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![shape.hidden, shape.hidden]));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![shape.intermediate, shape.hidden]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![shape.intermediate, shape.hidden]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![shape.hidden, shape.intermediate]));
        tensors.push((format!("{p}.input_layernorm.weight"), vec![shape.hidden]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![shape.hidden]));
    }
    tensors.push(("model.norm.weight".into(), vec![shape.hidden]));
    if decoder == Decoder::Llama {
        tensors.push(("lm_head.weight".into(), vec![vocab, shape.hidden]));
    }
    tensors
}

/// Writes a tiny Llama model into `dir` (created if needed) and returns the files written.
pub fn write_llama(dir: &Path, shape: TinyShape, seed: u64) -> std::io::Result<Vec<String>> {
    write_decoder(dir, Decoder::Llama, shape, tokenizer_vocab_size(), seed)
}

/// Writes a tiny Qwen2 model (q/k/v biases, tied embeddings, a Qwen chat template,
/// `<|im_end|>` as an end of sequence) into `dir` and returns the files written.
pub fn write_qwen2(dir: &Path, shape: TinyShape, seed: u64) -> std::io::Result<Vec<String>> {
    write_decoder(dir, Decoder::Qwen2, shape, tokenizer_vocab_size(), seed)
}

/// As [`write_qwen2`], with the embedding matrix padded to `vocab` rows (real models pad
/// theirs: Qwen2.5's has 151936 rows for 151665 tokens). For benchmarks at real sizes.
pub fn write_qwen2_with_vocab(dir: &Path, shape: TinyShape, vocab: usize, seed: u64) -> std::io::Result<Vec<String>> {
    write_decoder(dir, Decoder::Qwen2, shape, vocab.max(tokenizer_vocab_size()), seed)
}

fn write_decoder(
    dir: &Path,
    decoder: Decoder,
    shape: TinyShape,
    vocab: usize,
    seed: u64,
) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let (config, tokenizer_config, generation_config) = match decoder {
        Decoder::Llama => (
            serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "tie_word_embeddings": false,
                "bos_token_id": BOS_ID,
                "eos_token_id": EOS_ID,
            }),
            serde_json::json!({
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": shape.context,
                "chat_template": PLAIN_CHAT_TEMPLATE,
            }),
            serde_json::json!({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}),
        ),
        Decoder::Qwen2 => (
            serde_json::json!({
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "rms_norm_eps": 1e-6,
                "rope_theta": 1_000_000.0,
                "tie_word_embeddings": true,
                "use_sliding_window": false,
                "sliding_window": shape.context,
                "eos_token_id": EOS_ID,
            }),
            serde_json::json!({
                "bos_token": null,
                "eos_token": "<|im_end|>",
                "pad_token": "</s>",
                "model_max_length": shape.context,
                "chat_template": QWEN2_CHAT_TEMPLATE,
            }),
            serde_json::json!({"eos_token_id": [IM_END_ID, EOS_ID]}),
        ),
    };
    let mut config = config;
    let common = serde_json::json!({
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": shape.context,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "maas_tiny_random": true,
    });
    if let (Some(config), Some(common)) = (config.as_object_mut(), common.as_object()) {
        config.extend(common.clone());
    }
    write_json(&dir.join("config.json"), &config)?;
    let tensors = decoder_tensors(decoder, shape, vocab);
    write_safetensors(&dir.join("model.safetensors"), &tensors, seed)?;
    write_json(&dir.join("tokenizer.json"), &bpe_tokenizer_json(decoder == Decoder::Llama))?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&dir.join("generation_config.json"), &generation_config)?;
    Ok(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
        .map(str::to_owned)
        .to_vec())
}

/// How the matrices of a tiny GGUF file are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufWeights {
    F32,
    Q8_0,
    Q4_0,
}

/// Writes the tiny Llama of [`write_llama`] (the same shape and seed give the same
/// weights) as a GGUF v3 file at `path`, with llama.cpp's tensor names, its q/k row order
/// (rotary pairs adjacent), llama metadata and the tokenizer as `tokenizer.ggml.*`
/// (`gpt2`-style BPE). Norms stay F32; the matrices (embeddings included) are stored as
/// `weights` asks, quantised by candle.
pub fn write_gguf_llama(path: &Path, shape: TinyShape, seed: u64, weights: GgufWeights) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let vocab = tokenizer_vocab_size();
    let tensors = decoder_tensors(Decoder::Llama, shape, vocab);
    let mut values = RandomValues::new(seed);
    let head_dim = shape.hidden / shape.heads;
    let (tokens, merges) = bpe_vocabulary();
    let token_types: Vec<GgufValue> =
        (0..tokens.len()).map(|id| GgufValue::I32(if id < SPECIAL_TOKENS.len() { 3 } else { 1 })).collect();
    let count = |n: usize| GgufValue::U32(u32::try_from(n).unwrap_or(u32::MAX));
    let metadata: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", GgufValue::Str("llama".into())),
        ("general.name", GgufValue::Str("maas tiny random llama".into())),
        ("general.alignment", GgufValue::U32(32)),
        ("maas.tiny_random", GgufValue::Bool(true)),
        ("llama.block_count", count(shape.layers)),
        ("llama.context_length", count(shape.context)),
        ("llama.embedding_length", count(shape.hidden)),
        ("llama.feed_forward_length", count(shape.intermediate)),
        ("llama.attention.head_count", count(shape.heads)),
        ("llama.attention.head_count_kv", count(shape.kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5)),
        ("llama.rope.freq_base", GgufValue::F32(10_000.0)),
        ("llama.rope.dimension_count", count(head_dim)),
        ("llama.vocab_size", count(vocab)),
        ("tokenizer.ggml.model", GgufValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre", GgufValue::Str("qwen2".into())),
        ("tokenizer.ggml.tokens", GgufValue::Array(tokens.into_iter().map(GgufValue::Str).collect())),
        ("tokenizer.ggml.token_type", GgufValue::Array(token_types)),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(merges.into_iter().map(|(a, b)| GgufValue::Str(format!("{a} {b}"))).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(BOS_ID)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(EOS_ID)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(true)),
        ("tokenizer.chat_template", GgufValue::Str(PLAIN_CHAT_TEMPLATE.into())),
    ];
    let mut gguf_tensors = Vec::new();
    for (name, dims) in &tensors {
        let mut data = values.tensor(name, dims);
        if name.ends_with("q_proj.weight") {
            data = permute_rotary_rows(&data, shape.heads, shape.hidden);
        } else if name.ends_with("k_proj.weight") {
            data = permute_rotary_rows(&data, shape.kv_heads, shape.hidden);
        }
        let matrix = dims.len() == 2;
        let dtype = match weights {
            GgufWeights::F32 => GgmlDType::F32,
            _ if !matrix => GgmlDType::F32,
            GgufWeights::Q8_0 => GgmlDType::Q8_0,
            GgufWeights::Q4_0 => GgmlDType::Q4_0,
        };
        let bytes = if dtype == GgmlDType::F32 {
            data.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            let tensor = candle_core::Tensor::from_vec(data, dims.as_slice(), &candle_core::Device::Cpu)
                .map_err(std::io::Error::other)?;
            let quantized = QTensor::quantize(&tensor, dtype).map_err(std::io::Error::other)?;
            quantized.data().map_err(std::io::Error::other)?.into_owned()
        };
        gguf_tensors.push((gguf_name(name), dims.clone(), dtype, bytes));
    }
    write_gguf(path, &metadata, &gguf_tensors)
}

/// llama.cpp's `permute` of q/k rows when converting from Hugging Face: within each head,
/// row `j * head_dim / 2 + i` moves to `2 * i + j`.
fn permute_rotary_rows(data: &[f32], heads: usize, columns: usize) -> Vec<f32> {
    let rows = data.len() / columns;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
    for head in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let from = head * head_dim + j * half + i;
                let to = head * head_dim + 2 * i + j;
                out[to * columns..(to + 1) * columns].copy_from_slice(&data[from * columns..(from + 1) * columns]);
            }
        }
    }
    out
}

/// The GGUF name of a Hugging Face Llama tensor.
fn gguf_name(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.").unwrap_or(name);
    let (layer, part) = rest.split_once('.').unwrap_or((rest, ""));
    let part = match part {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        other => other,
    };
    format!("blk.{layer}.{part}")
}

/// A GGUF metadata value, as far as the tiny writer needs them.
#[derive(Debug, Clone)]
enum GgufValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    fn kind(&self) -> u32 {
        match self {
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::Str(_) => 8,
            GgufValue::Array(_) => 9,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            GgufValue::U32(v) => out.extend(v.to_le_bytes()),
            GgufValue::I32(v) => out.extend(v.to_le_bytes()),
            GgufValue::F32(v) => out.extend(v.to_le_bytes()),
            GgufValue::Bool(v) => out.push(u8::from(*v)),
            GgufValue::Str(text) => gguf_string(out, text),
            GgufValue::Array(items) => {
                out.extend(items.first().map_or(4, GgufValue::kind).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.write(out);
                }
            }
        }
    }
}

fn gguf_string(out: &mut Vec<u8>, text: &str) {
    out.extend((text.len() as u64).to_le_bytes());
    out.extend(text.as_bytes());
}

/// GGUF's type id of a tensor dtype.
fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

const GGUF_ALIGNMENT: usize = 32;

/// Writes a GGUF v3 file: header, metadata, tensor infos (dims innermost first), then the
/// data, each tensor aligned to 32 bytes.
fn write_gguf(
    path: &Path,
    metadata: &[(&str, GgufValue)],
    tensors: &[(String, Vec<usize>, GgmlDType, Vec<u8>)],
) -> std::io::Result<()> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        gguf_string(&mut out, key);
        out.extend(value.kind().to_le_bytes());
        value.write(&mut out);
    }
    let mut offset = 0usize;
    for (name, dims, dtype, bytes) in tensors {
        gguf_string(&mut out, name);
        out.extend(u32::try_from(dims.len()).unwrap_or(0).to_le_bytes());
        for dim in dims.iter().rev() {
            out.extend((*dim as u64).to_le_bytes());
        }
        out.extend(ggml_type_id(*dtype).to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += bytes.len().div_ceil(GGUF_ALIGNMENT) * GGUF_ALIGNMENT;
    }
    out.resize(out.len().div_ceil(GGUF_ALIGNMENT) * GGUF_ALIGNMENT, 0);
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
        out.resize(out.len().div_ceil(GGUF_ALIGNMENT) * GGUF_ALIGNMENT, 0);
    }
    std::fs::write(path, out)
}

/// The shape of a tiny BERT encoder.
#[derive(Debug, Clone, Copy)]
pub struct TinyBertShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
}

impl Default for TinyBertShape {
    fn default() -> Self {
        TinyBertShape { hidden: 32, layers: 2, heads: 4, intermediate: 64, max_positions: 128 }
    }
}

const BERT_SPECIAL: &[&str] = &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Writes a tiny BERT encoder (sentence-transformers naming, a WordPiece tokenizer over
/// the tiny word list) into `dir` and returns the files written.
pub fn write_bert(dir: &Path, shape: TinyBertShape, seed: u64) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut words: Vec<String> = BERT_SPECIAL.iter().map(|w| (*w).to_owned()).collect();
    words.extend(WORDS.iter().map(|w| (*w).to_owned()));
    words.extend([".", ",", "?", "!", "##s", "##ed", "##ing"].map(str::to_owned));
    words.extend(('a'..='z').map(String::from));
    words.extend(('a'..='z').map(|c| format!("##{c}")));
    let vocab = words.len();
    let config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": shape.max_positions,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "maas_tiny_random": true,
    });
    write_json(&dir.join("config.json"), &config)?;
    let h = shape.hidden;
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![vocab, h]),
        ("embeddings.position_embeddings.weight".into(), vec![shape.max_positions, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for layer in 0..shape.layers {
        let p = format!("encoder.layer.{layer}");
        for part in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"] {
            tensors.push((format!("{p}.{part}.weight"), vec![h, h]));
            tensors.push((format!("{p}.{part}.bias"), vec![h]));
        }
        tensors.push((format!("{p}.attention.output.LayerNorm.weight"), vec![h]));
        tensors.push((format!("{p}.attention.output.LayerNorm.bias"), vec![h]));
        tensors.push((format!("{p}.intermediate.dense.weight"), vec![shape.intermediate, h]));
        tensors.push((format!("{p}.intermediate.dense.bias"), vec![shape.intermediate]));
        tensors.push((format!("{p}.output.dense.weight"), vec![h, shape.intermediate]));
        tensors.push((format!("{p}.output.dense.bias"), vec![h]));
        tensors.push((format!("{p}.output.LayerNorm.weight"), vec![h]));
        tensors.push((format!("{p}.output.LayerNorm.bias"), vec![h]));
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors, seed)?;

    let vocabulary: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(id, word)| (word.clone(), id.into())).collect();
    let added: Vec<serde_json::Value> = BERT_SPECIAL
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
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocabulary},
    });
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    Ok(["config.json", "model.safetensors", "tokenizer.json"].map(str::to_owned).to_vec())
}

/// Seeded values for tensors, one after another: norm weights are ones, norm biases
/// zeros, everything else small uniform random values.
struct RandomValues {
    state: u64,
}

impl RandomValues {
    fn new(seed: u64) -> Self {
        RandomValues { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1 }
    }

    // 24 random bits convert to f32 exactly.
    #[allow(clippy::cast_precision_loss)]
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Vec<f32> {
        let count: usize = shape.iter().product();
        let lower = name.to_ascii_lowercase();
        if lower.ends_with("norm.weight") {
            return vec![1.0; count];
        }
        if lower.ends_with("norm.bias") {
            return vec![0.0; count];
        }
        (0..count)
            .map(|_| {
                // xorshift64*, scaled to about [-0.05, 0.05).
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                let unit = (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
                (unit - 0.5) * 0.1
            })
            .collect()
    }
}

/// Writes f32 tensors with the values of [`random_values`].
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
    let mut values = RandomValues::new(seed);
    for (name, shape) in tensors {
        let bytes: Vec<u8> = values.tensor(name, shape).iter().flat_map(|v| v.to_le_bytes()).collect();
        file.write_all(&bytes)?;
    }
    file.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()
}

fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)
}
