//! A model's files on disk, checked and read without loading weights into a framework:
//! a Hugging Face folder (`config.json`, `*.safetensors` including sharded ones with
//! `model.safetensors.index.json`, `tokenizer.json`) or one GGUF file. Every safetensors
//! header is parsed and each tensor's byte range checked against the file, and every byte
//! is read once (a truncated or unreadable file fails here, not half-way into serving).
//!
//! What this gives a replica today is proof that its model is whole, and the metadata the
//! VRAM estimate needs; candle loading builds on it.
//!
//! A Hugging Face download holds more than the model: other frameworks' copies of the
//! weights (`pytorch_model.bin`, `tf_model.h5`, `flax_model.msgpack`, `onnx/`), the
//! publisher's original checkpoint (`original/`, `consolidated.safetensors`), remote code.
//! [`select_model_files`] is the one rule for which files make the model: the CLI uploads
//! only those, the node registers only those, and [`inspect`] reads those.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Architecture;

/// The largest safetensors header accepted (the format's own limit is 100 MB).
const SAFETENSORS_HEADER_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// GGUF strings and arrays above this are refused as corrupt.
const GGUF_ITEM_MAX: u64 = 64 * 1024 * 1024;
/// ggml tensors have at most 4 dimensions; more is a corrupt tensor info.
const GGUF_MAX_DIMENSIONS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ModelFilesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a model: {reason}")]
    NotAModel { path: PathBuf, reason: String },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{architecture} is not an architecture this build's engine runs: it serves llama, mistral and qwen2 \
         decoders (chat, completion) and bert encoders (embeddings)"
    )]
    NotServable { architecture: String },
}

pub type Result<T, E = ModelFilesError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    /// A Hugging Face folder with safetensors weights.
    Safetensors,
    Gguf,
}

/// A GGUF metadata value, as far as metadata readers need it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum GgufMetadataValue {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// Arrays are counted, not kept (token lists are large).
    Array {
        items: u64,
    },
}

/// What a model's files hold.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFiles {
    pub format: ModelFormat,
    /// `config.json` of a Hugging Face folder.
    pub config: Option<serde_json::Value>,
    /// GGUF metadata (`general.architecture`, `llama.block_count`, ...).
    pub gguf_metadata: BTreeMap<String, GgufMetadataValue>,
    /// Every file read, relative to the model's path, with its size.
    pub files: BTreeMap<String, u64>,
    pub tensors: u64,
    /// Elements of every tensor.
    pub parameters: u64,
    /// GGUF only: elements stored in each tensor type (`q8_0`, `f32`, ...), as ggml names
    /// its types.
    pub gguf_tensor_types: BTreeMap<String, u64>,
    /// `chat_template` of `tokenizer_config.json`, or GGUF's `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    pub total_bytes: u64,
}

impl ModelFiles {
    /// The architecture the files name (`LlamaForCausalLM`, `llama`, ...).
    pub fn architecture(&self) -> Option<String> {
        match self.format {
            ModelFormat::Safetensors => self
                .config
                .as_ref()
                .and_then(|config| config.get("architectures"))
                .and_then(|list| list.get(0))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            ModelFormat::Gguf => match self.gguf_metadata.get("general.architecture") {
                Some(GgufMetadataValue::Str(architecture)) => Some(architecture.clone()),
                _ => None,
            },
        }
    }

    /// The GGUF tensor type that holds the most elements (`q4_k`, `q8_0`, `f16`): what
    /// the weights are mostly stored as.
    pub fn gguf_dominant_type(&self) -> Option<&str> {
        self.gguf_tensor_types.iter().max_by_key(|(_, elements)| **elements).map(|(name, _)| name.as_str())
    }

    /// Which of this engine's loaders serves the model, by [`engine_support`].
    pub fn engine_support(&self) -> Result<Served> {
        match self.format {
            ModelFormat::Safetensors => {
                engine_support(self.format, self.config.as_ref().unwrap_or(&serde_json::Value::Null))
            }
            ModelFormat::Gguf => {
                let architecture = self.architecture().unwrap_or_default();
                engine_support(self.format, &serde_json::json!({ "general.architecture": architecture }))
            }
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "{} {}: {} files, {} tensors, {} bytes verified",
            match self.format {
                ModelFormat::Safetensors => "safetensors",
                ModelFormat::Gguf => "gguf",
            },
            self.architecture().unwrap_or_else(|| "model".to_owned()),
            self.files.len(),
            self.tensors,
            self.total_bytes
        )
    }
}

