//! Models on candle: loading (safetensors, GGUF, tokenizer.json), generation with a KV
//! cache, sampling, batching, embeddings, LoRA / QLoRA / full training, and GPU discovery.
//!
//! Today: GPU discovery ([`gpu`]) and model files checked and read from disk
//! ([`model_files`]). Loading into candle and generation come with the inference work.
//!
//! **Boundary:** knows nothing about the cluster. `unsafe` is allowed only in [`gpu`] (the
//! workspace denies it elsewhere).

pub mod gpu;
pub mod model_files;
pub mod tiny;
