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
//! On the CPU, dense matrices are stored transposed in one column block per core (see
//! `Weight`): a decode step's few rows multiply the blocks in parallel, so single-stream
//! decode uses every core's share of memory bandwidth, and batched decode avoids gemm's
//! packing of a transposed operand. BENCHMARKS.md has the figures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

use crate::config::{Architecture, ModelConfig, RopeScaling, inverse_frequencies};
use crate::error::{EngineError, Result};
use crate::kernels;

/// Above this many rows (a prefill), SwiGLU runs in one pass of `kernels`; up to it (a
/// decode step), in pieces that stay off candle's element-wise pool.
const PARALLEL_MAX_ROWS: usize = 64;
/// Above this many rows, a quantised matrix is dequantised for the product.
const QUANTIZED_DIRECT_MAX_ROWS: usize = 64;
/// KV caches grow in steps of this many positions.
const CACHE_STEP: usize = 128;
/// Element-wise ops on at least this many elements go to candle's thread pool
/// (`PAR_ELEMWISE_MIN` in candle-core 0.11).
const ELEMENTWISE_POOL_MIN: usize = 64 * 1024;

/// A matrix as stored: dense `[out, in]` (any float type) or quantised.
enum RawWeight {
    Dense(Tensor),
    /// Behind an `Arc` as `Weight` keeps it (a `QTensor` with CUDA is 232 bytes).
    Quantized(Arc<QTensor>),
}

impl RawWeight {
    /// `(out, in)`.
    fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            RawWeight::Dense(tensor) => tensor.dims2()?,
            RawWeight::Quantized(tensor) => tensor.shape().dims2()?,
        })
    }

    fn quantization(&self) -> Option<GgmlDType> {
        match self {
            RawWeight::Dense(_) => None,
            RawWeight::Quantized(tensor) => Some(tensor.dtype()),
        }
    }
}

/// A weight matrix ready for `x @ W^T`.
///
/// On the CPU a dense matrix is packed once, at load, in the layout of the engine's own
/// products (`kernels::PackedMatrix`: panels of 64 columns, an AVX-512 kernel; one row, a
/// decode step, streams each thread's share of the matrix sequentially; many rows, a
/// prefill, keep blocks of it in cache while every tile of rows passes). BENCHMARKS.md
/// has what it measured against `gemm` and candle. On other devices it is kept transposed,
/// `[in, out]`, for candle's matmul.
#[derive(Clone)]
enum Weight {
    Packed(Arc<kernels::PackedMatrix>),
    Dense(Tensor),
    Quantized { tensor: Arc<QTensor>, matmul: QMatMul },
}

impl Weight {
    fn new(raw: RawWeight) -> Result<Self> {
        match raw {
            RawWeight::Dense(weight) => Self::dense(&weight),
            RawWeight::Quantized(tensor) => {
                Ok(Weight::Quantized { matmul: QMatMul::from_arc(Arc::clone(&tensor))?, tensor })
            }
        }
    }

    /// From a dense `[out, in]` matrix.
    fn dense(weight: &Tensor) -> Result<Self> {
        let weight = weight.to_dtype(DType::F32)?;
        if weight.device().is_cpu() {
            return Ok(Weight::Packed(Arc::new(kernels::pack(&weight)?)));
        }
        Ok(Weight::Dense(weight.t()?.contiguous()?))
    }

    /// Bytes a product with this matrix reads.
    fn bytes(&self) -> usize {
        match self {
            Weight::Packed(matrix) => matrix.bytes(),
            Weight::Dense(transposed) => transposed.elem_count() * 4,
            Weight::Quantized { tensor, .. } => tensor.storage_size_in_bytes(),
        }
    }

