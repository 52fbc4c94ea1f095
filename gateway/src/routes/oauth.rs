//! Sign-in through OAuth 2.0 / OpenID Connect providers (`[[auth.oauth]]`).
//!
//! `GET /v1/auth/oauth` lists the providers (the console draws a button for each);
//! `GET /v1/auth/oauth/{name}/start` sends the browser to the provider, with a state bound
//! to this browser by a short-lived cookie; `GET /v1/auth/oauth/{name}/callback` is where
//! the provider sends it back: the code is exchanged, the identity checked, the account
//! found, linked or made, and a session opened as a password sign-in would.
//!
//! Accounts: a provider account already linked signs in to its user. Otherwise an email
//! address the provider vouches for (`email_verified`, or GitHub's verified primary
//! address) links to the user with that address, or makes a new active account (the
//! first account becomes the administrator, as with sign-up; later ones need
//! `auth.allow_signup`). An address the provider does not vouch for is refused.

use std::collections::HashMap;
use std::sync::Arc;

use maas_store::StoreError;
use maas_store::repo::audit::NewAuditEntry;
use maas_store::repo::identities::PendingSignIn;
use maas_store::repo::users::{NewUser, Role, User};
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::auth::{account_disabled, anonymous_entry, audit, client_address, open_session};
use super::with_state;
use crate::auth::oauth::{ExternalIdentity, OAuthError, OAuthProvider};
use crate::auth::secrets::sha256_hex;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::state::AppState;

/// The cookie that binds a sign-in's state to the browser that started it.
const STATE_COOKIE: &str = "maas_oauth_state";
/// How long a user may take at the provider.
const STATE_TTL_SECS: i64 = 600;

type Query = HashMap<String, String>;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let list = warp::path!("v1" / "auth" / "oauth")
        .and(warp::get())
        .and(with_state(state))
        .map(|s: Arc<AppState>| list_providers(&s));
    let start = warp::path!("v1" / "auth" / "oauth" / String / "start")
        .and(warp::get())
        .and(with_state(state))
        .and(warp::header::optional::<String>("host"))
        .and(crate::json::query::<Query>())
        .and_then(|name: String, s: Arc<AppState>, host: Option<String>, query: Query| async move {
            start_sign_in(&s, &name, host.as_deref(), &query).await.map_err(warp::reject::custom)
        });
    let callback = warp::path!("v1" / "auth" / "oauth" / String / "callback")
        .and(warp::get())
        .and(with_state(state))
        .and(client_address())
        .and(warp::header::optional::<String>("user-agent"))
        .and(warp::header::optional::<String>("cookie"))
        .and(crate::json::query::<Query>())
        .and_then(
            |name: String,
             s: Arc<AppState>,
             address: String,
             agent: Option<String>,
             cookies: Option<String>,
             query: Query| async move {
                let browser = Browser {
                    address,
                    user_agent: agent.unwrap_or_default(),
                    state_cookie: cookie_value(cookies.as_deref(), STATE_COOKIE),
                };
                finish_sign_in(&s, &name, &browser, &query).await.map_err(warp::reject::custom)
            },
        );
    let identities = warp::path!("v1" / "auth" / "identities")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(
            |s: Arc<AppState>, c: Caller| async move { list_identities(&s, &c).await.map_err(warp::reject::custom) },
        );
    list.or(start).unify().or(callback).unify().or(identities).unify().boxed()
}

/// The browser a callback came from.
struct Browser {
    address: String,
    user_agent: String,
    state_cookie: Option<String>,
}

fn cookie_value(header: Option<&str>, name: &str) -> Option<String> {
    header?
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, v)| v.to_owned())
}

/// The sign-in providers, for the console's buttons.
#[utoipa::path(get, path = "/v1/auth/oauth", tag = "accounts",
    responses((status = 200, description = "the providers", body = super::ListOf<ProviderView>)))]
pub fn list_providers(state: &AppState) -> Response {
    let data: Vec<ProviderView> = state
        .oauth
        .list()
        .iter()
        .map(|p| ProviderView {
            name: p.name.clone(),
            kind: p.kind,
            display_name: p.label().to_owned(),
            start_url: format!("/v1/auth/oauth/{}/start", p.name),
        })
        .collect();
    super::ListOf::reply(data)
}

