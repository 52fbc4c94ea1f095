//! VRAM estimation for a model replica, from a Hugging Face `config.json` or GGUF metadata.
//!
//! The formula (Llama-family decoder):
//!
//! ```text
//! head_dim   = head_dim key, else hidden_size / num_attention_heads
//! kv_dim     = num_key_value_heads * head_dim          (GQA; kv heads default to heads)
//! per layer  = hidden*hidden (q) + 2*hidden*kv_dim (k, v) + hidden*hidden (o)
//!            + 3*hidden*intermediate (gate, up, down) + 2*hidden (two RMS norms)
//! parameters = vocab*hidden (embeddings) + layers*per_layer + hidden (final norm)
//!            + vocab*hidden (lm head, unless tie_word_embeddings)
//! weights    = parameters * dtype_bytes
//! kv_cache   = 2 (k and v) * layers * kv_heads * head_dim * context * sequences * dtype_bytes
//! overhead   = 10% of (weights + kv_cache) + 512 MiB   (activations, CUDA context, allocator)
//! total      = weights + kv_cache + overhead
//! ```
//!
//! Each figure is rounded up to whole MiB. Biases (Qwen2's q/k/v) and rotary tables are
//! ignored: they are well under 0.1% of a model.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The fixed part of the runtime overhead, in MiB.
pub const OVERHEAD_FIXED_MIB: u64 = 512;
/// The proportional part of the runtime overhead, as a fraction of weights plus KV cache.
pub const OVERHEAD_FRACTION: f64 = 0.10;

const MIB: f64 = 1024.0 * 1024.0;

/// Why an estimate could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    /// A required key is absent.
    #[error("model config is missing {0}; add it to the config or give the memory by hand")]
    MissingKey(String),
    /// A key has the wrong type or an impossible value.
    #[error("model config key {key} is invalid: {why}; fix the config or give the memory by hand")]
    InvalidKey { key: String, why: String },
    /// The dtype is unknown and no byte width was given.
    #[error("unknown dtype {0}; pass the bytes per parameter explicitly")]
    UnknownDtype(String),
}

/// A VRAM estimate for one replica on one GPU (no tensor parallelism).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VramEstimate {
    /// The number of parameters (0 when GGUF metadata does not say).
    pub parameters: u64,
    /// The weights, in MiB.
    pub weights_mib: u64,
    /// The KV cache for the given context and concurrent sequences, in MiB.
    pub kv_cache_mib: u64,
    /// Activations and runtime overhead, in MiB.
    pub overhead_mib: u64,
    /// The sum of the above, in MiB.
    pub total_mib: u64,
}

impl fmt::Display for VramEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[allow(clippy::cast_precision_loss)]
        let billions = self.parameters as f64 / 1e9;
        write!(
            f,
            "{billions:.2} B parameters: {} MiB weights + {} MiB kv cache + {} MiB overhead = {} MiB",
            self.weights_mib, self.kv_cache_mib, self.overhead_mib, self.total_mib
        )
    }
}

/// A GGUF metadata value, reduced to what estimation needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GgufValue {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// Any float type.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

impl GgufValue {
    fn as_u64(&self) -> Option<u64> {
        match self {
            GgufValue::U64(value) => Some(*value),
            GgufValue::I64(value) => u64::try_from(*value).ok(),
            GgufValue::F64(_) | GgufValue::Bool(_) | GgufValue::Str(_) => None,
        }
    }
}

/// Bytes per parameter of a Hugging Face `torch_dtype` string.
pub fn dtype_bytes_from_torch_dtype(torch_dtype: &str) -> Option<f64> {
    match torch_dtype {
        "float32" | "fp32" => Some(4.0),
        "float16" | "fp16" | "bfloat16" | "bf16" => Some(2.0),
        "int8" | "float8_e4m3fn" | "float8_e5m2" => Some(1.0),
        _ => None,
    }
}

/// Estimates VRAM from a Hugging Face `config.json` (see the module documentation).
///
/// `dtype_bytes` is the bytes per parameter and per KV element (2.0 for f16); pass 0.0 to
/// take it from the config's `torch_dtype`.
pub fn estimate_from_hf_config(
    config_json: &serde_json::Value,
    dtype_bytes: f64,
    context_tokens: u32,
    concurrent_sequences: u32,
) -> Result<VramEstimate, EstimateError> {
    let hidden = json_u64(config_json, "hidden_size")?;
    let layers = json_u64(config_json, "num_hidden_layers")?;
    let heads = json_u64(config_json, "num_attention_heads")?;
    let kv_heads = match config_json.get("num_key_value_heads") {
        None | Some(serde_json::Value::Null) => heads,
        Some(_) => json_u64(config_json, "num_key_value_heads")?,
    };
    let intermediate = json_u64(config_json, "intermediate_size")?;
    let vocab = json_u64(config_json, "vocab_size")?;
    let tied = config_json.get("tie_word_embeddings").and_then(serde_json::Value::as_bool).unwrap_or(false);
    if heads == 0 {
        return Err(invalid("num_attention_heads", "must be above 0"));
    }
    let head_dim = match config_json.get("head_dim") {
        None | Some(serde_json::Value::Null) => hidden / heads,
        Some(_) => json_u64(config_json, "head_dim")?,
    };
    let dtype_bytes = if dtype_bytes > 0.0 && dtype_bytes.is_finite() {
        dtype_bytes
    } else {
        let torch_dtype = config_json
            .get("torch_dtype")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| EstimateError::MissingKey("torch_dtype".to_owned()))?;
        dtype_bytes_from_torch_dtype(torch_dtype).ok_or_else(|| EstimateError::UnknownDtype(torch_dtype.to_owned()))?
    };
    let kv_dim = kv_heads * head_dim;
    let attention = 2 * hidden * hidden + 2 * hidden * kv_dim;
    let mlp = 3 * hidden * intermediate;
    let norms = 2 * hidden;
    let embeddings = vocab * hidden;
    let lm_head = if tied { 0 } else { vocab * hidden };
    let parameters = embeddings + layers * (attention + mlp + norms) + hidden + lm_head;
    Ok(finish(
        parameters,
        to_f64(parameters) * dtype_bytes,
        kv_cache_bytes(layers, kv_dim, context_tokens, concurrent_sequences, dtype_bytes),
    ))
}

