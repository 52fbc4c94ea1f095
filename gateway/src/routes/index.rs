//! `GET /`: a page that says what this node serves and where.

use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::state::AppState;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    warp::path::end().and(warp::get()).and(with_state(state)).map(|s: Arc<AppState>| index(&s)).boxed()
}

/// A plain HTML page naming the node and linking its operational endpoints.
#[utoipa::path(get, path = "/", tag = "operations", responses((status = 200, content_type = "text/html", body = String)))]
pub fn index(state: &AppState) -> Response {
    let node = html_escape(&state.node_name);
    let version = env!("CARGO_PKG_VERSION");
    warp::reply::html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>maas · {node}</title></head>\
         <body><h1>maas {version}</h1><p>Node <b>{node}</b> is serving.</p><ul>\
         <li><a href=\"/openapi.json\">/openapi.json</a>: every route of the API</li>\
         <li><a href=\"/healthz\">/healthz</a> and <a href=\"/readyz\">/readyz</a></li>\
         <li><a href=\"/metrics\">/metrics</a>: Prometheus metrics</li></ul>\
         <p>The web console is not part of this build yet.</p></body></html>"
    ))
    .into_response()
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
