//! The Llama-family decoder (`llama`, `mistral`, `qwen2`) on candle, with one KV cache per
//! sequence so that sequences of different lengths decode together.
//!
//! One forward pass serves both weight formats: a linear layer is a dense f32 matrix (from
//! safetensors, or a GGUF F32/F16 tensor) or a quantised GGUF tensor run through
//! [`QMatMul`]. Activations are f32. f16/bf16 safetensors are converted to f32 when they
//! load: candle's CPU matmul has no bf16 kernel, and f32 keeps the logits exact against a
//! plain reference.
//!
//! A decode step takes the last token of every active sequence as one `[B, hidden]`
//! matrix through the projections and the MLP (one matmul per layer for all sequences);
//! attention runs per sequence against its own cache, since lengths differ.
//!
//! On the CPU, a matrix-vector product (one or a few rows) is split by output rows across
//! the rayon pool: candle's gemv for a single row runs on one thread, which leaves the
//! other cores (and memory bandwidth) idle during single-stream decode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};
use rayon::prelude::*;

use crate::config::{Architecture, ModelConfig, RopeScaling, inverse_frequencies};
use crate::error::{EngineError, Result};

/// Above this many rows a projection is one gemm (which candle parallelises itself).
const SPLIT_MAX_ROWS: usize = 8;
/// A matrix is split only if each part keeps at least this many output rows.
const SPLIT_MIN_PART_ROWS: usize = 64;
/// KV caches grow in steps of this many positions.
const CACHE_STEP: usize = 128;

/// A weight matrix `[out, in]`, dense or quantised.
#[derive(Clone)]
enum Weight {
    Dense { weight: Tensor, parts: Vec<Tensor> },
    Quantized { tensor: Arc<QTensor>, matmul: QMatMul },
}

impl Weight {
    fn dense(weight: Tensor) -> Result<Self> {
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let (rows, _) = weight.dims2()?;
        let threads = if weight.device().is_cpu() { rayon::current_num_threads() } else { 1 };
        let part_count = threads.min(rows / SPLIT_MIN_PART_ROWS).max(1);
        let mut parts = Vec::new();
        if part_count > 1 {
            let mut start = 0;
            for index in 0..part_count {
                let end = rows * (index + 1) / part_count;
                parts.push(weight.narrow(0, start, end - start)?);
                start = end;
            }
        }
        Ok(Weight::Dense { weight, parts })
    }

