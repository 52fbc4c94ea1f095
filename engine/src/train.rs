//! Fine-tuning of the Llama-family decoder (llama, mistral, qwen2) on candle.
//!
//! - **LoRA**: every linear layer of the decoder (attention `q`, `k`, `v`, `o` and MLP
//!   `gate`, `up`, `down`, as QLoRA and LLaMA-Factory's `all` target) gets a low-rank update
//!   `W + (alpha / rank) * B A`, `A` `[rank, in]` drawn from a seeded uniform, `B` `[out,
//!   rank]` zero, so training starts from the base model's exact outputs. Only `A` and `B`
//!   are trained; the base weights, embeddings and norms are frozen tensors.
//! - **Full**: every matrix, norm and bias (and the embeddings) is trained.
//!
//! The training forward is written with candle's differentiable operations only (its fused
//! RMS norm and rotary kernels have no backward pass); [`Trainer::logits`] equals
//! [`crate::model::CausalLm::forward`] on the same weights, which the tests check. The loss
//! is the mean cross-entropy over the tokens an [`Example`] marks as targets (an assistant's
//! reply, a completion), and AdamW updates the trained tensors.
//!
//! A job saves its trained tensors as a checkpoint ([`Trainer::save_checkpoint`]) and
//! resumes from one ([`Trainer::load_checkpoint`]); the result is a whole Hugging Face
//! folder with the adapters merged ([`Trainer::write_model`]), which every loader of the
//! platform reads like any other model. Weights compute in f32; the base folder may hold
//! f32, f16 or bf16 safetensors. GGUF files (quantised) are not trained.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

use crate::chat::ChatMessage;
use crate::config::{ModelConfig, inverse_frequencies};
use crate::error::{EngineError, Result};
use crate::model::read_json;
use crate::tokenizer::ModelTokenizer;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Low-rank adapters of `rank` on every linear layer, scaled by `alpha / rank`.
    Lora { rank: usize, alpha: f64 },
    /// Every weight.
    Full,
}

/// How a [`Trainer`] trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainSettings {
    pub method: Method,
    pub learning_rate: f64,
    /// Seeds the adapters' initial values.
    pub seed: u64,
}

/// One training sequence: its tokens and which of them are predicted (the loss counts
/// token `i` when `targets[i]`; the first token is never a target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub targets: Vec<bool>,
}

impl Example {
    /// Tokens the loss counts.
    pub fn target_count(&self) -> usize {
        self.targets.iter().skip(1).filter(|t| **t).count()
    }
}

/// The linear layers LoRA adapts.
const LORA_TARGETS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Files of a model folder copied beside the trained weights.
const MODEL_FILES: [&str; 5] =
    ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "vocab.json"];

/// A base weight: frozen, or trained (full fine-tuning).
enum Param {
    Frozen(Tensor),
    Trained(Var),
}

impl Param {
    fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(tensor) => tensor,
            Param::Trained(var) => var.as_tensor(),
        }
    }
}

/// A model being fine-tuned.
pub struct Trainer {
    config: ModelConfig,
    device: Device,
    source: PathBuf,
    params: HashMap<String, Param>,
    /// LoRA's `(A, B)` per adapted matrix name.
    adapters: HashMap<String, (Var, Var)>,
    lora_scale: f64,
    /// What the optimiser updates (the adapters, or every weight).
    variables: Vec<Var>,
    optimizer: AdamW,
    steps: u64,
}

/// What one optimisation step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean cross-entropy over the batch's target tokens, before the update.
    pub loss: f32,
    /// Target tokens in the batch.
    pub tokens: usize,
}