/// Reads and checks the model at `path`: a folder of a Hugging Face model or a `.gguf` file.
/// Every byte is read.
pub fn inspect(path: &Path) -> Result<ModelFiles> {
    inspect_with(path, true)
}

/// As [`inspect`], but reads only the configs and headers (for an estimate: fast however
/// large the weights are). Truncation of a tensor is still found from the file sizes.
pub fn inspect_headers(path: &Path) -> Result<ModelFiles> {
    inspect_with(path, false)
}

fn inspect_with(path: &Path, read_data: bool) -> Result<ModelFiles> {
    let metadata = std::fs::metadata(path).map_err(|source| io(path, source))?;
    if metadata.is_dir() {
        inspect_folder(path, read_data)
    } else if path.extension().is_some_and(|extension| extension.eq_ignore_ascii_case("gguf")) {
        inspect_gguf(path, read_data)
    } else {
        Err(not_a_model(path, "expected a folder with config.json and *.safetensors, or a .gguf file"))
    }
}

fn inspect_folder(dir: &Path, read_data: bool) -> Result<ModelFiles> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(not_a_model(dir, "config.json is missing"));
    }
    let config = read_json(&config_path)?;
    if !config.is_object() {
        return Err(corrupt(&config_path, "config.json is not a JSON object"));
    }
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.is_file() {
        return Err(not_a_model(dir, "tokenizer.json is missing"));
    }
    let selection = select_folder(dir)?;
    let mut files = BTreeMap::new();
    let mut chat_template = None;
    for needed in selection.needed.iter().filter(|path| !path.ends_with(".safetensors")) {
        let path = dir.join(needed);
        // Every JSON file the model carries is read, so a corrupt one fails here.
        if path.extension().is_some_and(|extension| extension == "json") {
            let value = read_json(&path)?;
            if needed == "tokenizer_config.json" {
                chat_template = chat_template_of(&value);
            }
        }
        files.insert(needed.clone(), file_len(&path)?);
    }

    // The weight files: those a sharded index names, else the model's own safetensors.
    let index_path = dir.join(SAFETENSORS_INDEX);
    let shards: Vec<String> = if index_path.is_file() {
        let shards =
            index_shards(&read_json(&index_path)?).ok_or_else(|| corrupt(&index_path, "weight_map is missing"))?;
        shards.into_iter().collect()
    } else {
        selection.needed.iter().filter(|path| path.ends_with(".safetensors")).cloned().collect()
    };
    if shards.is_empty() {
        return Err(not_a_model(dir, "no *.safetensors weights"));
    }
    let mut tensors = 0;
    let mut parameters = 0;
    for shard in &shards {
        if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
            return Err(corrupt(&index_path, &format!("shard name {shard:?} leaves the model folder")));
        }
        let path = dir.join(shard);
        if !path.is_file() {
            return Err(not_a_model(dir, &format!("weight file {shard} is missing")));
        }
        let (count, elements) = check_safetensors(&path, read_data)?;
        tensors += count;
        parameters += elements;
        files.insert(shard.clone(), file_len(&path)?);
    }
    let total_bytes = files.values().sum();
    Ok(ModelFiles {
        format: ModelFormat::Safetensors,
        config: Some(config),
        gguf_metadata: BTreeMap::new(),
        files,
        tensors,
        parameters,
        gguf_tensor_types: BTreeMap::new(),
        chat_template,
        total_bytes,
    })
}

