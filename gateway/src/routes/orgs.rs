//! Organisations: `GET/POST /v1/orgs`, and their members (`GET/POST
//! /v1/orgs/{id}/members`, `DELETE /v1/orgs/{id}/members/{user_id}`). An organisation is
//! invisible (not found) to anyone who is not a member; its owners and admins manage the
//! members. A request acts for an organisation with the `OpenAI-Organization` (or
//! `x-maas-org`) header, or through a key the organisation owns.

use std::sync::Arc;

use maas_store::repo::orgs::OrgRole;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let list =
        warp::path!("v1" / "orgs").and(warp::get()).and(with_state(state)).and(caller(state, Access::Manage)).and_then(
            |s: Arc<AppState>, c: Caller| async move { list_orgs(&s, &c).await.map_err(warp::reject::custom) },
        );
    let create = warp::path!("v1" / "orgs")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<CreateOrg>(4 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, body: CreateOrg| async move {
            create_org(&s, &c, body).await.map_err(warp::reject::custom)
        });
    let members = warp::path!("v1" / "orgs" / String / "members")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            list_members(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    let add = warp::path!("v1" / "orgs" / String / "members")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<AddMember>(4 * 1024))
        .and_then(|id: String, s: Arc<AppState>, c: Caller, body: AddMember| async move {
            add_member(&s, &c, &id, body).await.map_err(warp::reject::custom)
        });
    let remove = warp::path!("v1" / "orgs" / String / "members" / String)
        .and(warp::delete())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: String, user: String, s: Arc<AppState>, c: Caller| async move {
            remove_member(&s, &c, &id, &user).await.map_err(warp::reject::custom)
        });
    list.or(create).unify().or(members).unify().or(add).unify().or(remove).unify().boxed()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    /// Lowercase letters, digits and dashes.
    pub name: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    /// The new member's email address or phone number.
    pub login: String,
    /// `owner`, `admin` or `member` (the default).
    #[serde(default)]
    pub role: Option<String>,
}

/// The caller's role in `org_id`; not a member: not found (the organisation stays
/// invisible).
async fn membership(state: &AppState, caller: &Caller, org_id: &str) -> Result<OrgRole, ApiError> {
    state
        .stores()?
        .db
        .orgs()
        .role_of(org_id, caller.user_id())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("organisation `{org_id}` not found")))
}

async fn managing(state: &AppState, caller: &Caller, org_id: &str) -> Result<(), ApiError> {
    if membership(state, caller, org_id).await?.manages() {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("only an owner or admin of organisation `{org_id}` may change its members")))
    }
}

/// The caller's organisations.
#[utoipa::path(get, path = "/v1/orgs", tag = "accounts",
    responses((status = 200, description = "organisations", body = super::ListOf<maas_store::repo::orgs::Org>), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list_orgs(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let orgs = state.stores()?.db.orgs().list_for_user(caller.user_id()).await?;
    Ok(super::ListOf::reply(orgs))
}

/// Creates an organisation with the caller as its owner.
#[utoipa::path(post, path = "/v1/orgs", tag = "accounts", request_body = CreateOrg,
    responses((status = 201, description = "the organisation", body = maas_store::repo::orgs::Org), (status = 400, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create_org(state: &AppState, caller: &Caller, body: CreateOrg) -> Result<Response, ApiError> {
    let display = body.display_name.unwrap_or_else(|| body.name.clone());
    let org = state.stores()?.db.orgs().create(&body.name, display.trim(), caller.user_id()).await?;
    state.stores()?.db.audit().append(caller.audit_entry("org.create", &org.id, json!({"name": org.name}))).await?;
    Ok(warp::reply::with_status(warp::reply::json(&org), http::StatusCode::CREATED).into_response())
}

/// The organisation's members (members only).
#[utoipa::path(get, path = "/v1/orgs/{id}/members", tag = "accounts", params(("id" = String, Path, description = "the organisation's id")),
    responses((status = 200, description = "members", body = super::ListOf<maas_store::repo::orgs::Member>), (status = 404, body = crate::error::ErrorBody)))]
pub async fn list_members(state: &AppState, caller: &Caller, org_id: &str) -> Result<Response, ApiError> {
    membership(state, caller, org_id).await?;
    let members = state.stores()?.db.orgs().members(org_id).await?;
    Ok(super::ListOf::reply(members))
}

/// Adds an account to the organisation (owners and admins; only an owner adds owners).
#[utoipa::path(post, path = "/v1/orgs/{id}/members", tag = "accounts", request_body = AddMember, params(("id" = String, Path, description = "the organisation's id")),
    responses((status = 201, description = "added", content_type = "application/json"), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn add_member(
    state: &AppState,
    caller: &Caller,
    org_id: &str,
    body: AddMember,
) -> Result<Response, ApiError> {
    managing(state, caller, org_id).await?;
    let role = OrgRole::parse(body.role.as_deref().unwrap_or("member"))?;
    if role == OrgRole::Owner && membership(state, caller, org_id).await? != OrgRole::Owner {
        return Err(ApiError::forbidden("only an owner may add owners"));
    }
    let db = &state.stores()?.db;
    let (user, _) = db
        .users()
        .find_for_sign_in(&body.login)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no account signs in as `{}`", body.login.trim())))?;
    db.orgs().add_member(org_id, &user.id, role).await?;
    state.auth_cache.clear();
    db.audit().append(caller.audit_entry("org.member_add", org_id, json!({"user_id": user.id, "role": role}))).await?;
    Ok(warp::reply::with_status(
        warp::reply::json(&json!({"org_id": org_id, "user_id": user.id, "org_role": role})),
        http::StatusCode::CREATED,
    )
    .into_response())
}

/// Removes a member (owners and admins, or the member themselves leaving).
#[utoipa::path(delete, path = "/v1/orgs/{id}/members/{user_id}", tag = "accounts",
    params(("id" = String, Path, description = "the organisation's id"), ("user_id" = String, Path, description = "the member's user id")),
    responses((status = 200, description = "removed", content_type = "application/json"), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn remove_member(
    state: &AppState,
    caller: &Caller,
    org_id: &str,
    user_id: &str,
) -> Result<Response, ApiError> {
    if user_id == caller.user_id() {
        membership(state, caller, org_id).await?;
    } else {
        managing(state, caller, org_id).await?;
    }
    let db = &state.stores()?.db;
    db.orgs().remove_member(org_id, user_id).await?;
    state.auth_cache.clear();
    db.audit().append(caller.audit_entry("org.member_remove", org_id, json!({"user_id": user_id}))).await?;
    Ok(warp::reply::json(&json!({"org_id": org_id, "user_id": user_id, "removed": true})).into_response())
}
