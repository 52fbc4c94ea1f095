//! VRAM estimation against known figures.

// The expected figures are computed in floating point, as the estimator does.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::collections::BTreeMap;

use maas_scheduler::{EstimateError, GgufValue, estimate_from_gguf_metadata, estimate_from_hf_config};
use serde_json::json;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn llama2_7b() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "tie_word_embeddings": false,
        "torch_dtype": "float16"
    })
}

#[test]
fn llama2_7b_parameters_weights_and_kv_cache() {
    let estimate = estimate_from_hf_config(&llama2_7b(), 2.0, 4096, 1).unwrap();
    assert_eq!(estimate.parameters, 6_738_415_616);
    // 6,738,415,616 parameters * 2 bytes = 12.55 GiB.
    let weights_gib = estimate.weights_mib as f64 / 1024.0;
    assert!((weights_gib - 12.55).abs() < 0.01, "{weights_gib}");
    // 2 * 32 layers * 32 heads * 128 * 4096 tokens * 2 bytes = 2 GiB exactly.
    assert_eq!(estimate.kv_cache_mib, 2048);
    let expected_overhead =
        ((estimate.parameters as f64 * 2.0 + 2.0 * GIB) * 0.1 / 1024.0 / 1024.0).ceil() as u64 + 512;
    assert_eq!(estimate.overhead_mib, expected_overhead);
    assert_eq!(estimate.total_mib, estimate.weights_mib + estimate.kv_cache_mib + estimate.overhead_mib);
    let shown = estimate.to_string();
    assert!(shown.starts_with("6.74 B parameters: 12853 MiB weights + 2048 MiB kv cache"), "{shown}");
}

#[test]
fn dtype_comes_from_torch_dtype_when_not_given() {
    let given = estimate_from_hf_config(&llama2_7b(), 2.0, 1024, 2).unwrap();
    let from_config = estimate_from_hf_config(&llama2_7b(), 0.0, 1024, 2).unwrap();
    assert_eq!(given, from_config);
    let mut config = llama2_7b();
    config["torch_dtype"] = json!("float4_magic");
    assert_eq!(
        estimate_from_hf_config(&config, 0.0, 1024, 1).unwrap_err(),
        EstimateError::UnknownDtype("float4_magic".into())
    );
}

#[test]
fn qwen2_half_b_with_gqa_and_tied_embeddings() {
    let config = json!({
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151_936,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16"
    });
    let estimate = estimate_from_hf_config(&config, 2.0, 32768, 1).unwrap();
    assert!((490_000_000..=500_000_000).contains(&estimate.parameters), "{}", estimate.parameters);
    // 2 * 24 layers * 2 kv heads * 64 * 32768 tokens * 2 bytes = 384 MiB.
    assert_eq!(estimate.kv_cache_mib, 384);
}

#[test]
fn missing_keys_are_named() {
    for key in ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"] {
        let mut config = llama2_7b();
        config.as_object_mut().unwrap().remove(key);
        let error = estimate_from_hf_config(&config, 2.0, 4096, 1).unwrap_err();
        assert_eq!(error, EstimateError::MissingKey(key.into()));
        assert!(error.to_string().contains(key));
    }
    let mut config = llama2_7b();
    config["hidden_size"] = json!("big");
    assert!(matches!(
        estimate_from_hf_config(&config, 2.0, 4096, 1),
        Err(EstimateError::InvalidKey { key, .. }) if key == "hidden_size"
    ));
}

