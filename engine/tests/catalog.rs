//! The built-in catalogue: every entry is well-formed, unique and consistent with what
//! this engine serves; files built from an entry's own values match it; the tiny random
//! models of `engine::tiny` match no real entry and the first differing value is named;
//! a tiny model given a real entry's identifying config values matches that entry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use maas_engine::catalog::{CatalogEntry, TASKS, check, entries, file_matches, find};
use maas_engine::model_files::{GgufMetadataValue, ModelFiles, ModelFormat, engine_support, inspect_headers};
use maas_engine::tiny::{
    GgufWeights, TinyBertShape, TinyShape, write_bert, write_gguf_llama, write_llama, write_qwen2,
};
use serde_json::json;

/// Models the catalogue must have.
const REQUIRED: &[&str] = &[
    "llama-2-7b-chat",
    "llama-3.1-8b-instruct",
    "llama-3.2-1b-instruct",
    "llama-3.2-3b-instruct",
    "qwen2-0.5b-instruct",
    "qwen2.5-0.5b-instruct",
    "qwen2.5-1.5b-instruct",
    "qwen2.5-7b-instruct",
    "qwen2.5-coder-7b-instruct",
    "qwen2.5-0.5b-instruct-q8_0",
    "mistral-7b-instruct-v0.2",
    "mistral-7b-instruct-v0.3",
    "phi-2",
    "phi-3-mini-4k-instruct",
    "glm-4-9b-chat-hf",
    "tinyllama-1.1b-chat",
    "bge-small-en-v1.5",
    "bge-base-en-v1.5",
    "bge-large-zh-v1.5",
    "all-minilm-l6-v2",
];

#[test]
fn every_entry_is_well_formed_and_unique() {
    let mut names = BTreeSet::new();
    let mut sources = BTreeSet::new();
    assert!(entries().len() >= 30, "the catalogue covers the well-known families");
    for entry in entries() {
        let name = entry.name;
        assert!(names.insert(name), "{name} is listed twice");
        assert!(
            sources.insert((entry.source_repo, entry.source_file)),
            "{name}: another entry has the same source {}",
            entry.source_repo
        );
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')),
            "{name}: catalogue names are lowercase letters, digits, `.`, `-`, `_`"
        );
        for (field, value) in [
            ("display_name", entry.display_name),
            ("family", entry.family),
            ("publisher", entry.publisher),
            ("license", entry.license),
            ("architecture", entry.architecture),
        ] {
            assert!(!value.is_empty(), "{name}: {field} is empty");
        }
        let (owner, repo) = entry.source_repo.split_once('/').expect("a Hugging Face repo id is owner/name");
        assert!(!owner.is_empty() && !repo.is_empty() && !repo.contains('/'), "{name}: {}", entry.source_repo);
        assert!(!entry.tasks.is_empty() && entry.tasks.iter().all(|task| TASKS.contains(task)), "{name}: tasks");
        assert_eq!(entry.tasks.contains(&"embedding"), entry.family == "bert", "{name}: encoders embed");
        assert!(
            !entry.tasks.contains(&"chat") || entry.tasks.contains(&"completion"),
            "{name}: chat implies completion"
        );

        let d = entry.dimensions;
        assert!(d.hidden_size > 0 && d.num_hidden_layers > 0 && d.num_attention_heads > 0, "{name}: dimensions");
        assert_eq!(d.hidden_size % d.num_attention_heads, 0, "{name}: heads divide the hidden size");
        if let Some(kv_heads) = d.num_key_value_heads {
            assert!(kv_heads > 0 && d.num_attention_heads % kv_heads == 0, "{name}: key/value heads group the heads");
        }
        // Parameters: at least the embeddings plus a quarter of the usual 12·h² per layer,
        // at most twice the usual count with an untied head.
        let hidden = d.hidden_size;
        let vocab = d.vocab_size.unwrap_or(32000);
        let low = vocab * hidden + d.num_hidden_layers * 3 * hidden * hidden;
        let high = 2 * (2 * vocab * hidden + d.num_hidden_layers * 16 * hidden * hidden);
        assert!((low..=high).contains(&entry.parameters), "{name}: {} parameters is implausible", entry.parameters);
        assert!(entry.context_length >= 512, "{name}: context length");

        match entry.format {
            ModelFormat::Gguf => {
                let file = entry.source_file.expect("a GGUF entry names its file");
                assert!(file_matches("*.gguf", file), "{name}: {file}");
                assert!(entry.quantization.is_some(), "{name}: a GGUF entry names its quantisation");
                assert_eq!(entry.expected_files, ["*.gguf"], "{name}");
                assert_eq!(d.vocab_size, None, "{name}: GGUF has no comparable vocab_size");
                assert!(
                    !entry.architecture.chars().any(char::is_uppercase),
                    "{name}: GGUF architectures are lowercase"
                );
            }
            ModelFormat::Safetensors => {
                assert!(entry.source_file.is_none() && entry.quantization.is_none(), "{name}");
                assert!(entry.expected_files.contains(&"config.json"), "{name}");
                assert!(entry.expected_files.contains(&"*.safetensors"), "{name}");
                assert!(d.vocab_size.is_some(), "{name}: vocab_size");
                // A folder import needs tokenizer.json: an entry that did not expect it
                // (a repository without one) could never be imported.
                assert!(entry.expected_files.contains(&"tokenizer.json"), "{name}: tokenizer.json");
                if entry.tasks.contains(&"embedding") {
                    assert!(entry.expected_files.contains(&"1_Pooling/config.json"), "{name}: its pooling");
                }
                if entry.tasks.contains(&"chat") {
                    assert!(entry.expected_files.contains(&"tokenizer_config.json"), "{name}: the chat template");
                }
            }
        }
        assert_eq!(entry.servable, entry.not_servable_reason.is_none(), "{name}: a reason exactly when not servable");
        assert_eq!(entry.servable, engine_runs(entry), "{name}: servable says what this engine runs");
        assert!(entry.description().contains(entry.source_repo), "{name}: the description names the source");
        assert_eq!(find(&name.to_uppercase()).map(|e| e.name), Some(name), "{name}: found without case");
    }
    for required in REQUIRED {
        assert!(find(required).is_some(), "{required} is in the catalogue");
    }
    assert!(find("gpt-5").is_none());
    // ChatGLM3 and the remote-code GLM-4 ship no tokenizer.json, so no import could take them.
    assert!(find("chatglm3-6b").is_none() && find("glm-4-9b-chat").is_none());
}