/// `chat_template` of `tokenizer_config.json`: a string, or the default of a list of
/// named templates.
fn chat_template_of(tokenizer_config: &serde_json::Value) -> Option<String> {
    match tokenizer_config.get("chat_template") {
        Some(serde_json::Value::String(template)) => Some(template.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// The index of sharded safetensors weights.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// Top-level files a model folder carries besides its weights: its config, tokenizer,
/// generation defaults, chat template, and the sentence-transformers description of an
/// embedding model (the pooling itself is in `<n>_Pooling/config.json`).
const MODEL_FOLDER_FILES: &[&str] = &[
    "config.json",
    SAFETENSORS_INDEX,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];

/// Small documents kept with a model (compared without case, by prefix): its card and
/// licence terms.
const MODEL_FOLDER_DOCUMENTS: &[&str] = &["readme", "license", "licence", "notice", "use_policy"];

/// A file of a model folder that an import leaves out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedFile {
    /// Relative to the folder, `/`-separated.
    pub path: String,
    pub reason: &'static str,
}

/// Which files of a Hugging Face model folder make the model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FolderSelection {
    /// Relative, `/`-separated paths, sorted.
    pub needed: Vec<String>,
    pub skipped: Vec<SkippedFile>,
}

/// The shard names `model.safetensors.index.json`'s `weight_map` names; `None` when it has
/// no `weight_map`.
pub fn index_shards(index: &serde_json::Value) -> Option<BTreeSet<String>> {
    let map = index.get("weight_map")?.as_object()?;
    Some(map.values().filter_map(serde_json::Value::as_str).map(str::to_owned).collect())
}

/// The weights of a folder without an index: its `model*.safetensors` (`model.safetensors`,
/// `model-00001-of-00002.safetensors`), or, where it has none, every top-level
/// `*.safetensors` but a consolidated copy. `paths` are relative, `/`-separated.
fn unindexed_weights<S: AsRef<str>>(paths: &[S]) -> Vec<String> {
    let top_level_weights: Vec<&str> = paths
        .iter()
        .map(AsRef::as_ref)
        .filter(|path| !path.contains('/') && !path.starts_with('.') && path.ends_with(".safetensors"))
        .collect();
    let own: Vec<&str> = top_level_weights.iter().copied().filter(|name| name.starts_with("model")).collect();
    let mut weights: Vec<String> = if own.is_empty() {
        top_level_weights.into_iter().filter(|name| !name.starts_with("consolidated")).map(str::to_owned).collect()
    } else {
        own.into_iter().map(str::to_owned).collect()
    };
    weights.sort();
    weights.dedup();
    weights
}

/// Which of a Hugging Face folder's files (`paths`: relative, `/`-separated) make the model,
/// and why each other one is left out. `index_shards` are the shards the folder's
/// `model.safetensors.index.json` names, when it has one ([`index_shards`]). The weights
/// kept are those the index names, else the `model*.safetensors`; every other copy of the
/// weights, the original checkpoint and remote code are left out. Pure: the CLI and the
/// node run it over a folder on disk and over a registration's file list alike.
pub fn select_model_files<S: AsRef<str>>(paths: &[S], index_shards: Option<&BTreeSet<String>>) -> FolderSelection {
    let unindexed = if index_shards.is_none() { unindexed_weights(paths) } else { Vec::new() };
    let mut selection = FolderSelection::default();
    for path in paths.iter().map(AsRef::as_ref) {
        let keep = match index_shards {
            Some(shards) if path.ends_with(".safetensors") && !path.contains('/') => {
                if shards.contains(path) {
                    Ok(())
                } else {
                    Err(skip_reason(path, true))
                }
            }
            None if path.ends_with(".safetensors") && !path.contains('/') => {
                if unindexed.iter().any(|weight| weight == path) { Ok(()) } else { Err(skip_reason(path, false)) }
            }
            _ if needed_beside_weights(path) => Ok(()),
            _ => Err(skip_reason(path, index_shards.is_some())),
        };
        match keep {
            Ok(()) => selection.needed.push(path.to_owned()),
            Err(reason) => selection.skipped.push(SkippedFile { path: path.to_owned(), reason }),
        }
    }
    selection.needed.sort();
    selection.needed.dedup();
    selection.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    selection
}

/// Whether `path` (not a weight file) is one a model folder carries.
fn needed_beside_weights(path: &str) -> bool {
    match path.split_once('/') {
        None => {
            let lower = path.to_ascii_lowercase();
            MODEL_FOLDER_FILES.contains(&path)
                || (MODEL_FOLDER_DOCUMENTS.iter().any(|prefix| lower.starts_with(prefix))
                    && !has_weight_extension(&lower))
        }
        // A sentence-transformers pooling module: `1_Pooling/config.json`.
        Some((module, rest)) => rest == "config.json" && module.ends_with("_Pooling"),
    }
}

fn has_weight_extension(lower: &str) -> bool {
    [".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx", ".gguf", ".safetensors", ".tflite"]
        .iter()
        .any(|extension| lower.ends_with(extension))
}

/// Why a file is left out, for the user reading the import's report.
fn skip_reason(path: &str, indexed: bool) -> &'static str {
    let lower = path.to_ascii_lowercase();
    let first = lower.split('/').next().unwrap_or_default();
    if lower.contains('/') && first == "original" {
        return "the publisher's original checkpoint, a second copy of the weights";
    }
    if lower.contains('/') && ["onnx", "openvino", "coreml", "tflite"].contains(&first) {
        return "another runtime's copy of the weights";
    }
    let name = lower.rsplit('/').next().unwrap_or_default();
    if name.starts_with("consolidated") {
        return "a consolidated copy of the weights in the publisher's own format";
    }
    let extension = Path::new(name).extension().and_then(|extension| extension.to_str()).unwrap_or_default();
    match extension {
        "safetensors" if !lower.contains('/') => {
            if indexed {
                "weights the model.safetensors.index.json does not name"
            } else {
                "safetensors beside the model's own model*.safetensors weights"
            }
        }
        "bin" | "pt" | "pth" | "ckpt" => {
            "a PyTorch pickle (weights or training state): the safetensors weights are used"
        }
        "h5" | "tflite" => "TensorFlow's copy of the weights",
        "msgpack" => "Flax's copy of the weights",
        "ot" => "rust-bert's copy of the weights",
        "onnx" => "another runtime's copy of the weights",
        "gguf" => "a GGUF file: import it on its own",
        "py" => "remote code, which maas never runs",
        _ => "not a file the model needs",
    }
}

