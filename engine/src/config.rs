//! The shape of a Llama-family decoder (`llama`, `mistral`, `qwen2`), read from a Hugging
//! Face `config.json` or from GGUF metadata.

use std::path::Path;

use serde_json::Value;

use crate::error::{EngineError, Result};

/// The decoder architectures this engine runs. All three share one forward pass; Qwen2
/// adds biases to the q/k/v projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// The architecture a `model_type`, `architectures[0]` or GGUF `general.architecture`
    /// names, if this engine runs it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Some(Architecture::Llama),
            "mistral" | "mistralforcausallm" => Some(Architecture::Mistral),
            "qwen2" | "qwen2forcausallm" => Some(Architecture::Qwen2),
            _ => None,
        }
    }
}

/// How rotary frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling of the low frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
    /// Per-frequency divisors, as GGUF's `rope_freqs.weight` holds them.
    Divisors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// True for GGUF Llama files, whose q/k rows llama.cpp permuted so that rotary pairs
    /// are adjacent (`rope_i`); Hugging Face weights rotate the two halves (`rope`).
    pub rope_interleaved: bool,
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 has biases on q, k and v.
    pub attention_bias: bool,
    pub tiny_random: bool,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` value.
    pub fn from_hf(path: &Path, config: &Value) -> Result<Self> {
        let field = |key: &str| -> Result<usize> {
            config
                .get(key)
                .and_then(Value::as_u64)
                .and_then(|value| usize::try_from(value).ok())
                .ok_or_else(|| EngineError::load(path, format!("config.json has no integer {key}")))
        };
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or_default();
        let architecture = Architecture::from_name(model_type)
            .or_else(|| {
                config
                    .get("architectures")
                    .and_then(|list| list.get(0))
                    .and_then(Value::as_str)
                    .and_then(Architecture::from_name)
            })
            .ok_or_else(|| {
                EngineError::load(
                    path,
                    format!("model_type {model_type:?} is not supported: use a llama, mistral or qwen2 model"),
                )
            })?;
        let hidden = field("hidden_size")?;
        let heads = field("num_attention_heads")?;
        let kv_heads = field("num_key_value_heads").unwrap_or(heads);
        let head_dim = config
            .get("head_dim")
            .and_then(Value::as_u64)
            .and_then(|value| usize::try_from(value).ok())
            .unwrap_or(hidden / heads.max(1));
        let mut context_length = field("max_position_embeddings").unwrap_or(4096);
        // This engine has no sliding-window attention: Mistral's window bounds the context
        // it serves exactly.
        if architecture == Architecture::Mistral
            && let Some(window) = config.get("sliding_window").and_then(Value::as_u64)
        {
            context_length = context_length.min(usize::try_from(window).unwrap_or(usize::MAX));
        }
        let (rope_scaling, scaled_context) = rope_scaling_from_hf(path, config.get("rope_scaling"))?;
        if let Some(original) = scaled_context {
            context_length = context_length.min(original);
        }
        let config = ModelConfig {
            architecture,
            hidden,
            layers: field("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            intermediate: field("intermediate_size")?,
            vocab: field("vocab_size")?,
            rms_norm_eps: config.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta: config.get("rope_theta").and_then(Value::as_f64).unwrap_or(10_000.0),
            rope_scaling,
            rope_interleaved: false,
            context_length,
            tie_word_embeddings: config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            attention_bias: architecture == Architecture::Qwen2
                || config.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            tiny_random: config.get("maas_tiny_random").and_then(Value::as_bool).unwrap_or(false),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks that the numbers fit together, naming the one that does not.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let fail = |reason: String| Err(EngineError::load(path, reason));
        if self.hidden == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 || self.vocab == 0 {
            return fail("hidden size, layers, heads, kv heads and vocab must all be positive".into());
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return fail(format!("{} attention heads do not split into {} kv heads", self.heads, self.kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return fail(format!("head dimension {} is odd; rotary embeddings need it even", self.head_dim));
        }
        if self.context_length == 0 {
            return fail("the context length is 0".into());
        }
        Ok(())
    }

    /// Parameters of the weights (embeddings counted once when tied).
    pub fn parameters(&self) -> u64 {
        let hidden = self.hidden as u64;
        let q = (self.heads * self.head_dim) as u64;
        let kv = (self.kv_heads * self.head_dim) as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let per_layer = hidden * (q + 2 * kv) + bias + q * hidden + 3 * hidden * self.intermediate as u64 + 2 * hidden;
        let embeddings = self.vocab as u64 * hidden;
        let head = if self.tie_word_embeddings { 0 } else { embeddings };
        embeddings + self.layers as u64 * per_layer + hidden + head
    }
}

/// Returns the scaling and, for kinds this engine does not implement beyond the
/// original context, that original context (the engine then serves only that much).
fn rope_scaling_from_hf(path: &Path, scaling: Option<&Value>) -> Result<(RopeScaling, Option<usize>)> {
    let Some(scaling) = scaling.filter(|value| value.is_object()) else {
        return Ok((RopeScaling::None, None));
    };
    let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("default");
    let number = |key: &str| scaling.get(key).and_then(Value::as_f64);
    let factor = number("factor").unwrap_or(1.0);
    match kind {
        "default" => Ok((RopeScaling::None, None)),
        "linear" => Ok((RopeScaling::Linear { factor }, None)),
        "llama3" => Ok((
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: number("low_freq_factor").unwrap_or(1.0),
                high_freq_factor: number("high_freq_factor").unwrap_or(4.0),
                original_context: number("original_max_position_embeddings").unwrap_or(8192.0),
            },
            None,
        )),
        other => {
            let original = scaling
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .and_then(|value| usize::try_from(value).ok())
                .ok_or_else(|| {
                    EngineError::load(
                        path,
                        format!("rope_scaling type {other:?} is not supported and names no original context length"),
                    )
                })?;
            tracing::warn!(
                kind = other,
                original,
                "rope scaling of this kind is not implemented: serving only the original context length"
            );
            Ok((RopeScaling::None, Some(original)))
        }
    }
}

/// Inverse rotary frequencies, one per pair of a head's dimensions.
// Frequencies are computed in f64 and stored as f32, as the reference implementations do.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
pub fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let half = config.head_dim / 2;
    (0..half)
        .map(|i| {
            let base = 1.0 / config.rope_theta.powf((2 * i) as f64 / config.head_dim as f64);
            let scaled = match &config.rope_scaling {
                RopeScaling::None => base,
                RopeScaling::Linear { factor } => base / factor,
                RopeScaling::Divisors(divisors) => base / f64::from(divisors.get(i).copied().unwrap_or(1.0)),
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
                    let low_wavelength = original_context / low_freq_factor;
                    let high_wavelength = original_context / high_freq_factor;
                    let wavelength = 2.0 * std::f64::consts::PI / base;
                    if wavelength < high_wavelength {
                        base
                    } else if wavelength > low_wavelength {
                        base / factor
                    } else {
                        let smooth =
                            (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * base / factor + smooth * base
                    }
                }
            };
            scaled as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &Value) -> Result<ModelConfig> {
        let mut value = serde_json::json!({
            "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128_256,
            "max_position_embeddings": 131_072, "rope_theta": 500_000.0, "tie_word_embeddings": false,
        });
        if let (Some(value), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
            value.extend(extra.clone());
        }
        ModelConfig::from_hf(Path::new("m"), &value)
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let plain = config(&serde_json::json!({})).unwrap();
        let scaled = config(&serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
        .unwrap();
        let (plain, scaled) = (inverse_frequencies(&plain), inverse_frequencies(&scaled));
        assert_eq!(plain.len(), 64);
        assert!((scaled[0] - plain[0]).abs() < 1e-9, "short wavelengths are kept");
        assert!((scaled[63] * 8.0 - plain[63]).abs() < 1e-12, "long wavelengths are divided by the factor");
        assert!(scaled[32] < plain[32] && scaled[32] > plain[32] / 8.0, "between them, a blend");
    }

    #[test]
    fn unsupported_scaling_serves_the_original_context_and_mistral_its_window() {
        let yarn = config(&serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32768}}))
        .unwrap();
        assert_eq!((yarn.context_length, &yarn.rope_scaling), (32768, &RopeScaling::None));
        let mistral = config(&serde_json::json!({"model_type": "mistral", "sliding_window": 4096})).unwrap();
        assert_eq!((mistral.architecture, mistral.context_length), (Architecture::Mistral, 4096));
        let error = config(&serde_json::json!({"model_type": "falcon"})).unwrap_err().to_string();
        assert!(error.contains("not supported"), "{error}");
    }
}