/// Whether this engine has a loader for the entry, by the rule deployments are checked by.
fn engine_runs(entry: &CatalogEntry) -> bool {
    let config = match entry.format {
        ModelFormat::Safetensors => json!({"architectures": [entry.architecture]}),
        ModelFormat::Gguf => json!({"general.architecture": entry.architecture}),
    };
    engine_support(entry.format, &config).is_ok()
}

#[test]
fn published_values_of_a_few_models_are_exact() {
    let qwen = find("qwen2.5-0.5b-instruct").unwrap();
    assert_eq!(
        (qwen.dimensions.hidden_size, qwen.dimensions.num_hidden_layers, qwen.dimensions.num_attention_heads),
        (896, 24, 14)
    );
    assert_eq!((qwen.dimensions.num_key_value_heads, qwen.dimensions.vocab_size), (Some(2), Some(151_936)));
    assert_eq!((qwen.parameters, qwen.context_length, qwen.license), (494_032_768, 32768, "apache-2.0"));
    let llama = find("llama-2-7b").unwrap();
    // The figure the scheduler's estimate is checked against (ARCHITECTURE.md).
    assert_eq!(llama.parameters, 6_738_415_616);
    let llama3 = find("llama-3.1-8b-instruct").unwrap();
    assert_eq!((llama3.dimensions.num_key_value_heads, llama3.dimensions.vocab_size), (Some(8), Some(128_256)));
    let mistral = find("mistral-7b-instruct-v0.3").unwrap();
    assert_eq!(mistral.dimensions.vocab_size, Some(32768), "v0.3 extended the vocabulary");
    let minilm = find("all-minilm-l6-v2").unwrap();
    assert_eq!((minilm.dimensions.hidden_size, minilm.dimensions.num_hidden_layers), (384, 6));
    assert!(!find("phi-3-mini-4k-instruct").unwrap().servable);
    let glm = find("glm-4-9b-chat-hf").unwrap();
    assert_eq!((glm.architecture, glm.servable, glm.source_repo), ("GlmForCausalLM", false, "THUDM/glm-4-9b-chat-hf"));
}