/// A sign-in provider, for the console's buttons.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ProviderView {
    pub name: String,
    pub kind: crate::auth::oauth::ProviderKind,
    pub display_name: String,
    /// Where the browser starts signing in.
    pub start_url: String,
}

fn provider<'a>(state: &'a AppState, name: &str) -> Result<&'a OAuthProvider, ApiError> {
    state.oauth.get(name).ok_or_else(|| {
        ApiError::not_found(format!("no sign-in provider `{name}` is configured: GET /v1/auth/oauth lists them"))
    })
}

/// Where the browser may be sent after signing in: a path on this site, never another
/// site (`//host`, `/\host` and schemes are refused), so the route is no open redirect.
fn safe_return_path(path: &str) -> Result<String, ApiError> {
    let safe = path.starts_with('/')
        && !path.starts_with("//")
        && !path.starts_with("/\\")
        && path.len() <= 512
        && path.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'<' | b'>' | b'\\' | b'\''));
    if safe {
        Ok(path.to_owned())
    } else {
        Err(ApiError::bad_request("invalid_return_to", "return_to must be a path on this site, such as /console")
            .with_param("return_to"))
    }
}

fn redirect_uri(state: &AppState, name: &str, host: Option<&str>) -> Result<String, ApiError> {
    let base = if state.options.auth.public_url.is_empty() {
        let host = host.filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic())).ok_or_else(|| {
            ApiError::bad_request("missing_host", "the request has no Host header: set auth.public_url")
        })?;
        let scheme = if state.options.auth.secure_cookies { "https" } else { "http" };
        format!("{scheme}://{host}")
    } else {
        state.options.auth.public_url.trim_end_matches('/').to_owned()
    };
    Ok(format!("{base}/v1/auth/oauth/{name}/callback"))
}

fn provider_error(err: &OAuthError) -> ApiError {
    match err {
        OAuthError::Provider { .. } => {
            ApiError::new(http::StatusCode::BAD_GATEWAY, "api_error", "oauth_provider_unavailable", err.to_string())
        }
        OAuthError::Rejected { .. } => ApiError::unauthorized("oauth_rejected", format!("{err}: start again")),
    }
}

/// Sends the browser to the provider (302), with PKCE, a state and (OpenID Connect) a
/// nonce; `return_to` is where it lands once signed in.
#[utoipa::path(get, path = "/v1/auth/oauth/{name}/start", tag = "accounts",
    params(("name" = String, Path, description = "the provider's name"), ("return_to" = Option<String>, Query, description = "a path on this site")),
    responses((status = 302, description = "to the provider"), (status = 404, body = crate::error::ErrorBody), (status = 502, body = crate::error::ErrorBody)))]
pub async fn start_sign_in(
    state: &AppState,
    name: &str,
    host: Option<&str>,
    query: &Query,
) -> Result<Response, ApiError> {
    let provider = provider(state, name)?;
    let return_to = safe_return_path(query.get("return_to").map_or("/", String::as_str))?;
    let redirect_uri = redirect_uri(state, name, host)?;
    let authorization = state.oauth.begin(provider, &redirect_uri).await.map_err(|err| provider_error(&err))?;
    state
        .stores()?
        .db
        .identities()
        .begin(&PendingSignIn {
            state_sha256: sha256_hex(&authorization.state),
            provider: provider.name.clone(),
            pkce_verifier: authorization.pkce_verifier,
            nonce: authorization.nonce,
            redirect_uri,
            return_to,
            expires_at_ms: maas_store::ids::now_ms() + STATE_TTL_SECS * 1000,
        })
        .await?;
    let secure = if state.options.auth.secure_cookies { "; Secure" } else { "" };
    // Lax, not Strict: the provider's redirect back is a cross-site navigation.
    let cookie = format!(
        "{STATE_COOKIE}={}; Path=/v1/auth/oauth; HttpOnly; SameSite=Lax; Max-Age={STATE_TTL_SECS}{secure}",
        authorization.state
    );
    let mut response = warp::reply::with_status(warp::reply(), http::StatusCode::FOUND).into_response();
    let headers = response.headers_mut();
    headers.insert(http::header::LOCATION, header_value(&authorization.url)?);
    headers.insert(http::header::SET_COOKIE, header_value(&cookie)?);
    headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    Ok(response)
}