    fn from_qtensor(tensor: QTensor, device: &Device) -> Result<Self> {
        match tensor.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Weight::dense(tensor.dequantize(device)?),
            _ => {
                let tensor = Arc::new(tensor);
                Ok(Weight::Quantized { matmul: QMatMul::from_arc(Arc::clone(&tensor))?, tensor })
            }
        }
    }

    fn out_features(&self) -> Result<usize> {
        Ok(match self {
            Weight::Dense { weight, .. } => weight.dim(0)?,
            Weight::Quantized { tensor, .. } => tensor.shape().dims2()?.0,
        })
    }

    fn in_features(&self) -> Result<usize> {
        Ok(match self {
            Weight::Dense { weight, .. } => weight.dim(1)?,
            Weight::Quantized { tensor, .. } => tensor.shape().dims2()?.1,
        })
    }

    fn quantization(&self) -> Option<GgmlDType> {
        match self {
            Weight::Dense { .. } => None,
            Weight::Quantized { tensor, .. } => Some(tensor.dtype()),
        }
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense { weight, parts } => {
                let rows = x.dim(0)?;
                if parts.len() > 1 && rows <= SPLIT_MAX_ROWS {
                    let outputs: Vec<Tensor> = parts
                        .par_iter()
                        .map(|part| x.matmul(&part.t()?))
                        .collect::<candle_core::Result<_>>()?;
                    Ok(Tensor::cat(&outputs, 1)?)
                } else {
                    Ok(x.matmul(&weight.t()?)?)
                }
            }
            Weight::Quantized { matmul, .. } => Ok(matmul.forward(x)?),
        }
    }

    /// Stacks matrices by rows into one where their kinds allow (all dense, or all
    /// quantised with one type); otherwise keeps them apart.
    fn stack(weights: Vec<Weight>) -> Result<Vec<Weight>> {
        if weights.len() < 2 {
            return Ok(weights);
        }
        if weights.iter().all(|w| matches!(w, Weight::Dense { .. })) {
            let dense: Vec<Tensor> = weights
                .iter()
                .map(|w| match w {
                    Weight::Dense { weight, .. } => weight.clone(),
                    Weight::Quantized { .. } => unreachable!("all dense"),
                })
                .collect();
            return Ok(vec![Weight::dense(Tensor::cat(&dense, 0)?)?]);
        }
        let first = weights[0].quantization();
        let in_features = weights[0].in_features()?;
        if first.is_some() && weights.iter().all(|w| w.quantization() == first) {
            let dtype = first.unwrap_or(GgmlDType::F32);
            let mut bytes = Vec::new();
            let mut rows = 0;
            for weight in &weights {
                if let Weight::Quantized { tensor, .. } = weight {
                    bytes.extend_from_slice(&tensor.data()?);
                    rows += tensor.shape().dims2()?.0;
                }
            }
            let Weight::Quantized { tensor, .. } = &weights[0] else { unreachable!("quantised") };
            let device = tensor.device();
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &device, dtype)?;
            let stacked = QTensor::new(storage, (rows, in_features))?;
            return Ok(vec![Weight::from_qtensor(stacked, &device)?]);
        }
        Ok(weights)
    }
}

/// Projections whose outputs sit side by side: `[rows, sum of outs]`, plus a bias.
struct Projection {
    weights: Vec<Weight>,
    bias: Option<Tensor>,
}

impl Projection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = if self.weights.len() == 1 {
            self.weights[0].forward(x)?
        } else {
            let outputs = self.weights.iter().map(|w| w.forward(x)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&outputs, 1)?
        };
        match &self.bias {
            Some(bias) => Ok(out.broadcast_add(bias)?),
            None => Ok(out),
        }
    }
}

struct Layer {
    attention_norm: Tensor,
    /// q, k and v side by side.
    qkv: Projection,
    output: Weight,
    mlp_norm: Tensor,
    /// gate and up side by side.
    gate_up: Projection,
    down: Weight,
}

/// One sequence's keys and values for every layer, `[kv_heads, capacity, head_dim]` each;
/// positions `0..len` are filled.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Positions held (the prompt and generated tokens so far).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the cache holds.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * 4).sum()
    }
}

/// Where the weights came from, for [`crate::ModelInfo`].
#[derive(Debug, Clone)]
pub struct WeightsSummary {
    pub format: &'static str,
    /// The dtype of the stored weights (`f32`, `bf16`, `q8_0`, ...).
    pub stored_dtype: String,
    /// The most common quantisation of the matrices, if any.
    pub quantization: Option<String>,
    pub path: PathBuf,
}

/// A loaded decoder.
pub struct CausalLm {
    config: ModelConfig,
    device: Device,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Weight,
    cos: Tensor,
    sin: Tensor,
    summary: WeightsSummary,
}

/// The names of the tensors in one format.
trait TensorNames {
    fn embeddings(&self) -> String;
    fn norm(&self) -> String;
    fn lm_head(&self) -> String;
    fn layer(&self, layer: usize, part: Part) -> String;
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    Output,
    AttentionNorm,
    MlpNorm,
    Gate,
    Up,
    Down,
}

struct HfNames;