/// Files as an entry's own repository has them: its identifying values under the usual
/// keys, and one file per expected pattern.
fn files_of(entry: &CatalogEntry) -> ModelFiles {
    let d = entry.dimensions;
    let concrete = |pattern: &str| pattern.replace('*', "model");
    let files: BTreeMap<String, u64> = entry.expected_files.iter().map(|p| (concrete(p), 1)).collect();
    let (config, gguf_metadata) = match entry.format {
        ModelFormat::Safetensors => {
            let mut config = json!({
                "architectures": [entry.architecture],
                "hidden_size": d.hidden_size,
                "num_hidden_layers": d.num_hidden_layers,
                "num_attention_heads": d.num_attention_heads,
                "vocab_size": d.vocab_size,
            });
            if let Some(kv_heads) = d.num_key_value_heads {
                config["num_key_value_heads"] = kv_heads.into();
            }
            (Some(config), BTreeMap::new())
        }
        ModelFormat::Gguf => {
            let arch = entry.architecture;
            let mut metadata = BTreeMap::from([
                ("general.architecture".to_owned(), GgufMetadataValue::Str(arch.to_owned())),
                (format!("{arch}.embedding_length"), GgufMetadataValue::Unsigned(d.hidden_size)),
                (format!("{arch}.block_count"), GgufMetadataValue::Unsigned(d.num_hidden_layers)),
                (format!("{arch}.attention.head_count"), GgufMetadataValue::Unsigned(d.num_attention_heads)),
            ]);
            if let Some(kv_heads) = d.num_key_value_heads {
                metadata.insert(format!("{arch}.attention.head_count_kv"), GgufMetadataValue::Unsigned(kv_heads));
            }
            (None, metadata)
        }
    };
    ModelFiles {
        format: entry.format,
        config,
        gguf_metadata,
        files,
        tensors: 1,
        parameters: entry.parameters,
        gguf_tensor_types: BTreeMap::new(),
        chat_template: None,
        total_bytes: 1,
    }
}

#[test]
fn files_with_an_entrys_values_match_it_and_no_other_of_another_shape() {
    for entry in entries() {
        let files = files_of(entry);
        assert_eq!(check(entry, &files), Ok(()), "{}", entry.name);
        for other in entries() {
            let same_shape = other.format == entry.format
                && other.architecture == entry.architecture
                && other.dimensions == entry.dimensions;
            if !same_shape {
                assert!(check(other, &files).is_err(), "{}'s files are not {}", entry.name, other.name);
            }
        }
    }
    // Old configs without num_key_value_heads mean one key/value head per head.
    let llama2 = find("llama-2-7b").unwrap();
    let mut files = files_of(llama2);
    files.config.as_mut().unwrap().as_object_mut().unwrap().remove("num_key_value_heads");
    assert_eq!(check(llama2, &files), Ok(()));
}

