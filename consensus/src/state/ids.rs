//! The identifiers of the things the control plane tracks. Each is a newtype, so a
//! replica id cannot be passed where a deployment id is meant; on the wire each is its
//! bare value (`3`, `"chat-llama"`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's raft id: chosen by the operator, unique for the life of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }
    };
}

string_id! {
    /// A deployment's name, chosen by its owner (for example `chat-llama`).
    DeploymentId
}

string_id! {
    /// A model replica, named by the scheduler that places it.
    ReplicaId
}

string_id! {
    /// A training job.
    JobId
}

string_id! {
    /// A knowledge-base shard.
    ShardId
}
