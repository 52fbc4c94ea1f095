//! The built-in catalogue of well-known open models: what each one is (family, publisher,
//! the Hugging Face repository its files come from, licence), the values in its files that
//! identify it (architecture, hidden size, layers, attention and key/value heads,
//! vocabulary), its size and context, its tasks, the files an import needs, and whether
//! this build's engine can serve it. Pure data and pure checks: a user with the files on
//! disk imports them under a catalogue name, and [`check`] says whether the files are that
//! model, naming the first value that differs.
//!
//! The values are the published ones (`config.json` of each repository, or the GGUF
//! metadata llama.cpp writes for it). Only identifying values are checked: the context
//! window, dtype and parameter count vary between conversions of the same model and are
//! informative.

use serde::Serialize;
use utoipa::ToSchema;

use crate::model_files::{GgufMetadataValue, ModelFiles, ModelFormat, gguf_file_type_name};

/// The tasks a model version can have, as the repository names them.
pub const TASKS: &[&str] = &["chat", "completion", "embedding"];

const CHAT: &[&str] = &["chat", "completion"];
const COMPLETION: &[&str] = &["completion"];
const EMBEDDING: &[&str] = &["embedding"];

/// The files a Hugging Face decoder import needs (the chat template is in
/// `tokenizer_config.json`).
const DECODER_FILES: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json", "*.safetensors"];
const BASE_FILES: &[&str] = &["config.json", "tokenizer.json", "*.safetensors"];
/// A sentence-transformers encoder: its pooling (CLS for BGE, mean for MiniLM) is in
/// `1_Pooling/config.json`, which the embedder reads, so the import must carry it.
const ENCODER_FILES: &[&str] = &["config.json", "tokenizer.json", "*.safetensors", "1_Pooling/config.json"];
const GGUF_FILES: &[&str] = &["*.gguf"];

const PHI_REASON: &str = "this build's engine runs llama, mistral and qwen2 decoders and BERT encoders; \
     Phi (partial rotary embeddings, its own layer layout) has no forward pass here yet";
const GLM_REASON: &str = "this build's engine runs llama, mistral and qwen2 decoders and BERT encoders; \
     GLM (partial rotary embeddings, fused gate and up projections) has no forward pass here yet";

/// The values that identify a model's shape, as `config.json` (or the GGUF metadata)
/// gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Dimensions {
    pub hidden_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    /// Key/value heads of grouped-query attention; `None` for encoders.
    pub num_key_value_heads: Option<u64>,
    /// `None` where the files do not state it in a comparable way (GGUF).
    pub vocab_size: Option<u64>,
}

const fn dims(hidden_size: u64, layers: u64, heads: u64, kv_heads: u64, vocab_size: u64) -> Dimensions {
    Dimensions {
        hidden_size,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        vocab_size: Some(vocab_size),
    }
}

const fn encoder(hidden_size: u64, layers: u64, heads: u64, vocab_size: u64) -> Dimensions {
    Dimensions {
        hidden_size,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: None,
        vocab_size: Some(vocab_size),
    }
}

/// A GGUF conversion's dimensions: llama.cpp keeps the shape, and the vocabulary is a
/// token list rather than a number.
const fn gguf_dims(of: Dimensions) -> Dimensions {
    Dimensions { vocab_size: None, ..of }
}

/// One well-known model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CatalogEntry {
    /// The catalogue name, lowercase: `qwen2.5-0.5b-instruct`.
    pub name: &'static str,
    pub display_name: &'static str,
    /// `llama`, `qwen2`, `mistral`, `phi`, `glm`, `bert`.
    pub family: &'static str,
    pub publisher: &'static str,
    /// The Hugging Face repository the files come from.
    pub source_repo: &'static str,
    /// For GGUF entries: the file of the repository this entry is.
    pub source_file: Option<&'static str>,
    /// The licence identifier the repository declares (`apache-2.0`, `llama3.1`, ...).
    pub license: &'static str,
    pub format: ModelFormat,
    /// `config.json` `architectures[0]`, or GGUF `general.architecture`.
    pub architecture: &'static str,
    pub dimensions: Dimensions,
    pub parameters: u64,
    /// The context window the model was trained for, in tokens.
    pub context_length: u64,
    #[schema(value_type = Vec<String>)]
    pub tasks: &'static [&'static str],
    /// GGUF quantisation (`general.file_type`), e.g. `Q8_0`.
    pub quantization: Option<&'static str>,
    /// File names an import needs; `*.ext` means at least one such file.
    #[schema(value_type = Vec<String>)]
    pub expected_files: &'static [&'static str],
    /// Whether this build's engine can serve it.
    pub servable: bool,
    /// Why not, when it cannot.
    pub not_servable_reason: Option<&'static str>,
}

