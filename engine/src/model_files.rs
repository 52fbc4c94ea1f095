//! A model's files on disk, checked and read without loading weights into a framework:
//! a Hugging Face folder (`config.json`, `*.safetensors` including sharded ones with
//! `model.safetensors.index.json`, `tokenizer.json`) or one GGUF file. Every safetensors
//! header is parsed and each tensor's byte range checked against the file, and every byte
//! is read once (a truncated or unreadable file fails here, not half-way into serving).
//!
//! What this gives a replica today is proof that its model is whole, and the metadata the
//! VRAM estimate needs; candle loading builds on it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The largest safetensors header accepted (the format's own limit is 100 MB).
const SAFETENSORS_HEADER_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// GGUF strings and arrays above this are refused as corrupt.
const GGUF_ITEM_MAX: u64 = 64 * 1024 * 1024;

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
    /// Elements of every tensor (safetensors), or 0 when the headers do not say (GGUF).
    pub parameters: u64,
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
    let mut files = BTreeMap::new();
    files.insert("config.json".to_owned(), file_len(&config_path)?);
    let tokenizer = dir.join("tokenizer.json");
    if tokenizer.is_file() {
        read_json(&tokenizer)?;
        files.insert("tokenizer.json".to_owned(), file_len(&tokenizer)?);
    } else {
        return Err(not_a_model(dir, "tokenizer.json is missing"));
    }
    let mut chat_template = None;
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        let path = dir.join(optional);
        if path.is_file() {
            let value = read_json(&path)?;
            if optional == "tokenizer_config.json" {
                chat_template = match value.get("chat_template") {
                    Some(serde_json::Value::String(template)) => Some(template.clone()),
                    // A list of named templates: the default one.
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
                        .or_else(|| list.first())
                        .and_then(|t| t.get("template"))
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_owned),
                    _ => None,
                };
            }
            files.insert(optional.to_owned(), file_len(&path)?);
        }
    }

    // The weight files: those a sharded index names, else every *.safetensors.
    let index_path = dir.join("model.safetensors.index.json");
    let shards: Vec<String> = if index_path.is_file() {
        let index = read_json(&index_path)?;
        files.insert("model.safetensors.index.json".to_owned(), file_len(&index_path)?);
        let map = index
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| corrupt(&index_path, "weight_map is missing"))?;
        let mut shards: Vec<String> = map.values().filter_map(serde_json::Value::as_str).map(str::to_owned).collect();
        shards.sort();
        shards.dedup();
        shards
    } else {
        let mut shards = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|source| io(dir, source))? {
            let entry = entry.map_err(|source| io(dir, source))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".safetensors") {
                shards.push(name);
            }
        }
        shards.sort();
        shards
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
        chat_template,
        total_bytes,
    })
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
        parameters: 0,
        chat_template,
        total_bytes: file_bytes,
    })
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