impl Trainer {
    /// Loads the Hugging Face folder `dir` (config.json and safetensors) for training.
    pub fn load(dir: &Path, settings: TrainSettings, device: &Device) -> Result<Trainer> {
        if !dir.is_dir() {
            return Err(EngineError::load(
                dir,
                "fine-tuning needs a Hugging Face folder with safetensors weights (GGUF files are not trained)",
            ));
        }
        let config = ModelConfig::from_hf(dir, &read_json(&dir.join("config.json"))?)?;
        let mut tensors = HashMap::new();
        for shard in crate::model::safetensors_shards(dir)? {
            let bytes = std::fs::read(&shard).map_err(|e| EngineError::load(&shard, e.to_string()))?;
            let loaded = candle_core::safetensors::load_buffer(&bytes, device)
                .map_err(|e| EngineError::load(&shard, format!("not readable as safetensors: {e}")))?;
            for (name, tensor) in loaded {
                tensors.insert(name, tensor.to_dtype(DType::F32)?);
            }
        }
        let mut params = HashMap::new();
        let mut adapters = HashMap::new();
        let mut variables = Vec::new();
        let mut rng = StdRng::seed_from_u64(settings.seed);
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(tensor) = tensors.remove(&name) else { continue };
            let param = match settings.method {
                Method::Full => {
                    let var = Var::from_tensor(&tensor)?;
                    variables.push(var.clone());
                    Param::Trained(var)
                }
                Method::Lora { rank, .. } => {
                    if is_lora_target(&name) {
                        let (out, input) = tensor.dims2()?;
                        // Kaiming-uniform bounds, as PEFT draws A; B starts at zero.
                        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
                        let bound = (1.0 / input as f64).sqrt() as f32;
                        let values: Vec<f32> = (0..rank * input).map(|_| rng.random_range(-bound..bound)).collect();
                        let a = Var::from_tensor(&Tensor::from_vec(values, (rank, input), device)?)?;
                        let b = Var::zeros((out, rank), DType::F32, device)?;
                        variables.push(a.clone());
                        variables.push(b.clone());
                        adapters.insert(name.clone(), (a, b));
                    }
                    Param::Frozen(tensor)
                }
            };
            params.insert(name, param);
        }
        let lora_scale = match settings.method {
            Method::Lora { rank, alpha } => {
                if rank == 0 {
                    return Err(EngineError::BadRequest("the LoRA rank must be at least 1".into()));
                }
                #[allow(clippy::cast_precision_loss)]
                let scale = alpha / rank as f64;
                scale
            }
            Method::Full => 0.0,
        };
        if !(settings.learning_rate.is_finite() && settings.learning_rate > 0.0) {
            return Err(EngineError::BadRequest("the learning rate must be a positive number".into()));
        }
        let optimizer = AdamW::new(
            variables.clone(),
            ParamsAdamW { lr: settings.learning_rate, weight_decay: 0.0, ..ParamsAdamW::default() },
        )?;
        let trainer = Trainer {
            config,
            device: device.clone(),
            source: dir.to_owned(),
            params,
            adapters,
            lora_scale,
            variables,
            optimizer,
            steps: 0,
        };
        trainer.check_tensors()?;
        Ok(trainer)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Optimisation steps taken (counting those of a loaded checkpoint).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Values trained: the adapters, or every weight.
    pub fn trained_parameters(&self) -> usize {
        let adapters: usize = self.adapters.values().map(|(a, b)| a.elem_count() + b.elem_count()).sum();
        let full: usize = self
            .params
            .values()
            .filter_map(|p| if let Param::Trained(v) = p { Some(v.elem_count()) } else { None })
            .sum();
        adapters + full
    }