/// Every file of the folder at `dir` (hidden files and folders left out), relative and
/// `/`-separated, sorted, with its size.
pub fn folder_files(dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).map_err(|source| io(&folder, source))? {
            let entry = entry.map_err(|source| io(&folder, source))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let kind = entry.file_type().map_err(|source| io(&path, source))?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let relative = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().replace('\\', "/");
                let size = entry.metadata().map_err(|source| io(&path, source))?.len();
                found.push((relative, size));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// [`select_model_files`] over the folder at `dir` (hidden files left out).
pub fn select_folder(dir: &Path) -> Result<FolderSelection> {
    let paths: Vec<String> = folder_files(dir)?.into_iter().map(|(path, _)| path).collect();
    let index_path = dir.join(SAFETENSORS_INDEX);
    let shards = if index_path.is_file() {
        Some(index_shards(&read_json(&index_path)?).ok_or_else(|| corrupt(&index_path, "weight_map is missing"))?)
    } else {
        None
    };
    Ok(select_model_files(&paths, shards.as_ref()))
}

/// Which of this engine's loaders serves a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// A decoder the generation engine runs.
    Generator(Architecture),
    /// A BERT encoder the embedding model runs.
    Embedder,
}

/// `model_type` values of encoder (embedding) models, this engine's BERT and others.
const ENCODER_MODEL_TYPES: &[&str] = &[
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "mpnet",
    "nomic_bert",
    "electra",
    "deberta",
    "deberta-v2",
    "camembert",
    "albert",
    "ernie",
    "modernbert",
    "jina_bert",
    "new",
];

