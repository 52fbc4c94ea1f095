//! The caller's safety rules: `GET/POST /v1/safety/rules`, `DELETE /v1/safety/rules/{id}`.
//! The platform's own rules (from `[safety] rules`) are listed too, marked, and cannot be
//! changed here.

use std::sync::Arc;

use maas_store::repo::safety::{Direction, NewRule, RuleKind};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::safety::check_pattern;
use crate::state::AppState;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let list = warp::path!("v1" / "safety" / "rules")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|s: Arc<AppState>, c: Caller| async move { list_rules(&s, &c).await.map_err(warp::reject::custom) });
    let create = warp::path!("v1" / "safety" / "rules")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<RuleRequest>(64 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: RuleRequest| async move {
            create_rule(&s, &c, request).await.map_err(warp::reject::custom)
        });
    let delete = warp::path!("v1" / "safety" / "rules" / String)
        .and(warp::delete())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            delete_rule(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    list.or(create).unify().or(delete).unify().boxed()
}

/// A new rule.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleRequest {
    /// `input` (the request's text), `output` (the answer) or `both`.
    #[schema(value_type = String)]
    pub direction: Direction,
    /// `keyword` (matched without regard to ASCII case) or `regex`.
    #[schema(value_type = String)]
    pub kind: RuleKind,
    pub pattern: String,
    /// Shown in the refusal, e.g. "personal identity numbers are not allowed".
    #[serde(default)]
    pub reason: String,
}

/// The rules applied to the caller's requests: the platform's (`"platform": true`) and
/// the caller's own and organisations'.
#[utoipa::path(get, path = "/v1/safety/rules", tag = "safety",
    responses((status = 200, description = "the rules", content_type = "application/json"), (status = 503, body = crate::error::ErrorBody)))]
pub async fn list_rules(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let scope = &caller.scope;
    let stores = state.stores()?;
    let mut data: Vec<serde_json::Value> = state
        .options
        .safety_rules
        .iter()
        .map(|rule| json!({"id": null, "platform": true, "direction": rule.direction, "kind": rule.kind, "pattern": rule.pattern, "reason": rule.reason}))
        .collect();
    for rule in stores.db.safety_rules().applicable(scope).await? {
        data.push(json!({"id": rule.id, "platform": false, "owner": rule.owner, "direction": rule.direction, "kind": rule.kind,
            "pattern": rule.pattern, "reason": rule.reason, "created_at": rule.created_at_ms / 1000}));
    }
    Ok(warp::reply::json(&json!({"object": "list", "data": data})).into_response())
}

/// Adds a rule for the caller; it applies to their next request on this node at once and
/// on other nodes within two seconds. A regex that does not compile is refused.
#[utoipa::path(post, path = "/v1/safety/rules", tag = "safety", request_body = RuleRequest,
    responses((status = 201, description = "the rule", content_type = "application/json"), (status = 400, body = crate::error::ErrorBody)))]
pub async fn create_rule(state: &AppState, caller: &Caller, request: RuleRequest) -> Result<Response, ApiError> {
    check_pattern(request.kind, &request.pattern)
        .map_err(|reason| ApiError::bad_request("invalid_pattern", reason).with_param("pattern"))?;
    let scope = &caller.scope;
    let stores = state.stores()?;
    let rule = stores
        .db
        .safety_rules()
        .create(
            scope,
            NewRule {
                direction: request.direction,
                kind: request.kind,
                pattern: request.pattern,
                reason: request.reason,
            },
        )
        .await?;
    state.safety.invalidate();
    Ok(warp::reply::with_status(warp::reply::json(&rule), http::StatusCode::CREATED).into_response())
}

/// Deletes one of the caller's rules (another tenant's is not found).
#[utoipa::path(delete, path = "/v1/safety/rules/{id}", tag = "safety",
    params(("id" = String, Path, description = "the rule's id")),
    responses((status = 200, description = "deleted", content_type = "application/json"), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete_rule(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let scope = &caller.scope;
    let stores = state.stores()?;
    let rule = stores.db.safety_rules().delete(scope, id).await?;
    state.safety.invalidate();
    super::auth::audit(state, caller.audit_entry("safety_rule.delete", &rule.id, json!({}))).await?;
    Ok(warp::reply::json(&json!({"id": rule.id, "object": "safety.rule", "deleted": true})).into_response())
}