fn header_value(text: &str) -> Result<http::HeaderValue, ApiError> {
    http::HeaderValue::from_str(text).map_err(|_| ApiError::internal("a header value is not valid"))
}

/// Where the provider sends the browser back: exchanges the code, finds or makes the
/// account, opens a session (the console's cookie) and sends the browser on to
/// `return_to` (an HTML page, so the new same-site cookie goes with the next request).
#[utoipa::path(get, path = "/v1/auth/oauth/{name}/callback", tag = "accounts",
    params(("name" = String, Path, description = "the provider's name"), ("code" = Option<String>, Query, description = "the provider's code"),
        ("state" = Option<String>, Query, description = "the state sent to the provider")),
    responses((status = 200, description = "signed in; the page goes on to return_to", content_type = "text/html"), (status = 400, body = crate::error::ErrorBody),
        (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 502, body = crate::error::ErrorBody)))]
async fn finish_sign_in(state: &AppState, name: &str, browser: &Browser, query: &Query) -> Result<Response, ApiError> {
    let provider = provider(state, name)?;
    let db = &state.stores()?.db;
    let state_param = query.get("state").filter(|s| !s.is_empty());
    if let Some(error) = query.get("error") {
        if let Some(sent) = state_param {
            db.identities().take(&sha256_hex(sent)).await?;
        }
        let description = query.get("error_description").map(|d| format!(" ({d})")).unwrap_or_default();
        return Err(ApiError::new(
            http::StatusCode::FORBIDDEN,
            "permission_error",
            "oauth_denied",
            format!("{} did not sign you in: {error}{description}", provider.label()),
        ));
    }
    let (Some(code), Some(sent)) = (query.get("code").filter(|c| !c.is_empty()), state_param) else {
        return Err(ApiError::bad_request(
            "invalid_callback",
            "the provider's answer has no code or state: start again",
        ));
    };
    if browser.state_cookie.as_deref() != Some(sent.as_str()) {
        return Err(ApiError::bad_request(
            "oauth_state_mismatch",
            "this sign-in did not start in this browser (its state cookie is missing or different): start again",
        ));
    }
    let pending =
        db.identities().take(&sha256_hex(sent)).await?.filter(|pending| pending.provider == provider.name).ok_or_else(
            || ApiError::bad_request("oauth_state_expired", "this sign-in expired or was used: start again"),
        )?;
    let identity = state
        .oauth
        .finish(provider, &pending.redirect_uri, &pending.pkce_verifier, &pending.nonce, code)
        .await
        .map_err(|err| provider_error(&err))?;
    let user = account_for(state, provider, &identity, &browser.address).await?;
    let detail = json!({"method": "oauth", "provider": provider.name});
    let (_, session_cookie) = open_session(state, &user, &browser.address, &browser.user_agent, detail).await?;
    let page = format!(
        "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={0}\">\
         <title>Signed in</title><p>Signed in. <a href=\"{0}\">Continue</a></p>",
        pending.return_to
    );
    let mut response = warp::reply::html(page).into_response();
    let headers = response.headers_mut();
    headers.append(http::header::SET_COOKIE, header_value(&session_cookie)?);
    headers.append(
        http::header::SET_COOKIE,
        http::HeaderValue::from_static("maas_oauth_state=; Path=/v1/auth/oauth; HttpOnly; SameSite=Lax; Max-Age=0"),
    );
    headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    Ok(response)
}

/// A user who may sign in: disabled accounts may not; a pending one is activated, since
/// the provider vouched for its address.
async fn usable(state: &AppState, user: User) -> Result<User, ApiError> {
    match user.status.as_str() {
        "disabled" => Err(account_disabled()),
        "pending" => {
            let db = &state.stores()?.db;
            db.users().set_status(&user.id, "active").await?;
            Ok(db.users().get(&user.id).await?)
        }
        _ => Ok(user),
    }
}

