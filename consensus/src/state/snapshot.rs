//! The snapshot format: `{"version":1,"state":{...}}`, the whole [`ClusterState`] as JSON.
//!
//! # Versions
//!
//! [`SNAPSHOT_FORMAT_VERSION`] is the version this code writes; [`decode`] reads every
//! version in [`SNAPSHOT_FORMAT_VERSIONS_READ`]. A snapshot on disk or arriving from a
//! leader may be older than the code reading it, never newer than the leader that made it.
//! Adding a field with `#[serde(default)]` keeps version 1; anything else (a renamed or
//! removed field, a changed meaning, a new map keyed differently) makes version 2:
//!
//! 1. move today's state types, unchanged and with the same serde attributes, into a
//!    frozen submodule `v1` (`v1::ClusterState`, `v1::NodeRecord`, ...); they are then
//!    only ever decoded, never written;
//! 2. change the live types, set [`SNAPSHOT_FORMAT_VERSION`] to 2 and add 2 to
//!    [`SNAPSHOT_FORMAT_VERSIONS_READ`];
//! 3. write the migration `fn migrate_v1(v1::ClusterState) -> ClusterState`, a pure
//!    function that fills what v1 did not have deterministically (every node must migrate
//!    to the same state), and in [`decode`] map version 1 through it;
//! 4. keep the golden v1 snapshot test and add a v2 one.

use serde::{Deserialize, Serialize};

use super::ClusterState;
use crate::ConsensusError;

/// The snapshot format version this code writes.
pub const SNAPSHOT_FORMAT_VERSION: u64 = 1;

/// Snapshot format versions this code reads.
pub const SNAPSHOT_FORMAT_VERSIONS_READ: &[u64] = &[1];

const WHAT: &str = "cluster state snapshot";

#[derive(Serialize)]
struct SnapshotOut<'a> {
    version: u64,
    state: &'a ClusterState,
}

/// Only the version, read first so an unknown version is named as such rather than as
/// whatever field its state happens to trip on.
#[derive(Deserialize)]
struct VersionOnly {
    version: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotV1 {
    #[allow(dead_code, reason = "checked before this is decoded")]
    version: u64,
    state: ClusterState,
}

pub(super) fn encode(state: &ClusterState) -> Vec<u8> {
    serde_json::to_vec(&SnapshotOut { version: SNAPSHOT_FORMAT_VERSION, state })
        .expect("the cluster state always encodes as json")
}

pub(super) fn decode(bytes: &[u8]) -> crate::Result<ClusterState> {
    let codec = |reason: String| ConsensusError::Codec { what: WHAT, reason };
    let header: VersionOnly = serde_json::from_slice(bytes).map_err(|error| codec(error.to_string()))?;
    let version = header.version.ok_or_else(|| codec("the snapshot has no format `version`".to_owned()))?;
    match version.as_u64() {
        Some(1) => {
            let snapshot: SnapshotV1 = serde_json::from_slice(bytes).map_err(|error| codec(error.to_string()))?;
            Ok(snapshot.state)
        }
        Some(other) => Err(codec(format!(
            "unknown snapshot format version {other}: this node reads versions {SNAPSHOT_FORMAT_VERSIONS_READ:?}; \
             upgrade it"
        ))),
        None => Err(codec(format!("the snapshot format `version` must be an integer, not {version}"))),
    }
}
