//! Models on candle: loading (safetensors, GGUF, tokenizer.json), generation with a KV
//! cache, sampling, batching, embeddings, LoRA / QLoRA / full training, and GPU discovery.
//!
//! - [`engine`]: [`Engine`], the serving loop: a bounded queue and continuous batching on
//!   its own thread, streaming [`GenerationEvent`]s.
//! - [`model`]: the Llama-family decoder (llama, mistral, qwen2) with per-sequence KV
//!   caches, from safetensors or GGUF.
//! - [`sampling`] and [`stream`]: pure cores (choosing a token; turning tokens into text
//!   with stop sequences).
//! - [`tokenizer`] and [`chat`]: tokenizers and chat templates.
//! - [`embeddings`]: BERT-family sentence embeddings.
//! - [`gpu`]: GPU discovery; [`model_files`]: model files checked on disk; [`tiny`]: tiny
//!   random models in the real formats, for tests; [`train`]: LoRA and full fine-tuning.
//! - [`catalog`]: the built-in catalogue of well-known models and the check of files
//!   against an entry; [`archive`]: model archives unpacked without trusting them.
//!
//! **Boundary:** knows nothing about the cluster. `unsafe` is allowed only in [`gpu`] and
//! `kernels` (raw pointers for `gemm`, loops compiled for AVX2); the workspace denies it
//! elsewhere.

pub mod archive;
pub mod catalog;
pub mod chat;
pub mod config;
pub mod embeddings;
pub mod engine;
pub mod error;
pub mod fit;
pub mod gpu;
mod kernels;
pub mod model;
pub mod model_files;
pub mod sampling;
pub mod stream;
pub mod tiny;
pub mod tokenizer;
pub mod train;

pub use candle_core::Device;
pub use chat::ChatMessage;
pub use embeddings::EmbeddingModel;
pub use engine::{
    Engine, EngineOptions, EngineStats, FinishReason, GenerationEvent, GenerationRequest, ModelInfo, TokenLogprob,
    TopLogprob,
};
pub use error::{EngineError, Result};

/// Bytes per value of what the engine holds besides quantised (GGUF) matrices: safetensors
/// weights, whatever their stored dtype, and every KV cache are f32. Memory estimates that
/// place replicas count with it.
pub const HELD_DTYPE_BYTES: f64 = 4.0;
pub use sampling::SamplingParams;
pub use stream::OutputFilter;
