//! Platform administration: accounts and their roles, quotas of users and organisations,
//! the price table, the audit log and the outbox. Every route needs a platform
//! administrator (`Caller::require_admin`), and every change is written to the audit log.

use std::sync::Arc;

use maas_store::Owner;
use maas_store::quota::QuotaLimits;
use maas_store::repo::audit::AuditFilter;
use maas_store::repo::usage::Price;
use maas_store::repo::users::Role;
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

fn admin(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>, Caller), Error = warp::Rejection> + Clone + use<> {
    with_state(state)
        .and(caller(state, Access::Manage))
        .and_then(|s: Arc<AppState>, c: Caller| async move {
            c.require_admin().map_err(warp::reject::custom)?;
            Ok::<_, warp::Rejection>((s, c))
        })
        .untuple_one()
}

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let users = warp::path!("v1" / "admin" / "users")
        .and(warp::get())
        .and(admin(state))
        .and_then(|s: Arc<AppState>, _c: Caller| async move { list_users(&s).await.map_err(warp::reject::custom) });
    let create_user = warp::path!("v1" / "admin" / "users")
        .and(warp::post())
        .and(admin(state))
        .and(crate::json::json_body::<CreateUser>(16 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, body: CreateUser| async move {
            create_user(&s, &c, body).await.map_err(warp::reject::custom)
        });
    let change_user = warp::path!("v1" / "admin" / "users" / String)
        .and(warp::patch())
        .and(admin(state))
        .and(crate::json::json_body::<UserChange>(4 * 1024))
        .and_then(|id: String, s: Arc<AppState>, c: Caller, body: UserChange| async move {
            change_user(&s, &c, &id, body).await.map_err(warp::reject::custom)
        });
    let quota = warp::path!("v1" / "admin" / "quotas" / String / String)
        .and(warp::put())
        .and(admin(state))
        .and(crate::json::json_body::<Option<QuotaLimits>>(4 * 1024))
        .and_then(|kind: String, id: String, s: Arc<AppState>, c: Caller, body: Option<QuotaLimits>| async move {
            set_quota(&s, &c, &kind, &id, body).await.map_err(warp::reject::custom)
        });
    let audit = warp::path!("v1" / "admin" / "audit")
        .and(warp::get())
        .and(admin(state))
        .and(crate::json::query::<AuditQuery>())
        .and_then(|s: Arc<AppState>, _c: Caller, query: AuditQuery| async move {
            list_audit(&s, query).await.map_err(warp::reject::custom)
        });
    let outbox = warp::path!("v1" / "admin" / "outbox")
        .and(warp::get())
        .and(admin(state))
        .and(crate::json::query::<OutboxQuery>())
        .and_then(|s: Arc<AppState>, _c: Caller, query: OutboxQuery| async move {
            list_outbox(&s, query).await.map_err(warp::reject::custom)
        });
    let prices = warp::path!("v1" / "admin" / "prices")
        .and(warp::get())
        .and(admin(state))
        .and_then(|s: Arc<AppState>, _c: Caller| async move { list_prices(&s).await.map_err(warp::reject::custom) });
    let set_price_route = warp::path!("v1" / "admin" / "prices" / String)
        .and(warp::put())
        .and(admin(state))
        .and(crate::json::json_body::<Price>(4 * 1024))
        .and_then(|model: String, s: Arc<AppState>, c: Caller, price: Price| async move {
            set_price(&s, &c, &model, price).await.map_err(warp::reject::custom)
        });
    let delete_price_route = warp::path!("v1" / "admin" / "prices" / String)
        .and(warp::delete())
        .and(admin(state))
        .and_then(|model: String, s: Arc<AppState>, c: Caller| async move {
            delete_price(&s, &c, &model).await.map_err(warp::reject::custom)
        });
    users
        .or(create_user)
        .unify()
        .or(change_user)
        .unify()
        .or(quota)
        .unify()
        .or(audit)
        .unify()
        .or(outbox)
        .unify()
        .or(prices)
        .unify()
        .or(set_price_route)
        .unify()
        .or(delete_price_route)
        .unify()
        .boxed()
}

/// An account made by an administrator: active at once (no verification), with the role
/// given (`user` by default). `maas admin create` sends it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub email: Option<String>,
    pub phone: Option<String>,
    pub password: String,
    #[serde(default)]
    pub display_name: Option<String>,
    /// `admin`, `enterprise` or `user`.
    #[serde(default)]
    pub role: Option<String>,
}

