//! The text side of deployed models as this node's gateway needs it, read from one of the
//! deployment's replicas (here or on a peer, through `/internal/replicas/{id}/tokenizer`)
//! once per deployment generation (a new generation may serve a new version):
//!
//! - a chat model's tokenizer, chat template and context, to count a prompt's tokens
//!   exactly as its replica will and fit what the server adds (RAG sources, a session's
//!   history) into the context;
//! - an embedding model's token counter and embedding length, for chunking.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use maas_actors::node::ServingModel;
use maas_engine::tokenizer::{ModelTokenizer, TokenizerParts};
use maas_knowledge::chunk::TokenizerCounter;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::routes::openai::CalledFor;
use crate::state::AppState;

/// What a replica tells of its model's text side.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplicaText {
    Chat { tokenizer: TokenizerParts, context_length: usize },
    Embedding { tokenizer: String, dimensions: usize },
}

impl ReplicaText {
    /// The text side of a loaded model.
    pub fn of(model: &ServingModel) -> maas_engine::Result<Self> {
        Ok(match model {
            ServingModel::Generator(engine) => {
                ReplicaText::Chat { tokenizer: engine.tokenizer().parts()?, context_length: engine.context_length() }
            }
            ServingModel::Embedder(embedder) => {
                ReplicaText::Embedding { tokenizer: embedder.tokenizer_json()?, dimensions: embedder.dimensions() }
            }
        })
    }
}

/// A chat model's tokenizer and template, and the context its replicas serve.
pub struct ChatText {
    pub tokenizer: ModelTokenizer,
    pub context_length: usize,
}

/// An embedding model's token counter and embedding length.
pub struct EmbeddingText {
    pub counter: TokenizerCounter,
    pub dimensions: usize,
}

/// One value per deployment, with the generation it was read for.
struct PerDeployment<T>(Mutex<HashMap<String, (u64, Arc<T>)>>);

impl<T: Send + Sync + 'static> PerDeployment<T> {
    fn new() -> Self {
        PerDeployment(Mutex::new(HashMap::new()))
    }

    /// The value for deployment `model`, built by `build` (on a blocking thread: parsing
    /// a tokenizer takes a while) from a replica's answer when the generation changed.
    async fn get(
        &self,
        state: &Arc<AppState>,
        called_for: CalledFor<'_>,
        model: &str,
        build: fn(ReplicaText, &str) -> Result<T, ApiError>,
    ) -> Result<Arc<T>, ApiError> {
        let generation = deployment_generation(state, called_for, model)?;
        if let Some((cached, value)) = self.0.lock().expect("model text lock").get(model)
            && *cached == generation
        {
            return Ok(Arc::clone(value));
        }
        let text = crate::routes::openai::replica_text(state, called_for, model).await?;
        let name = model.to_owned();
        let value = tokio::task::spawn_blocking(move || build(text, &name))
            .await
            .map_err(|e| ApiError::internal(format!("the tokenizer thread failed: {e}")))??;
        let value = Arc::new(value);
        self.0.lock().expect("model text lock").insert(model.to_owned(), (generation, Arc::clone(&value)));
        Ok(value)
    }
}

/// The text sides this node has read.
pub struct ModelTexts {
    chat: PerDeployment<ChatText>,
    embedding: PerDeployment<EmbeddingText>,
}

impl Default for ModelTexts {
    fn default() -> Self {
        ModelTexts { chat: PerDeployment::new(), embedding: PerDeployment::new() }
    }
}

impl std::fmt::Debug for ModelTexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTexts").finish_non_exhaustive()
    }
}

fn not_a(kind: &str, param: &str, model: &str) -> ApiError {
    ApiError::bad_request("invalid_request", format!("`{model}` is not {kind} model")).with_param(param)
}

impl ModelTexts {
    /// Chat deployment `model`'s tokenizer, template and context.
    pub async fn chat(
        &self,
        state: &Arc<AppState>,
        called_for: CalledFor<'_>,
        model: &str,
    ) -> Result<Arc<ChatText>, ApiError> {
        self.chat
            .get(state, called_for, model, |text, model| match text {
                ReplicaText::Chat { tokenizer, context_length } => Ok(ChatText {
                    tokenizer: ModelTokenizer::from_parts(&tokenizer)
                        .map_err(|e| ApiError::internal(format!("the tokenizer of `{model}`: {e}")))?,
                    context_length,
                }),
                ReplicaText::Embedding { .. } => Err(not_a("a chat", "model", model)),
            })
            .await
    }

    /// Embedding deployment `model`'s token counter and embedding length.
    pub async fn embedding(
        &self,
        state: &Arc<AppState>,
        called_for: CalledFor<'_>,
        model: &str,
    ) -> Result<Arc<EmbeddingText>, ApiError> {
        self.embedding
            .get(state, called_for, model, |text, model| match text {
                ReplicaText::Embedding { tokenizer, dimensions } => Ok(EmbeddingText {
                    counter: TokenizerCounter::from_json(&tokenizer).map_err(ApiError::internal)?,
                    dimensions,
                }),
                ReplicaText::Chat { .. } => Err(not_a("an embedding", "embedding_model", model)),
            })
            .await
    }
}

/// The generation of deployment `model`; "not found" when it does not exist or is another
/// tenant's private deployment (one read of the cluster state for both).
fn deployment_generation(state: &AppState, called_for: CalledFor<'_>, model: &str) -> Result<u64, ApiError> {
    let handle = crate::routes::cluster::control_plane(state)?;
    handle
        .read_local(|cluster| {
            cluster
                .deployment(&maas_consensus::state::DeploymentId(model.to_owned()))
                .filter(|d| called_for.may_call(&d.spec))
                .map(|d| d.generation)
        })
        .ok_or_else(|| crate::routes::openai::model_not_found(model))
}
