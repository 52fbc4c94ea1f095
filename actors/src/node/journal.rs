//! A deployment's log: what happened to its replicas on this node (placed and started,
//! files fetched, loaded or failed and why, restarted, stopped), newest last. Each node
//! keeps its own lines in memory, a bounded number per deployment; `GET
//! /v1/deployments/{id}/logs` asks every live node and merges them by time, so the log
//! covers the whole cluster. Every line is also a tracing event (with `deployment` and
//! `replica` fields), so the node's own log has it too.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Lines kept per deployment on each node; the oldest leave first.
pub const LINES_PER_DEPLOYMENT: usize = 500;
/// Deployments a node keeps lines for; the one written to longest ago leaves first.
pub const DEPLOYMENTS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// The name the API uses: `info`, `warn`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// One line of a deployment's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The node that wrote it.
    pub node_id: u64,
    /// Its order on that node (lines of one millisecond keep their order).
    pub seq: u64,
    pub replica_id: String,
    pub level: LogLevel,
    pub message: String,
}

/// This node's deployment logs. Cheap to clone: the clones share the lines.
#[derive(Debug, Clone)]
pub struct Journal {
    node_id: u64,
    inner: Arc<Mutex<Lines>>,
}

#[derive(Debug, Default)]
struct Lines {
    next_seq: u64,
    by_deployment: HashMap<String, VecDeque<LogLine>>,
}

impl Journal {
    pub fn new(node_id: u64) -> Self {
        Journal { node_id, inner: Arc::default() }
    }

    pub fn info(&self, deployment_id: &str, replica_id: &str, message: impl Into<String>) {
        self.record(deployment_id, replica_id, LogLevel::Info, message.into());
    }

    pub fn warn(&self, deployment_id: &str, replica_id: &str, message: impl Into<String>) {
        self.record(deployment_id, replica_id, LogLevel::Warn, message.into());
    }

    pub fn error(&self, deployment_id: &str, replica_id: &str, message: impl Into<String>) {
        self.record(deployment_id, replica_id, LogLevel::Error, message.into());
    }

    fn record(&self, deployment_id: &str, replica_id: &str, level: LogLevel, message: String) {
        match level {
            LogLevel::Info => tracing::info!(deployment = deployment_id, replica = replica_id, "{message}"),
            LogLevel::Warn => tracing::warn!(deployment = deployment_id, replica = replica_id, "{message}"),
            LogLevel::Error => tracing::error!(deployment = deployment_id, replica = replica_id, "{message}"),
        }
        let at_ms = maas_store::ids::now_ms().try_into().unwrap_or_default();
        let mut lines = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = lines.next_seq;
        lines.next_seq += 1;
        if !lines.by_deployment.contains_key(deployment_id) && lines.by_deployment.len() >= DEPLOYMENTS {
            let stalest = lines
                .by_deployment
                .iter()
                .min_by_key(|(_, kept)| kept.back().map_or(0, |line| line.seq))
                .map(|(id, _)| id.clone());
            if let Some(id) = stalest {
                lines.by_deployment.remove(&id);
            }
        }
        let kept = lines.by_deployment.entry(deployment_id.to_owned()).or_default();
        if kept.len() == LINES_PER_DEPLOYMENT {
            kept.pop_front();
        }
        kept.push_back(LogLine {
            at_ms,
            node_id: self.node_id,
            seq,
            replica_id: replica_id.to_owned(),
            level,
            message,
        });
    }

    /// A handle that writes one replica's lines.
    pub fn replica(&self, deployment_id: &str, replica_id: &str) -> ReplicaLog {
        ReplicaLog { journal: self.clone(), deployment_id: deployment_id.to_owned(), replica_id: replica_id.to_owned() }
    }

