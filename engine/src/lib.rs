//! Models on candle: loading (safetensors, GGUF, tokenizer.json), generation with a KV
//! cache, sampling, batching, embeddings, LoRA / QLoRA / full training, and GPU discovery.
//!
//! Today: GPU discovery ([`gpu`]). Model loading and generation come with the inference
//! work.
//!
//! **Boundary:** knows nothing about the cluster. `unsafe` is allowed only in [`gpu`] (the
//! workspace denies it elsewhere).

pub mod gpu;
