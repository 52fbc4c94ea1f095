//! The routes: one module per area, assembled by [`routes`].

pub mod admin;
pub mod auth;
pub mod batches;
pub mod cluster;
pub mod debug;
pub mod deployments;
pub mod files;
pub mod fine_tuning;
pub mod health;
pub mod index;
pub mod keys;
pub mod knowledge;
pub mod oauth;
pub mod openai;
pub mod openapi;
pub mod orgs;
pub mod registry;
pub mod safety;
pub mod sessions;
pub mod usage;

use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::state::AppState;

/// Every route of the node, with rejections turned into OpenAI-shaped errors.
pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let api = health::routes(state)
        .or(cluster::routes(state))
        .unify()
        .or(deployments::routes(state))
        .unify()
        .or(registry::routes(state))
        .unify()
        .or(openai::routes(state))
        .unify()
        .or(safety::routes(state))
        .unify()
        .or(crate::load::routes(state))
        .unify()
        .or(files::routes(state))
        .unify()
        .or(knowledge::routes(state))
        .unify()
        .or(batches::routes(state))
        .unify()
        .or(fine_tuning::routes(state))
        .unify()
        .or(sessions::routes(state))
        .unify()
        .or(auth::routes(state))
        .unify()
        .or(oauth::routes(state))
        .unify()
        .or(keys::routes(state))
        .unify()
        .or(orgs::routes(state))
        .unify()
        .or(usage::routes(state))
        .unify()
        .or(admin::routes(state))
        .unify()
        .or(openapi::routes(state))
        .unify()
        .or(index::routes(state))
        .unify()
        .boxed();
    let api = if state.options.debug_routes { api.or(debug::routes()).unify().boxed() } else { api };
    api.recover(crate::error::recover).unify().boxed()
}

/// Hands a route's shared state to its handler.
pub(crate) fn with_state(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>,), Error = std::convert::Infallible> + Clone + use<> {
    let state = Arc::clone(state);
    warp::any().map(move || Arc::clone(&state))
}

/// A list as OpenAI's API shapes one: `{"object": "list", "data": [...]}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ListOf<T: utoipa::ToSchema> {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<T>,
}

impl<T: utoipa::ToSchema + serde::Serialize> ListOf<T> {
    /// The list of `data` as a JSON response.
    pub fn reply(data: Vec<T>) -> Response {
        use warp::Reply as _;
        warp::reply::json(&ListOf { object: "list", data }).into_response()
    }
}