    /// The last `limit` lines of a deployment at `level` or above, oldest first.
    pub fn lines(&self, deployment_id: &str, level: LogLevel, limit: usize) -> Vec<LogLine> {
        let lines = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(kept) = lines.by_deployment.get(deployment_id) else { return Vec::new() };
        let mut chosen: Vec<LogLine> =
            kept.iter().rev().filter(|line| line.level >= level).take(limit).cloned().collect();
        chosen.reverse();
        chosen
    }
}

/// Writes the lines of one replica.
#[derive(Debug, Clone)]
pub struct ReplicaLog {
    journal: Journal,
    deployment_id: String,
    replica_id: String,
}

impl ReplicaLog {
    pub fn info(&self, message: impl Into<String>) {
        self.journal.info(&self.deployment_id, &self.replica_id, message);
    }

    pub fn warn(&self, message: impl Into<String>) {
        self.journal.warn(&self.deployment_id, &self.replica_id, message);
    }

    pub fn error(&self, message: impl Into<String>) {
        self.journal.error(&self.deployment_id, &self.replica_id, message);
    }
}

/// Lines from several nodes in one order: by time, then node, then each node's own order;
/// the last `limit` of them.
pub fn merge(mut lines: Vec<LogLine>, limit: usize) -> Vec<LogLine> {
    lines.sort_by_key(|line| (line.at_ms, line.node_id, line.seq));
    let excess = lines.len().saturating_sub(limit);
    lines.drain(..excess);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_lines_of_each_deployment_in_order() {
        let journal = Journal::new(7);
        for i in 0..LINES_PER_DEPLOYMENT + 10 {
            journal.info("a", "a-1", format!("line {i}"));
        }
        journal.error("b", "b-1", "failed to load");
        let kept = journal.lines("a", LogLevel::Info, usize::MAX);
        assert_eq!(kept.len(), LINES_PER_DEPLOYMENT);
        assert_eq!(kept[0].message, "line 10");
        assert_eq!(
            kept.last().map(|l| l.message.as_str()),
            Some(format!("line {}", LINES_PER_DEPLOYMENT + 9).as_str())
        );
        assert!(kept.windows(2).all(|pair| pair[0].seq < pair[1].seq));
        assert!(kept.iter().all(|line| line.node_id == 7 && line.replica_id == "a-1"));
        let last_three = journal.lines("a", LogLevel::Info, 3);
        assert_eq!(
            last_three.iter().map(|l| l.message.clone()).collect::<Vec<_>>(),
            kept[kept.len() - 3..].iter().map(|l| l.message.clone()).collect::<Vec<_>>()
        );
        assert_eq!(journal.lines("b", LogLevel::Error, 10).len(), 1);
        assert!(journal.lines("a", LogLevel::Warn, 10).is_empty(), "only info lines were written to a");
        assert!(journal.lines("nothing", LogLevel::Info, 10).is_empty());
    }

    #[test]
    fn forgets_the_deployment_written_to_longest_ago() {
        let journal = Journal::new(1);
        for i in 0..DEPLOYMENTS {
            journal.info(&format!("d{i}"), "r", "started");
        }
        journal.info("d0", "r", "still here");
        journal.info("new", "r", "started");
        assert_eq!(journal.lines("d0", LogLevel::Info, 10).len(), 2, "d0 was written to last but one");
        assert!(journal.lines("d1", LogLevel::Info, 10).is_empty(), "d1 was the stalest");
        assert_eq!(journal.lines("new", LogLevel::Info, 10).len(), 1);
    }

    #[test]
    fn merges_nodes_by_time() {
        let line = |at_ms, node_id, seq| LogLine {
            at_ms,
            node_id,
            seq,
            replica_id: String::new(),
            level: LogLevel::Info,
            message: format!("{at_ms}/{node_id}/{seq}"),
        };
        let merged = merge(vec![line(5, 2, 0), line(3, 1, 9), line(5, 1, 10), line(1, 2, 1), line(5, 1, 11)], 4);
        let order: Vec<String> = merged.into_iter().map(|l| l.message).collect();
        assert_eq!(order, ["3/1/9", "5/1/10", "5/1/11", "5/2/0"]);
    }
}