    /// `x` is `[rows, in]`; returns `x @ W^T`, `[rows, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Packed(matrix) => kernels::packed_product(&x.contiguous()?, matrix),
            Weight::Dense(transposed) => Ok(x.matmul(transposed)?),
            Weight::Quantized { tensor, matmul } => {
                if x.dim(0)? > QUANTIZED_DIRECT_MAX_ROWS {
                    // Many rows (a prefill): dequantising once and one f32 gemm beat
                    // candle's quantised kernels, which are built for a few rows.
                    let dense = tensor.dequantize(x.device())?;
                    Ok(x.matmul(&dense.t()?)?)
                } else {
                    Ok(matmul.forward(x)?)
                }
            }
        }
    }

    /// Rows `ids` of the `[out, in]` matrix, as `[ids, in]`: embeddings looked up in a
    /// dense LM head that shares them (tied embeddings, stored once).
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let outside = || EngineError::BadRequest("a token id is outside the vocabulary".into());
        match self {
            Weight::Packed(matrix) => {
                let mut values = Vec::with_capacity(ids.len() * matrix.inner());
                for &id in ids {
                    matrix.row_into(id as usize, &mut values).map_err(|_| outside())?;
                }
                Ok(Tensor::from_vec(values, (ids.len(), matrix.inner()), &Device::Cpu)?)
            }
            Weight::Dense(transposed) => {
                let vocabulary = transposed.dim(1)?;
                if ids.iter().any(|&id| id as usize >= vocabulary) {
                    return Err(outside());
                }
                let ids = Tensor::new(ids, transposed.device())?;
                Ok(transposed.index_select(&ids, 1)?.t()?.contiguous()?)
            }
            Weight::Quantized { .. } => {
                Err(EngineError::BadRequest("rows of a quantised matrix are not available".into()))
            }
        }
    }

    /// Stacks matrices by output rows into one where their kinds allow (all dense, or all
    /// quantised with one type on the CPU); otherwise keeps them apart.
    fn stack(weights: Vec<RawWeight>) -> Result<Vec<Weight>> {
        if weights.len() < 2 {
            return weights.into_iter().map(Weight::new).collect();
        }
        if weights.iter().all(|w| matches!(w, RawWeight::Dense(_))) {
            let dense: Vec<Tensor> = weights
                .into_iter()
                .map(|w| match w {
                    RawWeight::Dense(tensor) => tensor.to_dtype(DType::F32),
                    RawWeight::Quantized(_) => unreachable!("all dense"),
                })
                .collect::<candle_core::Result<_>>()?;
            return Ok(vec![Weight::dense(&Tensor::cat(&dense, 0)?)?]);
        }
        let first = weights[0].quantization();
        let in_features = weights[0].dims()?.1;
        let on_cpu = matches!(&weights[0], RawWeight::Quantized(tensor) if tensor.device().is_cpu());
        // Quantised rows are whole blocks, so stacking is joining bytes, which only the CPU
        // storage hands out.
        if on_cpu && first.is_some() && weights.iter().all(|w| w.quantization() == first) {
            let dtype = first.unwrap_or(GgmlDType::F32);
            let mut bytes = Vec::new();
            let mut rows = 0;
            let mut device = Device::Cpu;
            for weight in &weights {
                if let RawWeight::Quantized(tensor) = weight {
                    bytes.extend_from_slice(&tensor.data()?);
                    rows += tensor.shape().dims2()?.0;
                    device = tensor.device();
                }
            }
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &device, dtype)?;
            return Ok(vec![Weight::new(RawWeight::Quantized(Arc::new(QTensor::new(storage, (rows, in_features))?)))?]);
        }
        weights.into_iter().map(Weight::new).collect()
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
    /// Positions the cache may ever hold: it grows by doubling, but never past this.
    limit: usize,
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
    embeddings: Embeddings,
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

/// A source of named tensors: vectors (as f32) and matrices.
trait TensorSource {
    fn has(&self, name: &str) -> bool;
    fn dense(&mut self, name: &str) -> Result<Tensor>;
    fn matrix(&mut self, name: &str) -> Result<RawWeight>;
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

    fn matrix(&mut self, name: &str) -> Result<RawWeight> {
        Ok(RawWeight::Dense(self.dense(name)?))
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

    fn matrix(&mut self, name: &str) -> Result<RawWeight> {
        let tensor = self.qtensor(name)?;
        Ok(match tensor.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => RawWeight::Dense(tensor.dequantize(&self.device)?),
            _ => RawWeight::Quantized(Arc::new(tensor)),
        })
    }
}

/// Where token embeddings are looked up.
enum Embeddings {
    /// Their own `[vocab, hidden]` table.
    Table(Tensor),
    /// The rows of the dense LM head, which they are tied to (stored once).
    Head,
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
        let check = |tensor: &Tensor, name: &str, dims: &[usize]| check_vector(&path, tensor, name, dims);
        let check_matrix =
            |weight: &RawWeight, name: &str, out: usize, input: usize| check_matrix(&path, weight, name, (out, input));
        let hidden = config.hidden;
        let embeddings_name = names.embeddings();
        let embeddings = source.matrix(&embeddings_name)?;
        let vocab = embeddings.dims()?.0;
        check_matrix(&embeddings, &embeddings_name, vocab, hidden)?;
        if vocab != config.vocab {
            tracing::warn!(
                config = config.vocab,
                tensor = vocab,
                "the embeddings' vocabulary differs from the config's"
            );
        }
        let config = ModelConfig { vocab, ..config };

