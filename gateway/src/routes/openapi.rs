//! The OpenAPI 3 document of every route, generated from the handlers' annotations.

use std::sync::Arc;

use utoipa::OpenApi;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "maas", description = "The maas node's REST API: OpenAI-compatible inference, the console API, and operations."),
    paths(
        super::index::index,
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
        openapi_json,
        super::cluster::cluster_status,
        super::cluster::list_nodes,
        super::cluster::join_member,
        super::cluster::remove_member,
        super::cluster::change_labels,
        super::cluster::list_gpus,
        super::cluster::node_agent,
        super::deployments::list_deployments,
        super::deployments::get_deployment,
        super::deployments::create_deployment,
        super::deployments::update_deployment,
        super::deployments::scale_deployment,
        super::deployments::delete_deployment,
        super::deployments::estimate_deployment,
        super::deployments::deployment_metrics,
        super::deployments::deployment_logs,
        super::deployments::drain_node,
        super::deployments::undrain_node,
        super::registry::upload_blob,
        super::registry::download_blob,
        super::registry::register_model,
        super::registry::list_models,
        super::registry::list_catalog,
        super::openai::list_models,
        super::openai::chat_completions,
        super::openai::completions,
        super::openai::embeddings,
        super::safety::list_rules,
        super::safety::create_rule,
        super::safety::delete_rule,
        super::files::upload_file,
        super::files::list_files,
        super::files::get_file,
        super::files::file_content,
        super::files::delete_file,
        super::batches::create_batch,
        super::batches::list_batches,
        super::batches::get_batch,
        super::batches::cancel_batch,
        super::fine_tuning::create_job,
        super::fine_tuning::list_jobs,
        super::fine_tuning::get_job,
        super::fine_tuning::cancel_job,
        super::fine_tuning::list_events,
        super::sessions::create_session,
        super::sessions::list_sessions,
        super::sessions::get_session,
        super::sessions::delete_session,
        super::sessions::session_socket,
        super::auth::sign_up,
        super::auth::verify_account,
        super::auth::request_code,
        super::auth::sign_in,
        super::auth::sign_out,
        super::auth::whoami,
        super::auth::change_password,
        super::auth::reset_password,
        super::auth::list_sign_ins,
        super::auth::revoke_sign_in,
        super::oauth::list_providers,
        super::oauth::start_sign_in,
        super::oauth::finish_sign_in,
        super::oauth::list_identities,
        super::keys::list_keys,
        super::keys::create_key,
        super::keys::get_key,
        super::keys::revoke_key,
        super::orgs::list_orgs,
        super::orgs::create_org,
        super::orgs::list_members,
        super::orgs::add_member,
        super::orgs::remove_member,
        super::usage::usage_summary,
        super::usage::usage_csv,
        super::usage::quota_status,
        super::admin::list_users,
        super::admin::create_user,
        super::admin::change_user,
        super::admin::set_quota,
        super::admin::list_audit,
        super::admin::list_outbox,
        super::admin::list_prices,
        super::admin::set_price,
        super::admin::delete_price,
        super::knowledge::create_knowledge_base,
        super::knowledge::list_knowledge_bases,
        super::knowledge::get_knowledge_base,
        super::knowledge::update_knowledge_base,
        super::knowledge::delete_knowledge_base,
        super::knowledge::upload_document,
        super::knowledge::list_documents,
        super::knowledge::get_document,
        super::knowledge::delete_document,
        super::knowledge::list_chunks,
        super::knowledge::retrieve_test,
        super::knowledge::knowledge_chat,
        super::knowledge::knowledge_graph,
        super::debug::delay,
        super::debug::echo,
    ),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail, crate::knowledge::rag::Citation)),
    tags(
        (name = "operations", description = "Health, readiness, metrics and diagnostics"),
        (name = "cluster", description = "The control plane: raft status, members and nodes"),
        (name = "inference", description = "OpenAI-compatible inference: models, chat, completions, embeddings"),
        (name = "files", description = "OpenAI-compatible files: uploads, batch inputs and outputs"),
        (name = "batches", description = "OpenAI-compatible batches: JSONL requests run in the background"),
        (name = "fine-tuning", description = "OpenAI-compatible fine-tuning: LoRA or full training jobs with live loss, metered in GPU hours"),
        (name = "models", description = "The model repository: blobs and immutable model versions"),
        (name = "safety", description = "Safety filters: keywords and patterns refused in requests and answers"),
        (name = "deployments", description = "Deployments of models: replicas placed by GPU memory, rolling updates, estimates"),
        (name = "accounts", description = "Accounts, sign-in, sessions, API keys and organisations"),
        (name = "usage", description = "Usage, cost and quotas of the caller"),
        (name = "admin", description = "Platform administration: accounts, quotas, prices, the audit log and the outbox"),
        (name = "sessions", description = "Chat sessions that keep their conversation across turns, with a WebSocket to chat in"),
        (name = "knowledge", description = "Knowledge bases: documents, ingestion, chunks and retrieval")
    )
)]
pub struct ApiDoc;

pub fn routes(_state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let document = Arc::new(ApiDoc::openapi().to_json().expect("the OpenAPI document serialises"));
    warp::path!("openapi.json").and(warp::get()).map(move || openapi_json(&document)).boxed()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub fn openapi_json(document: &str) -> Response {
    warp::reply::with_header(document.to_owned(), "content-type", "application/json").into_response()
}

/// The OpenAPI document as pretty-printed JSON (what `maas openapi` prints; the console's
/// API types are generated from it).
pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serialises")
}

/// Every documented (method, path template) pair, for the route-label table and tests.
pub fn documented_routes() -> Vec<(http::Method, String)> {
    let document = ApiDoc::openapi();
    let mut routes = Vec::new();
    for (path, item) in &document.paths.paths {
        let methods = [
            (http::Method::GET, item.get.is_some()),
            (http::Method::POST, item.post.is_some()),
            (http::Method::PUT, item.put.is_some()),
            (http::Method::PATCH, item.patch.is_some()),
            (http::Method::DELETE, item.delete.is_some()),
        ];
        for (method, present) in methods {
            if present {
                routes.push((method, path.clone()));
            }
        }
    }
    routes
}