fn gguf_llama() -> BTreeMap<String, GgufValue> {
    [
        ("general.architecture", GgufValue::Str("llama".into())),
        ("llama.block_count", GgufValue::U64(32)),
        ("llama.embedding_length", GgufValue::U64(4096)),
        ("llama.attention.head_count", GgufValue::U64(32)),
        ("llama.attention.head_count_kv", GgufValue::U64(8)),
        ("general.parameter_count", GgufValue::U64(8_030_261_248)),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect()
}

#[test]
fn gguf_uses_the_file_size_as_weights() {
    let file_bytes = 4_920_000_000;
    let estimate = estimate_from_gguf_metadata(&gguf_llama(), file_bytes, 8192, 1, 2.0).unwrap();
    assert_eq!(estimate.parameters, 8_030_261_248);
    assert_eq!(estimate.weights_mib, file_bytes.div_ceil(1024 * 1024));
    // 2 * 32 layers * 8 kv heads * 128 * 8192 tokens * 2 bytes = 1 GiB.
    assert_eq!(estimate.kv_cache_mib, 1024);
}

#[test]
fn gguf_missing_keys_are_named() {
    let mut metadata = gguf_llama();
    metadata.remove("llama.block_count");
    assert_eq!(
        estimate_from_gguf_metadata(&metadata, 1, 1, 1, 2.0).unwrap_err(),
        EstimateError::MissingKey("llama.block_count".into())
    );
    let mut metadata = gguf_llama();
    metadata.remove("general.architecture");
    let error = estimate_from_gguf_metadata(&metadata, 1, 1, 1, 2.0).unwrap_err();
    assert_eq!(
        error.to_string(),
        "model config is missing general.architecture; add it to the config or give the memory by hand"
    );
    // The kv head count defaults to the head count.
    let mut metadata = gguf_llama();
    metadata.remove("llama.attention.head_count_kv");
    let estimate = estimate_from_gguf_metadata(&metadata, 1, 8192, 1, 2.0).unwrap();
    assert_eq!(estimate.kv_cache_mib, 4096);
}

/// Published parameter counts of real models (their model cards and safetensors
/// indexes), estimated from their `config.json` in bf16. Qwen2.5 has q/k/v biases, which
/// the estimator leaves out: a few hundred thousand parameters, under 0.1 %.
#[test]
fn known_models_match_their_published_sizes_in_bf16() {
    let table = [
        (
            "Llama-3-8B",
            json!({"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "intermediate_size": 14336, "vocab_size": 128_256, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}),
            8_030_261_248_u64,
        ),
        (
            "Qwen2.5-7B",
            json!({"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "intermediate_size": 18944, "vocab_size": 152_064, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}),
            7_615_616_512,
        ),
        (
            "Qwen2.5-0.5B",
            json!({"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "intermediate_size": 4864, "vocab_size": 151_936, "tie_word_embeddings": true, "torch_dtype": "bfloat16"}),
            494_032_768,
        ),
    ];
    for (name, config, published) in table {
        let estimate = estimate_from_hf_config(&config, 0.0, 4096, 1).unwrap();
        let error = (estimate.parameters as f64 - published as f64).abs() / published as f64;
        assert!(error < 0.001, "{name}: estimated {} parameters, published {published}", estimate.parameters);
        let weights_mib = (estimate.parameters * 2).div_ceil(1024 * 1024);
        assert_eq!(estimate.weights_mib, weights_mib, "{name}: bf16 weights are 2 bytes a parameter");
        assert!(estimate.total_mib > estimate.weights_mib + estimate.kv_cache_mib, "{name}: overhead is counted");
    }
}

/// A 4-bit GGUF of Qwen2.5-7B (Q4_K_M, 4.68 GB): the weights are the file.
#[test]
fn a_four_bit_gguf_weighs_what_its_file_weighs() {
    let metadata: BTreeMap<String, GgufValue> = [
        ("general.architecture", GgufValue::Str("qwen2".into())),
        ("qwen2.block_count", GgufValue::U64(28)),
        ("qwen2.embedding_length", GgufValue::U64(3584)),
        ("qwen2.attention.head_count", GgufValue::U64(28)),
        ("qwen2.attention.head_count_kv", GgufValue::U64(4)),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    let file_bytes = 4_683_073_184;
    let estimate = estimate_from_gguf_metadata(&metadata, file_bytes, 32_768, 1, 2.0).unwrap();
    assert_eq!(estimate.weights_mib, file_bytes.div_ceil(1024 * 1024));
    // 2 * 28 layers * 4 kv heads * 128 * 32768 tokens * 2 bytes (f16 cache) = 1792 MiB.
    assert_eq!(estimate.kv_cache_mib, 1792);
    assert!(estimate.total_mib < 8 * 1024, "a 4-bit 7B model with a 32k context fits an 8 GiB GPU: {estimate}");
}
