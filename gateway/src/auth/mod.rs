//! Who a request acts for. Every route that is not public takes a [`Caller`] from the
//! [`caller`] filter, which authenticates one of:
//!
//! - an API key, `Authorization: Bearer sk-maas-...` (as OpenAI's clients send it);
//! - a session token, `Authorization: Bearer maas_st_...`, or the console's HTTP-only
//!   `maas_session` cookie;
//! - the cluster cookie (`x-maas-cluster-cookie`), which acts as the node's built-in local
//!   administrator: whoever holds it can already join machines to the cluster, and the
//!   admin CLI presents it.
//!
//! The caller's tenant scope is resolved here, once, and every repository query on
//! tenant-owned rows takes it: that is where TEN-1 holds. A successful authentication is
//! kept for [`CACHE_TTL`], so the hot path is a hash and a map lookup; revoking a key or a
//! session on this node empties the cache at once, other nodes see it within the TTL.

pub mod oauth;
pub mod password;
pub mod secrets;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maas_store::quota::{QuotaCheck, QuotaLimits};
use maas_store::repo::keys::{ApiKey, KeyScope};
use maas_store::repo::users::{LOCAL_USER_ID, Role};
use maas_store::{Owner, TenantScope};
use warp::Filter;

use crate::error::ApiError;
use crate::middleware::RequestContext;
use crate::state::AppState;

/// The console's session cookie.
pub const SESSION_COOKIE: &str = "maas_session";
/// Headers naming the organisation a signed-in user acts for (OpenAI's, and ours).
pub const ORG_HEADERS: [&str; 2] = ["openai-organization", "x-maas-org"];
/// How long a successful authentication is reused without asking the database.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// How a caller proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Session {
        session_id: String,
    },
    ApiKey(Box<ApiKey>),
    ClusterCookie,
    /// Work the platform runs for an owner, such as the lines of a batch.
    Internal,
}

/// An authenticated request's identity, scope and limits.
#[derive(Debug, Clone)]
pub struct Caller {
    pub scope: TenantScope,
    pub role: Role,
    pub credential: Credential,
    /// The client's address, for the audit log.
    pub address: String,
    /// The quotas this caller's requests count against: the key's own, and its owner's.
    pub quotas: Vec<QuotaCheck>,
}

impl Caller {
    /// The quota subject of `owner` (`user:ID`, `org:ID`) and its limit read by `limit`,
    /// when this caller's quotas hold one above 0 (the caller acts for the owner).
    pub fn owner_limit(&self, owner: &Owner, limit: impl Fn(&QuotaLimits) -> u64) -> Option<(String, u64)> {
        let subject = format!("{}:{}", owner.kind(), owner.id());
        let found = self.quotas.iter().find(|check| check.subject == subject).map(|check| limit(&check.limits));
        found.filter(|max| *max > 0).map(|max| (subject, max))
    }

    /// The caller of work the platform runs for `scope`'s owner (a batch's lines): its
    /// usage is recorded; the request quotas were checked when the work was accepted.
    pub fn internal(scope: TenantScope) -> Self {
        Caller { scope, role: Role::User, credential: Credential::Internal, address: String::new(), quotas: Vec::new() }
    }

    pub fn user_id(&self) -> &str {
        self.scope.user_id()
    }

    pub fn key(&self) -> Option<&ApiKey> {
        match &self.credential {
            Credential::ApiKey(key) => Some(key),
            _ => None,
        }
    }

    pub fn key_id(&self) -> Option<&str> {
        self.key().map(|key| key.id.as_str())
    }

    /// Platform administration: an admin signed in, the cluster cookie, or an admin's key
    /// with the `admin` scope.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        let key_allows = self.key().is_none_or(|key| key.scopes.contains(&KeyScope::Admin));
        if self.role == Role::Admin && key_allows {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs a platform administrator"))
        }
    }

    /// Running deployments of one's own (private ones) and adding models to one's own part
    /// of the repository: administrators and enterprise users, signed in or with a key that
    /// has the `admin` scope.
    pub fn require_deployer(&self) -> Result<(), ApiError> {
        let key_allows = self.key().is_none_or(|key| key.scopes.contains(&KeyScope::Admin));
        if matches!(self.role, Role::Admin | Role::Enterprise) && key_allows {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "importing and deploying models needs an enterprise account or a platform administrator (with a key: the admin scope)",
            ))
        }
    }

    /// Refuses a model the caller's key is not allowed to call.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match self.key() {
            Some(key) if !key.allowed_models.is_empty() && !key.allowed_models.iter().any(|m| m == model) => {
                Err(ApiError::new(
                    http::StatusCode::FORBIDDEN,
                    "permission_error",
                    "model_not_allowed",
                    format!(
                        "this api key may not call model `{model}`; it may call: {}",
                        key.allowed_models.join(", ")
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The audit log's actor fields.
    pub fn audit_entry(
        &self,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> maas_store::repo::audit::NewAuditEntry {
        maas_store::repo::audit::NewAuditEntry {
            actor_user_id: Some(self.user_id().to_owned()),
            actor_key_id: self.key_id().map(str::to_owned),
            address: self.address.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail,
        }
    }
}

/// What a route needs of an API key's scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The inference API (models, chat, completions, embeddings, files, batches, sessions).
    Inference,
    /// Anything else: the console's API and administration.
    Manage,
}

/// The credentials a request presented, as read from its headers.
#[derive(Debug, Clone, Default)]
pub struct Presented {
    pub bearer: Option<String>,
    pub session_cookie: Option<String>,
    pub cluster_cookie: Option<String>,
    pub org: Option<String>,
}

impl Presented {
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        let text =
            |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
        let bearer = text("authorization").and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
        });
        let session_cookie = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == SESSION_COOKIE)
            .map(|(_, value)| value.to_owned());
        Presented {
            bearer,
            session_cookie,
            cluster_cookie: text(crate::routes::cluster::COOKIE_HEADER).map(str::to_owned),
            org: ORG_HEADERS.iter().find_map(|name| text(name)).map(str::to_owned),
        }
    }
}