/// Whether a `config.json` describes an encoder (an embedding model) rather than a decoder:
/// by its `model_type`, else by `architectures[0]` naming a BERT-like encoder. A decoder
/// whose class is named `...Model` (`ChatGLMModel`) is not an encoder.
pub fn is_encoder(config: &serde_json::Value) -> bool {
    if let Some(model_type) = config.get("model_type").and_then(serde_json::Value::as_str) {
        return ENCODER_MODEL_TYPES.contains(&model_type.to_ascii_lowercase().as_str());
    }
    let architecture = config
        .get("architectures")
        .and_then(|list| list.get(0))
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    !architecture.contains("causallm")
        && ["bert", "roberta", "mpnet", "electra", "deberta", "ernie"].iter().any(|name| architecture.contains(name))
}

/// Which of this engine's loaders serves a model of `format` whose `config.json` (or, for
/// GGUF, metadata as a JSON object with `general.architecture`) is `config`: the rules the
/// loaders apply when a replica starts, so a model they would refuse is refused up front.
/// A decoder is named by `model_type`, else `architectures[0]` ([`Architecture::from_name`]);
/// an encoder must be BERT (`model_type` `bert`, or a `Bert...` class without one).
pub fn engine_support(format: ModelFormat, config: &serde_json::Value) -> Result<Served> {
    let text = |key: &str| config.get(key).and_then(serde_json::Value::as_str);
    match format {
        ModelFormat::Gguf => {
            let architecture = text("general.architecture").unwrap_or("missing");
            // The GGUF loader matches the lowercase names llama.cpp writes, exactly.
            match Architecture::from_name(architecture) {
                Some(found) if found.name() == architecture => Ok(Served::Generator(found)),
                _ => Err(ModelFilesError::NotServable { architecture: format!("GGUF architecture {architecture}") }),
            }
        }
        ModelFormat::Safetensors => {
            let model_type = text("model_type");
            let class = config.get("architectures").and_then(|list| list.get(0)).and_then(serde_json::Value::as_str);
            let decoder =
                model_type.and_then(Architecture::from_name).or_else(|| class.and_then(Architecture::from_name));
            if let Some(found) = decoder {
                return Ok(Served::Generator(found));
            }
            let bert = match model_type {
                Some(model_type) => model_type.eq_ignore_ascii_case("bert"),
                None => class.is_some_and(|class| class.starts_with("Bert")),
            };
            if bert {
                return Ok(Served::Embedder);
            }
            let architecture = match (class, model_type) {
                (Some(class), Some(model_type)) => format!("{class} (model_type {model_type})"),
                (Some(class), None) => class.to_owned(),
                (None, Some(model_type)) => format!("model_type {model_type}"),
                (None, None) => "a model without architectures or model_type in config.json".to_owned(),
            };
            Err(ModelFilesError::NotServable { architecture })
        }
    }
}

/// Parses a safetensors header and checks each tensor's range; reads the data through.
/// Returns the number of tensors and of their elements.
fn check_safetensors(path: &Path, read_data: bool) -> Result<(u64, u64)> {
    let file = File::open(path).map_err(|source| io(path, source))?;
    let file_bytes = file.metadata().map_err(|source| io(path, source))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut length = [0u8; 8];
    reader.read_exact(&mut length).map_err(|_| corrupt(path, "shorter than a safetensors header"))?;
    let header_bytes = u64::from_le_bytes(length);
    if header_bytes > SAFETENSORS_HEADER_MAX_BYTES || 8 + header_bytes > file_bytes {
        return Err(corrupt(path, &format!("header length {header_bytes} does not fit the file")));
    }
    let mut header = vec![0u8; usize::try_from(header_bytes).unwrap_or(usize::MAX)];
    reader.read_exact(&mut header).map_err(|source| io(path, source))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| corrupt(path, &format!("header is not JSON: {e}")))?;
    let data_bytes = file_bytes - 8 - header_bytes;
    let mut tensors = 0;
    let mut elements = 0u64;
    for (name, tensor) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = tensor
            .get("data_offsets")
            .and_then(serde_json::Value::as_array)
            .and_then(|pair| Some((pair.first()?.as_u64()?, pair.get(1)?.as_u64()?)))
            .ok_or_else(|| corrupt(path, &format!("tensor {name} has no data_offsets")))?;
        if offsets.0 > offsets.1 || offsets.1 > data_bytes {
            return Err(corrupt(
                path,
                &format!(
                    "tensor {name} spans bytes {}..{} of {data_bytes}: the file is truncated",
                    offsets.0, offsets.1
                ),
            ));
        }
        tensors += 1;
        elements += tensor
            .get("shape")
            .and_then(serde_json::Value::as_array)
            .map_or(0, |shape| shape.iter().filter_map(serde_json::Value::as_u64).product::<u64>());
    }
    if !read_data {
        return Ok((tensors, elements));
    }
    let read = std::io::copy(&mut reader, &mut std::io::sink()).map_err(|source| io(path, source))?;
    if read != data_bytes {
        return Err(corrupt(path, "the file changed while it was read"));
    }
    Ok((tensors, elements))
}