impl CatalogEntry {
    /// The description a version imported under this name gets when its request has none.
    pub fn description(&self) -> String {
        let quantized = self.quantization.map(|q| format!(", GGUF {q}")).unwrap_or_default();
        format!(
            "{} by {}{quantized}, from huggingface.co/{} (licence {})",
            self.display_name, self.publisher, self.source_repo, self.license
        )
    }
}

/// The defaults of a Hugging Face safetensors decoder that this engine serves.
const HF: CatalogEntry = CatalogEntry {
    name: "",
    display_name: "",
    family: "",
    publisher: "",
    source_repo: "",
    source_file: None,
    license: "",
    format: ModelFormat::Safetensors,
    architecture: "",
    dimensions: dims(0, 0, 0, 0, 0),
    parameters: 0,
    context_length: 0,
    tasks: CHAT,
    quantization: None,
    expected_files: DECODER_FILES,
    servable: true,
    not_servable_reason: None,
};

const GGUF: CatalogEntry = CatalogEntry { format: ModelFormat::Gguf, expected_files: GGUF_FILES, ..HF };

// Published shapes, shared by the base, instruct and quantised entries of a model.
const LLAMA2_7B: Dimensions = dims(4096, 32, 32, 32, 32000);
const LLAMA3_8B: Dimensions = dims(4096, 32, 32, 8, 128_256);
const LLAMA32_1B: Dimensions = dims(2048, 16, 32, 8, 128_256);
const LLAMA32_3B: Dimensions = dims(3072, 28, 24, 8, 128_256);
const TINYLLAMA: Dimensions = dims(2048, 22, 32, 4, 32000);
const QWEN2_0_5B: Dimensions = dims(896, 24, 14, 2, 151_936);
const QWEN2_1_5B: Dimensions = dims(1536, 28, 12, 2, 151_936);
const QWEN25_3B: Dimensions = dims(2048, 36, 16, 2, 151_936);
const QWEN2_7B: Dimensions = dims(3584, 28, 28, 4, 152_064);
const MISTRAL_V02: Dimensions = dims(4096, 32, 32, 8, 32000);
const MISTRAL_V03: Dimensions = dims(4096, 32, 32, 8, 32768);
const PHI3_MINI: Dimensions = dims(3072, 32, 32, 32, 32064);

// Parameter counts (elements of every weight tensor).
const LLAMA2_7B_PARAMS: u64 = 6_738_415_616;
const LLAMA3_8B_PARAMS: u64 = 8_030_261_248;
const LLAMA32_1B_PARAMS: u64 = 1_235_814_400;
const LLAMA32_3B_PARAMS: u64 = 3_212_749_824;
const TINYLLAMA_PARAMS: u64 = 1_100_048_384;
const QWEN2_0_5B_PARAMS: u64 = 494_032_768;
const QWEN2_1_5B_PARAMS: u64 = 1_543_714_304;
const QWEN25_3B_PARAMS: u64 = 3_085_938_688;
const QWEN2_7B_PARAMS: u64 = 7_615_616_512;
const MISTRAL_V02_PARAMS: u64 = 7_241_732_096;
const MISTRAL_V03_PARAMS: u64 = 7_248_023_552;