impl TensorNames for HfNames {
    fn embeddings(&self) -> String {
        "model.embed_tokens.weight".into()
    }
    fn norm(&self) -> String {
        "model.norm.weight".into()
    }
    fn lm_head(&self) -> String {
        "lm_head.weight".into()
    }
    fn layer(&self, layer: usize, part: Part) -> String {
        let name = match part {
            Part::Q => "self_attn.q_proj.weight",
            Part::K => "self_attn.k_proj.weight",
            Part::V => "self_attn.v_proj.weight",
            Part::QBias => "self_attn.q_proj.bias",
            Part::KBias => "self_attn.k_proj.bias",
            Part::VBias => "self_attn.v_proj.bias",
            Part::Output => "self_attn.o_proj.weight",
            Part::AttentionNorm => "input_layernorm.weight",
            Part::MlpNorm => "post_attention_layernorm.weight",
            Part::Gate => "mlp.gate_proj.weight",
            Part::Up => "mlp.up_proj.weight",
            Part::Down => "mlp.down_proj.weight",
        };
        format!("model.layers.{layer}.{name}")
    }
}

struct GgufNames;

impl TensorNames for GgufNames {
    fn embeddings(&self) -> String {
        "token_embd.weight".into()
    }
    fn norm(&self) -> String {
        "output_norm.weight".into()
    }
    fn lm_head(&self) -> String {
        "output.weight".into()
    }
    fn layer(&self, layer: usize, part: Part) -> String {
        let name = match part {
            Part::Q => "attn_q.weight",
            Part::K => "attn_k.weight",
            Part::V => "attn_v.weight",
            Part::QBias => "attn_q.bias",
            Part::KBias => "attn_k.bias",
            Part::VBias => "attn_v.bias",
            Part::Output => "attn_output.weight",
            Part::AttentionNorm => "attn_norm.weight",
            Part::MlpNorm => "ffn_norm.weight",
            Part::Gate => "ffn_gate.weight",
            Part::Up => "ffn_up.weight",
            Part::Down => "ffn_down.weight",
        };
        format!("blk.{layer}.{name}")
    }
}

/// A source of named tensors: dense ones (vectors, embeddings) and matrices.
trait TensorSource {
    fn has(&self, name: &str) -> bool;
    fn dense(&mut self, name: &str) -> Result<Tensor>;
    fn weight(&mut self, name: &str) -> Result<Weight>;
}

struct SafetensorsSource {
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

impl TensorSource for SafetensorsSource {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| EngineError::load(&self.path, format!("tensor {name} is missing")))?;
        Ok(tensor.to_dtype(DType::F32)?)
    }

    fn weight(&mut self, name: &str) -> Result<Weight> {
        Weight::dense(self.dense(name)?)
    }
}

struct GgufSource {
    content: gguf_file::Content,
    file: std::io::BufReader<std::fs::File>,
    device: Device,
    path: PathBuf,
}

impl GgufSource {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has(name) {
            return Err(EngineError::load(&self.path, format!("tensor {name} is missing")));
        }
        self.content
            .tensor(&mut self.file, name, &self.device)
            .map_err(|e| EngineError::load(&self.path, format!("tensor {name}: {e}")))
    }
}

impl TensorSource for GgufSource {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let device = self.device.clone();
        Ok(self.qtensor(name)?.dequantize(&device)?)
    }

    fn weight(&mut self, name: &str) -> Result<Weight> {
        let device = self.device.clone();
        Weight::from_qtensor(self.qtensor(name)?, &device)
    }
}