/// The account `identity` signs in to: linked, matched by a vouched-for email, or new.
async fn account_for(
    state: &AppState,
    provider: &OAuthProvider,
    identity: &ExternalIdentity,
    address: &str,
) -> Result<User, ApiError> {
    let db = &state.stores()?.db;
    let email = identity.email.as_deref().map(|e| e.trim().to_lowercase()).filter(|e| super::auth::valid_email(e));
    if let Some(linked) = db.identities().find(&provider.name, &identity.subject).await? {
        db.identities().touch(&provider.name, &identity.subject, email.as_deref()).await?;
        let user = db.users().get(&linked.user_id).await?;
        return if user.status == "disabled" { Err(account_disabled()) } else { Ok(user) };
    }
    let Some(email) = email.filter(|_| identity.email_verified) else {
        return Err(ApiError::forbidden(format!(
            "{} did not confirm an email address for this account: verify one there (on GitHub, a verified \
             primary address) and sign in again",
            provider.label()
        )));
    };
    let user = match db.users().find_by_email(&email).await? {
        Some(user) => user,
        None => match new_account(state, provider, identity, &email, address).await {
            // Another callback for the same address made the account first.
            Err(ApiError { status: http::StatusCode::CONFLICT, .. }) => {
                db.users().find_by_email(&email).await?.ok_or_else(|| ApiError::conflict("try signing in again"))?
            }
            other => other?,
        },
    };
    let user = usable(state, user).await?;
    // A racing callback of the same provider account may have linked it first: to this
    // user, or (refused below) to another.
    match db.identities().link(&provider.name, &identity.subject, &user.id, Some(&email)).await {
        Ok(_) | Err(StoreError::Conflict(_)) => {}
        Err(err) => return Err(err.into()),
    }
    let linked = db.identities().find(&provider.name, &identity.subject).await?;
    if linked.as_ref().map(|l| l.user_id.as_str()) != Some(user.id.as_str()) {
        return Err(ApiError::conflict(format!("this {} account is linked to another user", provider.label())));
    }
    audit(
        state,
        NewAuditEntry {
            actor_user_id: Some(user.id.clone()),
            ..anonymous_entry(address, "auth.identity_link", &user.id, json!({"provider": provider.name}))
        },
    )
    .await?;
    Ok(user)
}

/// A new active account for a vouched-for address; the first account on the platform
/// becomes its administrator, as with sign-up.
async fn new_account(
    state: &AppState,
    provider: &OAuthProvider,
    identity: &ExternalIdentity,
    email: &str,
    address: &str,
) -> Result<User, ApiError> {
    let db = &state.stores()?.db;
    let first = !db.credentials().has_accounts().await?;
    if !first && !state.options.auth.allow_signup {
        return Err(ApiError::forbidden(
            "sign-up is closed on this platform (auth.allow_signup): ask an administrator for an account with \
             this email address, then sign in again",
        ));
    }
    let display_name = identity.name.clone().unwrap_or_else(|| email.to_owned()).chars().take(100).collect();
    let mut user = db
        .users()
        .create(NewUser {
            email: Some(email.to_owned()),
            phone: None,
            display_name,
            password_hash: None,
            role: Some(if first { Role::Admin } else { Role::User }),
            active: true,
        })
        .await?;
    let first = first && db.credentials().claim_first_admin(&user.id).await?;
    if user.role == Role::Admin && !first {
        db.users().set_role(&user.id, Role::User).await?;
        user = db.users().get(&user.id).await?;
    }
    audit(
        state,
        NewAuditEntry {
            actor_user_id: Some(user.id.clone()),
            ..anonymous_entry(
                address,
                "auth.sign_up",
                &user.id,
                json!({"role": user.role, "first_account": first, "method": "oauth", "provider": provider.name}),
            )
        },
    )
    .await?;
    Ok(user)
}

/// The provider accounts linked to the caller.
#[utoipa::path(get, path = "/v1/auth/identities", tag = "accounts",
    responses((status = 200, description = "the linked provider accounts", body = super::ListOf<maas_store::repo::identities::Identity>), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list_identities(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let data = state.stores()?.db.identities().for_user(caller.user_id()).await?;
    Ok(super::ListOf::reply(data))
}