/// Estimates VRAM from GGUF metadata: the file size is the weight size (it is already
/// quantised), and the KV cache holds `kv_dtype_bytes` per element.
///
/// Reads `general.architecture`, then `{arch}.block_count`, `{arch}.embedding_length`,
/// `{arch}.attention.head_count` and `{arch}.attention.head_count_kv` (defaults to the
/// head count); `general.parameter_count` is optional (0 when absent).
pub fn estimate_from_gguf_metadata(
    metadata: &BTreeMap<String, GgufValue>,
    file_bytes: u64,
    context_tokens: u32,
    concurrent_sequences: u32,
    kv_dtype_bytes: f64,
) -> Result<VramEstimate, EstimateError> {
    let architecture = match metadata.get("general.architecture") {
        Some(GgufValue::Str(architecture)) => architecture.clone(),
        Some(_) => return Err(invalid("general.architecture", "must be a string")),
        None => return Err(EstimateError::MissingKey("general.architecture".to_owned())),
    };
    let layers = gguf_u64(metadata, &format!("{architecture}.block_count"))?;
    let embedding = gguf_u64(metadata, &format!("{architecture}.embedding_length"))?;
    let heads_key = format!("{architecture}.attention.head_count");
    let heads = gguf_u64(metadata, &heads_key)?;
    if heads == 0 {
        return Err(invalid(&heads_key, "must be above 0"));
    }
    let kv_heads_key = format!("{architecture}.attention.head_count_kv");
    let kv_heads = if metadata.contains_key(&kv_heads_key) { gguf_u64(metadata, &kv_heads_key)? } else { heads };
    let parameters = metadata.get("general.parameter_count").and_then(GgufValue::as_u64).unwrap_or(0);
    let kv_dim = kv_heads * (embedding / heads);
    Ok(finish(
        parameters,
        to_f64(file_bytes),
        kv_cache_bytes(layers, kv_dim, context_tokens, concurrent_sequences, kv_dtype_bytes),
    ))
}

fn kv_cache_bytes(layers: u64, kv_dim: u64, context_tokens: u32, concurrent_sequences: u32, dtype_bytes: f64) -> f64 {
    2.0 * to_f64(layers) * to_f64(kv_dim) * f64::from(context_tokens) * f64::from(concurrent_sequences) * dtype_bytes
}

fn finish(parameters: u64, weights_bytes: f64, kv_cache_bytes: f64) -> VramEstimate {
    let weights_mib = mib_ceil(weights_bytes);
    let kv_cache_mib = mib_ceil(kv_cache_bytes);
    let overhead_mib = mib_ceil((weights_bytes + kv_cache_bytes) * OVERHEAD_FRACTION) + OVERHEAD_FIXED_MIB;
    VramEstimate {
        parameters,
        weights_mib,
        kv_cache_mib,
        overhead_mib,
        total_mib: weights_mib + kv_cache_mib + overhead_mib,
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn mib_ceil(bytes: f64) -> u64 {
    (bytes / MIB).ceil().max(0.0) as u64
}

#[allow(clippy::cast_precision_loss)]
fn to_f64(value: u64) -> f64 {
    value as f64
}

fn invalid(key: &str, why: &str) -> EstimateError {
    EstimateError::InvalidKey { key: key.to_owned(), why: why.to_owned() }
}

fn json_u64(config_json: &serde_json::Value, key: &str) -> Result<u64, EstimateError> {
    let value = config_json.get(key).ok_or_else(|| EstimateError::MissingKey(key.to_owned()))?;
    value.as_u64().ok_or_else(|| invalid(key, "must be a non-negative integer"))
}

fn gguf_u64(metadata: &BTreeMap<String, GgufValue>, key: &str) -> Result<u64, EstimateError> {
    metadata
        .get(key)
        .ok_or_else(|| EstimateError::MissingKey(key.to_owned()))?
        .as_u64()
        .ok_or_else(|| invalid(key, "must be a non-negative integer"))
}
