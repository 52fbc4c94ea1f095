//! The load of every replica in the cluster, for routing: the power of two choices
//! compares two Ready replicas by their queue depth plus active sequences. A replica on
//! this node reports its engine's figures directly; those on other nodes come from their
//! node's `GET /internal/load`, polled every [`POLL_INTERVAL`] by [`poll_peers`]. A figure
//! older than [`STALE_AFTER`] is ignored. This node's own requests in flight to a replica
//! count too (they may not have reached its queue yet): the larger of the two is the load.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use maas_actors::node::ServingModel;
use maas_consensus::state::NodeStatus;
use serde::{Deserialize, Serialize};

use crate::state::AppState;

pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
pub const STALE_AFTER: Duration = Duration::from_secs(3);

/// One replica's load as its node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplicaLoad {
    pub queue_depth: usize,
    pub active_sequences: usize,
    pub tokens_per_second: f64,
}

/// The last load reported for each replica on another node, with when it arrived.
#[derive(Debug, Default)]
pub struct ReplicaLoads(RwLock<HashMap<String, (Instant, ReplicaLoad)>>);

impl ReplicaLoads {
    fn update(&self, loads: HashMap<String, ReplicaLoad>) {
        let now = Instant::now();
        let mut map = self.0.write().expect("replica loads lock");
        map.retain(|_, (at, _)| now.duration_since(*at) < STALE_AFTER);
        for (replica_id, load) in loads {
            map.insert(replica_id, (now, load));
        }
    }

    fn get(&self, replica_id: &str) -> Option<ReplicaLoad> {
        let map = self.0.read().expect("replica loads lock");
        let (at, load) = map.get(replica_id)?;
        (at.elapsed() < STALE_AFTER).then_some(*load)
    }
}

/// The loads of this node's replicas.
pub fn local_loads(state: &AppState) -> HashMap<String, ReplicaLoad> {
    let Some(serving) = state.serving.get() else { return HashMap::new() };
    serving
        .all()
        .into_iter()
        .filter_map(|(replica_id, model)| match model {
            ServingModel::Generator(engine) => {
                let figures = engine.stats();
                Some((
                    replica_id,
                    ReplicaLoad {
                        queue_depth: figures.queue_depth,
                        active_sequences: figures.active_sequences,
                        tokens_per_second: figures.tokens_per_second,
                    },
                ))
            }
            ServingModel::Embedder(_) => None,
        })
        .collect()
}

/// What routing compares: the replica's reported queue and active sequences, or this
/// node's requests in flight to it, whichever is larger.
pub fn score(state: &AppState, replica_id: &str, local: bool, in_flight: usize) -> usize {
    let reported = if local {
        match state.serving.get().and_then(|serving| serving.get(replica_id)) {
            Some(ServingModel::Generator(engine)) => {
                let figures = engine.stats();
                Some(figures.queue_depth + figures.active_sequences)
            }
            _ => None,
        }
    } else {
        state.replica_loads.get(replica_id).map(|load| load.queue_depth + load.active_sequences)
    };
    reported.unwrap_or(0).max(in_flight)
}

/// Polls every other live node's replica loads until the process ends.
pub async fn poll_peers(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(handle) = state.cluster.get() else { continue };
        let own = handle.id();
        let peers: Vec<String> = handle.read_local(|cluster| {
            cluster
                .nodes()
                .values()
                .filter(|node| node.id.0 != own && matches!(node.status, NodeStatus::Alive | NodeStatus::Draining))
                .map(|node| node.api_addr.clone())
                .collect()
        });
        let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
        let polls = peers.into_iter().map(|api| {
            let (client, cookie) = (state.http.clone(), cookie.clone());
            async move {
                let url = format!("{}/internal/load", api.trim_end_matches('/'));
                let response = client
                    .get(&url)
                    .header(crate::routes::cluster::COOKIE_HEADER, cookie)
                    .timeout(Duration::from_millis(400))
                    .send()
                    .await
                    .ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response.json::<HashMap<String, ReplicaLoad>>().await.ok()
            }
        });
        for loads in futures_util::future::join_all(polls).await.into_iter().flatten() {
            state.replica_loads.update(loads);
        }
    }
}

/// `GET /internal/load`: this node's replicas' loads, for its peers (cluster cookie).
pub fn routes(state: &Arc<AppState>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    use warp::{Filter, Reply};
    warp::path!("internal" / "load")
        .and(warp::get())
        .and(crate::routes::with_state(state))
        .and(warp::header::optional::<String>(crate::routes::cluster::COOKIE_HEADER))
        .and_then(|s: Arc<AppState>, cookie: Option<String>| async move {
            crate::routes::cluster::check_cookie(&s, cookie.as_deref()).map_err(warp::reject::custom)?;
            Ok::<_, warp::Rejection>(warp::reply::json(&local_loads(&s)).into_response())
        })
        .boxed()
}