impl CausalLm {
    /// Loads a Hugging Face folder (config.json and *.safetensors, sharded or not) or a
    /// `.gguf` file onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if path.is_dir() {
            Self::load_folder(path, device)
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            Self::load_gguf(path, device)
        } else {
            Err(EngineError::load(path, "expected a folder with config.json and *.safetensors, or a .gguf file"))
        }
    }

    fn load_folder(dir: &Path, device: &Device) -> Result<Self> {
        let config_json = read_json(&dir.join("config.json"))?;
        let config = ModelConfig::from_hf(dir, &config_json)?;
        let mut tensors = HashMap::new();
        let mut stored_dtype = None;
        for shard in safetensors_shards(dir)? {
            let bytes = std::fs::read(&shard).map_err(|e| EngineError::load(&shard, e.to_string()))?;
            let loaded = candle_core::safetensors::load_buffer(&bytes, device)
                .map_err(|e| EngineError::load(&shard, format!("not readable as safetensors: {e}")))?;
            for (name, tensor) in loaded {
                if name.ends_with("_proj.weight") && stored_dtype.is_none() {
                    stored_dtype = Some(format!("{:?}", tensor.dtype()).to_lowercase());
                }
                tensors.insert(name, tensor);
            }
        }
        let mut source = SafetensorsSource { tensors, path: dir.to_owned() };
        let summary = WeightsSummary {
            format: "safetensors",
            stored_dtype: stored_dtype.unwrap_or_else(|| "f32".into()),
            quantization: None,
            path: dir.to_owned(),
        };
        Self::build(config, &mut source, &HfNames, device, summary)
    }

    fn load_gguf(path: &Path, device: &Device) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::load(path, e.to_string()))?;
        let mut file = std::io::BufReader::new(file);
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::load(path, format!("not a readable GGUF file: {e}")))?;
        let mut config = config_from_gguf(path, &content)?;
        let mut source = GgufSource { content, file, device: device.clone(), path: path.to_owned() };
        if source.has("rope_freqs.weight") {
            let divisors = source.dense("rope_freqs.weight")?.flatten_all()?.to_vec1::<f32>()?;
            config.rope_scaling = RopeScaling::Divisors(divisors);
        }
        let mut counts: HashMap<GgmlDType, usize> = HashMap::new();
        for (name, info) in &source.content.tensor_infos {
            if name.starts_with("blk.") && name.ends_with(".weight") && info.shape.rank() == 2 {
                *counts.entry(info.ggml_dtype).or_default() += 1;
            }
        }
        let most_common = counts.into_iter().max_by_key(|(dtype, count)| (*count, format!("{dtype:?}")));
        let stored = most_common.map_or_else(|| "f32".to_owned(), |(dtype, _)| format!("{dtype:?}").to_lowercase());
        let quantized = !matches!(stored.as_str(), "f32" | "f16" | "bf16");
        let summary = WeightsSummary {
            format: "gguf",
            stored_dtype: stored.clone(),
            quantization: quantized.then_some(stored),
            path: path.to_owned(),
        };
        Self::build(config, &mut source, &GgufNames, device, summary)
    }

    fn build(
        config: ModelConfig,
        source: &mut dyn TensorSource,
        names: &dyn TensorNames,
        device: &Device,
        summary: WeightsSummary,
    ) -> Result<Self> {
        let path = summary.path.clone();
        let check = |tensor: &Tensor, name: &str, dims: &[usize]| -> Result<()> {
            if tensor.dims() == dims {
                Ok(())
            } else {
                Err(EngineError::load(
                    &path,
                    format!("tensor {name} has shape {:?}, the config implies {dims:?}", tensor.dims()),
                ))
            }
        };
        let check_weight = |weight: &Weight, name: &str, out: usize, input: usize| -> Result<()> {
            let got = (weight.out_features()?, weight.in_features()?);
            if got == (out, input) {
                Ok(())
            } else {
                Err(EngineError::load(&path, format!("tensor {name} is {got:?}, the config implies {:?}", (out, input))))
            }
        };
        let hidden = config.hidden;
        let q_out = config.heads * config.head_dim;
        let kv_out = config.kv_heads * config.head_dim;

        let embeddings_name = names.embeddings();
        let embeddings = source.dense(&embeddings_name)?.contiguous()?;
        let vocab = embeddings.dim(0)?;
        check(&embeddings, &embeddings_name, &[vocab, hidden])?;
        if vocab != config.vocab {
            tracing::warn!(config = config.vocab, tensor = vocab, "the embeddings' vocabulary differs from the config's");
        }
        let config = ModelConfig { vocab, ..config };

        let mut layers = Vec::with_capacity(config.layers);
        for layer in 0..config.layers {
            let mut matrix = |part: Part, out: usize, input: usize| -> Result<Weight> {
                let name = names.layer(layer, part);
                let weight = source.weight(&name)?;
                check_weight(&weight, &name, out, input)?;
                Ok(weight)
            };
            let q = matrix(Part::Q, q_out, hidden)?;
            let k = matrix(Part::K, kv_out, hidden)?;
            let v = matrix(Part::V, kv_out, hidden)?;
            let output = matrix(Part::Output, hidden, q_out)?;
            let gate = matrix(Part::Gate, config.intermediate, hidden)?;
            let up = matrix(Part::Up, config.intermediate, hidden)?;
            let down = matrix(Part::Down, hidden, config.intermediate)?;
            let bias_names = [Part::QBias, Part::KBias, Part::VBias].map(|part| names.layer(layer, part));
            let qkv_bias = if config.attention_bias || bias_names.iter().all(|name| source.has(name)) {
                let mut biases = Vec::new();
                for (name, len) in bias_names.iter().zip([q_out, kv_out, kv_out]) {
                    let bias = source.dense(name)?;
                    check(&bias, name, &[len])?;
                    biases.push(bias);
                }
                Some(Tensor::cat(&biases, 0)?)
            } else {
                None
            };
            let mut vector = |part: Part| -> Result<Tensor> {
                let name = names.layer(layer, part);
                let tensor = source.dense(&name)?;
                check(&tensor, &name, &[hidden])?;
                Ok(tensor)
            };
            layers.push(Layer {
                attention_norm: vector(Part::AttentionNorm)?,
                mlp_norm: vector(Part::MlpNorm)?,
                qkv: Projection { weights: Weight::stack(vec![q, k, v])?, bias: qkv_bias },
                output,
                gate_up: Projection { weights: Weight::stack(vec![gate, up])?, bias: None },
                down,
            });
        }
        let norm_name = names.norm();
        let norm = source.dense(&norm_name)?;
        check(&norm, &norm_name, &[hidden])?;
        let head_name = names.lm_head();
        let lm_head = if source.has(&head_name) {
            let head = source.weight(&head_name)?;
            check_weight(&head, &head_name, vocab, hidden)?;
            head
        } else if config.tie_word_embeddings || summary.format == "gguf" {
            // GGUF files leave out output.weight when the embeddings are tied.
            Weight::dense(embeddings.clone())?
        } else {
            return Err(EngineError::load(&path, format!("tensor {head_name} is missing (tie_word_embeddings is false)")));
        };
        let (cos, sin) = rotary_tables(&config, device)?;
        Ok(CausalLm { config, device: device.clone(), embeddings, layers, norm, lm_head, cos, sin, summary })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn summary(&self) -> &WeightsSummary {
        &self.summary
    }

    /// Bytes of weights read for one decode step (every matrix and the embedding row).
    pub fn weight_bytes_per_token(&self) -> usize {
        let weight_bytes = |weight: &Weight| match weight {
            Weight::Dense { weight, .. } => weight.elem_count() * 4,
            Weight::Quantized { tensor, .. } => tensor.storage_size_in_bytes(),
        };
        let mut total = weight_bytes(&self.lm_head) + self.config.hidden * 4 * (1 + 2 * self.config.layers);
        for layer in &self.layers {
            total += layer.qkv.weights.iter().chain(&layer.gate_up.weights).map(weight_bytes).sum::<usize>();
            total += weight_bytes(&layer.output) + weight_bytes(&layer.down);
        }
        total
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: Vec::new(), len: 0, capacity: 0 }
    }

    /// Runs `tokens` (the next positions of one sequence) through the model, appending to
    /// its cache. Returns logits `[tokens, vocab]` for every position when `all_logits`,
    /// else `[1, vocab]` for the last.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Tensor> {
        let count = tokens.len();
        if count == 0 {
            return Err(EngineError::BadRequest("no tokens to run".into()));
        }
        let start = cache.len;
        self.reserve(cache, start + count)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embeddings.index_select(&ids, 0)?;
        let cos = self.cos.narrow(0, start, count)?;
        let sin = self.sin.narrow(0, start, count)?;
        let (heads, kv_heads, head_dim) = (self.config.heads, self.config.kv_heads, self.config.head_dim);
        let group = heads / kv_heads;
        let mask = causal_mask(count, start, &self.device)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attention_norm, self.eps())?;
            let qkv = layer.qkv.forward(&h)?;
            let q = qkv.narrow(1, 0, heads * head_dim)?.reshape((count, heads, head_dim))?.transpose(0, 1)?;
            let k = qkv.narrow(1, heads * head_dim, kv_heads * head_dim)?.reshape((count, kv_heads, head_dim))?;
            let v = qkv.narrow(1, (heads + kv_heads) * head_dim, kv_heads * head_dim)?;
            let q = self.rotate(&q.contiguous()?.unsqueeze(0)?, &cos, &sin)?;
            let k = self.rotate(&k.transpose(0, 1)?.contiguous()?.unsqueeze(0)?, &cos, &sin)?.squeeze(0)?;
            let v = v.reshape((count, kv_heads, head_dim))?.transpose(0, 1)?.contiguous()?;
            let (k_cache, v_cache) = &cache.layers[index];
            k_cache.slice_set(&k, 1, start)?;
            v_cache.slice_set(&v, 1, start)?;
            let keys = k_cache.narrow(1, 0, start + count)?;
            let values = v_cache.narrow(1, 0, start + count)?;
            // Heads that share a kv head are stacked: [kv_heads, group * count, head_dim].
            let q = (q.squeeze(0)?.reshape((kv_heads, group * count, head_dim))? * self.scale())?;
            let scores = q.matmul(&keys.t()?)?.reshape((kv_heads, group, count, start + count))?;
            let scores = match &mask {
                Some(mask) => scores.broadcast_add(mask)?,
                None => scores,
            };
            let probabilities = candle_nn::ops::softmax_last_dim(&scores)?;
            let attended = probabilities
                .reshape((kv_heads, group * count, start + count))?
                .matmul(&values)?
                .reshape((heads, count, head_dim))?
                .transpose(0, 1)?
                .reshape((count, heads * head_dim))?;
            x = (x + layer.output.forward(&attended)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        cache.len = start + count;
        let x = if all_logits { x } else { x.narrow(0, count - 1, 1)? };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.eps())?;
        self.lm_head.forward(&x)
    }

    /// One decode step for several sequences: `tokens[i]` is the next token of the sequence
    /// whose cache is `caches[i]`. Returns logits `[sequences, vocab]`.
    pub fn decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let batch = tokens.len();
        if batch == 0 || batch != caches.len() {
            return Err(EngineError::BadRequest("a decode step needs one token per cache".into()));
        }
        for cache in caches.iter_mut() {
            let needed = cache.len + 1;
            self.reserve(cache, needed)?;
        }
        let positions: Vec<u32> =
            caches.iter().map(|cache| u32::try_from(cache.len).unwrap_or(u32::MAX)).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let half = self.config.head_dim / 2;
        let cos = self.cos.index_select(&positions, 0)?.reshape((batch, 1, half))?;
        let sin = self.sin.index_select(&positions, 0)?.reshape((batch, 1, half))?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embeddings.index_select(&ids, 0)?;
        let (heads, kv_heads, head_dim) = (self.config.heads, self.config.kv_heads, self.config.head_dim);
        let group = heads / kv_heads;
        for (index, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attention_norm, self.eps())?;
            let qkv = layer.qkv.forward(&h)?;
            let q = qkv.narrow(1, 0, heads * head_dim)?.contiguous()?.reshape((batch, heads, 1, head_dim))?;
            let k = qkv
                .narrow(1, heads * head_dim, kv_heads * head_dim)?
                .contiguous()?
                .reshape((batch, kv_heads, 1, head_dim))?;
            let v = qkv.narrow(1, (heads + kv_heads) * head_dim, kv_heads * head_dim)?.contiguous()?;
            let q = (self.rotate(&q, &cos, &sin)? * self.scale())?;
            let k = self.rotate(&k, &cos, &sin)?;
            let mut attended = Vec::with_capacity(batch);
            for (sequence, cache) in caches.iter().enumerate() {
                let position = cache.len;
                let (k_cache, v_cache) = &cache.layers[index];
                k_cache.slice_set(&k.get(sequence)?, 1, position)?;
                v_cache.slice_set(&v.get(sequence)?.reshape((kv_heads, 1, head_dim))?, 1, position)?;
                let keys = k_cache.narrow(1, 0, position + 1)?;
                let values = v_cache.narrow(1, 0, position + 1)?;
                let q = q.get(sequence)?.reshape((kv_heads, group, head_dim))?;
                let probabilities = candle_nn::ops::softmax_last_dim(&q.matmul(&keys.t()?)?)?;
                attended.push(probabilities.matmul(&values)?.reshape((1, heads * head_dim))?);
            }
            let attended = Tensor::cat(&attended, 0)?;
            x = (x + layer.output.forward(&attended)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.eps())?;
        self.lm_head.forward(&x)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x, &layer.mlp_norm, self.eps())?;
        let gate_up = layer.gate_up.forward(&h)?;
        let intermediate = self.config.intermediate;
        let gate = gate_up.narrow(1, 0, intermediate)?;
        let up = gate_up.narrow(1, intermediate, intermediate)?;
        layer.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }

    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(if self.config.rope_interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)?
        })
    }

    #[allow(clippy::cast_precision_loss)]
    fn scale(&self) -> f64 {
        1.0 / (self.config.head_dim as f64).sqrt()
    }

    #[allow(clippy::cast_possible_truncation)]
    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Makes room in `cache` for `needed` positions.
    fn reserve(&self, cache: &mut KvCache, needed: usize) -> Result<()> {
        if needed > self.config.context_length {
            return Err(EngineError::BadRequest(format!(
                "the sequence would reach {needed} tokens, past the context length {}",
                self.config.context_length
            )));
        }
        if needed <= cache.capacity && !cache.layers.is_empty() {
            return Ok(());
        }
        let capacity = needed.max(cache.capacity * 2).div_ceil(CACHE_STEP) * CACHE_STEP;
        let capacity = capacity.min(self.config.context_length).max(needed);
        let shape = (self.config.kv_heads, capacity, self.config.head_dim);
        let mut layers = Vec::with_capacity(self.config.layers);
        for index in 0..self.config.layers {
            let k = Tensor::zeros(shape, DType::F32, &self.device)?;
            let v = Tensor::zeros(shape, DType::F32, &self.device)?;
            if let Some((old_k, old_v)) = cache.layers.get(index)
                && cache.len > 0
            {
                k.slice_set(&old_k.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&old_v.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
            }
            layers.push((k, v));
        }
        cache.layers = layers;
        cache.capacity = capacity;
        Ok(())
    }
}