const META: &str = "Meta";
const QWEN: &str = "Alibaba Cloud (Qwen)";
const MISTRAL_AI: &str = "Mistral AI";
const MICROSOFT: &str = "Microsoft";
const ZHIPU: &str = "Zhipu AI / Tsinghua KEG (THUDM)";
const BAAI: &str = "BAAI";

static CATALOG: &[CatalogEntry] = &[
    // Llama 2.
    CatalogEntry {
        name: "llama-2-7b",
        display_name: "Llama 2 7B",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Llama-2-7b-hf",
        license: "llama2",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA2_7B,
        parameters: LLAMA2_7B_PARAMS,
        context_length: 4096,
        tasks: COMPLETION,
        ..HF
    },
    CatalogEntry {
        name: "llama-2-7b-chat",
        display_name: "Llama 2 7B Chat",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Llama-2-7b-chat-hf",
        license: "llama2",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA2_7B,
        parameters: LLAMA2_7B_PARAMS,
        context_length: 4096,
        ..HF
    },
    CatalogEntry {
        name: "llama-2-7b-chat-q4_k_m",
        display_name: "Llama 2 7B Chat (GGUF Q4_K_M)",
        family: "llama",
        publisher: META,
        source_repo: "TheBloke/Llama-2-7B-Chat-GGUF",
        source_file: Some("llama-2-7b-chat.Q4_K_M.gguf"),
        license: "llama2",
        architecture: "llama",
        dimensions: gguf_dims(LLAMA2_7B),
        parameters: LLAMA2_7B_PARAMS,
        context_length: 4096,
        quantization: Some("Q4_K_M"),
        ..GGUF
    },
    // Llama 3, 3.1 and 3.2.
    CatalogEntry {
        name: "llama-3-8b",
        display_name: "Llama 3 8B",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Meta-Llama-3-8B",
        license: "llama3",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA3_8B,
        parameters: LLAMA3_8B_PARAMS,
        context_length: 8192,
        tasks: COMPLETION,
        ..HF
    },
    CatalogEntry {
        name: "llama-3-8b-instruct",
        display_name: "Llama 3 8B Instruct",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Meta-Llama-3-8B-Instruct",
        license: "llama3",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA3_8B,
        parameters: LLAMA3_8B_PARAMS,
        context_length: 8192,
        ..HF
    },
    CatalogEntry {
        name: "llama-3.1-8b",
        display_name: "Llama 3.1 8B",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Llama-3.1-8B",
        license: "llama3.1",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA3_8B,
        parameters: LLAMA3_8B_PARAMS,
        context_length: 131_072,
        tasks: COMPLETION,
        ..HF
    },
    CatalogEntry {
        name: "llama-3.1-8b-instruct",
        display_name: "Llama 3.1 8B Instruct",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Llama-3.1-8B-Instruct",
        license: "llama3.1",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA3_8B,
        parameters: LLAMA3_8B_PARAMS,
        context_length: 131_072,
        ..HF
    },
    CatalogEntry {
        name: "llama-3.1-8b-instruct-q4_k_m",
        display_name: "Llama 3.1 8B Instruct (GGUF Q4_K_M)",
        family: "llama",
        publisher: META,
        source_repo: "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
        source_file: Some("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"),
        license: "llama3.1",
        architecture: "llama",
        dimensions: gguf_dims(LLAMA3_8B),
        parameters: LLAMA3_8B_PARAMS,
        context_length: 131_072,
        quantization: Some("Q4_K_M"),
        ..GGUF
    },
    CatalogEntry {
        name: "llama-3.2-1b",
        display_name: "Llama 3.2 1B",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Llama-3.2-1B",
        license: "llama3.2",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA32_1B,
        parameters: LLAMA32_1B_PARAMS,
        context_length: 131_072,
        tasks: COMPLETION,
        ..HF
    },
    CatalogEntry {
        name: "llama-3.2-1b-instruct",
        display_name: "Llama 3.2 1B Instruct",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Llama-3.2-1B-Instruct",
        license: "llama3.2",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA32_1B,
        parameters: LLAMA32_1B_PARAMS,
        context_length: 131_072,
        ..HF
    },
    CatalogEntry {
        name: "llama-3.2-1b-instruct-q8_0",
        display_name: "Llama 3.2 1B Instruct (GGUF Q8_0)",
        family: "llama",
        publisher: META,
        source_repo: "bartowski/Llama-3.2-1B-Instruct-GGUF",
        source_file: Some("Llama-3.2-1B-Instruct-Q8_0.gguf"),
        license: "llama3.2",
        architecture: "llama",
        dimensions: gguf_dims(LLAMA32_1B),
        parameters: LLAMA32_1B_PARAMS,
        context_length: 131_072,
        quantization: Some("Q8_0"),
        ..GGUF
    },
    CatalogEntry {
        name: "llama-3.2-3b",
        display_name: "Llama 3.2 3B",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Llama-3.2-3B",
        license: "llama3.2",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA32_3B,
        parameters: LLAMA32_3B_PARAMS,
        context_length: 131_072,
        tasks: COMPLETION,
        ..HF
    },
    CatalogEntry {
        name: "llama-3.2-3b-instruct",
        display_name: "Llama 3.2 3B Instruct",
        family: "llama",
        publisher: META,
        source_repo: "meta-llama/Llama-3.2-3B-Instruct",
        license: "llama3.2",
        architecture: "LlamaForCausalLM",
        dimensions: LLAMA32_3B,
        parameters: LLAMA32_3B_PARAMS,
        context_length: 131_072,
        ..HF
    },
    CatalogEntry {
        name: "llama-3.2-3b-instruct-q4_k_m",
        display_name: "Llama 3.2 3B Instruct (GGUF Q4_K_M)",
        family: "llama",
        publisher: META,
        source_repo: "bartowski/Llama-3.2-3B-Instruct-GGUF",
        source_file: Some("Llama-3.2-3B-Instruct-Q4_K_M.gguf"),
        license: "llama3.2",
        architecture: "llama",
        dimensions: gguf_dims(LLAMA32_3B),
        parameters: LLAMA32_3B_PARAMS,
        context_length: 131_072,
        quantization: Some("Q4_K_M"),
        ..GGUF
    },
    // TinyLlama.
    CatalogEntry {
        name: "tinyllama-1.1b-chat",
        display_name: "TinyLlama 1.1B Chat v1.0",
        family: "llama",
        publisher: "TinyLlama",
        source_repo: "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        license: "apache-2.0",
        architecture: "LlamaForCausalLM",
        dimensions: TINYLLAMA,
        parameters: TINYLLAMA_PARAMS,
        context_length: 2048,
        ..HF
    },
    CatalogEntry {
        name: "tinyllama-1.1b-chat-q8_0",
        display_name: "TinyLlama 1.1B Chat v1.0 (GGUF Q8_0)",
        family: "llama",
        publisher: "TinyLlama",
        source_repo: "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
        source_file: Some("tinyllama-1.1b-chat-v1.0.Q8_0.gguf"),
        license: "apache-2.0",
        architecture: "llama",
        dimensions: gguf_dims(TINYLLAMA),
        parameters: TINYLLAMA_PARAMS,
        context_length: 2048,
        quantization: Some("Q8_0"),
        ..GGUF
    },
    // Qwen2.
    CatalogEntry {
        name: "qwen2-0.5b",
        display_name: "Qwen2 0.5B",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2-0.5B",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_0_5B,
        parameters: QWEN2_0_5B_PARAMS,
        context_length: 32768,
        tasks: COMPLETION,
        ..HF
    },
    CatalogEntry {
        name: "qwen2-0.5b-instruct",
        display_name: "Qwen2 0.5B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2-0.5B-Instruct",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_0_5B,
        parameters: QWEN2_0_5B_PARAMS,
        context_length: 32768,
        ..HF
    },
    CatalogEntry {
        name: "qwen2-1.5b-instruct",
        display_name: "Qwen2 1.5B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2-1.5B-Instruct",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_1_5B,
        parameters: QWEN2_1_5B_PARAMS,
        context_length: 32768,
        ..HF
    },
    CatalogEntry {
        name: "qwen2-7b-instruct",
        display_name: "Qwen2 7B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2-7B-Instruct",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_7B,
        parameters: QWEN2_7B_PARAMS,
        context_length: 32768,
        ..HF
    },
    // Qwen2.5, Qwen2.5-Coder.
    CatalogEntry {
        name: "qwen2.5-0.5b",
        display_name: "Qwen2.5 0.5B",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-0.5B",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_0_5B,
        parameters: QWEN2_0_5B_PARAMS,
        context_length: 32768,
        tasks: COMPLETION,
        ..HF
    },
    CatalogEntry {
        name: "qwen2.5-0.5b-instruct",
        display_name: "Qwen2.5 0.5B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-0.5B-Instruct",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_0_5B,
        parameters: QWEN2_0_5B_PARAMS,
        context_length: 32768,
        ..HF
    },
    CatalogEntry {
        name: "qwen2.5-0.5b-instruct-q8_0",
        display_name: "Qwen2.5 0.5B Instruct (GGUF Q8_0)",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        source_file: Some("qwen2.5-0.5b-instruct-q8_0.gguf"),
        license: "apache-2.0",
        architecture: "qwen2",
        dimensions: gguf_dims(QWEN2_0_5B),
        parameters: QWEN2_0_5B_PARAMS,
        context_length: 32768,
        quantization: Some("Q8_0"),
        ..GGUF
    },
    CatalogEntry {
        name: "qwen2.5-1.5b-instruct",
        display_name: "Qwen2.5 1.5B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-1.5B-Instruct",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_1_5B,
        parameters: QWEN2_1_5B_PARAMS,
        context_length: 32768,
        ..HF
    },
    CatalogEntry {
        name: "qwen2.5-1.5b-instruct-q4_k_m",
        display_name: "Qwen2.5 1.5B Instruct (GGUF Q4_K_M)",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-1.5B-Instruct-GGUF",
        source_file: Some("qwen2.5-1.5b-instruct-q4_k_m.gguf"),
        license: "apache-2.0",
        architecture: "qwen2",
        dimensions: gguf_dims(QWEN2_1_5B),
        parameters: QWEN2_1_5B_PARAMS,
        context_length: 32768,
        quantization: Some("Q4_K_M"),
        ..GGUF
    },
    CatalogEntry {
        name: "qwen2.5-3b-instruct",
        display_name: "Qwen2.5 3B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-3B-Instruct",
        license: "qwen-research",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN25_3B,
        parameters: QWEN25_3B_PARAMS,
        context_length: 32768,
        ..HF
    },
    CatalogEntry {
        name: "qwen2.5-7b",
        display_name: "Qwen2.5 7B",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-7B",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_7B,
        parameters: QWEN2_7B_PARAMS,
        context_length: 32768,
        tasks: COMPLETION,
        ..HF
    },
    CatalogEntry {
        name: "qwen2.5-7b-instruct",
        display_name: "Qwen2.5 7B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-7B-Instruct",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_7B,
        parameters: QWEN2_7B_PARAMS,
        context_length: 32768,
        ..HF
    },
    CatalogEntry {
        name: "qwen2.5-coder-1.5b-instruct",
        display_name: "Qwen2.5-Coder 1.5B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_1_5B,
        parameters: QWEN2_1_5B_PARAMS,
        context_length: 32768,
        ..HF
    },
    CatalogEntry {
        name: "qwen2.5-coder-7b-instruct",
        display_name: "Qwen2.5-Coder 7B Instruct",
        family: "qwen2",
        publisher: QWEN,
        source_repo: "Qwen/Qwen2.5-Coder-7B-Instruct",
        license: "apache-2.0",
        architecture: "Qwen2ForCausalLM",
        dimensions: QWEN2_7B,
        parameters: QWEN2_7B_PARAMS,
        context_length: 32768,
        ..HF
    },
    // Mistral. Its GGUF conversions name the llama architecture.
    CatalogEntry {
        name: "mistral-7b-instruct-v0.2",
        display_name: "Mistral 7B Instruct v0.2",
        family: "mistral",
        publisher: MISTRAL_AI,
        source_repo: "mistralai/Mistral-7B-Instruct-v0.2",
        license: "apache-2.0",
        architecture: "MistralForCausalLM",
        dimensions: MISTRAL_V02,
        parameters: MISTRAL_V02_PARAMS,
        context_length: 32768,
        ..HF
    },
    CatalogEntry {
        name: "mistral-7b-instruct-v0.2-q4_k_m",
        display_name: "Mistral 7B Instruct v0.2 (GGUF Q4_K_M)",
        family: "mistral",
        publisher: MISTRAL_AI,
        source_repo: "TheBloke/Mistral-7B-Instruct-v0.2-GGUF",
        source_file: Some("mistral-7b-instruct-v0.2.Q4_K_M.gguf"),
        license: "apache-2.0",
        architecture: "llama",
        dimensions: gguf_dims(MISTRAL_V02),
        parameters: MISTRAL_V02_PARAMS,
        context_length: 32768,
        quantization: Some("Q4_K_M"),
        ..GGUF
    },
    CatalogEntry {
        name: "mistral-7b-instruct-v0.3",
        display_name: "Mistral 7B Instruct v0.3",
        family: "mistral",
        publisher: MISTRAL_AI,
        source_repo: "mistralai/Mistral-7B-Instruct-v0.3",
        license: "apache-2.0",
        architecture: "MistralForCausalLM",
        dimensions: MISTRAL_V03,
        parameters: MISTRAL_V03_PARAMS,
        context_length: 32768,
        ..HF
    },
    // Phi: candle-transformers has it; this build's engine does not serve it yet.
    CatalogEntry {
        name: "phi-2",
        display_name: "Phi-2",
        family: "phi",
        publisher: MICROSOFT,
        source_repo: "microsoft/phi-2",
        license: "mit",
        architecture: "PhiForCausalLM",
        dimensions: dims(2560, 32, 32, 32, 51200),
        parameters: 2_779_683_840,
        context_length: 2048,
        tasks: COMPLETION,
        expected_files: BASE_FILES,
        servable: false,
        not_servable_reason: Some(PHI_REASON),
        ..HF
    },
    CatalogEntry {
        name: "phi-3-mini-4k-instruct",
        display_name: "Phi-3 mini 4K Instruct",
        family: "phi",
        publisher: MICROSOFT,
        source_repo: "microsoft/Phi-3-mini-4k-instruct",
        license: "mit",
        architecture: "Phi3ForCausalLM",
        dimensions: PHI3_MINI,
        parameters: 3_821_079_552,
        context_length: 4096,
        servable: false,
        not_servable_reason: Some(PHI_REASON),
        ..HF
    },
    CatalogEntry {
        name: "phi-3-mini-128k-instruct",
        display_name: "Phi-3 mini 128K Instruct",
        family: "phi",
        publisher: MICROSOFT,
        source_repo: "microsoft/Phi-3-mini-128k-instruct",
        license: "mit",
        architecture: "Phi3ForCausalLM",
        dimensions: PHI3_MINI,
        parameters: 3_821_079_552,
        context_length: 131_072,
        servable: false,
        not_servable_reason: Some(PHI_REASON),
        ..HF
    },
    // GLM-4 in the Transformers layout (`GlmForCausalLM`), which ships `tokenizer.json`.
    // THUDM/chatglm3-6b and THUDM/glm-4-9b-chat are not listed: they ship only a
    // SentencePiece / tiktoken `tokenizer.model` and remote code, so a folder import (which
    // needs `tokenizer.json`) could never take them.
    CatalogEntry {
        name: "glm-4-9b-chat-hf",
        display_name: "GLM-4 9B Chat",
        family: "glm",
        publisher: ZHIPU,
        source_repo: "THUDM/glm-4-9b-chat-hf",
        license: "other (GLM-4 model license)",
        architecture: "GlmForCausalLM",
        dimensions: dims(4096, 40, 32, 2, 151_552),
        parameters: 9_399_951_360,
        context_length: 131_072,
        servable: false,
        not_servable_reason: Some(GLM_REASON),
        ..HF
    },
    // Sentence embeddings (BERT encoders; the pooling is each one's 1_Pooling/config.json).
    CatalogEntry {
        name: "bge-small-en-v1.5",
        display_name: "BGE small EN v1.5",
        family: "bert",
        publisher: BAAI,
        source_repo: "BAAI/bge-small-en-v1.5",
        license: "mit",
        architecture: "BertModel",
        dimensions: encoder(384, 12, 12, 30522),
        parameters: 33_360_000,
        context_length: 512,
        tasks: EMBEDDING,
        expected_files: ENCODER_FILES,
        ..HF
    },
    CatalogEntry {
        name: "bge-base-en-v1.5",
        display_name: "BGE base EN v1.5",
        family: "bert",
        publisher: BAAI,
        source_repo: "BAAI/bge-base-en-v1.5",
        license: "mit",
        architecture: "BertModel",
        dimensions: encoder(768, 12, 12, 30522),
        parameters: 109_482_240,
        context_length: 512,
        tasks: EMBEDDING,
        expected_files: ENCODER_FILES,
        ..HF
    },
    CatalogEntry {
        name: "bge-large-zh-v1.5",
        display_name: "BGE large ZH v1.5",
        family: "bert",
        publisher: BAAI,
        source_repo: "BAAI/bge-large-zh-v1.5",
        license: "mit",
        architecture: "BertModel",
        dimensions: encoder(1024, 24, 16, 21128),
        parameters: 325_522_432,
        context_length: 512,
        tasks: EMBEDDING,
        expected_files: ENCODER_FILES,
        ..HF
    },
    CatalogEntry {
        name: "all-minilm-l6-v2",
        display_name: "all-MiniLM-L6-v2",
        family: "bert",
        publisher: "sentence-transformers",
        source_repo: "sentence-transformers/all-MiniLM-L6-v2",
        license: "apache-2.0",
        architecture: "BertModel",
        dimensions: encoder(384, 6, 12, 30522),
        parameters: 22_713_216,
        context_length: 512,
        tasks: EMBEDDING,
        expected_files: ENCODER_FILES,
        ..HF
    },
];

