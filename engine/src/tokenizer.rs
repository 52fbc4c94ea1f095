//! A model's text side: the `tokenizers` tokenizer (tokenizer.json, or built from GGUF
//! metadata), its chat template and the tokens that end generation.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{EngineError, Result};
use crate::model::read_json;

pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    eos_ids: BTreeSet<u32>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer").field("eos_ids", &self.eos_ids).finish_non_exhaustive()
    }
}

/// A token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Token ids from an `eos_token_id` field: a number or a list of numbers.
fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(number)) => number.as_u64().and_then(|id| u32::try_from(id).ok()).into_iter().collect(),
        Some(Value::Array(items)) => {
            items.iter().filter_map(Value::as_u64).filter_map(|id| u32::try_from(id).ok()).collect()
        }
        _ => Vec::new(),
    }
}

/// A [`ModelTokenizer`] as data, to build the same one on another node (which counts a
/// prompt's tokens as the replica will, without the model's files).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenizerParts {
    /// `tokenizer.json`.
    pub tokenizer: String,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    pub eos_ids: Vec<u32>,
}

impl ModelTokenizer {
    /// This tokenizer as data.
    pub fn parts(&self) -> Result<TokenizerParts> {
        let (chat_template, bos_token, eos_token) = self.template.parts();
        Ok(TokenizerParts {
            tokenizer: self.tokenizer.to_string(false).map_err(EngineError::tokenizer)?,
            chat_template: chat_template.map(str::to_owned),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            eos_ids: self.eos_ids.iter().copied().collect(),
        })
    }

