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

/// As [`estimate_model`], for a version in the model repository: from the config it
/// recorded (`config.json`, or the GGUF metadata), with no file needed on this node.
pub fn estimate_version(
    record: &maas_store::repo::models::ModelVersionRecord,
    context_tokens: u32,
    concurrent_sequences: u32,
) -> Result<ModelEstimate, String> {
    let config = &record.metadata.config;
    let (format, estimate) = if record.metadata.format == "gguf" {
        let metadata: BTreeMap<String, GgufValue> = config
            .as_object()
            .map(|object| {
                object
                    .iter()
                    .filter_map(|(key, value)| {
                        let value = match value {
                            serde_json::Value::Bool(v) => GgufValue::Bool(*v),
                            serde_json::Value::String(v) => GgufValue::Str(v.clone()),
                            serde_json::Value::Number(n) => n
                                .as_u64()
                                .map(GgufValue::U64)
                                .or_else(|| n.as_i64().map(GgufValue::I64))
                                .or_else(|| n.as_f64().map(GgufValue::F64))?,
                            _ => return None,
                        };
                        Some((key.clone(), value))
                    })
                    .collect()
            })
            .unwrap_or_default();
        (
            ModelFormat::Gguf,
            estimate_from_gguf_metadata(&metadata, record.total_bytes, context_tokens, concurrent_sequences),
        )
    } else {
        (ModelFormat::Safetensors, estimate_from_hf_config(config, 0.0, context_tokens, concurrent_sequences))
    };
    let estimate = estimate.map_err(|err| format!("{}:{}: {err}", record.name, record.version))?;
    Ok(ModelEstimate {
        format,
        architecture: Some(record.metadata.architecture.clone()),
        total_bytes: record.total_bytes,
        context_tokens,
        concurrent_sequences,
        estimate,
    })
}