    fn check_tensors(&self) -> Result<()> {
        let mut needed = vec!["model.embed_tokens.weight".to_owned(), "model.norm.weight".to_owned()];
        if !self.config.tie_word_embeddings {
            needed.push("lm_head.weight".into());
        }
        for layer in 0..self.config.layers {
            for part in ["input_layernorm", "post_attention_layernorm"] {
                needed.push(format!("model.layers.{layer}.{part}.weight"));
            }
            for part in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
                needed.push(format!("model.layers.{layer}.{part}.weight"));
            }
            for part in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
                needed.push(format!("model.layers.{layer}.{part}.weight"));
            }
        }
        match needed.iter().find(|name| !self.params.contains_key(*name)) {
            Some(missing) => Err(EngineError::load(&self.source, format!("tensor {missing} is missing"))),
            None => Ok(()),
        }
    }

    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .map(Param::tensor)
            .ok_or_else(|| EngineError::load(&self.source, format!("tensor {name} is missing")))
    }

    /// `x @ W^T (+ bias) (+ scale * x @ A^T @ B^T)` for the matrix `name` (`...weight`).
    fn linear(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let mut y = self.project(x, name)?;
        if let Some(bias) = self.params.get(&name.replace(".weight", ".bias")) {
            y = y.broadcast_add(bias.tensor())?;
        }
        if let Some((a, b)) = self.adapters.get(name) {
            let update = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
            y = (y + (update * self.lora_scale)?)?;
        }
        Ok(y)
    }

    fn rms_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(mean_square + self.config.rms_norm_eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(self.tensor(name)?)?)
    }

    /// The last hidden states of one sequence, `[tokens, hidden]`, before the final norm.
    // x, h, q, k, v as the papers name them.
    #[allow(clippy::many_single_char_names)]
    fn hidden(&self, tokens: &[u32]) -> Result<Tensor> {
        let count = tokens.len();
        if count == 0 {
            return Err(EngineError::BadRequest("an example has no tokens".into()));
        }
        if count > self.config.context_length {
            return Err(EngineError::BadRequest(format!(
                "an example has {count} tokens, past the context length {}",
                self.config.context_length
            )));
        }
        let (heads, kv_heads, head_dim) = (self.config.heads, self.config.kv_heads, self.config.head_dim);
        let group = heads / kv_heads;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.tensor("model.embed_tokens.weight")?.index_select(&ids, 0)?;
        let (cos, sin) = self.rotary(count)?;
        let mask: Vec<f32> =
            (0..count).flat_map(|row| (0..count).map(move |column| if column <= row { 0.0 } else { -1e9 })).collect();
        let mask = Tensor::from_vec(mask, (count, count), &self.device)?;
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (head_dim as f64).sqrt();
        for layer in 0..self.config.layers {
            let name = |part: &str| format!("model.layers.{layer}.{part}.weight");
            let h = self.rms_norm(&x, &name("input_layernorm"))?;
            let q = self.linear(&h, &name("self_attn.q_proj"))?.reshape((count, heads, head_dim))?.transpose(0, 1)?;
            let k =
                self.linear(&h, &name("self_attn.k_proj"))?.reshape((count, kv_heads, head_dim))?.transpose(0, 1)?;
            let v =
                self.linear(&h, &name("self_attn.v_proj"))?.reshape((count, kv_heads, head_dim))?.transpose(0, 1)?;
            let q = rotate(&q.contiguous()?, &cos, &sin)?;
            let k = rotate(&k.contiguous()?, &cos, &sin)?;
            // Each kv head serves `group` query heads.
            let k = repeat_kv(&k, group, count, head_dim)?;
            let v = repeat_kv(&v.contiguous()?, group, count, head_dim)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let probabilities = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let attended = probabilities.matmul(&v)?.transpose(0, 1)?.reshape((count, heads * head_dim))?;
            x = (x + self.linear(&attended, &name("self_attn.o_proj"))?)?;
            let h = self.rms_norm(&x, &name("post_attention_layernorm"))?;
            let gate = self.linear(&h, &name("mlp.gate_proj"))?;
            let up = self.linear(&h, &name("mlp.up_proj"))?;
            x = (&x + self.linear(&(gate.silu()? * up)?, &name("mlp.down_proj"))?)?;
        }
        Ok(x)
    }

    /// The LM head over final hidden states.
    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let hidden = self.rms_norm(hidden, "model.norm.weight")?;
        let head =
            if self.params.contains_key("lm_head.weight") { "lm_head.weight" } else { "model.embed_tokens.weight" };
        self.project(&hidden, head)
    }

    /// `x @ W^T` for the matrix `name`: a frozen matrix through [`FrozenProduct`] (whose
    /// backward pass gives the input's gradient only), a trained one as a plain product.
    fn project(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        match self.params.get(name) {
            Some(Param::Frozen(weight)) if x.device().is_cpu() => {
                Ok(x.contiguous()?.apply_op1(FrozenProduct { weight: weight.clone() })?)
            }
            _ => Ok(x.matmul(&self.tensor(name)?.t()?)?),
        }
    }

    /// Logits `[tokens, vocab]` of every position of `tokens`, with the current weights.
    pub fn logits(&self, tokens: &[u32]) -> Result<Tensor> {
        self.head(&self.hidden(tokens)?)
    }

    /// The summed cross-entropy of an example's targets, and how many there are.
    fn example_loss(&self, example: &Example) -> Result<Option<(Tensor, usize)>> {
        if example.targets.len() != example.tokens.len() {
            return Err(EngineError::BadRequest("an example's targets do not match its tokens".into()));
        }
        let positions: Vec<u32> = (1..example.tokens.len())
            .filter(|i| example.targets[*i])
            .map(|i| u32::try_from(i - 1).unwrap_or(u32::MAX))
            .collect();
        if positions.is_empty() {
            return Ok(None);
        }
        let targets: Vec<u32> = positions.iter().map(|p| example.tokens[*p as usize + 1]).collect();
        let count = positions.len();
        let hidden = self.hidden(&example.tokens)?;
        // Only the positions that predict a target go through the LM head.
        let hidden = hidden.index_select(&Tensor::new(positions.as_slice(), &self.device)?, 0)?;
        let logits = self.head(&hidden)?;
        let targets = Tensor::new(targets.as_slice(), &self.device)?;
        #[allow(clippy::cast_precision_loss)]
        let sum = (candle_nn::loss::cross_entropy(&logits, &targets)? * count as f64)?;
        Ok(Some((sum, count)))
    }

    /// The mean loss over `examples`' targets as a tensor, and how many targets there are.
    fn batch_loss(&self, examples: &[Example]) -> Result<Option<(Tensor, usize)>> {
        let mut total: Option<Tensor> = None;
        let mut count = 0;
        for example in examples {
            if let Some((sum, n)) = self.example_loss(example)? {
                total = Some(match total {
                    Some(total) => (total + sum)?,
                    None => sum,
                });
                count += n;
            }
        }
        #[allow(clippy::cast_precision_loss)]
        Ok(match total {
            Some(total) => Some(((total / count as f64)?, count)),
            None => None,
        })
    }

    /// One optimisation step over `batch`: the mean loss over all its target tokens.
    ///
    /// Each example's graph is built, differentiated and dropped before the next one's
    /// (its loss weighted by its share of the batch's targets, the gradients of the trained
    /// tensors summed), so memory holds one example's activations at a time, not the
    /// batch's.
    pub fn step(&mut self, batch: &[Example]) -> Result<StepReport> {
        let tokens: usize = batch.iter().map(Example::target_count).sum();
        if tokens == 0 {
            return Err(EngineError::BadRequest("a batch has no target tokens".into()));
        }
        let mut grads = GradStore::default();
        let mut value = 0.0;
        for example in batch {
            let Some((sum, _)) = self.example_loss(example)? else { continue };
            #[allow(clippy::cast_precision_loss)]
            let share = (sum / tokens as f64)?;
            value += share.to_scalar::<f32>()?;
            let mut example_grads = share.backward()?;
            for var in &self.variables {
                if let Some(grad) = example_grads.remove(var.as_tensor()) {
                    let total = match grads.remove(var.as_tensor()) {
                        Some(before) => (before + grad)?.detach(),
                        None => grad.detach(),
                    };
                    grads.insert(var.as_tensor(), total);
                }
            }
        }
        if !value.is_finite() {
            return Err(EngineError::BadRequest(format!(
                "the loss is {value} at step {}: lower the learning rate",
                self.steps + 1
            )));
        }
        self.optimizer.step(&grads)?;
        self.steps += 1;
        Ok(StepReport { loss: value, tokens })
    }

    /// The mean loss over `examples` without training (a validation loss).
    pub fn evaluate(&self, examples: &[Example]) -> Result<Option<f32>> {
        match self.batch_loss(examples)? {
            Some((loss, _)) => Ok(Some(loss.detach().to_scalar::<f32>()?)),
            None => Ok(None),
        }
    }

    /// The trained tensors by name (`lora_a.<matrix>`, `lora_b.<matrix>`, or the weight's own
    /// name for full fine-tuning).
    fn trained_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, (a, b)) in &self.adapters {
            out.insert(format!("lora_a.{name}"), a.as_tensor().detach());
            out.insert(format!("lora_b.{name}"), b.as_tensor().detach());
        }
        for (name, param) in &self.params {
            if let Param::Trained(var) = param {
                out.insert(name.clone(), var.as_tensor().detach());
            }
        }
        out
    }

    /// Writes the trained tensors and the step count to `path` (a safetensors file),
    /// through a temporary file and a rename, so a crash leaves the previous checkpoint.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors = self.trained_tensors();
        #[allow(clippy::cast_precision_loss)]
        tensors.insert("maas.steps".into(), Tensor::new(&[self.steps as f64], &Device::Cpu)?);
        let temporary = path.with_extension("partial");
        candle_core::safetensors::save(&tensors, &temporary)?;
        sync_file(&temporary)?;
        std::fs::rename(&temporary, path).map_err(|e| EngineError::load(path, e.to_string()))?;
        Ok(())
    }

    /// Restores the trained tensors and the step count from a checkpoint of the same model
    /// and method. The optimiser's moments start again from zero.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::load(path, e.to_string()))?;
        let mut loaded = candle_core::safetensors::load_buffer(&bytes, &self.device)
            .map_err(|e| EngineError::load(path, format!("not readable as safetensors: {e}")))?;
        let steps = loaded
            .remove("maas.steps")
            .ok_or_else(|| EngineError::load(path, "not a checkpoint of this trainer (no step count)"))?;
        let mine = self.trained_tensors();
        if mine.len() != loaded.len() || mine.keys().any(|name| !loaded.contains_key(name)) {
            return Err(EngineError::load(path, "the checkpoint holds other tensors than this model and method train"));
        }
        for (name, (a, b)) in &self.adapters {
            a.set(&loaded[&format!("lora_a.{name}")])?;
            b.set(&loaded[&format!("lora_b.{name}")])?;
        }
        for (name, param) in &self.params {
            if let Param::Trained(var) = param {
                var.set(&loaded[name])?;
            }
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            self.steps = steps.to_vec1::<f64>()?.first().copied().unwrap_or(0.0) as u64;
        }
        Ok(())
    }

    /// Every weight with the adapters merged in: what a served model holds.
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, param) in &self.params {
            let mut tensor = param.tensor().detach();
            if let Some((a, b)) = self.adapters.get(name) {
                let update = (b.as_tensor().matmul(a.as_tensor())? * self.lora_scale)?;
                tensor = (tensor + update)?;
            }
            out.insert(name.clone(), tensor);
        }
        Ok(out)
    }

    /// Writes the fine-tuned model as a Hugging Face folder `out` (f32 safetensors, the
    /// base's config with `torch_dtype` f32, its tokenizer files), every file synced.
    pub fn write_model(&self, out: &Path) -> Result<Vec<String>> {
        std::fs::create_dir_all(out).map_err(|e| EngineError::load(out, e.to_string()))?;
        let mut config = read_json(&self.source.join("config.json"))?;
        if let Value::Object(map) = &mut config {
            map.insert("torch_dtype".into(), Value::String("float32".into()));
        }
        let mut written = Vec::new();
        let config_path = out.join("config.json");
        let text = serde_json::to_vec_pretty(&config).map_err(|e| EngineError::load(&config_path, e.to_string()))?;
        std::fs::write(&config_path, text).map_err(|e| EngineError::load(&config_path, e.to_string()))?;
        written.push("config.json".to_owned());
        for file in MODEL_FILES {
            let from = self.source.join(file);
            if from.is_file() {
                let to = out.join(file);
                std::fs::copy(&from, &to).map_err(|e| EngineError::load(&to, e.to_string()))?;
                written.push(file.to_owned());
            }
        }
        let weights = out.join("model.safetensors");
        candle_core::safetensors::save(&self.merged_weights()?, &weights)?;
        written.push("model.safetensors".to_owned());
        for file in &written {
            sync_file(&out.join(file))?;
        }
        Ok(written)
    }

    /// cos and sin of positions `0..count`: `[count, head_dim / 2]` each.
    #[allow(clippy::cast_precision_loss)]
    fn rotary(&self, count: usize) -> Result<(Tensor, Tensor)> {
        let frequencies = inverse_frequencies(&self.config);
        let half = frequencies.len();
        let angles: Vec<f32> =
            (0..count).flat_map(|p| frequencies.iter().map(move |f| p as f32 * f).collect::<Vec<_>>()).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        Ok((Tensor::from_vec(cos, (count, half), &self.device)?, Tensor::from_vec(sin, (count, half), &self.device)?))
    }
}