/// The additive causal mask for `count` new positions after `start` cached ones:
/// `[count, start + count]`, or none for a single position (it sees everything).
fn causal_mask(count: usize, start: usize, device: &Device) -> Result<Option<Tensor>> {
    if count == 1 {
        return Ok(None);
    }
    let total = start + count;
    let mask: Vec<f32> = (0..count)
        .flat_map(|row| (0..total).map(move |column| if column <= start + row { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (count, total), device)?))
}

/// cos and sin of every position's rotation angles: `[context, head_dim / 2]` each.
#[allow(clippy::cast_precision_loss)]
fn rotary_tables(config: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let frequencies = inverse_frequencies(config);
    let half = frequencies.len();
    let mut cos = Vec::with_capacity(config.context_length * half);
    let mut sin = Vec::with_capacity(config.context_length * half);
    for position in 0..config.context_length {
        for frequency in &frequencies {
            let angle = position as f32 * frequency;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (config.context_length, half), device)?,
        Tensor::from_vec(sin, (config.context_length, half), device)?,
    ))
}

/// The weight files of a folder: those a sharded index names, else every `*.safetensors`.
fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    let mut shards: Vec<String> = if index_path.is_file() {
        let index = read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| EngineError::load(&index_path, "weight_map is missing"))?;
        map.values().filter_map(serde_json::Value::as_str).map(str::to_owned).collect()
    } else {
        std::fs::read_dir(dir)
            .map_err(|e| EngineError::load(dir, e.to_string()))?
            .filter_map(std::result::Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".safetensors"))
            .collect()
    };
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(EngineError::load(dir, "no *.safetensors weights"));
    }
    if let Some(bad) = shards.iter().find(|name| name.contains('/') || name.contains('\\') || name.starts_with('.')) {
        return Err(EngineError::load(&index_path, format!("shard name {bad:?} leaves the model folder")));
    }
    Ok(shards.into_iter().map(|name| dir.join(name)).collect())
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::load(path, e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| EngineError::load(path, format!("not valid JSON: {e}")))
}