        let layers = (0..config.layers)
            .map(|layer| load_layer(source, names, &config, layer, &path))
            .collect::<Result<Vec<_>>>()?;
        let norm_name = names.norm();
        let norm = source.dense(&norm_name)?;
        check(&norm, &norm_name, &[hidden])?;
        let head_name = names.lm_head();
        let (embeddings, lm_head) = if source.has(&head_name) {
            let head = source.matrix(&head_name)?;
            check_matrix(&head, &head_name, vocab, hidden)?;
            let table = match embeddings {
                RawWeight::Dense(table) => table.to_dtype(DType::F32)?.contiguous()?,
                RawWeight::Quantized(table) => table.dequantize(device)?,
            };
            (Embeddings::Table(table), Weight::new(head)?)
        } else if config.tie_word_embeddings || summary.format == "gguf" {
            // Tied (GGUF files leave out output.weight then): a dense head holds the
            // embeddings as its rows; a quantised one is kept quantised for the products
            // and dequantised once for the lookups.
            match embeddings {
                RawWeight::Dense(table) => (Embeddings::Head, Weight::dense(&table)?),
                RawWeight::Quantized(table) => {
                    let lookup = table.dequantize(device)?;
                    (Embeddings::Table(lookup), Weight::new(RawWeight::Quantized(table))?)
                }
            }
        } else {
            return Err(EngineError::load(
                &path,
                format!("tensor {head_name} is missing (tie_word_embeddings is false)"),
            ));
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
        let mut total = self.lm_head.bytes() + self.config.hidden * 4 * (1 + 2 * self.config.layers);
        for layer in &self.layers {
            total += layer.qkv.weights.iter().chain(&layer.gate_up.weights).map(Weight::bytes).sum::<usize>();
            total += layer.output.bytes() + layer.down.bytes();
        }
        total
    }

    /// The embeddings of `tokens` (`ids` is the same as a tensor): `[tokens, hidden]`.
    fn embed(&self, tokens: &[u32], ids: &Tensor) -> Result<Tensor> {
        match &self.embeddings {
            Embeddings::Table(table) => Ok(table.index_select(ids, 0)?),
            Embeddings::Head => self.lm_head.rows(tokens),
        }
    }

