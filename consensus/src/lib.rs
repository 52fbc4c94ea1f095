//! The control plane: a raft-rs driver, its durable log and snapshots, and the
//! replicated `ClusterState` state machine with versioned commands.
//!
//! **Boundary:** knows nothing about HTTP or SQL; nodes talk through the [`Transport`]
//! trait, which the node crate implements over the network. **Invariants** RAFT-1 (an
//! acknowledged write survives any minority of node losses and full restarts) and RAFT-2
//! (at most one leader per term; only the leader proposes placements).

pub mod control;
pub mod core;
pub mod driver;
pub mod error;
pub mod liveness;
pub mod local;
pub mod logger;
pub mod reconcile;
pub mod state;
pub mod storage;

pub use core::{RaftCore, RaftSettings, RaftStatus};
pub use driver::{DriverConfig, RaftHandle, Transport};
pub use error::{ConsensusError, Result};

/// What the driver applies committed commands to. `apply` must be deterministic: the
/// same state and the same command give the same result and the same new state on every
/// node, so it reads no clock and draws no randomness (commands carry their times).
pub trait StateMachine: Send + Sync + 'static {
    type Command: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
    type Response: Send + 'static;
    type Rejection: std::error::Error + Send + Sync + 'static;

    /// Applies the command committed at `index`. A rejected command changes nothing.
    fn apply(&mut self, index: u64, command: Self::Command) -> std::result::Result<Self::Response, Self::Rejection>;

    /// The whole state, serialised with a format version, for a raft snapshot.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the state with a snapshot made by [`StateMachine::snapshot`] (of this or an
    /// older format version).
    fn restore(&mut self, snapshot: &[u8]) -> Result<()>;
}
