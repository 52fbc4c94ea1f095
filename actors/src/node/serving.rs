//! The models this node serves: each Ready replica's loaded engine (or embedding model),
//! by replica id. A `ReplicaActor` puts its model here when it is loaded and takes it
//! out when it stops; the gateway reads it to serve requests routed to this node.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use maas_engine::{EmbeddingModel, Engine};

/// A loaded model, as requests use it.
#[derive(Clone)]
pub enum ServingModel {
    /// A causal language model behind its batching loop.
    Generator(Arc<Engine>),
    /// A BERT-family sentence-embedding model.
    Embedder(Arc<EmbeddingModel>),
}

impl ServingModel {
    /// Why the model stopped serving, if it did: a generator's batching loop died. (An
    /// embedding model runs on its callers' threads and has no loop to lose.)
    pub fn failure(&self) -> Option<String> {
        match self {
            ServingModel::Generator(engine) => engine.failure(),
            ServingModel::Embedder(_) => None,
        }
    }
}

impl std::fmt::Debug for ServingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServingModel::Generator(_) => f.write_str("Generator"),
            ServingModel::Embedder(_) => f.write_str("Embedder"),
        }
    }
}

/// Replica id → its loaded model, shared by the agent's replicas and the gateway.
#[derive(Clone, Default, Debug)]
pub struct ServingTable(Arc<RwLock<HashMap<String, ServingModel>>>);

impl ServingTable {
    pub fn insert(&self, replica_id: &str, model: ServingModel) {
        self.0.write().expect("serving table lock").insert(replica_id.to_owned(), model);
    }

    pub fn remove(&self, replica_id: &str) {
        self.0.write().expect("serving table lock").remove(replica_id);
    }

    pub fn get(&self, replica_id: &str) -> Option<ServingModel> {
        self.0.read().expect("serving table lock").get(replica_id).cloned()
    }

    /// Every replica served here, with its model.
    pub fn all(&self) -> Vec<(String, ServingModel)> {
        self.0.read().expect("serving table lock").iter().map(|(id, model)| (id.clone(), model.clone())).collect()
    }
}
