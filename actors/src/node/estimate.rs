//! The VRAM a replica will need, shown to the user before deploying: the model's config or
//! GGUF metadata, as [`crate::models::metadata_of`] records it, put through the
//! scheduler's estimate ([`maas_scheduler::estimate`]). A model on disk and a version of
//! the repository go through the same path.

use std::collections::BTreeMap;
use std::path::Path;

use maas_engine::model_files::{ModelFormat, inspect_headers};
use maas_scheduler::estimate::{GgufValue, VramEstimate, estimate_from_gguf_metadata, estimate_from_hf_config};
use maas_store::repo::models::ModelMetadata;
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
/// `context_tokens` per sequence and `concurrent_sequences`; `dtype_bytes` 0.0 counts what
/// the engine holds (f32, [`maas_engine::HELD_DTYPE_BYTES`]). Errors say what to fix (or to give the memory by hand).
pub fn estimate_model(
    path: &Path,
    context_tokens: u32,
    concurrent_sequences: u32,
    dtype_bytes: f64,
) -> Result<ModelEstimate, String> {
    let files = inspect_headers(path).map_err(|err| err.to_string())?;
    let metadata = crate::models::metadata_of(&files);
    estimate(&metadata, files.total_bytes, context_tokens, concurrent_sequences, dtype_bytes)
        .map_err(|err| format!("{}: {err}", path.display()))
}

/// As [`estimate_model`], for a version in the model repository: from the config it
/// recorded, with no file needed on this node.
pub fn estimate_version(
    record: &maas_store::repo::models::ModelVersionRecord,
    context_tokens: u32,
    concurrent_sequences: u32,
) -> Result<ModelEstimate, String> {
    estimate(&record.metadata, record.total_bytes, context_tokens, concurrent_sequences, 0.0)
        .map_err(|err| format!("{}:{}: {err}", record.name, record.version))
}

fn estimate(
    metadata: &ModelMetadata,
    total_bytes: u64,
    context_tokens: u32,
    concurrent_sequences: u32,
    dtype_bytes: f64,
) -> Result<ModelEstimate, String> {
    let config = &metadata.config;
    let (format, estimate) = if metadata.format == "gguf" {
        // The recorded GGUF metadata: scalars as JSON values.
        let gguf: BTreeMap<String, GgufValue> = config
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
        // The engine's KV cache is f32 whatever the file's types.
        let kv_bytes = maas_engine::HELD_DTYPE_BYTES;
        (
            ModelFormat::Gguf,
            estimate_from_gguf_metadata(&gguf, total_bytes, context_tokens, concurrent_sequences, kv_bytes),
        )
    } else {
        // The engine holds safetensors weights and the KV cache in f32 (a bf16 model takes
        // twice its file size): unless told otherwise, count what it will hold.
        let dtype_bytes = if dtype_bytes > 0.0 { dtype_bytes } else { maas_engine::HELD_DTYPE_BYTES };
        (ModelFormat::Safetensors, estimate_from_hf_config(config, dtype_bytes, context_tokens, concurrent_sequences))
    };
    Ok(ModelEstimate {
        format,
        architecture: Some(metadata.architecture.clone()),
        total_bytes,
        context_tokens,
        concurrent_sequences,
        estimate: estimate.map_err(|err| err.to_string())?,
    })
}
