//! Diagnostic routes, served only with `gateway.debug_routes = true`: a request that
//! takes as long as asked, for checking timeouts, draining and load balancers, and one
//! that counts the body it was sent, for checking body limits and proxies.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::error::ApiError;

const MAX_DELAY_MS: u64 = 120_000;

pub fn routes() -> BoxedFilter<(Response,)> {
    let delay = warp::path!("debug" / "delay")
        .and(warp::get())
        .and(crate::json::query::<DelayQuery>())
        .and_then(|query: DelayQuery| async move { delay(query).await.map_err(warp::reject::custom) });
    let echo =
        warp::path!("debug" / "echo").and(warp::post()).and(warp::body::bytes()).map(|body: bytes::Bytes| echo(&body));
    delay.or(echo).unify().boxed()
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DelayQuery {
    /// How long to wait before answering, in milliseconds (at most 120000).
    pub ms: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Delayed {
    pub delayed_ms: u64,
}

/// Answers after `ms` milliseconds. Only served when `gateway.debug_routes` is on.
#[utoipa::path(
    get,
    path = "/debug/delay",
    tag = "operations",
    params(DelayQuery),
    responses((status = 200, body = Delayed), (status = 400, body = crate::error::ErrorBody))
)]
pub async fn delay(query: DelayQuery) -> Result<Response, ApiError> {
    if query.ms > MAX_DELAY_MS {
        return Err(
            ApiError::bad_request("invalid_query", format!("ms must be at most {MAX_DELAY_MS}")).with_param("ms")
        );
    }
    tokio::time::sleep(Duration::from_millis(query.ms)).await;
    Ok(warp::reply::json(&Delayed { delayed_ms: query.ms }).into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Echoed {
    pub received_bytes: u64,
}

/// Reads the whole request body and answers how many bytes arrived. Only served when
/// `gateway.debug_routes` is on.
#[utoipa::path(
    post,
    path = "/debug/echo",
    tag = "operations",
    request_body(content = String, content_type = "application/octet-stream"),
    responses((status = 200, body = Echoed), (status = 413, body = crate::error::ErrorBody))
)]
pub fn echo(body: &[u8]) -> Response {
    warp::reply::json(&Echoed { received_bytes: body.len() as u64 }).into_response()
}
