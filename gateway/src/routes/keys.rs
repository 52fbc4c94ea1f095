//! API keys: `GET/POST /v1/keys`, `GET/DELETE /v1/keys/{id}`. A key is shown whole once,
//! when it is created; after that only its prefix. Keys belong to the caller, or to the
//! organisation the caller acts for (creating and revoking those takes an owner or admin).

use std::sync::Arc;

use maas_store::quota::QuotaLimits;
use maas_store::repo::keys::{ApiKey, KeyScope, NewKey};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::auth::secrets::{new_api_key, sha256_hex, visible_prefix};
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let list =
        warp::path!("v1" / "keys").and(warp::get()).and(with_state(state)).and(caller(state, Access::Manage)).and_then(
            |s: Arc<AppState>, c: Caller| async move { list_keys(&s, &c).await.map_err(warp::reject::custom) },
        );
    let create = warp::path!("v1" / "keys")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<CreateKey>(64 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, body: CreateKey| async move {
            create_key(&s, &c, body).await.map_err(warp::reject::custom)
        });
    let get = warp::path!("v1" / "keys" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            get_key(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    let revoke = warp::path!("v1" / "keys" / String)
        .and(warp::delete())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            revoke_key(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    list.or(create).unify().or(get).unify().or(revoke).unify().boxed()
}

/// A new key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    /// `inference` (the default), `read_only` and/or `admin`.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub scopes: Option<Vec<KeyScope>>,
    /// Models the key may call; empty or absent: every model.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Days until the key stops working; absent: never.
    #[serde(default)]
    pub expires_in_days: Option<u32>,
    /// The key's own limits (0 or absent: unlimited by the key; the owner's quota still
    /// applies).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub quota: Option<QuotaLimits>,
}

/// A key as lists show it: never the secret.
pub fn key_json(key: &ApiKey) -> serde_json::Value {
    json!({
        "id": key.id, "object": "api_key", "name": key.name, "prefix": key.prefix, "owner": key.owner,
        "created_by": key.created_by, "scopes": key.scopes, "allowed_models": key.allowed_models, "quota": key.quota,
        "created_at": key.created_at_ms / 1000, "expires_at": key.expires_at_ms.map(|ms| ms / 1000),
        "last_used_at": key.last_used_at_ms.map(|ms| ms / 1000), "revoked_at": key.revoked_at_ms.map(|ms| ms / 1000),
        "status": if key.revoked_at_ms.is_some() { "revoked" }
            else if key.expires_at_ms.is_some_and(|at| at <= maas_store::ids::now_ms()) { "expired" } else { "active" },
    })
}

/// The keys of the caller (or of the organisation it acts for), newest first.
#[utoipa::path(get, path = "/v1/keys", tag = "accounts",
    responses((status = 200, description = "the keys, without their secrets", content_type = "application/json"), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list_keys(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let keys = state.stores()?.db.api_keys().list(&caller.scope).await?;
    let data: Vec<serde_json::Value> = keys.iter().map(key_json).collect();
    Ok(warp::reply::json(&json!({"object": "list", "data": data})).into_response())
}

/// Creates a key; the answer's `key` is the only time the secret is shown. A key never
/// has more power than its creator (`admin` is everything the creator may do), and a key
/// cannot create a key with scopes it lacks.
#[utoipa::path(post, path = "/v1/keys", tag = "accounts", request_body = CreateKey,
    responses((status = 201, description = "the key, with its secret this once", content_type = "application/json"), (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody)))]
pub async fn create_key(state: &AppState, caller: &Caller, body: CreateKey) -> Result<Response, ApiError> {
    let scopes = body.scopes.unwrap_or_else(|| vec![KeyScope::Inference]);
    if let Some(key) = caller.key()
        && scopes.iter().any(|scope| !key.scopes.contains(scope) && !key.scopes.contains(&KeyScope::Admin))
    {
        return Err(ApiError::forbidden("a key cannot create a key with scopes it does not have"));
    }
    if body.allowed_models.iter().any(|m| m.is_empty() || m.len() > 200) || body.allowed_models.len() > 100 {
        return Err(ApiError::bad_request(
            "invalid_allowed_models",
            "allowed_models holds up to 100 model names of 1 to 200 characters",
        )
        .with_param("allowed_models"));
    }
    let expires_at_ms = match body.expires_in_days {
        Some(0) => {
            return Err(ApiError::bad_request("invalid_expiry", "expires_in_days must be at least 1")
                .with_param("expires_in_days"));
        }
        Some(days) => Some(maas_store::ids::now_ms() + i64::from(days) * 86_400_000),
        None => None,
    };
    let secret = new_api_key();
    let mut sorted = scopes;
    sorted.sort();
    sorted.dedup();
    let key = state
        .stores()?
        .db
        .api_keys()
        .create(
            &caller.scope,
            NewKey {
                name: body.name,
                prefix: visible_prefix(&secret),
                secret_sha256: sha256_hex(&secret),
                scopes: sorted,
                allowed_models: body.allowed_models,
                quota: body.quota.unwrap_or_default(),
                expires_at_ms,
            },
        )
        .await?;
    state
        .stores()?
        .db
        .audit()
        .append(caller.audit_entry(
            "key.create",
            &key.id,
            json!({"name": key.name, "owner": key.owner, "scopes": key.scopes}),
        ))
        .await?;
    let mut answer = key_json(&key);
    answer["key"] = json!(secret);
    Ok(warp::reply::with_status(warp::reply::json(&answer), http::StatusCode::CREATED).into_response())
}

/// One key (another tenant's is not found).
#[utoipa::path(get, path = "/v1/keys/{id}", tag = "accounts", params(("id" = String, Path, description = "the key's id")),
    responses((status = 200, description = "the key, without its secret", content_type = "application/json"), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_key(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let key = state.stores()?.db.api_keys().get(&caller.scope, id).await?;
    Ok(warp::reply::json(&key_json(&key)).into_response())
}

/// Revokes a key: it stops working on this node at once, on others within seconds.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "accounts", params(("id" = String, Path, description = "the key's id")),
    responses((status = 200, description = "the revoked key", content_type = "application/json"), (status = 404, body = crate::error::ErrorBody)))]
pub async fn revoke_key(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let key = state.stores()?.db.api_keys().revoke(&caller.scope, id).await?;
    state.auth_cache.clear();
    state.stores()?.db.audit().append(caller.audit_entry("key.revoke", &key.id, json!({"name": key.name}))).await?;
    Ok(warp::reply::json(&key_json(&key)).into_response())
}
