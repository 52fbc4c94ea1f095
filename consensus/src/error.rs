use std::io;

/// Every failure of the consensus crate.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("raft log i/o error at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot decode {what}: {reason}")]
    Codec { what: &'static str, reason: String },
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("not the leader{}", leader_hint(*.leader_id, .leader_addr.as_deref()))]
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    #[error("invalid raft configuration: {0}")]
    InvalidConfig(String),
    #[error("the command was rejected: {0}")]
    Rejected(String),
    #[error("the proposal was dropped (leadership changed before it committed); retry it")]
    Dropped,
    #[error(
        "the leader changed while the proposal was on its way: it may or may not have committed; \
         retry it if it is safe to apply twice, or read the state first"
    )]
    LeaderChanged,

    #[error("the raft node has stopped")]
    Stopped,
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error(
        "{path} has raft storage format version {found}, but this build reads only version {supported}; run a maas release that supports it"
    )]
    UnsupportedFormat { path: String, found: u32, supported: u32 },
    #[error("the raft storage in {dir} is already initialized; a node is bootstrapped only once")]
    AlreadyInitialized { dir: String },
    #[error("invalid raft storage request: {0}")]
    InvalidStorageRequest(String),
}

fn leader_hint(leader_id: Option<u64>, leader_addr: Option<&str>) -> String {
    match (leader_id, leader_addr) {
        (Some(id), Some(addr)) => format!(": the leader is node {id} at {addr}"),
        (Some(id), None) => format!(": the leader is node {id}"),
        _ => ": no leader is known yet; retry shortly".to_owned(),
    }
}

impl ConsensusError {
    pub(crate) fn io(path: &std::path::Path, source: io::Error) -> Self {
        ConsensusError::Io { path: path.display().to_string(), source }
    }
}

pub type Result<T, E = ConsensusError> = std::result::Result<T, E>;
