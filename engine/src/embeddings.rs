//! Sentence embeddings from BERT-family encoders (all-MiniLM-L6-v2, bge, e5...) through
//! candle-transformers' BERT: pooled as the model's sentence-transformers configuration
//! (`1_Pooling/config.json`) says, the mean over the attention mask (MiniLM, e5) or the
//! `[CLS]` token's state (bge), mean when the folder has none; then L2 normalisation, so a
//! dot product is a cosine similarity.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};
use crate::model::read_json;

/// Texts embedded in one forward pass at most.
const BATCH: usize = 32;

/// How token states become one sentence embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of the states the attention mask keeps.
    Mean,
    /// The first (`[CLS]`) token's state.
    Cls,
}

impl Pooling {
    /// The pooling a sentence-transformers `1_Pooling/config.json` asks for; a mode this
    /// engine does not compute (max, weighted mean, last token) is named.
    pub fn from_sentence_transformers(config: &serde_json::Value) -> std::result::Result<Pooling, String> {
        let on = |key: &str| config.get(key).and_then(serde_json::Value::as_bool).unwrap_or(false);
        let unsupported: Vec<&str> = [
            "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
            "pooling_mode_lasttoken",
        ]
        .into_iter()
        .filter(|key| on(key))
        .collect();
        match (on("pooling_mode_cls_token"), on("pooling_mode_mean_tokens"), unsupported.as_slice()) {
            (true, false, []) => Ok(Pooling::Cls),
            (false, true | false, []) => Ok(Pooling::Mean),
            (true, true, []) => Err("both CLS and mean pooling are on; only one is supported".into()),
            (_, _, modes) => Err(format!("the pooling {} is not supported (only mean or CLS)", modes.join(", "))),
        }
    }
}

pub struct EmbeddingModel {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dimensions: usize,
    max_tokens: usize,
    pad_id: u32,
    pooling: Pooling,
}

impl std::fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("dimensions", &self.dimensions)
            .field("max_tokens", &self.max_tokens)
            .field("pooling", &self.pooling)
            .finish_non_exhaustive()
    }
}

impl EmbeddingModel {
    /// Loads a BERT-family model folder (config.json, *.safetensors, tokenizer.json) onto
    /// the CPU.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_on(path, &Device::Cpu)
    }

    pub fn load_on(path: &Path, device: &Device) -> Result<Self> {
        if !path.is_dir() {
            return Err(EngineError::load(
                path,
                "expected a folder with config.json, *.safetensors and tokenizer.json",
            ));
        }
        let config_json = read_json(&path.join("config.json"))?;
        let pooling_path = path.join("1_Pooling").join("config.json");
        let pooling = if pooling_path.is_file() {
            Pooling::from_sentence_transformers(&read_json(&pooling_path)?)
                .map_err(|reason| EngineError::load(&pooling_path, reason))?
        } else {
            Pooling::Mean
        };
        let config: Config = serde_json::from_value(config_json)
            .map_err(|e| EngineError::load(path, format!("config.json is not a BERT config: {e}")))?;
        let mut tensors = HashMap::new();
        let mut shards: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| EngineError::load(path, e.to_string()))?
            .filter_map(std::result::Result::ok)
            .map(|entry| entry.path())
            .filter(|file| file.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        shards.sort();
        if shards.is_empty() {
            return Err(EngineError::load(path, "no *.safetensors weights"));
        }
        for shard in shards {
            let bytes = std::fs::read(&shard).map_err(|e| EngineError::load(&shard, e.to_string()))?;
            let loaded = candle_core::safetensors::load_buffer(&bytes, device)
                .map_err(|e| EngineError::load(&shard, format!("not readable as safetensors: {e}")))?;
            for (name, tensor) in loaded {
                tensors.insert(name, tensor.to_dtype(DType::F32)?);
            }
        }
        let builder = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = BertModel::load(builder, &config)
            .map_err(|e| EngineError::load(path, format!("the weights do not fit a BERT model: {e}")))?;
        let tokenizer_path = path.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EngineError::load(&tokenizer_path, format!("not a usable tokenizer.json: {e}")))?;
        let max_tokens = config.max_position_embeddings;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() }))
            .map_err(|e| EngineError::load(&tokenizer_path, e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(EmbeddingModel {
            model,
            tokenizer,
            device: device.clone(),
            dimensions: config.hidden_size,
            max_tokens,
            pad_id: u32::try_from(config.pad_token_id).unwrap_or(0),
            pooling,
        })
    }

    /// How this model pools token states into a sentence embedding.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// The length of each embedding.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Tokens per text at most; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The model's tokenizer as `tokenizer.json` text (truncation to [`Self::max_tokens`]
    /// included), so a chunker elsewhere counts tokens exactly as this model sees them.
    pub fn tokenizer_json(&self) -> Result<String> {
        self.tokenizer.to_string(false).map_err(EngineError::tokenizer)
    }

    /// Tokens of `text` as embedded (special tokens included, before truncation).
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        let mut tokenizer = self.tokenizer.clone();
        tokenizer.with_truncation(None).map_err(EngineError::tokenizer)?;
        Ok(tokenizer.encode(text, true).map_err(EngineError::tokenizer)?.len())
    }

    /// Unit-length embeddings of `texts`, in order. Texts of similar length are batched
    /// together so that little padding is computed.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(EngineError::tokenizer)?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&index| encodings[index].get_ids().len());
        let mut embeddings = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(BATCH) {
            let ids: Vec<&[u32]> = chunk.iter().map(|&index| encodings[index].get_ids()).collect();
            for (&index, embedding) in chunk.iter().zip(self.embed_batch(&ids)?) {
                embeddings[index] = embedding;
            }
        }
        Ok(embeddings)
    }

    fn embed_batch(&self, ids: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let length = ids.iter().map(|ids| ids.len()).max().unwrap_or(0).max(1);
        let mut input = Vec::with_capacity(ids.len() * length);
        let mut mask = Vec::with_capacity(ids.len() * length);
        for row in ids {
            input.extend_from_slice(row);
            input.extend(std::iter::repeat_n(self.pad_id, length - row.len()));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, length - row.len()));
        }
        let shape = (ids.len(), length);
        let input = Tensor::from_vec(input, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let token_types = input.zeros_like()?;
        let hidden = self.model.forward(&input, &token_types, Some(&mask))?;
        let pooled = match self.pooling {
            Pooling::Mean => {
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                let counts = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
                summed.broadcast_div(&counts)?
            }
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let norms = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
        Ok(pooled.broadcast_div(&norms)?.to_vec2::<f32>()?)
    }
}