    /// The tokenizer that [`ModelTokenizer::parts`] described.
    pub fn from_parts(parts: &TokenizerParts) -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(parts.tokenizer.as_bytes())
            .map_err(|e| EngineError::Tokenizer(format!("not a usable tokenizer.json: {e}")))?;
        let template = ChatTemplate::new(
            parts.chat_template.as_deref(),
            Some(parts.bos_token.as_str()),
            Some(parts.eos_token.as_str()),
        )?;
        Ok(ModelTokenizer { tokenizer, template, eos_ids: parts.eos_ids.iter().copied().collect() })
    }

    /// Loads the tokenizer of a model: a Hugging Face folder, or a `.gguf` file (a
    /// `tokenizer.json` beside it wins over the GGUF's own vocabulary).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() { Self::load_folder(path) } else { Self::load_gguf(path) }
    }

    fn load_folder(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EngineError::load(&tokenizer_path, format!("not a usable tokenizer.json: {e}")))?;
        let optional_json = |name: &str| -> Result<Value> {
            let path = dir.join(name);
            if path.is_file() { read_json(&path) } else { Ok(Value::Null) }
        };
        let config = optional_json("config.json")?;
        let tokenizer_config = optional_json("tokenizer_config.json")?;
        let generation_config = optional_json("generation_config.json")?;
        let bos_token = token_text(tokenizer_config.get("bos_token"));
        let eos_token = token_text(tokenizer_config.get("eos_token"));
        let template_source = match tokenizer_config.get("chat_template") {
            Some(Value::String(source)) => Some(source.clone()),
            // A list of named templates: the default one.
            Some(Value::Array(templates)) => templates
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| templates.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let template = ChatTemplate::new(template_source.as_deref(), bos_token.as_deref(), eos_token.as_deref())
            .map_err(|e| EngineError::load(dir, e.to_string()))?;
        let mut eos_ids: BTreeSet<u32> = token_ids(generation_config.get("eos_token_id")).into_iter().collect();
        eos_ids.extend(token_ids(config.get("eos_token_id")));
        if let Some(id) = eos_token.as_deref().and_then(|text| tokenizer.token_to_id(text)) {
            eos_ids.insert(id);
        }
        Ok(ModelTokenizer { tokenizer, template, eos_ids })
    }

    fn load_gguf(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::load(path, e.to_string()))?;
        let mut content = gguf_file::Content::read(&mut std::io::BufReader::new(file))
            .map_err(|e| EngineError::load(path, format!("not a readable GGUF file: {e}")))?;
        let string = |key: &str| content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
        let beside = path.with_file_name("tokenizer.json");
        let tokenizer = if beside.is_file() {
            Tokenizer::from_file(&beside)
                .map_err(|e| EngineError::load(&beside, format!("not a usable tokenizer.json: {e}")))?
        } else {
            match string("tokenizer.ggml.model").as_deref() {
                Some("gpt2") => {
                    // llama.cpp calls Llama 3's pre-tokenizer "llama-bpe"; candle knows it as "llama3".
                    if string("tokenizer.ggml.pre").as_deref() == Some("llama-bpe") {
                        content.metadata.insert("tokenizer.ggml.pre".into(), gguf_file::Value::String("llama3".into()));
                    }
                    Tokenizer::from_gguf(&content).map_err(|e| {
                        EngineError::load(path, format!("cannot build the tokenizer from GGUF metadata: {e}"))
                    })?
                }
                Some("llama") => {
                    let json =
                        sentencepiece_tokenizer_json(&content).map_err(|reason| EngineError::load(path, reason))?;
                    Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| {
                        EngineError::load(path, format!("cannot build the tokenizer from GGUF metadata: {e}"))
                    })?
                }
                Some(other) => {
                    return Err(EngineError::load(
                        path,
                        format!(
                            "its tokenizer kind {other:?} cannot be built from GGUF metadata here: put the model's tokenizer.json beside the file"
                        ),
                    ));
                }
                None => return Err(EngineError::load(path, "tokenizer.ggml.model is missing")),
            }
        };
        let string = |key: &str| content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
        let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let token = |key: &str| id(key).and_then(|id| tokenizer.id_to_token(id));
        let bos_token = token("tokenizer.ggml.bos_token_id");
        let eos_token = token("tokenizer.ggml.eos_token_id");
        let template =
            ChatTemplate::new(string("tokenizer.chat_template").as_deref(), bos_token.as_deref(), eos_token.as_deref())
                .map_err(|e| EngineError::load(path, e.to_string()))?;
        let mut eos_ids = BTreeSet::new();
        eos_ids.extend(id("tokenizer.ggml.eos_token_id"));
        eos_ids.extend(id("tokenizer.ggml.eot_token_id"));
        Ok(ModelTokenizer { tokenizer, template, eos_ids })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, add_special_tokens).map_err(EngineError::tokenizer)?.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(EngineError::tokenizer)
    }

    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.template.render(messages, add_generation_prompt)
    }

    /// Tokens that end generation.
    pub fn eos_ids(&self) -> &BTreeSet<u32> {
        &self.eos_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// A `tokenizer.json` for a SentencePiece (`llama`) vocabulary in GGUF metadata, built the
/// way Hugging Face converts one (`LlamaConverter`, legacy): BPE with byte fallback, merges
/// from every split of a piece into two pieces ranked by the piece's score, spaces as `▁`
/// with one prepended, control tokens special.
fn sentencepiece_tokenizer_json(content: &gguf_file::Content) -> std::result::Result<Value, String> {
    let array = |key: &str| content.metadata.get(key).and_then(|v| v.to_vec().ok());
    let tokens: Vec<String> = array("tokenizer.ggml.tokens")
        .ok_or("tokenizer.ggml.tokens is missing")?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| e.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let scores: Vec<f32> = array("tokenizer.ggml.scores")
        .map_or_else(|| vec![0.0; tokens.len()], |values| values.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect());
    let types: Vec<i32> = array("tokenizer.ggml.token_type")
        .map_or_else(|| vec![1; tokens.len()], |values| values.iter().map(|v| v.to_i32().unwrap_or(1)).collect());
    let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let flag = |key: &str, default: bool| content.metadata.get(key).and_then(|v| v.to_bool().ok()).unwrap_or(default);
    let vocab: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(index, token)| (token.as_str(), index)).collect();

    // Every split of a normal piece into two known pieces is a merge, ranked by the score
    // of the piece it makes (higher first), then by the ids of its halves.
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (index, piece) in tokens.iter().enumerate() {
        if types.get(index).copied().unwrap_or(1) != 1 {
            continue;
        }
        let score = scores.get(index).copied().unwrap_or(0.0);
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((score, l, r, left, right));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<String> = merges.iter().map(|(_, _, _, left, right)| format!("{left} {right}")).collect();

    let vocab_json: serde_json::Map<String, Value> =
        tokens.iter().enumerate().map(|(index, token)| (token.clone(), index.into())).collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(index, _)| matches!(types.get(*index), Some(2..=4)))
        .map(|(index, token)| {
            let special = types.get(index).is_some_and(|&t| t != 4);
            serde_json::json!({"id": index, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": !special, "special": special})
        })
        .collect();
    let unk = id("tokenizer.ggml.unknown_token_id").and_then(|id| tokens.get(id as usize)).cloned();
    let mut single = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    for (key, enabled) in
        [("bos", flag("tokenizer.ggml.add_bos_token", true)), ("eos", flag("tokenizer.ggml.add_eos_token", false))]
    {
        let token =
            id(&format!("tokenizer.ggml.{key}_token_id")).and_then(|id| tokens.get(id as usize).map(|t| (id, t)));
        if let (true, Some((token_id, token))) = (enabled, token) {
            if key == "bos" {
                single.push(serde_json::json!({"SpecialToken": {"id": token, "type_id": 0}}));
            }
            special_tokens
                .insert(token.clone(), serde_json::json!({"id": token, "ids": [token_id], "tokens": [token]}));
        }
    }
    single.push(serde_json::json!({"Sequence": {"id": "A", "type_id": 0}}));
    if flag("tokenizer.ggml.add_eos_token", false)
        && let Some(token) = id("tokenizer.ggml.eos_token_id").and_then(|id| tokens.get(id as usize))
    {
        single.push(serde_json::json!({"SpecialToken": {"id": token, "type_id": 0}}));
    }
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        ]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": single.clone(), "special_tokens": special_tokens},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab_json, "merges": merges},
    }))
}