/// `x @ W^T` for a frozen `W` (`[out, in]`, `x` `[rows, in]`). candle's own product
/// differentiates both operands whatever they are; with LoRA almost every matrix is frozen,
/// and their gradients (as large as the model, as costly as the forward pass) would be
/// computed at every step and thrown away. This op's backward pass gives `x`'s gradient
/// only: `grad @ W`.
struct FrozenProduct {
    weight: Tensor,
}

impl candle_core::CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-product needs a contiguous input")
        };
        let x = Tensor::from_slice(&storage.as_slice::<f32>()?[start..end], layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        Ok((candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

fn is_lora_target(name: &str) -> bool {
    LORA_TARGETS.iter().any(|target| name.ends_with(&format!("{target}.weight")))
}

/// Hugging Face's rotation of the two halves: `[heads, tokens, head_dim]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated_first = (first.broadcast_mul(cos)? - second.broadcast_mul(sin)?)?;
    let rotated_second = (second.broadcast_mul(cos)? + first.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[rotated_first, rotated_second], D::Minus1)?)
}

/// `[kv_heads, tokens, dim]` to `[kv_heads * group, tokens, dim]`, each kv head repeated for
/// the query heads it serves.
fn repeat_kv(x: &Tensor, group: usize, count: usize, head_dim: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let kv_heads = x.dim(0)?;
    Ok(x.unsqueeze(1)?.broadcast_as((kv_heads, group, count, head_dim))?.reshape((
        kv_heads * group,
        count,
        head_dim,
    ))?)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|file| file.sync_all()).map_err(|e| EngineError::load(path, e.to_string()))
}