/// Every entry, in catalogue order (by family, then size).
pub fn entries() -> &'static [CatalogEntry] {
    CATALOG
}

/// The entry with catalogue name `name` (compared without case: `Qwen2.5-0.5B-Instruct`
/// finds `qwen2.5-0.5b-instruct`).
pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|entry| entry.name.eq_ignore_ascii_case(name))
}

/// The `config.json` keys that may hold each value, first found wins (older and remote-code
/// configs, ChatGLM's among them, name them differently).
const HIDDEN_KEYS: &[&str] = &["hidden_size", "n_embd", "d_model"];
const LAYER_KEYS: &[&str] = &["num_hidden_layers", "num_layers", "n_layer"];
const HEAD_KEYS: &[&str] = &["num_attention_heads", "n_head"];
const KV_HEAD_KEYS: &[&str] = &["num_key_value_heads", "multi_query_group_num"];
const VOCAB_KEYS: &[&str] = &["padded_vocab_size", "vocab_size"];

/// Whether `files` are the model `entry` describes: the same format, architecture and
/// identifying values, and the files an import needs. The error names the first
/// difference and what the entry expects.
pub fn check(entry: &CatalogEntry, files: &ModelFiles) -> Result<(), String> {
    let name = entry.name;
    let not_it = "these files are not it (import them under another name)";
    if files.format != entry.format {
        return Err(format!(
            "{name} is a {} model, these files are {}: {not_it}",
            format_name(entry.format),
            format_name(files.format)
        ));
    }
    let (source, found_architecture) = match files.format {
        ModelFormat::Safetensors => ("config.json architectures[0]", files.architecture()),
        ModelFormat::Gguf => ("GGUF general.architecture", files.architecture()),
    };
    let found_architecture = found_architecture.unwrap_or_else(|| "missing".to_owned());
    if found_architecture != entry.architecture {
        return Err(format!("{source} is {found_architecture}, {name} has {}: {not_it}", entry.architecture));
    }
    for (key, found, expected) in identifying_values(entry, files) {
        match found {
            Some(found) if found == expected => {}
            Some(found) => return Err(format!("{key} is {found}, {name} has {expected}: {not_it}")),
            None => return Err(format!("{key} is missing, {name} has {expected}: {not_it}")),
        }
    }
    if let Some(expected) = entry.quantization
        && let Some(GgufMetadataValue::Unsigned(file_type)) = files.gguf_metadata.get("general.file_type")
    {
        let found = gguf_file_type_name(*file_type);
        if !found.eq_ignore_ascii_case(expected) {
            return Err(format!(
                "GGUF general.file_type is {found}, {name} is {expected}: these files are another quantisation of it \
                 (import them under another name)"
            ));
        }
    }
    for pattern in entry.expected_files {
        if !files.files.keys().any(|file| file_matches(pattern, file)) {
            return Err(format!("{name} needs {pattern}, which these files lack"));
        }
    }
    Ok(())
}