/// `config.json` of THUDM/glm-4-9b-chat-hf as published.
fn glm_4_9b_chat_hf_config() -> serde_json::Value {
    json!({
        "architectures": ["GlmForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
        "eos_token_id": [151_329, 151_336, 151_338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 131_072,
        "model_type": "glm", "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2,
        "pad_token_id": 151_329, "partial_rotary_factor": 0.5, "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 151_552
    })
}

#[test]
fn the_glm_entry_takes_the_real_repositorys_files_and_says_why_it_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let glm = find("glm-4-9b-chat-hf").unwrap();
    // The repository's own files: a tiny model stands in for the weights, with the
    // published config.json.
    let model = dir.path().join("glm-4-9b-chat-hf");
    write_llama(&model, TinyShape::default(), 1).unwrap();
    std::fs::write(model.join("config.json"), glm_4_9b_chat_hf_config().to_string()).unwrap();
    let files = inspect_headers(&model).unwrap();
    assert_eq!(check(glm, &files), Ok(()));
    let reason = files.engine_support().unwrap_err().to_string();
    assert!(reason.contains("GlmForCausalLM (model_type glm)"), "{reason}");
    assert!(glm.not_servable_reason.unwrap().contains("GLM"));

    // The remote-code GLM-4 (ChatGLMModel) is not this entry.
    let mut files = files_of(glm);
    files.config = Some(json!({
        "architectures": ["ChatGLMModel"], "hidden_size": 4096, "num_layers": 40, "num_attention_heads": 32,
        "multi_query_group_num": 2, "padded_vocab_size": 151_552,
    }));
    assert!(check(glm, &files).unwrap_err().starts_with("config.json architectures[0] is ChatGLMModel"));
}

fn tiny_decoders(dir: &Path) -> [(&'static str, ModelFiles); 2] {
    write_llama(&dir.join("llama"), TinyShape::default(), 1).unwrap();
    write_qwen2(&dir.join("qwen2"), TinyShape::default(), 1).unwrap();
    [
        ("LlamaForCausalLM", inspect_headers(&dir.join("llama")).unwrap()),
        ("Qwen2ForCausalLM", inspect_headers(&dir.join("qwen2")).unwrap()),
    ]
}

#[test]
fn tiny_random_models_match_no_real_entry_and_the_difference_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for (architecture, files) in tiny_decoders(dir.path()) {
        for entry in entries() {
            let reason = check(entry, &files).expect_err(entry.name);
            let expected = if entry.format == ModelFormat::Gguf {
                format!("{} is a GGUF model, these files are safetensors", entry.name)
            } else if entry.architecture == architecture {
                format!("config.json hidden_size is 64, {} has {}", entry.name, entry.dimensions.hidden_size)
            } else {
                format!("config.json architectures[0] is {architecture}, {} has {}", entry.name, entry.architecture)
            };
            assert!(reason.starts_with(&expected), "{reason:?} should start with {expected:?}");
        }
    }
    write_bert(&dir.path().join("bert"), TinyBertShape::default(), 1).unwrap();
    let bert = inspect_headers(&dir.path().join("bert")).unwrap();
    let reason = check(find("bge-small-en-v1.5").unwrap(), &bert).unwrap_err();
    assert!(reason.starts_with("config.json hidden_size is 32, bge-small-en-v1.5 has 384"), "{reason}");

    let gguf = dir.path().join("tiny.gguf");
    write_gguf_llama(&gguf, TinyShape::default(), 1, GgufWeights::Q8_0).unwrap();
    let gguf = inspect_headers(&gguf).unwrap();
    let reason = check(find("llama-3.2-1b-instruct-q8_0").unwrap(), &gguf).unwrap_err();
    assert!(reason.starts_with("GGUF llama.embedding_length is 64, llama-3.2-1b-instruct-q8_0 has 2048"), "{reason}");
    let reason = check(find("qwen2.5-0.5b-instruct-q8_0").unwrap(), &gguf).unwrap_err();
    assert!(reason.starts_with("GGUF general.architecture is llama, qwen2.5-0.5b-instruct-q8_0 has qwen2"), "{reason}");
}

/// Rewrites a tiny model's config.json with a real entry's identifying values.
fn patch_config(dir: &Path, entry: &CatalogEntry) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let d = entry.dimensions;
    config["hidden_size"] = d.hidden_size.into();
    config["num_hidden_layers"] = d.num_hidden_layers.into();
    config["num_attention_heads"] = d.num_attention_heads.into();
    config["num_key_value_heads"] = d.num_key_value_heads.unwrap().into();
    config["vocab_size"] = d.vocab_size.unwrap().into();
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

#[test]
fn a_tiny_model_with_a_real_entrys_config_values_matches_it() {
    let dir = tempfile::tempdir().unwrap();
    let qwen = dir.path().join("qwen2");
    write_qwen2(&qwen, TinyShape::default(), 1).unwrap();
    patch_config(&qwen, find("qwen2.5-0.5b-instruct").unwrap());
    let files = inspect_headers(&qwen).unwrap();
    for same_shape in ["qwen2.5-0.5b-instruct", "qwen2.5-0.5b", "qwen2-0.5b-instruct"] {
        assert_eq!(check(find(same_shape).unwrap(), &files), Ok(()), "{same_shape}");
    }
    assert!(
        check(find("qwen2.5-1.5b-instruct").unwrap(), &files)
            .unwrap_err()
            .starts_with("config.json hidden_size is 896, qwen2.5-1.5b-instruct has 1536")
    );
    assert!(
        check(find("qwen2.5-7b-instruct").unwrap(), &files)
            .unwrap_err()
            .starts_with("config.json hidden_size is 896, qwen2.5-7b-instruct has 3584")
    );

    let llama = dir.path().join("llama");
    write_llama(&llama, TinyShape::default(), 1).unwrap();
    let entry = find("llama-3.2-1b-instruct").unwrap();
    patch_config(&llama, entry);
    assert_eq!(check(entry, &inspect_headers(&llama).unwrap()), Ok(()));
    // The same shape with another vocabulary is another model.
    let mut files = inspect_headers(&llama).unwrap();
    files.config.as_mut().unwrap()["vocab_size"] = 32000.into();
    assert!(
        check(entry, &files)
            .unwrap_err()
            .starts_with("config.json vocab_size is 32000, llama-3.2-1b-instruct has 128256")
    );
    // A chat model needs its chat template.
    std::fs::remove_file(llama.join("tokenizer_config.json")).unwrap();
    assert_eq!(
        check(entry, &inspect_headers(&llama).unwrap()).unwrap_err(),
        "llama-3.2-1b-instruct needs tokenizer_config.json, which these files lack"
    );
}

#[test]
fn file_patterns_match_endings_or_exact_paths() {
    assert!(file_matches("*.safetensors", "model-00001-of-00002.safetensors"));
    assert!(file_matches("*.gguf", "Llama-3.2-1B-Instruct-Q8_0.GGUF"));
    assert!(!file_matches("*.gguf", "model.safetensors"));
    assert!(file_matches("config.json", "config.json"));
    assert!(!file_matches("config.json", "sub/config.json"));
}
