//! The VRAM a replica of a model on disk will need, shown to the user before deploying:
//! the model's config or GGUF metadata ([`maas_engine::model_files::inspect_headers`]) put
//! through the scheduler's estimate ([`maas_scheduler::estimate`]).

use std::collections::BTreeMap;
use std::path::Path;

use maas_engine::model_files::{GgufMetadataValue, ModelFiles, ModelFormat, inspect_headers};
use maas_scheduler::estimate::{GgufValue, VramEstimate, estimate_from_gguf_metadata, estimate_from_hf_config};
use serde::Serialize;

/// An estimate and what it was made from.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEstimate {
    pub format: ModelFormat,
    pub architecture: Option<String>,
    pub total_bytes: u64,
    pub context_tokens: u32,
    pub concurrent_sequences: u32,
    pub estimate: VramEstimate,
}

/// Reads the headers of the model at `path` and estimates one replica's memory for
/// `context_tokens` per sequence and `concurrent_sequences`; `dtype_bytes` 0.0 takes the
/// config's dtype. Errors say what to fix (or to give the memory by hand).
pub fn estimate_model(
    path: &Path,
    context_tokens: u32,
    concurrent_sequences: u32,
    dtype_bytes: f64,
) -> Result<ModelEstimate, String> {
    let files: ModelFiles = inspect_headers(path).map_err(|err| err.to_string())?;
    let estimate = match files.format {
        ModelFormat::Safetensors => {
            let config = files.config.as_ref().ok_or("the model has no config.json")?;
            estimate_from_hf_config(config, dtype_bytes, context_tokens, concurrent_sequences)
        }
        ModelFormat::Gguf => {
            let metadata: BTreeMap<String, GgufValue> = files
                .gguf_metadata
                .iter()
                .filter_map(|(key, value)| {
                    let value = match value {
                        GgufMetadataValue::Unsigned(v) => GgufValue::U64(*v),
                        GgufMetadataValue::Signed(v) => GgufValue::I64(*v),
                        GgufMetadataValue::Float(v) => GgufValue::F64(*v),
                        GgufMetadataValue::Bool(v) => GgufValue::Bool(*v),
                        GgufMetadataValue::Str(v) => GgufValue::Str(v.clone()),
                        GgufMetadataValue::Array { .. } => return None,
                    };
                    Some((key.clone(), value))
                })
                .collect();
            estimate_from_gguf_metadata(&metadata, files.total_bytes, context_tokens, concurrent_sequences)
        }
    }
    .map_err(|err| format!("{}: {err}", path.display()))?;
    Ok(ModelEstimate {
        format: files.format,
        architecture: files.architecture(),
        total_bytes: files.total_bytes,
        context_tokens,
        concurrent_sequences,
        estimate,
    })
}
