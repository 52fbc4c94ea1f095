use std::io;

/// Every failure of the actors crate.
#[derive(Debug, thiserror::Error)]
pub enum ActorsError {
    #[error(
        "cannot listen for cluster traffic on {addr}: {source}; check that listen.cluster is free and is an address of this machine"
    )]
    ClusterListen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid cluster transport setting {key}: {reason}")]
    InvalidConfig { key: &'static str, reason: String },
    #[error("cannot start the cluster transport's {actor}: {reason}")]
    Spawn { actor: &'static str, reason: String },
}

pub type Result<T, E = ActorsError> = std::result::Result<T, E>;