    /// An empty cache for a new sequence, which may grow to the whole context.
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_for(self.config.context_length)
    }

    /// An empty cache for a sequence of at most `positions` (its prompt and output): its
    /// memory never exceeds that many positions' keys and values.
    pub fn new_cache_for(&self, positions: usize) -> KvCache {
        KvCache { layers: Vec::new(), len: 0, capacity: 0, limit: positions.min(self.config.context_length) }
    }

    /// Runs `tokens` (the next positions of one sequence) through the model, appending to
    /// its cache. Returns logits `[tokens, vocab]` for every position when `all_logits`,
    /// else `[1, vocab]` for the last.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Tensor> {
        on_pool(|| {
            let hidden = self.run(tokens, cache)?;
            let hidden = if all_logits { hidden } else { hidden.narrow(0, tokens.len() - 1, 1)? };
            let hidden = candle_nn::ops::rms_norm(&hidden, &self.norm, self.eps())?;
            self.lm_head.forward(&hidden)
        })
    }

    /// Appends `tokens` to a sequence's cache without computing logits (a prefill chunk
    /// that is not the last).
    pub fn extend(&self, tokens: &[u32], cache: &mut KvCache) -> Result<()> {
        on_pool(|| self.run(tokens, cache).map(drop))
    }

    /// The layers over `tokens`: returns the last hidden states `[tokens, hidden]`.
    // x, h, q, k, v as the papers name them.
    #[allow(clippy::many_single_char_names)]
    fn run(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let count = tokens.len();
        if count == 0 {
            return Err(EngineError::BadRequest("no tokens to run".into()));
        }
        let start = cache.len;
        self.reserve(cache, start + count)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed(tokens, &ids)?;
        let cos = self.cos.narrow(0, start, count)?;
        let sin = self.sin.narrow(0, start, count)?;
        let (heads, kv_heads, head_dim) = (self.config.heads, self.config.kv_heads, self.config.head_dim);
        let on_cpu = self.device.is_cpu();
        let mask = if on_cpu { None } else { causal_mask(count, start, &self.device)? };
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
            #[allow(clippy::cast_possible_truncation)]
            let attended = if on_cpu {
                kernels::causal_attention(&q.squeeze(0)?, k_cache, v_cache, start, self.scale() as f32)?
            } else {
                self.attention(&q, (k_cache, v_cache), start, mask.as_ref())?
            };
            x = (x + layer.output.forward(&attended)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        cache.len = start + count;
        Ok(x)
    }

    /// Attention of a chunk's `q` (`[1, heads, count, head_dim]`) against a layer's caches
    /// through candle's ops (other devices than the CPU, which has
    /// `kernels::causal_attention`): `[count, heads * head_dim]`.
    fn attention(
        &self,
        q: &Tensor,
        (k_cache, v_cache): (&Tensor, &Tensor),
        start: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (heads, kv_heads, head_dim) = (self.config.heads, self.config.kv_heads, self.config.head_dim);
        let (group, count) = (heads / kv_heads, q.dim(2)?);
        let keys = k_cache.narrow(1, 0, start + count)?;
        let values = v_cache.narrow(1, 0, start + count)?;
        // Heads that share a kv head are stacked: [kv_heads, group * count, head_dim].
        let q = (q.squeeze(0)?.reshape((kv_heads, group * count, head_dim))? * self.scale())?;
        let scores = q.matmul(&keys.t()?)?.reshape((kv_heads, group, count, start + count))?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probabilities = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probabilities
            .reshape((kv_heads, group * count, start + count))?
            .matmul(&values)?
            .reshape((heads, count, head_dim))?
            .transpose(0, 1)?
            .reshape((count, heads * head_dim))?)
    }

    /// One decode step for several sequences: `tokens[i]` is the next token of the sequence
    /// whose cache is `caches[i]`. Returns logits `[sequences, vocab]`.
    pub fn decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        on_pool(|| self.decode_here(tokens, caches))
    }

    #[allow(clippy::many_single_char_names)]
    fn decode_here(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let batch = tokens.len();
        if batch == 0 || batch != caches.len() {
            return Err(EngineError::BadRequest("a decode step needs one token per cache".into()));
        }
        for cache in caches.iter_mut() {
            let needed = cache.len + 1;
            self.reserve(cache, needed)?;
        }
        let positions: Vec<u32> = caches.iter().map(|cache| u32::try_from(cache.len).unwrap_or(u32::MAX)).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let half = self.config.head_dim / 2;
        let cos = self.cos.index_select(&positions, 0)?.reshape((batch, 1, half))?;
        let sin = self.sin.index_select(&positions, 0)?.reshape((batch, 1, half))?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed(tokens, &ids)?;
        let (heads, kv_heads, head_dim) = (self.config.heads, self.config.kv_heads, self.config.head_dim);
        let group = heads / kv_heads;
        let on_cpu = self.device.is_cpu();
        // Each sequence's positions once this step's is in its cache.
        let lengths: Vec<usize> = caches.iter().map(|cache| cache.len + 1).collect();
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
            for (sequence, cache) in caches.iter().enumerate() {
                let (k_cache, v_cache) = &cache.layers[index];
                k_cache.slice_set(&k.get(sequence)?, 1, cache.len)?;
                v_cache.slice_set(&v.get(sequence)?.reshape((kv_heads, 1, head_dim))?, 1, cache.len)?;
            }
            let attended = if on_cpu {
                let layers: Vec<(&Tensor, &Tensor)> =
                    caches.iter().map(|cache| (&cache.layers[index].0, &cache.layers[index].1)).collect();
                kernels::decode_attention(&q.reshape((batch, heads, head_dim))?, &layers, &lengths)?
            } else {
                let mut attended = Vec::with_capacity(batch);
                for (sequence, cache) in caches.iter().enumerate() {
                    let (k_cache, v_cache) = &cache.layers[index];
                    let keys = k_cache.narrow(1, 0, cache.len + 1)?;
                    let values = v_cache.narrow(1, 0, cache.len + 1)?;
                    let q = q.get(sequence)?.reshape((kv_heads, group, head_dim))?;
                    let probabilities = candle_nn::ops::softmax_last_dim(&q.matmul(&keys.t()?)?)?;
                    attended.push(probabilities.matmul(&values)?.reshape((1, heads * head_dim))?);
                }
                Tensor::cat(&attended, 0)?
            };
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
        let swiglu = |rows: std::ops::Range<usize>| -> Result<Tensor> {
            let part = gate_up.narrow(0, rows.start, rows.len())?;
            let gate = part.narrow(1, 0, intermediate)?;
            let up = part.narrow(1, intermediate, intermediate)?;
            Ok((candle_nn::ops::silu(&gate)? * up)?)
        };
        let rows = gate_up.dim(0)?;
        // candle hands element-wise ops of 64Ki elements or more to a pool whose worker
        // then spins for a while; on a small machine that spinning takes a core from the
        // next matmul. A decode step's few rows are cheap to do in pieces below that size.
        let activated = if rows > PARALLEL_MAX_ROWS && gate_up.device().is_cpu() {
            kernels::swiglu(&gate_up)?
        } else if rows > 1 && rows <= PARALLEL_MAX_ROWS && rows * intermediate >= ELEMENTWISE_POOL_MIN {
            let chunk = ((ELEMENTWISE_POOL_MIN - 1) / intermediate.max(1)).max(1);
            let pieces = (0..rows)
                .step_by(chunk)
                .map(|start| swiglu(start..(start + chunk).min(rows)))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&pieces, 0)?
        } else {
            swiglu(0..rows)?
        };
        layer.down.forward(&activated)
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
        let capacity = capacity.min(self.config.context_length).min(cache.limit).max(needed);
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

