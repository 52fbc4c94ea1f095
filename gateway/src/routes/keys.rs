//! API keys: `GET/POST /v1/keys`, `GET/DELETE /v1/keys/{id}`. A key is shown whole once,
//! when it is created; after that only its prefix. Keys belong to the caller, or to the
//! organisation the caller acts for (creating and revoking those takes an owner or admin).

use std::sync::Arc;

use maas_store::quota::QuotaLimits;
use maas_store::repo::keys::{ApiKey, KeyScope, NewKey};
use serde::{Deserialize, Serialize};
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
    pub quota: Option<QuotaLimits>,
}

/// An API key as the API shows it: the secret only in the answer to creating it.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyObject {
    pub id: String,
    /// Always `api_key`.
    pub object: &'static str,
    pub name: String,
    /// The key's first characters (`sk-maas-AbCd1234`).
    pub prefix: String,
    pub owner: maas_store::Owner,
    /// The user who made it.
    pub created_by: String,
    pub scopes: Vec<KeyScope>,
    /// Models the key may call; empty: every model.
    pub allowed_models: Vec<String>,
    /// The key's own limits.
    pub quota: QuotaLimits,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    /// `active`, `revoked` or `expired`.
    pub status: &'static str,
    /// The secret, shown this once (creating the key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl From<&ApiKey> for KeyObject {
    fn from(key: &ApiKey) -> Self {
        let status = if key.revoked_at_ms.is_some() {
            "revoked"
        } else if key.expires_at_ms.is_some_and(|at| at <= maas_store::ids::now_ms()) {
            "expired"
        } else {
            "active"
        };
        KeyObject {
            id: key.id.clone(),
            object: "api_key",
            name: key.name.clone(),
            prefix: key.prefix.clone(),
            owner: key.owner.clone(),
            created_by: key.created_by.clone(),
            scopes: key.scopes.clone(),
            allowed_models: key.allowed_models.clone(),
            quota: key.quota,
            created_at: key.created_at_ms / 1000,
            expires_at: key.expires_at_ms.map(|ms| ms / 1000),
            last_used_at: key.last_used_at_ms.map(|ms| ms / 1000),
            revoked_at: key.revoked_at_ms.map(|ms| ms / 1000),
            status,
            key: None,
        }
    }
}

/// The keys of the caller (or of the organisation it acts for), newest first.
#[utoipa::path(get, path = "/v1/keys", tag = "accounts",
    responses((status = 200, description = "the keys, without their secrets", body = super::ListOf<KeyObject>), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list_keys(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let keys = state.stores()?.db.api_keys().list(&caller.scope).await?;
    Ok(super::ListOf::reply(keys.iter().map(KeyObject::from).collect()))
}

/// Creates a key; the answer's `key` is the only time the secret is shown. A key never
/// has more power than its creator (`admin` is everything the creator may do), and a key
/// cannot create a key with scopes it lacks.
#[utoipa::path(post, path = "/v1/keys", tag = "accounts", request_body = CreateKey,
    responses((status = 201, description = "the key, with its secret this once", body = KeyObject), (status = 400, body = crate::error::ErrorBody),
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
    let mut answer = KeyObject::from(&key);
    answer.key = Some(secret);
    Ok(warp::reply::with_status(warp::reply::json(&answer), http::StatusCode::CREATED).into_response())
}

/// One key (another tenant's is not found).
#[utoipa::path(get, path = "/v1/keys/{id}", tag = "accounts", params(("id" = String, Path, description = "the key's id")),
    responses((status = 200, description = "the key, without its secret", body = KeyObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_key(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let key = state.stores()?.db.api_keys().get(&caller.scope, id).await?;
    Ok(warp::reply::json(&KeyObject::from(&key)).into_response())
}

/// Revokes a key: it stops working on this node at once, on others within seconds.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "accounts", params(("id" = String, Path, description = "the key's id")),
    responses((status = 200, description = "the revoked key", body = KeyObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn revoke_key(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let key = state.stores()?.db.api_keys().revoke(&caller.scope, id).await?;
    state.auth_cache.clear();
    state.stores()?.db.audit().append(caller.audit_entry("key.revoke", &key.id, json!({"name": key.name}))).await?;
    Ok(warp::reply::json(&KeyObject::from(&key)).into_response())
}
