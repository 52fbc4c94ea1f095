//! Liveness, readiness and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::state::{AppState, Check};

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let healthz = warp::path!("healthz").and(warp::get()).and(with_state(state)).map(|s: Arc<AppState>| healthz(&s));
    let readyz = warp::path!("readyz").and(warp::get()).and(with_state(state)).map(|s: Arc<AppState>| readyz(&s));
    let metrics = warp::path!("metrics").and(warp::get()).and(with_state(state)).map(|s: Arc<AppState>| metrics(&s));
    healthz.or(readyz).unify().or(metrics).unify().boxed()
}

/// The node process is up and serving.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the node answers.
    pub status: String,
    pub node: String,
    pub version: String,
    pub uptime_secs: u64,
}

/// Whether the node can serve traffic, with the state of each check.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadinessReport {
    pub ready: bool,
    /// Each check's state: `ready`, or what it waits for or why it failed.
    pub checks: BTreeMap<String, String>,
}

/// Liveness: answers 200 while the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub fn healthz(state: &AppState) -> Response {
    warp::reply::json(&Health {
        status: "ok".into(),
        node: state.node_name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: state.started.elapsed().as_secs(),
    })
    .into_response()
}

/// Readiness: 200 once every check (the store's migrations first) is ready, 503 before.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses((status = 200, body = ReadinessReport), (status = 503, body = ReadinessReport))
)]
pub fn readyz(state: &AppState) -> Response {
    let checks: BTreeMap<String, String> = state
        .readiness
        .snapshot()
        .into_iter()
        .map(|(name, check)| {
            let text = match check {
                Check::Ready => "ready".to_owned(),
                Check::Pending(why) => format!("pending: {why}"),
                Check::Failed(why) => format!("failed: {why}"),
            };
            (name.to_owned(), text)
        })
        .collect();
    let ready = state.readiness.is_ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    warp::reply::with_status(warp::reply::json(&ReadinessReport { ready, checks }), status).into_response()
}

/// Prometheus text exposition of the node's metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String))
)]
pub fn metrics(state: &AppState) -> Response {
    // Each served replica's load, read from its engine at scrape time.
    if let Some(serving) = state.serving.get() {
        for (replica, model) in serving.all() {
            if let maas_actors::node::ServingModel::Generator(engine) = model {
                let load = engine.stats();
                let labels = [("replica", replica)];
                #[allow(clippy::cast_precision_loss)]
                {
                    metrics::gauge!("maas_replica_queue_depth", &labels).set(load.queue_depth as f64);
                    metrics::gauge!("maas_replica_active_sequences", &labels).set(load.active_sequences as f64);
                    metrics::gauge!("maas_replica_generated_tokens", &labels).set(load.tokens_generated_total as f64);
                }
                metrics::gauge!("maas_replica_tokens_per_second", &labels).set(load.tokens_per_second);
            }
        }
    }
    warp::reply::with_header(state.metrics.render(), "content-type", "text/plain; version=0.0.4; charset=utf-8")
        .into_response()
}