/// (where the value is, the value in the files, the value of the entry) for each
/// identifying value the entry states.
fn identifying_values(entry: &CatalogEntry, files: &ModelFiles) -> Vec<(String, Option<u64>, u64)> {
    let d = entry.dimensions;
    let mut values = Vec::new();
    match files.format {
        ModelFormat::Safetensors => {
            let config = files.config.as_ref();
            let lookup = |keys: &[&str]| -> (String, Option<u64>) {
                let found = keys.iter().find_map(|key| {
                    let value = config?.get(*key)?;
                    Some((*key, value.as_u64()))
                });
                match found {
                    Some((key, value)) => (format!("config.json {key}"), value),
                    None => (format!("config.json {}", keys[0]), None),
                }
            };
            let value = |keys: &[&str], expected: u64| {
                let (key, found) = lookup(keys);
                (key, found, expected)
            };
            values.push(value(HIDDEN_KEYS, d.hidden_size));
            values.push(value(LAYER_KEYS, d.num_hidden_layers));
            values.push(value(HEAD_KEYS, d.num_attention_heads));
            if let Some(kv_heads) = d.num_key_value_heads {
                let (key, found) = lookup(KV_HEAD_KEYS);
                // Hugging Face's default: without num_key_value_heads every head has its own.
                let found = found.or_else(|| lookup(HEAD_KEYS).1);
                values.push((key, found, kv_heads));
            }
            if let Some(vocab) = d.vocab_size {
                values.push(value(VOCAB_KEYS, vocab));
            }
        }
        ModelFormat::Gguf => {
            let arch = entry.architecture;
            let mut push = |key: String, expected: u64| {
                let found = match files.gguf_metadata.get(&key) {
                    Some(GgufMetadataValue::Unsigned(value)) => Some(*value),
                    Some(GgufMetadataValue::Signed(value)) => u64::try_from(*value).ok(),
                    _ => None,
                };
                values.push((format!("GGUF {key}"), found, expected));
            };
            push(format!("{arch}.embedding_length"), d.hidden_size);
            push(format!("{arch}.block_count"), d.num_hidden_layers);
            push(format!("{arch}.attention.head_count"), d.num_attention_heads);
            if let Some(kv_heads) = d.num_key_value_heads {
                push(format!("{arch}.attention.head_count_kv"), kv_heads);
            }
        }
    }
    values
}

/// `*.ext` matches any file ending in `.ext` (at any depth); anything else matches a file
/// of that path.
pub fn file_matches(pattern: &str, file: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => file.to_ascii_lowercase().ends_with(&suffix.to_ascii_lowercase()),
        None => file == pattern,
    }
}

fn format_name(format: ModelFormat) -> &'static str {
    match format {
        ModelFormat::Safetensors => "safetensors",
        ModelFormat::Gguf => "GGUF",
    }
}