/// Reads the decoder's shape from GGUF metadata (`{arch}.block_count`, ...).
fn config_from_gguf(path: &Path, content: &gguf_file::Content) -> Result<ModelConfig> {
    let get = |key: &str| content.metadata.get(key);
    let architecture_name = get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| EngineError::load(path, "general.architecture is missing"))?;
    let architecture = match architecture_name.as_str() {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(EngineError::load(
                path,
                format!("architecture {other:?} is not supported: use a llama, mistral or qwen2 model"),
            ));
        }
    };
    let prefix = architecture_name;
    let integer = |key: &str| -> Result<usize> {
        let full = format!("{prefix}.{key}");
        get(&full)
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| EngineError::load(path, format!("metadata {full} is missing")))
    };
    let float = |key: &str| get(&format!("{prefix}.{key}")).and_then(|v| v.to_f32().ok()).map(f64::from);
    let hidden = integer("embedding_length")?;
    let heads = integer("attention.head_count")?;
    let kv_heads = integer("attention.head_count_kv").unwrap_or(heads);
    let head_dim = integer("attention.key_length").unwrap_or(hidden / heads.max(1));
    let vocab = content.tensor_infos.get("token_embd.weight").map_or(0, |info| info.shape.dims()[0]);
    let rope_scaling = match get(&format!("{prefix}.rope.scaling.type")).and_then(|v| v.to_string().ok()) {
        Some(kind) if kind == "linear" => RopeScaling::Linear { factor: float("rope.scaling.factor").unwrap_or(1.0) },
        _ => RopeScaling::None,
    };
    let config = ModelConfig {
        architecture,
        hidden,
        layers: integer("block_count")?,
        heads,
        kv_heads,
        head_dim,
        intermediate: integer("feed_forward_length")?,
        vocab,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling,
        // llama.cpp permutes Llama's q/k rows so that rotary pairs are adjacent; Qwen2
        // keeps the Hugging Face order (NeoX-style rotation).
        rope_interleaved: architecture != Architecture::Qwen2,
        context_length: integer("context_length").unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        tiny_random: get("maas.tiny_random").and_then(|v| v.to_bool().ok()).unwrap_or(false),
    };
    config.validate(path)?;
    Ok(config)
}