fn inspect_gguf(path: &Path, read_data: bool) -> Result<ModelFiles> {
    let file = File::open(path).map_err(|source| io(path, source))?;
    let file_bytes = file.metadata().map_err(|source| io(path, source))?.len();
    let mut reader = GgufReader { inner: BufReader::with_capacity(1 << 20, file), path };
    let mut magic = [0u8; 4];
    reader.inner.read_exact(&mut magic).map_err(|_| not_a_model(path, "shorter than a GGUF header"))?;
    if &magic != b"GGUF" {
        return Err(not_a_model(path, "no GGUF magic at the start"));
    }
    let version = reader.u32()?;
    if !(2..=3).contains(&version) {
        return Err(corrupt(path, &format!("GGUF version {version} is not supported (2 and 3 are)")));
    }
    let tensors = reader.u64()?;
    let kv_count = reader.u64()?;
    if kv_count > GGUF_ITEM_MAX || tensors > GGUF_ITEM_MAX {
        return Err(corrupt(path, "implausible metadata or tensor count"));
    }
    let mut gguf_metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = reader.string()?;
        let kind = reader.u32()?;
        let value = reader.value(kind)?;
        gguf_metadata.insert(key, value);
    }
    // The tensor infos: name, dimensions, ggml type and data offset of each.
    let mut parameters = 0u64;
    let mut gguf_tensor_types: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..tensors {
        let name = reader.string()?;
        let dimensions = reader.u32()?;
        if dimensions > GGUF_MAX_DIMENSIONS {
            return Err(corrupt(path, &format!("tensor {name} has {dimensions} dimensions")));
        }
        let mut elements = 1u64;
        for _ in 0..dimensions {
            elements = elements
                .checked_mul(reader.u64()?)
                .ok_or_else(|| corrupt(path, &format!("tensor {name} has an implausible shape")))?;
        }
        let kind = reader.u32()?;
        let _offset = reader.u64()?;
        parameters = parameters.saturating_add(elements);
        *gguf_tensor_types.entry(ggml_type_name(kind)).or_default() += elements;
    }
    if read_data {
        std::io::copy(&mut reader.inner, &mut std::io::sink()).map_err(|source| io(path, source))?;
    }
    let name = path.file_name().map_or_else(|| "model.gguf".to_owned(), |n| n.to_string_lossy().into_owned());
    let chat_template = match gguf_metadata.get("tokenizer.chat_template") {
        Some(GgufMetadataValue::Str(template)) => Some(template.clone()),
        _ => None,
    };
    Ok(ModelFiles {
        format: ModelFormat::Gguf,
        config: None,
        gguf_metadata,
        files: BTreeMap::from([(name, file_bytes)]),
        tensors,
        parameters,
        gguf_tensor_types,
        chat_template,
        total_bytes: file_bytes,
    })
}