/// A change to an account: its platform role and/or status.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserChange {
    /// `admin`, `enterprise` or `user`.
    pub role: Option<String>,
    /// `active` or `disabled` (disabling signs the account out everywhere).
    pub status: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Unix seconds.
    pub since: Option<i64>,
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxQuery {
    pub recipient: Option<String>,
    pub limit: Option<u32>,
}

async fn record(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<(), ApiError> {
    state.stores()?.db.audit().append(caller.audit_entry(action, target, detail)).await?;
    Ok(())
}

/// Every account.
#[utoipa::path(get, path = "/v1/admin/users", tag = "admin",
    responses((status = 200, description = "the accounts", body = super::ListOf<maas_store::repo::users::User>), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_users(state: &AppState) -> Result<Response, ApiError> {
    let users = state.stores()?.db.users().list().await?;
    Ok(super::ListOf::reply(users))
}

/// Makes an account (active at once) with a role; the password must pass the same
/// strength check as at sign-up.
#[utoipa::path(post, path = "/v1/admin/users", tag = "admin", request_body = CreateUser,
    responses((status = 201, description = "the account", body = maas_store::repo::users::User), (status = 400, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create_user(state: &AppState, caller: &Caller, body: CreateUser) -> Result<Response, ApiError> {
    let role = Role::parse(body.role.as_deref().unwrap_or("user"))?;
    let user = super::auth::create_account(
        state,
        super::auth::SignUp {
            email: body.email,
            phone: body.phone,
            password: body.password,
            display_name: body.display_name,
        },
        role,
    )
    .await?;
    record(state, caller, "user.create", &user.id, json!({"role": role})).await?;
    Ok(warp::reply::with_status(warp::reply::json(&user), http::StatusCode::CREATED).into_response())
}

/// Changes an account's role or status. The last active administrator cannot be demoted
/// or disabled.
#[utoipa::path(patch, path = "/v1/admin/users/{id}", tag = "admin", request_body = UserChange, params(("id" = String, Path, description = "the user's id")),
    responses((status = 200, description = "the account", body = maas_store::repo::users::User), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn change_user(state: &AppState, caller: &Caller, id: &str, body: UserChange) -> Result<Response, ApiError> {
    let db = &state.stores()?.db;
    let user = db.users().get(id).await?;
    let role = body.role.as_deref().map(Role::parse).transpose()?;
    if let Some(status) = body.status.as_deref()
        && !matches!(status, "active" | "disabled")
    {
        return Err(ApiError::bad_request("invalid_status", format!("status `{status}` is not active or disabled"))
            .with_param("status"));
    }
    let loses_admin = user.role == Role::Admin
        && user.status == "active"
        && (role.is_some_and(|r| r != Role::Admin) || body.status.as_deref() == Some("disabled"));
    if loses_admin && db.users().count_admins().await? <= 1 {
        return Err(ApiError::conflict("this is the last active administrator: make another one first"));
    }
    if let Some(role) = role {
        db.users().set_role(id, role).await?;
        record(state, caller, "user.role", id, json!({"from": user.role, "to": role})).await?;
    }
    if let Some(status) = body.status.as_deref() {
        db.users().set_status(id, status).await?;
        if status == "disabled" {
            db.credentials().revoke_all_sessions(id).await?;
        }
        record(state, caller, "user.status", id, json!({"from": user.status, "to": status})).await?;
    }
    state.auth_cache.clear();
    Ok(warp::reply::json(&db.users().get(id).await?).into_response())
}

/// Sets the quota of a user or organisation (`kind` is `user` or `org`); `null` removes
/// it (back to the free tier for individual users, unlimited otherwise).
#[utoipa::path(put, path = "/v1/admin/quotas/{kind}/{id}", tag = "admin", request_body(content = Object, description = "the limits, or null"),
    params(("kind" = String, Path, description = "user or org"), ("id" = String, Path, description = "the user's or organisation's id")),
    responses((status = 200, description = "the quota", content_type = "application/json"), (status = 400, body = crate::error::ErrorBody)))]
pub async fn set_quota(
    state: &AppState,
    caller: &Caller,
    kind: &str,
    id: &str,
    limits: Option<QuotaLimits>,
) -> Result<Response, ApiError> {
    let db = &state.stores()?.db;
    let owner = match kind {
        "user" => {
            db.users().get(id).await?;
            Owner::User(id.to_owned())
        }
        "org" => Owner::Org(id.to_owned()),
        other => return Err(ApiError::bad_request("invalid_kind", format!("`{other}` is not user or org"))),
    };
    db.usage().set_quota(&owner, limits.as_ref()).await?;
    state.auth_cache.clear();
    record(state, caller, "quota.set", &format!("{kind}:{id}"), json!({"limits": limits})).await?;
    Ok(warp::reply::json(&json!({"owner": owner, "limits": limits})).into_response())
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "admin",
    params(("actor" = Option<String>, Query, description = "a user id"), ("action" = Option<String>, Query, description = "an action or its prefix, e.g. key."),
        ("since" = Option<i64>, Query, description = "Unix seconds"), ("limit" = Option<u32>, Query, description = "at most this many (default 100)")),
    responses((status = 200, description = "entries", body = super::ListOf<maas_store::repo::audit::AuditEntry>), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_audit(state: &AppState, query: AuditQuery) -> Result<Response, ApiError> {
    let filter = AuditFilter {
        actor_user_id: query.actor,
        action_prefix: query.action,
        since_ms: query.since.map(|s| s.saturating_mul(1000)),
        limit: query.limit.unwrap_or(100),
    };
    let entries = state.stores()?.db.audit().list(&filter).await?;
    Ok(super::ListOf::reply(entries))
}

/// Messages to users (verification and reset codes), newest first.
#[utoipa::path(get, path = "/v1/admin/outbox", tag = "admin",
    params(("recipient" = Option<String>, Query, description = "an email address or phone number"), ("limit" = Option<u32>, Query, description = "at most this many (default 50)")),
    responses((status = 200, description = "messages", body = super::ListOf<maas_store::repo::outbox::OutboxMessage>), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_outbox(state: &AppState, query: OutboxQuery) -> Result<Response, ApiError> {
    let recipient = query.recipient.map(|r| r.trim().to_lowercase());
    let messages = state.stores()?.db.outbox().list(recipient.as_deref(), query.limit.unwrap_or(50)).await?;
    Ok(super::ListOf::reply(messages))
}

/// The price table.
#[utoipa::path(get, path = "/v1/admin/prices", tag = "admin",
    responses((status = 200, description = "prices in millionths of the currency unit", body = super::ListOf<ModelPrice>), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_prices(state: &AppState) -> Result<Response, ApiError> {
    let prices = state.stores()?.db.usage().prices().await?;
    Ok(super::ListOf::reply(prices.into_iter().map(|(model, price)| ModelPrice { model, price }).collect()))
}

/// A model's prices (`*`: the default).
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ModelPrice {
    pub model: String,
    pub price: Price,
}

/// Sets a model's prices (`*` is the default); records from now on are costed by them.
#[utoipa::path(put, path = "/v1/admin/prices/{model}", tag = "admin", request_body(content = Object, description = "input_per_1k_micros, output_per_1k_micros, gpu_hour_micros"),
    params(("model" = String, Path, description = "a model (deployment) name, or *")),
    responses((status = 200, description = "the price", body = ModelPrice), (status = 400, body = crate::error::ErrorBody)))]
pub async fn set_price(state: &AppState, caller: &Caller, model: &str, price: Price) -> Result<Response, ApiError> {
    state.stores()?.db.usage().set_price(model, price).await?;
    record(state, caller, "price.set", model, json!(price)).await?;
    Ok(warp::reply::json(&ModelPrice { model: model.to_owned(), price }).into_response())
}

/// Removes a model's prices (the default `*` applies again).
#[utoipa::path(delete, path = "/v1/admin/prices/{model}", tag = "admin", params(("model" = String, Path, description = "a model name, or *")),
    responses((status = 200, description = "deleted", content_type = "application/json"), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete_price(state: &AppState, caller: &Caller, model: &str) -> Result<Response, ApiError> {
    state.stores()?.db.usage().delete_price(model).await?;
    record(state, caller, "price.delete", model, json!({})).await?;
    Ok(warp::reply::json(&json!({"model": model, "deleted": true})).into_response())
}
