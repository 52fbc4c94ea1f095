//! Model files on disk: a tiny Llama written by `tiny::write_llama` reads back whole; a
//! GGUF header's metadata is read; truncated, missing and foreign files are refused with
//! a reason.

use std::path::Path;

use maas_engine::model_files::{GgufMetadataValue, ModelFilesError, ModelFormat, inspect, inspect_headers};
use maas_engine::tiny::{TinyShape, write_llama};

#[test]
fn a_tiny_llama_reads_back_whole_and_the_same_seed_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    write_llama(&dir.path().join("a"), TinyShape::default(), 9).unwrap();
    write_llama(&dir.path().join("b"), TinyShape::default(), 9).unwrap();
    let files = inspect(&dir.path().join("a")).unwrap();
    assert_eq!(files.format, ModelFormat::Safetensors);
    assert_eq!(files.architecture().as_deref(), Some("LlamaForCausalLM"));
    // Embeddings, 9 tensors per layer, the final norm and the head.
    assert_eq!(files.tensors, 1 + 9 * 2 + 1 + 1);
    assert!(files.files.contains_key("tokenizer.json") && files.files.contains_key("model.safetensors"));
    assert_eq!(files.config.as_ref().unwrap()["maas_tiny_random"], true, "labelled as a tiny random model");
    let a = std::fs::read(dir.path().join("a/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("b/model.safetensors")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn damaged_or_incomplete_models_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let fresh = || {
        let _ = std::fs::remove_dir_all(&model);
        write_llama(&model, TinyShape::default(), 1).unwrap();
    };
    let refused = |reason: &str| {
        let error = inspect(&model).unwrap_err().to_string();
        assert!(error.contains(reason), "{error:?} should say {reason:?}");
    };

    fresh();
    let weights = model.join("model.safetensors");
    let length = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(length - 4).unwrap();
    refused("truncated");
    assert!(inspect_headers(&model).is_err(), "the sizes alone show it");

    fresh();
    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}").unwrap();
    refused("header length");

    fresh();
    std::fs::write(model.join("config.json"), b"{ not json").unwrap();
    refused("not valid JSON");

    fresh();
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    refused("tokenizer.json is missing");

    fresh();
    std::fs::remove_file(&weights).unwrap();
    refused("no *.safetensors");

    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "hello").unwrap();
    assert!(matches!(inspect(&other), Err(ModelFilesError::NotAModel { .. })));
    assert!(matches!(inspect(Path::new("/nonexistent/model")), Err(ModelFilesError::Io { .. })));
}

/// A GGUF v3 file with the given metadata and no tensors.
fn write_gguf(path: &Path, metadata: &[(&str, u32, Vec<u8>)]) {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((metadata.len() as u64).to_le_bytes());
    for (key, kind, value) in metadata {
        bytes.extend((key.len() as u64).to_le_bytes());
        bytes.extend(key.as_bytes());
        bytes.extend(kind.to_le_bytes());
        bytes.extend(value);
    }
    std::fs::write(path, bytes).unwrap();
}

fn gguf_string(text: &str) -> Vec<u8> {
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text.as_bytes());
    bytes
}

#[test]
fn gguf_metadata_is_read_and_a_bad_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let mut tokens = 8u32.to_le_bytes().to_vec(); // an array of strings (type 8)
    tokens.extend(2u64.to_le_bytes());
    tokens.extend(gguf_string("a"));
    tokens.extend(gguf_string("b"));
    write_gguf(
        &path,
        &[
            ("general.architecture", 8, gguf_string("qwen2")),
            ("qwen2.block_count", 4, 28u32.to_le_bytes().to_vec()),
            ("qwen2.attention.head_count_kv", 10, 4u64.to_le_bytes().to_vec()),
            ("qwen2.rope.freq_base", 6, 1_000_000f32.to_le_bytes().to_vec()),
            ("tokenizer.ggml.tokens", 9, tokens),
        ],
    );
    let files = inspect(&path).unwrap();
    assert_eq!(files.format, ModelFormat::Gguf);
    assert_eq!(files.architecture().as_deref(), Some("qwen2"));
    assert_eq!(files.gguf_metadata["qwen2.block_count"], GgufMetadataValue::Unsigned(28));
    assert_eq!(files.gguf_metadata["qwen2.attention.head_count_kv"], GgufMetadataValue::Unsigned(4));
    assert_eq!(files.gguf_metadata["tokenizer.ggml.tokens"], GgufMetadataValue::Array { items: 2 });

    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    assert!(inspect(&path).unwrap_err().to_string().contains("truncated"));
    std::fs::write(&path, b"GGML....").unwrap();
    assert!(inspect(&path).unwrap_err().to_string().contains("magic"));
}