/// ggml's name of tensor type `kind` (`ggml_type_name`, lowercase): `f32`, `q8_0`, `q4_k`.
pub fn ggml_type_name(kind: u32) -> String {
    const NAMES: &[(u32, &str)] = &[
        (0, "f32"),
        (1, "f16"),
        (2, "q4_0"),
        (3, "q4_1"),
        (6, "q5_0"),
        (7, "q5_1"),
        (8, "q8_0"),
        (9, "q8_1"),
        (10, "q2_k"),
        (11, "q3_k"),
        (12, "q4_k"),
        (13, "q5_k"),
        (14, "q6_k"),
        (15, "q8_k"),
        (16, "iq2_xxs"),
        (17, "iq2_xs"),
        (18, "iq3_xxs"),
        (19, "iq1_s"),
        (20, "iq4_nl"),
        (21, "iq3_s"),
        (22, "iq2_s"),
        (23, "iq4_xs"),
        (24, "i8"),
        (25, "i16"),
        (26, "i32"),
        (27, "i64"),
        (28, "f64"),
        (29, "iq1_m"),
        (30, "bf16"),
        (34, "tq1_0"),
        (35, "tq2_0"),
    ];
    NAMES
        .iter()
        .find(|(number, _)| *number == kind)
        .map_or_else(|| format!("type_{kind}"), |(_, name)| (*name).to_owned())
}

/// llama.cpp's `general.file_type` numbers.
pub fn gguf_file_type_name(file_type: u64) -> String {
    match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("file_type_{file_type}"),
    }
    .to_owned()
}

struct GgufReader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
}

impl GgufReader<'_> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buffer = [0u8; N];
        self.inner.read_exact(&mut buffer).map_err(|_| corrupt(self.path, "the metadata is truncated"))?;
        Ok(buffer)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self) -> Result<String> {
        let length = self.u64()?;
        if length > GGUF_ITEM_MAX {
            return Err(corrupt(self.path, &format!("a metadata string of {length} bytes")));
        }
        let mut buffer = vec![0u8; usize::try_from(length).unwrap_or(usize::MAX)];
        self.inner.read_exact(&mut buffer).map_err(|_| corrupt(self.path, "the metadata is truncated"))?;
        String::from_utf8(buffer).map_err(|_| corrupt(self.path, "a metadata string is not UTF-8"))
    }

    /// Reads one value of GGUF type `kind` (0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32,
    /// 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64).
    fn value(&mut self, kind: u32) -> Result<GgufMetadataValue> {
        Ok(match kind {
            0 => GgufMetadataValue::Unsigned(u64::from(self.bytes::<1>()?[0])),
            1 => GgufMetadataValue::Signed(i64::from(i8::from_le_bytes(self.bytes()?))),
            2 => GgufMetadataValue::Unsigned(u64::from(u16::from_le_bytes(self.bytes()?))),
            3 => GgufMetadataValue::Signed(i64::from(i16::from_le_bytes(self.bytes()?))),
            4 => GgufMetadataValue::Unsigned(u64::from(self.u32()?)),
            5 => GgufMetadataValue::Signed(i64::from(i32::from_le_bytes(self.bytes()?))),
            6 => GgufMetadataValue::Float(f64::from(f32::from_le_bytes(self.bytes()?))),
            7 => GgufMetadataValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => GgufMetadataValue::Str(self.string()?),
            9 => {
                let item_kind = self.u32()?;
                let items = self.u64()?;
                if items > GGUF_ITEM_MAX || item_kind == 9 {
                    return Err(corrupt(self.path, "an implausible metadata array"));
                }
                for _ in 0..items {
                    self.value(item_kind)?;
                }
                GgufMetadataValue::Array { items }
            }
            10 => GgufMetadataValue::Unsigned(self.u64()?),
            11 => GgufMetadataValue::Signed(i64::from_le_bytes(self.bytes()?)),
            12 => GgufMetadataValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(corrupt(self.path, &format!("unknown metadata type {other}"))),
        })
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|source| io(path, source))?;
    serde_json::from_slice(&bytes).map_err(|e| corrupt(path, &format!("not valid JSON: {e}")))
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(|source| io(path, source))?.len())
}

fn io(path: &Path, source: std::io::Error) -> ModelFilesError {
    ModelFilesError::Io { path: path.to_owned(), source }
}

fn not_a_model(path: &Path, reason: &str) -> ModelFilesError {
    ModelFilesError::NotAModel { path: path.to_owned(), reason: reason.to_owned() }
}

fn corrupt(path: &Path, reason: &str) -> ModelFilesError {
    ModelFilesError::Corrupt { path: path.to_owned(), reason: reason.to_owned() }
}