/// Turns one line of a fine-tuning file into an [`Example`], in the formats OpenAI's
/// fine-tuning accepts: `{"messages": [...]}` (chat; every assistant message is a target,
/// unless it has `"weight": 0`) or `{"prompt": ..., "completion": ...}` (the completion and
/// an end-of-sequence token are the targets). Longer examples are cut at `max_tokens`.
pub fn example_from_json(tokenizer: &ModelTokenizer, line: &Value, max_tokens: usize) -> Result<Example> {
    let bad = |reason: String| EngineError::BadRequest(reason);
    let object = line.as_object().ok_or_else(|| bad("a line must be a JSON object".into()))?;
    let mut example = if let Some(messages) = object.get("messages") {
        let messages = messages.as_array().ok_or_else(|| bad("\"messages\" must be an array".into()))?;
        let mut conversation = Vec::new();
        let mut spans = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            let role = message
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("message {index} has no \"role\" string")))?;
            if !matches!(role, "system" | "user" | "assistant") {
                return Err(bad(format!("message {index} has role {role:?}: use system, user or assistant")));
            }
            let content = message
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("message {index} has no \"content\" string")))?;
            let trained = role == "assistant" && message.get("weight").and_then(Value::as_f64) != Some(0.0);
            if trained {
                let before = tokenizer.encode(&tokenizer.render_chat(&conversation, true)?, false)?.len();
                conversation.push(ChatMessage::new(role, content));
                let after = tokenizer.encode(&tokenizer.render_chat(&conversation, false)?, false)?.len();
                spans.push(before..after);
            } else {
                conversation.push(ChatMessage::new(role, content));
            }
        }
        if spans.is_empty() {
            return Err(bad("a conversation needs at least one assistant message to learn from".into()));
        }
        let tokens = tokenizer.encode(&tokenizer.render_chat(&conversation, false)?, false)?;
        let mut targets = vec![false; tokens.len()];
        for span in spans {
            for target in targets.iter_mut().take(span.end).skip(span.start) {
                *target = true;
            }
        }
        Example { tokens, targets }
    } else if let (Some(prompt), Some(completion)) = (object.get("prompt"), object.get("completion")) {
        let prompt = prompt.as_str().ok_or_else(|| bad("\"prompt\" must be a string".into()))?;
        let completion = completion.as_str().ok_or_else(|| bad("\"completion\" must be a string".into()))?;
        let mut tokens = tokenizer.encode(prompt, true)?;
        let prompt_len = tokens.len();
        tokens.extend(tokenizer.encode(completion, false)?);
        if let Some(eos) = tokenizer.eos_ids().iter().next() {
            tokens.push(*eos);
        }
        let targets = (0..tokens.len()).map(|i| i >= prompt_len).collect();
        Example { tokens, targets }
    } else {
        return Err(bad("a line needs \"messages\", or \"prompt\" and \"completion\"".into()));
    };
    example.tokens.truncate(max_tokens);
    example.targets.truncate(max_tokens);
    if example.target_count() == 0 {
        return Err(bad(format!("no token left to learn from within {max_tokens} tokens")));
    }
    Ok(example)
}