/// The filter of every non-public route: the authenticated caller, or a 401/403.
pub fn caller(
    state: &Arc<AppState>,
    access: Access,
) -> impl Filter<Extract = (Caller,), Error = warp::Rejection> + Clone + use<> {
    crate::routes::with_state(state)
        .and(warp::header::headers_cloned())
        .and(warp::method())
        .and(warp::ext::optional::<RequestContext>())
        .and_then(
            move |state: Arc<AppState>,
                  headers: http::HeaderMap,
                  method: http::Method,
                  context: Option<RequestContext>| async move {
                let address = context.map(|c| c.client_addr.ip().to_string()).unwrap_or_default();
                authenticate(&state, &Presented::from_headers(&headers), &method, access, &address)
                    .await
                    .map_err(warp::reject::custom)
            },
        )
}

/// A route that needs a signed-in caller but not who it is.
pub fn signed_in(
    state: &Arc<AppState>,
    access: Access,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone + use<> {
    caller(state, access).map(|_caller: Caller| ()).untuple_one()
}

/// Authenticates `presented` for a request with `method` to a route that needs `access`.
pub async fn authenticate(
    state: &AppState,
    presented: &Presented,
    method: &http::Method,
    access: Access,
    address: &str,
) -> Result<Caller, ApiError> {
    let mut caller = identify(state, presented).await?;
    if let Some(key) = caller.key() {
        let read = matches!(*method, http::Method::GET | http::Method::HEAD);
        let allowed = key.scopes.contains(&KeyScope::Admin)
            || (access == Access::Inference && key.scopes.contains(&KeyScope::Inference))
            || (read && key.scopes.contains(&KeyScope::ReadOnly));
        if !allowed {
            let scopes: Vec<String> = key
                .scopes
                .iter()
                .map(|s| serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default())
                .collect();
            return Err(ApiError::new(
                http::StatusCode::FORBIDDEN,
                "permission_error",
                "insufficient_scope",
                format!("this api key's scopes ({}) do not allow {method} on this route", scopes.join(", ")),
            ));
        }
    }
    address.clone_into(&mut caller.address);
    Ok(caller)
}

/// The identity behind the presented credentials, from the cache or the database.
async fn identify(state: &AppState, presented: &Presented) -> Result<Caller, ApiError> {
    let stores = state.stores()?;
    if let Some(cookie) = &presented.cluster_cookie {
        crate::routes::cluster::check_cookie(state, Some(cookie)).map_err(|_| {
            ApiError::unauthorized(
                "invalid_cluster_cookie",
                "the x-maas-cluster-cookie header does not match this cluster's cookie",
            )
        })?;
        let cache_key = format!("cookie\u{0}{}", presented.org.as_deref().unwrap_or_default());
        if let Some(hit) = state.auth_cache.get(&cache_key) {
            return Ok(hit);
        }
        let user_id = stores.db.users().ensure_local().await?;
        let scope = resolve_scope(state, &user_id, presented.org.as_deref()).await?;
        let caller = Caller {
            scope,
            role: Role::Admin,
            credential: Credential::ClusterCookie,
            address: String::new(),
            quotas: Vec::new(),
        };
        state.auth_cache.put(cache_key, caller.clone());
        return Ok(caller);
    }
    let token = presented.bearer.as_deref().or(presented.session_cookie.as_deref()).ok_or_else(|| {
        ApiError::unauthorized(
            "missing_credentials",
            "sign in, or send an api key as `Authorization: Bearer sk-maas-...` (create one with POST /v1/keys)",
        )
    })?;
    let digest = secrets::sha256_hex(token);
    let cache_key = format!("{digest}\u{0}{}", presented.org.as_deref().unwrap_or_default());
    if let Some(hit) = state.auth_cache.get(&cache_key) {
        return Ok(hit);
    }
    let caller = if token.starts_with(secrets::KEY_PREFIX) {
        identify_key(state, &digest).await?
    } else if token.starts_with(secrets::SESSION_PREFIX) {
        identify_session(state, &digest, presented.org.as_deref()).await?
    } else {
        return Err(ApiError::unauthorized(
            "invalid_api_key",
            "the bearer token is not a maas api key (sk-maas-...) or session token (maas_st_...)",
        ));
    };
    state.auth_cache.put(cache_key, caller.clone());
    Ok(caller)
}

async fn identify_key(state: &AppState, digest: &str) -> Result<Caller, ApiError> {
    let stores = state.stores()?;
    let identity = stores.db.api_keys().by_secret(digest).await?.ok_or_else(|| {
        ApiError::unauthorized(
            "invalid_api_key",
            "this api key is not known: check it, or create one with POST /v1/keys",
        )
    })?;
    let key = identity.key;
    let now = maas_store::ids::now_ms();
    if key.revoked_at_ms.is_some() {
        return Err(ApiError::unauthorized("api_key_revoked", format!("api key {} was revoked", key.prefix)));
    }
    if key.expires_at_ms.is_some_and(|at| at <= now) {
        return Err(ApiError::unauthorized("api_key_expired", format!("api key {} has expired", key.prefix)));
    }
    if identity.user_status != "active" {
        return Err(ApiError::forbidden(format!("the account that created api key {} is not active", key.prefix)));
    }
    let org = match &key.owner {
        Owner::Org(id) => Some(id.clone()),
        Owner::User(_) => None,
    };
    let scope = resolve_scope(state, &key.created_by, org.as_deref()).await?;
    let mut quotas = Vec::new();
    if key.quota != QuotaLimits::default() {
        quotas.push(QuotaCheck { subject: format!("key:{}", key.id), limits: key.quota });
    }
    quotas.extend(owner_quota(state, scope.acting_as(), identity.user_role).await?);
    let db = stores.db.clone();
    let key_id = key.id.clone();
    tokio::spawn(async move {
        if let Err(err) = db.api_keys().touch(&key_id, now).await {
            tracing::debug!(error = %err, "recording a key's last use failed");
        }
    });
    Ok(Caller {
        scope,
        role: identity.user_role,
        credential: Credential::ApiKey(Box::new(key)),
        address: String::new(),
        quotas,
    })
}

async fn identify_session(state: &AppState, digest: &str, org: Option<&str>) -> Result<Caller, ApiError> {
    let stores = state.stores()?;
    let session =
        stores.db.credentials().session_by_token(digest, maas_store::ids::now_ms()).await?.ok_or_else(|| {
            ApiError::unauthorized("invalid_session", "this session has expired or was signed out: sign in again")
        })?;
    if session.user_status != "active" {
        return Err(ApiError::forbidden("this account is not active"));
    }
    let scope = resolve_scope(state, &session.user_id, org).await?;
    let quotas: Vec<QuotaCheck> = owner_quota(state, scope.acting_as(), session.role).await?.into_iter().collect();
    Ok(Caller {
        scope,
        role: session.role,
        credential: Credential::Session { session_id: session.session_id },
        address: String::new(),
        quotas,
    })
}

async fn resolve_scope(state: &AppState, user_id: &str, org: Option<&str>) -> Result<TenantScope, ApiError> {
    let stores = state.stores()?;
    TenantScope::resolve(&stores.db, user_id, org.map(|id| Owner::Org(id.to_owned()))).await.map_err(ApiError::from)
}

/// The quota of the owner a request acts for: the one set for it, else the free tier for
/// an individual user's own requests; administrators, enterprise users and organisations
/// without a quota of their own are not limited.
async fn owner_quota(state: &AppState, owner: &Owner, role: Role) -> Result<Option<QuotaCheck>, ApiError> {
    if owner.id() == LOCAL_USER_ID {
        return Ok(None);
    }
    let stores = state.stores()?;
    let limits = match stores.db.usage().quota(owner).await? {
        Some(limits) => Some(limits),
        None if matches!(owner, Owner::User(_)) && role == Role::User => Some(state.options.free_tier),
        None => None,
    };
    Ok(limits
        .filter(|l| *l != QuotaLimits::default())
        .map(|limits| QuotaCheck { subject: format!("{}:{}", owner.kind(), owner.id()), limits }))
}

/// Recent successful authentications, keyed by the credential's hash and the org header.
#[derive(Debug, Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<String, (Instant, Caller)>>,
}

/// Entries kept at most; past it the cache is emptied (it refills from the database).
const AUTH_CACHE_MAX: usize = 100_000;

impl AuthCache {
    fn get(&self, key: &str) -> Option<Caller> {
        let entries = self.entries.lock().expect("auth cache lock");
        entries.get(key).filter(|(at, _)| at.elapsed() < CACHE_TTL).map(|(_, caller)| caller.clone())
    }

    fn put(&self, key: String, caller: Caller) {
        let mut entries = self.entries.lock().expect("auth cache lock");
        if entries.len() >= AUTH_CACHE_MAX {
            entries.clear();
        }
        entries.insert(key, (Instant::now(), caller));
    }

    /// Forgets every authentication (a key or session was revoked, a role or quota
    /// changed), so the next request asks the database.
    pub fn clear(&self) {
        self.entries.lock().expect("auth cache lock").clear();
    }
}