/// Runs `work` on a thread of rayon's pool. A forward pass splits ~100 products and
/// other ops across the pool; started from a thread outside it, each of them would be
/// handed over and waited for (a sleep and a wake-up of the caller every time), where a
/// pool thread runs one part itself and waits only for the others.
fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

fn check_vector(path: &Path, tensor: &Tensor, name: &str, dims: &[usize]) -> Result<()> {
    if tensor.dims() == dims {
        Ok(())
    } else {
        Err(EngineError::load(
            path,
            format!("tensor {name} has shape {:?}, the config implies {dims:?}", tensor.dims()),
        ))
    }
}

fn check_matrix(path: &Path, weight: &RawWeight, name: &str, expected: (usize, usize)) -> Result<()> {
    let got = weight.dims()?;
    if got == expected {
        Ok(())
    } else {
        Err(EngineError::load(path, format!("tensor {name} is {got:?}, the config implies {expected:?}")))
    }
}

/// Reads one decoder layer's tensors, checking their shapes against the config.
fn load_layer(
    source: &mut dyn TensorSource,
    names: &dyn TensorNames,
    config: &ModelConfig,
    layer: usize,
    path: &Path,
) -> Result<Layer> {
    let hidden = config.hidden;
    let q_out = config.heads * config.head_dim;
    let kv_out = config.kv_heads * config.head_dim;
    let mut matrix = |part: Part, out: usize, input: usize| -> Result<RawWeight> {
        let name = names.layer(layer, part);
        let weight = source.matrix(&name)?;
        check_matrix(path, &weight, &name, (out, input))?;
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
            check_vector(path, &bias, name, &[len])?;
            biases.push(bias);
        }
        Some(Tensor::cat(&biases, 0)?)
    } else {
        None
    };
    let mut vector = |part: Part| -> Result<Tensor> {
        let name = names.layer(layer, part);
        let tensor = source.dense(&name)?;
        check_vector(path, &tensor, &name, &[hidden])?;
        Ok(tensor)
    };
    Ok(Layer {
        attention_norm: vector(Part::AttentionNorm)?,
        mlp_norm: vector(Part::MlpNorm)?,
        qkv: Projection { weights: Weight::stack(vec![q, k, v])?, bias: qkv_bias },
        output: Weight::new(output)?,
        gate_up: Projection { weights: Weight::stack(vec![gate, up])?, bias: None },
        down: Weight::new(down)?,
    })
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
pub(crate) fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>> {
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
    let context_length = integer("context_length").unwrap_or(4096);
    let (rope_scaling, context_length) = match get(&format!("{prefix}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
    {
        Some("linear") => (RopeScaling::Linear { factor: float("rope.scaling.factor").unwrap_or(1.0) }, context_length),
        None | Some("none" | "") => (RopeScaling::None, context_length),
        // YaRN and the like are not implemented: serve the context the model was
        // trained on, where no scaling applies, as the safetensors path does.
        Some(other) => {
            let original = integer("rope.scaling.original_context_length").map_err(|_| {
                EngineError::load(
                    path,
                    format!("rope scaling {other:?} is not supported and names no original context length"),
                )
            })?;
            tracing::warn!(
                kind = other,
                original,
                "rope scaling of this kind is not implemented: serving only the original context length"
            );
            (RopeScaling::None, original.min(context_length))
        }
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
        context_length,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        tiny_random: get("maas.tiny_random").and_then(|v| v.to_bool().ok()).unwrap_or(false),
    };
    config.validate(path)?;
    Ok(config)
}