/// Memory (MiB) to train `config` on examples of up to `max_tokens` (the trainer holds one
/// example's graph at a time, whatever the batch size): the f32 weights (nine times over
/// for full fine-tuning: gradients per example and summed, AdamW's two moments, the
/// update's temporaries), the activations and gradients of one example (every layer's
/// projections, attention scores and MLP, and the logits over the vocabulary), and 768 MiB
/// for the runtime. Calibrated against the peaks `examples/train_bench.rs` measures
/// (BENCHMARKS.md), with 3-13% to spare there.
pub fn memory_estimate_mib(config: &ModelConfig, full: bool, max_tokens: usize) -> u64 {
    let weights = config.parameters().saturating_mul(4);
    let weights = if full { weights.saturating_mul(9) } else { weights };
    let per_layer = config.hidden * 40 + config.intermediate * 14 + config.heads * max_tokens * 6;
    let per_token = (config.layers * per_layer + config.vocab * 6) * 4;
    let activations = u64::try_from(per_token.saturating_mul(max_tokens)).unwrap_or(u64::MAX);
    (weights.saturating_add(activations) >> 20) + 768
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frozen product's value and input gradient equal candle's own product's.
    #[test]
    fn the_frozen_product_differentiates_like_a_product() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &device).unwrap()).unwrap();
        let target = Tensor::randn(0f32, 1.0, (4, 5), &device).unwrap();
        let loss = |y: Tensor| (y * &target).unwrap().sum_all().unwrap();
        let plain = x.as_tensor().matmul(&weight.t().unwrap()).unwrap();
        let frozen = x.as_tensor().apply_op1(FrozenProduct { weight: weight.clone() }).unwrap();
        let difference = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(difference(&plain, &frozen) < 1e-6);
        let plain_grads = loss(plain).backward().unwrap();
        let frozen_grads = loss(frozen).backward().unwrap();
        let (a, b) = (plain_grads.get(x.as_tensor()).unwrap(), frozen_grads.get(x.as_tensor()).unwrap());
        assert!(difference(a, b) < 1e-5);
        assert!(frozen_grads.get(&weight).is_none(), "no gradient for the frozen matrix");
    }
}
