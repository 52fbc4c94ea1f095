//! Model files on disk: a tiny Llama written by `tiny::write_llama` reads back whole; a
//! GGUF header's metadata and tensor infos are read; truncated, missing and foreign files
//! are refused with a reason; of a Hugging Face download only the files the model needs
//! are selected; the engine's loaders are named for each architecture.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use maas_engine::config::Architecture;
use maas_engine::model_files::{
    GgufMetadataValue, ModelFilesError, ModelFormat, Served, engine_support, ggml_type_name, inspect, inspect_headers,
    is_encoder, select_folder, select_model_files,
};
use maas_engine::tiny::{GgufWeights, TinyShape, write_gguf_llama, write_llama};
use serde_json::json;

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

fn shards(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

// The file lists of real Hugging Face repositories, as `huggingface-cli download` leaves
// them, and what an import keeps of each.

#[test]
fn a_mistral_download_keeps_the_shards_its_index_names_and_not_the_consolidated_copy() {
    // mistralai/Mistral-7B-Instruct-v0.3: the sharded weights and a 14.5 GB consolidated copy.
    let mistral = [
        ".gitattributes",
        "README.md",
        "config.json",
        "consolidated.safetensors",
        "generation_config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "params.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer.model.v3",
        "tokenizer_config.json",
    ];
    let index = shards(&[
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]);
    let selection = select_model_files(&mistral, Some(&index));
    assert_eq!(
        selection.needed,
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    );
    let skipped: BTreeMap<&str, &str> = selection.skipped.iter().map(|s| (s.path.as_str(), s.reason)).collect();
    assert_eq!(
        skipped.keys().copied().collect::<Vec<_>>(),
        [".gitattributes", "consolidated.safetensors", "params.json", "tokenizer.model.v3"]
    );
    assert!(skipped["consolidated.safetensors"].contains("consolidated copy"), "{skipped:?}");
}

#[test]
fn a_llama_download_leaves_metas_original_checkpoint_out() {
    // meta-llama/Llama-3.1-8B-Instruct: Meta's original checkpoint under original/.
    let llama = [
        "LICENSE",
        "README.md",
        "USE_POLICY.md",
        "config.json",
        "generation_config.json",
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
        "original/consolidated.00.pth",
        "original/params.json",
        "original/tokenizer.model",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    let index = shards(&llama[5..9]);
    let selection = select_model_files(&llama, Some(&index));
    assert!(selection.needed.iter().all(|path| !path.starts_with("original/")), "{selection:?}");
    assert_eq!(selection.needed.len(), llama.len() - 3);
    assert!(selection.skipped.iter().all(|s| s.reason.contains("original checkpoint")), "{selection:?}");
}

#[test]
fn sentence_transformers_downloads_keep_their_pooling_and_leave_other_frameworks_out() {
    // BAAI/bge-small-en-v1.5: PyTorch and ONNX copies; the pooling module is kept.
    let bge = [
        "1_Pooling/config.json",
        "README.md",
        "config.json",
        "config_sentence_transformers.json",
        "model.safetensors",
        "modules.json",
        "onnx/model.onnx",
        "pytorch_model.bin",
        "sentence_bert_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ];
    let selection = select_model_files(&bge, None);
    let skipped: BTreeMap<&str, &str> = selection.skipped.iter().map(|s| (s.path.as_str(), s.reason)).collect();
    assert_eq!(skipped.keys().copied().collect::<Vec<_>>(), ["onnx/model.onnx", "pytorch_model.bin"]);
    assert!(skipped["pytorch_model.bin"].contains("PyTorch"));
    assert!(selection.needed.contains(&"1_Pooling/config.json".to_owned()));
    assert!(selection.needed.contains(&"model.safetensors".to_owned()));

    // sentence-transformers/all-MiniLM-L6-v2: every framework's copy, and remote code.
    let minilm = [
        "1_Pooling/config.json",
        "config.json",
        "data_config.json",
        "model.safetensors",
        "modules.json",
        "openvino/openvino_model.bin",
        "openvino/openvino_model.xml",
        "rust_model.ot",
        "sentence_bert_config.json",
        "tf_model.h5",
        "tokenizer.json",
        "flax_model.msgpack",
        "train_script.py",
    ];
    let selection = select_model_files(&minilm, None);
    let reasons: BTreeMap<&str, &str> = selection.skipped.iter().map(|s| (s.path.as_str(), s.reason)).collect();
    for (path, says) in [
        ("openvino/openvino_model.bin", "another runtime"),
        ("rust_model.ot", "rust-bert"),
        ("tf_model.h5", "TensorFlow"),
        ("flax_model.msgpack", "Flax"),
        ("train_script.py", "remote code"),
        ("data_config.json", "not a file the model needs"),
    ] {
        assert!(reasons.get(path).is_some_and(|reason| reason.contains(says)), "{path}: {reasons:?}");
    }
    assert_eq!(
        selection.needed,
        [
            "1_Pooling/config.json",
            "config.json",
            "model.safetensors",
            "modules.json",
            "sentence_bert_config.json",
            "tokenizer.json"
        ]
    );
}

#[test]
fn weights_are_those_the_index_names_or_without_one_the_folders_own() {
    // Without an index, an only-child safetensors of another name is still the weights.
    let selection = select_model_files(&["config.json", "tokenizer.json", "weights.safetensors"], None);
    assert_eq!(selection.needed, ["config.json", "tokenizer.json", "weights.safetensors"]);
    // With one, weights it does not name are left out.
    let selection = select_model_files(
        &["model.safetensors.index.json", "a.safetensors", "b.safetensors"],
        Some(&shards(&["a.safetensors"])),
    );
    assert_eq!(selection.skipped.len(), 1);
    assert!(selection.skipped[0].reason.contains("does not name"));
}

#[test]
fn a_download_with_decoy_copies_of_the_weights_reads_as_its_model_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_llama(&model, TinyShape::default(), 2).unwrap();
    let alone = inspect(&model).unwrap();
    // The decoys are not weights the model check could read: were they taken as weights,
    // the check would fail.
    std::fs::write(model.join("consolidated.safetensors"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(model.join("pytorch_model.bin"), vec![7u8; 1 << 10]).unwrap();
    std::fs::create_dir_all(model.join("original")).unwrap();
    std::fs::write(model.join("original/consolidated.00.pth"), vec![7u8; 1 << 10]).unwrap();
    std::fs::create_dir_all(model.join("1_Pooling")).unwrap();
    std::fs::write(model.join("1_Pooling/config.json"), br#"{"pooling_mode_cls_token": true}"#).unwrap();
    std::fs::create_dir_all(model.join(".cache/huggingface")).unwrap();
    std::fs::write(model.join(".cache/huggingface/x.lock"), b"").unwrap();

    let selection = select_folder(&model).unwrap();
    let skipped: Vec<&str> = selection.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(skipped, ["consolidated.safetensors", "original/consolidated.00.pth", "pytorch_model.bin"]);
    assert!(selection.needed.contains(&"1_Pooling/config.json".to_owned()));
    let files = inspect(&model).unwrap();
    assert_eq!((files.tensors, files.parameters), (alone.tensors, alone.parameters));
    assert_eq!(files.files.keys().cloned().collect::<Vec<_>>(), selection.needed, "the check reads what is imported");

    // A corrupt pooling config is found by the check.
    std::fs::write(model.join("1_Pooling/config.json"), b"{ no").unwrap();
    assert!(inspect(&model).unwrap_err().to_string().contains("not valid JSON"));
}

#[test]
fn a_gguf_files_parameters_and_dominant_tensor_type_come_from_its_tensor_infos() {
    let dir = tempfile::tempdir().unwrap();
    write_llama(&dir.path().join("hf"), TinyShape::default(), 1).unwrap();
    let hf = inspect(&dir.path().join("hf")).unwrap();
    for (weights, dominant) in [(GgufWeights::Q8_0, "q8_0"), (GgufWeights::Q4_0, "q4_0"), (GgufWeights::F32, "f32")] {
        let path = dir.path().join(format!("{dominant}.gguf"));
        write_gguf_llama(&path, TinyShape::default(), 1, weights).unwrap();
        for files in [inspect(&path).unwrap(), inspect_headers(&path).unwrap()] {
            assert_eq!(files.parameters, hf.parameters, "the same tensors as the safetensors model");
            assert_eq!(files.gguf_dominant_type(), Some(dominant));
            assert_eq!(files.gguf_tensor_types.values().sum::<u64>(), hf.parameters);
        }
    }
    let q8 = inspect(&dir.path().join("q8_0.gguf")).unwrap();
    assert!(q8.gguf_tensor_types.contains_key("f32"), "the norms stay f32: {:?}", q8.gguf_tensor_types);
    assert_eq!(ggml_type_name(12), "q4_k");
    assert_eq!(ggml_type_name(99), "type_99");
}

#[test]
fn the_engines_loaders_are_named_for_each_architecture() {
    let safetensors = |config: serde_json::Value| engine_support(ModelFormat::Safetensors, &config);
    let served = [
        (json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}), Served::Generator(Architecture::Llama)),
        (json!({"model_type": "mistral"}), Served::Generator(Architecture::Mistral)),
        (json!({"architectures": ["Qwen2ForCausalLM"]}), Served::Generator(Architecture::Qwen2)),
        (json!({"model_type": "bert", "architectures": ["BertModel"]}), Served::Embedder),
        (json!({"architectures": ["BertModel"]}), Served::Embedder),
    ];
    for (config, expected) in served {
        assert_eq!(safetensors(config.clone()).unwrap(), expected, "{config}");
    }
    let refused = [
        (json!({"model_type": "chatglm", "architectures": ["ChatGLMModel"]}), "ChatGLMModel (model_type chatglm)"),
        (json!({"model_type": "glm", "architectures": ["GlmForCausalLM"]}), "GlmForCausalLM (model_type glm)"),
        (json!({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}), "Phi3ForCausalLM"),
        (json!({"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"]}), "XLMRobertaModel"),
        (json!({}), "without architectures or model_type"),
    ];
    for (config, named) in refused {
        let message = safetensors(config.clone()).unwrap_err().to_string();
        assert!(message.contains(named), "{message}");
        assert!(message.contains("llama, mistral and qwen2") && message.contains("bert"), "{message}");
    }
    let gguf = |architecture: &str| engine_support(ModelFormat::Gguf, &json!({"general.architecture": architecture}));
    assert_eq!(gguf("qwen2").unwrap(), Served::Generator(Architecture::Qwen2));
    assert!(gguf("phi3").unwrap_err().to_string().contains("GGUF architecture phi3"));
    assert!(gguf("Llama").is_err(), "the GGUF loader takes llama.cpp's lowercase names only");

    // Encoders embed; a decoder whose class ends in Model does not.
    assert!(is_encoder(&json!({"model_type": "bert"})));
    assert!(is_encoder(&json!({"model_type": "xlm-roberta"})));
    assert!(is_encoder(&json!({"architectures": ["RobertaModel"]})));
    assert!(!is_encoder(&json!({"model_type": "chatglm", "architectures": ["ChatGLMModel"]})));
    assert!(!is_encoder(&json!({"architectures": ["ChatGLMModel"]})));
    assert!(!is_encoder(&json!({"model_type": "llama"})));
}
